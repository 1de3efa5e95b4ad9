"""The key selector reads the ids off the wire, exactly as the decoder would, and keys by their pseudonym."""

from __future__ import annotations

from udfs.avro_codec import event_codec
from udfs.pseudonym import key_from_text
from udfs.wire_peek import read_ids, routing_key

from tests.conftest import make_event

KEY = key_from_text("k" * 40, "test")


def test_ids_match_the_decoded_record():
    event = make_event(user_id="ü-user-" + "x" * 70)  # multi-byte UTF-8 and a two-byte varint length
    payload = event_codec().encode(event)
    assert read_ids(payload) == (event["event_id"].encode(), event["user_id"].encode(), None)
    assert routing_key(payload, KEY) == KEY.user(event["user_id"])
    assert event["user_id"] not in routing_key(payload, KEY)


def _event(user_id: str, anonymous_id: str | None) -> dict:
    return {**make_event(user_id=user_id), "anonymous_id": anonymous_id}


def test_an_event_before_signup_routes_by_its_anonymous_id():
    payload = event_codec().encode(_event("", "device-7"))
    assert read_ids(payload)[2] == b"device-7"
    assert routing_key(payload, KEY) == KEY.anon("device-7")
    # an alias link (both ids) belongs to the user
    linked = event_codec().encode(_event("u-1", "device-7"))
    assert routing_key(linked, KEY) == KEY.user("u-1")


def test_broken_records_route_to_the_empty_key():
    payload = event_codec().encode(make_event())
    assert routing_key(b"", KEY) == ""
    assert routing_key(payload[:12], KEY) == ""
    assert routing_key(b"\x00\x01" + payload[2:], KEY) == ""
    assert routing_key(event_codec().encode(_event("", None)), KEY) == ""
