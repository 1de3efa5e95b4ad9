"""One experiment's outcomes -> a typed :class:`ExperimentReport` (what the terminal table, HTML and JSON show).

Metrics (all per user, from :class:`experiments.records.UserOutcome`):

============================  =======================================  ==========================================
metric                        who counts                               test against the baseline arm
============================  =======================================  ==========================================
completion (primary)          every exposed user                       chi-square; Bayesian; sequential CI
time_to_complete_s            users who completed                      Welch t or Mann-Whitney (by skew)
steps_completed               every exposed user                       Welch t or Mann-Whitney (by skew)
engagement_s                  every exposed user                       same, plus CUPED with pre_engagement_s
satisfaction                  users who sent a score                   Welch t or Mann-Whitney (by skew)
============================  =======================================  ==========================================

Multiple comparisons: Holm's correction within two families -- the primary metric across all treatment arms,
and the secondary metrics across all arms and metrics -- so adding secondary metrics never weakens the test of
the metric the experiment was planned for, and a multivariate test with many arms keeps its family-wise error.
For engagement the decision uses the CUPED-adjusted test whenever the pre-exposure covariate varies (same
expectation, less variance); the unadjusted test is reported beside it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from experiments import stats
from experiments.records import UserOutcome
from experiments.stats import (
    NAN, BayesResult, Comparison, CupedResult, Interval, SequentialResult, SrmResult,
)
from udfs.experiment_arms.config import Experiment

PRIMARY = "completion"
METRICS: tuple[tuple[str, str], ...] = (
    ("completion", "completion rate"),
    ("time_to_complete_s", "time to complete (s)"),
    ("steps_completed", "steps completed"),
    ("engagement_s", "engagement (s)"),
    ("satisfaction", "satisfaction (1-5)"),
)
METRIC_LABELS = dict(METRICS)


@dataclass(frozen=True)
class AnalysisConfig:
    alpha: float = 0.05
    srm_threshold: float = 0.001
    skew_threshold: float = 1.0  # |skewness| above this: Mann-Whitney instead of Welch
    # The confidence sequences are tuned (fixed in advance, never from the data) to be tightest at this many
    # users per arm; use the number from `onramp experiments plan`.
    planned_users_per_arm: int = stats.DEFAULT_PLANNED_USERS // 2
    bayes_draws: int = 200_000
    seed: int = 0
    min_users_per_arm: int = 100  # below: a warning that the numbers are not meaningful yet


@dataclass(frozen=True)
class MetricSummary:
    n: int  # users the metric is computed over
    value: float  # rate or mean
    ci: Interval


@dataclass(frozen=True)
class ArmSummary:
    arm: str
    users: int
    share: float
    expected_share: float
    metrics: dict[str, MetricSummary]


@dataclass(frozen=True)
class MetricResult:
    metric: str
    arm: str
    baseline: str
    family: str  # "primary" or "secondary"
    comparison: Comparison
    relative_lift: float  # diff / baseline value
    p_adjusted: float  # Holm within the family
    significant: bool
    sequential: SequentialResult
    cuped: CupedResult | None = None


@dataclass(frozen=True)
class DailyPoint:
    """Cumulative numbers of one arm up to the end of a UTC day (by exposure time)."""

    day: str
    arm: str
    users: int
    completed: int
    rate: float
    ci: Interval
    diff: float = NAN  # completion rate minus the baseline's, cumulative (NaN for the baseline)
    diff_sequential: Interval = stats.NO_INTERVAL  # always-valid interval of diff at that day's look


@dataclass(frozen=True)
class ExperimentReport:
    experiment_id: str
    description: str
    baseline: str
    alpha: float
    total_users: int
    first_exposure_ms: int | None
    last_exposure_ms: int | None
    arms: tuple[ArmSummary, ...]
    results: tuple[MetricResult, ...]
    srm: SrmResult
    bayes: dict[str, BayesResult]
    daily: tuple[DailyPoint, ...]
    verdict: str
    warnings: tuple[str, ...] = ()
    config: AnalysisConfig = field(default_factory=AnalysisConfig)

    def arm(self, arm_id: str) -> ArmSummary:
        return next(a for a in self.arms if a.arm == arm_id)

    def result(self, metric: str, arm: str) -> MetricResult:
        return next(r for r in self.results if r.metric == metric and r.arm == arm)

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, float) and not math.isfinite(value):
                return None
            return value

        return plain(self)


# ----------------------------------------------------------------------------------------------- helpers


def _values(rows: Sequence[UserOutcome], metric: str) -> np.ndarray:
    """The metric's per-user values over the users it is defined for."""
    if metric == "completion":
        return np.fromiter((r.completed for r in rows), dtype=float, count=len(rows))
    if metric == "time_to_complete_s":
        return np.array([r.time_to_complete_s for r in rows if r.completed and r.time_to_complete_s is not None],
                        dtype=float)
    if metric == "satisfaction":
        return np.array([r.satisfaction for r in rows if r.satisfaction is not None], dtype=float)
    return np.array([getattr(r, metric) for r in rows], dtype=float)


