"""Simulated experiment outcomes with a known truth, for the acceptance tests, `experiments report --simulate`
and the demo.

Why not the event generator (models/generator.py)? Its users are realistic but cost ~1 ms each and the outcomes
would first have to be aggregated from their events; the statistical acceptance tests need hundreds of
repetitions. So this is a documented parametric simulation, seeded (numpy ``default_rng(seed)``), calibrated to
the generator where it matters:

* arm: the real assignment hash of the experiment (:func:`udfs.experiment_arms.assignment.arm_bucket`), so the arm
  shares follow the configured weights exactly as in the job -- or, to inject a sample-ratio mismatch, a given
  ``split`` drawn at random;
* completion ~ Bernoulli(baseline_completion + completion_effect[arm]); the default baseline 0.67 is the share of
  generated users who do not churn (models/generator.py, 2,000 users);
* a latent engagement z ~ N(0, 1) per user drives both pre-exposure engagement
  (log-normal, median ~4 min) and post-exposure engagement (log-normal, median ~11 min, times
  ``engagement_effect[arm]``), which makes pre_engagement_s a useful CUPED covariate (log-scale correlation
  ``pre_correlation``);
* time to complete ~ log-normal (median 2 days) for completers; steps completed = 6 for completers, else
  Binomial(5, 0.4); a satisfaction score (1..5, higher when completed) from ``satisfaction_rate`` of users;
* exposure time uniform over ``days`` days from ``start_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from experiments import stats
from experiments.records import UserOutcome
from udfs.experiment_arms.assignment import arm_bucket
from udfs.experiment_arms.config import Experiment

DAY_MS = 86_400_000


@dataclass(frozen=True)
class SimulationSpec:
    baseline_completion: float = 0.67
    completion_effects: Mapping[str, float] = field(default_factory=dict)  # arm -> absolute change of the rate
    engagement_effects: Mapping[str, float] = field(default_factory=dict)  # arm -> factor on engagement
    split: Mapping[str, float] | None = None  # arm -> share, instead of the assignment hash (SRM injection)
    days: int = 14
    start_ms: int = 1_796_083_200_000  # 2026-12-01T00:00Z
    satisfaction_rate: float = 0.3
    pre_correlation: float = 0.7


def simulate_outcomes(experiment: Experiment, n_users: int, seed: int = 0,
                      spec: SimulationSpec | None = None) -> list[UserOutcome]:
    """``n_users`` simulated users of ``experiment`` (see the module doc); same seed, same rows."""
    spec = spec or SimulationSpec()
    rng = np.random.default_rng(seed)
    user_ids = [f"sim-{seed}-{i:07d}" for i in range(n_users)]
    arm_ids = [a.id for a in experiment.arms]
    if spec.split is None:
        arms = [experiment.arm_for_bucket(arm_bucket(experiment, uid)) for uid in user_ids]
    else:
        shares = np.array([spec.split.get(a, 0.0) for a in arm_ids], dtype=float)
        arms = [arm_ids[i] for i in rng.choice(len(arm_ids), size=n_users, p=shares / shares.sum())]
    p_complete = np.clip([spec.baseline_completion + spec.completion_effects.get(a, 0.0) for a in arms], 0.0, 1.0)
    completed = rng.random(n_users) < p_complete
    z = rng.standard_normal(n_users)
    rho = spec.pre_correlation
    pre = np.exp(5.5 + 0.8 * z)
    noise = rng.standard_normal(n_users)
    factor = np.array([spec.engagement_effects.get(a, 1.0) for a in arms])
    engagement = np.exp(6.5 + 0.8 * (rho * z + np.sqrt(1 - rho * rho) * noise)) * factor
    time_to_complete = np.exp(np.log(2 * 86_400.0) + 0.8 * rng.standard_normal(n_users))
    steps = np.where(completed, 6, rng.binomial(5, 0.4, n_users))
    answered = rng.random(n_users) < spec.satisfaction_rate
    score = np.clip(np.rint(3.3 + 0.6 * completed + 0.9 * rng.standard_normal(n_users)), 1, 5)
    exposed = spec.start_ms + (rng.random(n_users) * spec.days * DAY_MS).astype(np.int64)
    return [
        UserOutcome(
            user_id=user_ids[i], experiment_id=experiment.id, arm=arms[i], exposed_at_ms=int(exposed[i]),
            completed=bool(completed[i]),
            time_to_complete_s=float(time_to_complete[i]) if completed[i] else None,
            steps_completed=int(steps[i]), engagement_s=float(engagement[i]),
            satisfaction=float(score[i]) if answered[i] else None, pre_engagement_s=float(pre[i]),
        )
        for i in range(n_users)
    ]


def simulated_rejection_rate(baseline_rate: float, effect: float, n_per_arm: int, runs: int, alpha: float = 0.05,
                             seed: int = 0) -> float:
    """Share of ``runs`` simulated two-arm experiments (``n_per_arm`` users each, completion rates
    ``baseline_rate`` and ``baseline_rate + effect``) whose chi-square test rejects at ``alpha``: the power of
    the planned test (or, with ``effect=0``, its false-positive rate). Counts are drawn vectorized
    (Binomial(n, p) per arm and run), so thousands of runs take well under a second."""
    rng = np.random.default_rng(seed)
    base = rng.binomial(n_per_arm, baseline_rate, size=runs)
    treat = rng.binomial(n_per_arm, baseline_rate + effect, size=runs)
    rejections = sum(stats.compare_rates(int(b), n_per_arm, int(t), n_per_arm, alpha).p_value < alpha
                     for b, t in zip(base, treat))
    return rejections / runs
