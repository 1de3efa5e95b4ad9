"""Kafka clients at the edges: send events at a steady rate, read decisions and dead letters back.

kafka-python is used (pure Python, no native client to install). Transport security (SASL/SSL) comes from the
config's kafka_security_protocol / kafka_ssl_* / kafka_sasl_* settings (jobs/kafka_security.py); the config's
``extra`` entries named ``kafka.<client option>`` in Java-client spelling are translated here and win.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from jobs.config import OnrampConfig
from jobs.kafka_security import explain_connection_errors, python_client_kwargs

log = logging.getLogger(__name__)

# Java client option -> kafka-python keyword, for the options users set most.
_CLIENT_OPTION_NAMES = {
    "security.protocol": "security_protocol",
    "sasl.mechanism": "sasl_mechanism",
    "sasl.username": "sasl_plain_username",
    "ssl.truststore.pem": "ssl_cafile",
    "ssl.cafile": "ssl_cafile",
    "ssl.certfile": "ssl_certfile",
    "ssl.keyfile": "ssl_keyfile",
}


def client_options(cfg: OnrampConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"bootstrap_servers": cfg.bootstrap_servers.split(","), **python_client_kwargs(cfg)}
    for key, value in cfg.extra.items():
        if key.startswith("kafka.") and key[len("kafka."):] in _CLIENT_OPTION_NAMES:
            options[_CLIENT_OPTION_NAMES[key[len("kafka."):]]] = value
    return options


def make_producer(cfg: OnrampConfig, **overrides: Any) -> KafkaProducer:
    options = {"acks": "all", "linger_ms": 1, "batch_size": 64 * 1024, **client_options(cfg), **overrides}
    with explain_connection_errors(cfg):
        return KafkaProducer(**options)


@dataclass
class ProduceReport:
    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


class RecordSender(Protocol):
    """What :func:`produce` needs of a producer: kafka-python's ``KafkaProducer`` or the benchmark's librdkafka
    one (jobs/load_generator.py)."""

    def send(self, topic: str, key: bytes | None = ..., value: bytes | None = ...) -> Any: ...

    def flush(self) -> Any: ...

    def close(self) -> Any: ...


def produce(
    producer: RecordSender,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes]],
    rate: float | None = None,
    on_progress: Callable[[int, float], None] | None = None,
    stamp: Callable[[bytes, int], bytes] | None = None,
) -> ProduceReport:
    """Send (key, value) records; ``rate`` events/s paces them (None: as fast as possible).

    ``stamp(value, send_time_ms)`` may rewrite the value just before sending (the benchmark records produce
    time in the event). Pacing sleeps in small steps so a 1,000/s stream stays even, not bursty.
    """
    start = time.perf_counter()
    last_report = start
    sent = 0
    for key, value in records:
        if rate:
            due = start + sent / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        if stamp is not None:
            value = stamp(value, time.time_ns() // 1_000_000)
        producer.send(topic, key=key, value=value)
        sent += 1
        now = time.perf_counter()
        if on_progress and now - last_report >= 2.0:
            on_progress(sent, now - start)
            last_report = now
    producer.flush()
    return ProduceReport(sent, time.perf_counter() - start)


def make_reader(cfg: OnrampConfig, **options: Any) -> KafkaConsumer:
    """A consumer that reads committed records without a group commit (Onramp's tools read, they never own a
    group): the config's client options (SASL/SSL...) plus ``options``."""
    with explain_connection_errors(cfg):
        return KafkaConsumer(**client_options(cfg), enable_auto_commit=False, isolation_level="read_committed", **options)


def end_offsets(cfg: OnrampConfig, topic: str) -> dict[int, int]:
    consumer = make_reader(cfg)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()} if tps else {}
    finally:
        consumer.close()


def read_records(
    cfg: OnrampConfig,
    topic: str,
    *,
    start_offsets: dict[int, int] | None = None,
    max_records: int | None = None,
    timeout_s: float = 30.0,
    idle_timeout_s: float | None = None,
) -> Iterator[Any]:
    """Yield ConsumerRecords of ``topic`` (read_committed) from ``start_offsets`` (default: the beginning).

    Stops after ``max_records``, after ``timeout_s`` in total, or after ``idle_timeout_s`` without a record.
    """
    consumer = make_reader(cfg, consumer_timeout_ms=200)
    try:
        deadline = time.monotonic() + timeout_s
        partitions = None
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                time.sleep(0.2)
        if not partitions:
            return
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        for tp in tps:
            if start_offsets and tp.partition in start_offsets:
                consumer.seek(tp, start_offsets[tp.partition])
            else:
                consumer.seek_to_beginning(tp)
        count = 0
        last_seen = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            if not batch:
                if idle_timeout_s is not None and time.monotonic() - last_seen > idle_timeout_s:
                    return
                continue
            last_seen = time.monotonic()
            for records in batch.values():
                for record in records:
                    yield record
                    count += 1
                    if max_records is not None and count >= max_records:
                        return
    finally:
        consumer.close()
