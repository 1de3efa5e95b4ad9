"""`onramp status`: what the personalize job is doing, from the Flink REST API and Kafka, for a person or a script.

One report per job: state, uptime, restarts, the last completed checkpoint and checkpoint counts, throughput
(records per second in and out of each vertex), consumer lag per input partition, and the versions in use (the
model registry's CURRENT and the rules file's version; the job's own ``model_version`` / ``rules_version`` gauges
when it reports them).

Lag is the input topic's end offset minus the offset the job's consumer group committed. The Kafka source commits
on each completed checkpoint (the job always checkpoints, in both delivery modes), so this lag includes up to one
checkpoint interval of records the job has already processed; the source's own ``pendingRecords`` metric (when
Flink reports it) is the live figure. A partition with no committed offset yet (no checkpoint completed since the
job started reading it) has lag "unknown", never a guess.

Collecting (:func:`collect`) does the I/O; everything else here is pure and tested without services.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from jobs.config import BUILTIN_RULES, OnrampConfig

log = logging.getLogger(__name__)

JOB_GAUGES = ("model_version", "rules_version")  # reported by the job's operator when it exposes them
_ACTIVE_STATES = ("RUNNING", "CREATED", "RESTARTING", "INITIALIZING", "FAILING", "CANCELLING", "RECONCILING")

RestGet = Callable[[str], Any]


@dataclass(frozen=True)
class PartitionLag:
    """One input partition: the group's committed offset, the topic's end offset, and their difference."""

    partition: int
    end_offset: int
    committed: int | None
    lag: int | None  # None: nothing committed yet (no completed checkpoint since the job started reading it)


@dataclass(frozen=True)
class Checkpoints:
    completed: int
    failed: int
    in_progress: int
    restored: int
    last_id: int | None = None
    last_completed_at_ms: int | None = None
    last_age_s: float | None = None
    last_duration_ms: int | None = None
    last_size_bytes: int | None = None
    last_external_path: str | None = None


@dataclass(frozen=True)
class VertexRate:
    name: str
    parallelism: int
    records_in_per_s: float | None
    records_out_per_s: float | None


@dataclass
class JobReport:
    id: str
    name: str
    state: str
    start_time_ms: int | None
    uptime_s: float | None
    restarts: int | None
    checkpoints: Checkpoints | None
    vertices: list[VertexRate] = field(default_factory=list)
    events_in_per_s: float | None = None
    pending_records: int | None = None
    in_job_versions: dict[str, str] = field(default_factory=dict)


@dataclass
class StatusReport:
    """Everything `onramp status` shows; ``as_dict()`` is the --json output."""

    flink_rest_url: str
    bootstrap_servers: str
    input_topic: str
    group_id: str
    jobs: list[JobReport]
    lag: list[PartitionLag] | None
    total_lag: int | None
    versions: dict[str, str | None]
    problems: list[str] = field(default_factory=list)
    services: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Pure: shaping REST and Kafka answers
# --------------------------------------------------------------------------------------------------------------


def partition_lag(end_offsets: dict[int, int], committed: dict[int, int | None]) -> list[PartitionLag]:
    """Lag per partition of the input topic, in partition order. A committed offset past the end (a topic
    recreated under a group that remembers the old one) counts as no lag, not a negative one."""
    out = []
    for partition in sorted(end_offsets):
        end = end_offsets[partition]
        done = committed.get(partition)
        lag = None if done is None or done < 0 else max(0, end - done)
        out.append(PartitionLag(partition, end, None if done is None or done < 0 else done, lag))
    return out


def total_lag(lags: Iterable[PartitionLag]) -> int | None:
    """Sum over partitions; None when any partition's lag is unknown (a partial sum would understate it)."""
    values = [p.lag for p in lags]
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


