"""Per-user experiment outcomes folded from the event stream and the decisions, and their per-arm aggregates.

Pure logic: no Kafka, no Flink. The streaming job (jobs/experiment_outcomes.py) keeps one
:class:`UserOutcomeState` per user in keyed state; the batch path (experiments/outcome_history.py) folds history
with the same class, so both produce the same :class:`~experiments.records.UserOutcome` rows for the same data.

Definitions (docs/experiment-outcomes.md explains the why):

* **Exposure** to an experiment: the first decision (by its ``event_time``, the time of the event it answers)
  whose ``experiments`` map names the experiment; its arm is the user's arm. The decision's ``event_time`` and
  not ``decided_at`` because a replayed event is decided again later but was shown at the same moment.
* **Completed**: an ``onboarding_completed`` event at or after exposure. A user whose onboarding completed
  *before* exposure (the experiment started while they were already through) gets no outcome row: treatment
  cannot have affected them, and excluding them on pre-exposure facts does not bias the comparison.
* **Time to complete**: signup -> first ``onboarding_completed``, in seconds; ``None`` if not completed or no
  ``signup`` event was seen for the user (start unknown).
* **Steps completed**: distinct ``properties.step_id`` values of ``step_completed`` events at or after exposure
  (a step done before exposure and repeated after it does not count).
* **Engagement**: per ``context.session_id``, the time between consecutive events of the session, each gap
  capped at :data:`SESSION_GAP_CAP_MS` (an idle tab is not engagement), summed over sessions; a session with
  one event counts 0; events without a session id count nowhere. Split at the exposure time by event time:
  ``engagement_s`` is the part at/after exposure, ``pre_engagement_s`` the part before (the CUPED covariate).
* **Satisfaction**: ``form_submitted`` with ``properties.form == "satisfaction"`` and ``properties.score`` an
  integer 1..5 (as text, e.g. ``"4"``; anything else is ignored); the last one (by event time) at or after
  exposure.
* **Consent**: outcomes are product analytics, so by default a user gets rows only while the last consent they
  stated (by event time) allows ``analytics``; never stated counts as no, like personalization consent.
* **Erasure**: ``erasure_requested`` forgets everything the state holds from event times up to the request, and
  data for those times arriving later is ignored (only that time is kept), so the user's rows disappear.

Every part of the state is a set, a minimum or a "latest by event time", so the fold is idempotent (a
replayed event changes nothing) and independent of arrival order within a user: an event that arrives late
lands where its event time says, e.g. before exposure, counting towards ``pre_engagement_s``.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

from experiments.records import UserOutcome
from udfs.avro_codec import CodecError, SingleObjectCodec

SESSION_GAP_CAP_MS = 30 * 60 * 1000
SATISFACTION_FORM = "satisfaction"
SATISFACTION_SCORES = range(1, 6)
# Bounds on what one user's state may hold: onboarding users send tens to hundreds of events; beyond these the
# oldest satisfaction scores are dropped and further session times ignored, so one runaway client cannot grow
# the keyed state without limit.
MAX_SESSION_TIMES = 5000
MAX_SATISFACTION_SCORES = 50
STATE_VERSION = 1


class OutcomeStateError(ValueError):
    """A serialized outcome state cannot be read (unknown version or damaged)."""


class InvalidDecision(ValueError):
    """A decision record cannot be folded; ``code`` names why (for counters and logs)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_decision(decision: dict[str, Any]) -> None:
    """Raise :class:`InvalidDecision` if a decoded decision cannot expose its user to an experiment."""
    user_id = decision.get("user_id")
    if not isinstance(user_id, str) or not user_id.strip():
        raise InvalidDecision("missing_user_id", f"decision {decision.get('decision_id')}: user_id is empty")
    if not isinstance(decision.get("event_time"), int):
        raise InvalidDecision("missing_event_time", f"decision {decision.get('decision_id')}: event_time is not an int")
    experiments = decision.get("experiments") or {}
    if not isinstance(experiments, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                                    for k, v in experiments.items()):
        raise InvalidDecision("bad_experiments", f"decision {decision.get('decision_id')}: experiments must map "
                                                 f"non-empty experiment ids to non-empty arms, got {experiments!r}")


