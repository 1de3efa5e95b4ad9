"""Experiment outcomes: the per-user fold, per-arm aggregates, JSON rows and the batch paths.

The streaming job's test (on the real Kafka broker and Flink cluster) is at the end, marked e2e.
"""

from __future__ import annotations

import dataclasses
import json
import random
import uuid
from typing import Any

import pytest

from experiments.outcome_history import (
    OutcomeFileError,
    latest_rows,
    outcomes_from_avro,
    read_decision_files,
    read_outcomes_jsonl,
    write_decision_file,
    write_outcomes_jsonl,
)
from experiments.outcomes import (
    SESSION_GAP_CAP_MS,
    ArmAggregate,
    InvalidDecision,
    OutcomeRowError,
    OutcomeStateError,
    UserOutcomeState,
    aggregate_by_arm,
    fold_outcomes,
    outcome_from_json,
    outcome_key,
    outcome_to_json,
    split_engagement_ms,
)
from experiments.records import UserOutcome
from models.history import write_avro_file
from tests.conftest import make_event

T0 = 1_790_000_000_000
MIN = 60_000
YES = {"personalization": True, "analytics": True, "marketing": False}
NO = {"personalization": True, "analytics": False, "marketing": False}


def event(kind: str, t: int, user: str = "u1", session: str | None = "s1", consent: dict | None = None,
          **props: str) -> dict[str, Any]:
    e = make_event(kind, user_id=user, t=t, **props)
    e["context"] = {"device": "desktop", "referral_source": None, "locale": "en-US", "session_id": session}
    e["consent"] = consent
    return e


def decision(t: int, experiments: dict[str, str], user: str = "u1") -> dict[str, Any]:
    event_id = str(uuid.uuid4())
    return {
        "decision_id": "d-" + event_id, "user_id": user, "event_id": event_id, "step_id": "profile_setup",
        "content_variant": "default", "template_vars": {}, "segment_id": 1, "segment_name": "builder",
        "churn_risk": 0.2, "interest": {}, "personalized": True, "model_version": "m1", "rules_version": "r1",
        "experiments": experiments, "reasons": [], "event_time": t, "decided_at": t + 5,
    }


def journey(user: str = "u1", start: int = T0) -> tuple[list[dict], list[dict]]:
    """Signup at start, exposure to exp-a/treatment and exp-b/control at +1 min, two steps, a satisfaction form,
    completion at +20 min; one session of events every minute-ish plus a second, later session."""
    ev = [
        event("signup", start, user, consent=YES),
        event("page_view", start + 1 * MIN, user, page="home"),
        event("step_completed", start + 5 * MIN, user, step_id="profile_setup"),
        event("step_completed", start + 9 * MIN, user, step_id="connect_data"),
        event("form_submitted", start + 12 * MIN, user, form="satisfaction", score="4"),
        event("onboarding_completed", start + 20 * MIN, user),
        event("session_start", start + 120 * MIN, user, session="s2"),
        event("feature_used", start + 123 * MIN, user, session="s2", feature="charts"),
    ]
    de = [decision(start, {}, user), decision(start + 1 * MIN, {"exp-a": "treatment", "exp-b": "control"}, user),
          decision(start + 5 * MIN, {"exp-a": "treatment", "exp-b": "control"}, user)]
    return ev, de


def fold(events, decisions, **kw) -> list[UserOutcome]:
    rows, skipped = fold_outcomes(events, decisions, **kw)
    assert skipped == 0
    return rows


# -- the fold --------------------------------------------------------------------------------------------------


def test_journey_outcomes():
    events, decisions = journey()
    rows = fold(events, decisions)
    assert [(r.experiment_id, r.arm) for r in rows] == [("exp-a", "treatment"), ("exp-b", "control")]
    a = rows[0]
    assert a.user_id == "u1" and a.exposed_at_ms == T0 + 1 * MIN
    assert a.completed and a.time_to_complete_s == 20 * 60.0
    assert a.steps_completed == 2
    assert a.satisfaction == 4.0
    # Session s1: events at 0, 1, 5, 9, 12, 20 min -> 20 min engaged, 1 min of it before exposure; s2: 3 min.
    assert a.pre_engagement_s == 60.0
    assert a.engagement_s == 19 * 60.0 + 3 * 60.0
    assert dataclasses.replace(rows[1], experiment_id="exp-a", arm="treatment") == a


