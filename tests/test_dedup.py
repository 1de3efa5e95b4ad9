"""Deduplication: an event id seen before for the user, within the window, gets no second decision; the ids
live in the profile state (pruned to the window, capped), erasure clears them, and training skips duplicates
exactly as the stream does."""

from __future__ import annotations

import copy
import pickle

from models.generator import generate
from models.training import group_by_user, replay_user
from udfs.avro_codec import decision_codec, event_codec
from udfs.dedup import id_key, is_duplicate, remember, remembered
from udfs.features import compute_features
from udfs.personalizer import Personalizer
from udfs.profile_state import Profile, ProfilePolicy, fold_event, profile_from_state, profile_to_state

from tests.conftest import NOW_MS, make_event
from tests.test_personalize_function import _function, _run

HOUR = 3_600_000
HALF_LIFE = 24 * HOUR
WINDOW = 24 * HOUR


def _consenting(event_type="page_view", t=NOW_MS, **props):
    event = make_event(event_type, t=t, **props)
    event["consent"] = {"personalization": True, "analytics": False, "marketing": False}
    return event


def test_duplicate_within_the_window_is_not_folded_twice():
    profile = Profile()
    event = _consenting("feature_used", topic="analytics")
    assert fold_event(profile, event, HALF_LIFE)
    before = copy.deepcopy(profile)
    again = dict(event, event_time=NOW_MS)  # a redelivery: same id
    assert is_duplicate(profile, again)
    assert fold_event(profile, again, HALF_LIFE) is False
    assert profile == before and profile.counts == {"feature_used": 1}


def test_an_id_older_than_the_window_is_forgotten_and_processed_again():
    profile = Profile()
    old = _consenting(t=NOW_MS)
    fold_event(profile, old, HALF_LIFE)
    fold_event(profile, _consenting(t=NOW_MS + WINDOW), HALF_LIFE)  # exactly at the window's edge: kept
    assert id_key(old["event_id"]) in remembered(profile)
    fold_event(profile, _consenting(t=NOW_MS + WINDOW + 1), HALF_LIFE)  # now older than the window
    assert id_key(old["event_id"]) not in remembered(profile)
    assert fold_event(profile, old, HALF_LIFE) is True  # outside the window: not a duplicate any more
    assert profile.counts["page_view"] == 4


def test_ids_are_kept_in_time_order_and_capped_oldest_first():
    profile = Profile()
    events = [make_event(t=NOW_MS + i) for i in (5, 1, 3, 2, 4)]  # arrival order differs from event time
    for e in events:
        remember(profile, e, WINDOW, 3)
    assert [t - NOW_MS for t in remembered(profile).values()] == [3, 4, 5]
    kept = {id_key(e["event_id"]) for e in events if e["event_time"] - NOW_MS >= 3}
    assert set(remembered(profile)) == kept


def test_zero_window_disables_deduplication():
    policy = ProfilePolicy(dedup_window_ms=0)
    profile = Profile()
    event = _consenting()
    assert fold_event(profile, event, HALF_LIFE, policy) and fold_event(profile, event, HALF_LIFE, policy)
    assert remembered(profile) == {} and profile.counts["page_view"] == 2


def test_ids_survive_the_state_round_trip_and_old_states_read_without_them():
    profile = Profile()
    fold_event(profile, _consenting(), HALF_LIFE)
    restored = profile_from_state(pickle.loads(pickle.dumps(profile_to_state(profile))))
    assert remembered(restored) == remembered(profile) != {}
    fmt, names, values = profile_to_state(profile)
    kept = [i for i, name in enumerate(names) if name not in ("recent_id_keys", "recent_id_times")]
    older = (1, tuple(names[i] for i in kept), tuple(values[i] for i in kept))  # written before the ids existed
    assert remembered(profile_from_state(older)) == {}


def test_keyed_function_gives_a_duplicate_no_decision_and_counts_it():
    fn = _function()
    payload = event_codec().encode(make_event("signup"))
    (out,) = _run(fn, payload, offset=1)
    state_after_first = fn.profile_state.data
    assert _run(fn, payload, offset=2) == []  # redelivered: nothing out
    assert fn.duplicates.count == 1 and fn.decisions.count == 1
    assert fn.profile_state.data == state_after_first
    (other,) = _run(fn, event_codec().encode(make_event("page_view")), offset=3)
    assert decision_codec().decode(other)["step_id"] and fn.decisions.count == 2


def test_erasure_clears_the_ids_with_the_rest():
    fn = _function()
    payload = event_codec().encode(make_event("signup"))
    _run(fn, payload)
    assert remembered(profile_from_state(fn.profile_state.data))
    _run(fn, event_codec().encode(make_event("erasure_requested")))
    assert fn.profile_state.data is None
    (out,) = _run(fn, payload)  # the profile is gone: the event is new to it
    assert decision_codec().decode(out)["content_variant"] != "erased"
    assert fn.duplicates.count == 0

    profile = Profile()  # the fold training uses does the same
    event = _consenting()
    fold_event(profile, event, HALF_LIFE)
    fold_event(profile, make_event("erasure_requested"), HALF_LIFE)
    assert profile == Profile()
    assert fold_event(profile, event, HALF_LIFE)


def _stream_vectors(events, personalizer):
    """The keyed function's fold per event, through pickled state; a duplicate answers nothing. Per user, the
    (event id, vector) answers in arrival order."""
    state: dict[str, bytes] = {}
    answers: dict[str, list] = {}
    for event in events:
        blob = state.get(event["user_id"])
        profile = profile_from_state(pickle.loads(blob) if blob else None)
        if not personalizer.fold(profile, event):
            continue
        vector = compute_features(profile, event["event_time"], HALF_LIFE)
        answers.setdefault(event["user_id"], []).append((event["event_id"], vector))
        state[event["user_id"]] = pickle.dumps(profile_to_state(profile))
    return answers


def test_training_replay_skips_duplicates_like_the_stream():
    events, _truths = generate(40, seed=5, start_ms=NOW_MS - 20 * 24 * HOUR)
    arrivals = []
    for i, e in enumerate(events):  # every 7th event redelivered right away (inside the window)
        arrivals.append(e)
        if i % 7 == 0:
            arrivals.append(dict(e))
    arrivals += [dict(e) for e in events[:5]]  # and a few redelivered after everything (mostly outside it)
    streamed = _stream_vectors(arrivals, Personalizer(None, HALF_LIFE))
    by_user: dict[str, list] = {}
    for e in arrivals:  # per user in arrival order, as the keyed stream sees them
        by_user.setdefault(e["user_id"], []).append(e)
    replayed = {user: [(e["event_id"], v) for e, v in replay_user(user_events, HALF_LIFE)]
                for user, user_events in by_user.items()}
    assert replayed == streamed
    answered = sum(len(a) for a in streamed.values())
    assert len(events) <= answered < len(arrivals)  # the immediate redeliveries were skipped by both
    clean = group_by_user(events)  # without duplicates, every event is answered
    assert sum(len(list(replay_user(ev, HALF_LIFE))) for ev in clean.values()) == len(events)

