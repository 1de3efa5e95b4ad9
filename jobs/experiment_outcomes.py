"""The experiment outcomes job: onboarding events + decisions (Kafka) -> per-user outcome rows (Kafka, compacted).

Graph (one Python operator, like the personalize job):

    Kafka SQL source over the events AND decisions topics (value, topic, partition, offset,
    routing key = onramp_routing_key(value), Java) -> key by routing key (JVM)
      -> ExperimentOutcomes (Python, keyed ValueState: the user's UserOutcomeState as JSON)
      -> Kafka SQL sink: key = [user_id, experiment_id], value = JSON UserOutcome row, or null (tombstone)

Both topics go through the same JVM routing key: ``onramp_routing_key`` reads the second Avro string after the
single-object header, which is ``user_id`` in a NextStepDecision (``decision_id, user_id, ...``) as in an
OnboardingEvent (``event_id, user_id, ...``). So decisions are keyed by their ``user_id`` with no Python key
selector, and a user's events and decisions meet in one keyed state. The operator tells them apart by the
schema fingerprint in the header.

Why per-user rows, not per-arm deltas: the Kafka source is replayed from the last checkpoint after a failure
and under at-least-once the sink may repeat records. A per-user row is a *value* (the user's current outcome,
keyed by user and experiment): writing it twice changes nothing, the topic can be compacted to the latest row
per key, and a reader (:func:`experiments.outcome_history.outcomes_from_outcomes_topic`) computes per-arm
aggregates exactly, at any time. Per-arm deltas are *increments*: a repeated delta double counts, a lost one
under-counts, and nothing downstream could tell. Rows are emitted only when they change, and a row that no
longer holds (erasure, analytics consent withdrawn, a late event showing onboarding completed before exposure)
is deleted with a tombstone (null value), which is why the sink is the Kafka SQL connector with
``key.fields``: the DataStream KafkaSink offers Python no per-record key.

Invalid records (undecodable, failing the event validation, decisions without a user) are counted per reason
(metrics ``skipped_<code>``) and skipped with a log line: this is a derived job, and the personalize job
dead-letters the same bad events already.

Run it with ``onramp experiments outcomes --submit`` (:func:`submit_outcomes_job`, i.e. ``flink run -py
jobs/experiment_outcomes.py --config-json ...``), or build it with :func:`build_outcomes_job` (tests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from pyflink.common import Row, Types
from pyflink.datastream import DataStream, KeyedProcessFunction, RuntimeContext, StreamExecutionEnvironment
from pyflink.datastream.state import ValueStateDescriptor
from pyflink.table import StreamTableEnvironment

# `flink run -py jobs/experiment_outcomes.py` puts jobs/ first on sys.path; the project root must be importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.config import OnrampConfig, load_config  # noqa: E402
from jobs.personalize import (  # noqa: E402
    ROUTING_KEY_CLASS,
    ROUTING_KEY_FUNCTION,
    _sql_string,
    create_env,
    kafka_source_options,
    key_by_routing_key,
    keyed_kafka_sink,
)
from udfs.flink_functions import ROUTED_RECORD  # noqa: E402
from udfs.validation import InvalidEvent, ValidationLimits  # noqa: E402

log = logging.getLogger("onramp.experiment_outcomes")

JOB_NAME = "onramp-experiment-outcomes"
JOB_SCRIPT = Path(__file__).resolve()
# What the keyed operator emits: the Kafka key and the JSON row (None: tombstone).
OUTCOME_ROW = Types.ROW_NAMED(["key", "value"], [Types.STRING(), Types.STRING()])
SOURCE_TABLE = "outcome_inputs"
SINK_TABLE = "experiment_outcome_rows"
# The outcomes job needs the experiments package on the TaskManagers as well.
SHIPPED_DIRS = ("jobs", "udfs", "models", "avro", "rules", "experiments")


def outcomes_group_id(cfg: OnrampConfig) -> str:
    """The consumer group of the outcomes job: its own offsets, independent of the personalize job's."""
    return f"{cfg.group_id}-experiment-outcomes"


