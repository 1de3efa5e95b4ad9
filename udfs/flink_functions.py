"""Thin PyFlink wrapper around the pure logic: the keyed personalize step.

It owns only what needs Flink (state handles, outputs, open/close) and holds plain parameters, so it
pickles small when the job graph is shipped to the TaskManagers.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from pyflink.common import Row, Types
from pyflink.datastream import KeyedProcessFunction, OutputTag, RuntimeContext
from pyflink.datastream.state import ValueStateDescriptor

from udfs import control, gc_pauses
from udfs.audit import decision_audit, erasure_audit, state_check_audit
from udfs.experiment_arms import EMPTY_SET, parse_experiments
from udfs.identity import (MESSAGE_MAGIC, Claim, Erase, Forward, Handoff, IdentityMessageError, Outcome, Reject,
                           decode_message, encode_message, identity_from_state, identity_to_state, message_key,
                           on_anon_event, on_claim, on_erase, on_erasure, on_forward, on_handoff, on_link, on_reject)
from udfs.avro_codec import audit_codec, dead_letter_codec, decision_codec, event_codec
from udfs.model_watch import BundleWatcher
from udfs.rules.compiler import compile_rules_text
from udfs.rules_watch import RulesWatcher, content_sha
from udfs.profile_cache import ProfileCache
from udfs.pseudonym import PseudonymKey, load_key
from udfs.profile_state import ProfilePolicy, profile_from_state, profile_to_state
from udfs.validation import (MALFORMED_AVRO, NOT_SINGLE_OBJECT, PROCESSING_ERROR, InvalidEvent, ValidationLimits,
                             decode_event)
from udfs.wire_peek import routing_key

log = logging.getLogger(__name__)

BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
DEAD_LETTERS = OutputTag("dead-letters", BYTES)
AUDIT = OutputTag("audit", BYTES)
# Identity resolution's messages to another key (udfs/identity.py): Row(destination key, message), written to the
# control topic with the destination as Kafka key, so the job reads each back at the key it is for.
KEYED_MESSAGE = Types.ROW_NAMED(["key", "value"], [BYTES, BYTES])
IDENTITY = OutputTag("identity", KEYED_MESSAGE)
# One input record: the Kafka value and where it was read (for dead letters).
KAFKA_RECORD = Types.ROW_NAMED(["value", "topic", "partition", "offset"], [BYTES, Types.STRING(), Types.INT(), Types.LONG()])
# What the keyed operator's input carries: the user id to key by (read off the wire) and the record.
ROUTED_RECORD = Types.ROW_NAMED(["routing_key", "record"], [Types.STRING(), KAFKA_RECORD])
# What the job's operator emits when it is given its topics: every record it makes, for one Kafka sink that
# writes ``value`` to ``topic`` with ``key`` as the Kafka key (jobs/personalize.py ``build_kafka_job``).
OUTPUT_RECORD = Types.ROW_NAMED(["topic", "key", "value"], [Types.STRING(), BYTES, BYTES])


class OutputTopics(NamedTuple):
    """Where each kind of output goes; ``audit`` is "" when audit records are off."""

    decisions: str
    dead_letters: str
    audit: str
    control: str

    def names(self) -> list[str]:
        return [t for t in self if t]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _descriptor(name: str, ttl_ms: int) -> ValueStateDescriptor:
    """A pickled-bytes value state, expiring ``ttl_ms`` after its last write when ``ttl_ms`` > 0 (cleaned up in
    full snapshots, incrementally on access, and by RocksDB's compaction filter).

    Incremental cleanup (heap backend) visits 2 entries per state access, 4 per event: at 1,000 events/s a
    million idle profiles are swept in ~4 minutes, against a TTL of days. With 10 per access it was a quarter of
    the keyed thread's time in Java code (JFR, 4,000 events/s)."""
    descriptor = ValueStateDescriptor(name, Types.PICKLED_BYTE_ARRAY())
    if ttl_ms > 0:
        from pyflink.common.time import Duration, Time
        from pyflink.datastream.state import StateTtlConfig

        # PyFlink builds the RocksDB filter's default periodic compaction time (30 days) as a java.time.Duration
        # through py4j, which on a TaskManager launches a whole gateway JVM (1 GB heap) beside it: both when no
        # time is given and whenever the strategies are read with background cleanup on (the default, which
        # only adds defaults for the strategies set here anyway). Neither PyFlink converter reads the time
        # (Flink's own default, 30 days, applies), so a placeholder that needs no JVM, and explicit strategies.
        descriptor.enable_time_to_live(
            StateTtlConfig.new_builder(Time.milliseconds(ttl_ms)).update_ttl_on_create_and_write()
            .never_return_expired().disable_cleanup_in_background().cleanup_full_snapshot()
            .cleanup_incrementally(2, False).cleanup_in_rocksdb_compact_filter(1000, Duration(None)).build())
    return descriptor


def _subject(ctx: Any) -> str:
    """The pseudonym the current record is keyed by. The key is declared ``Row(routing_key)``, but PyFlink hands
    the keyed function a one-field row key as the bare value (seen with 2.2.1, thread mode); accept both."""
    key = ctx.get_current_key()
    return key if isinstance(key, str) else key[0]


def routed(record: Any, key: PseudonymKey) -> Any:
    """``Row(routing_key, record)`` for a :data:`KAFKA_RECORD` built in Python (tests, custom sources); the Kafka
    source computes the same key in SQL with the Java twin of :func:`udfs.wire_peek.routing_key`. A function
    that captures ``key`` carries it in the job graph: tests only, or load it in the function's ``open()``."""
    return Row(routing_key(record[0], key), record)


# A dead letter keeps at most this much of the original record, so it stays below the Kafka producer's default
# max.request.size (1 MiB) with its ~2 KB of reason and position; the whole record stays at its topic/offset.
MAX_DEAD_LETTER_ORIGINAL_BYTES = 1_000_000


def dead_letter_bytes(original: bytes | None, topic: str, partition: int, offset: int, code: str, message: str,
                      codec=None) -> bytes:
    """A dead letter: the original bytes (empty for a record without a value; cut to
    :data:`MAX_DEAD_LETTER_ORIGINAL_BYTES`, saying so, for a huge one), the reason, and where the record is."""
    codec = codec or dead_letter_codec()
    original = b"" if original is None else bytes(original)
    if len(original) > MAX_DEAD_LETTER_ORIGINAL_BYTES:
        message = (f"[original cut to its first {MAX_DEAD_LETTER_ORIGINAL_BYTES} of {len(original)} bytes; the whole "
                   f"record is at the topic and offset below] {message}")
        original = original[:MAX_DEAD_LETTER_ORIGINAL_BYTES]
    return codec.encode(
        {
            "original": original,
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
    the dead letters with its reason.

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
                 profile_policy: ProfilePolicy | None = None, gc_freeze: bool = True,
                 control_topic: str = "", audit: bool = False, key_file: str | None = None,
                 alias_window_ms: int = 24 * 3_600_000, experiments_text: str | None = None,
                 experiments_path: str | None = None, experiments_reload_interval_ms: int = 0,
                 state_ttl_ms: int = 0, arm_rules: dict[str, str] | None = None,
                 arm_bundles: dict[str, dict[str, bytes]] | None = None, topics: OutputTopics | None = None,
                 profile_cache_size: int = 0):
        self.bundle_files = bundle_files
        self.topics = topics
        self.gc_freeze = gc_freeze
        self.control_topic = control_topic
        self.audit = audit
        self.key_file = key_file
        self.key = None
        self.key_id = ""
        self.alias_window_ms = alias_window_ms
        self.state_ttl_ms = state_ttl_ms
        self.profile_cache_size = profile_cache_size
        # recently written profiles, deserialized (udfs/profile_cache.py); made anew in open(): a restarted or
        # rescaled instance starts empty and reads the restored state
        self.profiles = ProfileCache(profile_cache_size, state_ttl_ms)
        self.arm_rules = arm_rules or {}  # rule set texts that experiment arms pin, by version
        self.arm_bundles = arm_bundles or {}  # model bundle files that experiment arms pin, by version
        self.experiments_text = experiments_text
        self.experiments_path = experiments_path
        self.experiments_reload_interval_ms = experiments_reload_interval_ms if experiments_path else 0
        self.experiments_watcher = None
        self.identity_state = None
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
        experiments = (parse_experiments(self.experiments_text, self.experiments_path or "experiments")
                       if self.experiments_text else EMPTY_SET)
        log.info("personalize: experiments %s", experiments.version)
        self.personalizer = Personalizer(
            bundle, self.half_life_ms, rules, self.profile_policy, experiments,
            arm_rules={v: compile_rules_text(text, f"{self.rules_path or 'rules'} (version {v})")
                       for v, text in self.arm_rules.items()},
            arm_scorers={v: ModelBundle.load(materialize_bundle(files)) for v, files in self.arm_bundles.items()})
        self.experiments_watcher = RulesWatcher(Path(self.experiments_path or "."), self.experiments_reload_interval_ms,
                                                content_sha(self.experiments_text) if self.experiments_text else None,
                                                self._parse_followed_experiments, label="experiments")
        self.rules_watcher = RulesWatcher(Path(self.rules_path or "."), self.rules_reload_interval_ms,
                                          content_sha(self.rules_text) if self.rules_text else None, compile_rules_text)
        self.watcher = BundleWatcher(Path(self.model_dir or "."), self.reload_interval_ms,
                                     bundle.version if bundle else None, self.half_life_ms / 3_600_000.0)
        # TTL (config state_ttl_hours): a profile not written for that long (processing time) is gone, so inactive
        # users cost nothing; identity state lives at least two alias windows (udfs/identity.py needs them)
        self.profile_state = runtime_context.get_state(_descriptor("profile", self.state_ttl_ms))
        self.profiles = ProfileCache(self.profile_cache_size, self.state_ttl_ms)
        # aliases (udfs/identity.py); read only for events that name an anonymous id and for identity messages
        identity_ttl = max(self.state_ttl_ms, 2 * self.alias_window_ms + 3_600_000) if self.state_ttl_ms else 0
        self.identity_state = runtime_context.get_state(_descriptor("identity", identity_ttl))
        self.encode = decision_codec().encode
        # Read on the TaskManager (file or ONRAMP_PSEUDONYM_KEY), like the Java routing key: never in the job graph.
        self.key = load_key(self.key_file)
        self.key_id = self.key.key_id
        self.audit_encode = audit_codec().encode
        self.event_codec = event_codec()
        self.dlq_codec = dead_letter_codec()
        self.metrics = metrics = runtime_context.get_metrics_group()
        self.dead_letter_counters = {}
        self.decisions = metrics.counter("decisions")
        self.duplicates = metrics.counter("duplicates")
        self.rejected = metrics.counter("dead_letters")
        self.failures = metrics.counter("processing_errors")
        self.identity_messages = metrics.counter("identity_messages")
        self.reloads = metrics.counter("model_reloads")
        self.reload_refusals = metrics.counter("model_reload_refusals")
        self.rules_reloads = metrics.counter("rules_reloads")
        self.rules_refusals = metrics.counter("rules_reload_refusals")
        self.experiments_reloads = metrics.counter("experiments_reloads")
        self.experiments_refusals = metrics.counter("experiments_reload_refusals")
        # event time -> decision (processing time): what the app waits, give or take client clock skew and the sink
        self.latency = metrics.distribution("event_to_decision_ms")
        self.version_counters: dict[tuple[str, str], Any] = {}
        self.versions_active: dict[str, tuple[str, Any]] = {}
        self._version_gauges()
        if self.gc_freeze:
            gc_pauses.freeze_startup_heap()  # last: everything open() loaded is long-lived
        self.gc_recorder = gc_pauses.install()  # after the freeze's own collection: counts what the job's work causes
        self.gc_reported = (self.gc_recorder.collections[2], int(self.gc_recorder.total_pause_ms[2]))
        self.gc_collections_counter = metrics.counter("gc_full_collections")
        self.gc_pause_counter = metrics.counter("gc_full_pause_ms")

    def close(self) -> None:
        profiles = self.profiles
        if profiles.hits or profiles.misses:
            log.info("personalize: profile cache (%d profiles) answered %d of %d reads", profiles.max_entries,
                     profiles.hits, profiles.hits + profiles.misses)

    def process_element(self, record: Any, ctx: KeyedProcessFunction.Context) -> Iterable[Any]:
        """The outputs for one record: tagged (decision bytes, ``(AUDIT | DEAD_LETTERS | IDENTITY, record)``) as
        :meth:`outputs` makes them, or, given ``topics``, each as an :data:`OUTPUT_RECORD` row for the one sink.

        One output stream instead of side outputs because PyFlink's ``get_side_output`` appends a Python identity
        map to each side output: every audit record entered Python a second time (docs/performance.md)."""
        subject = _subject(ctx)  # one call into the keyed context per record
        if self.topics is None:
            yield from self.outputs(record, subject)
            return
        topics = self.topics
        key = subject.encode()
        for out in self.outputs(record, subject):
            if type(out) is not tuple:  # a decision: keyed by the user's pseudonym, so one user's stay in order
                yield Row(topics.decisions, key, out)
                continue
            tag, value = out
            if tag is AUDIT:
                yield Row(topics.audit, key, value)
            elif tag is IDENTITY:
                yield Row(topics.control, value[0], value[1])
            else:
                yield Row(topics.dead_letters, None, value)

    def outputs(self, record: Any, subject: str) -> Iterable[Any]:
        """The tagged outputs for one record at key ``subject`` (see :meth:`process_element`)."""
        if record[1] == self.control_topic and self.control_topic:
            yield from self._control(record, subject)
            return
        now_ms = _now_ms()
        if self.watcher.due(now_ms):
            self._follow(self.watcher, "scorer", self.reloads, self.reload_refusals, now_ms)
        if self.rules_watcher.due(now_ms):
            self._follow(self.rules_watcher, "rules", self.rules_reloads, self.rules_refusals, now_ms)
        if self.experiments_watcher.due(now_ms):
            self._follow(self.experiments_watcher, "experiments", self.experiments_reloads, self.experiments_refusals,
                         now_ms)
        if self.gc_recorder.collections[2] != self.gc_reported[0]:
            self._sync_gc_counters()
        if record[0] is None:  # a tombstone or a producer's null: nothing to decode, but never silently dropped
            yield self._rejected(record, NOT_SINGLE_OBJECT, "the record has no value (null or a tombstone); expected "
                                                            "an Avro single-object encoded OnboardingEvent", self.rejected)
            return
        try:
            event = decode_event(self.event_codec, record[0], now_ms, self.limits)
        except InvalidEvent as exc:
            yield self._rejected(record, exc.code, exc.message, self.rejected)
            return
        except Exception as exc:  # the codec maps its errors to InvalidEvent; anything else still must not crash
            log.exception("decoding a record failed unexpectedly")
            yield self._rejected(record, MALFORMED_AVRO, f"{type(exc).__name__}: {exc}", self.rejected)
            return
        try:
            out = self._event(event, subject, now_ms)
        except Exception as exc:  # one bad record must not crash the job: dead-letter it with the reason
            log.exception("personalize failed for event %s", event.get("event_id"))
            yield self._rejected(record, PROCESSING_ERROR, f"{type(exc).__name__}: {exc}", self.failures)
            return
        yield from out

    def _event(self, event: dict[str, Any], subject: str, now_ms: int) -> list[Any]:
        """The outputs for one valid event at key ``subject`` (the pseudonym of its user id, or of its anonymous id
        before signup). Side effects on state happen here; the caller only emits."""
        if event["event_type"] == "erasure_requested":
            return self._erase(event, subject, now_ms)
        anonymous_id = event.get("anonymous_id")
        if not event["user_id"]:  # before signup: keyed by the anonymous id, which may have merged into a user
            stored = self.identity_state.value()
            identity = identity_from_state(stored) if stored else None
            outcome = on_anon_event(identity, subject, event, now_ms, self.alias_window_ms)
            out = self._apply_identity(identity, outcome, subject)
            if not outcome.fold_locally:
                return out  # forwarded to the user it merged into, who decides it
            return out + self._decide(event, subject, now_ms)
        out = self._decide(event, subject, now_ms)
        if anonymous_id and out:  # an alias link (and not a duplicate): claim the anonymous profile
            identity = identity_from_state(self.identity_state.value())
            out += self._apply_identity(identity, on_link(identity, subject, self.key.anon(anonymous_id),
                                                          event["event_id"], now_ms, self.alias_window_ms), subject)
        return out

    def _decide(self, event: dict[str, Any], subject: str, now_ms: int) -> list[Any]:
        """Fold ``event`` into the key's profile and decide: [decision, (AUDIT, record)], or [] for a duplicate."""
        personalizer = self.personalizer
        # The entry's age at this moment, not at the record's arrival: a reload or a pause since then must not let
        # the cache serve a profile Flink's TTL would now refuse (its margin covers only microseconds from here).
        profile = self.profiles.get(subject, _now_ms())
        if profile is None:
            profile = profile_from_state(self.profile_state.value())
        try:
            if not personalizer.fold(profile, event):  # a duplicate leaves the profile as it was
                self.duplicates.inc()
                log.debug("duplicate event %s: no decision", event["event_id"])
                return []
            decision = personalizer.decide(profile, event, subject=subject)
            # Encoded before the state write: if encoding fails, the event is dead-lettered and the state (and its
            # dedup ids) stay as they were, so a corrected resend is not taken for a duplicate.
            out = [self.encode(decision)]
            if self.audit:
                out.append((AUDIT, self.audit_encode(decision_audit(decision, event["event_type"], profile, subject,
                                                                    self.key_id))))
            self.profile_state.update(profile_to_state(profile))
        except BaseException:
            self.profiles.drop(subject)  # the cached profile may be half folded: read the state next time
            raise
        self.profiles.put(subject, profile, now_ms)
        self.decisions.inc()
        self.latency.update(now_ms - event["event_time"])
        return out

    def _erase(self, event: dict[str, Any], subject: str, now_ms: int) -> list[Any]:
        """Erasure: clear every piece of state of the key (the profile with its dedup ids, aliases) and tell the
        anonymous keys it merged or claimed to clear theirs; the decision is the confirmation to the app."""
        identity = identity_from_state(self.identity_state.value())
        anonymous_id = event.get("anonymous_id")
        anon_key = self.key.anon(anonymous_id) if event["user_id"] and anonymous_id else None
        out = self._apply_identity(identity, on_erasure(identity, subject, now_ms, anon_key), subject)
        self.profile_state.clear()
        self.profiles.drop(subject)
        decision = self.personalizer.erased(event)
        out.insert(0, self.encode(decision))
        if self.audit:
            out.append((AUDIT, self.audit_encode(erasure_audit(decision, subject, self.key_id))))
        self.decisions.inc()
        return out

    def _apply_identity(self, identity: Any, outcome: Outcome, subject: str) -> list[Any]:
        """Carry out an identity transition's outcome (udfs/identity.py) at key ``subject``: state writes here,
        messages returned."""
        # Encoded first: a message that cannot be encoded fails the record before any state changed.
        out = [(IDENTITY, Row(message_key(m), encode_message(m))) for m in outcome.messages]
        if outcome.clear_profile or outcome.profile is not None:
            self.profiles.drop(subject)  # written below, not through the cache
        if outcome.changed and identity is not None:
            value = identity_to_state(identity)
            if value is None:
                self.identity_state.clear()
            else:
                self.identity_state.update(value)
        if outcome.clear_profile:
            self.profile_state.clear()
        if outcome.profile is not None:
            self.profile_state.update(profile_to_state(outcome.profile))
        if out:
            self.identity_messages.inc(len(out))
        return out

    def _identity_message(self, record: Any, subject: str) -> list[Any]:
        """A message from another key (Claim, Handoff, Reject, Forward, Erase) read back from the control topic."""
        message = decode_message(record[0])
        if message.to != subject:
            raise IdentityMessageError("identity message for another key arrived here (routing mismatch)")
        now_ms = _now_ms()
        identity = identity_from_state(self.identity_state.value())
        window = self.alias_window_ms
        if isinstance(message, Claim):
            profile = profile_from_state(self.profile_state.value())
            return self._apply_identity(identity, on_claim(identity, profile, message, now_ms, window), subject)
        if isinstance(message, Handoff):
            profile = profile_from_state(self.profile_state.value())
            return self._apply_identity(identity, on_handoff(identity, profile, message, now_ms, window,
                                                             self.half_life_ms, self.profile_policy), subject)
        if isinstance(message, Reject):
            return self._apply_identity(identity, on_reject(identity, message, now_ms, window), subject)
        if isinstance(message, Erase):
            return self._apply_identity(identity, on_erase(identity, message, now_ms, window), subject)
        if isinstance(message, Forward):
            profile = profile_from_state(self.profile_state.value())
            outcome = on_forward(identity, profile, message, now_ms, window)
            out = self._apply_identity(identity, outcome, subject)
            return out + self._decide(outcome.fold, subject, now_ms) if outcome.fold is not None else out
        raise IdentityMessageError(f"unhandled identity message {type(message).__name__}")

    def _control(self, record: Any, subject: str) -> Iterable[Any]:
        """A message for this key on the control topic (udfs/control.py): a state check is answered on the audit
        topic with what is kept for the key (field names and size, no values); anything unreadable is
        dead-lettered."""
        if record[0] is not None and record[0][:2] == MESSAGE_MAGIC:
            try:
                out = self._identity_message(record, subject)
            except IdentityMessageError as exc:
                yield self._rejected(record, control.INVALID_CONTROL_MESSAGE, str(exc), self.rejected)
                return
            except Exception as exc:  # as for events: dead-letter, never crash the job
                log.exception("identity message failed")
                yield self._rejected(record, PROCESSING_ERROR, f"{type(exc).__name__}: {exc}", self.failures)
                return
            yield from out
            return
        try:
            message = control.decode(record[0])
            if message["kind"] != control.STATE_CHECK:
                raise control.ControlMessageError(f"unknown control message kind {message['kind']!r}")
            check = control.parse_state_check(message)
            if not self.audit:  # the answer goes to the audit topic: with none, say so where operators look
                raise control.ControlMessageError("state check not answered: audit_topic is off, and the job "
                                                  "answers state checks on the audit topic")
            stored = self.profile_state.value()
            summary = state_check_audit(check.request_id, subject, self.key_id,
                                        {"profile": profile_from_state(stored) if stored else None,
                                         "identity": self.identity_state.value()},
                                        self.personalizer.model_version,
                                        self.personalizer.rules_version)
            answer = self.audit_encode(summary)
        except control.ControlMessageError as exc:
            yield self._rejected(record, control.INVALID_CONTROL_MESSAGE, str(exc), self.rejected)
            return
        except Exception as exc:  # as for events: dead-letter, never crash the job
            log.exception("state check failed")
            yield self._rejected(record, PROCESSING_ERROR, f"{type(exc).__name__}: {exc}", self.failures)
            return
        yield AUDIT, answer

    def _rejected(self, record: Any, code: str, message: str, counter: Any) -> tuple[OutputTag, bytes]:
        """A record for the dead letters: counted in ``counter`` (``dead_letters``, or ``processing_errors`` for a
        failure after decoding) and per code, then encoded with its reason and position."""
        counter.inc()
        self._count_dead_letter(code)
        return DEAD_LETTERS, self._dead_letter(record, code, message)

    def _count_dead_letter(self, code: str) -> None:
        """``dead_letters_<code>``, created on first use and cached (creating a metric is not free)."""
        counter = self.dead_letter_counters.get(code)
        if counter is None:
            counter = self.dead_letter_counters[code] = self.metrics.counter(f"dead_letters_{code}")
        counter.inc()

    def _parse_followed_experiments(self, text: str, source: str) -> Any:
        """A new experiments file for the running job: refused (the job keeps its experiments) if a running arm
        pins a rule set or model bundle the job was not submitted with; resubmit to ship new ones."""
        experiments = parse_experiments(text, source)
        p = self.personalizer
        shipped = {"rules_version": {p.rules_version, *p.arm_rules}, "model_version": {p.model_version, *p.arm_scorers}}
        missing = sorted(f"{exp_id}/{arm_id}: {kind} {version}"
                         for exp_id, arm_id, kind, version in experiments.pinned_versions()
                         if version not in shipped[kind])
        if missing:
            raise ValueError("arms pin versions this job was not submitted with (resubmit to ship them): "
                             + "; ".join(missing))
        return experiments

    def _version_gauges(self) -> None:
        """``model_version.<v>.in_use`` / ``rules_version.<v>.in_use`` / ``experiments_version.<v>.in_use``: 1 for
        the version deciding now, 0 for one it replaced. Versions are strings, so they travel as metric group
        variables (labels for the Prometheus reporter), the way Flink exposes such facts.

        Counters (incremented when a version takes over, decremented when it is replaced), not gauges: a Python
        gauge is a callback Flink's metric thread makes into the embedded interpreter, which crashed a TaskManager
        (SIGSEGV in ``_PyEvalFramePushAndInit`` from ``MetricGauge.getValue``) when metrics were queried while the
        operator closed. Counters are plain JVM objects the metric thread reads without Python."""
        personalizer = self.personalizer
        for name, version in (("model_version", personalizer.model_version),
                              ("rules_version", personalizer.rules_version),
                              ("experiments_version", personalizer.experiments.version)):
            active = self.versions_active.get(name)
            if active is not None and active[0] == version:
                continue
            if active is not None:
                active[1].dec()
            counter = self.version_counters.get((name, version))
            if counter is None:
                counter = self.version_counters[(name, version)] = self.metrics.add_group(name, version).counter("in_use")
            counter.inc()
            self.versions_active[name] = (version, counter)

    def _sync_gc_counters(self) -> None:
        """Bring ``gc_full_collections`` / ``gc_full_pause_ms`` up to what :mod:`udfs.gc_pauses` recorded (on the
        task thread, between two events: see :meth:`_version_gauges` for why not gauges)."""
        pauses = self.gc_recorder
        collections, pause_ms = pauses.collections[2], int(pauses.total_pause_ms[2])
        if collections != self.gc_reported[0]:
            self.gc_collections_counter.inc(collections - self.gc_reported[0])
            self.gc_pause_counter.inc(pause_ms - self.gc_reported[1])
            self.gc_reported = (collections, pause_ms)

    def _follow(self, watcher: Any, attribute: str, reloads: Any, refusals: Any, now_ms: int) -> None:
        """Swap the personalizer's ``attribute`` (scorer, rules or experiments) between two events when ``watcher``
        (udfs/model_watch.py, udfs/rules_watch.py) has a new one; count reloads and refusals."""
        refused_before = len(watcher.refused)
        try:
            new = watcher.poll(now_ms)
        except Exception:  # a reload runs before an event's own try: it must never fail the event (or the job)
            log.exception("%s hot reload failed; keeping the current one", attribute)
            refusals.inc()
            return
        if new is not None:
            setattr(self.personalizer, attribute, new)
            reloads.inc()
            self._version_gauges()
        if len(watcher.refused) > refused_before:
            refusals.inc()

    def _dead_letter(self, record: Any, code: str, message: str) -> bytes:
        return dead_letter_bytes(record[0], record[1] or self.input_topic, record[2], record[3], code, message,
                                 self.dlq_codec)
