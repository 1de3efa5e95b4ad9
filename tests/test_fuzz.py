"""Fuzzing the edge of the job: whatever bytes arrive on the input topic, the decoder/validator decides or
rejects with a known dead-letter code, and the keyed personalize function emits exactly one record for them.

Four properties (hypothesis):

1. random bytes, alone or behind a real header (``C3 01`` + a known fingerprint) so they reach the Avro
   decoder: :func:`udfs.validation.decode_event` returns a dict or raises ``InvalidEvent`` with a known code;
2. real encoded events (``make_event`` and generator events) with their bytes mutated (bit flips, overwritten,
   inserted, deleted, duplicated bytes, truncation, extreme varints, splices of two records): same property;
3. structured mutations at the dict level (empty / blank / huge / unicode ids, extreme timestamps, event types a
   newer writer knows but this reader does not, missing optional fields and maps) encoded with the codec:
   same property, and an accepted (normalized) event re-encodes and is accepted unchanged a second time;
4. end to end through the keyed function (no cluster, a real trained model bundle, a consenting user so the
   personalized path runs): for every fuzzed payload ``Personalize.process_element`` never raises and yields
   exactly one output, either a decision for the same event or a dead letter on the side output carrying the
   original bytes, its position and the code ``decode_event`` gives for the payload. The one documented
   exception: a valid event whose id the user's profile has already seen yields nothing (deduplication) and
   counts in ``duplicates``.

Reproducible by default (``derandomize=True``: the same examples on every run, about 300 per property).
Longer local fuzzing::

    ONRAMP_FUZZ_EXAMPLES=20000 ONRAMP_FUZZ_RANDOM=1 .venv/bin/python -m pytest -q tests/test_fuzz.py

``ONRAMP_FUZZ_EXAMPLES`` sets the examples per property; ``ONRAMP_FUZZ_RANDOM=1`` draws fresh random examples
(and keeps failures in hypothesis' example database) instead of the fixed derandomized sequence. A failure
prints the minimal input and a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyflink.common import Row

from models.generator import DAY_MS, generate
from udfs import flink_functions
from udfs.avro_codec import (
    AVRO_DIR,
    EVENT_SCHEMA,
    MAGIC,
    SchemaStore,
    SchemaVersion,
    SingleObjectCodec,
    dead_letter_codec,
    decision_codec,
)
from udfs.flink_functions import AUDIT, DEAD_LETTERS, IDENTITY
from udfs.model_bundle import load_current
from udfs.validation import (
    FIELD_TOO_LONG,
    FUTURE_EVENT_TIME,
    MALFORMED_AVRO,
    MISSING_EVENT_ID,
    MISSING_USER_ID,
    NOT_SINGLE_OBJECT,
    PROCESSING_ERROR,
    STALE_EVENT_TIME,
    UNKNOWN_EVENT_TYPE,
    UNKNOWN_SCHEMA,
    InvalidEvent,
    ValidationLimits,
    decode_event,
)
from udfs.pseudonym import key_from_text
from udfs.wire_peek import routing_key

from tests.conftest import NOW_MS, make_event

KEY = key_from_text("fuzz-" * 8, "test")
from tests.test_personalize_function import FakeContext, FakeState, _function

# ----------------------------------------------------------------------------------------------------------------
# settings

EXAMPLES = int(os.environ.get("ONRAMP_FUZZ_EXAMPLES", "300"))
RANDOM = os.environ.get("ONRAMP_FUZZ_RANDOM", "") not in ("", "0")
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None if not RANDOM else settings.default.database,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# Codes decode_event may raise; process_element adds processing_error for failures after decoding.
DECODE_CODES = frozenset({
    NOT_SINGLE_OBJECT, UNKNOWN_SCHEMA, MALFORMED_AVRO, MISSING_EVENT_ID, MISSING_USER_ID, UNKNOWN_EVENT_TYPE,
    FUTURE_EVENT_TIME, STALE_EVENT_TIME, FIELD_TOO_LONG,
})
DEAD_LETTER_CODES = DECODE_CODES | {PROCESSING_ERROR}

LIMITS = ValidationLimits()
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# ----------------------------------------------------------------------------------------------------------------
# a store that also knows a newer writer version of OnboardingEvent (more enum symbols, one more field), so the
# fuzzer can send event types this reader does not know and exercise writer -> reader schema resolution


def _newer_event_schema() -> dict:
    schema = json.loads((Path(AVRO_DIR) / "onboarding_event.avsc").read_text())
    for field in schema["fields"]:
        if field["name"] == "event_type":
            field["type"]["symbols"] = [*field["type"]["symbols"], "trial_started", "plan_upgraded"]
    schema["fields"].append({"name": "app_version", "type": ["null", "string"], "default": None})
    return schema


STORE = SchemaStore.load()
NEWER = STORE.add(SchemaVersion.from_json(_newer_event_schema(), "<fuzz: newer writer>"))
CODEC = SingleObjectCodec(STORE, EVENT_SCHEMA)  # reader: the schema the code is written for
NEWER_WRITER = SingleObjectCodec(STORE, EVENT_SCHEMA, writer=NEWER)
EVENT_TYPES = [s for f in CODEC.schema.parsed["fields"] if f["name"] == "event_type" for s in f["type"]["symbols"]]
NEW_EVENT_TYPES = ["trial_started", "plan_upgraded"]

FINGERPRINTS = [
    CODEC.schema.fingerprint,  # the reader's own
    NEWER.fingerprint,  # a known other version of the same record
    decision_codec(STORE).schema.fingerprint,  # known, but another record type
    dead_letter_codec(STORE).schema.fingerprint,
    b"\x00" * 8,  # unknown
]


def _decide_or_reject(payload: bytes, now_ms: int = NOW_MS) -> tuple[str, dict | str]:
    """("ok", event) or ("dead", code); any other exception escapes and fails the property."""
    try:
        event = decode_event(CODEC, payload, now_ms, LIMITS)
    except InvalidEvent as exc:
        assert exc.code in DECODE_CODES, f"unknown dead-letter code {exc.code!r}: {exc.message}"
        assert isinstance(exc.message, str)
        return "dead", exc.code
    assert isinstance(event, dict)
    assert {"event_id", "user_id", "event_type", "event_time", "properties"} <= event.keys()
    return "ok", event


# ----------------------------------------------------------------------------------------------------------------
# seed corpus: real encoded events


def _full_event(event_type: str, **overrides) -> dict:
    event = make_event(event_type, step_id="profile_setup", topic="analytics", page="/home")
    event.update(
        anonymous_id="anon-7",
        demographic={"country": "DE", "age_band": "25-34", "occupation": "engineer"},
        context={"device": "mobile", "referral_source": "ads", "locale": "de-DE", "session_id": "s-1"},
        consent={"personalization": True, "analytics": True, "marketing": False},
    )
    event.update(overrides)
    return event


def _corpus() -> list[bytes]:
    events = [make_event(t) for t in ("signup", "page_view", "step_completed", "erasure_requested")]
    events += [_full_event(t) for t in ("signup", "feature_used", "consent_updated", "step_skipped")]
    generated, _ = generate(12, seed=3, start_ms=NOW_MS - 14 * DAY_MS, span_days=14)
    events += generated[:: max(1, len(generated) // 40)][:40]
    payloads = [CODEC.encode(e) for e in events]
    payloads.append(NEWER_WRITER.encode({**_full_event("signup"), "event_type": "plan_upgraded", "app_version": "9"}))
    return payloads


CORPUS = _corpus()


def _varint(n: int) -> bytes:
    """Avro zig-zag varint of a (64-bit) long."""
    z = ((n << 1) ^ (n >> 63)) & 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


EXTREME_LONGS = [0, -1, 1, 63, -64, 127, 128, 10**6, 2**31 - 1, -(2**31), 2**62, INT64_MAX, INT64_MIN]


@st.composite
def mutated_payloads(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "duplicate", "varint", "splice"]))
        # mostly aim behind the header, where the Avro decoder works
        lo = 0 if draw(st.integers(0, 9)) == 0 else min(10, len(data))
        i = draw(st.integers(lo, max(lo, len(data))))
        if op == "flip" and i < len(data):
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and i < len(data):
            data[i] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC3, 0xFE, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[i:]
        elif op == "duplicate":
            j = draw(st.integers(i, min(len(data), i + 32)))
            k = draw(st.integers(0, len(data)))
            data[k:k] = data[i:j]
        elif op == "varint":
            n = draw(st.sampled_from(EXTREME_LONGS) | st.integers(INT64_MIN, INT64_MAX))
            if draw(st.booleans()):
                data[i:i] = _varint(n)
            else:  # overwrite the varint (or bytes) at i
                data[i:i + draw(st.integers(1, 10))] = _varint(n)
        elif op == "splice":
            other = draw(st.sampled_from(CORPUS))
            data = data[:i] + other[draw(st.integers(0, len(other))):]
    return bytes(data)


headers = st.sampled_from([MAGIC + fp for fp in FINGERPRINTS])
random_payloads = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=512),
    st.builds(lambda h, body: h + body, headers, st.binary(max_size=256)),
    st.builds(lambda h, body: h + body, st.sampled_from([b"", b"\xc3", b"\x01\xc3", b"\xc3\x00"]), st.binary(max_size=32)),
)

# ----------------------------------------------------------------------------------------------------------------
# structured events

HUGE = 70_000
ids = st.one_of(
    st.uuids().map(str),  # valid ids (twice: most structured events should get past the id checks)
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cc", "Zs", "Zl", "Zp"]), min_size=1,
            max_size=64),
    st.just(""),
    st.sampled_from([" ", "\t\n", "\u00a0", "\u3000", "\u200b"]),  # blank, incl. unicode spaces and zero-width
    st.text(min_size=1, max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=120, max_size=140),  # around MAX_ID_LENGTH
    st.sampled_from(["x" * HUGE, "\U0001f600" * 129, "e\u0301" * 100, "\x00", "\x00" * 200, "user-1"]),
)
strings = st.one_of(st.none(), st.text(max_size=30), st.just("y" * HUGE))
times = st.one_of(
    st.integers(NOW_MS - 30 * DAY_MS, NOW_MS + 10 * 60_000),  # around now, both sides of the future skew limit
    st.sampled_from([0, -1, INT64_MIN, INT64_MAX, NOW_MS - LIMITS.max_event_age_ms - 1,
                     NOW_MS + LIMITS.max_future_skew_ms, NOW_MS + LIMITS.max_future_skew_ms + 1]),
    st.integers(INT64_MIN, INT64_MAX),
)
properties = st.dictionaries(
    st.one_of(st.text(max_size=20), st.sampled_from(["step_id", "topic", "feature", "page", "form"])),
    st.one_of(st.text(max_size=30), st.sampled_from(["profile_setup", "connect_data", "analytics", "", "z" * HUGE])),
    max_size=6,
)
demographic = st.fixed_dictionaries({}, optional={"country": strings, "age_band": strings, "occupation": strings})
context = st.fixed_dictionaries({}, optional={"device": strings, "referral_source": strings, "locale": strings,
                                             "session_id": strings})
consent = st.fixed_dictionaries({}, optional={"personalization": st.booleans(), "analytics": st.booleans(),
                                             "marketing": st.booleans()})


@st.composite
def structured_payloads(draw) -> bytes:
    newer = draw(st.integers(0, 4)) == 0
    event = {
        "event_id": draw(ids),
        "user_id": draw(ids),
        "event_type": draw(st.sampled_from(EVENT_TYPES + (NEW_EVENT_TYPES if newer else []))),
        "event_time": draw(times),
    }
    optional = {
        "anonymous_id": strings,
        "demographic": st.none() | demographic,
        "context": st.none() | context,
        "consent": st.none() | consent,
        "properties": properties,
    }
    if newer:
        optional["app_version"] = strings
    for name, strategy in optional.items():
        if draw(st.booleans()):  # otherwise missing: the writer fills the schema default
            event[name] = draw(strategy)
    return (NEWER_WRITER if newer else CODEC).encode(event)


# weighted towards payloads that get past the header, so the validator and the personalizer see many of them
any_payload = st.one_of(random_payloads, mutated_payloads(), mutated_payloads(), structured_payloads(),
                        structured_payloads(), st.sampled_from(CORPUS))


# ----------------------------------------------------------------------------------------------------------------
# 1-3: decoder and validator


def test_corpus_is_valid():
    """The seeds the mutations start from decode and validate (but the newer-writer one, whose type is unknown)."""
    outcomes = [_decide_or_reject(p) for p in CORPUS]
    assert [o for o, _ in outcomes[:-1]] == ["ok"] * (len(CORPUS) - 1)
    assert outcomes[-1] == ("dead", UNKNOWN_EVENT_TYPE)


@FUZZ
@given(random_payloads)
def test_random_bytes_decide_or_dead_letter(payload):
    _decide_or_reject(payload)


@FUZZ
@given(mutated_payloads())
def test_mutated_events_decide_or_dead_letter(payload):
    _decide_or_reject(payload)


@FUZZ
@given(structured_payloads())
def test_structured_events_decide_or_dead_letter(payload):
    outcome, result = _decide_or_reject(payload)
    if outcome == "ok":
        # an accepted (validated and normalized) event still fits the schema, and accepting it again changes
        # nothing: normalization is idempotent (udfs/normalization.py), also through the wire
        again = _decide_or_reject(CODEC.encode(result))
        assert again == ("ok", result)


@FUZZ
@given(any_payload)
def test_routing_key_never_raises(payload):
    """The key selector runs before decoding, on the same untrusted bytes."""
    key = routing_key(payload, KEY)
    assert isinstance(key, str) and len(key) in (0, 32)


# ----------------------------------------------------------------------------------------------------------------
# 4: end to end through the keyed function


@pytest.fixture(scope="module")
def bundle(trained_model_dir):
    return load_current(trained_model_dir)


@pytest.fixture(scope="module")
def personalize(bundle):
    fn = _function(bundle)
    fn.limits = LIMITS
    fn.event_codec = CODEC
    return fn


def _consented_state(fn) -> str:
    """Fresh state holding a profile whose owner consented to personalization, so later events take the
    personalized path; returns the id of the signup event that set it up."""
    fn.profile_state = FakeState()
    signup = _full_event("signup", consent={"personalization": True, "analytics": True, "marketing": True})
    (out,) = _answers(fn.process_element(Row(CODEC.encode(signup), "events", 0, 0), FakeContext()))
    assert decision_codec().decode(out)["personalized"] is True
    return signup["event_id"]


def _answers(outputs) -> list:
    """Decisions and dead letters: what every input must produce exactly one of. Identity resolution's messages to
    other keys (an event naming an anonymous id claims it) and audit records come on top."""
    return [o for o in outputs if not (isinstance(o, tuple) and o[0] in (IDENTITY, AUDIT))]


def _count(fn, counter: str) -> int:
    return getattr(getattr(fn, counter, None), "count", 0)


def test_consenting_user_gets_a_personalized_decision_from_the_bundle(personalize, bundle):
    with mock.patch.object(flink_functions, "_now_ms", lambda: NOW_MS):
        _consented_state(personalize)
        (out,) = _answers(personalize.process_element(Row(CORPUS[1], "events", 0, 1), FakeContext()))
    decision = decision_codec().decode(out)
    assert decision["personalized"] is True and decision["model_version"] == bundle.version
    assert personalize.profile_state.data is not None


@FUZZ
@given(st.lists(any_payload, min_size=1, max_size=4))
def test_personalize_yields_exactly_one_record_per_payload(personalize, payloads):
    fn = personalize
    decisions, dead = decision_codec(), dead_letter_codec()
    with mock.patch.object(flink_functions, "_now_ms", lambda: NOW_MS):
        seen = {_consented_state(fn)}  # event ids already folded into this user's profile
        for offset, payload in enumerate(payloads, start=100):
            expected, detail = _decide_or_reject(payload)
            duplicates_before = _count(fn, "duplicates")
            outputs = _answers(fn.process_element(Row(payload, "events", 5, offset), FakeContext()))
            if not outputs:  # the one documented exception: a repeated event id of the user yields nothing
                assert expected == "ok" and detail["event_id"] in seen, f"no output for {payload!r}"
                assert _count(fn, "duplicates") == duplicates_before + 1
                continue
            assert len(outputs) == 1, f"{len(outputs)} outputs for {payload!r}"
            if expected == "ok":
                seen = set() if detail["event_type"] == "erasure_requested" else seen | {detail["event_id"]}
            (out,) = outputs
            if isinstance(out, tuple):
                tag, letter_bytes = out
                assert tag is DEAD_LETTERS
                letter = dead.decode(letter_bytes)
                assert letter["error_code"] in DEAD_LETTER_CODES
                assert letter["original"] == payload
                assert (letter["topic"], letter["partition"], letter["offset"]) == ("events", 5, offset)
                if expected == "dead":
                    assert letter["error_code"] == detail
                else:  # a valid event the personalizer failed on: handled, but it should not happen
                    assert letter["error_code"] == PROCESSING_ERROR
                    pytest.fail(f"valid event dead-lettered as processing_error: {letter['error_message']}")
            else:
                assert isinstance(out, bytes)
                assert expected == "ok", f"decision for a payload decode_event rejects ({detail})"
                decision = decisions.decode(out)
                assert decision["event_id"] == detail["event_id"] and decision["user_id"] == detail["user_id"]
