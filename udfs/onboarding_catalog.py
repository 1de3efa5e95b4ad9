"""The vocabulary Onramp reasons in: onboarding steps, interest topics, devices.

One place for these lists so the generator, the profile, the feature vector and the rules cannot drift apart.
"""

from __future__ import annotations

# The default onboarding flow, in the order a user is guided through it.
ONBOARDING_STEPS: tuple[str, ...] = (
    "welcome_tour",
    "profile_setup",
    "connect_data",
    "first_project",
    "invite_team",
    "explore_features",
)

# Product areas a user can show interest in (properties.topic of page_view / feature_used events).
TOPICS: tuple[str, ...] = ("analytics", "collaboration", "integrations", "automation", "reporting")

DEVICES: tuple[str, ...] = ("desktop", "mobile", "tablet", "other")

EVENT_TYPES: tuple[str, ...] = (
    "signup",
    "session_start",
    "page_view",
    "feature_used",
    "step_viewed",
    "step_completed",
    "step_skipped",
    "form_submitted",
    "onboarding_completed",
    "consent_updated",
    "erasure_requested",
)

# How much one interaction adds to a topic's interest score (before time decay).
INTEREST_WEIGHTS: dict[str, float] = {"page_view": 0.5, "feature_used": 1.0, "step_completed": 0.5}
