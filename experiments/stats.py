"""The statistics of an experiment report: intervals, tests, corrections, power, Bayesian and sequential views.

Pure functions over counts and numpy arrays; distributions and tests come from scipy and statsmodels (nothing
hand-written but the two closed-form formulas that are cited where they are used: CUPED's adjustment and the
normal-mixture confidence sequence). Conventions: "treatment" is the arm compared with the baseline, and
differences are ``treatment - baseline``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint, proportion_effectsize

NAN = float("nan")


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"[{self.low:.4g}, {self.high:.4g}]"


NO_INTERVAL = Interval(NAN, NAN)


@dataclass(frozen=True)
class Comparison:
    """One treatment-vs-baseline test of one metric."""

    test: str  # "chi-square", "welch-t", "mann-whitney", "cuped-welch-t"
    statistic: float
    p_value: float
    diff: float  # treatment - baseline (rates: proportion points; means: metric units)
    ci: Interval  # (1 - alpha) interval of diff


# ----------------------------------------------------------------------------------------------- intervals


def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> Interval:
    """Wilson score interval of a rate: good coverage also for small n and rates near 0 or 1 (unlike Wald)."""
    if n <= 0:
        return NO_INTERVAL
    low, high = proportion_confint(successes, n, alpha=alpha, method="wilson")
    return Interval(float(low), float(high))


def mean_interval(values: np.ndarray, alpha: float = 0.05) -> Interval:
    """Student-t interval of a mean (by the CLT also fine for skewed metrics once n is in the hundreds)."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return NO_INTERVAL
    sem = sps.sem(values)
    if sem == 0:
        return Interval(float(values.mean()), float(values.mean()))
    low, high = sps.t.interval(1 - alpha, values.size - 1, loc=values.mean(), scale=sem)
    return Interval(float(low), float(high))


# ----------------------------------------------------------------------------------------------- tests


def compare_rates(base_successes: int, base_n: int, treat_successes: int, treat_n: int,
                  alpha: float = 0.05) -> Comparison:
    """Pearson chi-square test of a 2x2 table (no Yates correction, which is needlessly conservative at the
    sample sizes of online experiments) with Newcombe's hybrid-score interval of the rate difference."""
    if min(base_n, treat_n) <= 0:
        return Comparison("chi-square", NAN, NAN, NAN, NO_INTERVAL)
    diff = treat_successes / treat_n - base_successes / base_n
    table = np.array([[treat_successes, treat_n - treat_successes], [base_successes, base_n - base_successes]])
    if (table.sum(axis=0) == 0).any():  # everybody (or nobody) completed in both arms: nothing to test
        statistic, p_value = 0.0, 1.0
    else:
        statistic, p_value, _, _ = sps.chi2_contingency(table, correction=False)
    low, high = confint_proportions_2indep(treat_successes, treat_n, base_successes, base_n, method="newcomb",
                                           compare="diff", alpha=alpha)
    return Comparison("chi-square", float(statistic), float(p_value), diff, Interval(float(low), float(high)))


