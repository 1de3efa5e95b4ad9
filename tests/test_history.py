"""Historical input for training: Avro container files and a time range of a Kafka topic."""

from __future__ import annotations

import json
import time
import uuid

import fastavro
import pytest

from models.generator import generate
from models.history import DAY_MS, HistoryError, read_avro_files, read_kafka_topic, window_for, write_avro_file
from udfs.avro_codec import AVRO_DIR, event_codec
from udfs.validation import (
    FUTURE_EVENT_TIME,
    MISSING_EVENT_ID,
    MISSING_USER_ID,
    NOT_SINGLE_OBJECT,
    STALE_EVENT_TIME,
    UNKNOWN_EVENT_TYPE,
)

HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def history():
    events, _truths = generate(40, seed=11)
    return events


def test_container_file_round_trip(tmp_path, history):
    path = tmp_path / "history.avro"
    assert write_avro_file(path, history) == len(history)
    batch = read_avro_files([path])
    assert batch.events == history  # same dicts as the generator's (event_time in epoch ms, not datetime)
    assert batch.skipped == {}
    assert batch.data_window == {"from_ms": history[0]["event_time"], "to_ms": history[-1]["event_time"]}
    (entry,) = batch.source["files"]
    assert batch.source["kind"] == "avro_files"
    assert entry["path"] == str(path) and entry["records"] == len(history) and entry["schema_known"]
    # The file declares the published schema, logical types included, for other tools.
    with open(path, "rb") as f:
        declared = json.loads(fastavro.reader(f).metadata["avro.schema"])
    event_time = next(field for field in declared["fields"] if field["name"] == "event_time")
    assert event_time["type"]["logicalType"] == "timestamp-millis"


def test_directory_of_files_in_name_order(tmp_path, history):
    third = len(history) // 3
    # written out of name order: reading follows the names
    write_avro_file(tmp_path / "part-2.avro", history[2 * third :])
    write_avro_file(tmp_path / "part-0.avro", history[:third])
    write_avro_file(tmp_path / "part-1.avro", history[third : 2 * third])
    (tmp_path / "notes.txt").write_text("not history")
    batch = read_avro_files([tmp_path])
    assert batch.events == history
    assert [e["path"].rsplit("/", 1)[-1] for e in batch.source["files"]] == ["part-0.avro", "part-1.avro", "part-2.avro"]


def test_invalid_records_are_counted_by_code(tmp_path, history):
    now = history[-1]["event_time"] + HOUR_MS
    bad = [
        {**history[0], "user_id": "", "anonymous_id": None},
        {**history[1], "user_id": "  "},
        {**history[2], "event_id": ""},
        {**history[3], "event_type": "unknown"},
        {**history[4], "event_time": now + 2 * DAY_MS},
        {**history[5], "event_time": now - 400 * DAY_MS},
    ]
    good = history[6:]
    write_avro_file(tmp_path / "mixed.avro", bad[:3] + good + bad[3:])
    batch = read_avro_files(tmp_path / "mixed.avro", now_ms=now)
    assert batch.events == good
    assert batch.skipped == {
        MISSING_USER_ID: 2,
        MISSING_EVENT_ID: 1,
        UNKNOWN_EVENT_TYPE: 1,
        FUTURE_EVENT_TIME: 1,
        STALE_EVENT_TIME: 1,
    }
    assert batch.records == len(history)
    assert batch.summary()["skipped"] == batch.skipped


