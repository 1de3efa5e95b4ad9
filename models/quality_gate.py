"""The quality gate: a newly trained bundle may not replace the current one if it is measurably worse.

Training publishes and makes the new bundle current in one step, and the Flink job picks the current bundle at
the next submission; a retrain on a bad day of data (fewer labelled users, a broken event source) would silently
degrade every decision. The gate compares the candidate's holdout metrics with the current bundle's manifest
metrics and refuses the candidate when a metric got worse by more than its tolerance:

* churn AUC (``metrics.churn.auc``): higher is better, allowed drop 0.02 by default;
* churn log-loss (``metrics.churn.log_loss``): lower is better, allowed rise 0.02 by default;
* segmentation silhouette (``metrics.segmentation.silhouette``): higher is better, allowed drop 0.05 by default
  (looser: K-means silhouettes move more between data windows than a calibrated classifier's AUC).

A metric missing (or not a number) on either side is skipped with a note rather than failing the gate: older
bundles, or an AUC that could not be computed on a one-class holdout, must not block publishing forever.
Differences exactly at the tolerance pass; metrics are stored rounded to 4 decimals, so the comparison allows
a float epsilon.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

# Metrics are rounded to 4 decimals in the manifest; 0.9 - 0.88 is 0.020000000000000018 in floats.
_EPSILON = 1e-9


@dataclass(frozen=True)
class GateTolerance:
    """How much worse than the current bundle a candidate may be, per metric (absolute differences)."""

    churn_auc_drop: float = 0.02
    churn_log_loss_rise: float = 0.02
    silhouette_drop: float = 0.05

    def __post_init__(self) -> None:
        negative = [name for name, value in asdict(self).items() if value < 0]
        if negative:
            raise ValueError(f"gate tolerances must be >= 0; negative: {negative}")


@dataclass(frozen=True)
class _Rule:
    """One gated metric: where it lives in ``manifest["metrics"]``, its direction and its tolerance field."""

    metric: str  # dotted path, e.g. "churn.auc"
    label: str  # for messages
    higher_is_better: bool
    tolerance_field: str  # attribute of GateTolerance


RULES: tuple[_Rule, ...] = (
    _Rule("churn.auc", "churn AUC", True, "churn_auc_drop"),
    _Rule("churn.log_loss", "churn log-loss", False, "churn_log_loss_rise"),
    _Rule("segmentation.silhouette", "segmentation silhouette", True, "silhouette_drop"),
)


@dataclass(frozen=True)
class GateCheck:
    """The outcome for one metric. ``allowed`` is the worst acceptable candidate value (None when skipped)."""

    metric: str
    label: str
    higher_is_better: bool
    current: float | None
    candidate: float | None
    tolerance: float
    allowed: float | None
    passed: bool
    skipped: bool = False
    note: str = ""

    def describe(self) -> str:
        """One line a person can act on, e.g. ``churn AUC 0.8557 vs current 0.9006: more than 0.02 lower``."""
        if self.skipped:
            return f"{self.label}: skipped ({self.note})"
        worse = "lower" if self.higher_is_better else "higher"
        bound = ">=" if self.higher_is_better else "<="
        verdict = "ok" if self.passed else f"more than {self.tolerance:g} {worse}"
        return (f"{self.label} {self.candidate:.4f} vs current {self.current:.4f}: {verdict} "
                f"(allowed {bound} {self.allowed:.4f})")


@dataclass(frozen=True)
class GateResult:
    """Every check, and whether the candidate may replace the current bundle."""

    checks: tuple[GateCheck, ...]
    tolerance: GateTolerance = field(default_factory=GateTolerance)
    compared_with: str | None = None  # version of the current bundle, when known

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[GateCheck]:
        return [check for check in self.checks if not check.passed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record for the manifest (``manifest["quality_gate"]``)."""
        return {
            "passed": self.passed,
            "compared_with": self.compared_with,
            "tolerance": asdict(self.tolerance),
            "checks": [asdict(check) for check in self.checks],
        }


class QualityGateError(RuntimeError):
    """The candidate bundle is worse than the current one beyond the tolerance; nothing was published."""

    def __init__(self, result: GateResult) -> None:
        self.result = result
        against = f"current bundle {result.compared_with}" if result.compared_with else "the current bundle"
        reasons = "; ".join(check.describe() for check in result.failures)
        super().__init__(
            f"quality gate: the new model is worse than {against}: {reasons}. Nothing was published. "
            f"Check the training data, or use --force to publish anyway (allow_worse=True from Python)"
        )


def _number(metrics: Mapping[str, Any], path: str) -> float | None:
    """The value at dotted ``path`` when it is a finite number, else None."""
    value: Any = metrics
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _check(rule: _Rule, candidate_metrics: Mapping[str, Any], current_metrics: Mapping[str, Any],
           tolerance: GateTolerance) -> GateCheck:
    allowed_change = float(getattr(tolerance, rule.tolerance_field))
    candidate = _number(candidate_metrics, rule.metric)
    current = _number(current_metrics, rule.metric)
    missing = [side for side, value in (("candidate", candidate), ("current bundle", current)) if value is None]
    if missing:
        return GateCheck(rule.metric, rule.label, rule.higher_is_better, current, candidate, allowed_change,
                         allowed=None, passed=True, skipped=True,
                         note=f"no numeric {rule.metric} in the {' and the '.join(missing)} metrics")
    assert candidate is not None and current is not None
    if rule.higher_is_better:
        allowed = current - allowed_change
        passed = candidate >= allowed - _EPSILON
    else:
        allowed = current + allowed_change
        passed = candidate <= allowed + _EPSILON
    return GateCheck(rule.metric, rule.label, rule.higher_is_better, current, candidate, allowed_change,
                     allowed=round(allowed, 6), passed=passed)


def compare(candidate_metrics: Mapping[str, Any], current_metrics: Mapping[str, Any],
            tolerance: GateTolerance | None = None, *, compared_with: str | None = None) -> GateResult:
    """Check the candidate's metrics against the current bundle's (both shaped like ``manifest["metrics"]``).

    Never raises on missing or malformed metrics: those checks are skipped with a note.
    """
    tolerance = tolerance or GateTolerance()
    checks = tuple(_check(rule, candidate_metrics or {}, current_metrics or {}, tolerance) for rule in RULES)
    return GateResult(checks=checks, tolerance=tolerance, compared_with=compared_with)


def check_against(candidate_metrics: Mapping[str, Any], current_manifest: Mapping[str, Any] | None,
                  tolerance: GateTolerance | None = None) -> GateResult:
    """Gate a candidate against the current bundle's manifest; with no current bundle (first publish) there is
    nothing to be worse than, so the result has no checks and passes."""
    if current_manifest is None:
        return GateResult(checks=(), tolerance=tolerance or GateTolerance())
    return compare(candidate_metrics, current_manifest.get("metrics") or {}, tolerance,
                   compared_with=current_manifest.get("version"))