def test_not_completed_and_no_signup():
    events = [event("page_view", T0, consent=YES), event("step_completed", T0 + MIN, step_id="x")]
    (row,) = fold(events, [decision(T0, {"e": "a"})])
    assert not row.completed and row.time_to_complete_s is None and row.steps_completed == 1
    # Completed, but the signup was never seen: the duration is unknown, not guessed.
    (row,) = fold(events + [event("onboarding_completed", T0 + 2 * MIN)], [decision(T0, {"e": "a"})])
    assert row.completed and row.time_to_complete_s is None


def test_engagement_sessions_gap_cap_and_single_event_sessions():
    times = [T0, T0 + 10 * MIN, T0 + 10 * MIN + 2 * 3_600_000]  # second gap two hours: counts 30 min
    assert split_engagement_ms(times, T0) == (0, 10 * MIN + SESSION_GAP_CAP_MS)
    assert split_engagement_ms(times, T0 + 4 * MIN) == (4 * MIN, 6 * MIN + SESSION_GAP_CAP_MS)
    assert split_engagement_ms([T0], T0) == (0, 0)
    events = [event("signup", T0, consent=YES, session="a"), event("page_view", T0 + MIN, session="b"),
              event("page_view", T0 + 2 * MIN, session=None), event("page_view", T0 + 3 * MIN, session="a")]
    (row,) = fold(events, [decision(T0, {"e": "a"})])
    assert row.engagement_s == 3 * 60.0  # session a only; b has one event, the session-less event counts nowhere


def test_satisfaction_last_valid_score_after_exposure():
    events = [event("signup", T0, consent=YES),
              event("form_submitted", T0 + 1, form="satisfaction", score="2"),  # before exposure
              event("form_submitted", T0 + 3 * MIN, form="satisfaction", score="5"),
              event("form_submitted", T0 + 4 * MIN, form="satisfaction", score="9"),  # out of range: ignored
              event("form_submitted", T0 + 5 * MIN, form="satisfaction", score="x"),
              event("form_submitted", T0 + 6 * MIN, form="profile", score="1")]  # other form
    (row,) = fold(events, [decision(T0 + 2 * MIN, {"e": "a"})])
    assert row.satisfaction == 5.0
    (row,) = fold(events[:2], [decision(T0 + 2 * MIN, {"e": "a"})])
    assert row.satisfaction is None


def test_exposure_is_the_earliest_decision_carrying_the_experiment():
    events, _ = journey()
    decisions = [decision(T0 + 9 * MIN, {"e": "late-arm"}), decision(T0 + 5 * MIN, {"e": "b"}),
                 decision(T0 + 3 * MIN, {}), decision(T0 + 7 * MIN, {"other": "x"})]
    rows = fold(events, decisions)
    assert [(r.experiment_id, r.arm, r.exposed_at_ms) for r in rows] == [
        ("e", "b", T0 + 5 * MIN), ("other", "x", T0 + 7 * MIN)]
    # Steps: profile_setup at +5 min counts for e (at exposure), not for "other" (before its exposure).
    assert [r.steps_completed for r in rows] == [2, 1]
    assert fold(events, [decision(T0, {})]) == []  # decisions without experiments expose nobody


def test_out_of_order_and_replayed_input_gives_the_same_rows():
    events, decisions = [], []
    for n in range(5):
        ev, de = journey(f"user-{n}", T0 + n * 3_600_000)
        events += ev
        decisions += de
    expected = fold(events, decisions)
    rng = random.Random(3)
    for _ in range(5):
        shuffled = events + rng.sample(events, 10)  # at-least-once: some events twice
        rng.shuffle(shuffled)
        state_by_user: dict[str, UserOutcomeState] = {}
        mixed = [("e", e) for e in shuffled] + [("d", d) for d in decisions + decisions[:3]]
        rng.shuffle(mixed)
        for kind, record in mixed:
            state = state_by_user.setdefault(record["user_id"], UserOutcomeState())
            state.apply_event(record) if kind == "e" else state.apply_decision(record)
            # Through JSON after every record, as keyed state would be.
            state_by_user[record["user_id"]] = UserOutcomeState.from_json(json.loads(json.dumps(state.to_json())))
        rows = sorted((r for s in state_by_user.values() for r in s.outcomes()),
                      key=lambda r: (r.experiment_id, r.arm, r.user_id))
        assert rows == expected