def decode_decision(codec: SingleObjectCodec, payload: bytes) -> dict[str, Any]:
    """Decode one single-object encoded decision and check it (:func:`check_decision`); raise
    :class:`InvalidDecision` with the codec's code (e.g. ``unknown_schema``) or the check's."""
    try:
        decision = codec.decode(payload)
    except CodecError as exc:
        raise InvalidDecision(exc.code, exc.message) from None
    check_decision(decision)
    return decision


def satisfaction_score(event: dict[str, Any]) -> int | None:
    """The 1..5 score of a satisfaction form, or None if ``event`` is not one (or its score is unusable)."""
    if event["event_type"] != "form_submitted":
        return None
    props = event.get("properties") or {}
    if props.get("form") != SATISFACTION_FORM:
        return None
    raw = (props.get("score") or "").strip()
    if not raw.isdigit() or int(raw) not in SATISFACTION_SCORES:
        return None
    return int(raw)


def split_engagement_ms(times: list[int], at_ms: int) -> tuple[int, int]:
    """(before, at/after) ``at_ms`` engaged milliseconds of one session's sorted event times: each gap between
    consecutive events, capped at :data:`SESSION_GAP_CAP_MS`, is engaged time starting at the earlier event."""
    before = after = 0
    for a, b in zip(times, times[1:]):
        end = a + min(b - a, SESSION_GAP_CAP_MS)
        pre = max(0, min(end, at_ms) - a)
        before += pre
        after += end - a - pre
    return before, after


