"""`onramp bench`: throughput and end-to-end latency on the real Kafka broker and Flink cluster, against a bare
keyed PyFlink job measured in the same run, plus the per-stage cost of Onramp's per-event work.

Each measurement gets fresh topics. Output topics use ``message.timestamp.type=LogAppendTime``, so a record's
timestamp is the moment it is in the topic; latency = that timestamp minus the time the event was sent
(kept per event id by the producer). In exactly-once mode a record is appended before its transaction commits,
so there latency is measured to the moment a read_committed consumer receives it. Throughput = records / (last - first output timestamp) over a pre-loaded
backlog, which leaves job start-up out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from jobs.config import REPO_ROOT, OnrampConfig

log = logging.getLogger("onramp.bench")


@contextlib.contextmanager
def _quiet_kafka_selector() -> Iterator[None]:
    """kafka-python's selector warns whenever one of its tasks runs over 100 ms: so it does, dozens of times a
    run, while the harness decodes a 200,000-record topic after the job finished, where nothing waits on it
    (times are the broker's LogAppendTime). Quiet there only: the exactly-once run's reader stamps receipt
    times, and a blocked loop would matter then."""
    selector_log = logging.getLogger("kafka.net.selector")
    level = selector_log.level
    selector_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        selector_log.setLevel(level)

BARE_SCRIPT = REPO_ROOT / "jobs" / "bare_baseline.py"
# How long the JobManager's background metric fetch gets before the figures it fetched are read
METRICS_FETCH_WAIT_S = 2.0


@dataclass(frozen=True)
class BenchSizes:
    rate: float = 1000.0  # events/s for the latency runs
    duration_s: float = 30.0  # per latency run
    backlog: int = 200_000  # events pre-loaded for the throughput runs
    stage_events: int = 20_000  # events for the per-stage microbenchmark
    exactly_once_duration_s: float = 15.0
    # At-least-once latency runs first produce at the same rate for this long, unmeasured: a freshly submitted
    # job runs its first seconds with cold Python and with the JIT compiler still busy on code this TaskManager
    # has not run yet, which says nothing about the job in steady state (docs/performance-log.md).
    warmup_s: float = 30.0
    # Before anything is measured, the full job runs over this many events, unreported but for its figures in
    # ``jit_warmup``: a fresh TaskManager runs its first jobs slower while the JIT compiles the classes every job
    # shares (the connector, the Flink runtime), which would count against the full job alone. Consecutive
    # 60,000-event runs on a fresh TaskManager, four times: 2,943-4,285, then 4,202-5,293, then 5,389-6,831
    # events/s; the third is the steady state a long-running job sees (docs/performance-log.md).
    jit_warmup_events: int = 100_000


FULL = BenchSizes()
# Each of the five job submissions costs ~20 s here (`flink run`: client JVM, Python driver, SQL planning, upload),
# so quick keeps the measured parts short to stay under 3 minutes on 2 cores; its latency figures are indicative.
QUICK = BenchSizes(duration_s=6.0, backlog=10_000, stage_events=5_000, exactly_once_duration_s=5.0, warmup_s=8.0,
                   jit_warmup_events=0)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:  # None, not NaN: json.dumps would write a bare NaN, which strict JSON parsers refuse
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "max": round(ordered[-1], 2)}


class EventPool:
    """Encoded generated events (valid event times), with their ids, drawn in order without reuse."""

    def __init__(self, n_events: int, seed: int) -> None:
        from jobs.event_stream import generated_events
        from udfs.avro_codec import event_codec

        users = max(10, n_events // 25)
        events: list[dict[str, Any]] = []
        while len(events) < n_events:
            events.extend(generated_events(users, seed=seed + len(events)))
        codec = event_codec()
        self.records = [(e["user_id"].encode(), codec.encode(e), e["event_id"]) for e in events[:n_events]]
        self.events = events[:n_events]
        self._next = 0

    def take(self, n: int) -> list[tuple[bytes, bytes, str]]:
        if self._next + n > len(self.records):
            raise ValueError(f"event pool exhausted ({len(self.records)} events)")
        chunk = self.records[self._next:self._next + n]
        self._next += n
        return chunk


def _event_id_of(variant: str) -> Callable[[bytes], str]:
    if variant == "bare":
        return lambda value: value.split(b",", 1)[0].decode()
    from udfs.avro_codec import decision_codec

    codec = decision_codec()
    return lambda value: codec.decode(value)["event_id"]


class _ConcurrentReader(threading.Thread):
    """Reads an output topic while the events are produced; stamps each record with its receipt time."""

    def __init__(self, cfg: OnrampConfig, variant: str, expected: int, timeout_s: float) -> None:
        super().__init__(daemon=True)
        self.cfg, self.expected, self.timeout_s = cfg, expected, timeout_s
        self.event_id = _event_id_of(variant)
        self.received: list[tuple[str, int]] = []

    def run(self) -> None:
        from jobs.kafka_io import read_records

        for record in read_records(self.cfg, self.cfg.decisions_topic, max_records=self.expected,
                                   timeout_s=self.timeout_s):
            self.received.append((self.event_id(record.value), time.time_ns() // 1_000_000))


class Bench:
    def __init__(self, cfg: OnrampConfig, sizes: BenchSizes) -> None:
        self.cfg = cfg
        self.sizes = sizes
        self.run_id = uuid.uuid4().hex[:8]
        self.topics_made: list[str] = []
        # Its own checkpoints, deleted at the end: in the user's checkpoint_dir a benchmark job's retained
        # checkpoint would be what `onramp submit --from-checkpoint latest` restores the user's job from.
        self.checkpoint_dir = Path(cfg.state_dir) / "bench-checkpoints" / self.run_id
        self.jobs_started: list[str] = []

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _topics(self, name: str) -> OnrampConfig:
        from jobs.kafka_admin import ensure_topics

        cfg = dataclasses.replace(
            self.cfg,
            input_topic=f"bench-{self.run_id}-{name}-in",
            decisions_topic=f"bench-{self.run_id}-{name}-out",
            dead_letter_topic=f"bench-{self.run_id}-{name}-dlq",
            audit_topic=f"bench-{self.run_id}-{name}-audit" if self.cfg.audit_topic else "",  # "" keeps audit off
            control_topic=f"bench-{self.run_id}-{name}-control",
            group_id=f"bench-{self.run_id}-{name}",
            checkpoint_dir=str(self.checkpoint_dir),
        )
        self.topics_made += cfg.job_topics()
        ensure_topics(cfg, [t for t in cfg.job_topics() if t != cfg.decisions_topic])
        ensure_topics(cfg, [cfg.decisions_topic], configs={"message.timestamp.type": "LogAppendTime"})
        return cfg

    def clean_up(self) -> None:
        """Cancel any of the run's jobs still running (a measurement that failed, timed out or was interrupted
        would otherwise leave it restarting and holding a slot), then delete the run's topics and checkpoints."""
        from jobs import flink_jobs

        for job_id in self.jobs_started:
            try:
                if flink_jobs.rest(self.cfg, f"/jobs/{job_id}")["state"] not in ("CANCELED", "FAILED", "FINISHED"):
                    log.info("cancelling benchmark job %s", job_id)
                    flink_jobs.cancel(self.cfg, job_id)
            except Exception as exc:  # cleanup must not hide the figures (or the error that got us here)
                log.warning("could not cancel benchmark job %s: %s", job_id, exc)
        self.delete_topics()
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def delete_topics(self) -> None:
        """Delete the run's topics: each run writes up to a few hundred thousand records to ~20 fresh topics, and
        a broker that keeps them all spends CPU on them while idle (seen here: ~400 partitions, 4.4 GB, a third
        of a core with no job running), which slows the next runs on a 2-core machine."""
        from jobs.kafka_admin import delete_topics

        if not self.topics_made:
            return
        try:
            delete_topics(self.cfg, self.topics_made)
        except Exception as exc:  # cleanup must not hide the figures
            log.warning("could not delete the benchmark's topics (%s): %s", ", ".join(self.topics_made), exc)

    def _submit(self, cfg: OnrampConfig, variant: str, bounded: bool) -> str:
        from jobs import flink_jobs, services
        from jobs.provision import flink_job_jars

        job_id = flink_jobs.submit(
            cfg,
            flink_bin=services.flink_bin(cfg),
            env=services.flink_env(cfg),
            jars=flink_job_jars(cfg),
            script=BARE_SCRIPT if variant == "bare" else flink_jobs.JOB_SCRIPT,
            # Not the user's job name: `onramp submit`, `stop` and `status` find the user's job by name.
            job_args=["--job-name", f"onramp-bench-{self.run_id}-{variant}"] + (["--bounded"] if bounded else []),
        )
        self.jobs_started.append(job_id)
        if not bounded:
            flink_jobs.wait_running(cfg, job_id)
        return job_id

    def _collect(self, cfg: OnrampConfig, variant: str, expected: int, timeout_s: float) -> list[tuple[str, int]]:
        from jobs.kafka_io import read_records

        event_id = _event_id_of(variant)
        with _quiet_kafka_selector():
            return [(event_id(r.value), r.timestamp) for r in
                    read_records(cfg, cfg.decisions_topic, max_records=expected, timeout_s=timeout_s)]

    # -- measurements -----------------------------------------------------------------------------------------

    def throughput(self, variant: str, pool: EventPool, events: int | None = None,
                   name: str = "tp") -> dict[str, Any]:
        """Events/s of ``variant`` over a pre-loaded backlog (``events``, default the sizes' backlog)."""
        from jobs import flink_jobs
        from jobs.kafka_io import make_producer, produce

        cfg = self._topics(f"{variant}-{name}")
        records = pool.take(events or self.sizes.backlog)
        producer = make_producer(self.cfg, linger_ms=20)
        produce(producer, cfg.input_topic, ((k, v) for k, v, _ in records))
        producer.close()
        log.info("%s throughput: %d events pre-loaded; running the job over them", variant, len(records))
        started = time.monotonic()
        job_id = self._submit(cfg, variant, bounded=True)
        # Read the output only after the bounded job finished: a concurrent consumer would compete for the
        # same two cores and slow the job it measures.
        state = flink_jobs.wait_finished(cfg, job_id, timeout_s=120 + len(records) / 500)
        wall = time.monotonic() - started
        out = self._collect(cfg, variant, len(records), timeout_s=60)
        stamps = sorted(ts for _, ts in out)
        span_s = (stamps[-1] - stamps[0]) / 1000 if len(stamps) > 1 else float("nan")
        unique = len({eid for eid, _ in out})
        return {
            "events": len(records),
            "decisions": len(out),
            "unique_decisions": unique,
            "throughput_eps": round(len(out) / span_s, 1) if span_s and span_s > 0 else None,
            "seconds_incl_startup": round(wall, 1),
            "job_state": state,
        }

    def latency(self, variant: str, pool: EventPool, delivery: str = "at-least-once",
                duration_s: float | None = None) -> dict[str, Any]:
        from jobs import flink_jobs
        from jobs.load_generator import paced_produce

        duration_s = duration_s or self.sizes.duration_s
        warmup_s = self.sizes.warmup_s if delivery == "at-least-once" else 0.0
        cfg = dataclasses.replace(self._topics(f"{variant}-lat-{delivery}"), delivery=delivery)
        warmup = pool.take(int(self.sizes.rate * warmup_s))
        measured = pool.take(int(self.sizes.rate * duration_s))
        records = warmup + measured
        n = len(records)
        id_of = {v: eid for _, v, eid in measured}
        sent: dict[str, int] = {}

        def stamp(value: bytes, now_ms: int) -> bytes:
            if value in id_of:  # warm-up events are decided and counted, not timed
                sent[id_of[value]] = now_ms
            return value

        job_id = self._submit(cfg, variant, bounded=False)  # cancelled by clean_up if it never gets running
        try:
            time.sleep(1.0)  # let the Python workers settle before the clock starts
            log.info("%s latency (%s): %d events at %.0f/s (first %.0f s warm-up)", variant, delivery, n,
                     self.sizes.rate, warmup_s)
            if delivery == "exactly-once":
                # A transactional record is appended (LogAppendTime) before its transaction commits; what counts
                # is when a read_committed consumer can see it, so read concurrently and stamp on receipt.
                reader = _ConcurrentReader(cfg, variant, n, timeout_s=60 + 3 * cfg.checkpoint_interval_ms / 1000)
                reader.start()
            paced_produce(self.cfg, cfg.input_topic, ((k, v) for k, v, _ in records), self.sizes.rate, stamp)
            if delivery == "exactly-once":
                reader.join()
                out = reader.received
            else:
                out = self._collect(cfg, variant, n, timeout_s=60 + cfg.checkpoint_interval_ms / 1000)
            gc_metrics = _gc_metrics(cfg, job_id) if variant == "full" else {}  # the bare job reports none
        finally:
            flink_jobs.cancel(cfg, job_id)
        latencies = [ts - sent[eid] for eid, ts in out if eid in sent]
        return {
            "events": n,
            "decisions": len(out),
            "unique_decisions": len({eid for eid, _ in out}),
            "rate_eps": self.sizes.rate,
            "warmup_s": warmup_s,
            "measured_events": len(latencies),
            "latency_ms": percentiles(latencies),
            **gc_metrics,
        }


