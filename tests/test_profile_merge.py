"""merge_profiles: folding the anonymous events and the user's events apart and merging them gives what one
profile folding all of them gives; consent of the user governs what behaviour survives the merge."""

from __future__ import annotations

import random

import pytest

from udfs.dedup import remembered
from udfs.profile_merge import merge_profiles
from udfs.profile_state import DEFAULT_POLICY, Profile, ProfilePolicy, fold_event, profile_from_state, profile_to_state

HOUR = 3_600_000
HALF_LIFE = 24 * HOUR
T0 = 1_790_000_000_000
STEPS = ("welcome_tour", "profile_setup", "connect_data", "first_project", "invite_team", "explore_features")
TOPICS = ("analytics", "collaboration", "integrations", "automation", "reporting")


def _event(n: int, etype: str, t: int, user_id: str = "", anonymous_id: str | None = None, consent: bool | None = None,
           **props: str) -> dict:
    return {
        "event_id": f"e-{n}", "user_id": user_id, "anonymous_id": anonymous_id, "event_type": etype, "event_time": t,
        "demographic": None, "context": None,
        "consent": None if consent is None else {"personalization": consent, "analytics": consent, "marketing": False},
        "properties": dict(props),
    }


def _fold(events, policy=DEFAULT_POLICY) -> Profile:
    profile = Profile()
    for event in events:
        fold_event(profile, event, HALF_LIFE, policy)
    return profile


def _random_events(rng: random.Random, first_n: int, t: int, count: int, steps: list[str]) -> list[dict]:
    """``count`` events from time ``t`` on, in time order; completes/skips steps popped from ``steps``."""
    events = []
    for i in range(count):
        t += rng.randint(1, 3 * HOUR)
        etype = rng.choice(("session_start", "page_view", "feature_used", "step_completed", "step_skipped",
                            "step_viewed", "form_submitted"))
        props = {}
        if etype in ("page_view", "feature_used", "step_completed"):
            props["topic"] = rng.choice(TOPICS)
        if etype in ("step_completed", "step_skipped"):
            if not steps:
                etype = "session_start"
            else:
                props["step_id"] = steps.pop(0)
        events.append(_event(first_n + i, etype, t, **props))
    return events


def _assert_equivalent(merged: Profile, whole: Profile, timings: bool = True) -> None:
    for name in ("counts", "sessions", "steps_done", "steps_skipped", "first_seen_ms", "signup_ms", "last_event_ms",
                 "completed_ms", "last_step_ms", "demographic", "context", "consent_personalization",
                 "consent_analytics", "consent_marketing"):
        assert getattr(merged, name) == getattr(whole, name), name
    assert list(remembered(merged).items()) == list(remembered(whole).items())
    assert merged.interest.keys() == whole.interest.keys()
    for topic, (score, at) in whole.interest.items():
        assert merged.interest[topic][1] == at
        assert merged.interest[topic][0] == pytest.approx(score, rel=1e-9, abs=1e-12)
    if timings:
        assert (merged.prev_gap_ms, merged.step_gap_sum_ms, merged.step_gaps) == \
               (whole.prev_gap_ms, whole.step_gap_sum_ms, whole.step_gaps)


@pytest.mark.parametrize("seed", range(40))
def test_merge_of_split_folds_equals_one_fold(seed):
    """Pre-signup events under the anonymous id, then the signup and the user's events: merged == one fold."""
    rng = random.Random(seed)
    steps = list(STEPS)
    rng.shuffle(steps)
    anon_events = [_event(0, "session_start", T0, consent=True)] + _random_events(rng, 1, T0, rng.randint(0, 12), steps)
    t_signup = (anon_events[-1]["event_time"] if anon_events else T0) + rng.randint(0, HOUR)
    signup = _event(100, "signup", t_signup, user_id="u", anonymous_id="a", consent=True)
    signup["demographic"] = {"country": "FR", "age_band": "25-34"}
    signup["context"] = {"device": "mobile", "locale": "fr-FR"}
    user_events = [signup] + _random_events(rng, 101, t_signup, rng.randint(0, 12), steps)
    merged = merge_profiles(_fold(user_events), _fold(anon_events), HALF_LIFE, DEFAULT_POLICY)
    _assert_equivalent(merged, _fold(anon_events + user_events))


def test_empty_anonymous_profile_changes_nothing():
    user = _fold([_event(1, "signup", T0, consent=True), _event(2, "page_view", T0 + 5, topic="analytics")])
    assert merge_profiles(user, Profile(), HALF_LIFE, DEFAULT_POLICY) == user


def test_inputs_are_not_modified_and_state_round_trips():
    anon = _fold([_event(1, "page_view", T0, consent=True, topic="analytics")])
    user = _fold([_event(2, "page_view", T0 + HOUR, consent=True, topic="analytics")])
    before = (profile_to_state(user), profile_to_state(anon))
    merged = merge_profiles(user, anon, HALF_LIFE, DEFAULT_POLICY)
    assert (profile_to_state(user), profile_to_state(anon)) == before
    assert profile_from_state(profile_to_state(merged)) == merged
    merged.interest["analytics"][0] = 99.0  # no aliasing with the inputs' mutable fields
    assert user.interest["analytics"][0] == 0.5 and anon.interest["analytics"][0] == 0.5


