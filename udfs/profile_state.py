"""The per-user profile kept in Flink keyed state, and the pure function that folds one event into it.

Training replays history through exactly this :func:`apply_event`, so the model sees the same profile the
stream builds. The profile is stored as one bytes value per user (one state read and one write per event,
the cheapest layout through PyFlink's state API); :func:`profile_to_state` / :func:`profile_from_state` are
version-tolerant: fields added later get their defaults when an older state is read.

Interest scores (per topic) are recency-weighted frequencies:

    score(t) = sum over interactions i of  w(type_i) * 2 ** (-(t - t_i) / half_life)

kept incrementally as (score at last update, time of last update); ``w`` is
:data:`udfs.onboarding_catalog.INTEREST_WEIGHTS` and ``half_life`` comes from the config
(``interest_half_life_hours``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from udfs.onboarding_catalog import INTEREST_WEIGHTS, ONBOARDING_STEPS

PROFILE_FORMAT = 1
_STEP_SET = frozenset(ONBOARDING_STEPS)


@dataclass(slots=True)
class Profile:
    first_seen_ms: int = 0
    signup_ms: int = 0
    last_event_ms: int = 0
    prev_gap_ms: int = 0  # time between the latest event and the one before it
    counts: dict[str, int] = field(default_factory=dict)  # events by type
    sessions: int = 0
    steps_done: list[str] = field(default_factory=list)  # in completion order, each once
    steps_skipped: list[str] = field(default_factory=list)
    last_step_ms: int = 0
    step_gap_sum_ms: int = 0
    step_gaps: int = 0
    completed_ms: int = 0
    interest: dict[str, list[float]] = field(default_factory=dict)  # topic -> [score, at_ms]
    demographic: dict[str, str] = field(default_factory=dict)
    context: dict[str, str] = field(default_factory=dict)
    consent_personalization: bool | None = None  # None: never stated
    consent_analytics: bool | None = None
    consent_marketing: bool | None = None


_FIELD_NAMES = tuple(f.name for f in fields(Profile))


ProfileState = tuple  # (format, field names, field values): plain builtins, pickles small and fast


def profile_to_state(profile: Profile) -> ProfileState:
    """The value stored in Flink state (``Types.PICKLED_BYTE_ARRAY``: PyFlink pickles it once)."""
    return (PROFILE_FORMAT, _FIELD_NAMES, tuple(getattr(profile, n) for n in _FIELD_NAMES))


def profile_from_state(state: ProfileState | None) -> Profile:
    """Inverse of :func:`profile_to_state`; fields unknown to this version are dropped, new ones defaulted."""
    if not state:
        return Profile()
    _fmt, names, values = state
    if names == _FIELD_NAMES:
        return Profile(*values)
    known = set(_FIELD_NAMES)
    return Profile(**{n: v for n, v in zip(names, values) if n in known})


def decayed(score: float, at_ms: int, now_ms: int, half_life_ms: float) -> float:
    """The interest ``score`` recorded at ``at_ms``, decayed to ``now_ms``."""
    if now_ms <= at_ms:
        return score
    return score * 2.0 ** (-(now_ms - at_ms) / half_life_ms)


def _add_interest(profile: Profile, topic: str, weight: float, t_ms: int, half_life_ms: float) -> None:
    entry = profile.interest.get(topic)
    if entry is None:
        profile.interest[topic] = [weight, t_ms]
    elif t_ms >= entry[1]:
        entry[0] = decayed(entry[0], int(entry[1]), t_ms, half_life_ms) + weight
        entry[1] = t_ms
    else:  # late event: add its contribution as seen from the newer reference time
        entry[0] += decayed(weight, t_ms, int(entry[1]), half_life_ms)


def apply_event(profile: Profile, event: dict[str, Any], half_life_ms: float) -> Profile:
    """Fold one validated event into the profile (mutates and returns it)."""
    t = event["event_time"]
    etype = event["event_type"]
    props = event.get("properties") or {}
    if not profile.first_seen_ms:
        profile.first_seen_ms = t
    if t >= profile.last_event_ms:
        profile.prev_gap_ms = t - profile.last_event_ms if profile.last_event_ms else 0
        profile.last_event_ms = t
    profile.counts[etype] = profile.counts.get(etype, 0) + 1

    if etype == "signup":
        if not profile.signup_ms or t < profile.signup_ms:
            profile.signup_ms = t
    elif etype == "session_start":
        profile.sessions += 1
    elif etype == "step_completed":
        step = props.get("step_id")
        if step in _STEP_SET and step not in profile.steps_done:
            profile.steps_done.append(step)
            if profile.last_step_ms and t > profile.last_step_ms:
                profile.step_gap_sum_ms += t - profile.last_step_ms
                profile.step_gaps += 1
            profile.last_step_ms = max(profile.last_step_ms, t)
            if step in profile.steps_skipped:
                profile.steps_skipped.remove(step)
    elif etype == "step_skipped":
        step = props.get("step_id")
        if step in _STEP_SET and step not in profile.steps_skipped and step not in profile.steps_done:
            profile.steps_skipped.append(step)
    elif etype == "onboarding_completed":
        if not profile.completed_ms or t < profile.completed_ms:
            profile.completed_ms = t

    weight = INTEREST_WEIGHTS.get(etype)
    if weight is not None:
        topic = props.get("topic")
        if topic:
            _add_interest(profile, topic, weight, t, half_life_ms)

    demographic = event.get("demographic")
    if demographic:
        for key, value in demographic.items():
            if value:
                profile.demographic[key] = value
    context = event.get("context")
    if context:
        for key, value in context.items():
            if value:
                profile.context[key] = value
    consent = event.get("consent")
    if consent:
        profile.consent_personalization = consent["personalization"]
        profile.consent_analytics = consent["analytics"]
        profile.consent_marketing = consent["marketing"]
    return profile
