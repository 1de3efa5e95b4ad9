"""Outcome rows from history (batch), from the streaming job's outcomes topic, and as JSON-lines files.

* :func:`outcomes_from_avro`: Avro container files of events (read and validated by :mod:`models.history`)
  and of decisions (e.g. an archive of the decisions topic), folded with :mod:`experiments.outcomes`.
* :func:`outcomes_from_topics`: a time range of the events and decisions topics, same fold.
* :func:`outcomes_from_outcomes_topic`: the latest row per (user, experiment) the streaming job
  (jobs/experiment_outcomes.py) wrote; tombstones (null values: erasure, consent withdrawn) remove a row.
* :func:`write_outcomes_jsonl` / :func:`read_outcomes_jsonl`: the file ``onramp experiments report --outcomes``
  reads, one JSON object of :class:`~experiments.records.UserOutcome` fields per line.

Records that cannot be used are skipped, counted and logged, never dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import fastavro

from experiments.outcomes import (
    InvalidDecision,
    OutcomeRowError,
    decode_decision,
    fold_outcomes,
    outcome_from_json,
    outcome_key,
)
from experiments.records import OutcomeFileError, UserOutcome, read_outcomes_jsonl, write_outcomes_jsonl  # noqa: F401 (re-exported)
from models.history import HistoryError, _millis, expand_paths, read_avro_files, read_kafka_topic
from udfs.avro_codec import DECISION_SCHEMA, SchemaStore, SchemaVersion, decision_codec, default_store
from udfs.validation import InvalidEvent, ValidationLimits

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Decisions in Avro container files


def write_decision_file(path: Path | str, decisions: Iterable[dict[str, Any]], *, store: SchemaStore | None = None,
                        codec: str = "deflate") -> int:
    """Write decisions to an Avro container file with the reader NextStepDecision schema; returns the count
    (tests and archives; written to a temporary file and renamed)."""
    path = Path(path)
    version = (store or default_store()).reader(DECISION_SCHEMA)
    source = Path(version.source)
    schema = fastavro.parse_schema(json.loads(source.read_text())) if source.is_file() else version.parsed
    rows = list(decisions)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            fastavro.writer(f, schema, rows, codec=codec)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(rows)


def read_decision_files(paths: Sequence[Path | str] | Path | str, *,
                        store: SchemaStore | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Decisions of Avro container files (any known-compatible NextStepDecision version, resolved to the reader
    schema, so files written before the ``experiments`` field existed read with an empty map); returns
    (decisions, skipped count per reason)."""
    from experiments.outcomes import check_decision

    reader_schema = (store or default_store()).reader(DECISION_SCHEMA)
    decisions: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    for path in expand_paths(paths):
        with open(path, "rb") as f:
            try:
                reader = fastavro.reader(f, reader_schema=reader_schema.parsed)
                writer = SchemaVersion.from_json(json.loads(reader.metadata["avro.schema"]), str(path))
            except Exception as exc:
                raise HistoryError(f"{path} is not a readable Avro container file: {type(exc).__name__}: {exc}") from None
            if writer.name != DECISION_SCHEMA:
                raise HistoryError(f"{path} holds {writer.name} records, not {DECISION_SCHEMA}")
            try:
                for record in reader:
                    for key, value in record.items():
                        record[key] = _millis(value)
                    try:
                        check_decision(record)
                    except InvalidDecision as exc:
                        skipped[exc.code] += 1
                        continue
                    decisions.append(record)
            except HistoryError:
                raise
            except Exception as exc:
                raise HistoryError(f"{path}: cannot read decisions (damaged file or incompatible schema): "
                                   f"{type(exc).__name__}: {exc}") from None
    return decisions, dict(skipped)


# ---------------------------------------------------------------------------------------------------------------
# Batch: history -> outcomes


def _fold(events: list[dict[str, Any]], decisions: list[dict[str, Any]], skipped_decisions: dict[str, int],
          require_analytics_consent: bool, user_key: Callable[[str], str] | None, source: str) -> list[UserOutcome]:
    rows, invalid = fold_outcomes(events, decisions, require_analytics_consent=require_analytics_consent,
                                  user_key=user_key)
    if skipped_decisions or invalid:
        log.warning("outcomes from %s: %d decision(s) skipped as invalid: %s", source,
                    sum(skipped_decisions.values()) + invalid, skipped_decisions or {"invalid": invalid})
    users = len({r.user_id for r in rows})
    log.info("outcomes from %s: %d events, %d decisions -> %d rows of %d users", source, len(events),
             len(decisions), len(rows), users)
    return rows


