"""Built-in next-step rules: profile + scores -> the step the onboarding UI shows next, with reasons.

An ordered list of rules; the first that matches decides. Every decision names the rules that fired.
This is the rule layer's seed; versioned YAML rule sets replace it without changing :class:`StepChoice`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from udfs.onboarding_catalog import ONBOARDING_STEPS
from udfs.profile_state import Profile

RULES_VERSION = "builtin-1"
HIGH_CHURN_RISK = 0.7

# Which step to pull forward for a user whose strongest interest is a topic.
_STEP_FOR_TOPIC = {
    "integrations": "connect_data",
    "automation": "connect_data",
    "collaboration": "invite_team",
    "analytics": "first_project",
    "reporting": "first_project",
}


@dataclass(slots=True)
class StepChoice:
    step_id: str
    content_variant: str
    template_vars: dict[str, str] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


def _remaining(profile: Profile) -> list[str]:
    done = profile.steps_done
    return [s for s in ONBOARDING_STEPS if s not in done]


def default_flow(profile: Profile) -> StepChoice:
    """The non-personalized flow: the first step not done yet, in catalog order."""
    remaining = _remaining(profile)
    if not remaining or profile.completed_ms:
        return StepChoice("none", "done", {}, ["onboarding_done: nothing left to show"])
    return StepChoice(remaining[0], "default", {"steps_left": str(len(remaining))}, ["default_flow: next step in order"])


def choose_step(profile: Profile, segment_name: str, churn_risk: float, top_topic: str | None) -> StepChoice:
    """Personalized choice for a user who consented to personalization."""
    remaining = _remaining(profile)
    if not remaining or profile.completed_ms:
        return StepChoice("none", "done", {}, ["onboarding_done: nothing left to show"])
    variables = {"steps_left": str(len(remaining)), "segment": segment_name}
    if top_topic:
        variables["top_topic"] = top_topic
    if churn_risk > HIGH_CHURN_RISK:
        return StepChoice(
            "concierge_call", "high_touch", variables, [f"high_churn_risk: churn_risk {churn_risk:.2f} > {HIGH_CHURN_RISK}"]
        )
    not_skipped = [s for s in remaining if s not in profile.steps_skipped] or remaining
    preferred = _STEP_FOR_TOPIC.get(top_topic or "")
    if preferred in not_skipped:
        return StepChoice(preferred, segment_name, variables, [f"interest_first: top interest {top_topic} -> {preferred}"])
    reason = "next_not_skipped: next step the user has not skipped" if not_skipped != remaining else "next_in_order"
    return StepChoice(not_skipped[0], segment_name, variables, [reason])
