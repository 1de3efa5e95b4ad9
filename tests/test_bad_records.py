"""One bad record never fails the job and is never dropped silently (docs/operations.md): records a producer or an
operator can send that once escaped the operator's error handling, each now a dead letter with its reason."""

from __future__ import annotations

import json

import pytest
from pyflink.common import Row

from udfs.avro_codec import audit_codec, dead_letter_codec, decision_codec, event_codec
from udfs.flink_functions import AUDIT, DEAD_LETTERS, MAX_DEAD_LETTER_ORIGINAL_BYTES
from udfs.identity import Outcome
from udfs.model_watch import BundleWatcher
from udfs.profile_state import Profile, profile_to_state
from udfs.rules.compiler import compile_rules_text
from udfs.rules_watch import RulesWatcher

from tests.conftest import make_event
from tests.test_personalize_function import FakeContext, FakeCounter, _function


def _send(fn, value, topic: str = "events", offset: int = 5) -> list:
    return list(fn.process_element(Row(value, topic, 0, offset), FakeContext()))


def _dead(out) -> dict:
    ((tag, value),) = out
    assert tag is DEAD_LETTERS
    return dead_letter_codec().decode(value)


def _decided(fn) -> None:
    """The job goes on: the next good event is decided."""
    (decision,) = [o for o in _send(fn, event_codec().encode(make_event("page_view"))) if not isinstance(o, tuple)]
    assert decision_codec().decode(decision)["step_id"]


def test_an_event_without_a_value_is_a_dead_letter():
    fn = _function()
    dead = _dead(_send(fn, None, offset=9))
    assert dead["error_code"] == "not_single_object" and "no value" in dead["error_message"]
    assert (dead["original"], dead["offset"]) == (b"", 9)
    _decided(fn)


@pytest.mark.parametrize("value, reason", [
    (None, "not JSON"),
    (b"[" * 5000, "nested too deeply"),
    (b'{"v":1,"kind":"state_check","request_id":"\\ud800"}', "printable"),
    (json.dumps({"v": 1, "kind": "state_check", "request_id": "x" * 600_000}).encode(), "at most 200"),
])
def test_a_control_record_that_cannot_be_read_or_answered_is_a_dead_letter(value, reason):
    fn = _function(audit=True)
    dead = _dead(_send(fn, value, topic="control"))
    assert dead["error_code"] == "invalid_control_message" and reason in dead["error_message"]
    _decided(fn)


def test_a_state_check_with_audit_off_says_why_it_is_not_answered():
    """The answer would go to the audit topic; with none the sink had no topic for it and failed the job."""
    check = json.dumps({"v": 1, "kind": "state_check", "request_id": "r-1"}).encode()
    dead = _dead(_send(_function(audit=False), check, topic="control"))
    assert "audit_topic is off" in dead["error_message"]
    ((tag, answer),) = _send(_function(audit=True), check, topic="control")
    assert tag is AUDIT and audit_codec().decode(answer)["request_id"] == "r-1"


def test_a_huge_invalid_record_is_cut_in_its_dead_letter_so_kafka_accepts_it():
    fn = _function()
    huge = b"\x00" * (MAX_DEAD_LETTER_ORIGINAL_BYTES + 200_000)
    ((_, value),) = _send(fn, huge)
    dead = dead_letter_codec().decode(value)
    assert len(value) < 1_048_576  # the producer's default max.request.size
    assert dead["original"] == huge[:MAX_DEAD_LETTER_ORIGINAL_BYTES]
    assert f"first {MAX_DEAD_LETTER_ORIGINAL_BYTES} of {len(huge)} bytes" in dead["error_message"]


def test_a_model_or_rules_reload_that_fails_oddly_never_fails_the_event(tmp_path):
    fn = _function()
    (tmp_path / "CURRENT").write_text("m-20261201-000000-0badf00d\n")
    (tmp_path / "m-20261201-000000-0badf00d").mkdir()

    def manifest_of_the_wrong_shape(path, **_):
        raise AttributeError("'NoneType' object has no attribute 'get'")

    fn.watcher = BundleWatcher(tmp_path, 1, None, loader=manifest_of_the_wrong_shape)
    rules = tmp_path / "rules.yaml"
    rules.write_bytes(bytes(range(256)))  # not text
    fn.rules_watcher = RulesWatcher(rules, 1, None, compile_rules_text)
    fn.experiments_watcher.due = lambda now_ms: True
    fn.experiments_watcher.poll = lambda now_ms: 1 / 0  # anything at all
    fn.experiments_refusals = FakeCounter()
    _decided(fn)
    assert "m-20261201-000000-0badf00d" in fn.watcher.refused and fn.reload_refusals.count == 1
    assert list(fn.rules_watcher.refused.values()) == ["not a UTF-8 text file"] and fn.rules_refusals.count == 1
    assert fn.experiments_refusals.count == 1


def test_an_identity_message_that_cannot_be_encoded_leaves_the_state_as_it_was():
    """Encoding first: a failure dead-letters the record before the profile is cleared or the handle changed (a
    forged Claim naming a user id with a lone surrogate once cleared the anonymous profile, then failed)."""
    from types import SimpleNamespace

    fn = _function()
    stored = profile_to_state(Profile(sessions=3))
    fn.profile_state.update(stored)
    handoff_to_an_unencodable_key = SimpleNamespace(to="\ud800u")
    with pytest.raises(UnicodeEncodeError):
        fn._apply_identity(None, Outcome(messages=(handoff_to_an_unencodable_key,), clear_profile=True), "anon-key")
    assert fn.profile_state.value() == stored
