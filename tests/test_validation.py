"""Semantic validation after decode: every dead-letter code."""

from __future__ import annotations

import pytest

from udfs.avro_codec import event_codec
from udfs.validation import InvalidEvent, ValidationLimits, decode_event

from tests.conftest import NOW_MS, make_event

LIMITS = ValidationLimits(max_future_skew_ms=60_000, max_event_age_ms=86_400_000)


def _decode(event):
    codec = event_codec()
    return decode_event(codec, codec.encode(event), NOW_MS, LIMITS)


def test_valid_event_passes():
    event = make_event()
    assert _decode(event) == event


@pytest.mark.parametrize(
    "changes, code",
    [
        ({"user_id": ""}, "missing_user_id"),
        ({"user_id": "   "}, "missing_user_id"),
        ({"event_id": ""}, "missing_event_id"),
        ({"event_type": "unknown"}, "unknown_event_type"),
        ({"event_time": NOW_MS + 61_000}, "future_event_time"),
        ({"event_time": NOW_MS - 86_400_001}, "stale_event_time"),
        ({"user_id": "u" * 200}, "field_too_long"),
    ],
)
def test_invalid_events_are_rejected_with_their_code(changes, code):
    with pytest.raises(InvalidEvent) as err:
        _decode({**make_event(), **changes})
    assert err.value.code == code
    assert err.value.message


def test_small_clock_skew_is_tolerated():
    assert _decode({**make_event(), "event_time": NOW_MS + 59_000})["event_time"] == NOW_MS + 59_000


def test_accepted_events_are_normalized_the_same_way_for_stream_and_training():
    event = make_event("signup")
    event["demographic"] = {"country": " germany ", "age_band": "25-34", "occupation": " Engineer"}
    event["context"] = {"device": "iPhone", "referral_source": "Ads ", "locale": "pt_br.UTF-8", "session_id": "s-1"}
    decoded = _decode(event)
    assert decoded["demographic"] == {"country": "DE", "age_band": "25-34", "occupation": "engineer"}
    assert decoded["context"] == {"device": "mobile", "referral_source": "ads", "locale": "pt-BR", "session_id": "s-1"}
