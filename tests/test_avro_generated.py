"""The generated Avro writer and reader (udfs/avro_writer.py, udfs/avro_reader.py) agree with fastavro byte for
byte and value for value, for every schema in avro/; what the reader refuses, fastavro still judges."""

from __future__ import annotations

import io
import json
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udfs.avro_codec import (AVRO_DIR, HEADER_LEN, CodecError, SchemaStore, SingleObjectCodec, audit_codec,
                             decision_codec, event_codec)
from udfs.avro_reader import compile_reader
from udfs.avro_writer import compile_writer, zigzag_varint

SCHEMAS = sorted(p.name for p in AVRO_DIR.glob("*.avsc"))
STORE = SchemaStore.load()


def _fastavro(parsed: Any, record: Any) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, record)
    return buf.getvalue()


def _values(schema: Any, named: dict[str, Any]) -> st.SearchStrategy:
    """Records valid for ``schema`` (a fastavro-parsed schema), edges included: empty and long strings,
    int64 extremes, empty collections, unicode."""
    if isinstance(schema, list):
        return st.one_of(*(_values(branch, named) for branch in schema))
    if isinstance(schema, str) and schema in named:
        return _values(named[schema], named)
    kind = schema if isinstance(schema, str) else schema["type"]
    if isinstance(kind, (list, dict)):
        return _values(kind, named)
    text = st.text(max_size=20) | st.just("ünï☃") | st.sampled_from(["a" * 4095, "a" * 4096, "ü" * 2048])
    simple = {
        "null": st.none(),
        "boolean": st.booleans(),
        "int": st.integers(-2**31, 2**31 - 1),
        "long": st.integers(-2**63, 2**63 - 1),
        "double": st.floats(allow_nan=False),
        "float": st.floats(width=32, allow_nan=False),
        "string": text,
        "bytes": st.binary(max_size=40),
    }
    if kind in simple:
        return simple[kind]
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    if kind == "array":
        return st.lists(_values(schema["items"], named), max_size=4)
    if kind == "map":
        return st.dictionaries(text, _values(schema["values"], named), max_size=4)
    if kind == "record":
        named[schema["name"]] = schema
        return st.fixed_dictionaries({f["name"]: _values(f["type"], named) for f in schema["fields"]})
    raise AssertionError(f"schema kind {kind} not covered by this test")


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_schema_compiles(name):
    schema = STORE.reader(_record_name(name))
    assert compile_writer(schema.parsed) is not None
    assert compile_reader(schema.parsed) is not None


def _record_name(file_name: str) -> str:
    schema = json.loads((AVRO_DIR / file_name).read_text())
    return f"{schema['namespace']}.{schema['name']}"


@pytest.mark.parametrize("name", SCHEMAS)
def test_generated_writer_writes_fastavros_bytes(name):
    parsed = STORE.reader(_record_name(name)).parsed
    write = compile_writer(parsed)
    read = compile_reader(parsed)

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_values(parsed, {}))
    def check(record):
        written = write(record)
        assert written == _fastavro(parsed, record)
        try:
            decoded = read(written, 0)
        except ValueError:  # refused (a ten-byte long near ±2**63): the codec then decodes with fastavro
            return
        assert decoded == (fastavro.schemaless_reader(io.BytesIO(written), parsed, None), len(written))

    check()


def test_the_jobs_own_records_encode_the_same(personalized_records):
    """Decisions, audit records and events as the job makes them (not just random values)."""
    for codec, records in personalized_records:
        assert codec._compiled is not None
        assert codec._compiled_reader is not None
        for record in records:
            payload = codec.encode(record)
            assert payload == codec._encode_fastavro(record)
            assert codec._compiled_reader(payload, HEADER_LEN) == (codec.decode(payload), len(payload))
            assert codec.decode(payload) == fastavro.schemaless_reader(io.BytesIO(payload[HEADER_LEN:]),
                                                                        codec.schema.parsed, None)


@pytest.fixture(scope="module")
def personalized_records() -> list[tuple[SingleObjectCodec, list[dict[str, Any]]]]:
    from udfs.audit import decision_audit
    from udfs.personalizer import Personalizer
    from udfs.profile_state import Profile
    from models.generator import generate

    events = generate(n_users=30, seed=11)[0][:400]
    personalizer = Personalizer(None, 6 * 3_600_000.0)
    profiles: dict[str, Profile] = {}
    decisions, audits = [], []
    for event in events:
        profile = profiles.setdefault(event["user_id"] or event["anonymous_id"], Profile())
        if personalizer.fold(profile, event):
            decision = personalizer.decide(profile, event, subject="p")
            decisions.append(decision)
            audits.append(decision_audit(decision, event["event_type"], profile, "p", "key-1"))
    assert decisions and audits
    return [(decision_codec(), decisions), (audit_codec(), audits), (event_codec(), events)]


def test_a_record_it_cannot_write_fails_the_way_fastavro_fails():
    """The codec hands a record the generated code cannot write to fastavro, whose error the caller sees."""
    codec = event_codec()
    from tests.conftest import make_event

    broken = dict(make_event(), event_type=42)
    with pytest.raises(KeyError):  # event_type is an enum: 42 is no symbol
        codec._compiled(broken)
    with pytest.raises(Exception) as generated_error:
        codec.encode(broken)
    with pytest.raises(Exception) as fastavro_error:
        codec._encode_fastavro(broken)
    assert type(generated_error.value) is type(fastavro_error.value)


def test_unsupported_schemas_are_left_to_fastavro():
    three_way = {"type": "record", "name": "R", "fields": [{"name": "x", "type": ["null", "int", "string"]}]}
    assert compile_writer(fastavro.parse_schema(three_way)) is None
    assert compile_reader(fastavro.parse_schema(three_way)) is None


def _decode_outcome(decode, payload):
    try:
        return ("ok", decode(payload))
    except CodecError as exc:
        return ("error", exc.code, exc.message)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_events_get_the_same_outcome_as_with_fastavro_alone(data):
    """Truncated, extended or flipped bytes: the codec (generated reader first) and fastavro alone agree on the
    record or on the dead-letter code and message."""
    from tests.conftest import make_event

    codec = event_codec()
    payload = bytearray(codec.encode(make_event("page_view", page="pricing", topic="analytics")))
    damage = data.draw(st.sampled_from(["truncate", "extend", "flip"]))
    if damage == "truncate":
        payload = payload[: data.draw(st.integers(HEADER_LEN, len(payload) - 1))]
    elif damage == "extend":
        payload += data.draw(st.binary(min_size=1, max_size=4))
    else:
        at = data.draw(st.integers(HEADER_LEN, len(payload) - 1))
        payload[at] ^= data.draw(st.integers(1, 255))
    payload = bytes(payload)

    def fastavro_only(raw: bytes):
        reader, codec._compiled_reader = codec._compiled_reader, None
        try:
            return codec.decode(raw)
        finally:
            codec._compiled_reader = reader

    assert _decode_outcome(codec.decode, payload) == _decode_outcome(fastavro_only, payload)


@pytest.mark.parametrize("n", [0, 1, -1, 63, -64, 64, 4095, 4096, 2**31 - 1, -2**31, 2**63 - 1, -2**63])
def test_zigzag_varint_is_avros_long(n):
    assert zigzag_varint(n) == _fastavro("long", n)
