"""The benchmark's paced load generator: events into the input topic at a fixed rate, each stamped as it is sent.

It shares two cores with the broker and the job it measures, so what it costs is taken from the job. At
1,000 events/s kafka-python's producer took 44-69% of a core and the broker 26-70% (one request per record);
librdkafka (confluent-kafka) took 7-9% and the broker 12-23% (docs/performance-log.md). The latency runs therefore
send through librdkafka when the connection is plaintext; with TLS or SASL settings they keep the kafka-python
producer, whose security options Onramp already maps (jobs/kafka_security.py).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from jobs.config import OnrampConfig
from jobs.kafka_io import ProduceReport, RecordSender, make_producer, produce
from jobs.kafka_security import python_client_kwargs

log = logging.getLogger(__name__)


class LoadGeneratorError(RuntimeError):
    """Records the generator could not deliver: the run's counts would be wrong."""


def _plaintext(cfg: OnrampConfig) -> bool:
    """No TLS, no SASL, no pass-through client settings: the connection librdkafka can make from the address."""
    kwargs = python_client_kwargs(cfg)
    return (kwargs.get("security_protocol", "PLAINTEXT") == "PLAINTEXT" and set(kwargs) <= {"security_protocol"}
            and not any(k.startswith("kafka.") for k in cfg.extra))


class _LibrdkafkaSender:
    """A confluent-kafka producer with the ``send``/``flush`` of kafka-python's, for :func:`jobs.kafka_io.produce`:
    no linger, and ``flush`` fails if any record was not delivered."""

    def __init__(self, cfg: OnrampConfig) -> None:
        from confluent_kafka import Producer

        self.address = cfg.bootstrap_servers
        self.failures: list[str] = []
        self.producer = Producer({"bootstrap.servers": cfg.bootstrap_servers, "acks": "all", "linger.ms": 0})

    def _delivered(self, error, _message) -> None:
        if error is not None:
            self.failures.append(str(error))

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None) -> None:
        from confluent_kafka import KafkaException

        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=self._delivered)
                break
            except BufferError:  # the local queue is full: let it drain
                self.producer.poll(0.01)
            except KafkaException as exc:
                raise LoadGeneratorError(f"load generator could not send to {topic} at {self.address}: {exc}") from exc
        self.producer.poll(0)

    def flush(self) -> None:
        left = self.producer.flush(60)
        if left or self.failures:
            raise LoadGeneratorError(f"load generator: {left} record(s) not delivered within 60 s, "
                                     f"{len(self.failures)} failed ({'; '.join(sorted(set(self.failures))[:3])})")

    def close(self) -> None:
        """Nothing to release: librdkafka's handle goes with the object."""


def paced_produce(cfg: OnrampConfig, topic: str, records: Iterable[tuple[bytes | None, bytes]], rate: float,
                  stamp: Callable[[bytes, int], bytes]) -> ProduceReport:
    """Send ``records`` at ``rate`` per second, each sent as soon as it is due (no linger), calling
    ``stamp(value, send_time_ms)`` just before; returns once every record is acknowledged."""
    if _plaintext(cfg):
        producer: RecordSender = _LibrdkafkaSender(cfg)
    else:
        log.info("load generator: kafka-python (the connection has security settings)")
        producer = make_producer(cfg, linger_ms=0)
    try:
        return produce(producer, topic, records, rate=rate, stamp=stamp)
    finally:
        producer.close()