def test_late_event_before_exposure_counts_as_pre_exposure():
    state = UserOutcomeState()
    state.apply_event(event("signup", T0, consent=YES))
    state.apply_decision(decision(T0 + 10 * MIN, {"e": "a"}))
    state.apply_event(event("page_view", T0 + 20 * MIN))
    (row,) = state.outcomes()
    assert (row.pre_engagement_s, row.engagement_s) == (600.0, 600.0)
    state.apply_event(event("page_view", T0 + 5 * MIN))  # late, but before exposure by event time
    state.apply_event(event("step_completed", T0 + 6 * MIN, step_id="x"))
    (row,) = state.outcomes()
    assert (row.pre_engagement_s, row.engagement_s, row.steps_completed) == (600.0, 600.0, 0)


def test_user_onboarded_before_exposure_gets_no_row():
    events = [event("signup", T0, consent=YES), event("onboarding_completed", T0 + MIN)]
    assert fold(events, [decision(T0 + 2 * MIN, {"e": "a"})]) == []
    assert len(fold(events, [decision(T0 + MIN, {"e": "a"})])) == 1


def test_analytics_consent_gates_rows():
    events, decisions = journey()
    assert fold(events, decisions) != []
    withdrawn = events + [event("consent_updated", T0 + 30 * MIN, consent=NO)]
    assert fold(withdrawn, decisions) == []
    assert len(fold(withdrawn, decisions, require_analytics_consent=False)) == 2
    never = [dict(e, consent=None) for e in events]
    assert fold(never, decisions) == []
    # Latest by event time wins, whatever the arrival order.
    regranted = withdrawn + [event("consent_updated", T0 + 40 * MIN, consent=YES)]
    assert len(fold(list(reversed(regranted)), decisions)) == 2


def test_erasure_forgets_everything_up_to_the_request_and_ignores_late_data():
    events, decisions = journey()
    state = UserOutcomeState()
    for e in events:
        state.apply_event(e)
    for d in decisions:
        state.apply_decision(d)
    assert state.outcomes()
    state.apply_event(event("erasure_requested", T0 + 200 * MIN))
    assert state.outcomes() == []
    data = state.to_json()
    assert data["sessions"] == {} and data["exposures"] == {} and data["steps"] == {} and data["consent"] is None
    for e in events:  # replayed history after the erasure stays forgotten
        state.apply_event(e)
    for d in decisions:
        state.apply_decision(d)
    assert state.to_json() == data
    # A user who comes back after the erasure starts over.
    state.apply_event(event("session_start", T0 + 300 * MIN, consent=YES))
    state.apply_decision(decision(T0 + 300 * MIN, {"e": "a"}))
    (row,) = state.outcomes()
    assert row.exposed_at_ms == T0 + 300 * MIN and not row.completed


def test_state_json_version_and_invalid_decisions():
    with pytest.raises(OutcomeStateError):
        UserOutcomeState.from_json({"v": 99})
    with pytest.raises(OutcomeStateError):
        UserOutcomeState.from_json({"v": 1})
    assert UserOutcomeState.from_json(None) == UserOutcomeState()
    with pytest.raises(InvalidDecision) as err:
        UserOutcomeState().apply_decision(decision(T0, {"e": ""}))
    assert err.value.code == "bad_experiments"
    rows, skipped = fold_outcomes([], [decision(T0, {"e": "a"}, user="")])
    assert (rows, skipped) == ([], 1)


def test_rows_carry_the_user_key_and_anonymous_events_are_left_out():
    events, decisions = journey()
    anonymous = dict(event("page_view", T0 + 2 * MIN), user_id=None, anonymous_id="device-1")
    rows = fold(events + [anonymous], decisions, user_key=lambda user_id: "pseudo-" + user_id)
    assert {r.user_id for r in rows} == {"pseudo-u1"}
    assert [dataclasses.replace(r, user_id="u1") for r in rows] == fold(events, decisions)


# -- aggregates and rows ---------------------------------------------------------------------------------------


def outcome(user: str, arm: str = "a", **kw: Any) -> UserOutcome:
    base = dict(user_id=user, experiment_id="e", arm=arm, exposed_at_ms=T0, completed=True, time_to_complete_s=600.0,
                steps_completed=3, engagement_s=100.0, satisfaction=4.0, pre_engagement_s=10.0)
    return UserOutcome(**{**base, **kw})


