"""Avro single-object encoding: header, fingerprint, schema resolution, and every decode failure code."""

from __future__ import annotations

import copy
import json

import avro.schema  # the Apache Avro reference implementation, as an independent check of the fingerprint
import pytest

from udfs.avro_codec import AVRO_DIR, MAGIC, CodecError, SchemaStore, SchemaVersion, SingleObjectCodec, event_codec

from tests.conftest import make_event


def test_round_trip_keeps_every_field():
    codec = event_codec()
    event = make_event("signup", topic="analytics")
    event["demographic"] = {"country": "DE", "age_band": "25-34", "occupation": "engineer"}
    event["context"] = {"device": "mobile", "referral_source": "ads", "locale": "de-DE", "session_id": "s1"}
    event["consent"] = {"personalization": True, "analytics": False, "marketing": False}
    payload = codec.encode(event)
    assert payload[:2] == MAGIC
    assert codec.decode(payload) == event


def test_fingerprint_matches_the_reference_implementation():
    # The spec's canonical form turns {"type": "long", "logicalType": ...} into "long" (as Java does); the Python
    # reference library keeps {"type":"long"} there, so compare on the schema with logical types written plainly.
    text = (AVRO_DIR / "onboarding_event.avsc").read_text()
    plain = text.replace('{"type": "long", "logicalType": "timestamp-millis"}', '"long"')
    assert plain != text
    reference = avro.schema.parse(plain).fingerprint("CRC-64-AVRO")
    assert event_codec().schema.fingerprint == bytes(reference)
    assert SchemaVersion.from_json(json.loads(plain)).fingerprint == event_codec().schema.fingerprint


def _newer_event_schema() -> dict:
    schema = json.loads((AVRO_DIR / "onboarding_event.avsc").read_text())
    newer = copy.deepcopy(schema)
    newer["fields"].append({"name": "app_version", "type": ["null", "string"], "default": None})
    enum = next(f for f in newer["fields"] if f["name"] == "event_type")["type"]
    enum["symbols"] = enum["symbols"][:-1] + ["plan_upgraded", "unknown"]
    return newer


def test_compatible_newer_writer_schema_still_decodes():
    store = SchemaStore.load()
    newer = store.add(SchemaVersion.from_json(_newer_event_schema(), "v2"))
    writer = SingleObjectCodec(store, "io.onramp.OnboardingEvent", writer=newer)
    reader = SingleObjectCodec(store, "io.onramp.OnboardingEvent")
    event = {**make_event("feature_used"), "app_version": "5.1"}
    decoded = reader.decode(writer.encode(event))
    assert "app_version" not in decoded
    assert decoded["event_type"] == "feature_used"
    # A symbol the reader does not know resolves to the enum default and is dead-lettered by validation.
    assert reader.decode(writer.encode({**event, "event_type": "plan_upgraded"}))["event_type"] == "unknown"


def test_writer_schema_outside_the_store_is_unknown():
    store = SchemaStore.load()
    outsider = SchemaVersion.from_json(_newer_event_schema(), "v2")  # never added to the store
    payload = SingleObjectCodec(store, "io.onramp.OnboardingEvent", writer=outsider).encode(
        {**make_event(), "app_version": None}
    )
    with pytest.raises(CodecError) as err:
        event_codec().decode(payload)
    assert err.value.code == "unknown_schema"


@pytest.mark.parametrize(
    "mutate, code",
    [
        (lambda b: b[:-5], "malformed_avro"),
        (lambda b: b + b"\x00\x01", "malformed_avro"),
        (lambda b: b"\x00\x01" + b[2:], "not_single_object"),
        (lambda b: b[:4], "not_single_object"),
        (lambda b: MAGIC + bytes(8) + b[10:], "unknown_schema"),
    ],
)
def test_decode_failures_have_codes(mutate, code):
    codec = event_codec()
    with pytest.raises(CodecError) as err:
        codec.decode(mutate(codec.encode(make_event())))
    assert err.value.code == code


def test_another_record_type_is_refused():
    from udfs.avro_codec import dead_letter_codec

    payload = dead_letter_codec().encode(
        {"original": b"x", "topic": "t", "partition": 0, "offset": 1, "error_code": "c", "error_message": "m", "failed_at": 1}
    )
    with pytest.raises(CodecError) as err:
        event_codec().decode(payload)
    assert err.value.code == "unknown_schema"