def test_other_schema_version_is_resolved_to_the_reader_schema(tmp_path, history):
    """A newer writer with an event type this code does not know: resolved to ``unknown`` and counted."""
    schema = json.loads((AVRO_DIR / "onboarding_event.avsc").read_text())
    event_type = next(field for field in schema["fields"] if field["name"] == "event_type")
    event_type["type"]["symbols"].insert(-1, "invite_sent")
    newer = [{**history[0], "event_type": "invite_sent"}, *history[1:5]]
    with open(tmp_path / "newer.avro", "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(schema), newer)
    batch = read_avro_files(tmp_path / "newer.avro")
    assert batch.events == history[1:5]
    assert batch.skipped == {UNKNOWN_EVENT_TYPE: 1}
    assert batch.source["files"][0]["schema_known"] is False


def test_unreadable_inputs_fail_clearly(tmp_path, history):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_avro_files([tmp_path / "missing.avro"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(HistoryError, match="holds no .avro files"):
        read_avro_files([tmp_path / "empty"])
    (tmp_path / "junk.avro").write_bytes(b"not avro at all")
    with pytest.raises(HistoryError, match="not a readable Avro container file"):
        read_avro_files([tmp_path / "junk.avro"])
    other = {"type": "record", "name": "Other", "namespace": "io.onramp", "fields": [{"name": "x", "type": "int"}]}
    with open(tmp_path / "other.avro", "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(other), [{"x": 1}])
    with pytest.raises(HistoryError, match="holds io.onramp.Other records"):
        read_avro_files([tmp_path / "other.avro"])


def test_window_for():
    now = 1_790_000_000_000
    assert window_for(30, now) == (now - 30 * DAY_MS, now)
    assert window_for(0.5, now) == (now - DAY_MS // 2, now)
    for days in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive number of days"):
            window_for(days, now)


@pytest.mark.e2e
def test_kafka_time_range(live_services):
    from jobs.kafka_admin import ensure_topics
    from jobs.kafka_io import make_producer

    cfg = live_services
    topic = f"history-{uuid.uuid4().hex[:8]}"
    ensure_topics(cfg, [topic], partitions=3, configs={"retention.ms": "-1"})
    # One day of history that ended a day ago; each record stamped with its event time, as the app sends them.
    now = time.time_ns() // 1_000_000
    events, _ = generate(30, seed=12, start_ms=now - 2 * DAY_MS, span_days=1)
    times = [e["event_time"] for e in events]
    from_ms, to_ms = times[len(times) // 4], times[3 * len(times) // 4]
    inside = [e for e in events if from_ms <= e["event_time"] < to_ms]
    assert 0 < len(inside) < len(events)

    codec = event_codec()
    records = [(e["event_time"], e["user_id"].encode(), codec.encode(e)) for e in events]
    # Invalid records: two inside the window (counted), one before and one after it (outside: not looked at).
    records += [
        (from_ms - 1, b"bad", b"\x00garbage"),
        (from_ms, b"bad", codec.encode({**inside[0], "user_id": "", "anonymous_id": None})),
        (to_ms - 1, b"bad", b"\x00garbage"),
        (to_ms, b"bad", b"\x00garbage"),
    ]
    producer = make_producer(cfg)
    for timestamp, key, value in sorted(records, key=lambda r: r[0]):  # stamps rise within each partition
        producer.send(topic, key=key, value=value, timestamp_ms=timestamp)
    producer.flush()
    producer.close()

    batch = read_kafka_topic(cfg, topic, from_ms, to_ms, timeout_s=60)
    assert sorted(e["event_id"] for e in batch.events) == sorted(e["event_id"] for e in inside)
    assert {e["event_id"]: e for e in batch.events} == {e["event_id"]: e for e in inside}
    assert batch.skipped == {MISSING_USER_ID: 1, NOT_SINGLE_OBJECT: 1}
    assert batch.source["kind"] == "kafka" and batch.source["topic"] == topic
    assert (batch.source["from_ms"], batch.source["to_ms"]) == (from_ms, to_ms)
    assert batch.data_window == {"from_ms": inside[0]["event_time"], "to_ms": inside[-1]["event_time"]}
    assert batch.source["outside_window"] == 0  # offsets_for_times seeked past the record before the window

    everything = read_kafka_topic(cfg, topic, None, None, timeout_s=60)
    assert len(everything.events) == len(events)
    assert everything.skipped == {MISSING_USER_ID: 1, NOT_SINGLE_OBJECT: 3}
    assert sum(end - start for start, end in everything.source["offsets"].values()) == len(records)
    # the windowed read stopped at the first record stamped >= to_ms instead of reading on to the end
    ends = {p: end for p, (_start, end) in everything.source["offsets"].items()}
    assert all(batch.source["offsets"][p][1] < ends[p] for p in ends)

    later = read_kafka_topic(cfg, topic, times[-1] + 1, None, timeout_s=30)  # nothing stamped that late
    assert later.events == [] and later.skipped == {} and later.data_window is None

    with pytest.raises(HistoryError, match="does not exist"):
        read_kafka_topic(cfg, f"{topic}-missing", None, None, timeout_s=10)
