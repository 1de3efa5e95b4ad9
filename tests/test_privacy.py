"""Pseudonymization, audit records, erasure and state checks, without a cluster (tests/test_e2e.py runs them on
the real services)."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat

import pytest
from pyflink.common import Row

from udfs import control
from udfs.audit import input_categories
from udfs.avro_codec import audit_codec, dead_letter_codec, decision_codec, event_codec
from udfs.flink_functions import AUDIT, DEAD_LETTERS
from udfs.profile_state import Profile, profile_from_state
from udfs.pseudonym import KEY_ENV, PseudonymKeyError, ensure_key_file, key_from_text, load_key, write_new_key

from tests.conftest import make_event
from tests.test_personalize_function import FakeContext, _function

KEY = key_from_text("s" * 40, "test")


# -- pseudonyms -----------------------------------------------------------------------------------------------

def test_pseudonym_is_a_domain_separated_hmac():
    expected = hmac.new(b"s" * 40, b"user:u-1", hashlib.sha256).hexdigest()[:32]
    assert KEY.user("u-1") == expected
    assert KEY.anon("u-1") != KEY.user("u-1")  # the same string as user id and as anonymous id: two keys
    assert key_from_text("t" * 40, "test").user("u-1") != expected  # another key, another pseudonym


def test_key_file_is_created_private_and_never_overwritten(tmp_path):
    path = tmp_path / "secrets" / "pseudonym.key"
    key = ensure_key_file(path, environ={})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ensure_key_file(path, environ={}) == key  # kept across restarts: same pseudonyms
    with pytest.raises(PseudonymKeyError, match="re-keys every profile"):
        write_new_key(path)
    assert "secret" not in repr(key) and path.read_text().strip() not in repr(key)


def test_environment_key_wins_and_bad_keys_are_explained(tmp_path):
    env_key = load_key(tmp_path / "missing.key", environ={KEY_ENV: "e" * 40})
    assert env_key.user("u") == key_from_text("e" * 40, "x").user("u")
    with pytest.raises(PseudonymKeyError, match="does not exist.*onramp privacy new-key"):
        load_key(tmp_path / "missing.key", environ={})
    (tmp_path / "short.key").write_text("too-short\n")
    with pytest.raises(PseudonymKeyError, match="at least 32"):
        load_key(tmp_path / "short.key", environ={})


# -- audit records ----------------------------------------------------------------------------------------------

def _consenting(event_type: str = "signup", user_id: str = "user-1") -> dict:
    event = make_event(event_type, user_id=user_id)
    event["consent"] = {"personalization": True, "analytics": False, "marketing": False}
    event["demographic"] = {"country": "DE", "age_band": "25-34", "occupation": "engineer"}
    return event


def _outputs(fn, event: dict, subject: str):
    return list(fn.process_element(Row(event_codec().encode(event), "events", 0, 0), FakeContext(subject)))


def test_every_decision_has_an_audit_record_without_raw_personal_data():
    fn = _function(audit=True)
    event = _consenting()
    subject = KEY.user(event["user_id"])
    decision_bytes, (tag, audit_bytes) = _outputs(fn, event, subject)
    decision, audit = decision_codec().decode(decision_bytes), audit_codec().decode(audit_bytes)
    assert tag is AUDIT
    assert audit["kind"] == "decision" and audit["subject"] == subject and audit["pseudonym_key_id"] == fn.key_id
    assert audit["decision_id"] == decision["decision_id"] and audit["step_id"] == decision["step_id"]
    assert audit["consent"] == {"personalization": True, "analytics": False, "marketing": False}
    assert audit["model_version"] == decision["model_version"] and audit["rules_version"] == decision["rules_version"]
    assert audit["input_categories"] == ["onboarding_progress"]  # no model loaded: default flow, progress only
    raw = audit_bytes.decode("latin-1")
    for personal in (event["user_id"], "DE", "engineer", "25-34"):
        assert personal not in raw


def test_input_categories_name_what_a_personalized_decision_read():
    profile = Profile(demographic={"country": "DE"}, context={})
    assert input_categories(profile, True) == ["onboarding_progress", "behaviour", "demographic", "model_scores"]
    assert input_categories(profile, False) == ["onboarding_progress"]


def test_decision_audit_is_the_common_audit_record_with_the_decision_fields():
    """decision_audit builds its dict directly (it runs per event); it must equal the record the shared
    constructor makes, field for field, for personalized, default-flow and no-consent decisions."""
    from udfs.audit import DECISION, _consent, _record, decision_audit
    from udfs.personalizer import Personalizer

    personalizer = Personalizer(None, 3_600_000.0)
    for consent in (None, {"personalization": True, "analytics": False, "marketing": True}):
        event = make_event("signup")
        event["consent"] = consent
        profile = Profile()
        personalizer.fold(profile, event)
        profile.context = {"device": "mobile"} if consent else {}
        decision = personalizer.decide(profile, event, subject="p-1")
        for segment_id, personalized in ((-1, False), (3, False), (3, True)):
            decision = {**decision, "segment_id": segment_id, "personalized": personalized}
            expected = _record(
                DECISION, f"{DECISION}:{decision['decision_id']}", "p-1", "key-1", decision["model_version"],
                decision["rules_version"], decision["decided_at"], decision_id=decision["decision_id"],
                event_type="signup", event_time=decision["event_time"],
                input_categories=input_categories(profile, personalized or segment_id >= 0),
                consent=_consent(profile), personalized=personalized, step_id=decision["step_id"],
                reasons=list(decision["reasons"]))
            audit = decision_audit(decision, "signup", profile, "p-1", "key-1")
            assert audit == expected and list(audit) == list(expected)
            assert audit_codec().decode(audit_codec().encode(audit)) == audit


def test_erasure_clears_state_confirms_and_is_audited():
    fn = _function(audit=True)
    subject = KEY.user("user-1")
    _outputs(fn, _consenting(), subject)
    assert fn.profile_state.data is not None
    erasure = make_event("erasure_requested")
    decision_bytes, (_, audit_bytes) = _outputs(fn, erasure, subject)
    assert fn.profile_state.data is None
    confirmation = decision_codec().decode(decision_bytes)
    assert confirmation["event_id"] == erasure["event_id"] and confirmation["step_id"] == "none"
    audit = audit_codec().decode(audit_bytes)
    assert audit["kind"] == "erasure" and audit["decision_id"] == confirmation["decision_id"]


def test_state_check_reports_field_names_and_size_never_values():
    fn = _function(audit=True)
    subject = KEY.user("user-1")
    _outputs(fn, _consenting(), subject)
    check = control.state_check("req-1")
    ((tag, out),) = fn.process_element(Row(check, "control", 0, 5), FakeContext(subject))
    audit = audit_codec().decode(out)
    assert tag is AUDIT and audit["kind"] == "state_check" and audit["request_id"] == "req-1"
    state = audit["state"]
    assert not state["empty"] and state["state_bytes"] > 0
    assert "profile.demographic" in state["profile_fields"] and "profile.steps_skipped" not in state["profile_fields"]
    assert b"DE" not in out and b"engineer" not in out

    _outputs(fn, make_event("erasure_requested"), subject)
    ((_, out),) = fn.process_element(Row(control.state_check("req-2"), "control", 0, 6), FakeContext(subject))
    # nothing of the profile; only the erasure's time, which drops late alias messages and expires after two
    # alias windows (docs/identity-resolution.md)
    assert audit_codec().decode(out)["state"]["profile_fields"] == ["identity.erased_at_ms"]


def test_unreadable_control_records_are_dead_lettered():
    fn = _function(audit=True)
    for value in (b"not json", b'{"v": 1, "kind": "launch_missiles"}', b'{"v": 99, "kind": "state_check"}'):
        ((tag, out),) = fn.process_element(Row(value, "control", 0, 1), FakeContext("k"))
        dead = dead_letter_codec().decode(out)
        assert tag is DEAD_LETTERS and dead["error_code"] == "invalid_control_message" and dead["topic"] == "control"


def test_audit_off_means_decisions_only():
    fn = _function(audit=False)
    (decision_bytes,) = _outputs(fn, _consenting(), KEY.user("user-1"))
    assert decision_codec().decode(decision_bytes)["user_id"] == "user-1"  # addressed back to the app
    assert profile_from_state(fn.profile_state.data).consent_personalization is True
