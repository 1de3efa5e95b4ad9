"""`onramp experiments ...`: check experiment files, plan sample sizes, report results.

Registered in jobs/cli.py by :func:`add_experiments_commands`, in the style of the `rules` commands. Analysis
imports (scipy, statsmodels, matplotlib) happen inside the commands so the rest of the CLI stays quick.
"""

from __future__ import annotations

import argparse
import json
import time
import logging
from pathlib import Path
from typing import Any, Callable

from jobs.config import NO_EXPERIMENTS, ConfigError, OnrampConfig

log = logging.getLogger("onramp")


def _experiments_path(cfg: OnrampConfig, given: str | None) -> Path:
    path = given or cfg.experiments_file
    if path == NO_EXPERIMENTS:
        from udfs.experiment_arms.config import ExperimentConfigError

        raise ExperimentConfigError(["experiments_file is 'none': give the experiments file with --file"])
    return Path(path)


def _describe(experiments: Any, now_ms: int) -> list[str]:
    lines = []
    for layer in experiments.layers:
        lines.append(f"  layer {layer.id}")
        for exp_id in layer.experiments:
            exp = experiments.experiments[exp_id]
            state = "running" if exp.running(now_ms) else ("disabled" if not exp.enabled else "not running now")
            share = (exp.layer_range[1] - exp.layer_range[0]) / 100
            weights = exp.weight_share()
            arms = ", ".join(f"{a}{'*' if a == exp.baseline else ''} {w * 100:.0f}%" for a, w in weights.items())
            who = " and ".join(f"{k} in {sorted(v)}" for k, v in exp.eligible) or "everyone"
            lines.append(f"    {exp.id} ({state}; {share:g}% of the layer; {who}): {arms}")
    return lines


