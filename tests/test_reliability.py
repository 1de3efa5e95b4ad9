"""Failures, restarts and upgrades on the real services (issue 8), and deduplication across a restore (issue 6).

Every check reads the decisions topic with a read_committed consumer and compares against the pure
:class:`udfs.personalizer.Personalizer` run in this process over the same events in the same order: exactly one
decision per valid event (none lost, none duplicated), and each decision equal to the one an uninterrupted run
makes, so the profiles (counts, interest, steps, dedup ids) continued from the restored state. Recovery times
are printed (``-s``) and logged; docs/operations.md records the measured ones.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from jobs import flink_jobs, services
from jobs.cli import main as onramp
from jobs.cli import submit_job
from jobs.config import REPO_ROOT, OnrampConfig, load_config
from jobs.event_stream import encode_events, generated_events
from jobs.kafka_admin import BrokerUnavailable
from jobs.kafka_io import make_producer, make_reader, produce, read_records
from udfs.avro_codec import decision_codec

log = logging.getLogger("tests.reliability")

# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


class DecisionLog(threading.Thread):
    """Reads committed decisions as they arrive and notes when each arrived (monotonic clock); keeps reading
    through a broker restart (the client reconnects)."""

    def __init__(self, cfg: OnrampConfig, topic: str):
        super().__init__(daemon=True)
        self.cfg, self.topic = cfg, topic
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def run(self) -> None:
        from kafka import TopicPartition

        codec = decision_codec()
        consumer = make_reader(self.cfg)
        try:
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            while not self._halt.is_set():
                try:
                    batch = consumer.poll(timeout_ms=200)
                except Exception as exc:  # broker restarting: keep polling
                    log.debug("decision log poll: %s", exc)
                    time.sleep(0.5)
                    continue
                now = time.monotonic()
                with self._lock:
                    for records in batch.values():
                        self.arrivals.extend((now, codec.decode(r.value)) for r in records)
        finally:
            consumer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def snapshot(self) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return list(self.arrivals)

    def wait_for(self, event_ids: set[str], timeout_s: float) -> None:
        """Until a decision for every id in ``event_ids`` arrived (or fail, saying how many are missing)."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = event_ids - {d["event_id"] for _, d in self.snapshot()}
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(missing)} of {len(event_ids)} decisions not committed within {timeout_s}s")
            time.sleep(0.2)


def wait_until(what: str, check: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)
    return result


