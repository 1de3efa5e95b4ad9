"""Consent gating and data minimization: without personalization consent only onboarding progress is kept,
withdrawal deletes the behavioural data, re-consent starts fresh, and only allow-listed fields reach the profile."""

from __future__ import annotations

import pytest

from jobs.config import ConfigError, load_config
from models.training import TrainingParams, replay_user
from udfs.avro_codec import decision_codec, event_codec
from udfs.dedup import remembered
from udfs.personalizer import Personalizer
from udfs.profile_state import (DEFAULT_POLICY, Profile, ProfilePolicy, apply_event, clear_behaviour, fold_event,
                                profile_from_state)

from tests.conftest import NOW_MS, make_event
from tests.test_personalize_function import _function, _run

HOUR = 3_600_000
HALF_LIFE = 24 * HOUR
BEHAVIOURAL = ("counts", "sessions", "interest", "demographic", "context", "prev_gap_ms", "last_step_ms",
               "step_gap_sum_ms", "step_gaps")


def _consent(event, personalization: bool):
    event["consent"] = {"personalization": personalization, "analytics": False, "marketing": False}
    return event


def _signup(t=NOW_MS, personalization: bool | None = True):
    event = make_event("signup", t=t)
    event["demographic"] = {"country": "FR", "age_band": "25-34", "occupation": "designer"}
    event["context"] = {"device": "mobile", "referral_source": "ads", "locale": "fr-FR", "session_id": "s-123"}
    return _consent(event, personalization) if personalization is not None else event


def _activity(t0=NOW_MS):
    return [
        make_event("session_start", t=t0 + 1),
        make_event("feature_used", t=t0 + 2, topic="analytics"),
        make_event("step_completed", t=t0 + HOUR, step_id="welcome_tour", topic="reporting"),
        make_event("step_completed", t=t0 + 2 * HOUR, step_id="profile_setup"),
        make_event("step_skipped", t=t0 + 3 * HOUR, step_id="connect_data"),
    ]


def _fold(events, policy=DEFAULT_POLICY):
    profile = Profile()
    for event in events:
        fold_event(profile, event, HALF_LIFE, policy)
    return profile


def _behaviour(profile):
    return {name: getattr(profile, name) for name in BEHAVIOURAL}


EMPTY = _behaviour(Profile())


@pytest.mark.parametrize("personalization", [None, False])
def test_without_consent_only_progress_is_kept(personalization):
    profile = _fold([_signup(personalization=personalization), *_activity(),
                     make_event("onboarding_completed", t=NOW_MS + 4 * HOUR)])
    assert _behaviour(profile) == EMPTY
    assert profile.steps_done == ["welcome_tour", "profile_setup"] and profile.steps_skipped == ["connect_data"]
    assert profile.signup_ms == profile.first_seen_ms == NOW_MS and profile.completed_ms == NOW_MS + 4 * HOUR
    assert profile.last_event_ms == NOW_MS + 4 * HOUR and len(remembered(profile)) == 7
    assert profile.consent_personalization is personalization


def test_with_consent_the_behavioural_profile_is_built():
    profile = _fold([_signup(), *_activity()])
    assert profile.counts["step_completed"] == 2 and profile.sessions == 1
    assert set(profile.interest) == {"analytics", "reporting"}
    assert profile.step_gaps == 1 and profile.step_gap_sum_ms == HOUR


def test_withdrawal_deletes_the_behavioural_data_at_once_and_keeps_progress():
    profile = _fold([_signup(), *_activity()])
    withdraw = _consent(make_event("consent_updated", t=NOW_MS + 5 * HOUR), False)
    fold_event(profile, withdraw, HALF_LIFE)
    assert _behaviour(profile) == EMPTY
    assert profile.steps_done == ["welcome_tour", "profile_setup"] and profile.consent_personalization is False
    fold_event(profile, make_event("feature_used", t=NOW_MS + 6 * HOUR, topic="automation"), HALF_LIFE)
    assert _behaviour(profile) == EMPTY  # the withdrawal stays in force for events that do not state consent


def test_reconsent_starts_a_fresh_behavioural_profile():
    profile = _fold([_signup(), *_activity(),
                     _consent(make_event("consent_updated", t=NOW_MS + 5 * HOUR), False),
                     make_event("page_view", t=NOW_MS + 6 * HOUR, topic="collaboration")])
    again = _consent(make_event("consent_updated", t=NOW_MS + 7 * HOUR), True)
    fold_event(profile, again, HALF_LIFE)
    fold_event(profile, make_event("feature_used", t=NOW_MS + 8 * HOUR, topic="automation"), HALF_LIFE)
    assert profile.counts == {"consent_updated": 1, "feature_used": 1}
    assert set(profile.interest) == {"automation"} and profile.sessions == 0
    assert profile.demographic == {} and profile.context == {}  # nothing from before the withdrawal
    assert profile.steps_done == ["welcome_tour", "profile_setup"]


