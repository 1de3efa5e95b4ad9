"""How many users an experiment needs before it starts: the per-arm sample size to detect a minimum change of
the completion rate with a given power, and a check of that number by simulation.

The plan is for the report's primary test (two-sided chi-square of completion, each treatment arm against the
baseline). With more than two arms the per-comparison alpha is Bonferroni-adjusted over the ``arms - 1``
comparisons; the report uses Holm, which is never less powerful, so the plan is (slightly) on the safe side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from experiments import stats
from experiments.simulate import simulated_rejection_rate


class PlanError(ValueError):
    """Planning inputs out of range."""


@dataclass(frozen=True)
class Plan:
    baseline_rate: float
    mde: float  # absolute change of the rate to detect (0.05 = 5 percentage points)
    alpha: float
    power: float
    arms: int
    comparison_alpha: float
    users_per_arm: int
    total_users: int
    simulated_power: float | None = None
    simulation_runs: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan(baseline_rate: float, mde: float, alpha: float = 0.05, power: float = 0.8, arms: int = 2, *,
         simulate_runs: int = 0, seed: int = 0) -> Plan:
    """The sample size (statsmodels' normal power solver on Cohen's h), optionally checked by ``simulate_runs``
    simulated experiments at exactly that size."""
    problems = []
    if not 0 < baseline_rate < 1:
        problems.append(f"--baseline-rate must be between 0 and 1 (a rate such as 0.4), got {baseline_rate}")
    if not mde or (0 < baseline_rate < 1 and not 0 < baseline_rate + mde < 1):  # judged against a valid rate only
        problems.append(f"--mde must be a non-zero absolute change that keeps the rate in (0, 1) (0.05 = +5 "
                        f"points), got {mde}")
    if not 0 < alpha < 0.5:
        problems.append(f"--alpha must be in (0, 0.5), got {alpha}")
    if not 0 < power < 1:
        problems.append(f"--power must be in (0, 1), got {power}")
    if arms < 2:
        problems.append(f"--arms must be at least 2 (the baseline and one treatment), got {arms}")
    if simulate_runs < 0:
        problems.append(f"--simulate must be 0 (no simulation) or a number of simulated experiments, got {simulate_runs}")
    if problems:
        raise PlanError("; ".join(problems))
    n = stats.sample_size_per_arm(baseline_rate, mde, alpha, power, arms)
    comparison_alpha = stats.comparison_alpha(alpha, arms)
    simulated = (simulated_rejection_rate(baseline_rate, mde, n, simulate_runs, comparison_alpha, seed)
                 if simulate_runs else None)
    return Plan(baseline_rate, mde, alpha, power, arms, comparison_alpha, n, n * arms, simulated, simulate_runs)


def format_plan(p: Plan) -> str:
    lines = [
        f"baseline completion {p.baseline_rate * 100:.1f}%, detect {p.mde * 100:+.2f} points "
        f"({p.baseline_rate * 100:.1f}% -> {(p.baseline_rate + p.mde) * 100:.1f}%)",
        f"alpha {p.alpha:g} (two-sided{f', {p.comparison_alpha:.4g} per comparison over {p.arms - 1}' if p.arms > 2 else ''}), "
        f"power {p.power * 100:.0f}%, {p.arms} arms of equal weight",
        f"users per arm: {p.users_per_arm:,}",
        f"users in total: {p.total_users:,}",
    ]
    if p.simulated_power is not None:
        lines.append(f"simulated power at that size: {p.simulated_power * 100:.1f}% over {p.simulation_runs} runs")
    lines.append("Only users exposed long enough to finish onboarding count; run until every arm has them, and use "
                 "the report's always-valid interval if you look before then.")
    return "\n".join(lines)
