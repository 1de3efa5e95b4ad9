"""One event in, one decision out: the pure per-event logic of the personalize job.

The Flink operator owns the state handle; this module owns everything else (profile update, features, one
model call, rules, the decision record), so it is testable and benchmarkable without a JVM.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from udfs.experiment_arms import EMPTY_SET, NO_CHANGES, ArmChanges, ExperimentSet
from udfs.features import compute_features, interest_scores
from udfs.next_step import RULES_VERSION, StepChoice, choose_step, default_flow
from udfs.rules.fields import rule_context
from udfs.profile_state import DEFAULT_POLICY, Profile, ProfilePolicy, fold_event

DECISION_NAMESPACE = uuid.UUID("6f1d2a7e-5b8c-4c1e-9a57-0e7d4f3b2a10")
NO_MODEL = "none"


class Scorer(Protocol):
    """What the personalizer needs of a model bundle (see :class:`udfs.model_bundle.ModelBundle`)."""

    version: str

    def score(self, features: list[float]) -> Any: ...


_NAMESPACE_BYTES = DECISION_NAMESPACE.bytes
_sha1 = hashlib.sha1
# the RFC 4122 variant bits (10xx) over the digest's hex digit 16: 8, 9, a or b
_VARIANT_DIGIT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def decision_id_for(event_id: str) -> str:
    """``str(uuid.uuid5(DECISION_NAMESPACE, event_id))``, deterministic: a replayed event gets the same decision
    id, so consumers can drop repeats. Computed straight from the SHA-1 hex digest (RFC 4122 section 4.3:
    version nibble 5 at digit 12, variant bits at digit 16) because ``uuid.uuid5`` builds a UUID object first:
    0.85 µs against 4 µs per event."""
    x = _sha1(_NAMESPACE_BYTES + event_id.encode()).hexdigest()
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT_DIGIT[x[16]]}{x[17:20]}-{x[20:32]}"


class RuleSet(Protocol):
    """A compiled rule set (:func:`udfs.rules.compiler.compile_ruleset`)."""

    version: str

    def evaluate(self, context: dict[str, Any]) -> StepChoice: ...


@dataclass
class Personalizer:
    """profile + event -> decision. ``rules``: a compiled rule set, or None for the built-in rules (builtin-1);
    ``policy``: consent minimization allow-lists and deduplication settings (:class:`ProfilePolicy`)."""

    scorer: Scorer | None
    half_life_ms: float
    rules: RuleSet | None = None
    policy: ProfilePolicy = DEFAULT_POLICY
    experiments: ExperimentSet = EMPTY_SET
    # rule sets and model bundles that experiment arms pin, by version (the job ships them; see resolve_experiments)
    arm_rules: dict[str, RuleSet] = field(default_factory=dict)
    arm_scorers: dict[str, Scorer] = field(default_factory=dict)

    @property
    def rules_version(self) -> str:
        return self.rules.version if self.rules is not None else RULES_VERSION

    @property
    def model_version(self) -> str:
        return self.scorer.version if self.scorer is not None else NO_MODEL

    def fold(self, profile: Profile, event: dict[str, Any]) -> bool:
        """Fold ``event`` into ``profile`` (:func:`udfs.profile_state.fold_event`); False for a duplicate, which must
        get no decision."""
        return fold_event(profile, event, self.half_life_ms, self.policy)

    def update(self, profile: Profile, event: dict[str, Any]) -> Profile:
        """:meth:`fold`, returning the profile (a duplicate leaves it as it was)."""
        fold_event(profile, event, self.half_life_ms, self.policy)
        return profile

    def decide(self, profile: Profile, event: dict[str, Any], decided_at_ms: int | None = None,
               subject: str | None = None) -> dict[str, Any]:
        """The decision record (a dict matching ``avro/next_step_decision.avsc``) for ``event``, given the profile
        that already includes it. ``subject``: the pseudonym the job keys the user by, which experiment
        assignment hashes (offline callers without the key fall back to the raw id). Records the user's sticky
        experiment arms in ``profile.experiments``; the caller stores the profile afterwards."""
        now = event["event_time"]
        segment_id, segment_name, churn_risk = -1, "unknown", 0.0
        interest: dict[str, float] = {}
        personalized = profile.consent_personalization is True and self.scorer is not None
        scores = features = top_topic = None
        if personalized:
            features = compute_features(profile, now, self.half_life_ms)
            scores = self.scorer.score(features)
            segment_id, segment_name, churn_risk = scores.segment_id, scores.segment_name, scores.churn_risk
            interest = interest_scores(profile, now, self.half_life_ms, features)
            top_topic = max(interest, key=interest.__getitem__) if interest else None
        changes = self._experiment_arms(profile, event, segment_id, subject)
        rules, rules_version, model_version = self.rules, self.rules_version, self.model_version
        if changes is not NO_CHANGES:
            arm_scorer = self.arm_scorers.get(changes.model_version or "")
            if arm_scorer is not None and personalized:  # the arm's model scores the same features
                scores = arm_scorer.score(features)
                segment_id, segment_name, churn_risk = scores.segment_id, scores.segment_name, scores.churn_risk
                model_version = arm_scorer.version
            if changes.rules_version in self.arm_rules:
                rules, rules_version = self.arm_rules[changes.rules_version], changes.rules_version
        if personalized and changes.control:
            personalized = False
            choice = default_flow(profile)
            choice.reasons.append("experiment_control: the user's experiment arm is the default flow")
        elif personalized:
            if rules is not None:
                choice = rules.evaluate(rule_context(profile, features, scores, top_topic, event))
            else:
                choice = choose_step(profile, segment_name, churn_risk, top_topic)
        else:
            choice = default_flow(profile)
            choice.reasons.append(
                "no_model: no model bundle loaded" if profile.consent_personalization is True else
                "no_consent: user has not consented to personalization"
            )
        if changes is not NO_CHANGES:
            self._apply_arm(choice, changes)
        return self._record(event, choice, segment_id, segment_name, churn_risk, interest, personalized, decided_at_ms,
                            profile.experiments, model_version, rules_version)

    def _experiment_arms(self, profile: Profile, event: dict[str, Any], segment_id: int,
                         subject: str | None) -> ArmChanges:
        """Assign the user to running experiments they are eligible for (sticky: ``profile.experiments``) and
        return what their arms change. Eligibility sees the segment (when scored) and the allow-listed
        demographic/context fields the profile holds."""
        experiments = self.experiments
        if not experiments.experiments:
            return NO_CHANGES
        context = {**profile.demographic, **profile.context}
        if segment_id >= 0:
            context["segment_id"] = segment_id
        now = event["event_time"]
        who = subject or event["user_id"] or event.get("anonymous_id") or ""
        profile.experiments = experiments.assign(who, context, now, profile.experiments)
        return experiments.changes_for(profile.experiments, now)

    def _apply_arm(self, choice: StepChoice, changes: ArmChanges) -> None:
        """The arm's content variant; an arm pinning a rule set or bundle the job did not ship (a file changed at
        runtime: the job refuses such a reload, so this is a safety net) is named in the reasons."""
        if changes.content_variant:
            choice.content_variant = changes.content_variant
        if (changes.rules_version and changes.rules_version != self.rules_version
                and changes.rules_version not in self.arm_rules):
            choice.reasons.append(f"experiment_arm_not_applied: rules_version {changes.rules_version} is not loaded")
        if (changes.model_version and changes.model_version != self.model_version
                and changes.model_version not in self.arm_scorers):
            choice.reasons.append(f"experiment_arm_not_applied: model_version {changes.model_version} is not loaded")

    def erased(self, event: dict[str, Any], decided_at_ms: int | None = None) -> dict[str, Any]:
        """The answer to ``erasure_requested``: the profile is gone, nothing is personalized."""
        choice = StepChoice("none", "erased", {}, ["erasure_requested: profile deleted"])
        return self._record(event, choice, -1, "unknown", 0.0, {}, False, decided_at_ms, {})

    def _record(
        self,
        event: dict[str, Any],
        choice: StepChoice,
        segment_id: int,
        segment_name: str,
        churn_risk: float,
        interest: dict[str, float],
        personalized: bool,
        decided_at_ms: int | None,
        experiments: dict[str, str],
        model_version: str | None = None,
        rules_version: str | None = None,
    ) -> dict[str, Any]:
        return {
            "decision_id": decision_id_for(event["event_id"]),
            "user_id": event["user_id"],
            "event_id": event["event_id"],
            "step_id": choice.step_id,
            "content_variant": choice.content_variant,
            "template_vars": choice.template_vars,
            "segment_id": segment_id,
            "segment_name": segment_name,
            "churn_risk": float(churn_risk),
            "interest": interest,
            "personalized": personalized,
            "model_version": model_version or self.model_version,
            "rules_version": rules_version or self.rules_version,
            "experiments": experiments,
            "reasons": choice.reasons,
            "event_time": event["event_time"],
            "decided_at": decided_at_ms if decided_at_ms is not None else time.time_ns() // 1_000_000,
            "anonymous_id": event.get("anonymous_id"),
        }
