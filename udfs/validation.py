"""Edge validation: raw Kafka bytes -> a decoded, semantically valid event, or a dead-letter reason.

Pure functions; the Flink operator that calls them only routes the outcome. Every rejection carries a
machine-readable code (the ``error_code`` of the DeadLetter record) and a human message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from udfs.avro_codec import CodecError, SingleObjectCodec
from udfs.normalization import normalize_event

# Dead-letter codes, in the order the checks run.
NOT_SINGLE_OBJECT = "not_single_object"
UNKNOWN_SCHEMA = "unknown_schema"
MALFORMED_AVRO = "malformed_avro"
MISSING_EVENT_ID = "missing_event_id"
MISSING_USER_ID = "missing_user_id"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
FUTURE_EVENT_TIME = "future_event_time"
STALE_EVENT_TIME = "stale_event_time"
FIELD_TOO_LONG = "field_too_long"
PROCESSING_ERROR = "processing_error"

MAX_ID_LENGTH = 128


class InvalidEvent(ValueError):
    """The event must go to the dead-letter topic with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ValidationLimits:
    max_future_skew_ms: int = 5 * 60 * 1000
    max_event_age_ms: int = 365 * 24 * 3600 * 1000


def check_event(event: dict[str, Any], now_ms: int, limits: ValidationLimits) -> None:
    """Raise :class:`InvalidEvent` if a decoded event may not reach the profile."""
    event_id = event.get("event_id")
    if not event_id or not event_id.strip():
        raise InvalidEvent(MISSING_EVENT_ID, "event_id is empty")
    user_id = event.get("user_id") or ""
    anonymous_id = event.get("anonymous_id") or ""
    if not user_id.strip() and not anonymous_id.strip():
        # before signup an event may carry only the anonymous id (identity resolution, udfs/identity.py)
        raise InvalidEvent(MISSING_USER_ID, f"event {event_id}: user_id and anonymous_id are both empty")
    if user_id and not user_id.strip():
        raise InvalidEvent(MISSING_USER_ID, f"event {event_id}: user_id is blank")
    if len(event_id) > MAX_ID_LENGTH or len(user_id) > MAX_ID_LENGTH or len(anonymous_id) > MAX_ID_LENGTH:
        raise InvalidEvent(FIELD_TOO_LONG, f"event {event_id}: ids are limited to {MAX_ID_LENGTH} characters")
    if event["event_type"] == "unknown":
        raise InvalidEvent(UNKNOWN_EVENT_TYPE, f"event {event_id}: event type not known to this schema version")
    event_time = event["event_time"]
    if event_time > now_ms + limits.max_future_skew_ms:
        raise InvalidEvent(
            FUTURE_EVENT_TIME,
            f"event {event_id}: event_time {event_time} is {(event_time - now_ms) / 1000:.0f}s in the future "
            f"(limit {limits.max_future_skew_ms / 1000:.0f}s)",
        )
    if event_time < now_ms - limits.max_event_age_ms:
        raise InvalidEvent(
            STALE_EVENT_TIME,
            f"event {event_id}: event_time {event_time} is older than {limits.max_event_age_ms / 86_400_000:.0f} days",
        )


def accept_event(event: dict[str, Any], now_ms: int, limits: ValidationLimits) -> dict[str, Any]:
    """Validate a decoded event, then normalize it (country, locale, device, categories: docs/data-quality.md).

    The one gate every event passes on its way to a profile, in the stream and in training alike, so both fold
    the same values into the same features."""
    check_event(event, now_ms, limits)
    return normalize_event(event)


def decode_event(codec: SingleObjectCodec, payload: bytes, now_ms: int, limits: ValidationLimits) -> dict[str, Any]:
    """Decode, validate and normalize one Kafka value; raise :class:`InvalidEvent` with the dead-letter code on
    failure."""
    try:
        event = codec.decode(payload)
    except CodecError as exc:
        raise InvalidEvent(exc.code, exc.message) from None
    return accept_event(event, now_ms, limits)
