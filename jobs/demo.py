"""`onramp demo`: local Kafka + Flink, a trained model, the job, a stream of events, and what Onramp decided.

Leaves the services and the job running so the user can keep exploring (`onramp consume`, the Flink UI);
`onramp down` stops everything.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from jobs.config import OnrampConfig

log = logging.getLogger("onramp.demo")


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


DEMO_EXPERIMENT = "personalization-vs-control"


def _experiment_report(cfg: OnrampConfig) -> str | None:
    """The two-arm experiment of the shipped experiments file, analysed end to end: outcomes folded from the
    job's input and decisions topics (the batch path), then the report's HTML and PNG. A few hundred demo users
    make an underpowered test; the report says so."""
    from jobs.config import NO_EXPERIMENTS
    from jobs.experiments_cli import topic_outcomes
    from udfs.experiment_arms import load_experiments

    if cfg.experiments_file == NO_EXPERIMENTS:
        return None
    experiments = load_experiments(cfg.experiments_file)
    if DEMO_EXPERIMENT not in experiments.experiments:
        return None
    from experiments.analysis import analyze
    from experiments.report import format_report, write_html, write_png

    experiment = experiments.experiment(DEMO_EXPERIMENT)
    rows = [r for r in topic_outcomes(cfg, days=1.0) if r.experiment_id == DEMO_EXPERIMENT]
    report = analyze(rows, experiment)
    reports = cfg.state_dir / "reports"
    html = write_html(report, reports / f"{DEMO_EXPERIMENT}.html")
    write_png(report, reports / f"{DEMO_EXPERIMENT}.png")
    print()
    print(format_report(report))
    return str(Path(html).resolve())


def run_demo(cfg: OnrampConfig, *, users: int, rate: float, malformed: int) -> int:
    from jobs import services
    from jobs.cli import submit_job
    from jobs.event_stream import encode_events, generated_events, malformed_records
    from jobs.kafka_io import end_offsets, make_producer, produce, read_records
    from jobs.provision import provision
    from models.registry import current_bundle_path
    from udfs.avro_codec import dead_letter_codec, decision_codec

    started = time.monotonic()
    log.info("1/6 fetching jars (pinned Maven pom; cached after the first run)")
    provision(cfg)
    log.info("2/6 starting local Kafka (KRaft) and Flink")
    services.up(cfg)
    if current_bundle_path(cfg.model_dir) is None:
        log.info("3/6 no model bundle yet: training personas + churn model on generated history")
        from models.training import train_and_publish

        train_and_publish(cfg, n_users=2000, seed=7)
    else:
        log.info("3/6 using the published model bundle in %s", cfg.model_dir)
    log.info("4/6 submitting the personalize job (creates the topics if needed)")
    job_id = submit_job(cfg)

    events = generated_events(users)
    decisions_from = end_offsets(cfg, cfg.decisions_topic)
    dead_from = end_offsets(cfg, cfg.dead_letter_topic)
    log.info("5/6 producing %d events of %d users at %.0f/s, plus %d malformed records", len(events), users, rate, malformed)
    producer = make_producer(cfg)
    report = produce(producer, cfg.input_topic, encode_events(events), rate=rate,
                     on_progress=lambda n, s: log.info("   %d events sent", n))
    produce(producer, cfg.input_topic, malformed_records(malformed))
    producer.close()

    log.info("6/6 reading the decisions back")
    codec = decision_codec()
    decisions: list[dict[str, Any]] = []
    for record in read_records(cfg, cfg.decisions_topic, start_offsets=decisions_from, max_records=len(events),
                               timeout_s=60 + len(events) / 500):
        decisions.append(codec.decode(record.value))
    dead_codec = dead_letter_codec()
    dead = [dead_codec.decode(r.value) for r in read_records(
        cfg, cfg.dead_letter_topic, start_offsets=dead_from, max_records=malformed, timeout_s=30)] if malformed else []

    print()
    print(f"Onramp demo: {report.sent} events in -> {len(decisions)} decisions out, {len(dead)} dead letters "
          f"(job {job_id}, {time.monotonic() - started:.0f}s in all)")
    print()
    print("Next steps chosen:")
    print(_table([[k, str(v)] for k, v in Counter(d["step_id"] for d in decisions).most_common()], ["step", "decisions"]))
    print()
    print("Personas (segments) of personalized decisions:")
    seg = Counter(d["segment_name"] for d in decisions if d["personalized"])
    print(_table([[k, str(v)] for k, v in seg.most_common()], ["segment", "decisions"]))
    print()
    print("Latest decision per user (sample):")
    latest: dict[str, dict[str, Any]] = {}
    for d in decisions:
        latest[d["user_id"]] = d
    sample = list(latest.values())[:8]
    print(_table(
        [[d["user_id"], d["step_id"], d["content_variant"], d["segment_name"], f"{d['churn_risk']:.2f}",
          "; ".join(d["reasons"])[:60]] for d in sample],
        ["user", "next step", "variant", "segment", "churn", "why"],
    ))
    if dead:
        print()
        print("Dead letters (nothing is dropped silently):")
        print(_table([[d["error_code"], d["error_message"][:70]] for d in dead], ["code", "reason"]))
    if decisions:
        print()
        print(f"model bundle {decisions[-1]['model_version']}, rules {decisions[-1]['rules_version']}")
    report_path = _experiment_report(cfg)
    if report_path:
        print()
        print(f"Experiment report (personalized vs control, from the topics): {report_path}")
    print()
    print(f"Still running: Flink UI {cfg.flink_rest_url} · `onramp consume` to read decisions · `onramp down` to stop.")
    ok = len(decisions) == report.sent and len(dead) == malformed
    if not ok:
        log.error("expected %d decisions and %d dead letters", report.sent, malformed)
    return 0 if ok else 1