def _summary(rows: Sequence[UserOutcome], metric: str, alpha: float) -> MetricSummary:
    values = _values(rows, metric)
    if metric == "completion":
        k = int(values.sum())
        return MetricSummary(values.size, k / values.size if values.size else NAN,
                             stats.wilson_interval(k, values.size, alpha))
    return MetricSummary(values.size, float(values.mean()) if values.size else NAN, stats.mean_interval(values, alpha))


def _compare(base: Sequence[UserOutcome], treat: Sequence[UserOutcome], metric: str,
             cfg: AnalysisConfig) -> tuple[Comparison, SequentialResult, CupedResult | None]:
    planned = 2 * cfg.planned_users_per_arm
    if metric == "completion":
        kb, kt = sum(r.completed for r in base), sum(r.completed for r in treat)
        return (stats.compare_rates(kb, len(base), kt, len(treat), cfg.alpha),
                stats.sequential_rate_diff(kb, len(base), kt, len(treat), cfg.alpha, planned), None)
    b, t = _values(base, metric), _values(treat, metric)
    comparison = stats.compare_means(b, t, cfg.alpha, skew_threshold=cfg.skew_threshold)
    sequential = stats.sequential_mean_diff(b, t, cfg.alpha, planned)
    cuped = None
    if metric == "engagement_s" and b.size >= 2 and t.size >= 2:
        xb = np.array([r.pre_engagement_s for r in base], dtype=float)
        xt = np.array([r.pre_engagement_s for r in treat], dtype=float)
        if np.concatenate([xb, xt]).var() > 0:
            cuped = stats.cuped_compare(b, xb, t, xt, cfg.alpha)
    return comparison, sequential, cuped