def cmd_experiments_lint(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    import time

    from udfs.experiment_arms import ExperimentConfigError, load_experiments

    paths = [Path(p) for p in args.files] or [_experiments_path(cfg, None)]
    failed = 0
    now_ms = time.time_ns() // 1_000_000
    for path in paths:
        try:
            experiments = load_experiments(path)
        except ExperimentConfigError as exc:
            failed += 1
            print("\n".join(exc.problems))
            continue
        print(f"{path}: ok (version {experiments.version}, {len(experiments.layers)} layer(s), "
              f"{len(experiments.experiments)} experiment(s); * = baseline)")
        print("\n".join(_describe(experiments, now_ms)))
    return 1 if failed else 0


def cmd_experiments_plan(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from experiments.plan import format_plan, plan

    result = plan(args.baseline_rate, args.mde, args.alpha, args.power, args.arms, simulate_runs=args.simulate,
                  seed=args.seed)
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_plan(result))
    return 0


def _parse_effects(items: list[str]) -> dict[str, float]:
    effects = {}
    for item in items:
        arm, sep, value = item.partition("=")
        try:
            effects[arm] = float(value)
        except ValueError:
            sep = ""
        if not sep or not arm:
            raise ConfigError(f"--effect expects ARM=CHANGE such as personalized=0.03, got {item!r}")
    return effects


def _outcomes_for(cfg: OnrampConfig, args: argparse.Namespace, experiment: Any) -> list[Any]:
    """The experiment's UserOutcome rows from the chosen source."""
    if args.outcomes:
        from experiments.records import read_outcomes_jsonl

        return read_outcomes_jsonl(args.outcomes)
    if args.from_outcomes_topic:
        from experiments.outcome_history import outcomes_from_outcomes_topic

        return [r for r in outcomes_from_outcomes_topic(cfg) if r.experiment_id == experiment.id]
    if args.from_topics:
        return [r for r in topic_outcomes(cfg, args.days) if r.experiment_id == experiment.id]
    from experiments.simulate import SimulationSpec, simulate_outcomes

    effects = _parse_effects(args.effect)
    unknown = set(effects) - {a.id for a in experiment.arms}
    if unknown:
        raise ConfigError(f"--effect names arm(s) {', '.join(sorted(unknown))} that {experiment.id} does not have; "
                         f"arms: {', '.join(a.id for a in experiment.arms)}")
    spec = SimulationSpec(completion_effects=effects)
    if args.baseline_rate is not None:
        spec = SimulationSpec(baseline_completion=args.baseline_rate, completion_effects=effects)
    log.info("simulating %d users of %s (seed %d, completion effects %s)", args.simulate, experiment.id, args.seed,
             effects or "none")
    return simulate_outcomes(experiment, args.simulate, args.seed, spec)


def topic_outcomes(cfg: OnrampConfig, days: float) -> list[Any]:
    """Outcome rows folded from the job's own input and decisions topics over the last ``days`` days, with users
    named by the pseudonym the job keys them by (the same ids the streaming outcomes job writes)."""
    from experiments.outcome_history import outcomes_from_topics
    from models.history import window_for
    from udfs.pseudonym import load_key

    from_ms, to_ms = window_for(days, int(time.time() * 1000))
    key = load_key(cfg.pseudonym_key_file)
    return outcomes_from_topics(cfg, cfg.input_topic, cfg.decisions_topic, from_ms, to_ms, user_key=key.user)


def cmd_experiments_outcomes(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    """Start the streaming outcomes job, or write the batch path's rows to a JSON lines file."""
    if args.submit:
        from jobs.experiment_outcomes import submit_outcomes_job

        job_id = submit_outcomes_job(cfg)
        log.info("outcomes job %s running: rows go to %s; report with `onramp experiments report ID "
                 "--from-outcomes-topic`", job_id, cfg.experiment_outcomes_topic)
        return 0
    from experiments.records import write_outcomes_jsonl

    rows = topic_outcomes(cfg, args.days)
    count = write_outcomes_jsonl(args.out, rows)
    log.info("wrote %d outcome rows to %s", count, args.out)
    return 0


def cmd_experiments_report(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from experiments.analysis import AnalysisConfig, analyze
    from experiments.report import format_report, write_html, write_png
    from udfs.experiment_arms import load_experiments

    experiment = load_experiments(_experiments_path(cfg, args.file)).experiment(args.experiment_id)
    outcomes = _outcomes_for(cfg, args, experiment)
    analysis_cfg = AnalysisConfig(alpha=args.alpha, seed=args.seed,
                                  **({"planned_users_per_arm": args.planned_users_per_arm}
                                     if args.planned_users_per_arm else {}))
    report = analyze(outcomes, experiment, analysis_cfg)
    reports_dir = Path(cfg.state_dir) / "reports"
    html_path = write_html(report, args.html or reports_dir / f"{experiment.id}.html")
    png_path = write_png(report, args.png or reports_dir / f"{experiment.id}.png")
    if args.json:
        print(json.dumps({**report.to_dict(), "html": str(html_path), "png": str(png_path)}, indent=2))
    else:
        print(format_report(report))
        print(f"\nreport: {html_path.resolve()}\nchart:  {png_path.resolve()}")
    return 1 if report.srm.flagged and args.fail_on_srm else 0


_EXPERIMENTS_HELP = """experiments: who gets which strategy, and which one wins (docs/experiments.md)

  onramp experiments lint [FILE...]             schema and meaning of experiment files, and what they define;
                                                exit 1 on errors (default FILE: the configured experiments_file)
  onramp experiments plan --baseline-rate 0.4 --mde 0.05 [--alpha 0.05 --power 0.8 --arms 2 --simulate 500]
                                                users per arm to detect an absolute change of completion
  onramp experiments report ID --outcomes F.jsonl   per-arm metrics, tests, SRM, Bayesian, CUPED, always-valid
  onramp experiments report ID --simulate 20000     intervals; writes an HTML report and a PNG chart
  onramp experiments report ID --from-topics        outcomes folded from the job's topics (or
  onramp experiments report ID --from-outcomes-topic  the streaming outcomes job's rows)
  onramp experiments outcomes --submit | --out F.jsonl   streaming outcomes job, or a batch export
                                                (--simulate: simulated users, --effect ARM=0.03 adds a true effect)

The job assigns users by the configured experiments_file and re-reads it every experiments_reload_interval_ms;
already-assigned users keep their arm.
"""


def add_experiments_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    group = sub.add_parser("experiments", help="lint experiment files, plan sample sizes, report results",
                           description=_EXPERIMENTS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = group.add_subparsers(dest="experiments_command", metavar="ACTION", required=True)
    p = add("lint", cmd_experiments_lint, "check experiment files; exit 1 on errors", under=actions)
    p.add_argument("files", nargs="*", metavar="FILE", help="experiment files (default: the configured experiments_file)")

    p = add("plan", cmd_experiments_plan, "users per arm needed to detect a change of the completion rate",
            under=actions)
    p.add_argument("--baseline-rate", type=float, required=True, help="completion rate of the baseline, e.g. 0.4")
    p.add_argument("--mde", type=float, required=True,
                   help="minimum detectable effect, absolute (0.05 = +5 percentage points)")
    p.add_argument("--alpha", type=float, default=0.05, help="false-positive rate, two-sided (default 0.05)")
    p.add_argument("--power", type=float, default=0.8, help="probability to detect the effect (default 0.8)")
    p.add_argument("--arms", type=int, default=2, help="arms including the baseline (default 2)")
    p.add_argument("--simulate", type=int, default=0, metavar="RUNS",
                   help="also check the power with this many simulated experiments")
    p.add_argument("--seed", type=int, default=0, help="simulation seed")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("outcomes", cmd_experiments_outcomes, "per-user outcomes: start the streaming job, or export the batch "
            "path's rows", under=actions)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--submit", action="store_true", help="submit the streaming outcomes job to the Flink cluster")
    mode.add_argument("--out", metavar="FILE.jsonl", help="fold the topics of the last --days days into this file")
    p.add_argument("--days", type=float, default=30.0, help="with --out: the window, in days (default 30)")

    p = add("report", cmd_experiments_report, "analyze an experiment: terminal table, HTML report, PNG chart",
            under=actions)
    p.add_argument("experiment_id", metavar="ID", help="experiment id from the experiments file")
    p.add_argument("--file", metavar="FILE", help="experiments file (default: the configured experiments_file)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--outcomes", metavar="FILE.jsonl", help="per-user outcome rows (UserOutcome) as JSON lines")
    source.add_argument("--simulate", type=int, metavar="N", help="simulate N users (experiments/simulate.py)")
    source.add_argument("--from-topics", action="store_true",
                        help="fold the input and decisions topics of the last --days days (batch path)")
    source.add_argument("--from-outcomes-topic", action="store_true",
                        help="the rows the streaming outcomes job keeps (`onramp experiments outcomes --submit`)")
    p.add_argument("--days", type=float, default=30.0, help="with --from-topics: the window, in days (default 30)")
    p.add_argument("--effect", action="append", default=[], metavar="ARM=CHANGE",
                   help="with --simulate: true absolute change of completion for an arm (repeatable)")
    p.add_argument("--baseline-rate", type=float, help="with --simulate: completion rate without effect (default 0.67)")
    p.add_argument("--seed", type=int, default=0, help="simulation and Bayesian sampling seed")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    p.add_argument("--planned-users-per-arm", type=int,
                   help="tunes the always-valid intervals (use the number from `experiments plan`; default 5000)")
    p.add_argument("--html", metavar="PATH", help="HTML report file (default <state_dir>/reports/ID.html)")
    p.add_argument("--png", metavar="PATH", help="PNG of the main chart (default <state_dir>/reports/ID.png)")
    p.add_argument("--fail-on-srm", action="store_true", help="exit 1 when the sample-ratio check flags the split")
    p.add_argument("--json", action="store_true", help="print the report as JSON (files are still written)")
