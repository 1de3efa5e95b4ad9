"""The per-user outcome row: what outcome aggregation produces and experiment analysis consumes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UserOutcome:
    user_id: str            # pseudonymized or raw, opaque to analysis
    experiment_id: str
    arm: str
    exposed_at_ms: int      # first decision carrying this arm
    completed: bool         # onboarding_completed seen after exposure
    time_to_complete_s: float | None   # signup -> onboarding_completed, None if not completed
    steps_completed: int
    engagement_s: float     # summed session time after exposure
    satisfaction: float | None         # last satisfaction score sent by the app (1..5), None if none
    pre_engagement_s: float # engagement before exposure (CUPED covariate; 0.0 if none)