def checkpoint_summary(stats: dict[str, Any] | None, now_ms: int) -> Checkpoints | None:
    """``/jobs/:id/checkpoints`` reduced to counts and the latest completed checkpoint."""
    if not stats:
        return None
    counts = stats.get("counts") or {}
    latest = (stats.get("latest") or {}).get("completed") or None
    done_at = latest.get("latest_ack_timestamp") if latest else None
    return Checkpoints(
        completed=int(counts.get("completed", 0)),
        failed=int(counts.get("failed", 0)),
        in_progress=int(counts.get("in_progress", 0)),
        restored=int(counts.get("restored", 0)),
        last_id=latest.get("id") if latest else None,
        last_completed_at_ms=done_at,
        last_age_s=round((now_ms - done_at) / 1000.0, 1) if done_at else None,
        last_duration_ms=latest.get("end_to_end_duration") if latest else None,
        last_size_bytes=(latest.get("checkpointed_size", latest.get("state_size")) if latest else None),
        last_external_path=latest.get("external_path") if latest else None,
    )


def uptime_seconds(job: dict[str, Any], now_ms: int) -> float | None:
    """Seconds since the job started; for a finished job, how long it ran (Flink's ``duration``)."""
    start = job.get("start-time")
    if not start or start < 0:
        return None
    end = job.get("end-time")
    if end and end > 0:
        return round((end - start) / 1000.0, 1)
    return round((now_ms - start) / 1000.0, 1)


def aggregated_metric(answer: Any, name: str) -> float | None:
    """The ``sum`` of one metric from ``/jobs/:id/vertices/:vid/subtasks/metrics?get=...&agg=sum``."""
    for entry in answer or []:
        if entry.get("id") == name and entry.get("sum") is not None:
            return float(entry["sum"])
    return None


def source_vertex_ids(plan: dict[str, Any] | None) -> set[str]:
    """Vertices with no inputs in the job plan: the sources."""
    nodes = (plan or {}).get("nodes") or []
    return {n["id"] for n in nodes if not n.get("inputs")}


def rules_version_of(rules_file: str) -> str | None:
    """The ``version`` of a YAML rule set (what decisions name as rules_version), or the built-in rules' name."""
    if rules_file == BUILTIN_RULES:
        from udfs.next_step import RULES_VERSION

        return RULES_VERSION
    try:
        data = yaml.safe_load(Path(rules_file).read_text())
    except (OSError, yaml.YAMLError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return None if version is None else str(version)


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}/s"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _fmt_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return [indent + "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]


def format_status(report: StatusReport) -> str:
    """The terminal view: one block per job, then lag per partition, then versions and problems."""
    lines: list[str] = []
    if report.services:
        for name, info in report.services.items():
            state = "healthy" if info.get("healthy") else ("running" if info.get("running") else "stopped")
            lines.append(f"{name:<8} {state}")
    if not report.jobs:
        lines.append(f"no Onramp job on {report.flink_rest_url}")
    for job in report.jobs:
        cp = job.checkpoints
        lines.append(f"job      {job.name}  {job.id}  {job.state}")
        lines.append(f"uptime   {_fmt_duration(job.uptime_s)}    restarts {'-' if job.restarts is None else job.restarts}")
        if cp is None:
            lines.append("checkpoints  -")
        else:
            last = ("none completed yet" if cp.last_id is None else
                    f"#{cp.last_id} {_fmt_duration(cp.last_age_s)} ago, took {cp.last_duration_ms} ms, "
                    f"{_fmt_bytes(cp.last_size_bytes)}")
            lines.append(f"checkpoints  last {last}; completed {cp.completed}, failed {cp.failed}, "
                         f"in progress {cp.in_progress}")
        pending = "" if job.pending_records is None else f"    source pending records {job.pending_records:,}"
        lines.append(f"throughput  events in {_fmt_rate(job.events_in_per_s)}{pending}")
        if job.vertices:
            lines += _table(["VERTEX", "PARALLELISM", "IN", "OUT"],
                            [[v.name[:60], str(v.parallelism), _fmt_rate(v.records_in_per_s),
                              _fmt_rate(v.records_out_per_s)] for v in job.vertices])
        if job.in_job_versions:
            lines.append("in job   " + ", ".join(f"{k} {v}" for k, v in sorted(job.in_job_versions.items())))
    lag_head = f"lag      {report.input_topic} (group {report.group_id})"
    if report.lag is None:
        lines.append(lag_head + ": unknown (Kafka not reachable)")
    elif not report.lag:
        lines.append(lag_head + ": topic has no partitions (not created yet?)")
    else:
        total = "unknown" if report.total_lag is None else f"{report.total_lag:,}"
        lines.append(f"{lag_head}: total {total}")
        lines += _table(["PARTITION", "END", "COMMITTED", "LAG"],
                        [[str(p.partition), f"{p.end_offset:,}", "-" if p.committed is None else f"{p.committed:,}",
                          "unknown" if p.lag is None else f"{p.lag:,}"] for p in report.lag])
    versions = report.versions
    lines.append(f"versions model {versions.get('model') or '-'} (CURRENT in {versions.get('model_dir')}), "
                 f"rules {versions.get('rules') or '-'} ({versions.get('rules_file')})")
    lines += [f"problem  {p}" for p in report.problems]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# I/O: the Flink REST API and Kafka