def _gc_metrics(cfg: OnrampConfig, job_id: str) -> dict[str, Any]:
    """Full Python GC collections during the run and their total pause, as the full job reports them
    (udfs/gc_pauses.py): the usual suspect for the latency tail.

    The JobManager fetches metrics from the TaskManagers only when asked (at most every 10 s), in the
    background, and answers each request from what it fetched before: the first request of a job gets
    nothing, and a request at the end of a run gets the figures of the previous fetch. So a first request
    starts a fresh fetch, and the figures are read after it (retried a few times should they still be
    missing)."""
    from jobs import flink_jobs

    names = ("gc_full_collections", "gc_full_pause_ms")
    found: dict[str, float] = {}
    try:
        flink_jobs.operator_metrics(cfg, job_id, names)  # starts the fetch; answers from the previous one
    except Exception:
        pass  # reported by the reads below
    time.sleep(METRICS_FETCH_WAIT_S)
    for _ in range(5):
        try:
            found = flink_jobs.operator_metrics(cfg, job_id, names)
        except Exception as exc:  # a figure we could not read must not fail the benchmark
            log.warning("could not read GC metrics: %s", exc)
            return {}
        if found:
            break
        time.sleep(1.0)
    if not found:
        log.warning("the job reported no GC metrics (%s)", ", ".join(names))
    return {k: int(v) for k, v in found.items()}