def _row_digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class ExperimentOutcomes(KeyedProcessFunction):
    """Keyed by user over ``KAFKA_RECORD`` rows of both topics: fold each event or decision into the user's
    :class:`~experiments.outcomes.UserOutcomeState` and emit ``Row(key, json)`` for every outcome row that
    changed, ``Row(key, None)`` for every row that no longer exists.

    The keyed state is one JSON string: ``{"state": UserOutcomeState.to_json(), "emitted": {experiment: digest
    of the last row written}}``; the digests make "emit only on change" survive restarts."""

    def __init__(self, limits: ValidationLimits, require_analytics_consent: bool):
        self.limits = limits
        self.require_analytics_consent = require_analytics_consent
        self.state = None
        self.skip_counters: dict[str, Any] = {}

    def open(self, runtime_context: RuntimeContext) -> None:
        from udfs.avro_codec import DECISION_SCHEMA, decision_codec, default_store, event_codec

        self.state = runtime_context.get_state(ValueStateDescriptor("outcome_state", Types.STRING()))
        self.store = default_store()
        self.decision_schema = DECISION_SCHEMA
        self.event_codec = event_codec(self.store)
        self.decision_codec = decision_codec(self.store)
        self.metrics = metrics = runtime_context.get_metrics_group()
        self.events_folded = metrics.counter("events_folded")
        self.decisions_folded = metrics.counter("decisions_folded")
        self.rows_written = metrics.counter("outcome_rows")
        self.tombstones = metrics.counter("outcome_tombstones")
        self.skipped = metrics.counter("skipped")
        self.skip_counters = {}

    def process_element(self, record: Any, ctx: KeyedProcessFunction.Context) -> Iterable[Any]:
        from experiments.outcomes import InvalidDecision, UserOutcomeState, decode_decision
        from udfs.validation import decode_event

        value = bytes(record[0])
        stored = self.state.value()
        data = json.loads(stored) if stored else {"state": None, "emitted": {}}
        state = UserOutcomeState.from_json(data["state"])
        if state.user_id is None:
            # Rows carry the key the state is kept under (the routing key: a pseudonym where it pseudonymizes),
            # not the raw id read from the record, so no raw id reaches the state or the outcomes topic.
            # PyFlink hands the key selector's Row(routing_key) back as the plain string (checked on the
            # mini-cluster); take the field should a version hand back the Row.
            key = ctx.get_current_key()
            state.user_id = key if isinstance(key, str) else key[0]
        try:
            writer = self.store.by_fingerprint(value[2:10]) if len(value) >= 10 else None
            if writer is not None and writer.name == self.decision_schema:
                state.apply_decision(decode_decision(self.decision_codec, value))
                self.decisions_folded.inc()
            else:
                state.apply_event(decode_event(self.event_codec, value, time.time_ns() // 1_000_000, self.limits))
                self.events_folded.inc()
        except (InvalidEvent, InvalidDecision) as exc:
            self._skip(record, exc.code, exc.message)
            return
        yield from self._changes(state, data["emitted"])
        self.state.update(json.dumps({"state": state.to_json(), "emitted": data["emitted"]}, separators=(",", ":")))

    def _changes(self, state: Any, emitted: dict[str, str]) -> Iterable[Any]:
        """Rows that differ from what was last written (updating ``emitted``), then tombstones for rows gone."""
        from experiments.outcomes import outcome_key, outcome_to_json

        current = set()
        for row in state.outcomes(self.require_analytics_consent):
            current.add(row.experiment_id)
            text = json.dumps(outcome_to_json(row), sort_keys=True, separators=(",", ":"))
            digest = _row_digest(text)
            if emitted.get(row.experiment_id) != digest:
                emitted[row.experiment_id] = digest
                self.rows_written.inc()
                yield Row(outcome_key(row.user_id, row.experiment_id), text)
        for experiment in sorted(set(emitted) - current):
            del emitted[experiment]
            self.tombstones.inc()
            yield Row(outcome_key(state.user_id, experiment), None)

    def _skip(self, record: Any, code: str, message: str) -> None:
        self.skipped.inc()
        counter = self.skip_counters.get(code)
        if counter is None:
            counter = self.skip_counters[code] = self.metrics.counter(f"skipped_{code}")
        counter.inc()
        log.warning("experiment outcomes: skipped record %s/%s@%s (%s): %s", record[1], record[2], record[3], code,
                    message)


def build_outcome_rows(records: DataStream, cfg: OnrampConfig) -> DataStream:
    """Wire the keyed outcome operator onto :data:`ROUTED_RECORD` rows of events and decisions; returns
    :data:`OUTCOME_ROW` rows ``Row(key, json or None)``."""
    limits = ValidationLimits(cfg.max_future_skew_ms, cfg.max_event_age_ms)
    return (
        key_by_routing_key(records)
        .process(ExperimentOutcomes(limits, cfg.outcomes_require_analytics_consent), output_type=OUTCOME_ROW)
        .uid("experiment-outcomes")
        .name("experiment-outcomes")
    )


def _with(options: dict[str, str]) -> str:
    return ", ".join(f"{_sql_string(k)} = {_sql_string(str(v))}" for k, v in options.items())


def kafka_inputs(t_env: StreamTableEnvironment, cfg: OnrampConfig, *, bounded: bool = False) -> DataStream:
    """The events and decisions topics as one stream of :data:`ROUTED_RECORD` rows (see
    :func:`jobs.personalize.kafka_records`, which reads only the events topic with the personalize group)."""
    options = kafka_source_options(cfg, [cfg.input_topic, cfg.decisions_topic], outcomes_group_id(cfg),
                                   bounded=bounded)
    options["format"] = "raw"
    t_env.create_java_temporary_system_function(ROUTING_KEY_FUNCTION, ROUTING_KEY_CLASS)
    t_env.execute_sql(
        f"CREATE TEMPORARY TABLE {SOURCE_TABLE} (`value` BYTES, `topic` STRING METADATA VIRTUAL, "
        f"`partition` INT METADATA VIRTUAL, `offset` BIGINT METADATA VIRTUAL) WITH ({_with(options)})"
    )
    routed = t_env.sql_query(
        f"SELECT {ROUTING_KEY_FUNCTION}(`value`) AS routing_key, "
        f"ROW(`value`, `topic`, `partition`, `offset`) AS record FROM {SOURCE_TABLE}"
    )
    stream = t_env.to_data_stream(routed)
    stream._j_data_stream.getTransformation().setOutputType(ROUTED_RECORD.get_java_type_info())  # as personalize
    return stream


def sink_outcome_rows(t_env: StreamTableEnvironment, rows: DataStream, cfg: OnrampConfig) -> None:
    """Write ``Row(key, value)`` rows to ``cfg.experiment_outcomes_topic``: the key as the Kafka key, the value
    as the Kafka value, a null value as a tombstone (``raw`` format writes SQL NULL as a null value)."""
    keyed_kafka_sink(t_env, cfg, rows, table=SINK_TABLE, topic=cfg.experiment_outcomes_topic,
                     transactional_id=f"{outcomes_group_id(cfg)}-rows", column_type="STRING")


def build_outcomes_job(cfg: OnrampConfig, jars: list[Path] | None = None, bounded: bool = False) -> StreamExecutionEnvironment:
    """The whole job on ``cfg``'s topics; ``bounded`` stops at the topics' current end (tests)."""
    env = create_env(cfg, jars)
    t_env = StreamTableEnvironment.create(env)
    rows = build_outcome_rows(kafka_inputs(t_env, cfg, bounded=bounded), cfg)
    sink_outcome_rows(t_env, rows, cfg)
    return env


def submit_outcomes_job(cfg: OnrampConfig, *, replace: bool = True, bounded: bool = False) -> str:
    """Create the topics (the outcomes topic compacted), cancel an older outcomes job, submit this script to the
    Flink cluster, wait until it runs; returns the job id."""
    from jobs import flink_jobs, services
    from jobs.kafka_admin import ensure_topics
    from jobs.provision import flink_job_jars, provision

    provision(cfg)
    flink_jobs.check_pseudonym_key(cfg)  # keyed by the same pseudonyms as the personalize job
    ensure_topics(cfg, [cfg.input_topic, cfg.decisions_topic])
    ensure_topics(cfg, [cfg.experiment_outcomes_topic], configs={"cleanup.policy": "compact"})
    if replace:
        flink_jobs.cancel_all(cfg, JOB_NAME)
    job_id = flink_jobs.submit(
        cfg,
        flink_bin=services.flink_bin(cfg),
        env=services.flink_env(cfg),
        jars=flink_job_jars(cfg),
        script=JOB_SCRIPT,
        job_args=["--bounded"] if bounded else None,
        ship_dirs=SHIPPED_DIRS,
    )
    if not bounded:
        flink_jobs.wait_running(cfg, job_id)
    log.info("outcomes job %s: %s + %s -> %s", job_id, cfg.input_topic, cfg.decisions_topic,
             cfg.experiment_outcomes_topic)
    return job_id


def main(argv: list[str] | None = None) -> None:
    from jobs.personalize import config_from_json

    parser = argparse.ArgumentParser(description="Onramp experiment outcomes job (submit with "
                                                 "`onramp experiments outcomes --submit`).")
    parser.add_argument("--config-json", help="full Onramp config as JSON (written by the submitting command)")
    parser.add_argument("--jar", action="append", default=[], help="connector jar to add (repeatable)")
    parser.add_argument("--bounded", action="store_true", help="stop at the topics' current end")
    args, _ = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_json(args.config_json) if args.config_json else load_config()
    env = build_outcomes_job(cfg, [Path(j) for j in args.jar], bounded=args.bounded)
    log.info("submitting %s: %s + %s -> %s (delivery %s)", JOB_NAME, cfg.input_topic, cfg.decisions_topic,
             cfg.experiment_outcomes_topic, cfg.delivery)
    env.execute(JOB_NAME)


if __name__ == "__main__":
    main()
