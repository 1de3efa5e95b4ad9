"""The statistics hold their promises on simulated data with a known truth (power, false-positive rate, SRM,
CUPED, always-valid intervals, Bayesian calibration), and the report is written."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest

from experiments import stats
from experiments.analysis import AnalysisConfig, analyze
from experiments.plan import PlanError, plan
from experiments.records import (
    OutcomeFileError, UserOutcome, read_outcomes_jsonl, write_outcomes_jsonl,
)
from experiments.report import format_report, render_html, write_html, write_png
from experiments.simulate import SimulationSpec, simulate_outcomes, simulated_rejection_rate
from jobs.config import REPO_ROOT
from udfs.experiment_arms import load_experiments, parse_experiments

PVC = load_experiments(REPO_ROOT / "rules" / "experiments.yaml").experiment("personalization-vs-control")
FAST = AnalysisConfig(bayes_draws=20_000)


def _binomial_tolerance(p: float, runs: int, sds: float = 3.5) -> float:
    return sds * math.sqrt(p * (1 - p) / runs)


# ----------------------------------------------------------------------------------------------- acceptance


def test_a_true_effect_is_detected_at_the_planned_sample_size_with_the_planned_power() -> None:
    planned = plan(0.4, 0.05, alpha=0.05, power=0.8)
    assert planned.users_per_arm == stats.sample_size_per_arm(0.4, 0.05)
    runs = 200
    observed = simulated_rejection_rate(0.4, 0.05, planned.users_per_arm, runs, seed=11)
    assert observed == pytest.approx(0.8, abs=_binomial_tolerance(0.8, runs))
    # and at half the size the power is clearly lower (the plan is not just "always reject")
    assert simulated_rejection_rate(0.4, 0.05, planned.users_per_arm // 2, runs, seed=12) < 0.65


def test_an_a_a_test_rejects_at_about_alpha() -> None:
    runs = 800
    rate = simulated_rejection_rate(0.4, 0.0, 2000, runs, alpha=0.05, seed=21)
    assert rate == pytest.approx(0.05, abs=_binomial_tolerance(0.05, runs))


def test_an_injected_55_45_split_is_flagged_as_srm_and_the_configured_split_is_not() -> None:
    skewed = simulate_outcomes(PVC, 10_000, seed=3, spec=SimulationSpec(split={"personalized": 55, "control": 45}))
    report = analyze(skewed, PVC, FAST)
    assert report.srm.flagged and report.srm.p_value < 0.001
    assert report.verdict.startswith("sample-ratio mismatch")
    fair = analyze(simulate_outcomes(PVC, 10_000, seed=3), PVC, FAST)
    assert not fair.srm.flagged
    assert stats.srm_check({"a": 5000, "b": 5000}, {"a": 1, "b": 1}).p_value == pytest.approx(1.0)


def test_the_report_finds_a_known_effect_end_to_end() -> None:
    n = 2 * plan(0.67, 0.04).users_per_arm
    rows = simulate_outcomes(PVC, n, seed=5, spec=SimulationSpec(completion_effects={"personalized": 0.04}))
    report = analyze(rows, PVC, FAST)
    completion = report.result("completion", "personalized")
    assert completion.comparison.ci.contains(0.04) and completion.comparison.test == "chi-square"
    assert report.arm("personalized").users + report.arm("control").users == n
    assert report.bayes["personalized"].prob_beats_baseline > 0.9


# ----------------------------------------------------------------------------------------------- methods


def test_cuped_removes_the_covariates_share_of_variance_without_bias() -> None:
    rng = np.random.default_rng(1)
    estimates_raw, estimates_cuped, reductions = [], [], []
    for _ in range(40):
        x = rng.normal(100, 20, 4000)
        y = 0.8 * x + rng.normal(0, 12, 4000)  # corr(x, y) = 16 / 20 = 0.8
        y[2000:] += 1.0  # true effect
        result = stats.cuped_compare(y[:2000], x[:2000], y[2000:], x[2000:])
        raw = stats.compare_means(y[:2000], y[2000:], method="welch-t")
        estimates_raw.append(raw.diff)
        estimates_cuped.append(result.comparison.diff)
        reductions.append(result.variance_reduction)
        assert result.comparison.ci.high - result.comparison.ci.low < raw.ci.high - raw.ci.low
    assert np.mean(reductions) == pytest.approx(0.64, abs=0.03)  # corr^2
    assert np.mean(estimates_cuped) == pytest.approx(1.0, abs=0.15)
    assert np.std(estimates_cuped) < 0.7 * np.std(estimates_raw)


def test_sequential_intervals_cover_the_truth_under_continuous_peeking() -> None:
    """400 two-arm experiments, each looked at every 100 users up to 4,000 per arm: the always-valid interval
    misses the true difference at *some* look in at most ~alpha of the runs, while the fixed-n interval checked
    at every look misses far more often (why peeking needs sequential intervals)."""
    rng = np.random.default_rng(7)
    runs, n, step, p_b, p_t, alpha = 400, 4000, 100, 0.40, 0.43, 0.05
    looks = np.arange(step, n + 1, step)
    kb = np.cumsum(rng.random((runs, n)) < p_b, axis=1)[:, looks - 1]
    kt = np.cumsum(rng.random((runs, n)) < p_t, axis=1)[:, looks - 1]
    rb, rt = kb / looks, kt / looks
    var = rb * (1 - rb) / looks + rt * (1 - rt) / looks
    diff = rt - rb
    total = 2 * looks
    half = stats.normal_mixture_halfwidth(np.sqrt(total * var), np.broadcast_to(total, var.shape), alpha, 2 * n)
    sequential_miss = (np.abs(diff - (p_t - p_b)) > half).any(axis=1).mean()
    naive_miss = (np.abs(diff - (p_t - p_b)) > 1.96 * np.sqrt(var)).any(axis=1).mean()
    assert sequential_miss <= alpha + _binomial_tolerance(alpha, runs, 2.5)
    assert naive_miss > 3 * alpha
    # the scalar path agrees with the vectorized one
    one = stats.sequential_rate_diff(int(kb[0, -1]), n, int(kt[0, -1]), n, alpha, 2 * n)
    assert one.ci.high - one.ci.low == pytest.approx(2 * half[0, -1])
    assert (one.p_value < alpha) == (not one.ci.contains(0.0))


def test_bayesian_probability_to_beat_is_about_half_under_a_a() -> None:
    rng = np.random.default_rng(3)
    probs = [stats.beta_binomial(int(a), 3000, int(b), 3000, draws=10_000, seed=i).prob_beats_baseline
             for i, (a, b) in enumerate(zip(rng.binomial(3000, 0.4, 200), rng.binomial(3000, 0.4, 200)))]
    assert np.mean(probs) == pytest.approx(0.5, abs=0.06)  # uniform under H0: sd of the mean ~0.02
    same = stats.beta_binomial(1200, 3000, 1200, 3000, draws=50_000)
    assert same.prob_beats_baseline == pytest.approx(0.5, abs=0.01)
    assert same.expected_loss_treatment == pytest.approx(same.expected_loss_baseline, rel=0.1)
    better = stats.beta_binomial(1200, 3000, 1350, 3000, draws=50_000)
    assert better.prob_beats_baseline > 0.99 and better.expected_loss_treatment < 1e-4


def test_skewed_durations_use_mann_whitney_and_symmetric_ones_welch() -> None:
    rng = np.random.default_rng(2)
    assert stats.compare_means(rng.lognormal(3, 1, 500), rng.lognormal(3, 1, 500)).test == "mann-whitney"
    assert stats.compare_means(rng.normal(3, 1, 500), rng.normal(3, 1, 500)).test == "welch-t"


def test_holm_and_wilson_match_their_definitions() -> None:
    rejected, adjusted = stats.holm([0.01, 0.04, 0.03, float("nan")])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert rejected == [True, False, False, False]
    wilson = stats.wilson_interval(40, 100)
    assert (wilson.low, wilson.high) == pytest.approx((0.3094, 0.4980), abs=1e-4)


def test_plan_matches_the_textbook_number_and_refuses_nonsense() -> None:
    assert stats.sample_size_per_arm(0.4, 0.05) == 1534
    assert stats.power_at(1534, 0.4, 0.05) == pytest.approx(0.8, abs=0.002)
    assert plan(0.4, 0.05, arms=4).users_per_arm > plan(0.4, 0.05).users_per_arm  # Bonferroni over 3
    with pytest.raises(PlanError, match="--baseline-rate") as refused:
        plan(1.4, 0.05)
    assert "--mde" not in str(refused.value)  # a valid --mde is not blamed for the rate's mistake
    with pytest.raises(PlanError, match="--simulate"):
        plan(0.4, 0.05, simulate_runs=-3)


def test_multivariate_report_corrects_across_arms_with_holm() -> None:
    es = parse_experiments(textwrap.dedent('''
        version: "t"
        layers:
          - id: content
            experiments:
              - id: mv
                factors:
                  tone: [{level: formal}, {level: friendly, content_variant: friendly}]
                  layout: [{level: classic}, {level: compact, rules_version: r2}]
        '''))
    mv = es.experiment("mv")
    rows = simulate_outcomes(mv, 8000, seed=9, spec=SimulationSpec(
        completion_effects={"tone=friendly|layout=compact": 0.06}))
    report = analyze(rows, mv, FAST)
    primary = [r for r in report.results if r.family == "primary"]
    assert len(primary) == 3 and report.baseline == "tone=formal|layout=classic"
    p_raw = sorted(r.comparison.p_value for r in primary)
    assert min(r.p_adjusted for r in primary) == pytest.approx(min(1.0, 3 * p_raw[0]))
    assert report.result("completion", "tone=friendly|layout=compact").significant


# ----------------------------------------------------------------------------------------------- files


def test_report_files_text_and_json(tmp_path: Path) -> None:
    rows = simulate_outcomes(PVC, 3000, seed=1, spec=SimulationSpec(completion_effects={"personalized": 0.05}))
    report = analyze(rows, PVC, FAST)
    text = format_report(report)
    assert "personalized" in text and "control (baseline)" in text and "sample-ratio check" in text
    html_path = write_html(report, tmp_path / "out" / "r.html")
    page = html_path.read_text()
    assert page.count('<img alt="') == 2 and '<img alt="completion rate per arm" src="data:image/png;base64,' in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained
    png = write_png(report, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(json.dumps(report.to_dict()))["experiment_id"] == PVC.id
    assert render_html(report).startswith("<!DOCTYPE html>")


def test_outcome_rows_round_trip_through_json_lines(tmp_path: Path) -> None:
    rows = simulate_outcomes(PVC, 50, seed=4)
    path = tmp_path / "o.jsonl"
    assert write_outcomes_jsonl(path, rows) == 50
    assert read_outcomes_jsonl(path) == rows
    path.write_text(path.read_text() + '{"user_id": "x"}\n')
    with pytest.raises(OutcomeFileError, match=r"o.jsonl:51: missing field 'experiment_id'"):
        read_outcomes_jsonl(path)


def test_cli_report_from_an_outcomes_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.cli import main

    path = tmp_path / "o.jsonl"
    rows = simulate_outcomes(PVC, 1500, seed=8)
    extra = UserOutcome("other", "another-experiment", "x", 0, False, None, 0, 0.0, None, 0.0)
    write_outcomes_jsonl(path, [*rows, extra])
    html, png = tmp_path / "r.html", tmp_path / "r.png"
    assert main(["experiments", "report", PVC.id, "--outcomes", str(path), "--html", str(html), "--png", str(png),
                 "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"report: {html.resolve()}" in out and html.exists() and png.exists()
    assert "1,500 users exposed" in out