def machine_facts(cfg: OnrampConfig) -> dict[str, Any]:
    import onnxruntime
    import pyflink.version

    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "apache_flink": pyflink.version.__version__,
        "onnxruntime": onnxruntime.__version__,
        "parallelism": cfg.parallelism,
        "execution_mode": cfg.execution_mode,
        "bundle_size": cfg.bundle_size,
        "bundle_time_ms": cfg.bundle_time_ms,
        "buffer_timeout_ms": cfg.buffer_timeout_ms,
        "sink_linger_ms": cfg.sink_linger_ms,
        "sink_own_thread": cfg.sink_own_thread,
        "profile_cache_size": cfg.profile_cache_size,
        "state_backend": cfg.state_backend,
        "checkpoint_interval_ms": cfg.checkpoint_interval_ms,
        "broker_and_cluster": "local, same machine",
    }


def run_bench(cfg: OnrampConfig, sizes: BenchSizes, *, stages_only: bool = False) -> dict[str, Any]:
    from jobs import services
    from jobs.provision import provision
    from jobs.stage_bench import stage_costs
    from models.registry import current_bundle_path
    from udfs.model_bundle import load_current

    started = time.monotonic()
    provision(cfg)
    if current_bundle_path(cfg.model_dir) is None:
        from models.training import train_and_publish

        log.info("no model bundle yet: training one")
        train_and_publish(cfg)
    bundle = load_current(cfg.model_dir)
    log.info("generating events")
    needed = sizes.stage_events if stages_only else (
        sizes.jit_warmup_events + 2 * sizes.backlog + 2 * int(sizes.rate * (sizes.duration_s + sizes.warmup_s))
        + int(sizes.rate * sizes.exactly_once_duration_s))
    pool = EventPool(max(needed, sizes.stage_events), seed=int(time.time()))
    log.info("per-stage microbenchmark over %d events", sizes.stage_events)
    stages = stage_costs(cfg, bundle, pool.events[: sizes.stage_events])
    result: dict[str, Any] = {"stages_us": stages, "machine": machine_facts(cfg), "model_version": bundle.version}
    if stages_only:
        return result
    services.up(cfg)
    from jobs.flink_jobs import taskmanager_metaspace_mb

    bench = Bench(cfg, sizes)
    try:
        if sizes.jit_warmup_events:
            log.info("JIT warm-up: the full job over %d events, not measured", sizes.jit_warmup_events)
            result["jit_warmup"] = bench.throughput("full", pool, sizes.jit_warmup_events, name="warmup")
        full_tp = bench.throughput("full", pool)
        metaspace_first = taskmanager_metaspace_mb(cfg)  # what a TaskManager loads for any job is in by now
        bare_tp = bench.throughput("bare", pool)
        full_lat = bench.latency("full", pool)
        bare_lat = bench.latency("bare", pool)
        eo_lat = bench.latency("full", pool, delivery="exactly-once", duration_s=sizes.exactly_once_duration_s)
    finally:
        bench.clean_up()
    # Four more jobs ran on the same TaskManagers after the first: what they left in metaspace (a job's own
    # classes should not stay after it ends)
    result["machine"]["taskmanager_metaspace_mb"] = {"after_first_job": metaspace_first,
                                                     "after_last_job": taskmanager_metaspace_mb(cfg),
                                                     "jobs_between": 4}
    result["full"] = {**full_tp, "latency_ms": full_lat["latency_ms"], "latency_run": full_lat}
    result["bare"] = {**bare_tp, "latency_ms": bare_lat["latency_ms"], "latency_run": bare_lat}
    result["exactly_once"] = eo_lat
    ratio = (full_tp["throughput_eps"] / bare_tp["throughput_eps"]
             if full_tp["throughput_eps"] and bare_tp["throughput_eps"] else None)
    result["throughput_ratio"] = round(ratio, 3) if ratio is not None else None
    result["counts_ok"] = all(
        r["decisions"] == r["events"] == r["unique_decisions"] for r in (full_tp, bare_tp, full_lat, bare_lat, eo_lat)
    )
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def summary_table(result: dict[str, Any]) -> str:
    lines = [f"{'stage':18s} µs/event"]
    lines += [f"{k:18s} {v:8.2f}" for k, v in result["stages_us"].items()]
    if "full" in result:
        lines.append("")
        lines.append(f"{'job':14s} {'events':>8s} {'decisions':>9s} {'events/s':>9s} {'p50 ms':>7s} {'p95 ms':>7s} {'p99 ms':>7s} {'max ms':>7s}")
        for name in ("full", "bare"):
            r = result[name]
            lat = r["latency_ms"]
            lines.append(f"{name:14s} {r['events']:8d} {r['decisions']:9d} {r['throughput_eps'] or 0:9.0f} "
                         f"{lat['p50']:7.1f} {lat['p95']:7.1f} {lat['p99']:7.1f} {lat['max']:7.1f}")
        eo = result["exactly_once"]
        lat = eo["latency_ms"]
        lines.append(f"{'exactly-once':14s} {eo['events']:8d} {eo['decisions']:9d} {'':9s} "
                     f"{lat['p50']:7.1f} {lat['p95']:7.1f} {lat['p99']:7.1f} {lat['max']:7.1f}")
        lines.append("")
        lines.append(f"throughput full/bare: {result['throughput_ratio']}   counts ok: {result['counts_ok']}   "
                     f"({result['seconds']}s)")
    return "\n".join(lines)
