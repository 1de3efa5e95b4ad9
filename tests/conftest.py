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


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory):
    """A model registry with one bundle trained on generated history (shared by the whole session)."""
    from jobs.config import load_config
    from models.training import train_and_publish

    model_dir = tmp_path_factory.mktemp("models")
    cfg = load_config({"model_dir": str(model_dir)}, environ={})
    train_and_publish(cfg, n_users=600, seed=7)
    return model_dir


@pytest.fixture(scope="session")
def live_services(tmp_path_factory, trained_model_dir):
    """Real Kafka broker + standalone Flink cluster on free ports, for the end-to-end tests; stopped at the end."""
    from jobs import services
    from jobs.config import load_config
    from jobs.provision import provision

    taken: set[int] = set()

    def port() -> int:
        p = services._free_port()
        while p in taken:
            p = services._free_port()
        taken.add(p)
        return p

    cfg = load_config(
        {
            "state_dir": tmp_path_factory.mktemp("onramp-e2e"),
            "model_dir": str(trained_model_dir),
            "kafka_port": port(),
            "kafka_controller_port": port(),
            "flink_rest_port": port(),
            "service_timeout_s": 120,
        },
        environ={},
    )
    provision(cfg)
    services.up(cfg)
    try:
        yield cfg
    finally:
        services.down(cfg)