def test_numeric_parts_are_symmetric():
    anon = _fold([_event(1, "feature_used", T0, consent=True, topic="automation"),
                  _event(2, "session_start", T0 + 10, consent=True)])
    user = _fold([_event(3, "feature_used", T0 + HOUR, consent=True, topic="automation"),
                  _event(4, "session_start", T0 + 2 * HOUR)])
    ab, ba = merge_profiles(user, anon, HALF_LIFE, DEFAULT_POLICY), merge_profiles(anon, user, HALF_LIFE, DEFAULT_POLICY)
    for name in ("counts", "sessions", "interest", "first_seen_ms", "last_event_ms", "prev_gap_ms"):
        assert getattr(ab, name) == getattr(ba, name), name
    assert remembered(ab) == remembered(ba)


def test_user_values_win_and_anonymous_fills_gaps():
    anon_event = _event(1, "page_view", T0, consent=True, topic="analytics")
    anon_event["demographic"] = {"country": "DE", "occupation": "engineer"}
    anon_event["context"] = {"device": "desktop", "referral_source": "ads"}
    user_event = _event(2, "signup", T0 + HOUR, consent=True)
    user_event["consent"] = {"personalization": True, "analytics": False, "marketing": False}
    user_event["demographic"] = {"country": "FR"}
    user_event["context"] = {"device": "mobile"}
    merged = merge_profiles(_fold([user_event]), _fold([anon_event]), HALF_LIFE, DEFAULT_POLICY)
    assert merged.demographic == {"country": "FR", "occupation": "engineer"}
    assert merged.context == {"device": "mobile", "referral_source": "ads"}
    assert (merged.consent_personalization, merged.consent_analytics, merged.consent_marketing) == (True, False, False)
    assert merged.signup_ms == T0 + HOUR


def test_allow_lists_still_hold_after_merge():
    anon = _fold([_event(1, "page_view", T0, consent=True, topic="analytics")])
    anon.context = {"device": "desktop", "session_id": "raw"}  # as if folded under a looser, older policy
    user = _fold([_event(2, "signup", T0 + 1, consent=True)])
    assert "session_id" not in merge_profiles(user, anon, HALF_LIFE, DEFAULT_POLICY).context


@pytest.mark.parametrize("user_consent", [None, False])
def test_no_user_consent_merges_progress_only(user_consent):
    """The user has not consented (never stated, or refused): the anonymous behaviour is dropped, progress kept."""
    anon = _fold([_event(1, "session_start", T0, consent=True),
                  _event(2, "step_completed", T0 + 10, step_id="welcome_tour", topic="analytics"),
                  _event(3, "onboarding_completed", T0 + 20)])
    assert anon.counts and anon.interest
    user = _fold([_event(4, "signup", T0 + HOUR, consent=user_consent)])
    merged = merge_profiles(user, anon, HALF_LIFE, DEFAULT_POLICY)
    assert merged.consent_personalization is user_consent
    assert (merged.counts, merged.sessions, merged.interest, merged.demographic, merged.context) == ({}, 0, {}, {}, {})
    assert (merged.prev_gap_ms, merged.last_step_ms, merged.step_gap_sum_ms, merged.step_gaps) == (0, 0, 0, 0)
    assert merged.steps_done == ["welcome_tour"]
    assert (merged.first_seen_ms, merged.signup_ms, merged.completed_ms) == (T0, T0 + HOUR, T0 + 20)
    assert len(remembered(merged)) == 4


def test_anonymous_without_consent_adds_progress_to_consenting_user():
    """Pre-signup events without consent hold progress only; the consenting user's fold of all events agrees."""
    anon_events = [_event(1, "session_start", T0), _event(2, "step_completed", T0 + 10, step_id="welcome_tour",
                                                          topic="analytics")]
    user_events = [_event(3, "signup", T0 + HOUR, user_id="u", consent=True),
                   _event(4, "step_completed", T0 + 2 * HOUR, step_id="profile_setup", topic="reporting")]
    merged = merge_profiles(_fold(user_events), _fold(anon_events), HALF_LIFE, DEFAULT_POLICY)
    whole = _fold(anon_events + user_events)
    _assert_equivalent(merged, whole, timings=False)
    assert merged.counts == {"signup": 1, "step_completed": 1}


def test_anonymous_consent_is_not_inherited():
    """Consent given on an anonymous device does not become the user's consent (the user's flags win)."""
    anon = _fold([_event(1, "page_view", T0, consent=True, topic="analytics")])
    user = _fold([_event(2, "signup", T0 + 1)])
    merged = merge_profiles(user, anon, HALF_LIFE, DEFAULT_POLICY)
    assert merged.consent_personalization is None and merged.counts == {}


def test_dedup_ids_are_pruned_like_the_fold():
    policy = ProfilePolicy(dedup_window_ms=10 * HOUR, dedup_max_ids=5)
    anon_events = [_event(i, "page_view", T0 + i * HOUR, consent=True, topic="analytics") for i in range(8)]
    user_events = [_event(100 + i, "page_view", T0 + (9 + i) * HOUR, consent=True, topic="reporting") for i in range(3)]
    merged = merge_profiles(_fold(user_events, policy), _fold(anon_events, policy), HALF_LIFE, policy)
    assert list(remembered(merged).items()) == list(remembered(_fold(anon_events + user_events, policy)).items())
    assert len(remembered(merged)) == 5
    off = ProfilePolicy(dedup_window_ms=0)
    assert remembered(merge_profiles(_fold(user_events), _fold(anon_events), HALF_LIFE, off)) == {}


def test_a_duplicate_of_a_merged_event_is_recognized():
    anon_event = _event(1, "page_view", T0, consent=True, topic="analytics")
    merged = merge_profiles(_fold([_event(2, "signup", T0 + 1, consent=True)]), _fold([anon_event]), HALF_LIFE,
                            DEFAULT_POLICY)
    assert fold_event(merged, dict(anon_event), HALF_LIFE) is False