# --------------------------------------------------------------------------------------------------------------


def committed_offsets(cfg: OnrampConfig, topic: str, group_id: str) -> dict[int, int | None]:
    """The consumer group's committed offset per partition of ``topic`` (missing: never committed)."""
    from kafka import KafkaAdminClient

    from jobs.kafka_io import client_options

    admin = KafkaAdminClient(**client_options(cfg), client_id="onramp-status", request_timeout_ms=10_000)
    try:
        answer = admin.list_group_offsets({group_id: None}).get(group_id, {})
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in answer.items() if tp.topic == topic}


def input_lag(cfg: OnrampConfig, problems: list[str]) -> list[PartitionLag] | None:
    """Lag per input partition; None (with the reason appended to ``problems``) when Kafka cannot say."""
    from jobs.kafka_admin import reachable
    from jobs.kafka_io import end_offsets

    if not reachable(cfg.bootstrap_servers, timeout_s=2.0):
        problems.append(f"Kafka at {cfg.bootstrap_servers} not reachable for lag (no broker accepts connections)")
        return None
    try:
        ends = end_offsets(cfg, cfg.input_topic)
    except Exception as exc:  # kafka-python raises many kinds while a broker is away
        problems.append(f"Kafka at {cfg.bootstrap_servers} not reachable for lag ({type(exc).__name__}: {exc})")
        return None
    try:
        committed = committed_offsets(cfg, cfg.input_topic, cfg.group_id)
    except Exception as exc:
        problems.append(f"committed offsets of group {cfg.group_id} unavailable ({type(exc).__name__}: {exc})")
        committed = {}
    lag = partition_lag(ends, committed)
    if any(p.lag is None for p in lag):
        problems.append(f"group {cfg.group_id} has no committed offset for some partitions of {cfg.input_topic}: "
                        "the job commits on completed checkpoints; lag unknown until the first one")
    return lag


def _job_metric(get: RestGet, job_id: str, name: str) -> float | None:
    for entry in get(f"/jobs/{job_id}/metrics?get={name}") or []:
        if entry.get("id") == name and entry.get("value") not in (None, ""):
            try:
                return float(entry["value"])
            except ValueError:
                return None
    return None


def _vertex_gauges(get: RestGet, job_id: str, vertex_id: str, suffixes: Iterable[str]) -> dict[str, str]:
    """Values of the vertex metrics whose names end with ``.<suffix>`` (first subtask that reports one)."""
    wanted = tuple(suffixes)
    names = [m["id"] for m in get(f"/jobs/{job_id}/vertices/{vertex_id}/metrics") or []
             if any(m.get("id", "").endswith("." + s) for s in wanted)]
    if not names:
        return {}
    out: dict[str, str] = {}
    for entry in get(f"/jobs/{job_id}/vertices/{vertex_id}/metrics?get={','.join(names)}") or []:
        short = next(s for s in wanted if entry["id"].endswith("." + s))
        if entry.get("value") not in (None, "") and short not in out:
            out[short] = str(entry["value"])
    return out


