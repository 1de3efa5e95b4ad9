"""End to end on the real services: Kafka broker (KRaft) + standalone Flink cluster started by the test session.

N valid events and M malformed ones (truncated bytes, unknown fingerprint, missing user id, timestamp far in the
future) go into the input topic; exactly N decisions (read_committed) and M dead letters, each with its reason,
come out. Runs the job in exactly-once mode, the stricter of the two delivery modes.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from jobs import flink_jobs
from jobs.cli import submit_job
from jobs.event_stream import MALFORMED_KINDS, encode_events, generated_events, malformed_event
from jobs.kafka_io import make_producer, produce, read_records
from jobs.personalize import JOB_NAME
from udfs.avro_codec import dead_letter_codec, decision_codec

pytestmark = pytest.mark.e2e


def test_events_in_decisions_and_dead_letters_out(live_services):
    cfg = dataclasses.replace(
        live_services,
        delivery="exactly-once",
        checkpoint_interval_ms=1000,
        input_topic="e2e-events",
        decisions_topic="e2e-decisions",
        dead_letter_topic="e2e-dead-letters",
        audit_topic="e2e-audit",
        control_topic="e2e-control",
        group_id="e2e",
    )
    job_id = submit_job(cfg)
    try:
        events = generated_events(30, seed=5)
        malformed = [malformed_event(kind) for kind in MALFORMED_KINDS]
        producer = make_producer(cfg)
        produce(producer, cfg.input_topic, encode_events(events[: len(events) // 2]))
        produce(producer, cfg.input_topic, [(None, m) for m in malformed])
        produce(producer, cfg.input_topic, encode_events(events[len(events) // 2 :]))
        producer.close()

        codec = decision_codec()
        decisions = [codec.decode(r.value) for r in read_records(cfg, cfg.decisions_topic, max_records=len(events), timeout_s=90)]
        dead_codec = dead_letter_codec()
        dead = [dead_codec.decode(r.value) for r in read_records(cfg, cfg.dead_letter_topic, max_records=len(malformed), timeout_s=30)]
        # Nothing beyond the expected count arrives either (no duplicates): read the whole topic again.
        everything = list(read_records(cfg, cfg.decisions_topic, timeout_s=30, idle_timeout_s=4))
    finally:
        flink_jobs.cancel(cfg, job_id)

    assert len(decisions) == len(events)
    assert len(everything) == len(events)
    assert Counter(d["event_id"] for d in decisions) == Counter(e["event_id"] for e in events)
    assert sorted(d["error_code"] for d in dead) == sorted(MALFORMED_KINDS)
    assert all(d["error_message"] and d["original"] and d["topic"] == cfg.input_topic for d in dead)
    half = len(events) // 2  # the malformed records were sent after the first half of the events
    assert sorted(d["offset"] for d in dead) == list(range(half, half + len(malformed)))
    assert {d["partition"] for d in dead} == {0}
    assert any(d["personalized"] for d in decisions)
    assert all(d["rules_version"] and d["model_version"] != "none" for d in decisions)
    assert not flink_jobs.running_jobs(cfg, JOB_NAME)


def test_running_job_switches_model_version_mid_stream(live_services, tmp_path):
    """Hot reload on the real cluster: decisions before the registry's CURRENT moves name version A, decisions for
    events sent after it moved (and one reload interval passed) name version B; none is lost."""
    import shutil
    import time

    from models import registry
    from tests.test_model_watch import _copy_version

    model_dir = tmp_path / "models"
    shutil.copytree(live_services.model_dir, model_dir)
    a = registry.current_version(model_dir)
    b = _copy_version(model_dir, a, "m-20990101-000000-0000000b")
    cfg = dataclasses.replace(
        live_services,
        model_dir=model_dir,
        model_reload_interval_ms=300,
        input_topic="reload-events",
        decisions_topic="reload-decisions",
        dead_letter_topic="reload-dead-letters",
        audit_topic="reload-audit",
        control_topic="reload-control",
        group_id="reload",
    )
    events = generated_events(20, seed=9)
    half = len(events) // 2
    codec = decision_codec()
    job_id = submit_job(cfg)
    try:
        producer = make_producer(cfg)
        produce(producer, cfg.input_topic, encode_events(events[:half]))
        first = [codec.decode(r.value) for r in read_records(cfg, cfg.decisions_topic, max_records=half, timeout_s=90)]
        registry.set_current(model_dir, b)
        time.sleep(1.0)  # > one reload interval of processing time
        produce(producer, cfg.input_topic, encode_events(events[half:]))
        producer.close()
        everything = [codec.decode(r.value) for r in
                      read_records(cfg, cfg.decisions_topic, max_records=len(events), timeout_s=90)]
    finally:
        flink_jobs.cancel(cfg, job_id)

    assert len(first) == half and {d["model_version"] for d in first} == {a}
    second = everything[half:]
    assert Counter(d["event_id"] for d in everything) == Counter(e["event_id"] for e in events)
    assert {d["model_version"] for d in second} == {b}


def test_running_job_switches_rule_set_mid_stream_and_refuses_a_broken_one(live_services, tmp_path):
    """Rules hot reload on the real cluster: decisions name rule set A until `onramp rules publish` replaces the
    rules file with B, then B; a broken file written afterwards is refused and the job keeps deciding with B."""
    import shutil
    import time

    import yaml

    from jobs.cli import main as onramp
    from jobs.config import REPO_ROOT

    rules_file = tmp_path / "rules.yaml"
    shutil.copy(REPO_ROOT / "rules" / "onboarding.yaml", rules_file)
    a = yaml.safe_load(rules_file.read_text())["version"]
    candidate = yaml.safe_load(rules_file.read_text())
    candidate.update(version="e2e-b", changelog="e2e: same rules, new version")
    new_file = tmp_path / "candidate.yaml"
    new_file.write_text(yaml.safe_dump(candidate, sort_keys=False))
    cfg = dataclasses.replace(
        live_services,
        rules_file=str(rules_file),
        rules_reload_interval_ms=300,
        input_topic="rules-events",
        decisions_topic="rules-decisions",
        dead_letter_topic="rules-dead-letters",
        audit_topic="rules-audit",
        control_topic="rules-control",
        group_id="rules",
    )
    events = generated_events(24, seed=13)
    third = len(events) // 3
    codec = decision_codec()
    job_id = submit_job(cfg)
    try:
        producer = make_producer(cfg)
        produce(producer, cfg.input_topic, encode_events(events[:third]))
        first = [codec.decode(r.value) for r in read_records(cfg, cfg.decisions_topic, max_records=third, timeout_s=90)]
        assert onramp(["rules", "publish", str(new_file), "--set", f"rules_file={rules_file}"]) == 0
        time.sleep(1.0)  # > one reload interval
        produce(producer, cfg.input_topic, encode_events(events[third:2 * third]))
        assert len(list(read_records(cfg, cfg.decisions_topic, max_records=2 * third, timeout_s=90))) == 2 * third
        rules_file.write_text("ruleset: broken\nversion: x\n")  # no default, no tables: must be refused
        time.sleep(1.0)
        produce(producer, cfg.input_topic, encode_events(events[2 * third:]))
        producer.close()
        everything = [codec.decode(r.value) for r in
                      read_records(cfg, cfg.decisions_topic, max_records=len(events), timeout_s=90)]
    finally:
        flink_jobs.cancel(cfg, job_id)

    assert {d["rules_version"] for d in first} == {a}
    assert Counter(d["event_id"] for d in everything) == Counter(e["event_id"] for e in events)
    assert {d["rules_version"] for d in everything[third:]} == {"e2e-b"}