def _utc_day(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d")


def daily_series(by_arm: dict[str, list[UserOutcome]], baseline: str, cfg: AnalysisConfig) -> tuple[DailyPoint, ...]:
    """Cumulative completion per arm at the end of each UTC day of exposure, and each arm's cumulative
    difference to the baseline with its always-valid interval (what a team peeking daily would have seen)."""
    days = sorted({_utc_day(r.exposed_at_ms) for rows in by_arm.values() for r in rows})
    counts: dict[str, dict[str, tuple[int, int]]] = {}
    for arm, rows in by_arm.items():
        per_day: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in rows:
            cell = per_day[_utc_day(r.exposed_at_ms)]
            cell[0] += 1
            cell[1] += r.completed
        users = completed = 0
        counts[arm] = {}
        for day in days:
            users += per_day[day][0] if day in per_day else 0
            completed += per_day[day][1] if day in per_day else 0
            counts[arm][day] = (users, completed)
    points = []
    planned = 2 * cfg.planned_users_per_arm
    for day in days:
        nb, kb = counts.get(baseline, {}).get(day, (0, 0))
        for arm in by_arm:
            n, k = counts[arm][day]
            rate = k / n if n else NAN
            diff, seq = NAN, stats.NO_INTERVAL
            if arm != baseline and n and nb:
                diff = rate - kb / nb
                seq = stats.sequential_rate_diff(kb, nb, k, n, cfg.alpha, planned).ci
            points.append(DailyPoint(day, arm, n, k, rate, stats.wilson_interval(k, n, cfg.alpha), diff, seq))
    return tuple(points)


def _verdict(results: Sequence[MetricResult], baseline: str, srm: SrmResult) -> str:
    if srm.flagged:
        return (f"sample-ratio mismatch (p = {srm.p_value:.2g}): assignment or data collection is broken; fix that "
                "before reading any result")
    primary = [r for r in results if r.family == "primary"]
    better = [r for r in primary if r.significant and r.comparison.diff > 0]
    worse = [r for r in primary if r.significant and r.comparison.diff < 0]
    if better:
        best = max(better, key=lambda r: r.comparison.diff)
        return (f"'{best.arm}' wins: completion {best.comparison.diff * 100:+.2f} points vs '{baseline}' "
                f"(Holm-adjusted p = {best.p_adjusted:.2g})")
    if worse and len(worse) == len(primary):
        return f"'{baseline}' wins: every other arm completes significantly less"
    return f"no significant difference in completion vs '{baseline}' yet"


# ----------------------------------------------------------------------------------------------- analyze


def analyze(outcomes: Sequence[UserOutcome], experiment: Experiment,
            config: AnalysisConfig | None = None) -> ExperimentReport:
    """Every number of the report for ``experiment`` (rows of other experiments are ignored)."""
    cfg = config or AnalysisConfig()
    warnings: list[str] = []
    arm_ids = [a.id for a in experiment.arms]
    by_arm: dict[str, list[UserOutcome]] = {a: [] for a in arm_ids}
    seen: set[str] = set()
    unknown: dict[str, int] = defaultdict(int)
    duplicates = 0
    for row in outcomes:
        if row.experiment_id != experiment.id:
            continue
        if row.user_id in seen:
            duplicates += 1
            continue
        seen.add(row.user_id)
        if row.arm in by_arm:
            by_arm[row.arm].append(row)
        else:
            unknown[row.arm] += 1
    if unknown:
        warnings.append("rows with arms not in the experiment (left out): "
                        + ", ".join(f"{a} ({n})" for a, n in sorted(unknown.items())))
    if duplicates:
        warnings.append(f"{duplicates} duplicate user row(s) left out (first row per user kept)")
    baseline = experiment.baseline
    total = sum(len(rows) for rows in by_arm.values())
    small = [a for a, rows in by_arm.items() if len(rows) < cfg.min_users_per_arm]
    if small:
        warnings.append(f"fewer than {cfg.min_users_per_arm} users in: {', '.join(small)}; too early to conclude")

    weights = {a.id: a.weight for a in experiment.arms}
    srm = stats.srm_check({a: len(rows) for a, rows in by_arm.items()}, weights, cfg.srm_threshold)
    arms = tuple(
        ArmSummary(a, len(rows), len(rows) / total if total else NAN, srm.expected_share[a],
                   {m: _summary(rows, m, cfg.alpha) for m, _ in METRICS})
        for a, rows in by_arm.items()
    )

    raw: list[tuple[str, str, Comparison, SequentialResult, CupedResult | None]] = []
    for arm in arm_ids:
        if arm == baseline:
            continue
        for metric, _ in METRICS:
            raw.append((metric, arm, *_compare(by_arm[baseline], by_arm[arm], metric, cfg)))
    results: list[MetricResult] = []
    adjusted: dict[int, tuple[bool, float]] = {}
    for family, member in (("primary", lambda m: m == PRIMARY), ("secondary", lambda m: m != PRIMARY)):
        index = [i for i, item in enumerate(raw) if member(item[0])]
        p_values = [(raw[i][4].comparison if raw[i][4] else raw[i][2]).p_value for i in index]
        rejected, p_adj = stats.holm(p_values, cfg.alpha)
        adjusted.update({i: (r, p) for i, r, p in zip(index, rejected, p_adj)})
    for i, (metric, arm, comparison, sequential, cuped) in enumerate(raw):
        base_value = next(s for s in arms if s.arm == baseline).metrics[metric].value
        lift = comparison.diff / base_value if base_value and math.isfinite(base_value) else NAN
        significant, p_adj = adjusted[i]
        results.append(MetricResult(metric, arm, baseline, "primary" if metric == PRIMARY else "secondary",
                                    comparison, lift, p_adj, significant, sequential, cuped))

    bayes = {}
    kb, nb = sum(r.completed for r in by_arm[baseline]), len(by_arm[baseline])
    for arm in arm_ids:
        if arm != baseline:
            rows = by_arm[arm]
            bayes[arm] = stats.beta_binomial(kb, nb, sum(r.completed for r in rows), len(rows), alpha=cfg.alpha,
                                             draws=cfg.bayes_draws, seed=cfg.seed)
    exposures = [r.exposed_at_ms for rows in by_arm.values() for r in rows]
    return ExperimentReport(
        experiment_id=experiment.id, description=experiment.description, baseline=baseline, alpha=cfg.alpha,
        total_users=total, first_exposure_ms=min(exposures) if exposures else None,
        last_exposure_ms=max(exposures) if exposures else None, arms=arms, results=tuple(results), srm=srm,
        bayes=bayes, daily=daily_series(by_arm, baseline, cfg), verdict=_verdict(results, baseline, srm),
        warnings=tuple(warnings), config=cfg,
    )