def skewness(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    return float(sps.skew(values)) if values.size > 2 and values.std() > 0 else 0.0


def compare_means(baseline: np.ndarray, treatment: np.ndarray, alpha: float = 0.05, *,
                  skew_threshold: float = 1.0, method: str = "auto") -> Comparison:
    """Welch's t-test, or Mann-Whitney U when either sample's |skewness| exceeds ``skew_threshold``.

    Durations are typically right-skewed (log-normal-ish): a few very long sessions dominate the variance and
    make the t-test lose power, while the rank test is unaffected. Mann-Whitney tests whether one arm's values
    tend to be larger, not whether the means differ; the reported ``diff`` and ``ci`` are always the difference
    in means with Welch's interval, so the effect stays in the metric's units.
    """
    b, t = np.asarray(baseline, dtype=float), np.asarray(treatment, dtype=float)
    if b.size < 2 or t.size < 2:
        return Comparison("welch-t", NAN, NAN, NAN, NO_INTERVAL)
    diff = float(t.mean() - b.mean())
    if b.std() == 0 and t.std() == 0:
        return Comparison("welch-t", 0.0, 1.0 if diff == 0 else 0.0, diff, Interval(diff, diff))
    welch = sps.ttest_ind(t, b, equal_var=False)
    ci = welch.confidence_interval(1 - alpha)
    interval = Interval(float(ci.low), float(ci.high))
    if method == "auto":
        method = "mann-whitney" if max(abs(skewness(b)), abs(skewness(t))) > skew_threshold else "welch-t"
    if method == "mann-whitney":
        mw = sps.mannwhitneyu(t, b, alternative="two-sided")
        return Comparison("mann-whitney", float(mw.statistic), float(mw.pvalue), diff, interval)
    return Comparison("welch-t", float(welch.statistic), float(welch.pvalue), diff, interval)


@dataclass(frozen=True)
class SrmResult:
    observed: Mapping[str, int]
    expected_share: Mapping[str, float]
    statistic: float
    p_value: float
    threshold: float
    flagged: bool


def srm_check(observed: Mapping[str, int], weights: Mapping[str, float], threshold: float = 0.001) -> SrmResult:
    """Sample-ratio mismatch: chi-square goodness of fit of the users per arm against the configured weights.

    A tiny p-value means assignment or logging is broken (bots, a crashing arm, a join that loses users), and
    then no other number of the report can be trusted. The strict threshold (0.001) keeps false alarms rare
    because the check runs on every report.
    """
    arms = list(weights)
    counts = np.array([observed.get(a, 0) for a in arms], dtype=float)
    total_weight = sum(weights.values())
    share = {a: weights[a] / total_weight for a in arms}
    if counts.sum() == 0:
        return SrmResult(dict(observed), share, NAN, NAN, threshold, False)
    expected = np.array([share[a] for a in arms]) * counts.sum()
    statistic, p_value = sps.chisquare(counts, expected)
    return SrmResult({a: int(c) for a, c in zip(arms, counts)}, share, float(statistic), float(p_value), threshold,
                     bool(p_value < threshold))


def holm(p_values: Sequence[float], alpha: float = 0.05) -> tuple[list[bool], list[float]]:
    """Holm's step-down correction (controls the family-wise error rate, uniformly more powerful than
    Bonferroni); NaN p-values (untestable) stay NaN and are not rejected."""
    indexed = [(i, p) for i, p in enumerate(p_values) if not math.isnan(p)]
    rejected, adjusted = [False] * len(p_values), [NAN] * len(p_values)
    if indexed:
        rej, adj, _, _ = multipletests([p for _, p in indexed], alpha=alpha, method="holm")
        for (i, _), r, a in zip(indexed, rej, adj):
            rejected[i], adjusted[i] = bool(r), float(a)
    return rejected, adjusted


# ----------------------------------------------------------------------------------------------- power


def comparison_alpha(alpha: float, arms: int) -> float:
    """The per-comparison alpha planned for: Bonferroni over the ``arms - 1`` comparisons with the baseline
    (Holm, used in the report, rejects at least as often, so the plan is slightly conservative)."""
    return alpha / max(1, arms - 1)


def sample_size_per_arm(baseline_rate: float, mde: float, alpha: float = 0.05, power: float = 0.8,
                        arms: int = 2) -> int:
    """Users per arm to detect an absolute change ``mde`` of a completion rate with the given power (two-sided
    test, equal arms), via Cohen's h and statsmodels' normal power solver."""
    effect = abs(proportion_effectsize(baseline_rate + mde, baseline_rate))
    n = NormalIndPower().solve_power(effect_size=effect, alpha=comparison_alpha(alpha, arms), power=power,
                                     ratio=1.0, alternative="two-sided")
    return int(math.ceil(n))


def power_at(n_per_arm: int, baseline_rate: float, mde: float, alpha: float = 0.05, arms: int = 2) -> float:
    effect = abs(proportion_effectsize(baseline_rate + mde, baseline_rate))
    return float(NormalIndPower().power(effect_size=effect, nobs1=n_per_arm, alpha=comparison_alpha(alpha, arms),
                                        ratio=1.0, alternative="two-sided"))


# ----------------------------------------------------------------------------------------------- Bayesian


@dataclass(frozen=True)
class BayesResult:
    prob_beats_baseline: float  # P(p_treatment > p_baseline | data)
    expected_loss_treatment: float  # E[max(p_b - p_t, 0)]: what choosing the treatment costs if it is worse
    expected_loss_baseline: float  # E[max(p_t - p_b, 0)]
    diff_credible: Interval  # (1 - alpha) equal-tailed credible interval of p_t - p_b


def beta_binomial(base_successes: int, base_n: int, treat_successes: int, treat_n: int, *, alpha: float = 0.05,
                  prior: tuple[float, float] = (1.0, 1.0), draws: int = 200_000, seed: int = 0) -> BayesResult:
    """Beta-binomial model of two completion rates with a Beta(a, b) prior (uniform by default); the posterior
    Beta(a + successes, b + failures) of each arm is sampled with a seeded generator (same data, same numbers).

    Expected loss is the usual decision rule: ship the treatment once its expected loss is below what you can
    afford to lose (e.g. 0.1 percentage points), even if the probability to beat is not overwhelming.
    """
    rng = np.random.default_rng(seed)
    a, b = prior
    p_b = sps.beta(a + base_successes, b + base_n - base_successes).rvs(draws, random_state=rng)
    p_t = sps.beta(a + treat_successes, b + treat_n - treat_successes).rvs(draws, random_state=rng)
    d = p_t - p_b
    low, high = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    return BayesResult(float((d > 0).mean()), float(np.maximum(-d, 0).mean()), float(np.maximum(d, 0).mean()),
                       Interval(float(low), float(high)))


# ----------------------------------------------------------------------------------------------- CUPED


@dataclass(frozen=True)
class CupedResult:
    theta: float
    variance_reduction: float  # 1 - Var(Y_cuped) / Var(Y), pooled over both arms
    comparison: Comparison


def cuped_adjust(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """CUPED (Deng, Xu, Kohavi & Walker, WSDM 2013): ``Y' = Y - theta (X - mean(X))`` with
    ``theta = Cov(X, Y) / Var(X)``, X a covariate measured before exposure (so unaffected by the arm).
    Y' has the same expectation per arm and variance ``Var(Y) (1 - corr(X, Y)^2)``."""
    y, x = np.asarray(y, dtype=float), np.asarray(x, dtype=float)
    var_x = x.var()
    theta = float(np.cov(x, y, ddof=0)[0, 1] / var_x) if var_x > 0 else 0.0
    return y - theta * (x - x.mean()), theta


def cuped_compare(base_y: np.ndarray, base_x: np.ndarray, treat_y: np.ndarray, treat_x: np.ndarray,
                  alpha: float = 0.05) -> CupedResult:
    """Welch's t-test on CUPED-adjusted values, theta estimated on both arms pooled."""
    base_y, treat_y = np.asarray(base_y, dtype=float), np.asarray(treat_y, dtype=float)
    y = np.concatenate([base_y, treat_y])
    adjusted, theta = cuped_adjust(y, np.concatenate([np.asarray(base_x, float), np.asarray(treat_x, float)]))
    reduction = 1.0 - adjusted.var() / y.var() if y.size > 1 and y.var() > 0 else 0.0
    c = compare_means(adjusted[: base_y.size], adjusted[base_y.size:], alpha, method="welch-t")
    return CupedResult(theta, float(reduction), Comparison("cuped-welch-t", c.statistic, c.p_value, c.diff, c.ci))


# ----------------------------------------------------------------------------------------------- sequential

DEFAULT_PLANNED_USERS = 10_000


@dataclass(frozen=True)
class SequentialResult:
    ci: Interval  # always-valid (1 - alpha) confidence sequence of the difference, at this look
    p_value: float  # always-valid p-value: min(1, 1 / mixture martingale)


def _mixture_rho2(alpha: float, planned_n: int) -> float:
    """rho^2 that makes the boundary tightest at ``planned_n`` observations (Waudby-Smith et al. 2023, eq. 2.6)."""
    log_term = -2.0 * math.log(alpha)
    return (log_term + math.log(log_term + 1.0)) / max(1, planned_n)


def normal_mixture_halfwidth(sigma: float | np.ndarray, n: int | np.ndarray, alpha: float,
                             planned_n: int = DEFAULT_PLANNED_USERS) -> float | np.ndarray:
    """Half-width of the two-sided normal-mixture confidence sequence for a mean of ``n`` observations with
    standard deviation ``sigma`` (Robbins' normal mixture; Howard, Ramdas, McAuliffe & Sekhon, Ann. Stat. 2021;
    asymptotic version: Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas, "Time-uniform central limit theory and
    asymptotic confidence sequences", 2023, Theorem 2.2)::

        mu_hat_n  +-  sigma * sqrt( 2 (n rho^2 + 1) / (n^2 rho^2) * log( sqrt(n rho^2 + 1) / alpha ) )

    It holds simultaneously for all n with probability >= 1 - alpha, so it may be looked at after every user
    without inflating the error rate. ``rho`` is fixed in advance from the planned sample size (it must not
    depend on the data); the interval is tightest there and only slowly wider elsewhere. Works elementwise on
    numpy arrays (a whole path of looks at once).
    """
    rho2 = _mixture_rho2(alpha, planned_n)
    n = np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        half = np.asarray(sigma, dtype=float) * np.sqrt(
            2.0 * (n * rho2 + 1.0) / (n * n * rho2) * np.log(np.sqrt(n * rho2 + 1.0) / alpha))
    half = np.where(n > 0, half, np.nan)
    return float(half) if half.ndim == 0 else half


def _sequential(diff: float, var_diff: float, n_total: int, alpha: float, planned_n: int) -> SequentialResult:
    """The difference of two arms' means as the mean of ``n_total`` observations with per-observation variance
    ``n_total * var_diff``; the always-valid p-value is 1 / M_n with the mixture martingale
    ``M_n = exp(n rho^2 z^2 / (2 (n rho^2 + 1))) / sqrt(n rho^2 + 1)``, z the usual z-statistic."""
    if n_total <= 0 or not var_diff > 0:
        return SequentialResult(NO_INTERVAL, NAN)
    sigma = math.sqrt(n_total * var_diff)
    half = normal_mixture_halfwidth(sigma, n_total, alpha, planned_n)
    rho2 = _mixture_rho2(alpha, planned_n)
    z2 = diff * diff / var_diff
    log_m = n_total * rho2 * z2 / (2.0 * (n_total * rho2 + 1.0)) - 0.5 * math.log(n_total * rho2 + 1.0)
    return SequentialResult(Interval(diff - half, diff + half), float(min(1.0, math.exp(-log_m))))


def sequential_rate_diff(base_successes: int, base_n: int, treat_successes: int, treat_n: int,
                         alpha: float = 0.05, planned_n: int = DEFAULT_PLANNED_USERS) -> SequentialResult:
    if min(base_n, treat_n) <= 0:
        return SequentialResult(NO_INTERVAL, NAN)
    p_b, p_t = base_successes / base_n, treat_successes / treat_n
    var_diff = p_b * (1 - p_b) / base_n + p_t * (1 - p_t) / treat_n
    return _sequential(p_t - p_b, var_diff, base_n + treat_n, alpha, planned_n)


def sequential_mean_diff(baseline: np.ndarray, treatment: np.ndarray, alpha: float = 0.05,
                         planned_n: int = DEFAULT_PLANNED_USERS) -> SequentialResult:
    b, t = np.asarray(baseline, dtype=float), np.asarray(treatment, dtype=float)
    if b.size < 2 or t.size < 2:
        return SequentialResult(NO_INTERVAL, NAN)
    var_diff = b.var(ddof=1) / b.size + t.var(ddof=1) / t.size
    return _sequential(float(t.mean() - b.mean()), var_diff, b.size + t.size, alpha, planned_n)