def test_arm_aggregate_add_remove():
    agg = ArmAggregate("e", "a")
    first = outcome("u1")
    agg.add(first)
    agg.add(outcome("u2", completed=False, time_to_complete_s=None, satisfaction=None, engagement_s=50.0))
    assert (agg.users, agg.completed, agg.completion_rate) == (2, 1, 0.5)
    assert agg.engagement_s.mean == 75.0 and agg.engagement_s.variance == 1250.0
    assert agg.time_to_complete_s.n == 1 and agg.satisfaction_counts["4"] == 1
    assert agg.engagement_x_pre == 100.0 * 10.0 + 50.0 * 10.0
    # A streaming update replaces u1's previous contribution.
    agg.remove(first)
    agg.add(outcome("u1", satisfaction=2.0, steps_completed=5))
    assert agg.users == 2 and agg.satisfaction_counts == {"1": 0, "2": 1, "3": 0, "4": 0, "5": 0}
    assert agg.steps_completed.sum == 5 + 3
    data = agg.to_json()
    assert json.loads(json.dumps(data)) == data and "u1" not in json.dumps(data)
    with pytest.raises(ValueError):
        agg.add(outcome("u3", arm="b"))
    with pytest.raises(ValueError):
        ArmAggregate("e", "a").remove(first)
    by_arm = aggregate_by_arm([outcome("u1"), outcome("u2", arm="b"), outcome("u3")])
    assert {k: v.users for k, v in by_arm.items()} == {("e", "a"): 2, ("e", "b"): 1}


def test_row_json_validation_and_key():
    row = outcome("u1")
    assert outcome_from_json(json.loads(json.dumps(outcome_to_json(row)))) == row
    assert outcome_from_json({**outcome_to_json(row), "added_later": 1}) == row
    for bad in ({"engagement_s": float("nan")}, {"satisfaction": 7}, {"completed": "yes"}, {"user_id": ""},
                {"steps_completed": 1.5}, {"completed": False}):
        with pytest.raises(OutcomeRowError):
            outcome_from_json({**outcome_to_json(row), **bad})
    with pytest.raises(OutcomeRowError, match="lacks arm"):
        outcome_from_json({k: v for k, v in outcome_to_json(row).items() if k != "arm"})
    assert outcome_key("a|b", "c") != outcome_key("a", "b|c")


def test_jsonl_round_trip(tmp_path):
    rows = [outcome("u1"), outcome("u2", arm="b", time_to_complete_s=None, completed=False, satisfaction=None)]
    path = tmp_path / "outcomes.jsonl"
    assert write_outcomes_jsonl(path, rows) == 2
    assert read_outcomes_jsonl(path) == rows
    path.write_text(path.read_text() + "\n{\"user_id\": 1}\n")
    with pytest.raises(OutcomeFileError, match=r"outcomes.jsonl:4:"):
        read_outcomes_jsonl(path)
    with pytest.raises(OutcomeFileError, match="missing.jsonl"):
        read_outcomes_jsonl(tmp_path / "missing.jsonl")


def test_latest_row_per_key_and_tombstones():
    r1, r2 = outcome("u1"), outcome("u2")
    newer = dataclasses.replace(r1, steps_completed=9)

    def rec(row):
        return outcome_key(row.user_id, row.experiment_id).encode(), json.dumps(outcome_to_json(row)).encode()

    k2 = rec(r2)[0]
    rows, skipped = latest_rows([rec(r1), rec(r2), rec(newer), (k2, None), (None, b"{}"), (b"k", b"not json")])
    assert rows == [newer] and skipped == {"no_key": 1, "bad_row": 1}


# -- batch path over Avro files --------------------------------------------------------------------------------


def test_outcomes_from_avro_files(tmp_path):
    events, decisions = [], []
    for n in range(4):
        ev, de = journey(f"user-{n}", T0 + n * 3_600_000)
        events += ev
        decisions += de
    broken = dict(decisions[0], user_id="")
    (tmp_path / "events").mkdir()
    write_avro_file(tmp_path / "events" / "part-0.avro", events[:10])
    write_avro_file(tmp_path / "events" / "part-1.avro", events[10:] + [dict(events[0], user_id="")])
    write_decision_file(tmp_path / "decisions.avro", decisions + [broken])
    read, skipped = read_decision_files(tmp_path / "decisions.avro")
    assert read == [{"anonymous_id": None, **d} for d in decisions] and skipped == {"missing_user_id": 1}

    rows = outcomes_from_avro(tmp_path / "events", [tmp_path / "decisions.avro"], now_ms=T0 + 86_400_000)
    assert rows == fold(events, decisions)
    assert len(rows) == 8 and {r.arm for r in rows} == {"treatment", "control"}


