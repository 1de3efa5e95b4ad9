"""The fields a rule can name, their types, and the per-event context that carries their values.

This is the one place that says what rules can see. The compiler checks every field a rule set names (in
conditions, ``$field`` steps and ``{{field}}`` templates) against :data:`RULE_FIELDS` and refuses unknown ones,
so a typo fails when the rule set is loaded, not silently at decision time. :func:`rule_context` must produce
every key of :data:`RULE_FIELDS` (a test holds it to that).

Missing values are ``None`` (e.g. ``churn_risk`` for a user who is not personalized, ``country`` when the user
never told us); every comparison on ``None`` is false, so a rule never fires on data that is not there.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Mapping, Protocol, Sequence

from udfs.features import FEATURE_NAMES
from udfs.onboarding_catalog import ONBOARDING_STEPS
from udfs.profile_state import Profile


class FieldType(StrEnum):
    NUMBER = "number"
    STRING = "string"
    BOOL = "bool"
    STRING_LIST = "string_list"


class Scores(Protocol):
    """What the context needs of a model's scores (see :mod:`udfs.model_bundle`)."""

    segment_id: int
    segment_name: str
    churn_risk: float


_N, _S, _B, _L = FieldType.NUMBER, FieldType.STRING, FieldType.BOOL, FieldType.STRING_LIST

RULE_FIELDS: dict[str, FieldType] = {
    # The model's feature vector, by name (None when features were not computed: no consent / no model).
    **{name: _N for name in FEATURE_NAMES},
    # Model scores (None when the decision is not personalized).
    "segment_id": _N,
    "segment_name": _S,
    "churn_risk": _N,
    # Profile.
    "sessions": _N,
    "events": _N,  # all events seen for the user
    "steps_done": _L,  # completion order
    "steps_skipped": _L,
    "remaining_steps": _L,  # catalog order, not done (skipped ones included)
    "next_step": _S,  # first remaining step, or "none"
    "next_not_skipped_step": _S,  # first remaining step not skipped; first remaining if all are skipped; or "none"
    "steps_left": _N,
    "onboarding_completed": _B,  # an onboarding_completed event was seen (overrides the 0/1 feature of that name)
    "top_topic": _S,  # strongest decayed interest; None without interest or when not personalized
    "consent_personalization": _B,
    "consent_analytics": _B,
    "consent_marketing": _B,
    # Demographics (Profile.demographic, last stated value).
    "country": _S,  # ISO 3166-1 alpha-2, as sent (e.g. "DE")
    "age_band": _S,
    "occupation": _S,
    # Context (Profile.context, last stated value).
    "device": _S,
    "referral_source": _S,
    "locale": _S,  # BCP 47, e.g. "de-DE"
    "language": _S,  # the locale's language subtag, lower case, e.g. "de"
    # The event being answered.
    "event_type": _S,
}

_COMBINATORS = frozenset({"all", "any", "not"})
assert not _COMBINATORS & RULE_FIELDS.keys(), "field names must not collide with condition combinators"


def _steps(profile: Profile) -> tuple[list[str], str, str]:
    """(remaining steps in catalog order, next step, next step not skipped), with builtin-1's semantics."""
    done = profile.steps_done
    remaining = [s for s in ONBOARDING_STEPS if s not in done]
    if not remaining:
        return remaining, "none", "none"
    skipped = profile.steps_skipped
    not_skipped = remaining[0]
    if skipped:
        for step in remaining:
            if step not in skipped:
                not_skipped = step
                break
    return remaining, remaining[0], not_skipped


def rule_context(
    profile: Profile,
    features: Sequence[float] | None,
    scores: Scores | None,
    top_topic: str | None,
    event: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The values rules see for one decision: a flat dict with every key of :data:`RULE_FIELDS`.

    Runs once per event, so it builds one plain dict and shares (does not copy) the profile's lists; rules
    only read them. ``features`` and ``scores`` are None when the decision is not personalized."""
    ctx: dict[str, Any] = dict(zip(FEATURE_NAMES, features)) if features is not None else dict.fromkeys(FEATURE_NAMES)
    remaining, next_step, next_not_skipped = _steps(profile)
    demographic = profile.demographic
    context = profile.context
    locale = context.get("locale")
    if scores is not None:
        ctx["segment_id"] = scores.segment_id
        ctx["segment_name"] = scores.segment_name
        ctx["churn_risk"] = float(scores.churn_risk)
    else:
        ctx["segment_id"] = ctx["segment_name"] = ctx["churn_risk"] = None
    ctx["sessions"] = profile.sessions
    ctx["events"] = sum(profile.counts.values())
    ctx["steps_done"] = profile.steps_done
    ctx["steps_skipped"] = profile.steps_skipped
    ctx["remaining_steps"] = remaining
    ctx["next_step"] = next_step
    ctx["next_not_skipped_step"] = next_not_skipped
    ctx["steps_left"] = len(remaining)
    ctx["onboarding_completed"] = bool(profile.completed_ms)
    ctx["top_topic"] = top_topic
    ctx["consent_personalization"] = profile.consent_personalization
    ctx["consent_analytics"] = profile.consent_analytics
    ctx["consent_marketing"] = profile.consent_marketing
    ctx["country"] = demographic.get("country")
    ctx["age_band"] = demographic.get("age_band")
    ctx["occupation"] = demographic.get("occupation")
    ctx["device"] = context.get("device")
    ctx["referral_source"] = context.get("referral_source")
    ctx["locale"] = locale
    ctx["language"] = locale.split("-", 1)[0].split("_", 1)[0].lower() if locale else None
    ctx["event_type"] = event.get("event_type") if event is not None else None
    return ctx
