"""Thin PyFlink wrappers around the pure logic: decode/validate, and the keyed personalize step.

They own only what needs Flink (state handles, side outputs, open/close); each holds plain parameters so it
pickles small when the job graph is shipped to the TaskManagers.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

# Imported here, at unpickling time of every Onramp operator, before any record flows: loading onnxruntime's
# native module inside one embedded (thread-mode) operator's open() while another operator's thread is running
# Python deadlocked in dlopen (seen with PyFlink 2.2.1 / pemja 0.5 / onnxruntime 1.32).
import numpy  # noqa: F401
import onnxruntime  # noqa: F401
from pyflink.common import Types
from pyflink.datastream import KeyedProcessFunction, OutputTag, ProcessFunction, RuntimeContext
from pyflink.datastream.state import ValueStateDescriptor

from udfs.avro_codec import dead_letter_codec, decision_codec, event_codec
from udfs.profile_state import profile_from_state, profile_to_state
from udfs.validation import PROCESSING_ERROR, InvalidEvent, ValidationLimits, decode_event

log = logging.getLogger(__name__)

BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
DEAD_LETTERS = OutputTag("dead-letters", BYTES)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class DeadLetterSource:
    """Where rejected records came from (the value-only Kafka source does not expose partition/offset)."""

    topic: str
    partition: int = -1
    offset: int = -1


def dead_letter_bytes(original: bytes, source: DeadLetterSource, code: str, message: str, codec=None) -> bytes:
    codec = codec or dead_letter_codec()
    return codec.encode(
        {
            "original": bytes(original),
            "topic": source.topic,
            "partition": source.partition,
            "offset": source.offset,
            "error_code": code,
            "error_message": message[:2000],
            "failed_at": _now_ms(),
        }
    )


class DecodeValidate(ProcessFunction):
    """Raw Kafka value -> decoded event (main output) or DeadLetter bytes (side output ``DEAD_LETTERS``)."""

    def __init__(self, input_topic: str, limits: ValidationLimits) -> None:
        self.source = DeadLetterSource(input_topic)
        self.limits = limits
        self.codec = None
        self.dlq_codec = None
        self.rejected = None

    def open(self, runtime_context: RuntimeContext) -> None:
        self.codec = event_codec()
        self.dlq_codec = dead_letter_codec()
        self.rejected = runtime_context.get_metrics_group().counter("dead_letters")

    def process_element(self, value: bytes, ctx: ProcessFunction.Context) -> Iterable[Any]:
        try:
            yield decode_event(self.codec, value, _now_ms(), self.limits)
        except InvalidEvent as exc:
            self.rejected.inc()
            yield DEAD_LETTERS, dead_letter_bytes(value, self.source, exc.code, exc.message, self.dlq_codec)


def user_key(event: dict[str, Any]) -> str:
    return event["user_id"]


def read_bundle_files(bundle_dir: Path) -> dict[str, bytes]:
    """The files of a model bundle, to ship inside the job graph: TaskManagers then need no shared file system
    and every restart of this job version uses exactly the bundle it was submitted with."""
    return {p.name: p.read_bytes() for p in sorted(Path(bundle_dir).iterdir()) if p.is_file()}


def materialize_bundle(files: dict[str, bytes]) -> Path:
    """Write shipped bundle files to a private temp dir (loading verifies their sha256 against the manifest)."""
    target = Path(tempfile.mkdtemp(prefix="onramp-bundle-"))
    for name, data in files.items():
        (target / name).write_bytes(data)
    return target


class Personalize(KeyedProcessFunction):
    """Keyed by user: fold the event into the profile state, score it, emit the encoded decision."""

    def __init__(self, bundle_files: dict[str, bytes] | None, half_life_ms: float, input_topic: str):
        self.bundle_files = bundle_files
        self.half_life_ms = half_life_ms
        self.source = DeadLetterSource(input_topic)
        self.personalizer = None
        self.profile_state = None

    def open(self, runtime_context: RuntimeContext) -> None:
        from udfs.model_bundle import ModelBundle  # onnxruntime only where it is used
        from udfs.personalizer import Personalizer

        bundle = ModelBundle.load(materialize_bundle(self.bundle_files)) if self.bundle_files else None
        log.info("personalize: model bundle %s", bundle.version if bundle else "none")
        self.personalizer = Personalizer(bundle, self.half_life_ms)
        self.profile_state = runtime_context.get_state(ValueStateDescriptor("profile", Types.PICKLED_BYTE_ARRAY()))
        self.encode = decision_codec().encode
        self.event_codec = event_codec()
        self.dlq_codec = dead_letter_codec()
        metrics = runtime_context.get_metrics_group()
        self.decisions = metrics.counter("decisions")
        self.failures = metrics.counter("processing_errors")

    def process_element(self, event: dict[str, Any], ctx: KeyedProcessFunction.Context) -> Iterable[Any]:
        personalizer = self.personalizer
        try:
            if event["event_type"] == "erasure_requested":
                self.profile_state.clear()
                decision = personalizer.erased(event)
            else:
                profile = personalizer.update(profile_from_state(self.profile_state.value()), event)
                decision = personalizer.decide(profile, event)
                self.profile_state.update(profile_to_state(profile))
            out = self.encode(decision)
        except Exception as exc:  # one bad record must not crash the job: dead-letter it with the reason
            self.failures.inc()
            log.exception("personalize failed for event %s", event.get("event_id"))
            yield DEAD_LETTERS, dead_letter_bytes(
                self.event_codec.encode(event), self.source, PROCESSING_ERROR, f"{type(exc).__name__}: {exc}", self.dlq_codec
            )
            return
        self.decisions.inc()
        yield out