# -- the streaming job on the real services --------------------------------------------------------------------


@pytest.mark.e2e
def test_streaming_job_writes_the_rows_the_batch_fold_computes(live_services):
    """Events and decisions (with experiments maps) in; the outcomes topic's latest row per key equals the batch
    fold of the same input, rows are written only when they change, and erasure / withdrawn analytics consent
    delete a user's rows with tombstones. Exactly-once, the stricter delivery mode."""
    import time

    from jobs import flink_jobs
    from jobs.experiment_outcomes import submit_outcomes_job
    from jobs.kafka_io import make_producer, produce, read_records
    from experiments.outcome_history import outcomes_from_outcomes_topic, outcomes_from_topics
    from udfs.avro_codec import decision_codec, event_codec

    cfg = dataclasses.replace(live_services, delivery="exactly-once", checkpoint_interval_ms=1000,
                              input_topic="oc-events", decisions_topic="oc-decisions",
                              experiment_outcomes_topic="oc-outcomes", group_id="oc")
    start = time.time_ns() // 1_000_000 - 86_400_000
    events, decisions = [], []
    for n in range(6):
        ev, de = journey(f"user-{n}", start + n * 3_600_000)
        events += ev
        decisions += de
    later = [event("erasure_requested", start + 2 * 3_600_000 + 200 * MIN, "user-2"),
             event("consent_updated", start + 3 * 3_600_000 + 200 * MIN, "user-3", consent=NO)]
    ecodec, dcodec = event_codec(), decision_codec()

    def send(topic: str, records: list[dict], codec) -> None:
        producer = make_producer(cfg)
        produce(producer, topic, [(r["user_id"].encode(), codec.encode(r)) for r in records])
        producer.close()

    def wait_for(expected: list[UserOutcome], timeout_s: float = 90.0) -> list[UserOutcome]:
        deadline = time.monotonic() + timeout_s
        rows: list[UserOutcome] = []
        while time.monotonic() < deadline:
            rows = outcomes_from_outcomes_topic(cfg)
            if rows == expected:
                return rows
            time.sleep(1.0)
        return rows

    # The job's rows carry the routing key: the raw user id here, a pseudonym where the routing key pseudonymizes
    # (udfs/pseudonym.py); the batch fold then needs the same function to give comparable rows.
    try:
        from udfs.pseudonym import load_key
        user_key = load_key(cfg.pseudonym_key_file).user
    except ImportError:
        user_key = lambda user_id: user_id  # noqa: E731
    half = len(events) // 2
    send(cfg.input_topic, events[:half] + [dict(events[0], user_id="")], ecodec)  # one invalid: skipped
    send(cfg.decisions_topic, decisions, dcodec)
    job_id = submit_outcomes_job(cfg)
    try:
        first = fold(events[:half], decisions, user_key=user_key)
        assert first and wait_for(first) == first
        send(cfg.input_topic, events[half:] + events[:5] + later, ecodec)  # events[:5]: replayed duplicates
        expected = fold(events + later, decisions, user_key=user_key)
        assert {r.user_id for r in expected} == {user_key(f"user-{n}") for n in (0, 1, 4, 5)}
        assert wait_for(expected) == expected
        log = [(r.key, r.value) for r in read_records(cfg, cfg.experiment_outcomes_topic, timeout_s=30,
                                                      idle_timeout_s=3)]
    finally:
        flink_jobs.cancel(cfg, job_id)

    # Only changes are written: no key gets the same value twice in a row; erased / withdrawn users end in tombstones.
    last: dict[bytes, bytes | None] = {}
    for key, value in log:
        assert last.get(key, b"-") != value
        last[key] = value
    gone = {json.loads(k)[0] for k, v in last.items() if v is None}
    assert gone == {user_key("user-2"), user_key("user-3")}
    # The batch path over the same topics agrees.
    assert outcomes_from_topics(cfg, cfg.input_topic, cfg.decisions_topic, user_key=user_key) == expected
