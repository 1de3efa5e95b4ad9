"""Seeded synthetic onboarding sessions with latent personas and a ground-truth churn mechanism.

Every user belongs to one of four latent personas (:data:`PERSONAS`) that shape what they look at (topic mix),
the device they use, the order and pace in which they go through :data:`ONBOARDING_STEPS` and how often they
skip. On top of the persona each user has a latent *engagement* ``z ~ N(0, 1)``: low engagement means slower
pace, more skipping and fewer interactions.

Churn is a per-step hazard: before each onboarding step the user drops out with probability

    h = sigmoid(base[persona] - 0.8 z + 0.55 * steps_skipped_so_far + 0.45 * on_mobile_or_tablet)

A user who drops out never sends ``onboarding_completed`` (``UserTruth.churned``); everybody else finishes the
flow (each step completed or skipped) and sends it, then uses the product for a few more sessions. Activity
past the end of the window is cut off, so late signups can look unfinished although ``churned`` is False
(training treats them as censored). About 3% of users later flip their personalization consent
(``consent_updated``); ~90% consent to personalization at signup.

Output events are dicts exactly matching ``avro/onboarding_event.avsc`` (``event_time`` in epoch millis), sorted
by event time across users. Everything is derived from ``seed`` (event ids too); only the default ``start_ms``
("now minus span") depends on the clock, so pass ``start_ms`` for byte-identical runs.
"""

from __future__ import annotations

import heapq
import math
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from udfs.onboarding_catalog import ONBOARDING_STEPS, TOPICS

GENERATOR_VERSION = 1  # bump when the generated data changes for a given seed
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
MINUTE_MS = 60_000

FEATURES_BY_TOPIC: dict[str, tuple[str, ...]] = {
    "analytics": ("dashboards", "query_builder", "charts", "cohorts"),
    "collaboration": ("comments", "shared_boards", "mentions", "team_spaces"),
    "integrations": ("api_keys", "webhooks", "connectors", "sso"),
    "automation": ("workflows", "schedules", "triggers", "rules"),
    "reporting": ("reports", "exports", "scheduled_reports", "templates"),
}
FORMS_BY_STEP: dict[str, str] = {"profile_setup": "profile", "connect_data": "data_source", "invite_team": "invite"}

COUNTRIES: tuple[tuple[str, str, float], ...] = (  # country, locale, weight
    ("US", "en-US", 0.34), ("GB", "en-GB", 0.10), ("DE", "de-DE", 0.12), ("FR", "fr-FR", 0.09),
    ("IN", "en-IN", 0.12), ("BR", "pt-BR", 0.08), ("JP", "ja-JP", 0.06), ("ES", "es-ES", 0.05),
    ("CA", "en-CA", 0.04),
)
AGE_BANDS: tuple[tuple[str, float], ...] = (("18-24", 0.14), ("25-34", 0.38), ("35-44", 0.27), ("45-54", 0.14), ("55+", 0.07))
REFERRALS: tuple[tuple[str, float], ...] = (("organic", 0.38), ("ads", 0.24), ("referral", 0.18), ("partner", 0.10), ("social", 0.10))


@dataclass(frozen=True)
class Persona:
    name: str
    topics: dict[str, float]  # topic mix of page views / feature use
    devices: dict[str, float]
    occupations: dict[str, float]
    step_order: tuple[str, ...]
    skip_base: float  # probability of skipping a step at average engagement
    skip_extra: dict[str, float]  # additional skip probability for particular steps
    stay_in_session: float  # probability of going on to the next step in the same session
    session_gap_h: float  # median hours between sessions
    event_gap_s: float  # mean seconds between events inside a session
    interactions_per_step: float  # mean page views / feature uses around a step
    hazard_base: float  # logit of the per-step drop-out probability at average engagement


