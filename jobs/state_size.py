"""Measure the keyed state a user costs: checkpoint size with N generated users, minus an empty job's, over N.

    python -m jobs.state_size --users 2000 [--set state_backend=rocksdb]    (against running services: `onramp up`)

Submits the personalize job (replacing a running one) on fresh topics, reads the checkpoint size the REST API
reports (``/jobs/:id/checkpoints``: ``state_size``, the full size, and ``checkpointed_size``, what the last
checkpoint wrote, which differs for incremental RocksDB checkpoints) once before any event and once after every
event was decided, and prints one JSON line. docs/operations.md records the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import uuid
from typing import Any

from jobs import flink_jobs
from jobs.cli import _add_config_flags, config_from_args, submit_job
from jobs.config import OnrampConfig
from jobs.event_stream import encode_events, generated_events
from jobs.kafka_io import make_producer, produce, read_records

log = logging.getLogger("jobs.state_size")


def _checkpoint_after(cfg: OnrampConfig, job_id: str, after_s: float, timeout_s: float = 180.0) -> dict[str, Any]:
    """The first checkpoint completed after ``after_s`` (epoch seconds), as the REST API describes it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = flink_jobs.checkpoint_stats(cfg, job_id)
        if latest and latest.get("latest_ack_timestamp", 0) / 1000.0 > after_s:
            return latest
        time.sleep(0.5)
    raise flink_jobs.FlinkJobError(f"no checkpoint of job {job_id} completed within {timeout_s:.0f}s")


def measure(cfg: OnrampConfig, users: int, seed: int = 11) -> dict[str, Any]:
    run = uuid.uuid4().hex[:6]
    cfg = dataclasses.replace(cfg, input_topic=f"state-size-{run}", decisions_topic=f"state-size-{run}-decisions",
                              dead_letter_topic=f"state-size-{run}-dead-letters", group_id=f"state-size-{run}")
    events = generated_events(users, seed=seed)
    job_id = submit_job(cfg)
    try:
        empty = _checkpoint_after(cfg, job_id, time.time())
        producer = make_producer(cfg)
        produce(producer, cfg.input_topic, encode_events(events))
        producer.close()
        decided = sum(1 for _ in read_records(cfg, cfg.decisions_topic, max_records=len(events), timeout_s=900))
        full = _checkpoint_after(cfg, job_id, time.time())
    finally:
        flink_jobs.cancel(cfg, job_id)
    state_bytes = full["state_size"] - empty["state_size"]
    return {
        "state_backend": cfg.state_backend,
        "users": users,
        "events": len(events),
        "decisions": decided,
        "checkpoint_state_size_empty": empty["state_size"],
        "checkpoint_state_size": full["state_size"],
        "checkpointed_size": full.get("checkpointed_size"),
        "bytes_per_user": round(state_bytes / users),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.state_size", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=2000, help="generated users (default 2000)")
    parser.add_argument("--seed", type=int, default=11)
    _add_config_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    print(json.dumps(measure(config_from_args(args), args.users, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
