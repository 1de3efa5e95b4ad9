"""The feature vector: the one definition used by the streaming job and by offline training.

:data:`FEATURE_NAMES` is the single source of the feature order; model bundles record it in their manifest and
a bundle whose list differs is refused. Features are computed at the event time of the event being answered,
so replaying history yields exactly the vectors the stream produced.
"""

from __future__ import annotations

from math import log1p

from udfs.onboarding_catalog import ONBOARDING_STEPS, TOPICS
from udfs.profile_state import Profile, decayed

_HOUR_MS = 3_600_000.0
_N_STEPS = float(len(ONBOARDING_STEPS))
_N_TOPICS = len(TOPICS)
_NO_SHARES = (0.0,) * _N_TOPICS

FEATURE_NAMES: tuple[str, ...] = (
    "log_events",
    "log_sessions",
    "log_page_views",
    "log_features_used",
    "steps_done_frac",
    "steps_skipped_frac",
    "log_forms_submitted",
    "log_hours_since_signup",
    "log_mean_hours_between_steps",
    "log_hours_since_prev_event",
    "is_mobile",
    "onboarding_completed",
    *(f"interest_{topic}" for topic in TOPICS),
    # Each topic's share of the user's total decayed interest (all 0 before the first topical interaction):
    # the user's topic *mix*, independent of how active they are. Segmentation clusters on these.
    *(f"interest_share_{topic}" for topic in TOPICS),
)


def compute_features(profile: Profile, now_ms: int, half_life_ms: float) -> list[float]:
    """Feature vector of ``profile`` as of ``now_ms``, in :data:`FEATURE_NAMES` order."""
    counts = profile.counts
    start = profile.signup_ms or profile.first_seen_ms
    mean_gap = profile.step_gap_sum_ms / profile.step_gaps if profile.step_gaps else 0.0
    interest = profile.interest
    vector = [
        log1p(sum(counts.values())),
        log1p(profile.sessions),
        log1p(counts.get("page_view", 0)),
        log1p(counts.get("feature_used", 0)),
        len(profile.steps_done) / _N_STEPS,
        len(profile.steps_skipped) / _N_STEPS,
        log1p(counts.get("form_submitted", 0)),
        log1p(max(0, now_ms - start) / _HOUR_MS) if start else 0.0,
        log1p(mean_gap / _HOUR_MS),
        log1p(profile.prev_gap_ms / _HOUR_MS),
        1.0 if profile.context.get("device") in ("mobile", "tablet") else 0.0,
        1.0 if profile.completed_ms else 0.0,
    ]
    total = 0.0
    for topic in TOPICS:
        entry = interest.get(topic)
        score = decayed(entry[0], int(entry[1]), now_ms, half_life_ms) if entry else 0.0
        total += score
        vector.append(score)
    if total > 0.0:
        vector.extend([score / total for score in vector[-_N_TOPICS:]])
    else:
        vector.extend(_NO_SHARES)
    return vector


_INTEREST_AT = {topic: FEATURE_NAMES.index(f"interest_{topic}") for topic in TOPICS}


def interest_scores(profile: Profile, now_ms: int, half_life_ms: float,
                    features: list[float] | None = None) -> dict[str, float]:
    """Decayed interest per topic the user has touched, for the decision record. ``features``: the vector
    :func:`compute_features` made for the same ``now_ms``, whose interest columns are these scores already
    (the job passes it, so each score is decayed once per event, not twice)."""
    out = {}
    for topic, (score, at) in profile.interest.items():
        column = _INTEREST_AT.get(topic) if features is not None else None
        value = features[column] if column is not None else decayed(score, int(at), now_ms, half_life_ms)
        out[topic] = round(value, 4)
    return out