PERSONAS: dict[str, Persona] = {
    p.name: p
    for p in (
        Persona(
            name="data_explorer",
            topics={"analytics": 0.56, "reporting": 0.24, "automation": 0.08, "integrations": 0.07, "collaboration": 0.05},
            devices={"desktop": 0.90, "mobile": 0.05, "tablet": 0.02, "other": 0.03},
            occupations={"data_analyst": 0.4, "data_scientist": 0.3, "engineer": 0.15, "product_manager": 0.15},
            step_order=ONBOARDING_STEPS,
            skip_base=0.06,
            skip_extra={"invite_team": 0.35},
            stay_in_session=0.85,
            session_gap_h=1.5,
            event_gap_s=25.0,
            interactions_per_step=1.5,
            hazard_base=-3.8,
        ),
        Persona(
            name="team_lead",
            topics={"collaboration": 0.58, "reporting": 0.18, "analytics": 0.10, "automation": 0.07, "integrations": 0.07},
            devices={"desktop": 0.82, "mobile": 0.08, "tablet": 0.06, "other": 0.04},
            occupations={"manager": 0.45, "team_lead": 0.35, "founder": 0.20},
            step_order=("welcome_tour", "profile_setup", "invite_team", "first_project", "connect_data", "explore_features"),
            skip_base=0.08,
            skip_extra={"connect_data": 0.2},
            stay_in_session=0.6,
            session_gap_h=4.0,
            event_gap_s=45.0,
            interactions_per_step=1.1,
            hazard_base=-3.4,
        ),
        Persona(
            name="integrator",
            topics={"integrations": 0.46, "automation": 0.36, "analytics": 0.07, "reporting": 0.06, "collaboration": 0.05},
            devices={"desktop": 0.88, "mobile": 0.04, "tablet": 0.03, "other": 0.05},
            occupations={"engineer": 0.55, "developer": 0.25, "it_admin": 0.20},
            step_order=("connect_data", "welcome_tour", "profile_setup", "first_project", "explore_features", "invite_team"),
            skip_base=0.08,
            skip_extra={"welcome_tour": 0.3, "invite_team": 0.2},
            stay_in_session=0.65,
            session_gap_h=3.0,
            event_gap_s=35.0,
            interactions_per_step=1.3,
            hazard_base=-3.4,
        ),
        Persona(
            name="casual_mobile",
            topics={"reporting": 0.44, "collaboration": 0.22, "analytics": 0.14, "integrations": 0.09, "automation": 0.11},
            devices={"mobile": 0.76, "tablet": 0.17, "desktop": 0.06, "other": 0.01},
            occupations={"student": 0.3, "marketer": 0.25, "sales": 0.2, "other": 0.25},
            step_order=ONBOARDING_STEPS,
            skip_base=0.22,
            skip_extra={"connect_data": 0.3, "invite_team": 0.15},
            stay_in_session=0.25,
            session_gap_h=9.0,
            event_gap_s=70.0,
            interactions_per_step=0.8,
            hazard_base=-2.9,
        ),
    )
}
PERSONA_NAMES: tuple[str, ...] = tuple(PERSONAS)
assert all(set(p.topics) == set(TOPICS) and set(p.step_order) == set(ONBOARDING_STEPS) for p in PERSONAS.values())


@dataclass
class UserTruth:
    user_id: str
    persona: str
    churned: bool
    signup_ms: int


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(tuple(weights), weights=tuple(weights.values()))[0]


