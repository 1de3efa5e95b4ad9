"""Small, idempotent Kafka admin helpers on kafka-python's KafkaAdminClient."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import Any, Iterator

from kafka import KafkaAdminClient
from kafka import errors as kafka_errors

from jobs.config import OnrampConfig
from jobs.kafka_security import explain_connection_errors, python_client_kwargs

log = logging.getLogger("jobs.kafka_admin")


class BrokerUnavailable(TimeoutError):
    """No Kafka broker answered at the bootstrap address within the timeout."""


def _hosts(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for item in bootstrap.split(","):
        item = item.strip()
        if not item:
            continue
        host, _, port = item.rpartition(":")
        out.append((host.strip("[]") or "localhost", int(port or 9092)))
    return out


def _any_port_open(bootstrap: str, timeout_s: float = 1.0) -> bool:
    for host, port in _hosts(bootstrap):
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return True
        except OSError:
            continue
    return False


def reachable(bootstrap: str, timeout_s: float = 1.0) -> bool:
    """Whether any bootstrap address accepts a TCP connection: a quick "is anything there" before a client that
    would otherwise retry for its whole bootstrap timeout."""
    return _any_port_open(bootstrap, timeout_s)


def require_broker(cfg: OnrampConfig) -> None:
    """Fail at once, saying what to do, when no bootstrap address accepts a connection: a kafka-python client
    would retry for its whole bootstrap timeout (~30 s) and log every attempt first. For commands a user runs
    against a broker that should already be up; code that waits for a starting broker uses wait_for_broker."""
    if not reachable(cfg.bootstrap_servers, timeout_s=2.0):
        raise BrokerUnavailable(f"nothing accepts connections at {cfg.bootstrap_servers}: start the broker (`onramp "
                                f"up` starts the local one), or fix --bootstrap-servers / ONRAMP_BOOTSTRAP_SERVERS")


@contextlib.contextmanager
def admin_client(bootstrap: str, *, timeout_s: float = 10.0, cfg: OnrampConfig | None = None,
                 **configs: Any) -> Iterator[KafkaAdminClient]:
    """An admin client; with ``cfg``, over its transport security and with its connection errors explained."""
    with explain_connection_errors(cfg):
        client = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="onramp-admin",
            bootstrap_timeout_ms=int(timeout_s * 1000),
            request_timeout_ms=int(max(timeout_s, 1.0) * 1000),
            **(python_client_kwargs(cfg) if cfg is not None else {}),
            **configs,
        )
    try:
        yield client
    finally:
        client.close()


def probe_broker(bootstrap: str, timeout_s: float = 3.0, cfg: OnrampConfig | None = None) -> dict | None:
    """One quick metadata round trip (over ``cfg``'s transport security when given); the cluster description, or
    None if no broker answered."""
    if not _any_port_open(bootstrap, timeout_s=min(timeout_s, 1.0)):
        return None
    try:
        with admin_client(bootstrap, timeout_s=timeout_s, cfg=cfg) as admin:
            cluster = admin.describe_cluster()
    except Exception as exc:  # kafka-python raises a zoo of errors while a broker is starting
        log.debug("broker at %s not ready: %s", bootstrap, exc)
        return None
    brokers = cluster.get("brokers") or []
    if not brokers or all(b.get("is_fenced") for b in brokers):
        return None
    return cluster


def wait_for_broker(bootstrap: str, timeout_s: float, cfg: OnrampConfig | None = None) -> dict:
    """Block until a broker at ``bootstrap`` answers a metadata request; returns the cluster description.

    Retries with exponential backoff (0.3 s doubling to 5 s), so a broker that is still starting is waited for;
    raises BrokerUnavailable, saying what to check, after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    backoff = 0.3
    attempts = 0
    while True:
        remaining = deadline - time.monotonic()
        cluster = probe_broker(bootstrap, timeout_s=max(1.0, min(5.0, remaining)), cfg=cfg)
        attempts += 1
        if cluster is not None:
            return cluster
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerUnavailable(
                f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f}s ({attempts} attempts); start it "
                "(`onramp up`), or fix --bootstrap-servers / the kafka.* security settings"
            )
        log.info("Kafka broker at %s not reachable yet; retrying in %.1fs", bootstrap, min(backoff, remaining))
        time.sleep(min(backoff, remaining))
        backoff = min(backoff * 2, 5.0)


def ensure_topics(
    cfg: OnrampConfig,
    topics: list[str],
    partitions: int | None = None,
    *,
    replication_factor: int = 1,
    configs: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet (``partitions`` defaults to ``cfg.topic_partitions``).

    Idempotent: existing topics are left as they are (a differing partition count is logged, never changed).
    Returns the names actually created. Waits until every topic has a leader.
    """
    partitions = cfg.topic_partitions if partitions is None else partitions
    wanted = list(dict.fromkeys(topics))
    if not wanted:
        return []
    with admin_client(cfg.bootstrap_servers, timeout_s=timeout_s, cfg=cfg) as admin:
        existing = {t["name"]: t for t in admin.describe_topics(wanted) if t.get("error_code", 0) == 0}
        for name, info in existing.items():
            have = len(info.get("partitions") or [])
            if have != partitions:
                log.warning("topic %s exists with %d partition(s), not %d; leaving it as is", name, have, partitions)
        missing = [t for t in wanted if t not in existing]
        created: list[str] = []
        if missing:
            spec = {
                t: {"num_partitions": partitions, "replication_factor": replication_factor, "configs": configs or {}}
                for t in missing
            }
            result = admin.create_topics(spec, timeout_ms=int(timeout_s * 1000), raise_errors=False)
            for topic in result.get("topics", []):
                err = kafka_errors.for_code(topic.get("error_code", 0))
                if err is kafka_errors.NoError:
                    created.append(topic["name"])
                elif err is not kafka_errors.TopicAlreadyExistsError:  # lost a race with another creator
                    raise RuntimeError(
                        f"could not create topic {topic['name']!r}: {err.__name__} {topic.get('error_message') or ''}"
                    )
        admin.wait_for_topics(wanted, timeout_ms=int(timeout_s * 1000))
    if created:
        log.info("created topic(s) %s with %d partition(s)", ", ".join(created), partitions)
    return created


def delete_topics(cfg: OnrampConfig, topics: list[str], *, timeout_s: float = 30.0) -> list[str]:
    """Delete the topics that exist; missing ones are ignored. Returns the names actually deleted."""
    wanted = list(dict.fromkeys(topics))
    if not wanted:
        return []
    deleted: list[str] = []
    with admin_client(cfg.bootstrap_servers, timeout_s=timeout_s, cfg=cfg) as admin:
        result = admin.delete_topics(wanted, timeout_ms=int(timeout_s * 1000), raise_errors=False)
        for topic in result.get("topics", []):
            err = kafka_errors.for_code(topic.get("error_code", 0))
            if err is kafka_errors.NoError:
                deleted.append(topic["name"])
            elif err is not kafka_errors.UnknownTopicOrPartitionError:
                raise RuntimeError(f"could not delete topic {topic.get('name')!r}: {err.__name__}")
    if deleted:
        log.info("deleted topic(s) %s", ", ".join(deleted))
    return deleted
