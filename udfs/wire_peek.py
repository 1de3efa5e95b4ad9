"""Read the ids at the front of a single-object encoded OnboardingEvent without decoding the record.

The job keys its stream by user before decoding (decoding happens once, in the keyed operator), so the key
selector must be cheap: ``event_id``, ``user_id`` and ``anonymous_id`` are the record's first three fields,
right after the 10-byte header. This holds for every schema version as long as those fields stay first, which
the schema's documentation requires. The key is the id's pseudonym (:mod:`udfs.pseudonym`): raw ids never
reach keyed state.
"""

from __future__ import annotations

from udfs.avro_codec import HEADER_LEN, MAGIC
from udfs.pseudonym import PseudonymKey


def _varint(payload: bytes, pos: int) -> tuple[int, int]:
    """A zig-zag varint at ``pos``: (value, next position)."""
    shift = value = 0
    while True:
        byte = payload[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return (value >> 1) ^ -(value & 1), pos
        if shift > 63:
            raise ValueError("runaway varint")


def _string(payload: bytes, pos: int) -> tuple[bytes, int]:
    length, pos = _varint(payload, pos)
    if length < 0 or pos + length > len(payload):
        raise ValueError("string runs past the record")
    return payload[pos:pos + length], pos + length


def read_ids(payload: bytes) -> tuple[bytes, bytes, bytes | None]:
    """(event_id, user_id, anonymous_id or None) as raw UTF-8 bytes; raises IndexError/ValueError on a short or
    foreign record. ``anonymous_id`` is the third field, a ``["null", "string"]`` union (branch index first)."""
    if payload[:2] != MAGIC:
        raise ValueError("not single-object encoded")
    event_id, pos = _string(payload, HEADER_LEN)
    user_id, pos = _string(payload, pos)
    branch, pos = _varint(payload, pos)
    if branch == 0:
        return event_id, user_id, None
    if branch != 1:
        raise ValueError("anonymous_id: bad union branch")
    anonymous_id, _ = _string(payload, pos)
    return event_id, user_id, anonymous_id


def routing_key(payload: bytes, key: PseudonymKey) -> str:
    """The pseudonym to key by: of the user id, or of the anonymous id for an event before signup (no user id);
    "" when the record is too broken to tell or names neither (it is dead-lettered downstream).

    Reads no further than it needs (the anonymous id only when there is no user id), like the Java twin, so both
    give the same key for every payload, broken ones included."""
    try:
        if payload[:2] != MAGIC:
            return ""
        _, pos = _string(payload, HEADER_LEN)
        user_id, pos = _string(payload, pos)
        if user_id:
            return key.user(user_id.decode())
        branch, pos = _varint(payload, pos)
        if branch == 1:
            anonymous_id, _ = _string(payload, pos)
            if anonymous_id:
                return key.anon(anonymous_id.decode())
    except (IndexError, ValueError):  # UnicodeDecodeError is a ValueError
        pass
    return ""