@dataclass
class UserOutcomeState:
    """What one user's outcomes are computed from; JSON-serializable (:meth:`to_json`) for Flink keyed state."""

    user_id: str | None = None  # the id rows carry: set it to the state's key before folding (else: the first user_id seen)
    signup_ms: int | None = None  # earliest signup
    completed_ms: int | None = None  # earliest onboarding_completed
    steps: dict[str, int] = field(default_factory=dict)  # step_id -> earliest step_completed time
    sessions: dict[str, list[int]] = field(default_factory=dict)  # session_id -> sorted distinct event times
    satisfaction: list[list[int]] = field(default_factory=list)  # sorted distinct [event_time, score]
    consent: list[Any] | None = None  # [event_time, analytics allowed] of the latest stated consent
    exposures: dict[str, list[Any]] = field(default_factory=dict)  # experiment -> [event_time, arm], the earliest
    erased_until_ms: int | None = None  # erasure requested at this event time: nothing up to it is kept

    # -- folding ---------------------------------------------------------------------------------------------

    def apply_event(self, event: dict[str, Any]) -> None:
        """Fold one validated event (as :func:`udfs.validation.accept_event` returns it)."""
        t = event["event_time"]
        if self.user_id is None:
            self.user_id = event["user_id"]
        kind = event["event_type"]
        if kind == "erasure_requested":
            self._forget_until(t)
            return
        if self.erased_until_ms is not None and t <= self.erased_until_ms:
            return
        consent = event.get("consent")
        if consent is not None:
            allowed = bool(consent.get("analytics"))
            # Latest by event time; on a tie "no" wins, so the result does not depend on arrival order.
            if self.consent is None or t > self.consent[0] or (t == self.consent[0] and not allowed):
                self.consent = [t, allowed]
        session = (event.get("context") or {}).get("session_id")
        if session:
            self._add_session_time(session, t)
        if kind == "signup":
            self.signup_ms = t if self.signup_ms is None else min(self.signup_ms, t)
        elif kind == "onboarding_completed":
            self.completed_ms = t if self.completed_ms is None else min(self.completed_ms, t)
        elif kind == "step_completed":
            step = (event.get("properties") or {}).get("step_id")
            if step:
                self.steps[step] = min(self.steps.get(step, t), t)
        elif kind == "form_submitted":
            score = satisfaction_score(event)
            if score is not None:
                self._add_satisfaction(t, score)

    def apply_decision(self, decision: dict[str, Any]) -> None:
        """Fold one decision: every experiment in its ``experiments`` map exposes the user (earliest wins)."""
        check_decision(decision)
        t = decision["event_time"]
        if self.user_id is None:
            self.user_id = decision["user_id"]
        if self.erased_until_ms is not None and t <= self.erased_until_ms:
            return
        for experiment, arm in (decision.get("experiments") or {}).items():
            seen = self.exposures.get(experiment)
            if seen is None or (t, arm) < (seen[0], seen[1]):
                self.exposures[experiment] = [t, arm]

    def _add_session_time(self, session: str, t: int) -> None:
        times = self.sessions.get(session)
        if times is None:
            times = self.sessions[session] = []
        i = bisect.bisect_left(times, t)
        if i < len(times) and times[i] == t:
            return
        if sum(len(v) for v in self.sessions.values()) >= MAX_SESSION_TIMES:
            return
        times.insert(i, t)

    def _add_satisfaction(self, t: int, score: int) -> None:
        entry = [t, score]
        i = bisect.bisect_left(self.satisfaction, entry)
        if i < len(self.satisfaction) and self.satisfaction[i] == entry:
            return
        self.satisfaction.insert(i, entry)
        del self.satisfaction[:-MAX_SATISFACTION_SCORES]

    def _forget_until(self, t: int) -> None:
        """Erasure at event time ``t``: drop every fact from up to ``t`` and ignore such facts from now on."""
        self.erased_until_ms = t if self.erased_until_ms is None else max(self.erased_until_ms, t)
        cut = self.erased_until_ms
        keep = lambda v: v is not None and v > cut  # noqa: E731
        self.signup_ms = self.signup_ms if keep(self.signup_ms) else None
        self.completed_ms = self.completed_ms if keep(self.completed_ms) else None
        self.steps = {k: v for k, v in self.steps.items() if v > cut}
        self.sessions = {k: kept for k, v in self.sessions.items() if (kept := [x for x in v if x > cut])}
        self.satisfaction = [e for e in self.satisfaction if e[0] > cut]
        self.consent = self.consent if self.consent is not None and self.consent[0] > cut else None
        self.exposures = {k: v for k, v in self.exposures.items() if v[0] > cut}

    # -- results ---------------------------------------------------------------------------------------------

    def outcomes(self, require_analytics_consent: bool = True) -> list[UserOutcome]:
        """One row per experiment the user was exposed to, sorted by experiment id (see the module docstring)."""
        if self.user_id is None or (require_analytics_consent and not (self.consent and self.consent[1])):
            return []
        rows = []
        for experiment in sorted(self.exposures):
            exposed_at, arm = self.exposures[experiment]
            if self.completed_ms is not None and self.completed_ms < exposed_at:
                continue  # onboarded before the experiment reached them
            completed = self.completed_ms is not None
            time_to_complete = None
            if completed and self.signup_ms is not None and self.completed_ms >= self.signup_ms:
                time_to_complete = (self.completed_ms - self.signup_ms) / 1000.0
            pre_ms = post_ms = 0
            for times in self.sessions.values():
                before, after = split_engagement_ms(times, exposed_at)
                pre_ms += before
                post_ms += after
            scores = [score for t, score in self.satisfaction if t >= exposed_at]
            rows.append(UserOutcome(
                user_id=self.user_id,
                experiment_id=experiment,
                arm=arm,
                exposed_at_ms=exposed_at,
                completed=completed,
                time_to_complete_s=time_to_complete,
                steps_completed=sum(1 for t in self.steps.values() if t >= exposed_at),
                engagement_s=post_ms / 1000.0,
                satisfaction=float(scores[-1]) if scores else None,
                pre_engagement_s=pre_ms / 1000.0,
            ))
        return rows

    # -- serialization ---------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``json.dumps`` it for keyed state); :meth:`from_json` reads it back."""
        return {"v": STATE_VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "UserOutcomeState":
        if data is None:
            return cls()
        if not isinstance(data, dict) or data.get("v") != STATE_VERSION:
            raise OutcomeStateError(f"outcome state version {data.get('v') if isinstance(data, dict) else data!r} "
                                    f"is not {STATE_VERSION}; this code cannot read it")
        try:
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except KeyError as exc:
            raise OutcomeStateError(f"outcome state lacks field {exc}") from None


def fold_outcomes(events: Iterable[dict[str, Any]], decisions: Iterable[dict[str, Any]], *,
                  require_analytics_consent: bool = True,
                  user_key: Callable[[str], str] | None = None) -> tuple[list[UserOutcome], int]:
    """Outcome rows of all users in ``events`` (validated) and ``decisions``, sorted by (experiment, arm, user);
    plus the number of decisions skipped as invalid (:func:`check_decision`). Order of the inputs is irrelevant.

    ``user_key(user_id)`` is the id the rows carry (default: the user id itself). The streaming job's rows carry
    the key its state is kept under, i.e. whatever the routing key makes of the user id (a pseudonym where the
    routing key pseudonymizes): pass the same function here to get comparable rows. Events without a user id
    (anonymous, before signup) are left out: no decision exposes them to an experiment."""
    key = user_key or (lambda user_id: user_id)
    states: dict[str, UserOutcomeState] = {}

    def state_of(user_id: str) -> UserOutcomeState:
        k = key(user_id)
        if k not in states:
            states[k] = UserOutcomeState(user_id=k)
        return states[k]

    for event in events:
        if event.get("user_id"):
            state_of(event["user_id"]).apply_event(event)
    skipped = 0
    for decision in decisions:
        try:
            check_decision(decision)
        except InvalidDecision:
            skipped += 1
            continue
        state_of(decision["user_id"]).apply_decision(decision)
    rows = [row for state in states.values() for row in state.outcomes(require_analytics_consent)]
    rows.sort(key=lambda r: (r.experiment_id, r.arm, r.user_id))
    return rows, skipped


# ---------------------------------------------------------------------------------------------------------------
# Per-arm aggregates


@dataclass
class Moments:
    """Count, sum and sum of squares of one metric: enough for a mean and a variance, and mergeable/removable."""

    n: int = 0
    sum: float = 0.0
    sumsq: float = 0.0

    def add(self, x: float, sign: int = 1) -> None:
        self.n += sign
        self.sum += sign * x
        self.sumsq += sign * x * x

    @property
    def mean(self) -> float | None:
        return self.sum / self.n if self.n else None

    @property
    def variance(self) -> float | None:
        """Sample variance (n - 1), None below two values; clamped at 0 against rounding after removals."""
        if self.n < 2:
            return None
        return max(0.0, (self.sumsq - self.sum * self.sum / self.n) / (self.n - 1))


@dataclass
class ArmAggregate:
    """Sufficient statistics of one arm of one experiment over its users' outcome rows.

    :meth:`remove` undoes :meth:`add`, so a stream can replace a user's previous row with the new one. Holds
    no user ids: safe to publish or log."""

    experiment_id: str
    arm: str
    users: int = 0
    completed: int = 0
    time_to_complete_s: Moments = field(default_factory=Moments)
    steps_completed: Moments = field(default_factory=Moments)
    engagement_s: Moments = field(default_factory=Moments)
    pre_engagement_s: Moments = field(default_factory=Moments)
    engagement_x_pre: float = 0.0  # sum of engagement * pre_engagement: the covariance CUPED needs
    satisfaction_s: Moments = field(default_factory=Moments)
    satisfaction_counts: dict[str, int] = field(default_factory=lambda: {str(s): 0 for s in SATISFACTION_SCORES})

    def add(self, outcome: UserOutcome, sign: int = 1) -> None:
        if (outcome.experiment_id, outcome.arm) != (self.experiment_id, self.arm):
            raise ValueError(f"outcome of {outcome.experiment_id}/{outcome.arm} added to the aggregate of "
                             f"{self.experiment_id}/{self.arm}")
        if sign < 0 and self.users < 1:
            raise ValueError(f"cannot remove an outcome from the empty aggregate of {self.experiment_id}/{self.arm}")
        self.users += sign
        self.completed += sign * int(outcome.completed)
        if outcome.time_to_complete_s is not None:
            self.time_to_complete_s.add(outcome.time_to_complete_s, sign)
        self.steps_completed.add(outcome.steps_completed, sign)
        self.engagement_s.add(outcome.engagement_s, sign)
        self.pre_engagement_s.add(outcome.pre_engagement_s, sign)
        self.engagement_x_pre += sign * outcome.engagement_s * outcome.pre_engagement_s
        if outcome.satisfaction is not None:
            self.satisfaction_s.add(outcome.satisfaction, sign)
            key = str(int(outcome.satisfaction))
            self.satisfaction_counts[key] = self.satisfaction_counts.get(key, 0) + sign

    def remove(self, outcome: UserOutcome) -> None:
        self.add(outcome, -1)

    @property
    def completion_rate(self) -> float | None:
        return self.completed / self.users if self.users else None

    def to_json(self) -> dict[str, Any]:
        def moments(m: Moments) -> dict[str, Any]:
            return {"n": m.n, "sum": m.sum, "sumsq": m.sumsq, "mean": m.mean, "variance": m.variance}

        return {
            "experiment_id": self.experiment_id,
            "arm": self.arm,
            "users": self.users,
            "completed": self.completed,
            "completion_rate": self.completion_rate,
            "time_to_complete_s": moments(self.time_to_complete_s),
            "steps_completed": moments(self.steps_completed),
            "engagement_s": moments(self.engagement_s),
            "pre_engagement_s": moments(self.pre_engagement_s),
            "engagement_x_pre": self.engagement_x_pre,
            "satisfaction": moments(self.satisfaction_s),
            "satisfaction_counts": dict(self.satisfaction_counts),
        }


def aggregate_by_arm(outcomes: Iterable[UserOutcome]) -> dict[tuple[str, str], ArmAggregate]:
    """(experiment_id, arm) -> aggregate of the given rows, in sorted key order."""
    out: dict[tuple[str, str], ArmAggregate] = {}
    for row in outcomes:
        key = (row.experiment_id, row.arm)
        if key not in out:
            out[key] = ArmAggregate(*key)
        out[key].add(row)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------------------------
# Outcome rows as JSON (the outcomes topic's values and the lines of an outcomes .jsonl file)

_ROW_FIELDS = {f.name: f for f in fields(UserOutcome)}


class OutcomeRowError(ValueError):
    """A JSON outcome row does not describe a :class:`UserOutcome`; the message names the field."""


def outcome_key(user_id: str, experiment_id: str) -> str:
    """The Kafka key of a user's row in one experiment: unambiguous whatever the ids contain, so the outcomes
    topic can be compacted to the latest row per (user, experiment)."""
    return json.dumps([user_id, experiment_id], separators=(",", ":"))


def outcome_to_json(outcome: UserOutcome) -> dict[str, Any]:
    return dataclasses.asdict(outcome)


def _number(name: str, value: Any, *, optional: bool = False, integral: bool = False) -> Any:
    if value is None and optional:
        return None
    kinds = (int,) if integral else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise OutcomeRowError(f"{name} must be a finite {'integer' if integral else 'number'}"
                              f"{' or null' if optional else ''}, got {value!r}")
    return value if integral else float(value)


def outcome_from_json(data: Any) -> UserOutcome:
    """Validate one JSON row (fields of :class:`UserOutcome`; unknown extra fields are ignored, so newer writers
    may add some) and build the row, or raise :class:`OutcomeRowError`."""
    if not isinstance(data, dict):
        raise OutcomeRowError(f"an outcome row must be a JSON object, got {type(data).__name__}")
    missing = [name for name in _ROW_FIELDS if name not in data]
    if missing:
        raise OutcomeRowError(f"outcome row lacks {', '.join(missing)}")
    for name in ("user_id", "experiment_id", "arm"):
        if not isinstance(data[name], str) or not data[name]:
            raise OutcomeRowError(f"{name} must be a non-empty string, got {data[name]!r}")
    if not isinstance(data["completed"], bool):
        raise OutcomeRowError(f"completed must be true or false, got {data['completed']!r}")
    row = UserOutcome(
        user_id=data["user_id"],
        experiment_id=data["experiment_id"],
        arm=data["arm"],
        exposed_at_ms=_number("exposed_at_ms", data["exposed_at_ms"], integral=True),
        completed=data["completed"],
        time_to_complete_s=_number("time_to_complete_s", data["time_to_complete_s"], optional=True),
        steps_completed=_number("steps_completed", data["steps_completed"], integral=True),
        engagement_s=_number("engagement_s", data["engagement_s"]),
        satisfaction=_number("satisfaction", data["satisfaction"], optional=True),
        pre_engagement_s=_number("pre_engagement_s", data["pre_engagement_s"]),
    )
    if row.steps_completed < 0 or row.engagement_s < 0 or row.pre_engagement_s < 0:
        raise OutcomeRowError("steps_completed, engagement_s and pre_engagement_s must not be negative")
    if row.satisfaction is not None and not SATISFACTION_SCORES[0] <= row.satisfaction <= SATISFACTION_SCORES[-1]:
        raise OutcomeRowError(f"satisfaction must be 1..5 or null, got {row.satisfaction}")
    if row.time_to_complete_s is not None and (row.time_to_complete_s < 0 or not row.completed):
        raise OutcomeRowError("time_to_complete_s must be null unless completed, and not negative")
    return row
