"""Read the two ids at the front of a single-object encoded OnboardingEvent without decoding the record.

The job keys its stream by user before decoding (decoding happens once, in the keyed operator), so the key
selector must be cheap: ``event_id`` and ``user_id`` are the record's first two fields, Avro strings (zig-zag
varint length + UTF-8 bytes) right after the 10-byte header. This holds for every schema version as long as
those two fields stay first, which the schema's documentation requires.
"""

from __future__ import annotations

from udfs.avro_codec import HEADER_LEN, MAGIC


def read_ids(payload: bytes) -> tuple[bytes, bytes]:
    """(event_id, user_id) as raw UTF-8 bytes; raises IndexError/ValueError on a short or foreign record."""
    if payload[:2] != MAGIC:
        raise ValueError("not single-object encoded")
    pos = HEADER_LEN
    out = []
    for _ in range(2):
        shift = value = 0
        while True:
            byte = payload[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        length = (value >> 1) ^ -(value & 1)
        if length < 0 or pos + length > len(payload):
            raise ValueError("string runs past the record")
        out.append(payload[pos:pos + length])
        pos += length
    return out[0], out[1]


def routing_key(payload: bytes) -> str:
    """The user id to key by, or "" when the record is too broken to tell (it is dead-lettered downstream)."""
    try:
        return read_ids(payload)[1].decode()
    except (IndexError, ValueError):
        return ""
