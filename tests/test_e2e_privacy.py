"""Privacy and identity on the real services: pseudonymized state, the audit trail, erasure proven by a state check,
and an anonymous visitor's profile merged into the user it signs up as, through the job's control topic."""

from __future__ import annotations

import dataclasses
import time

import pytest

from jobs import flink_jobs
from jobs.cli import submit_job
from jobs.kafka_io import make_producer, produce, read_records
from jobs.privacy_cli import request_state_check
from udfs.avro_codec import audit_codec, decision_codec, event_codec
from udfs.pseudonym import load_key

from tests.conftest import make_event

pytestmark = pytest.mark.e2e


def _event(kind: str, user: str, anon: str | None, t_ms: int) -> dict:
    event = {**make_event(kind, user_id=user, t=t_ms, topic="analytics"), "anonymous_id": anon}
    event["consent"] = {"personalization": True, "analytics": True, "marketing": False}
    return event


def _profile_fields(cfg, subject: str) -> list[str]:
    return request_state_check(cfg, subject, timeout_s=60)["state"]["profile_fields"]


def test_audit_erasure_and_alias_merge_on_the_cluster(live_services):
    cfg = dataclasses.replace(
        live_services, input_topic="priv-events", decisions_topic="priv-decisions",
        dead_letter_topic="priv-dead-letters", audit_topic="priv-audit", control_topic="priv-control",
        group_id="priv", checkpoint_interval_ms=1000,
    )
    key = load_key(cfg.pseudonym_key_file)
    now = int(time.time() * 1000)
    visitor = [_event("page_view", "", "device-9", now - 5000 + i) for i in range(3)]
    signup = _event("signup", "u-9", "device-9", now - 1000)
    leaving = [_event("signup", "u-8", None, now - 900), _event("page_view", "u-8", None, now - 800),
               _event("erasure_requested", "u-8", None, now - 700)]
    events = [*visitor, signup, *leaving]
    job_id = submit_job(cfg)
    try:
        producer = make_producer(cfg)
        produce(producer, cfg.input_topic, [(None, event_codec().encode(e)) for e in events])
        producer.close()
        decisions = [decision_codec().decode(r.value)
                     for r in read_records(cfg, cfg.decisions_topic, max_records=len(events), timeout_s=90)]
        anon_key, user_key = key.anon("device-9"), key.user("u-9")
        deadline = time.monotonic() + 60
        while any(f.startswith("profile.") for f in _profile_fields(cfg, anon_key)) and time.monotonic() < deadline:
            time.sleep(1)  # the claim and handoff travel through the control topic
        anon_fields, user_fields = _profile_fields(cfg, anon_key), _profile_fields(cfg, user_key)
        erased_fields = _profile_fields(cfg, key.user("u-8"))
        audits = [r.value for r in read_records(cfg, cfg.audit_topic, timeout_s=30, idle_timeout_s=4)]
    finally:
        flink_jobs.cancel(cfg, job_id)

    assert sorted(d["event_id"] for d in decisions) == sorted(e["event_id"] for e in events)
    # the visitor's profile moved to the user (not copied); the user key remembers the merged alias
    assert not [f for f in anon_fields if f.startswith("profile.")] and "identity.merged_into" in anon_fields
    assert "profile.counts" in user_fields and "identity.merged" in user_fields
    # erasure: nothing of the profile is left, only the time of the erasure (docs/privacy.md)
    assert erased_fields == ["identity.erased_at_ms"]

    records = [audit_codec().decode(a) for a in audits]
    by_kind = {k: [r for r in records if r["kind"] == k] for k in ("decision", "erasure", "state_check")}
    assert len(by_kind["decision"]) == len(events) - 1 and len(by_kind["erasure"]) == 1
    assert {r["subject"] for r in by_kind["decision"]} == {anon_key, user_key, key.user("u-8")}
    assert all(r["pseudonym_key_id"] == key.key_id and r["consent"]["personalization"] for r in by_kind["decision"])
    for raw in audits:  # no raw id anywhere in the audit trail
        assert b"u-9" not in raw and b"u-8" not in raw and b"device-9" not in raw
