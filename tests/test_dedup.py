"""Deduplication: an event id seen before for the user, within the window, gets no second decision; the ids
live in the profile state (pruned to the window, capped), erasure clears them, and training skips duplicates
exactly as the stream does."""

from __future__ import annotations

import copy
import pickle
import random

from models.generator import generate
from models.training import group_by_user, replay_user
from udfs.avro_codec import decision_codec, event_codec
from udfs.audit import state_summary
from udfs.dedup import id_key, is_duplicate, packed, packed_id, remember, remembered
from udfs.features import compute_features
from udfs.personalizer import Personalizer
from udfs.profile_state import (PROFILE_FORMAT, Profile, ProfilePolicy, fold_event, profile_from_state,
                                 profile_to_state)

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


# --- packed ids (PROFILE_FORMAT 2) --------------------------------------------------------------------------------

def _reference_remember(ids: dict[int, int], key: int, t: int, window_ms: int, max_ids: int) -> dict[int, int]:
    """The dict form of format 1, the behaviour the packed form must keep: record, re-sort a late event, prune
    the window before the newest time, then cap oldest first."""
    if window_ms <= 0 or max_ids <= 0:
        return {}
    if not ids:
        return {key: t}
    newest = max(ids.values())
    ids = {k: at for k, at in ids.items() if k != key}
    ids[key] = t
    ids = dict(sorted(ids.items(), key=lambda kv: kv[1]))  # stable: ties keep arrival order
    cutoff = max(newest, t) - window_ms
    kept = [(k, at) for k, at in ids.items() if at >= cutoff]
    return dict(kept[-max_ids:])


def test_packed_ids_behave_like_the_dict_form_on_random_sequences():
    for seed in range(60):
        rng = random.Random(seed)
        profile, reference, t = Profile(), {}, NOW_MS
        seen: list[dict] = []
        for step in range(rng.randint(1, 120)):
            if step == 0 or rng.random() < 0.03:  # and now and then a new version with other settings
                window, max_ids = rng.choice((50, 200, 1000)), rng.choice((1, 3, 8, 40))
                policy = ProfilePolicy(dedup_window_ms=window, dedup_max_ids=max_ids)
            roll = rng.random()
            if seen and roll < 0.15:  # a redelivery of an earlier event
                event = rng.choice(seen)
            else:
                t += rng.choice((0, 0, 1, 5, 30, 120))
                late = roll < 0.35  # out of order, sometimes beyond the window
                event = make_event(t=t - rng.randint(1, 2 * window) if late else t)
                seen.append(event)
            key = id_key(event["event_id"])
            assert packed_id(event["event_id"]) == key.to_bytes(8, "little")
            if rng.random() < 0.1:  # remember() directly: re-remembering moves an id to its place in time
                event = dict(event, event_time=event["event_time"] + rng.randint(-window, window))
                remember(profile, event, window, max_ids)
                reference = _reference_remember(reference, key, event["event_time"], window, max_ids)
            else:
                duplicate = key in reference
                assert fold_event(profile, event, HALF_LIFE, policy) is not duplicate
                if not duplicate:
                    reference = _reference_remember(reference, key, event["event_time"], window, max_ids)
            assert list(remembered(profile).items()) == list(reference.items()), seed
            assert all(is_duplicate(profile, {"event_id": ""}, k.to_bytes(8, "little")) for k in reference)
        remember(profile, make_event(t=t), 0, max_ids)  # disabling forgets everything
        assert (profile.recent_id_keys, profile.recent_id_times) == (b"", b"")


def test_only_a_whole_entry_matches():
    """bytes.find can match across two entries; that is not a remembered id."""
    profile = Profile()
    profile.recent_id_keys, profile.recent_id_times = packed([(0x1111111111111111, 1), (0x2222222222222222, 2)])
    assert not is_duplicate(profile, {"event_id": ""}, profile.recent_id_keys[4:12])  # straddles the two
    assert is_duplicate(profile, {"event_id": ""}, profile.recent_id_keys[8:])


def _format_1_state(profile: Profile, ids: dict[int, int]) -> tuple:
    """``profile`` as the previous version stored it: PROFILE_FORMAT 1, the ids as a ``recent_event_ids`` dict
    in the position the packed fields took."""
    _fmt, names, values = profile_to_state(profile)
    at = names.index("recent_id_keys")
    return (1, names[:at] + ("recent_event_ids",) + names[at + 2:], values[:at] + (ids,) + values[at + 2:])


def test_a_format_1_state_with_ids_loads_them_and_dedups():
    events = [_consenting(t=NOW_MS + i) for i in (0, 2, 1)]  # one late: the old dict kept time order too
    ids = {id_key(e["event_id"]): e["event_time"] for e in sorted(events, key=lambda e: e["event_time"])}
    older = Profile(counts={"page_view": 3}, last_event_ms=NOW_MS + 2, consent_personalization=True)
    blob = pickle.dumps(_format_1_state(older, ids))  # as it sits in a savepoint of the previous version

    profile = profile_from_state(pickle.loads(blob))
    assert remembered(profile) == ids and list(remembered(profile).values()) == sorted(ids.values())
    assert profile.counts == {"page_view": 3}
    assert all(fold_event(profile, e, HALF_LIFE) is False for e in events)  # still duplicates after the upgrade
    assert fold_event(profile, _consenting(t=NOW_MS + 3), HALF_LIFE) and profile.counts == {"page_view": 4}
    fmt, _names, _values = profile_to_state(profile)
    assert fmt == PROFILE_FORMAT == 2 and len(remembered(profile_from_state(profile_to_state(profile)))) == 4


def test_a_format_1_state_with_raw_event_ids_hashes_them():
    """Format 1 kept the event ids themselves before they were hashed (same format number): still duplicates."""
    events = [_consenting(t=NOW_MS + i) for i in range(3)]
    raw = {e["event_id"]: e["event_time"] for e in events}
    profile = profile_from_state(_format_1_state(Profile(consent_personalization=True), raw))
    assert remembered(profile) == {id_key(k): t for k, t in raw.items()}
    assert all(fold_event(profile, e, HALF_LIFE) is False for e in events)


def test_a_state_with_both_forms_keeps_every_id():
    """Old dict beside packed ids (no writer makes one today): the union, in time order, not one of the two."""
    profile = Profile(consent_personalization=True)
    profile.recent_id_keys, profile.recent_id_times = packed([(11, NOW_MS + 10), (12, NOW_MS + 12)])
    fmt, names, values = profile_to_state(profile)
    state = (1, names + ("recent_event_ids",), values + ({13: NOW_MS + 11},))
    assert list(remembered(profile_from_state(state)).items()) == [(11, NOW_MS + 10), (13, NOW_MS + 11),
                                                                   (12, NOW_MS + 12)]


def test_a_profile_without_ids_reports_no_id_fields_in_a_state_check():
    profile = Profile()
    fold_event(profile, _consenting(), HALF_LIFE, ProfilePolicy(dedup_window_ms=0))
    fields = state_summary({"profile": profile})["profile_fields"]
    assert "profile.recent_id_keys" not in fields and "profile.last_event_ms" in fields