def _user_events(index: int, seed: int, signup_ms: int, truth: UserTruth) -> Iterator[dict[str, Any]]:
    """The events of one user, lazily (time-ordered, strictly increasing times).

    Lazy so that a long stream holds only a paused generator per active user, not their events. ``truth``
    (persona, signup) is filled in on the first ``next()``; ``truth.churned`` is final once exhausted.
    """
    rng = random.Random(f"onramp-user:{seed}:{index}")
    persona = PERSONAS[PERSONA_NAMES[rng.randrange(len(PERSONA_NAMES))]]
    user_id = f"user-{seed}-{index:06d}"
    truth.user_id, truth.persona, truth.signup_ms = user_id, persona.name, signup_ms
    z = rng.gauss(0.0, 1.0)  # engagement
    pace = math.exp(-0.45 * z)  # >1: slower
    device = _pick(rng, persona.devices)
    mobile = device in ("mobile", "tablet")
    country, locale, _ = rng.choices(COUNTRIES, weights=[c[2] for c in COUNTRIES])[0]
    referral = rng.choices([r[0] for r in REFERRALS], weights=[r[1] for r in REFERRALS])[0]
    topic_names, topic_weights = tuple(persona.topics), tuple(persona.topics.values())

    t = signup_ms
    session_id = ""

    def new_id() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def emit(etype: str, properties: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "event_id": new_id(),
            "user_id": user_id,
            "anonymous_id": extra.get("anonymous_id"),
            "event_type": etype,
            "event_time": t,
            "demographic": extra.get("demographic"),
            "context": {"device": device, "referral_source": referral, "locale": locale, "session_id": session_id},
            "consent": extra.get("consent"),
            "properties": properties or {},
        }

    def advance_in_session() -> None:
        nonlocal t
        t += 1000 + int(rng.expovariate(1.0 / (persona.event_gap_s * pace * 1000.0)))

    def new_session() -> Iterator[dict[str, Any]]:
        nonlocal t, session_id
        gap_h = persona.session_gap_h * pace * math.exp(rng.gauss(0.0, 0.6))
        t += max(5 * MINUTE_MS, int(gap_h * HOUR_MS))
        session_id = new_id()
        yield emit("session_start")
        yield from interact(1 + int(rng.random() < 0.25))

    def interact(n: int) -> Iterator[dict[str, Any]]:
        for _ in range(n):
            advance_in_session()
            topic = rng.choices(topic_names, weights=topic_weights)[0]
            if rng.random() < 0.55:
                yield emit("page_view", {"topic": topic, "page": f"/{topic}/{rng.choice(('overview', 'guide', 'list', 'detail'))}"})
            else:
                yield emit("feature_used", {"topic": topic, "feature": rng.choice(FEATURES_BY_TOPIC[topic])})

    def n_interactions() -> int:
        mean = persona.interactions_per_step * math.exp(0.3 * z)
        return min(8, int(rng.expovariate(1.0 / mean) + 0.5))

    # Signup, in the first session.
    session_id = new_id()
    p_consent = rng.random() < 0.9
    yield emit(
        "signup",
        {"plan": rng.choice(("free", "trial", "trial", "team"))},
        anonymous_id=f"anon-{rng.getrandbits(64):016x}",
        demographic={"country": country, "age_band": _pick(rng, dict(AGE_BANDS)), "occupation": _pick(rng, persona.occupations)},
        consent={"personalization": p_consent, "analytics": rng.random() < 0.75, "marketing": rng.random() < 0.4},
    )
    advance_in_session()
    yield emit("session_start")
    yield from interact(1 + int(rng.random() < 0.6))

    skip_logit_shift = -0.7 * z
    skipped = 0
    for i, step in enumerate(persona.step_order):
        if i and rng.random() > persona.stay_in_session:
            yield from new_session()
        hazard = _sigmoid(persona.hazard_base - 0.8 * z + 0.55 * skipped + (0.45 if mobile else 0.0))
        if rng.random() < hazard:
            truth.churned = True
            if rng.random() < 0.5:  # wanders around a little, then never comes back
                yield from interact(1 + int(rng.random() < 0.4))
            break
        advance_in_session()
        yield emit("step_viewed", {"step_id": step})
        yield from interact(n_interactions())
        p_skip = min(0.95, persona.skip_base + persona.skip_extra.get(step, 0.0))
        if rng.random() < _sigmoid(math.log(p_skip / (1.0 - p_skip)) + skip_logit_shift):
            advance_in_session()
            yield emit("step_skipped", {"step_id": step})
            skipped += 1
            continue
        form = FORMS_BY_STEP.get(step)
        if form:
            advance_in_session()
            yield emit("form_submitted", {"form": form, "step_id": step})
        advance_in_session()
        yield emit("step_completed", {"step_id": step, "topic": rng.choices(topic_names, weights=topic_weights)[0]})

    if not truth.churned:
        advance_in_session()
        yield emit("onboarding_completed", {"steps_skipped": str(skipped)})
        for _ in range(rng.randrange(0, 3)):  # keeps using the product for a while
            yield from new_session()
            yield from interact(1 + rng.randrange(3))
    if rng.random() < 0.03:  # a few change their mind about personalization later on
        advance_in_session()
        yield emit("consent_updated", consent={"personalization": not p_consent, "analytics": False, "marketing": False})


