"""Profile updates, interest decay, state round trips and the feature vector."""

from __future__ import annotations

import math

import pytest

from udfs.features import FEATURE_NAMES, compute_features, interest_scores
from udfs.profile_state import Profile, apply_event, decayed, profile_from_state, profile_to_state

from tests.conftest import NOW_MS, make_event

HOUR = 3_600_000
HALF_LIFE = 24 * HOUR


def _fold(events):
    """Fold events of a user who consented to personalization (without it no behavioural data is kept)."""
    profile = Profile()
    for event in events:
        event["consent"] = event.get("consent") or {"personalization": True, "analytics": False, "marketing": False}
        apply_event(profile, event, HALF_LIFE)
    return profile


def test_counts_steps_and_step_timing():
    events = [
        make_event("signup", t=NOW_MS),
        make_event("session_start", t=NOW_MS + 1),
        make_event("step_completed", t=NOW_MS + HOUR, step_id="welcome_tour"),
        make_event("step_completed", t=NOW_MS + 3 * HOUR, step_id="profile_setup"),
        make_event("step_completed", t=NOW_MS + 4 * HOUR, step_id="profile_setup"),  # repeat: counted once
        make_event("step_skipped", t=NOW_MS + 5 * HOUR, step_id="invite_team"),
        make_event("step_completed", t=NOW_MS + 6 * HOUR, step_id="not_a_step"),  # unknown steps ignored
    ]
    profile = _fold(events)
    assert profile.signup_ms == NOW_MS
    assert profile.sessions == 1
    assert profile.steps_done == ["welcome_tour", "profile_setup"]
    assert profile.steps_skipped == ["invite_team"]
    assert profile.step_gaps == 1 and profile.step_gap_sum_ms == 2 * HOUR
    assert profile.counts["step_completed"] == 4
    assert profile.prev_gap_ms == HOUR


def test_interest_is_recency_weighted():
    profile = _fold([
        make_event("feature_used", t=NOW_MS, topic="analytics"),
        make_event("feature_used", t=NOW_MS + HALF_LIFE, topic="analytics"),
        make_event("page_view", t=NOW_MS + HALF_LIFE, topic="reporting"),
    ])
    scores = interest_scores(profile, NOW_MS + HALF_LIFE, HALF_LIFE)
    assert scores["analytics"] == pytest.approx(1.5)  # 1 decayed by one half-life + 1
    assert scores["reporting"] == pytest.approx(0.5)
    later = interest_scores(profile, NOW_MS + 2 * HALF_LIFE, HALF_LIFE)
    assert later["analytics"] == pytest.approx(0.75)


def test_late_event_contributes_as_if_in_order():
    in_order = _fold([make_event("feature_used", t=NOW_MS, topic="analytics"),
                      make_event("feature_used", t=NOW_MS + HOUR, topic="analytics")])
    late = _fold([make_event("feature_used", t=NOW_MS + HOUR, topic="analytics"),
                  make_event("feature_used", t=NOW_MS, topic="analytics")])
    assert late.interest["analytics"][0] == pytest.approx(in_order.interest["analytics"][0])


def test_consent_demographic_and_context_are_remembered():
    signup = make_event("signup")
    signup["consent"] = {"personalization": True, "analytics": True, "marketing": False}
    signup["demographic"] = {"country": "FR", "age_band": None, "occupation": "designer"}
    signup["context"] = {"device": "mobile", "referral_source": None, "locale": "fr-FR", "session_id": "s"}
    profile = _fold([signup, make_event("page_view", t=NOW_MS + 1)])
    assert profile.consent_personalization is True
    assert profile.demographic == {"country": "FR", "occupation": "designer"}
    assert profile.context["device"] == "mobile"


def test_state_round_trip_and_evolution():
    profile = _fold([make_event("signup"), make_event("feature_used", t=NOW_MS + 5, topic="automation")])
    assert profile_from_state(profile_to_state(profile)) == profile
    assert profile_from_state(None) == Profile()
    fmt, names, values = profile_to_state(profile)
    older = (fmt, names[:-1] + ("field_removed_since",), values[:-1] + ("x",))  # a state written by another version
    restored = profile_from_state(older)
    # the field the older version did not have gets its default; the rest is kept
    assert restored.first_seen_ms == profile.first_seen_ms
    assert getattr(restored, names[-1]) == getattr(Profile(), names[-1])


def test_feature_vector_shape_and_values():
    profile = _fold([
        make_event("signup", t=NOW_MS),
        make_event("step_completed", t=NOW_MS + HOUR, step_id="welcome_tour"),
        make_event("onboarding_completed", t=NOW_MS + 2 * HOUR),
    ])
    vector = compute_features(profile, NOW_MS + 2 * HOUR, HALF_LIFE)
    assert len(vector) == len(FEATURE_NAMES) == len(set(FEATURE_NAMES))
    named = dict(zip(FEATURE_NAMES, vector))
    assert named["onboarding_completed"] == 1.0
    assert all(math.isfinite(v) for v in vector)


def test_decay_never_grows():
    assert decayed(2.0, NOW_MS, NOW_MS - 10, HALF_LIFE) == 2.0
    assert decayed(2.0, NOW_MS, NOW_MS + HALF_LIFE, HALF_LIFE) == pytest.approx(1.0)


def test_interest_scores_from_the_feature_vector_equal_the_decayed_ones():
    profile = _fold([make_event("feature_used", t=NOW_MS, topic="analytics"),
                     make_event("page_view", t=NOW_MS + HOUR, topic="automation")])
    now = NOW_MS + 5 * HOUR
    features = compute_features(profile, now, HALF_LIFE)
    assert interest_scores(profile, now, HALF_LIFE, features) == interest_scores(profile, now, HALF_LIFE)
