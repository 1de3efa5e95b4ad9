"""`onramp`: one entry point for the whole lifecycle.

    onramp up                 start local Kafka (KRaft) + a standalone Flink cluster (fetches jars first)
    onramp train              train personas + churn model on generated history, publish an ONNX bundle
    onramp submit             submit the personalize job (`flink run -py jobs/personalize.py`)
    onramp produce            send generated onboarding events to the input topic at a given rate
    onramp consume            print decisions (or --dead-letters) as JSON lines
    onramp demo               all of the above in one go, with a readable summary
    onramp status / down      what runs / stop what `up` started
    onramp bench [--quick]    throughput + latency on the real services vs a bare PyFlink baseline (JSON)

Every command reads one typed config (jobs/config.py): defaults, then ONRAMP_* environment variables, then the
flags below (`--set key=value` for any setting, `--set kafka.security.protocol=SSL` / `--set flink.<option>=...`
for client and Flink options).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from jobs.config import ConfigError, OnrampConfig, load_config

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

    result = provision(cfg)
    print(json.dumps({k: str(v) for k, v in vars(result).items()} if hasattr(result, "__dict__") else str(result), indent=2))
    return 0


def cmd_up(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs import services
    from jobs.kafka_admin import ensure_topics
    from jobs.provision import provision

    provision(cfg)
    state = services.up(cfg, kafka=not args.flink_only, flink=not args.kafka_only)
    if not args.flink_only:
        ensure_topics(cfg, [cfg.input_topic, cfg.decisions_topic, cfg.dead_letter_topic])
    print(json.dumps(state, indent=2, default=str))
    return 0


def cmd_down(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs import services

    print(json.dumps(services.down(cfg), indent=2, default=str))
    return 0


def cmd_status(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs import flink_jobs, services

    state = services.status(cfg)
    if state.get("flink", {}).get("running"):
        try:
            state["jobs"] = [
                {"id": j["jid"], "name": j["name"], "state": j["state"]} for j in flink_jobs.list_jobs(cfg)
            ]
        except flink_jobs.FlinkJobError as exc:
            state["jobs"] = str(exc)
    if args.json:
        print(json.dumps(state, indent=2, default=str))
    else:
        for name, info in state.items():
            print(f"{name:8s} {json.dumps(info, default=str)}")
    return 0


def cmd_train(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from models.training import train_and_publish

    manifest = train_and_publish(cfg, n_users=args.users, seed=args.seed, force=args.force)
    print(json.dumps({k: manifest[k] for k in ("version", "metrics") if k in manifest}, indent=2, default=str))
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


def submit_job(cfg: OnrampConfig, *, replace: bool = True, job_args: list[str] | None = None) -> str:
    """Provision, check the model, cancel an older Onramp job, submit, wait until it runs; returns the job id."""
    from jobs import flink_jobs, services
    from jobs.kafka_admin import ensure_topics
    from jobs.personalize import JOB_NAME
    from jobs.provision import flink_job_jars, provision
    from udfs.model_bundle import load_current

    provision(cfg)
    _warn_if_taskmanager_has_older_code(cfg)
    bundle = load_current(cfg.model_dir)  # fails here, clearly, rather than inside a TaskManager
    log.info("model bundle %s", bundle.version)
    ensure_topics(cfg, [cfg.input_topic, cfg.decisions_topic, cfg.dead_letter_topic])
    if replace:
        flink_jobs.cancel_all(cfg, JOB_NAME)
    job_id = flink_jobs.submit(
        cfg,
        flink_bin=services.flink_bin(cfg),
        env=services.flink_env(cfg),
        jars=flink_job_jars(cfg),
        job_args=job_args,
    )
    flink_jobs.wait_running(cfg, job_id)
    log.info("job %s running; Flink UI: %s/#/job/running/%s/overview", job_id, cfg.flink_rest_url, job_id)
    return job_id


def cmd_submit(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    job_id = submit_job(cfg, replace=not args.keep_running)
    print(job_id)
    return 0


def cmd_produce(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs.event_stream import generated_records, malformed_records
    from jobs.kafka_io import make_producer, produce

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
    from jobs.kafka_io import end_offsets, read_records
    from udfs.avro_codec import dead_letter_codec, decision_codec

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


# --- parser ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onramp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[OnrampConfig, argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_flags(p)
        p.set_defaults(func=func)
        return p

    add("provision", cmd_provision, "fetch the Flink Kafka connector and Kafka broker jars (pinned Maven pom) into .cache/jars")
    p = add("up", cmd_up, "start local Kafka + Flink (idempotent; waits until healthy)")
    p.add_argument("--kafka-only", action="store_true", help="start only the Kafka broker")
    p.add_argument("--flink-only", action="store_true", help="start only the Flink cluster")
    add("down", cmd_down, "stop the local services that `up` started (and nothing else)")
    p = add("status", cmd_status, "show local services and Flink jobs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("train", cmd_train, "train K-means personas + churn model and publish an ONNX bundle")
    p.add_argument("--users", type=int, default=2000, help="generated users to train on (default 2000)")
    p.add_argument("--seed", type=int, default=7, help="generator seed")
    p.add_argument("--force", action="store_true", help="publish even if the quality gate refuses")
    p = add("submit", cmd_submit, "submit the personalize job to the Flink cluster (replaces a running one)")
    p.add_argument("--keep-running", action="store_true", help="do not cancel an already running Onramp job")
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
    p.add_argument("--quick", action="store_true", help="small sizes (~2 minutes) instead of the full run (~8 minutes)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the table goes to stderr)")
    p.add_argument("--stages-only", action="store_true", help="only the in-process per-stage microbenchmark")
    p.add_argument("--rate", type=float, help="events/s for the latency runs (default 1000)")
    p.add_argument("--duration", type=float, help="seconds per latency run")
    p.add_argument("--backlog", type=int, help="events pre-loaded for the throughput runs")
    p.add_argument("--stage-events", type=int, help="events for the per-stage microbenchmark")
    p.add_argument("--warmup", type=float, help="seconds produced at the rate before latency is measured "
                   "(default 30, quick 15)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        cfg = config_from_args(args)
        return args.func(cfg, args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for known failures; the trace only with -v
        known = type(exc).__name__ in ("ServiceError", "ProvisionError", "FlinkJobError", "BundleError", "TrainingError")
        if known and not args.verbose:
            log.error("%s", exc)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
