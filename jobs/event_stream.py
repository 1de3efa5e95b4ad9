"""Kafka records for the input topic: generated onboarding events, and malformed records of every kind.

Records are (key, value) pairs: the key is the user id, so one user's events stay in one partition, in order.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator

from udfs.avro_codec import MAGIC, event_codec
from udfs.validation import FUTURE_EVENT_TIME, MALFORMED_AVRO, MISSING_USER_ID, UNKNOWN_SCHEMA

Record = tuple[bytes | None, bytes]


def encode_events(events: list[dict[str, Any]]) -> Iterator[Record]:
    codec = event_codec()
    for event in events:
        yield event["user_id"].encode(), codec.encode(event)


def generated_events(n_users: int, seed: int | None = None, max_events: int | None = None) -> list[dict[str, Any]]:
    """Generated history ending now (valid event times); a fresh seed gives fresh users and event ids."""
    from models.generator import generate

    seed = seed if seed is not None else time.time_ns() % 1_000_000_007
    events, _truth = generate(n_users, seed=seed)
    return events[:max_events] if max_events is not None else events


def generated_records(n_users: int, seed: int | None = None, max_events: int | None = None) -> Iterator[Record]:
    return encode_events(generated_events(n_users, seed, max_events))


def malformed_event(kind: str, now_ms: int | None = None) -> bytes:
    """One record that must be dead-lettered with the code ``kind``."""
    codec = event_codec()
    now_ms = now_ms or time.time_ns() // 1_000_000
    event = {
        "event_id": str(uuid.uuid4()),
        "user_id": "user-malformed",
        "anonymous_id": None,
        "event_type": "page_view",
        "event_time": now_ms,
        "demographic": None,
        "context": None,
        "consent": None,
        "properties": {},
    }
    if kind == MALFORMED_AVRO:  # truncated body
        return codec.encode(event)[:-7]
    if kind == UNKNOWN_SCHEMA:  # valid header shape, fingerprint nobody registered
        return MAGIC + b"\x00\x11\x22\x33\x44\x55\x66\x77" + codec.encode(event)[10:]
    if kind == MISSING_USER_ID:
        return codec.encode({**event, "user_id": ""})
    if kind == FUTURE_EVENT_TIME:
        return codec.encode({**event, "event_time": now_ms + 7 * 24 * 3_600_000})
    raise ValueError(f"unknown malformed kind {kind!r}")


MALFORMED_KINDS = (MALFORMED_AVRO, UNKNOWN_SCHEMA, MISSING_USER_ID, FUTURE_EVENT_TIME)


def malformed_records(count: int) -> Iterator[Record]:
    """``count`` bad records, cycling through every kind."""
    for i in range(count):
        yield None, malformed_event(MALFORMED_KINDS[i % len(MALFORMED_KINDS)])