def _signup_times(n_users: int, seed: int, start_ms: int, span_ms: int) -> Iterator[int]:
    """``n_users`` sorted uniform signup times in ``[start_ms, start_ms + span_ms)``, generated in order, O(1) memory.

    Sequential order statistics: ``u_(i+1) = 1 - (1 - u_(i)) * V ** (1 / (n - i))``.
    """
    rng = random.Random(f"onramp-signups:{seed}")
    u = 0.0
    for i in range(n_users):
        u = 1.0 - (1.0 - u) * (1.0 - rng.random()) ** (1.0 / (n_users - i))
        yield start_ms + min(span_ms - 1, int(u * span_ms * 0.999))


def _stream(
    n_users: int,
    seed: int,
    start_ms: int | None,
    span_days: float,
    max_events: int | None,
    truths: list[UserTruth] | None,
) -> Iterator[dict[str, Any]]:
    if n_users < 0:
        raise ValueError("n_users must be >= 0")
    span_ms = int(span_days * DAY_MS)
    if span_ms <= 0:
        raise ValueError("span_days must be > 0")
    if start_ms is None:
        start_ms = int(time.time() * 1000) - span_ms
    end_ms = start_ms + span_ms  # inclusive upper bound for event times
    signups = _signup_times(n_users, seed, start_ms, span_ms)
    # One paused generator per user whose onboarding overlaps the current time: (next time, user, event, rest).
    pending: list[tuple[int, int, dict[str, Any], Iterator[dict[str, Any]]]] = []
    next_index = 0
    next_signup = next(signups, None)
    emitted = 0
    while True:
        # Admit every user who signs up before the earliest pending event.
        while next_signup is not None and (not pending or next_signup <= pending[0][0]):
            truth = UserTruth(user_id="", persona="", churned=False, signup_ms=next_signup)
            user_events = _user_events(next_index, seed, next_signup, truth)
            first = next(user_events)
            if truths is not None:
                truths.append(truth)
            heapq.heappush(pending, (first["event_time"], next_index, first, user_events))
            next_index += 1
            next_signup = next(signups, None)
        if not pending or (max_events is not None and emitted >= max_events):
            return
        _t, index, event, user_events = pending[0]
        yield event
        emitted += 1
        following = next(user_events, None)
        if following is not None and following["event_time"] <= end_ms:
            heapq.heapreplace(pending, (following["event_time"], index, following, user_events))
        else:
            heapq.heappop(pending)
            if following is not None and truths is not None:
                for _ in user_events:  # activity past the window is cut off; run on to settle the truth
                    pass


def iter_events(
    n_users: int,
    seed: int = 7,
    start_ms: int | None = None,
    span_days: float = 14,
    max_events: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream the events of ``n_users`` users in event-time order (ties: user, then position).

    Only a paused generator per user whose onboarding overlaps the current event time is held in memory (a few
    KB each; about 5% of the users at a time with the default span), so millions of users can be streamed. ``max_events`` stops early. Yields the same events, in the same order, as :func:`generate`.
    """
    return _stream(n_users, seed, start_ms, span_days, max_events, None)


def generate(
    n_users: int,
    seed: int = 7,
    start_ms: int | None = None,
    span_days: float = 14,
) -> tuple[list[dict[str, Any]], list[UserTruth]]:
    """All events of ``n_users`` users sorted by event time, and the ground truth per user (in signup order).

    Event times lie in ``[start_ms, start_ms + span_days]``; the default ``start_ms`` is now minus the span.
    """
    truths: list[UserTruth] = []
    events = list(_stream(n_users, seed, start_ms, span_days, None, truths))
    return events, truths