def test_behaviour_left_in_an_older_state_without_consent_is_deleted_on_the_next_event():
    legacy = Profile(counts={"page_view": 3}, sessions=2, interest={"analytics": [1.0, NOW_MS]},
                     context={"session_id": "s-1"})
    apply_event(legacy, make_event("page_view", t=NOW_MS + 1), HALF_LIFE)
    assert _behaviour(legacy) == EMPTY


def test_decision_without_consent_is_the_default_flow():
    fn = _function()
    for payload in (_signup(personalization=False), *_activity()):
        (out,) = _run(fn, event_codec().encode(payload))
    decision = decision_codec().decode(out)
    assert decision["personalized"] is False and decision["content_variant"] == "default"
    assert decision["step_id"] == "connect_data" and decision["interest"] == {}
    assert any(r.startswith("no_consent") for r in decision["reasons"])
    assert _behaviour(profile_from_state(fn.profile_state.data)) == EMPTY


def test_allow_list_drops_session_id_and_fields_not_listed():
    profile = _fold([_signup()])
    assert profile.context == {"device": "mobile", "referral_source": "ads", "locale": "fr-FR"}
    assert profile.demographic == {"country": "FR", "age_band": "25-34", "occupation": "designer"}
    narrow = ProfilePolicy(allowed_demographic_fields=("country",), allowed_context_fields=("device",))
    signup = _signup()
    signup["context"]["unknown_field"] = "x"  # not in the schema at all: never copied
    profile = _fold([signup], narrow)
    assert profile.demographic == {"country": "FR"} and profile.context == {"device": "mobile"}


def test_only_catalog_topics_and_steps_reach_the_profile():
    profile = _fold([_signup(), make_event("page_view", t=NOW_MS + 1, topic="jane@example.com"),
                     make_event("step_completed", t=NOW_MS + 2, step_id="free text")])
    assert profile.interest == {} and profile.steps_done == []


def test_keyed_function_and_training_use_the_same_allow_list():
    policy = ProfilePolicy(allowed_demographic_fields=("age_band",), allowed_context_fields=("locale",))
    fn = _function(policy=policy)
    assert fn.personalizer.policy is policy
    _run(fn, event_codec().encode(_signup()))
    stored = profile_from_state(fn.profile_state.data)
    assert stored.demographic == {"age_band": "25-34"} and stored.context == {"locale": "fr-FR"}
    params = TrainingParams(allowed_demographic_fields=("age_band",), allowed_context_fields=("locale",))
    assert params.profile_policy == policy
    assert Personalizer(None, HALF_LIFE, None, params.profile_policy).policy == policy
    ((_, vector),) = list(replay_user([_signup()], HALF_LIFE, params.profile_policy))
    assert vector[10] == 0.0  # is_mobile: the device was not allowed into the profile


def test_clear_behaviour_keeps_progress():
    profile = _fold([_signup(), *_activity()])
    progress = (profile.steps_done[:], profile.signup_ms, profile.last_event_ms, remembered(profile))
    clear_behaviour(profile)
    assert _behaviour(profile) == EMPTY
    assert (profile.steps_done, profile.signup_ms, profile.last_event_ms, remembered(profile)) == progress


def test_config_defaults_and_comma_separated_lists():
    cfg = load_config(environ={})
    assert cfg.allowed_context_fields == ("device", "locale", "referral_source")
    assert cfg.allowed_demographic_fields == ("country", "age_band", "occupation")
    assert cfg.dedup_window_ms == 24 * HOUR and cfg.dedup_max_ids == 500
    assert cfg.profile_policy() == DEFAULT_POLICY
    env = {"ONRAMP_ALLOWED_CONTEXT_FIELDS": " device , locale ", "ONRAMP_DEDUP_WINDOW_MS": "0"}
    cfg = load_config({"allowed_demographic_fields": "country"}, environ=env)
    assert cfg.allowed_context_fields == ("device", "locale") and cfg.allowed_demographic_fields == ("country",)
    assert cfg.profile_policy().dedup_window_ms == 0
    assert load_config({"allowed_context_fields": ["device"]}, environ={}).allowed_context_fields == ("device",)
    assert load_config({"allowed_context_fields": ""}, environ={}).allowed_context_fields == ()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"allowed_demographic_fields": "country,email"}, "'email' not a field of the event's demographic record"),
        ({"allowed_context_fields": "device,ip_address"}, "'ip_address' not a field of the event's context record"),
        ({"allowed_context_fields": "country"}, "'country' not a field of the event's context record"),
        ({"allowed_context_fields": [1, 2]}, "allowed_context_fields must be a list of field names"),
        ({"dedup_window_ms": "-1"}, "dedup_window_ms must be >= 0"),
        ({"dedup_max_ids": "0"}, "dedup_max_ids must be >= 1"),
    ],
)
def test_config_validation(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides, environ={})
