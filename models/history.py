"""Historical onboarding events for (re)training: Avro container files, or a time range of a Kafka topic.

Both loaders return a :class:`HistoryBatch` whose events are dicts in exactly the form the stream decodes
(``avro/onboarding_event.avsc`` resolved to the reader schema, ``event_time`` in epoch milliseconds), checked
with the stream's own validation (:mod:`udfs.validation`), so training sees what the personalize job would
have accepted. A rejected record is skipped and counted under its dead-letter code in
:attr:`HistoryBatch.skipped` -- never dropped silently: a model trained on a fraction of its history should say so.

* Files: Avro Object Container Files written with any version of the OnboardingEvent schema (the file
  carries its writer schema; fastavro resolves it to the reader schema, so e.g. an event type this code does
  not know becomes ``unknown`` and is counted as ``unknown_event_type``, as in the stream). A directory stands
  for the ``*.avro`` files directly inside it, in name order. :func:`write_avro_file` writes such files.
* Kafka: the records of a topic whose Kafka timestamp lies in ``[from_ms, to_ms)``, decoded with the
  single-object codec like the stream does.

"Now" for the time checks (future / stale event times): a Kafka record is judged at its own timestamp, i.e.
when it reached the topic and the stream judged it; judging old history by today's clock would reject
everything older than ``max_event_age_ms`` although the stream accepted it. Files carry no arrival time, so
they are judged at ``now_ms`` (default: the wall clock).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import fastavro

from udfs.avro_codec import EVENT_SCHEMA, SchemaStore, SchemaVersion, SingleObjectCodec, default_store, event_codec
from udfs.validation import InvalidEvent, ValidationLimits, accept_event, decode_event

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
AVRO_SUFFIX = ".avro"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class HistoryError(ValueError):
    """History cannot be read as OnboardingEvents (missing or damaged file, other record type, no such topic)."""


@dataclass
class HistoryBatch:
    """Validated events plus what was left out and where they came from (for the manifest and the logs)."""

    events: list[dict[str, Any]]  # in file / partition order
    skipped: dict[str, int]  # dead-letter code -> records rejected with it
    source: dict[str, Any]  # {"kind": "avro_files", ...} or {"kind": "kafka", ...}
    data_window: dict[str, int] | None  # {"from_ms": min event_time, "to_ms": max event_time}; None if no events

    @property
    def records(self) -> int:
        """Records looked at: accepted + skipped."""
        return len(self.events) + sum(self.skipped.values())

    def summary(self) -> dict[str, Any]:
        """JSON-ready description without the events."""
        return {"source": self.source, "events": len(self.events), "skipped": dict(self.skipped),
                "data_window": self.data_window}


def _batch(events: list[dict[str, Any]], skipped: Counter[str], source: dict[str, Any]) -> HistoryBatch:
    window = None
    if events:
        times = [e["event_time"] for e in events]
        window = {"from_ms": int(min(times)), "to_ms": int(max(times))}
    batch = HistoryBatch(events, dict(sorted(skipped.items())), source, window)
    if skipped:
        log.warning("history from %s: %d of %d records skipped as invalid: %s",
                    source["kind"], sum(skipped.values()), batch.records, batch.skipped)
    log.info("history from %s: %d events, window %s", source["kind"], len(events), window)
    return batch


def window_for(days: float, now_ms: int) -> tuple[int, int]:
    """``[now - days, now)`` in epoch ms: the rolling data window of a scheduled retrain."""
    if not (isinstance(days, (int, float)) and math.isfinite(days) and days > 0):
        raise ValueError(f"the training window must be a positive number of days, got {days!r}")
    return now_ms - round(days * DAY_MS), now_ms


# ---------------------------------------------------------------------------------------------------------------
# Avro Object Container Files


def expand_paths(paths: Sequence[Path | str] | Path | str) -> list[Path]:
    """Files to read: each path as given, a directory replaced by its ``*.avro`` files in name order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.glob(f"*{AVRO_SUFFIX}") if p.is_file())
            if not found:
                raise HistoryError(f"directory {path} holds no {AVRO_SUFFIX} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"history file or directory {path} does not exist")
    if not files:
        raise HistoryError("no history files given")
    return files


def _millis(value: Any) -> Any:
    """Epoch ms for a datetime (fastavro applies a writer's ``timestamp-millis``), anything else unchanged."""
    return (value - _EPOCH) // timedelta(milliseconds=1) if isinstance(value, datetime) else value


def _file_schema(version: SchemaVersion) -> Any:
    """The schema to write into a container file: the ``.avsc`` as published, logical types included (other
    tools then read ``event_time`` as a timestamp); the stripped parsed form when it was not loaded from a file."""
    source = Path(version.source)
    return fastavro.parse_schema(json.loads(source.read_text())) if source.is_file() else version.parsed


def write_avro_file(path: Path | str, events: Iterable[dict[str, Any]], *, store: SchemaStore | None = None,
                    codec: str = "deflate") -> int:
    """Write ``events`` to an Avro container file with the reader OnboardingEvent schema; returns the count.

    Written to a temporary file and renamed, so a reader never sees half a file. Events are not validated
    beyond the schema (history may hold invalid events; :func:`read_avro_files` counts them).
    """
    path = Path(path)
    schema = _file_schema((store or default_store()).reader(EVENT_SCHEMA))
    count = 0

    def counted() -> Iterable[dict[str, Any]]:
        nonlocal count
        for event in events:
            count += 1
            yield event

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            fastavro.writer(f, schema, counted(), codec=codec)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _read_file(path: Path, store: SchemaStore, now_ms: int, limits: ValidationLimits,
               events: list[dict[str, Any]], skipped: Counter[str]) -> dict[str, Any]:
    """Append the valid events of one container file to ``events``; returns the file's source entry."""
    reader_schema = store.reader(EVENT_SCHEMA)
    records = 0
    with open(path, "rb") as f:
        try:
            reader = fastavro.reader(f, reader_schema=reader_schema.parsed)
            writer = SchemaVersion.from_json(json.loads(reader.metadata["avro.schema"]), str(path))
        except Exception as exc:  # fastavro raises ValueError, SchemaResolutionError, ...
            raise HistoryError(f"{path} is not a readable Avro container file: {type(exc).__name__}: {exc}") from None
        if writer.name != EVENT_SCHEMA:
            raise HistoryError(f"{path} holds {writer.name} records, not {EVENT_SCHEMA}")
        known = store.by_fingerprint(writer.fingerprint) is not None
        if not known:
            log.warning("%s was written with an OnboardingEvent schema version not in avro/ (fingerprint %s); "
                        "resolving it with the schema embedded in the file", path, writer.fingerprint.hex())
        try:
            for record in reader:
                records += 1
                for key, value in record.items():
                    record[key] = _millis(value)
                try:
                    events.append(accept_event(record, now_ms, limits))
                except InvalidEvent as exc:
                    skipped[exc.code] += 1
        except Exception as exc:
            raise HistoryError(f"{path}: cannot read record {records} (damaged file or incompatible schema): "
                               f"{type(exc).__name__}: {exc}") from None
    return {"path": str(path), "records": records, "schema_fingerprint": writer.fingerprint.hex(), "schema_known": known}


def read_avro_files(paths: Sequence[Path | str] | Path | str, *, now_ms: int | None = None,
                    limits: ValidationLimits | None = None, store: SchemaStore | None = None) -> HistoryBatch:
    """Valid OnboardingEvents of Avro container files (directories: their ``*.avro`` files, sorted).

    ``now_ms``: the clock the event times are checked against (default: now); ``limits``: the validation
    limits (default: the stream's defaults).
    """
    files = expand_paths(paths)
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    limits = limits or ValidationLimits()
    store = store or default_store()
    events: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    entries = [_read_file(path, store, now_ms, limits, events, skipped) for path in files]
    return _batch(events, skipped, {"kind": "avro_files", "files": entries, "validated_at_ms": now_ms})


# ---------------------------------------------------------------------------------------------------------------
# Kafka


@dataclass
class _PartitionRange:
    start: int  # first offset to read
    end: int  # end offset captured at start (exclusive)
    reached: int  # next offset not yet looked at

    @property
    def empty(self) -> bool:
        return self.start >= self.end


def _offset_ranges(consumer: Any, tps: list[Any], from_ms: int | None, timeout_ms: int) -> dict[Any, _PartitionRange]:
    """Per partition: the first offset with timestamp >= ``from_ms`` (beginning if None) up to today's end."""
    ends = consumer.end_offsets(tps, timeout_ms=timeout_ms)
    if from_ms is None:
        starts = consumer.beginning_offsets(tps, timeout_ms=timeout_ms)
    else:
        found = consumer.offsets_for_times({tp: from_ms for tp in tps}, timeout_ms=timeout_ms)
        # None: no record at or after from_ms in that partition, nothing to read there.
        starts = {tp: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in tps}
    return {tp: _PartitionRange(starts[tp], ends[tp], starts[tp]) for tp in tps}


def read_kafka_topic(cfg: Any, topic: str, from_ms: int | None = None, to_ms: int | None = None,
                     timeout_s: float = 60.0, *, limits: ValidationLimits | None = None,
                     codec: SingleObjectCodec | None = None,
                     decode: Callable[[bytes, int], dict[str, Any]] | None = None) -> HistoryBatch:
    """Valid OnboardingEvents of ``topic`` whose Kafka timestamp lies in ``[from_ms, to_ms)`` (None: open end).

    Each partition is read (read_committed) from the first offset at or after ``from_ms`` until the end offset
    captured when reading starts, or until its first record stamped ``to_ms`` or later (Kafka timestamps are
    taken as non-decreasing per partition, as they are for log-append time or in-order producers). Raises
    :class:`TimeoutError` if that takes longer than ``timeout_s`` (a partial history is not returned).
    ``limits`` default to the config's validation limits. ``decode(value, now_ms)`` replaces the event decoding
    to read another record type (e.g. decisions); it raises :class:`InvalidEvent` for a record to skip.
    """
    from kafka import TopicPartition

    from jobs.kafka_io import make_reader

    if from_ms is not None and to_ms is not None and from_ms >= to_ms:
        raise ValueError(f"empty time range: from_ms {from_ms} >= to_ms {to_ms}")
    limits = limits or ValidationLimits(cfg.max_future_skew_ms, cfg.max_event_age_ms)
    codec = codec or event_codec()
    if decode is None:
        def decode(value: bytes, now_ms: int) -> dict[str, Any]:
            return decode_event(codec, value, now_ms, limits)
    deadline = time.monotonic() + timeout_s

    def remaining_ms() -> int:
        return max(1, int((deadline - time.monotonic()) * 1000))

    events: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    outside = 0
    consumer = make_reader(cfg)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise HistoryError(f"topic {topic!r} does not exist on {cfg.bootstrap_servers} (or is not visible to "
                               f"this client)")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        ranges = _offset_ranges(consumer, tps, from_ms, remaining_ms())
        pending = {tp for tp, r in ranges.items() if not r.empty}
        if pending:
            consumer.assign(sorted(pending))
            for tp in pending:
                consumer.seek(tp, ranges[tp].start)
        while pending:
            if time.monotonic() >= deadline:
                left = {tp.partition: f"{ranges[tp].reached}/{ranges[tp].end}" for tp in sorted(pending)}
                raise TimeoutError(f"reading {topic!r} did not finish within {timeout_s:g}s (partition: offset "
                                   f"reached/end {left}); raise timeout_s or narrow the time range")
            batch = consumer.poll(timeout_ms=min(200, remaining_ms()))
            done = set()
            for tp, records in batch.items():
                if tp not in pending:
                    continue
                part = ranges[tp]
                for record in records:
                    if record.offset >= part.end or (to_ms is not None and record.timestamp >= to_ms):
                        done.add(tp)
                        break
                    part.reached = record.offset + 1
                    if from_ms is not None and record.timestamp < from_ms:
                        outside += 1  # stamped out of order, before the window
                        continue
                    now_ms = record.timestamp if record.timestamp >= 0 else time.time_ns() // 1_000_000
                    try:
                        events.append(decode(record.value or b"", now_ms))
                    except InvalidEvent as exc:
                        skipped[exc.code] += 1
            # Past the last record (control markers of transactions included): the position tells.
            for tp in pending - done:
                if consumer.position(tp) >= ranges[tp].end:
                    ranges[tp].reached = ranges[tp].end
                    done.add(tp)
            if done:
                consumer.pause(*done)
                pending -= done
    finally:
        consumer.close()
    source = {
        "kind": "kafka",
        "topic": topic,
        "from_ms": from_ms,
        "to_ms": to_ms,
        "offsets": {str(tp.partition): [r.start, r.reached] for tp, r in sorted(ranges.items())},
        "outside_window": outside,
    }
    return _batch(events, skipped, source)
