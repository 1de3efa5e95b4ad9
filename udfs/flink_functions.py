"""Thin PyFlink wrapper around the pure logic: the keyed personalize step.

It owns only what needs Flink (state handles, side outputs, open/close) and holds plain parameters, so it
pickles small when the job graph is shipped to the TaskManagers.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from pyflink.common import Types
from pyflink.datastream import KeyedProcessFunction, OutputTag, RuntimeContext
from pyflink.datastream.state import ValueStateDescriptor

from udfs.avro_codec import dead_letter_codec, decision_codec, event_codec
from udfs.model_watch import BundleWatcher
from udfs.rules.compiler import compile_rules_text
from udfs.rules_watch import RulesWatcher, content_sha
from udfs.profile_state import ProfilePolicy, profile_from_state, profile_to_state
from udfs.validation import PROCESSING_ERROR, InvalidEvent, ValidationLimits, decode_event
from udfs.wire_peek import routing_key

log = logging.getLogger(__name__)

BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
DEAD_LETTERS = OutputTag("dead-letters", BYTES)
# One input record: the Kafka value and where it was read (for dead letters).
KAFKA_RECORD = Types.ROW_NAMED(["value", "topic", "partition", "offset"], [BYTES, Types.STRING(), Types.INT(), Types.LONG()])
# What the keyed operator's input carries: the user id to key by (read off the wire) and the record.
ROUTED_RECORD = Types.ROW_NAMED(["routing_key", "record"], [Types.STRING(), KAFKA_RECORD])


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def routed(record: Any) -> Any:
    """``Row(routing_key, record)`` for a :data:`KAFKA_RECORD` built in Python (tests, custom sources); the Kafka
    source computes the same key in SQL with the Java twin of :func:`udfs.wire_peek.routing_key`."""
    from pyflink.common import Row

    return Row(routing_key(record[0]), record)


def dead_letter_bytes(original: bytes, topic: str, partition: int, offset: int, code: str, message: str,
                      codec=None) -> bytes:
    codec = codec or dead_letter_codec()
    return codec.encode(
        {
            "original": bytes(original),
            "topic": topic,
            "partition": -1 if partition is None else partition,
            "offset": -1 if offset is None else offset,
            "error_code": code,
            "error_message": message[:2000],
            "failed_at": _now_ms(),
        }
    )


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
    """Keyed by user (the routing key) over ``KAFKA_RECORD`` rows: decode and validate the event,
    fold it into the profile state, score it, emit the encoded decision; anything invalid or failing goes to
    the ``DEAD_LETTERS`` side output with its reason.

    Decoding here rather than in an operator of its own keeps the job at one Python operator (the key is
    computed in the JVM) and ships raw bytes, not pickled dicts, across the shuffle.

    An event id already seen for the user (:mod:`udfs.dedup`, ids kept in the profile state) yields nothing and
    counts in ``duplicates``. Dead letters count in ``dead_letters`` and per code in ``dead_letters_<code>``.
    ``profile_policy`` (consent minimization allow-lists, dedup window) is shipped with the job, like
    ``half_life_ms``; training folds with the same one.
    """

    def __init__(self, bundle_files: dict[str, bytes] | None, half_life_ms: float, input_topic: str,
                 limits: ValidationLimits, model_dir: str | None = None, reload_interval_ms: int = 0,
                 rules_text: str | None = None, rules_path: str | None = None, rules_reload_interval_ms: int = 0,
                 profile_policy: ProfilePolicy | None = None):
        self.bundle_files = bundle_files
        self.half_life_ms = half_life_ms
        self.profile_policy = profile_policy or ProfilePolicy()
        self.input_topic = input_topic
        self.limits = limits
        self.model_dir = model_dir
        self.reload_interval_ms = reload_interval_ms if model_dir else 0
        self.personalizer = None
        self.profile_state = None
        self.watcher = None
        self.rules_text = rules_text
        self.rules_path = rules_path
        self.rules_reload_interval_ms = rules_reload_interval_ms if rules_path else 0
        self.rules_watcher = None
        self.metrics = None
        self.dead_letter_counters: dict[str, Any] = {}

    def open(self, runtime_context: RuntimeContext) -> None:
        from udfs.model_bundle import ModelBundle  # onnxruntime only where it is used
        from udfs.personalizer import Personalizer

        bundle = ModelBundle.load(materialize_bundle(self.bundle_files)) if self.bundle_files else None
        log.info("personalize: model bundle %s", bundle.version if bundle else "none")
        rules = compile_rules_text(self.rules_text, self.rules_path or "rules") if self.rules_text else None
        log.info("personalize: rule set %s", rules.version if rules else "builtin")
        self.personalizer = Personalizer(bundle, self.half_life_ms, rules, self.profile_policy)
        self.rules_watcher = RulesWatcher(Path(self.rules_path or "."), self.rules_reload_interval_ms,
                                          content_sha(self.rules_text) if self.rules_text else None, compile_rules_text)
        self.watcher = BundleWatcher(Path(self.model_dir or "."), self.reload_interval_ms,
                                     bundle.version if bundle else None, self.half_life_ms / 3_600_000.0)
        profile_descriptor = ValueStateDescriptor("profile", Types.PICKLED_BYTE_ARRAY())
        ttl_ms = getattr(self, "state_ttl_ms", 0)  # set by jobs/personalize.py from config state_ttl_hours
        if ttl_ms > 0:  # a profile not written for ttl_ms (processing time) is gone: inactive users cost nothing
            from pyflink.common.time import Time
            from pyflink.datastream.state import StateTtlConfig

            profile_descriptor.enable_time_to_live(
                StateTtlConfig.new_builder(Time.milliseconds(ttl_ms)).update_ttl_on_create_and_write()
                .never_return_expired().cleanup_full_snapshot().cleanup_incrementally(10, False)
                .cleanup_in_rocksdb_compact_filter(1000).build())
        self.profile_state = runtime_context.get_state(profile_descriptor)
        self.encode = decision_codec().encode
        self.event_codec = event_codec()
        self.dlq_codec = dead_letter_codec()
        self.metrics = metrics = runtime_context.get_metrics_group()
        self.dead_letter_counters = {}
        self.decisions = metrics.counter("decisions")
        self.duplicates = metrics.counter("duplicates")
        self.rejected = metrics.counter("dead_letters")
        self.failures = metrics.counter("processing_errors")
        self.reloads = metrics.counter("model_reloads")
        self.reload_refusals = metrics.counter("model_reload_refusals")
        self.rules_reloads = metrics.counter("rules_reloads")
        self.rules_refusals = metrics.counter("rules_reload_refusals")

    def process_element(self, record: Any, ctx: KeyedProcessFunction.Context) -> Iterable[Any]:
        value = record[0]
        now_ms = _now_ms()
        if self.watcher.due(now_ms):
            self._follow(self.watcher, "scorer", self.reloads, self.reload_refusals, now_ms)
        if self.rules_watcher.due(now_ms):
            self._follow(self.rules_watcher, "rules", self.rules_reloads, self.rules_refusals, now_ms)
        try:
            event = decode_event(self.event_codec, value, now_ms, self.limits)
        except InvalidEvent as exc:
            self.rejected.inc()
            self._count_dead_letter(exc.code)
            yield DEAD_LETTERS, self._dead_letter(record, exc.code, exc.message)
            return
        personalizer = self.personalizer
        try:
            if event["event_type"] == "erasure_requested":
                self.profile_state.clear()  # the profile, dedup ids included
                decision = personalizer.erased(event)
            else:
                profile = profile_from_state(self.profile_state.value())
                if not personalizer.fold(profile, event):
                    self.duplicates.inc()
                    log.debug("duplicate event %s for user %s: no decision", event["event_id"], event["user_id"])
                    return
                decision = personalizer.decide(profile, event)
                self.profile_state.update(profile_to_state(profile))
            out = self.encode(decision)
        except Exception as exc:  # one bad record must not crash the job: dead-letter it with the reason
            self.failures.inc()
            self._count_dead_letter(PROCESSING_ERROR)
            log.exception("personalize failed for event %s", event.get("event_id"))
            yield DEAD_LETTERS, self._dead_letter(record, PROCESSING_ERROR, f"{type(exc).__name__}: {exc}")
            return
        self.decisions.inc()
        yield out

    def _count_dead_letter(self, code: str) -> None:
        """``dead_letters_<code>``, created on first use and cached (creating a metric is not free)."""
        counter = self.dead_letter_counters.get(code)
        if counter is None:
            counter = self.dead_letter_counters[code] = self.metrics.counter(f"dead_letters_{code}")
        counter.inc()

    def _follow(self, watcher: Any, attribute: str, reloads: Any, refusals: Any, now_ms: int) -> None:
        """Swap the personalizer's ``attribute`` (scorer or rules) between two events when ``watcher`` (see
        udfs/model_watch.py, udfs/rules_watch.py) has a new one; count reloads and refusals."""
        refused_before = len(watcher.refused)
        new = watcher.poll(now_ms)
        if new is not None:
            setattr(self.personalizer, attribute, new)
            reloads.inc()
        if len(watcher.refused) > refused_before:
            refusals.inc()

    def _dead_letter(self, record: Any, code: str, message: str) -> bytes:
        return dead_letter_bytes(record[0], record[1] or self.input_topic, record[2], record[3], code, message,
                                 self.dlq_codec)
