"""The synthetic onboarding generator: reproducible, schema-valid, persona-shaped."""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import fastavro
import pytest

from models.generator import DAY_MS, PERSONA_NAMES, generate, iter_events
from udfs.avro_codec import event_codec
from udfs.onboarding_catalog import EVENT_TYPES, ONBOARDING_STEPS, TOPICS
from udfs.validation import ValidationLimits, check_event

START = 1_780_000_000_000  # fixed, so runs are byte-identical


@pytest.fixture(scope="module")
def data():
    return generate(1000, seed=11, start_ms=START, span_days=14)


def test_reproducible_per_seed():
    a = generate(150, seed=5, start_ms=START)
    b = generate(150, seed=5, start_ms=START)
    c = generate(150, seed=6, start_ms=START)
    assert a == b
    assert [e["event_id"] for e in a[0]] != [e["event_id"] for e in c[0]]


def test_iter_events_matches_generate_and_stops_at_max_events():
    events, _ = generate(120, seed=3, start_ms=START)
    assert list(iter_events(120, seed=3, start_ms=START)) == events
    assert list(iter_events(120, seed=3, start_ms=START, max_events=57)) == events[:57]


def test_events_sorted_interleaved_and_inside_window(data):
    events, truths = data
    times = [e["event_time"] for e in events]
    assert times == sorted(times)
    assert START <= times[0] and times[-1] <= START + 14 * DAY_MS
    assert len(truths) == 1000 and len({t.user_id for t in truths}) == 1000
    # users are interleaved, not emitted one after the other
    switches = sum(1 for a, b in zip(events, events[1:]) if a["user_id"] != b["user_id"])
    assert switches > 10 * len(truths)


def test_default_start_is_recent():
    now = int(time.time() * 1000)
    events, _ = generate(30, seed=1, span_days=2)
    assert now - 2 * DAY_MS - 1000 <= events[0]["event_time"] and events[-1]["event_time"] <= int(time.time() * 1000)


def test_events_are_valid_avro_and_pass_edge_validation(data):
    events, _ = data
    codec = event_codec()
    schema = codec.schema.parsed
    limits = ValidationLimits()
    now = events[-1]["event_time"]
    for event in events[:5000]:
        assert fastavro.validation.validate(event, schema, raise_errors=True)
        assert codec.decode(codec.encode(event)) == event
        check_event(event, now, limits)
    assert len({e["event_id"] for e in events}) == len(events)


def test_vocabulary_and_structure(data):
    events, truths = data
    assert {e["event_type"] for e in events} <= set(EVENT_TYPES)
    by_user = defaultdict(list)
    for e in events:
        by_user[e["user_id"]].append(e)
        props = e["properties"]
        if e["event_type"] in ("page_view", "feature_used"):
            assert props["topic"] in TOPICS
            assert props.get("feature" if e["event_type"] == "feature_used" else "page")
        if e["event_type"].startswith("step_"):
            assert props["step_id"] in ONBOARDING_STEPS
    for truth in truths:
        user_events = by_user[truth.user_id]
        first = user_events[0]
        assert first["event_type"] == "signup" and first["event_time"] == truth.signup_ms
        assert set(first["demographic"]) == {"country", "age_band", "occupation"}
        assert first["context"]["device"] and first["context"]["session_id"] and first["consent"] is not None
        times = [e["event_time"] for e in user_events]
        assert times == sorted(times) and len(set(times)) == len(times)
        completed = [e for e in user_events if e["event_type"] == "onboarding_completed"]
        if truth.churned:
            assert not completed
        elif truth.signup_ms < START + 7 * DAY_MS:  # early enough not to be cut off by the window end
            assert len(completed) == 1


def test_personas_balanced_and_plausible(data):
    events, truths = data
    counts = Counter(t.persona for t in truths)
    assert set(counts) == set(PERSONA_NAMES)
    assert all(0.18 <= n / len(truths) <= 0.32 for n in counts.values()), counts
    assert 20 <= len(events) / len(truths) <= 32
    signups = [e for e in events if e["event_type"] == "signup"]
    consent = sum(e["consent"]["personalization"] for e in signups) / len(signups)
    assert 0.85 <= consent <= 0.95
    churn = {p: sum(t.churned for t in truths if t.persona == p) / counts[p] for p in counts}
    assert churn["casual_mobile"] > churn["data_explorer"] + 0.15, churn
    persona = {t.user_id: t.persona for t in truths}
    mobile = Counter(persona[e["user_id"]] for e in signups if e["context"]["device"] in ("mobile", "tablet"))
    assert mobile["casual_mobile"] > 0.8 * counts["casual_mobile"]
