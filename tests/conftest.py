"""Shared fixtures: valid events and a fixed clock."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

NOW_MS = 1_790_000_000_000


def make_event(event_type: str = "page_view", user_id: str = "user-1", t: int = NOW_MS, **props: str) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "user_id": user_id,
        "anonymous_id": None,
        "event_type": event_type,
        "event_time": t,
        "demographic": None,
        "context": None,
        "consent": None,
        "properties": dict(props),
    }


@pytest.fixture
def event_factory():
    return make_event


@pytest.fixture
def now_ms() -> int:
    return time.time_ns() // 1_000_000
