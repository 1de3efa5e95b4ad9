"""The key selector reads the user id off the wire, exactly as the decoder would."""

from __future__ import annotations

from udfs.avro_codec import event_codec
from udfs.wire_peek import read_ids, routing_key

from tests.conftest import make_event


def test_ids_match_the_decoded_record():
    event = make_event(user_id="ü-user-" + "x" * 70)  # multi-byte UTF-8 and a two-byte varint length
    payload = event_codec().encode(event)
    assert read_ids(payload) == (event["event_id"].encode(), event["user_id"].encode())
    assert routing_key(payload) == event["user_id"]


def test_broken_records_route_to_the_empty_key():
    payload = event_codec().encode(make_event())
    assert routing_key(b"") == ""
    assert routing_key(payload[:12]) == ""
    assert routing_key(b"\x00\x01" + payload[2:]) == ""