def job_report(get: RestGet, job_id: str, now_ms: int) -> JobReport:
    """One job, from its detail, checkpoint statistics and metrics."""
    job = get(f"/jobs/{job_id}")
    try:
        checkpoints = checkpoint_summary(get(f"/jobs/{job_id}/checkpoints"), now_ms)
    except Exception as exc:  # a job that never enabled checkpointing answers with an error
        log.debug("no checkpoint statistics for %s: %s", job_id, exc)
        checkpoints = None
    restarts = _job_metric(get, job_id, "numRestarts")
    sources = source_vertex_ids(job.get("plan"))
    vertices, events_in, pending = [], None, None
    versions: dict[str, str] = {}
    running = job.get("state") == "RUNNING"
    for vertex in job.get("vertices", []):
        vid = vertex["id"]
        rates = get(f"/jobs/{job_id}/vertices/{vid}/subtasks/metrics"
                    "?get=numRecordsInPerSecond,numRecordsOutPerSecond,pendingRecords&agg=sum") if running else []
        rate_in = aggregated_metric(rates, "numRecordsInPerSecond")
        rate_out = aggregated_metric(rates, "numRecordsOutPerSecond")
        vertices.append(VertexRate(vertex.get("name", vid), int(vertex.get("parallelism", 0)), rate_in, rate_out))
        if vid in sources:
            events_in = (events_in or 0.0) + (rate_out or 0.0)
            backlog = aggregated_metric(rates, "pendingRecords")
            if backlog is not None:
                pending = (pending or 0) + int(backlog)
        elif running:
            versions.update({k: v for k, v in _vertex_gauges(get, job_id, vid, JOB_GAUGES).items() if k not in versions})
    return JobReport(
        id=job_id, name=job.get("name", "?"), state=job.get("state", "?"),
        start_time_ms=job.get("start-time") if (job.get("start-time") or 0) > 0 else None,
        uptime_s=uptime_seconds(job, now_ms), restarts=None if restarts is None else int(restarts),
        checkpoints=checkpoints, vertices=vertices, events_in_per_s=events_in if running else None,
        pending_records=pending, in_job_versions=versions,
    )


def pick_jobs(overview: list[dict[str, Any]], name: str, job_id: str | None = None) -> list[str]:
    """The job ids to report: the one asked for, else the active jobs called ``name``, else its latest run."""
    if job_id:
        return [job_id]
    ours = [j for j in overview if j.get("name") == name]
    active = [j["jid"] for j in ours if j.get("state") in _ACTIVE_STATES]
    if active:
        return active
    latest = max(ours, key=lambda j: j.get("start-time", 0), default=None)
    return [latest["jid"]] if latest else []


def versions_in_use(cfg: OnrampConfig) -> dict[str, str | None]:
    from models.registry import current_version

    try:
        model = current_version(Path(cfg.model_dir))
    except OSError:
        model = None
    return {"model": model, "model_dir": str(cfg.model_dir), "rules": rules_version_of(cfg.rules_file),
            "rules_file": str(cfg.rules_file)}


def collect(cfg: OnrampConfig, *, job_name: str, job_id: str | None = None,
            now_ms: int | None = None) -> StatusReport:
    """Ask Flink and Kafka; what cannot be reached is reported in ``problems`` (and left unknown), not raised."""
    from jobs import flink_jobs

    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    problems: list[str] = []
    reports: list[JobReport] = []
    try:
        overview = flink_jobs.list_jobs(cfg)
        reports = [job_report(lambda path: flink_jobs.rest(cfg, path), jid, now_ms)
                   for jid in pick_jobs(overview, job_name, job_id)]
    except flink_jobs.FlinkJobError as exc:
        problems.append(str(exc))
    lag = input_lag(cfg, problems)
    return StatusReport(
        flink_rest_url=cfg.flink_rest_url, bootstrap_servers=cfg.bootstrap_servers, input_topic=cfg.input_topic,
        group_id=cfg.group_id, jobs=reports, lag=lag, total_lag=total_lag(lag) if lag else None,
        versions=versions_in_use(cfg), problems=problems,
    )
