"""`onramp`: one entry point for the whole lifecycle.

    onramp provision          fetch the pinned jars (Kafka, the Flink connector) and build Onramp's SQL function
    onramp up                 start local Kafka (KRaft) + a standalone Flink cluster (fetches jars first)
    onramp train              train personas + churn model on generated history, publish an ONNX bundle
    onramp models ...         list / show / promote / rollback the published model bundles
    onramp rules ...          lint / diff / backtest / preview / publish the decision rule sets
    onramp submit             submit the personalize job (`flink run -py jobs/personalize.py`)
    onramp stop [--savepoint] stop it (with a savepoint to `submit --from-savepoint` a new version from)
    onramp produce            send generated onboarding events to the input topic at a given rate
    onramp consume            print decisions (or --dead-letters) as JSON lines
    onramp demo               all of the above in one go, with a readable summary
    onramp status             the job: state, uptime, checkpoints, restarts, throughput, lag, versions
    onramp down               stop what `up` started
    onramp bench [--quick]    throughput + latency on the real services vs a bare PyFlink baseline (--json)
    onramp experiments ...    lint experiment files, plan sample sizes, report which strategy wins
    onramp privacy ...        pseudonym keys, a user's audit trail, state checks for data-subject requests

Need running services: submit, stop and status (Kafka + Flink; `onramp up` starts local ones, demo and bench
start them themselves); produce, consume, privacy check/audit, rules backtest on a topic, train --from-topic
(Kafka only). The rest work offline.

Every command reads one typed config (jobs/config.py): defaults, then ONRAMP_* environment variables, then the
flags below (`--set key=value` for any setting, e.g. `--set kafka_security_protocol=SSL`; `--set
kafka.<client option>=...` / `--set flink.<option>=...` pass other Kafka client and Flink options through).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from jobs.config import REPO_ROOT, SECRET_FIELDS, ConfigError, OnrampConfig, load_config, misspelled_env_vars
from jobs.experiments_cli import add_experiments_commands
from jobs.privacy_cli import add_privacy_commands

RULES_TEMPLATES_DIR = REPO_ROOT / "rules" / "templates"

log = logging.getLogger("onramp")

_CONFIG_FLAGS: list[tuple[str, str]] = [
    ("--bootstrap-servers", "Kafka bootstrap servers (default localhost:9092, the local broker)"),
    ("--flink-rest-url", "Flink REST endpoint (default http://localhost:8081, the local cluster)"),
    ("--input-topic", "topic of onboarding events"),
    ("--decisions-topic", "topic the decisions go to"),
    ("--dead-letter-topic", "topic rejected records go to, with the reason"),
    ("--parallelism", "job parallelism"),
    ("--delivery", "at-least-once (lowest latency) or exactly-once (decisions visible at checkpoints)"),
    ("--checkpoint-interval-ms", "checkpoint interval"),
    ("--state-dir", "where local services keep data, logs and pid files (default .onramp/)"),
    ("--model-dir", "model registry directory (default .onramp/models)"),
]


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (also ONRAMP_<NAME> env vars)")
    for flag, help_text in _CONFIG_FLAGS:
        group.add_argument(flag, help=help_text)
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any setting by name, or kafka.<option> / flink.<option> pass-through (repeatable)")


def config_from_args(args: argparse.Namespace) -> OnrampConfig:
    overrides: dict[str, Any] = {}
    for flag, _ in _CONFIG_FLAGS:
        name = flag.lstrip("-").replace("-", "_")
        overrides[name] = getattr(args, name, None)
    extra: dict[str, str] = {}
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if key.replace("-", "_") in SECRET_FIELDS:
            raise ConfigError(f"{key} must not be given on the command line (other users see it in `ps`); set "
                              f"ONRAMP_{key.replace('-', '_').upper()} or {key.replace('-', '_')}_file instead")
        if key.startswith(("kafka.", "flink.")):
            extra[key] = value
        else:
            overrides[key.replace("-", "_")] = value
    cfg = load_config(overrides)
    if extra:
        cfg = load_config({"extra": {**cfg.extra, **extra}}, base=cfg, environ={})
    return cfg


# --- commands -------------------------------------------------------------------------------------------------


def cmd_provision(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs.provision import provision

    result = provision(cfg, force=args.force)
    print(json.dumps({
        "jars_dir": str(result.jars_dir),
        "flink_job_jars": [str(p) for p in result.flink_jars],
        "kafka_classpath": result.kafka_classpath,
        "kafka_jars": len(result.kafka_jars),
        "ran_maven": result.ran_maven,
        "seconds": round(result.seconds, 1),
    }, indent=2))
    return 0


def cmd_up(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs import services
    from jobs.kafka_admin import ensure_topics
    from jobs.provision import provision

    provision(cfg)
    state = services.up(cfg, kafka=not args.flink_only, flink=not args.kafka_only)
    if not args.flink_only:
        ensure_topics(cfg, cfg.job_topics())
    print(json.dumps(state, indent=2, default=str))
    return 0


def cmd_down(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs import services

    print(json.dumps(services.down(cfg), indent=2, default=str))
    return 0


def cmd_status(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    """Local services (what `up` started), then the job: state, uptime, checkpoints, restarts, throughput, lag
    per input partition and versions (jobs/job_status.py). Works against any cluster (--flink-rest-url)."""
    from jobs import job_status, services
    from jobs.personalize import JOB_NAME

    report = job_status.collect(cfg, job_name=JOB_NAME, job_id=args.job_id)
    report.services = services.status(cfg)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        print(job_status.format_status(report))
    return 0


def _training_history(cfg: OnrampConfig, args: argparse.Namespace) -> Any:
    """The history ``train`` reads (None: the synthetic generator): Avro files, or a topic's time range."""
    import time

    from models import history

    given = [flag for flag, value in (("--days", args.days), ("--from-ms", args.from_ms), ("--to-ms", args.to_ms))
             if value is not None]
    if given and not args.from_topic:  # else they would be ignored and a model trained on other data
        verb = "applies" if len(given) == 1 else "apply"
        raise ConfigError(f"{', '.join(given)} {verb} only with --from-topic TOPIC (the window of that topic to train "
                          f"on); without it train reads --from-avro files or generates synthetic history")
    if args.from_avro:
        batch = history.read_avro_files([Path(p) for p in args.from_avro])
    elif args.from_topic:
        from jobs.kafka_admin import require_broker

        require_broker(cfg)
        from_ms, to_ms = args.from_ms, args.to_ms
        if args.days is not None:
            from_ms, to_ms = history.window_for(args.days, time.time_ns() // 1_000_000)
        batch = history.read_kafka_topic(cfg, args.from_topic, from_ms, to_ms, timeout_s=args.read_timeout)
    else:
        return None
    log.info("training history: %d valid events, skipped %s, window %s", len(batch.events),
             batch.skipped or "none", batch.data_window)
    return batch


def cmd_train(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from models.training import train_and_publish

    # One flag for "do it anyway": with the same data nothing is retrained (so the gate never runs); with other
    # data retraining happens regardless, so --force only changes something by overriding the gate.
    history = _training_history(cfg, args)
    if history is not None and not history.events:
        log.error("no valid events to train on in %s (skipped: %s)", history.source, history.skipped or "none")
        return 1
    manifest = train_and_publish(cfg, n_users=args.users, seed=args.seed, force=args.force, allow_worse=args.force,
                                 events=history.events if history else None,
                                 source=history.summary() if history else None)
    shown = {k: manifest[k] for k in ("version", "metrics", "quality_gate") if k in manifest}
    print(json.dumps(shown, indent=2, default=str))
    return 0


def _warn_if_taskmanager_has_older_code(cfg: OnrampConfig) -> None:
    """Thread mode keeps the Python modules a TaskManager imported first; edits made since it started would be
    silently ignored by the job, so say so."""
    from jobs import services
    from jobs.config import REPO_ROOT

    started = services.taskmanager_started_at(cfg)
    if started is None:
        return
    newer = [p for d in ("udfs", "models") for p in (REPO_ROOT / d).glob("*.py") if p.stat().st_mtime > started]
    if newer:
        log.warning(
            "%d Onramp source file(s) changed since the local TaskManager started (e.g. %s); in thread mode it keeps "
            "the modules it loaded first, so restart it (`onramp down && onramp up`) for the job to run the new code",
            len(newer), newer[0].relative_to(REPO_ROOT),
        )


def submit_job(cfg: OnrampConfig, *, replace: bool = True, job_args: list[str] | None = None,
               from_savepoint: str | None = None, allow_non_restored_state: bool = False,
               project_root: Path = REPO_ROOT) -> str:
    """Provision, check the model, cancel an older Onramp job, submit, wait until it runs; returns the job id.

    ``from_savepoint``: a savepoint or retained checkpoint path to start from (state and source offsets), or
    ``"latest"`` for the newest retained checkpoint under ``cfg.checkpoint_dir``. ``project_root``: submit the
    code of another checkout (a new version of the job; default: this one)."""
    from jobs import flink_jobs, services
    from jobs.kafka_admin import ensure_topics, wait_for_broker
    from jobs.personalize import JOB_NAME
    from jobs.provision import flink_job_jars, provision
    from udfs.model_bundle import load_current

    provision(cfg)
    flink_jobs.check_pseudonym_key(cfg)
    _warn_if_taskmanager_has_older_code(cfg)
    bundle = load_current(cfg.model_dir)  # fails here, clearly, rather than inside a TaskManager
    log.info("model bundle %s", bundle.version)
    # BrokerUnavailable, clearly, not a client stack; over the configured TLS/SASL like every other client
    wait_for_broker(cfg.bootstrap_servers, cfg.broker_wait_s, cfg)
    ensure_topics(cfg, cfg.job_topics())
    if replace:
        flink_jobs.cancel_all(cfg, JOB_NAME)
    if from_savepoint == "latest":  # after the cancel: a cancelled job's last checkpoint is retained
        from_savepoint = str(flink_jobs.latest_checkpoint(cfg))
    if from_savepoint:
        log.info("starting from %s", from_savepoint)
    job_id = flink_jobs.submit(
        cfg,
        flink_bin=services.flink_bin(cfg),
        env=services.flink_env(cfg),
        jars=flink_job_jars(cfg),
        job_args=job_args,
        from_savepoint=from_savepoint,
        allow_non_restored_state=allow_non_restored_state,
        project_root=project_root,
    )
    flink_jobs.wait_running(cfg, job_id)
    log.info("job %s running; Flink UI: %s/#/job/running/%s/overview", job_id, cfg.flink_rest_url, job_id)
    return job_id


def cmd_submit(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    job_id = submit_job(cfg, replace=not args.keep_running, from_savepoint=args.from_savepoint or args.from_checkpoint,
                        allow_non_restored_state=args.allow_non_restored_state)
    print(job_id)
    return 0


def cmd_stop(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    """Stop the running Onramp job: with a savepoint (printed) to resume from, or cancel it (its last checkpoint
    is retained)."""
    from jobs import flink_jobs
    from jobs.personalize import JOB_NAME

    jobs = flink_jobs.running_jobs(cfg, JOB_NAME)
    if not jobs:
        raise flink_jobs.FlinkJobError(f"no running {JOB_NAME} job at {cfg.flink_rest_url}")
    for job in jobs:
        if args.savepoint is not None:
            print(flink_jobs.stop_with_savepoint(cfg, job["jid"], args.savepoint or None))
        else:
            flink_jobs.cancel(cfg, job["jid"])
            print(job["jid"])
    return 0


def cmd_produce(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs.event_stream import generated_records, malformed_records
    from jobs.kafka_admin import require_broker
    from jobs.kafka_io import make_producer, produce

    require_broker(cfg)
    producer = make_producer(cfg)
    records = generated_records(n_users=args.users, seed=args.seed, max_events=args.max_events)
    report = produce(
        producer, cfg.input_topic, records, rate=args.rate,
        on_progress=lambda n, s: log.info("produced %d events (%.0f/s)", n, n / s),
    )
    bad = produce(producer, cfg.input_topic, malformed_records(args.malformed)) if args.malformed else None
    producer.close()
    log.info("produced %d events in %.1fs (%.0f/s) to %s", report.sent, report.seconds, report.rate, cfg.input_topic)
    print(json.dumps({"events": report.sent, "malformed": bad.sent if bad else 0, "seconds": round(report.seconds, 2)}))
    return 0


def cmd_consume(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs.kafka_admin import require_broker
    from jobs.kafka_io import end_offsets, read_records
    from udfs.avro_codec import dead_letter_codec, decision_codec

    require_broker(cfg)
    topic = cfg.dead_letter_topic if args.dead_letters else cfg.decisions_topic
    codec = dead_letter_codec() if args.dead_letters else decision_codec()
    start = end_offsets(cfg, topic) if args.follow else None
    for record in read_records(cfg, topic, start_offsets=start, max_records=args.max, timeout_s=args.timeout,
                               idle_timeout_s=None if args.follow else 3.0):
        value = codec.decode(record.value)
        if "original" in value:
            value["original"] = value["original"][:64].hex()
        print(json.dumps(value, default=str), flush=True)
    return 0


def cmd_demo(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    return run_demo(cfg, users=args.users, rate=args.rate, malformed=args.malformed)


def cmd_bench(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    import dataclasses

    from jobs.bench import FULL, QUICK, run_bench, summary_table

    sizes = QUICK if args.quick else FULL
    changes = {k: v for k, v in (("rate", args.rate), ("duration_s", args.duration), ("backlog", args.backlog),
                                 ("stage_events", args.stage_events), ("warmup_s", args.warmup)) if v is not None}
    sizes = dataclasses.replace(sizes, **changes)
    result = run_bench(cfg, sizes, stages_only=args.stages_only)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        print(summary_table(result), file=sys.stderr)
    else:
        print(summary_table(result))
    return 0 if result.get("counts_ok", True) else 1


# --- models (the registry) ------------------------------------------------------------------------------------


def _num(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _utc_day(ms: int | None) -> str:
    from datetime import datetime, timezone

    return "?" if ms is None else f"{datetime.fromtimestamp(ms / 1000, timezone.utc):%Y-%m-%d}"


def _window(data_window: dict[str, int] | None) -> str:
    if not data_window:
        return "-"
    return f"{_utc_day(data_window.get('from_ms'))}..{_utc_day(data_window.get('to_ms'))}"


def _created(created_at: str | None) -> str:
    return "-" if not created_at else created_at.replace("T", " ").removesuffix("+00:00")


def _gate_word(passed: bool | None) -> str:
    """The gate's verdict on a published bundle: a failed gate on a published bundle means --force overrode it."""
    return {None: "-", True: "passed", False: "overridden"}.get(passed, "?")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [header, *rows]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def cmd_models_list(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from models.registry import describe_versions

    versions = describe_versions(cfg.model_dir)
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=2))
        return 0
    if not versions:
        where = "" if Path(cfg.model_dir).is_dir() else " (the directory does not exist: check --model-dir)"
        log.info("no model bundles in %s%s; `onramp train` publishes one", cfg.model_dir, where)
        return 0
    header = ["", "VERSION", "CREATED (UTC)", "PARENT", "DATA (UTC)", "K", "SILHOUETTE", "ARI", "CHURN AUC", "LOG-LOSS",
              "GATE"]
    rows = [
        ["*" if v.is_current else "", v.version, _created(v.created_at), v.parent_version or "-",
         _window(v.data_window), _num(v.k, "d"), _num(v.silhouette), _num(v.ari_vs_personas), _num(v.churn_auc),
         _num(v.churn_log_loss),
         _gate_word(v.quality_gate_passed) + (f"  !! {v.problem}" if v.problem else "")]
        for v in versions
    ]
    print(_table(header, rows))
    return 0


def _describe_check(check: dict[str, Any]) -> str:
    from models.quality_gate import GateCheck

    try:
        return GateCheck(**check).describe()
    except (TypeError, ValueError):  # written by another version of the gate: show it as it is
        return json.dumps(check)


def _render_manifest(manifest: dict[str, Any], current: str | None) -> str:
    """The parts of a manifest a person reads: identity, lineage, data, quality, segments (--json has it all)."""
    metrics = manifest.get("metrics") or {}
    seg, churn = metrics.get("segmentation") or {}, metrics.get("churn") or {}
    source = (manifest.get("training") or {}).get("source") or {}
    version = manifest.get("version", "?")
    lines = [
        f"version        {version}{'  (current)' if version == current else ''}",
        f"created        {_created(manifest.get('created_at'))} UTC",
        f"parent         {manifest.get('parent_version') or '-'}",
        f"data window    {_window(manifest.get('data_window'))} UTC, {metrics.get('events', '?')} events of "
        f"{metrics.get('users', '?')} users",
        f"trained on     {', '.join(f'{k}={v}' for k, v in source.items()) or '-'}",
        f"sha256         {manifest.get('sha256', '-')}",
        f"segmentation   k={_num(seg.get('k'), 'd')}  silhouette={_num(seg.get('silhouette'))}  "
        f"ARI vs personas={_num(seg.get('ari_vs_personas'))}",
        f"churn          {churn.get('model') or manifest.get('churn_model') or '-'}  AUC={_num(churn.get('auc'))}  "
        f"log-loss={_num(churn.get('log_loss'))}  Brier={_num(churn.get('brier'))}  "
        f"holdout rows={churn.get('holdout_rows', '-')}",
    ]
    gate = manifest.get("quality_gate")
    if isinstance(gate, dict):
        verdict = _gate_word(gate.get("passed")) + (f" vs {gate['compared_with']}" if gate.get("compared_with") else
                                                   " (nothing to compare with)")
        lines.append(f"quality gate   {verdict}")
        lines += [f"  {_describe_check(check)}" for check in gate.get("checks", [])]
    segments = manifest.get("segments") or []
    if segments:
        lines.append("segments")
        for s in segments:
            churn_rate = s.get("churn_rate")
            lines.append(f"  {s.get('id')}  {s.get('name')}  ({s.get('size', '?')} users"
                         + (f", churn {churn_rate:.0%}" if churn_rate is not None else "") + ")")
            lines.append(f"     {s.get('description', '')}")
    return "\n".join(lines)


def cmd_models_show(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from models import registry

    manifest = registry.manifest_of(cfg.model_dir, args.version)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(_render_manifest(manifest, registry.current_version(cfg.model_dir)))
    return 0


def _switch(cfg: OnrampConfig, args: argparse.Namespace, version: str) -> int:
    """Make ``version`` current once it loads like the job would load it (sha256, feature list, half-life): a
    running job refuses a bundle it cannot load, and CURRENT would then name a bundle nothing runs."""
    from models import registry
    from udfs.model_bundle import ModelBundle

    ModelBundle.load(registry.require_version(cfg.model_dir, version), half_life_hours=cfg.interest_half_life_hours)
    previous = registry.current_version(cfg.model_dir)
    registry.set_current(cfg.model_dir, version)
    if args.json:
        print(json.dumps({"current": version, "previous": previous}))
    else:
        print(version)
    interval = cfg.model_reload_interval_ms
    log.info("CURRENT in %s: %s -> %s; %s", cfg.model_dir, previous or "-", version,
             f"a running job switches within ~{interval} ms if its TaskManagers can read this directory, otherwise "
             "at the next `onramp submit`" if interval else "a running job switches at the next `onramp submit`")
    return 0


def cmd_models_promote(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    return _switch(cfg, args, args.version)


def cmd_models_rollback(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from models import registry

    return _switch(cfg, args, registry.rollback_target(cfg.model_dir, args.to))


# --- parser ---------------------------------------------------------------------------------------------------


def _train_help() -> str:
    from models.quality_gate import GateTolerance

    tol = GateTolerance()
    limits = (f"churn AUC -{tol.churn_auc_drop:g}, churn log-loss +{tol.churn_log_loss_rise:g}, "
              f"segmentation silhouette -{tol.silhouette_drop:g}")
    return f"""train K-means personas + churn model and publish an ONNX bundle (it becomes the current one)

Quality gate: the new bundle is published only if its holdout metrics are not worse than the current
bundle's by more than: {limits}
(a metric missing on either side is skipped). Otherwise nothing is published and the command fails naming
the metric; --force publishes anyway. The verdict is kept in the manifest (`onramp models show`);
`onramp models rollback` undoes a publish.

History: the synthetic generator by default (--users, --seed), or real events:
  onramp train --from-avro exports/2026-11/            Avro container files of OnboardingEvents
  onramp train --from-topic onboarding-events --days 30   the topic's last 30 days, by record timestamp
Invalid records are skipped and counted by reason (the same validation as the stream). Churn labels: no
onboarding_completed within churn_horizon_hours (default 96) of signup. Segment ids are matched to the current
bundle's centroids, so a segment keeps its id (and rules on it their meaning) across retrains.

Scheduled retraining: run the topic form from cron or an orchestrator, e.g. nightly on a 30-day window:
  15 2 * * *  cd /opt/onramp && .venv/bin/onramp train --from-topic onboarding-events --days 30
A worse model fails the run (exit 1) and changes nothing; a running job picks up a published one by itself.
"""

_MODELS_HELP = """manage the model registry: one directory per published bundle under --model-dir, and a CURRENT
file naming the bundle `onramp submit` ships with the job

  onramp models list                  every published version, oldest first; * marks the current one
  onramp models show [VERSION]        a bundle's manifest (default: the current one); --json for all of it
  onramp models promote VERSION       make an already published version current
  onramp models rollback [--to V]     make the current bundle's parent (the bundle it replaced) current again

`onramp train` publishes a new version and makes it current, unless the quality gate finds it worse than the
current one (see `onramp train --help`). promote and rollback first check that the bundle loads as the job
would load it. A running job follows CURRENT (every model_reload_interval_ms) when its TaskManagers can read
--model-dir; otherwise it switches at the next `onramp submit`.
"""


def _add_models_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """`onramp models <action>`; the configuration flags go on each action (`onramp models list --model-dir X`)."""
    group = sub.add_parser("models", help="list, show, promote or roll back published model bundles",
                           description=_MODELS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = group.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    json_help = "machine-readable output"
    p = add("list", cmd_models_list, "every published version, oldest first, with the current one marked (*)",
            description="every published version, oldest first (* marks the current one): created time,\n"
                        "parent version (the bundle it replaced), data window, k, silhouette, ARI vs the\n"
                        "generator's personas, churn AUC and log-loss on the holdout, and the quality gate's\n"
                        "verdict (passed, overridden with `train --force`, or - for bundles published before it)",
            under=actions)
    p.add_argument("--json", action="store_true", help=json_help + " (one object per version)")
    p = add("show", cmd_models_show, "a bundle's manifest, readable (default: the current bundle)", under=actions)
    p.add_argument("version", nargs="?", metavar="VERSION", help="version to show (default: the current one)")
    p.add_argument("--json", action="store_true", help="the whole manifest as stored (calibration, timings, ...)")
    p = add("promote", cmd_models_promote, "make an already published version current",
            description="make an already published version current (`onramp models list` shows them), after\n"
                        "checking it loads as the job would load it (sha256, feature list, interest half-life)",
            under=actions)
    p.add_argument("version", metavar="VERSION", help="a published version, e.g. m-20261129-224512-1a2b3c4d")
    p.add_argument("--json", action="store_true", help=json_help)
    p = add("rollback", cmd_models_rollback, "make the bundle the current one replaced current again",
            description="make the current bundle's parent_version (the bundle that was current when it was\n"
                        "published) current again; repeat to walk further back along the parents, or pick any\n"
                        "published version with --to. The target is checked to load as the job would load it",
            under=actions)
    p.add_argument("--to", metavar="VERSION", help="roll back to this published version instead of the parent")
    p.add_argument("--json", action="store_true", help=json_help)


# --- rules ---------------------------------------------------------------------------------------------------------


def _lint(path: Path) -> list[Any]:
    """Every finding for a rule set file: schema and fields (parse + compile), then meaning (lint), then the
    content templates its outcomes use."""
    from udfs.rules.compiler import compile_ruleset
    from udfs.rules.lint import LintFinding, semantic_findings, template_findings
    from udfs.rules.model import RuleSetError, parse_ruleset, read_rule_text

    try:
        text = read_rule_text(path)
        compiled = compile_ruleset(parse_ruleset(text, str(path)))
    except RuleSetError as exc:
        return [LintFinding(f.file, f.line, "error", f.code, f.message) for f in exc.findings]
    return semantic_findings(text, str(path)) + template_findings(compiled, str(path))


def cmd_rules_lint(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.files] or [Path(cfg.rules_file)]
    errors = 0
    for path in paths:
        findings = _lint(path)
        errors += sum(f.severity == "error" for f in findings)
        for finding in findings:
            print(finding)
        if not findings:
            print(f"{path}: ok")
    return 1 if errors else 0


def cmd_rules_diff(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs.rules_tools import diff_files

    result = diff_files(Path(args.old), Path(args.new))
    print(json.dumps(result.__dict__, indent=2) if args.json else "\n".join(result.lines()))
    return 0


def cmd_rules_backtest(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs.rules_tools import backtest, format_backtest
    from models import history
    from udfs.model_bundle import load_current
    from udfs.rules.compiler import compile_rules_text
    from udfs.rules.model import read_rule_text

    old_path = Path(args.against or cfg.rules_file)
    old = compile_rules_text(read_rule_text(old_path), str(old_path))
    new = compile_rules_text(read_rule_text(args.rules), args.rules)
    sources = args.events or [cfg.input_topic]
    if all(Path(p).exists() for p in sources):
        batch = history.read_avro_files([Path(p) for p in sources])
    elif len(sources) == 1:  # a topic: its last --days days
        import time

        from jobs.kafka_admin import BrokerUnavailable, require_broker

        try:
            require_broker(cfg)
        except BrokerUnavailable as exc:  # a mistyped file name would otherwise read as a topic name
            raise BrokerUnavailable(f"--events {sources[0]!r} is neither a file nor a directory, so it was read as a "
                                    f"topic name, and {exc}") from None
        window = history.window_for(args.days, time.time_ns() // 1_000_000)
        batch = history.read_kafka_topic(cfg, sources[0], *window, timeout_s=300.0)
    else:
        missing = [p for p in sources if not Path(p).exists()]
        raise FileNotFoundError(f"--events: no such file(s) {missing}; give Avro files, or one topic name")
    scorer = load_current(cfg.model_dir, half_life_hours=cfg.interest_half_life_hours)
    result = backtest(batch.events, old, new, scorer, cfg.interest_half_life_hours * 3_600_000.0)
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_backtest(result))
    return 0


def cmd_rules_preview(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs.content_preview import format_preview, preview
    from udfs.model_bundle import load_current
    from udfs.rules.compiler import compile_rules_text
    from udfs.rules.model import read_rule_text

    rules = None if cfg.rules_file == "builtin" else compile_rules_text(read_rule_text(cfg.rules_file), cfg.rules_file)
    try:
        bundle = load_current(cfg.model_dir, half_life_hours=cfg.interest_half_life_hours)
    except Exception as exc:  # preview still works without a model: the default flow
        log.warning("no model bundle (%s): previewing the non-personalized flow", exc)
        bundle = None
    result = preview(Path(args.user_profile), RULES_TEMPLATES_DIR, bundle=bundle, rules=rules,
                     half_life_ms=cfg.interest_half_life_hours * 3_600_000.0)
    print(json.dumps(result, indent=2, default=str) if args.json else format_preview(result))
    return 0


def cmd_rules_publish(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    """Lint, then replace the rules file the job follows, atomically (the running job picks it up)."""
    import os
    import tempfile

    source = Path(args.file)
    findings = _lint(source)
    for finding in findings:
        print(finding)
    if any(f.severity == "error" for f in findings):
        log.error("not published: %s has errors (above)", source)
        return 1
    target = Path(cfg.rules_file)
    if target.resolve() == source.resolve():
        log.info("%s is already the rules file the job follows", target)
        return 0
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w") as out:
        out.write(source.read_text())
    os.replace(tmp, target)
    log.info("published %s as %s; a running job switches within rules_reload_interval_ms (%d ms)",
             source, target, cfg.rules_reload_interval_ms)
    return 0


_RULES_HELP = """decision rules: YAML rule sets (rules/ruleset.schema.json; example: rules/onboarding.yaml)

  onramp rules lint [FILE...]                  schema, fields, types, unreachable rules, ties, missing default,
                                               templates; exit 1 on errors (default FILE: the configured rules_file)
  onramp rules diff OLD NEW                    what changed, rule by rule, with NEW's version and changelog entry
  onramp rules backtest NEW --events F...      replay history through the current and NEW rule sets: how many
  onramp rules backtest NEW --events TOPIC     users and decisions would change, by segment (files, or a
                                               topic's last --days days, default 7)
  onramp rules preview --user-profile F.json   what one user would see: step, variant, rendered content
  onramp rules publish FILE                    lint, then replace the rules file the running job follows

The job ships the rule set it is submitted with and re-reads rules_file every rules_reload_interval_ms; a file
with errors is refused (logged, counted in rules_reload_refusals) and the job keeps its rule set.
"""


def _add_rules_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    group = sub.add_parser("rules", help="lint, diff, backtest, preview or publish decision rule sets",
                           description=_RULES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = group.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    p = add("lint", cmd_rules_lint, "check rule set files; exit 1 on errors", under=actions)
    p.add_argument("files", nargs="*", metavar="FILE", help="rule set files (default: the configured rules_file)")
    p = add("diff", cmd_rules_diff, "what changed between two rule set files", under=actions)
    p.add_argument("old", metavar="OLD", help="the rule set file before (e.g. the configured rules_file)")
    p.add_argument("new", metavar="NEW", help="the rule set file after")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("backtest", cmd_rules_backtest, "replay history through two rule sets and count what would change",
            under=actions)
    p.add_argument("rules", metavar="NEW", help="the candidate rule set")
    p.add_argument("--against", metavar="OLD", help="the rule set to compare with (default: the configured rules_file)")
    p.add_argument("--events", nargs="+", metavar="FILE|TOPIC",
                   help="Avro container files (or directories) of events, or one topic name (default: input_topic)")
    p.add_argument("--days", type=float, default=7.0, help="with a topic: its last N days (default 7)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("preview", cmd_rules_preview, "render what one user would see next", under=actions)
    p.add_argument("--user-profile", required=True, metavar="FILE",
                   help="JSON: a list of one user's events, or a decision-like {step_id, content_variant, template_vars}")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("publish", cmd_rules_publish, "lint, then replace the rules file the running job follows", under=actions)
    p.add_argument("file", metavar="FILE", help="the rule set to publish; it replaces the configured rules_file "
                                                 "(default rules/onboarding.yaml), which a running job re-reads every "
                                                 "rules_reload_interval_ms; no job needs to run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onramp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[OnrampConfig, argparse.Namespace], int], help_text: str, *,
            description: str | None = None, under: Any = sub) -> argparse.ArgumentParser:
        p = under.add_parser(name, help=help_text, description=description or help_text,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_flags(p)
        # Also after the command (`onramp rules lint -v F`); SUPPRESS keeps a -v given before it when absent here.
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging, and the full trace of an error")
        p.set_defaults(func=func)
        return p

    p = add("provision", cmd_provision, "fetch the Kafka broker and Flink connector jars and build Onramp's SQL "
                                         "function (pinned Maven pom) into .cache/jars")
    p.add_argument("--force", action="store_true", help="fetch and build again even if the jars are there (e.g. "
                                                        "after a damaged download)")
    p = add("up", cmd_up, "start local Kafka + Flink (idempotent; waits until healthy)")
    p.add_argument("--kafka-only", action="store_true", help="start only the Kafka broker")
    p.add_argument("--flink-only", action="store_true", help="start only the Flink cluster")
    add("down", cmd_down, "stop the local services that `up` started (and nothing else)")
    p = add("status", cmd_status, "the job's state, uptime, checkpoints, restarts, throughput, lag and versions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--job-id", help="report this job (default: the running Onramp job, else its latest run)")
    p = add("train", cmd_train, "train K-means personas + churn model and publish an ONNX bundle",
            description=_train_help())
    p.add_argument("--users", type=int, default=2000, help="generated users to train on (default 2000)")
    p.add_argument("--seed", type=int, default=7, help="generator seed (also seeds the model fits)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--from-avro", nargs="+", metavar="PATH",
                        help="train on Avro container files of OnboardingEvents (directories: their *.avro files)")
    source.add_argument("--from-topic", metavar="TOPIC",
                        help="train on a Kafka topic of OnboardingEvents, by record timestamp (see --days)")
    p.add_argument("--days", type=float, help="with --from-topic: the last N days (a rolling window, for cron)")
    p.add_argument("--from-ms", type=int, help="with --from-topic: window start, epoch ms (inclusive)")
    p.add_argument("--to-ms", type=int, help="with --from-topic: window end, epoch ms (exclusive)")
    p.add_argument("--read-timeout", type=float, default=300.0, help="with --from-topic: seconds to read the window")
    p.add_argument("--force", action="store_true",
                   help="retrain even if the current bundle was trained on the same data and settings, and publish "
                        "even if the quality gate finds the new model worse than the current one")
    _add_models_commands(sub, add)
    _add_rules_commands(sub, add)
    add_privacy_commands(sub, add)
    add_experiments_commands(sub, add)
    p = add("submit", cmd_submit, "submit the personalize job to the Flink cluster (replaces a running one)")
    p.add_argument("--keep-running", action="store_true", help="do not cancel an already running Onramp job")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--from-savepoint", metavar="PATH", help="start from a savepoint (`onramp stop --savepoint`): "
                       "profiles and input offsets carry over")
    start.add_argument("--from-checkpoint", metavar="PATH|latest",
                       help="start from a retained checkpoint; 'latest': the newest under checkpoint_dir")
    p.add_argument("--allow-non-restored-state", action="store_true",
                   help="start even if some state in the savepoint belongs to no operator of this job version")
    p = add("stop", cmd_stop, "stop the running Onramp job, with --savepoint to resume it later")
    p.add_argument("--savepoint", nargs="?", const="", default=None, metavar="DIR",
                   help="stop with a savepoint in DIR (default: savepoint_dir, <state_dir>/savepoints); prints its path")
    p = add("produce", cmd_produce, "send generated onboarding events to the input topic")
    p.add_argument("--users", type=int, default=100, help="generated users (default 100)")
    p.add_argument("--rate", type=float, default=None, help="events per second (default: as fast as possible)")
    p.add_argument("--seed", type=int, default=None, help="generator seed (default: time-based, fresh ids)")
    p.add_argument("--max-events", type=int, default=None, help="stop after this many events")
    p.add_argument("--malformed", type=int, default=0, help="also send this many malformed records")
    p = add("consume", cmd_consume, "print decisions (or dead letters) as JSON lines")
    p.add_argument("--dead-letters", action="store_true", help="read the dead-letter topic instead")
    p.add_argument("--max", type=int, default=None, help="stop after this many records")
    p.add_argument("--timeout", type=float, default=30.0, help="stop after this many seconds")
    p.add_argument("--follow", action="store_true", help="only new records, until --timeout")
    p = add("demo", cmd_demo, "start everything, train, submit, produce, and show the decisions")
    p.add_argument("--users", type=int, default=200, help="generated users (default 200)")
    p.add_argument("--rate", type=float, default=1000.0, help="events per second (default 1000)")
    p.add_argument("--malformed", type=int, default=4, help="malformed records to show the dead-letter path")
    p = add("bench", cmd_bench, "measure throughput and latency on the real services against a bare baseline")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (< 3 minutes) instead of the full run (5.5-6.5 minutes); no JIT warm-up job, so "
                        "the full job runs cold: its latency, throughput and ratio are indicative only")
    p.add_argument("--json", action="store_true", help="print one JSON object (the table goes to stderr)")
    p.add_argument("--stages-only", action="store_true", help="only the in-process per-stage microbenchmark")
    p.add_argument("--rate", type=float, help="events/s for the latency runs (default 1000)")
    p.add_argument("--duration", type=float, help="seconds per at-least-once latency run, after --warmup (the "
                                                   "exactly-once run has its own length)")
    p.add_argument("--backlog", type=int, help="events pre-loaded for the throughput runs")
    p.add_argument("--stage-events", type=int, help="events for the per-stage microbenchmark")
    p.add_argument("--warmup", type=float, help="seconds produced at the rate before latency is measured "
                   "(default 30, quick 8)")
    return parser


# Failures with a message that says what to do: one log line, no traceback (unless -v). Matched by class name
# (subclasses included) so this module need not import every package to recognise them.
_KNOWN_ERRORS = ("ServiceError", "BrokerUnavailable", "ProvisionError", "FlinkJobError", "BundleError", "TrainingError",
                 "RegistryError", "RuleSetError", "QualityGateError", "PrivacyError", "PseudonymKeyError",
                 "ExperimentConfigError", "OutcomeFileError", "PlanError", "KafkaConnectionProblem", "KafkaSecurityError",
                 "PreviewError", "HistoryError",
                 # A file the user named is missing, a directory, or unreadable: its message names the path.
                 "OSError")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    for warning in misspelled_env_vars():
        log.warning("%s", warning)
    try:
        cfg = config_from_args(args)
        return args.func(cfg, args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for known failures; the trace only with -v
        known = any(cls.__name__ in _KNOWN_ERRORS for cls in type(exc).__mro__)
        if known and not args.verbose:
            log.error("%s", exc)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