def produce_paced(cfg: OnrampConfig, events: list[dict[str, Any]], rate: float, sent_at: dict[str, float]) -> threading.Thread:
    """Send ``events`` at ``rate``/s from a thread, recording each event's send time (monotonic)."""

    def run() -> None:
        producer = make_producer(cfg)
        codec_records = list(encode_events(events))
        start = time.monotonic()
        for i, ((key, value), event) in enumerate(zip(codec_records, events)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent_at[event["event_id"]] = time.monotonic()
            producer.send(cfg.input_topic, key=key, value=value)
        producer.flush()
        producer.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def send(cfg: OnrampConfig, events: list[dict[str, Any]]) -> None:
    producer = make_producer(cfg)
    produce(producer, cfg.input_topic, encode_events(events))
    producer.close()


def recent_events(events: list[dict[str, Any]], window_ms: int) -> list[dict[str, Any]]:
    """The events each user's dedup memory still holds: within ``window_ms`` (minus an hour) of that user's newest."""
    newest: dict[str, int] = {}
    for e in events:
        newest[e["user_id"]] = max(newest.get(e["user_id"], 0), e["event_time"])
    return [e for e in events if e["event_time"] >= newest[e["user_id"]] - window_ms + 3_600_000]


def reference_decisions(cfg: OnrampConfig, segments: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, dict]:
    """What an uninterrupted run decides: the pure Personalizer over the events in order, with the rule set file
    of each segment; duplicates (re-sent ids) get none, as in the job."""
    from jobs.personalize import resolve_bundle
    from udfs.model_bundle import ModelBundle
    from udfs.personalizer import Personalizer
    from udfs.profile_state import Profile
    from udfs.rules.compiler import compile_rules_text

    from udfs.experiment_arms import load_experiments
    from udfs.pseudonym import load_key

    key = load_key(cfg.pseudonym_key_file)  # the job hashes experiment arms on the pseudonym, so must the replay
    personalizer = Personalizer(ModelBundle.load(resolve_bundle(cfg)), cfg.interest_half_life_hours * 3_600_000.0,
                                None, cfg.profile_policy(), load_experiments(cfg.experiments_file))
    profiles: dict[str, Profile] = {}
    out: dict[str, dict] = {}
    for rules_file, events in segments:
        personalizer.rules = compile_rules_text(Path(rules_file).read_text(), rules_file)
        for event in events:
            profile = profiles.setdefault(event["user_id"], Profile())
            if personalizer.fold(profile, event):
                out[event["event_id"]] = personalizer.decide(profile, event, subject=key.user(event["user_id"]))
    return out


def comparable(decision: dict[str, Any]) -> dict[str, Any]:
    """A decision without its wall-clock time, floats rounded (the same ONNX model, maybe other CPU paths)."""
    out = {k: v for k, v in decision.items() if k not in ("decided_at", "churn_risk", "interest")}
    out["churn_risk"] = round(decision["churn_risk"], 5)
    out["interest"] = {k: round(v, 5) for k, v in sorted(decision["interest"].items())}
    return out


def assert_exactly_once_and_continuous(decisions: list[dict], expected: dict[str, dict]) -> None:
    counts = Counter(d["event_id"] for d in decisions)
    duplicated = {k: n for k, n in counts.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} events got more than one decision"
    assert set(counts) == set(expected), (
        f"lost {len(set(expected) - set(counts))}, unexpected {len(set(counts) - set(expected))}")
    differing = [d["event_id"] for d in decisions if comparable(d) != comparable(expected[d["event_id"]])]
    assert not differing, (f"{len(differing)} decisions differ from an uninterrupted run, e.g. "
                           f"{comparable(next(d for d in decisions if d['event_id'] == differing[0]))} != "
                           f"{comparable(expected[differing[0]])}")


def reliability_cfg(live: OnrampConfig, name: str, tmp_path: Path, **changes: Any) -> OnrampConfig:
    return dataclasses.replace(
        live,
        delivery="exactly-once",
        checkpoint_interval_ms=1000,
        input_topic=f"{name}-events",
        decisions_topic=f"{name}-decisions",
        dead_letter_topic=f"{name}-dead-letters",
        audit_topic=f"{name}-audit",
        control_topic=f"{name}-control",
        group_id=name,
        checkpoint_dir=str(tmp_path / "checkpoints"),
        savepoint_dir=str(tmp_path / "savepoints"),
        restart_delay_ms=500,
        restart_max_delay_ms=5000,
        model_reload_interval_ms=0,
        rules_reload_interval_ms=0,
        **changes,
    )


def read_all(cfg: OnrampConfig) -> list[dict]:
    codec = decision_codec()
    return [codec.decode(r.value) for r in read_records(cfg, cfg.decisions_topic, timeout_s=60, idle_timeout_s=5)]


# --------------------------------------------------------------------------------------------------------------
# Tests on the real broker and cluster
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_taskmanager_kill_and_broker_restart_lose_nothing_duplicate_nothing(live_services, tmp_path):
    """While events stream: SIGKILL the TaskManager and start a new one; later restart the broker mid-run; then
    re-send events answered before both restarts. Exactly one decision per event, equal to an uninterrupted
    run's (profiles continued from the restored checkpoint), and none for the re-sent ids."""
    cfg = reliability_cfg(live_services, "failover", tmp_path)
    events = generated_events(20, seed=21)
    first, second = events[: len(events) * 2 // 3], events[len(events) * 2 // 3:]
    resent = recent_events(first, cfg.dedup_window_ms)
    sentinel = generated_events(2, seed=22)  # fresh users, sent last: once answered, everything before was read
    decisions = DecisionLog(cfg, cfg.decisions_topic)
    job_id = submit_job(cfg)
    decisions.start()
    try:
        # 1. TaskManager crash mid-stream.
        sent_at: dict[str, float] = {}
        producer = produce_paced(cfg, first, rate=40.0, sent_at=sent_at)
        wait_until("the first committed decisions", lambda: len(decisions.snapshot()) >= 40, 120)
        killed_at = time.monotonic()
        assert services.kill_taskmanager(cfg)
        services.start_taskmanager(cfg)
        producer.join(timeout=120)
        decisions.wait_for({e["event_id"] for e in first}, 240)
        after_kill = [t for t, d in decisions.snapshot() if sent_at.get(d["event_id"], 0) > killed_at]
        tm_recovery_s = min(after_kill) - killed_at
        tm_catch_up_s = max(t for t, _ in decisions.snapshot()) - killed_at
        exceptions = flink_jobs.rest(cfg, f"/jobs/{job_id}/exceptions")
        assert exceptions["exceptionHistory"]["entries"], "the job never failed over: was the TaskManager killed?"

        # 2. Broker restart mid-run: decisions of `second` are still in flight (uncommitted) when it goes down.
        send(cfg, second)
        stopped_at = time.monotonic()
        services.stop_kafka(cfg)
        services.start_kafka(cfg)
        broker_back_s = time.monotonic() - stopped_at
        decisions.wait_for({e["event_id"] for e in second}, 240)
        broker_recovery_s = max(t for t, _ in decisions.snapshot()) - stopped_at

        # 3. Dedup across both restarts: ids answered before them get nothing now.
        send(cfg, resent + sentinel)
        decisions.wait_for({e["event_id"] for e in sentinel}, 180)
        everything = read_all(cfg)
    finally:
        decisions.stop()
        flink_jobs.cancel(cfg, job_id)

    summary = (f"TaskManager SIGKILL: first new decision committed {tm_recovery_s:.1f}s after the kill, backlog "
               f"caught up after {tm_catch_up_s:.1f}s; broker restart: down+up {broker_back_s:.1f}s, all decisions "
               f"committed {broker_recovery_s:.1f}s after the stop; {len(resent)} re-sent events")
    log.warning("recovery: %s", summary)
    print("\nrecovery:", summary)
    expected = reference_decisions(cfg, [(cfg.rules_file, first + second + resent + sentinel)])
    assert len(expected) == len(events) + len(sentinel)
    assert_exactly_once_and_continuous(everything, expected)


def upgraded_checkout(tmp_path: Path) -> Path:
    """A copy of this checkout as the next version of the job: its ``Profile`` has one more field, which every
    event it folds increments (so stored state shows whether the new code wrote it)."""
    root = tmp_path / "onramp-next"
    for d in flink_jobs.SHIPPED_DIRS:
        shutil.copytree(REPO_ROOT / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    source = root / "udfs" / "profile_state.py"
    text = source.read_text()
    changes = {
        "    experiments: dict[str, str] = field(default_factory=dict)":
            "    events_since_upgrade: int = 0  # the upgrade test's added field\n"
            "    experiments: dict[str, str] = field(default_factory=dict)",
        "    apply_event(profile, event, half_life_ms, policy)\n":
            "    apply_event(profile, event, half_life_ms, policy)\n    profile.events_since_upgrade += 1\n",
    }
    for anchor, replacement in changes.items():
        assert text.count(anchor) == 1, f"upgrade test: {anchor.strip()!r} no longer in udfs/profile_state.py"
        text = text.replace(anchor, replacement)
    source.write_text(text)
    return root


@pytest.mark.e2e
def test_savepoint_upgrade_to_new_rules_and_an_added_profile_field_keeps_state(live_services, tmp_path, capsys):
    """Stop with a savepoint (`onramp stop --savepoint`), start the next version of the job from it: another
    rule set, and code whose ``Profile`` has an added field (submitted from another checkout, on a fresh
    TaskManager as an upgrade would be). Later decisions name the new rules version; profiles and dedup ids
    carried over (decisions equal an uninterrupted run's), nothing lost or doubled; the state the new code writes
    holds the new field next to the restored ones. Runs on the RocksDB backend (incremental checkpoints)."""
    from jobs.privacy_cli import request_state_check
    from udfs.pseudonym import load_key

    rules_a = tmp_path / "rules-a.yaml"
    shutil.copy(REPO_ROOT / "rules" / "onboarding.yaml", rules_a)
    version_a = yaml.safe_load(rules_a.read_text())["version"]
    doc = yaml.safe_load(rules_a.read_text())
    doc.update(version="reliab-upgrade-b", changelog="upgrade test: same rules, new version")
    rules_b = tmp_path / "rules-b.yaml"
    rules_b.write_text(yaml.safe_dump(doc, sort_keys=False))
    next_version = upgraded_checkout(tmp_path)
    # RocksDB with incremental checkpoints here (the failover test runs the default heap backend): both restore.
    cfg = reliability_cfg(live_services, "upgrade", tmp_path, rules_file=str(rules_a), state_backend="rocksdb")
    events = generated_events(12, seed=31)
    first, second = events[: len(events) // 2], events[len(events) // 2:]
    resent = recent_events(first, cfg.dedup_window_ms)
    # A user seen before and after the upgrade, and one seen only before it (re-sent events are duplicates: the
    # new code does not fold them).
    before = {e["user_id"] for e in first if e.get("user_id")}
    after = {e["user_id"] for e in second if e.get("user_id")}
    both, only_before = sorted(before & after)[0], sorted(before - after)[0]
    codec = decision_codec()

    job_a = submit_job(cfg)
    try:
        send(cfg, first)
        assert len(list(read_records(cfg, cfg.decisions_topic, max_records=len(first), timeout_s=120))) == len(first)
        capsys.readouterr()
        assert onramp(["stop", "--savepoint", str(tmp_path / "sp"), "--flink-rest-url", cfg.flink_rest_url]) == 0
        savepoint = capsys.readouterr().out.strip().splitlines()[-1]
        assert "savepoint-" in savepoint and flink_jobs.rest(cfg, f"/jobs/{job_a}")["state"] == "FINISHED"
    finally:
        if flink_jobs.running_jobs(cfg, "onramp-personalize"):
            flink_jobs.cancel(cfg, job_a)

    cfg_b = dataclasses.replace(cfg, rules_file=str(rules_b))
    # Thread mode keeps the modules a TaskManager imported first: the new code needs a new TaskManager, as a
    # real upgrade has (a new image); restarted again at the end so later tests run this checkout's code.
    services.restart_taskmanager(cfg)
    try:
        job_b = submit_job(cfg_b, from_savepoint=savepoint, project_root=next_version)
        try:
            send(cfg_b, resent + second)
            got = [codec.decode(r.value) for r in
                   read_records(cfg, cfg.decisions_topic, max_records=len(events), timeout_s=180)]
            assert len(got) == len(events)
            everything = read_all(cfg)
            key = load_key(cfg.pseudonym_key_file)
            kept_both = request_state_check(cfg_b, key.user(both), timeout_s=60)["state"]["profile_fields"]
            kept_before = request_state_check(cfg_b, key.user(only_before), timeout_s=60)["state"]["profile_fields"]
        finally:
            flink_jobs.cancel(cfg_b, job_b)
    finally:
        services.restart_taskmanager(cfg)

    expected = reference_decisions(cfg, [(str(rules_a), first), (str(rules_b), resent + second)])
    assert_exactly_once_and_continuous(everything, expected)
    by_id = {d["event_id"]: d for d in everything}
    assert {by_id[e["event_id"]]["rules_version"] for e in first} == {version_a}
    assert {by_id[e["event_id"]]["rules_version"] for e in second} == {"reliab-upgrade-b"}
    # The new code wrote its field next to the restored ones; a profile it has not touched since is the old one.
    assert {"profile.events_since_upgrade", "profile.counts", "profile.steps_done"} <= set(kept_both)
    assert "profile.counts" in kept_before and "profile.events_since_upgrade" not in kept_before


# --------------------------------------------------------------------------------------------------------------
# Bad days without the cluster
# --------------------------------------------------------------------------------------------------------------


def test_submit_without_a_broker_retries_then_says_what_to_do(trained_model_dir):
    """Broker down at start: `onramp submit` waits broker_wait_s (retrying with backoff), then one clear error."""
    port = services._free_port()
    cfg = load_config({"bootstrap_servers": f"localhost:{port}", "broker_wait_s": 2.0,
                       "model_dir": str(trained_model_dir)}, environ={})
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=rf"localhost:{port} within 2s .*onramp up"):
        submit_job(cfg)
    assert 1.5 < time.monotonic() - started < 30


def test_reliability_settings_reach_flink(tmp_path):
    from jobs.personalize import reliability_settings

    cfg = load_config({"state_dir": str(tmp_path), "state_backend": "rocksdb", "restart_strategy": "fixed-delay",
                       "restart_attempts": 3}, environ={})
    settings = reliability_settings(cfg)
    assert settings["execution.checkpointing.dir"] == (tmp_path / "checkpoints").resolve().as_uri()
    assert settings["execution.checkpointing.externalized-checkpoint-retention"] == "RETAIN_ON_CANCELLATION"
    assert settings["state.backend.type"] == "rocksdb" and settings["execution.checkpointing.incremental"] == "true"
    assert settings["restart-strategy.fixed-delay.attempts"] == "3"
    assert load_config({"checkpoint_dir": "s3://bucket/onramp"}, environ={}).checkpoint_uri == "s3://bucket/onramp"
    with pytest.raises(ValueError, match="state_backend"):
        load_config({"state_backend": "memory"}, environ={})
    with pytest.raises(ValueError, match="state_ttl_hours"):
        load_config({"state_ttl_hours": -1}, environ={})


@pytest.mark.minicluster
def test_profile_expires_after_the_state_ttl(trained_model_dir, tmp_path):
    """state_ttl_hours: a profile not written for longer than the TTL is gone. The same event id sent right away is
    a duplicate (no decision); sent again after the TTL passed it is answered, from a fresh profile."""
    from pyflink.common import Row, Types

    from jobs.personalize import build_pipeline, create_env
    from tests.conftest import make_event
    from udfs.avro_codec import event_codec
    from udfs.flink_functions import BYTES, ROUTED_RECORD, routed

    # bundle_size 1: each record leaves the Python map at once, not when a bundle fills
    cfg = load_config({"model_dir": str(trained_model_dir), "state_dir": str(tmp_path), "state_ttl_hours": 2 / 3600,
                       "bundle_size": 1, "extra": {"flink.restart-strategy.type": "none"}}, environ={})
    event = make_event("signup", user_id="ttl-user", t=time.time_ns() // 1_000_000 - 60_000)
    payload = event_codec().encode(event).decode("latin-1")
    first_decided = tmp_path / "first-decided"
    topic = cfg.input_topic

    def pause_before_third(t: Any) -> Any:
        if t[0] == 2:  # after the first decision (the operator may take long to open), wait out the 2 s TTL
            deadline = time.monotonic() + 300
            while not first_decided.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(4.5)
        return routed(Row(t[1].encode("latin-1"), topic, 0, t[0]), key)

    from udfs.pseudonym import ensure_key_file

    key = ensure_key_file(cfg.pseudonym_key_file)
    env = create_env(cfg)
    records = env.from_collection([(i, payload) for i in range(3)], type_info=Types.TUPLE([Types.LONG(), Types.STRING()]))
    outputs = build_pipeline(records.map(pause_before_third, output_type=ROUTED_RECORD), cfg)
    # (topic, value) only: PyFlink's collect cannot bring back a row with a null byte[] field (a dead letter's key)
    values = outputs.map(lambda row: (row[0], row[2]), output_type=Types.TUPLE([Types.STRING(), BYTES]))
    out = []
    with values.execute_and_collect("onramp-ttl-test") as results:
        for topic, value in results:
            if topic == cfg.decisions_topic:
                out.append(decision_codec().decode(bytes(b % 256 for b in value)))
                first_decided.touch()
    assert [d["event_id"] for d in out] == [event["event_id"]] * 2


def test_latest_checkpoint_is_the_newest_completed_one_of_any_job(tmp_path):
    """`onramp submit --from-checkpoint latest`: the newest chk-<n> with a _metadata under checkpoint_dir."""
    import os

    cfg = load_config({"state_dir": str(tmp_path)}, environ={})
    with pytest.raises(flink_jobs.FlinkJobError, match="no completed checkpoint"):
        flink_jobs.latest_checkpoint(cfg)
    for n, (job, chk) in enumerate([("a" * 32, "chk-7"), ("b" * 32, "chk-2"), ("b" * 32, "chk-3")]):
        meta = tmp_path / "checkpoints" / job / chk / "_metadata"
        meta.parent.mkdir(parents=True)
        meta.write_bytes(b"x")
        os.utime(meta, (1_000 + n, 1_000 + n))
    (tmp_path / "checkpoints" / ("b" * 32) / "chk-4").mkdir()  # in progress: no _metadata yet
    assert flink_jobs.latest_checkpoint(cfg) == tmp_path / "checkpoints" / ("b" * 32) / "chk-3"


def test_staged_code_holds_the_packages_under_one_directory_named_by_content(tmp_path):
    """`flink run -pyfs DIR` puts DIR on the workers' path: the staged directory must hold the packages (so
    `import udfs` finds the shipped code), without caches, reused while the code is unchanged, and only the
    latest few kept."""
    staging = tmp_path / "shipped"
    first = flink_jobs.stage_code(REPO_ROOT, flink_jobs.SHIPPED_DIRS, staging)
    assert (first / "udfs" / "__init__.py").is_file() and (first / "avro" / "onboarding_event.avsc").is_file()
    assert not list(first.rglob("__pycache__")) and not list(first.rglob("*.pyc"))
    assert flink_jobs.stage_code(REPO_ROOT, flink_jobs.SHIPPED_DIRS, staging) == first

    project = tmp_path / "project"
    shutil.copytree(first, project)
    staged = []
    for version in range(7):
        (project / "udfs" / "version.py").write_text(f"VERSION = {version}\n")
        staged.append(flink_jobs.stage_code(project, flink_jobs.SHIPPED_DIRS, staging))
    assert len(set(staged)) == 7 and (staged[-1] / "udfs" / "version.py").read_text() == "VERSION = 6\n"
    assert len(list(staging.glob("onramp-*"))) == flink_jobs._STAGED_TO_KEEP and staged[-1].is_dir()


def test_a_savepoint_with_state_the_job_lacks_says_which_flag_to_use():
    flink_says = ("Failed to rollback to checkpoint/savepoint file:/sp/savepoint-1. Cannot map checkpoint/savepoint "
                  "state for operator 1a2b to the new program, because the operator is not available in the new "
                  "program. If you want to allow to skip this, you can set the --allowNonRestoredState option on "
                  "the CLI.")
    explained = flink_jobs.explain(flink_says)
    assert explained.startswith(flink_says) and "--allow-non-restored-state" in explained
    assert flink_jobs.explain("java.lang.OutOfMemoryError") == "java.lang.OutOfMemoryError"
    # `flink run` prints it in a log line far above the stack trace that ends its output: quoted from there
    output = f"2026-11-30 INFO PythonDriver [] - Caused by: java.lang.IllegalStateException: {flink_says}\n\tat x.y(Z.java:1)\n"
    explained = flink_jobs.explain("`flink run` failed (exit 1):\n\tat x.y(Z.java:1)", output)
    assert f"\n{flink_says}\n" in explained and explained.endswith("(docs/operations.md)")