def outcomes_from_avro(event_paths: Sequence[Path | str] | Path | str,
                       decision_paths: Sequence[Path | str] | Path | str, *, now_ms: int | None = None,
                       limits: ValidationLimits | None = None,
                       require_analytics_consent: bool = True,
                       user_key: Callable[[str], str] | None = None) -> list[UserOutcome]:
    """Outcome rows from Avro container files of events and of decisions (files or directories of ``*.avro``).

    Events pass the stream's validation (:func:`models.history.read_avro_files`, judged at ``now_ms``).
    ``user_key``: the id rows carry, as in :func:`experiments.outcomes.fold_outcomes` (pass the routing key's
    pseudonym function to match the streaming job's rows)."""
    batch = read_avro_files(event_paths, now_ms=now_ms, limits=limits)
    decisions, skipped = read_decision_files(decision_paths)
    return _fold(batch.events, decisions, skipped, require_analytics_consent, user_key, "avro files")


def _decision_decoder() -> Any:
    codec = decision_codec()

    def decode(value: bytes, _now_ms: int) -> dict[str, Any]:
        try:
            return decode_decision(codec, value)
        except InvalidDecision as exc:
            raise InvalidEvent(exc.code, exc.message) from None  # what read_kafka_topic counts as skipped

    return decode


def outcomes_from_topics(cfg: Any, events_topic: str, decisions_topic: str, from_ms: int | None = None,
                         to_ms: int | None = None, timeout_s: float = 60.0, *,
                         require_analytics_consent: bool | None = None,
                         user_key: Callable[[str], str] | None = None) -> list[UserOutcome]:
    """Outcome rows from the records of both topics whose Kafka timestamp lies in ``[from_ms, to_ms)``
    (:func:`models.history.window_for` gives a rolling window). A decision is stamped a little after the event it
    answers, so the decisions of events right at ``to_ms`` may fall outside: take the window's end in the past.
    ``require_analytics_consent`` defaults to the config's ``outcomes_require_analytics_consent``; ``user_key``
    as in :func:`outcomes_from_avro`."""
    if require_analytics_consent is None:
        require_analytics_consent = cfg.outcomes_require_analytics_consent
    events = read_kafka_topic(cfg, events_topic, from_ms, to_ms, timeout_s)
    decisions = read_kafka_topic(cfg, decisions_topic, from_ms, to_ms, timeout_s, decode=_decision_decoder())
    return _fold(events.events, decisions.events, decisions.skipped, require_analytics_consent, user_key,
                 f"topics {events_topic} + {decisions_topic}")


# ---------------------------------------------------------------------------------------------------------------
# The streaming job's outcomes topic


def latest_rows(records: Iterable[tuple[bytes | None, bytes | None]]) -> tuple[list[UserOutcome], dict[str, int]]:
    """The latest row per key of (key, value) records in log order; a null value deletes its key. Returns rows
    sorted by (experiment, arm, user) and counts of records skipped (no key, bad JSON, bad row)."""
    latest: dict[bytes, UserOutcome] = {}
    skipped: Counter[str] = Counter()
    for key, value in records:
        if key is None:
            skipped["no_key"] += 1
            continue
        if value is None:
            latest.pop(key, None)
            continue
        try:
            row = outcome_from_json(json.loads(value))
        except (ValueError, OutcomeRowError) as exc:  # JSONDecodeError is a ValueError
            skipped["bad_row"] += 1
            log.warning("outcomes topic: skipping record with key %r: %s", key, exc)
            continue
        if outcome_key(row.user_id, row.experiment_id).encode() != key:
            skipped["key_mismatch"] += 1
            continue
        latest[key] = row
    rows = sorted(latest.values(), key=lambda r: (r.experiment_id, r.arm, r.user_id))
    return rows, dict(skipped)


def outcomes_from_outcomes_topic(cfg: Any, topic: str | None = None, timeout_s: float = 60.0) -> list[UserOutcome]:
    """The current outcome rows: the whole outcomes topic (default ``cfg.experiment_outcomes_topic``) read from
    the beginning up to the end offsets at the start of reading, latest row per key."""
    from kafka import TopicPartition

    from jobs.kafka_io import make_reader

    topic = topic or cfg.experiment_outcomes_topic
    deadline = time.monotonic() + timeout_s
    consumer = make_reader(cfg)
    records: list[tuple[bytes | None, bytes | None]] = []
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise HistoryError(f"topic {topic!r} does not exist on {cfg.bootstrap_servers}; is the outcomes job "
                               f"running (`onramp experiments outcomes --submit`)?")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        ends = consumer.end_offsets(tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        while pending:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"reading {topic!r} did not finish within {timeout_s:g}s; raise timeout_s")
            for tp, batch in consumer.poll(timeout_ms=200).items():
                for record in batch:
                    if record.offset < ends[tp]:
                        records.append((record.key, record.value))
            pending = {tp for tp in pending if consumer.position(tp) < ends[tp]}
    finally:
        consumer.close()
    rows, skipped = latest_rows(records)
    if skipped:
        log.warning("outcomes topic %s: %d record(s) skipped: %s", topic, sum(skipped.values()), skipped)
    log.info("outcomes topic %s: %d records -> %d current rows", topic, len(records), len(rows))
    return rows
