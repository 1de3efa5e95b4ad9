"""The benchmark's paced load generator: events into the input topic at a fixed rate, each stamped as it is sent.

It shares two cores with the broker and the job it measures, so what it costs is taken from the job. At
1,000 events/s kafka-python's producer took 44-69% of a core and the broker 26-70% (one request per record);
librdkafka (confluent-kafka) took 7-9% and the broker 12-23% (docs/performance.md). The latency runs therefore
send through librdkafka when the connection is plaintext; with TLS or SASL settings they keep the kafka-python
producer, whose security options Onramp already maps (jobs/kafka_security.py).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

from jobs.config import OnrampConfig
from jobs.kafka_io import ProduceReport, make_producer, produce
from jobs.kafka_security import python_client_kwargs

log = logging.getLogger(__name__)


class LoadGeneratorError(RuntimeError):
    """Records the generator could not deliver: the run's counts would be wrong."""


def _plaintext(cfg: OnrampConfig) -> bool:
    """No TLS, no SASL, no pass-through client settings: the connection librdkafka can make from the address."""
    kwargs = python_client_kwargs(cfg)
    return (kwargs.get("security_protocol", "PLAINTEXT") == "PLAINTEXT" and set(kwargs) <= {"security_protocol"}
            and not any(k.startswith("kafka.") for k in cfg.extra))


def paced_produce(cfg: OnrampConfig, topic: str, records: Iterable[tuple[bytes | None, bytes]], rate: float,
                  stamp: Callable[[bytes, int], bytes]) -> ProduceReport:
    """Send ``records`` at ``rate`` per second, each sent as soon as it is due (no linger), calling
    ``stamp(value, send_time_ms)`` just before; returns once every record is acknowledged."""
    if not _plaintext(cfg):
        log.info("load generator: kafka-python (the connection has security settings)")
        producer = make_producer(cfg, linger_ms=0)
        try:
            return produce(producer, topic, records, rate=rate, stamp=stamp)
        finally:
            producer.close()
    from confluent_kafka import KafkaException, Producer

    failures: list[str] = []

    def delivered(error, _message) -> None:
        if error is not None:
            failures.append(str(error))

    producer = Producer({"bootstrap.servers": cfg.bootstrap_servers, "acks": "all", "linger.ms": 0})
    start = time.perf_counter()
    sent = 0
    try:
        for key, value in records:
            delay = start + sent / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            value = stamp(value, time.time_ns() // 1_000_000)
            while True:
                try:
                    producer.produce(topic, value=value, key=key, on_delivery=delivered)
                    break
                except BufferError:  # the local queue is full: let it drain
                    producer.poll(0.01)
            producer.poll(0)
            sent += 1
        left = producer.flush(60)
    except KafkaException as exc:
        raise LoadGeneratorError(f"load generator could not send to {topic} at {cfg.bootstrap_servers}: {exc}") from exc
    if left or failures:
        raise LoadGeneratorError(f"load generator: {left} record(s) not delivered to {topic} within 60 s, "
                                 f"{len(failures)} failed ({'; '.join(sorted(set(failures))[:3])})")
    return ProduceReport(sent, time.perf_counter() - start)
