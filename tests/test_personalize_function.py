"""The keyed Flink function's routing, without a cluster: decisions out, bad records and failures dead-lettered.

A running job must never crash on one record: an exception while personalizing one event becomes a dead letter
with code processing_error, and the next event is decided as usual.
"""

from __future__ import annotations

from pathlib import Path

from pyflink.common import Row

from udfs.avro_codec import audit_codec, dead_letter_codec, decision_codec, event_codec
from udfs.flink_functions import DEAD_LETTERS, Personalize
from udfs.experiment_arms import parse_experiments
from udfs.model_watch import BundleWatcher
from udfs.rules.compiler import compile_rules_text
from udfs.rules_watch import RulesWatcher
from udfs.personalizer import Personalizer
from udfs.pseudonym import key_from_text
from udfs.validation import ValidationLimits

from tests.conftest import make_event


class FakeState:
    def __init__(self) -> None:
        self.data = None

    def value(self):
        return self.data

    def update(self, value) -> None:
        self.data = value

    def clear(self) -> None:
        self.data = None


class FakeContext:
    """The keyed context: the current key is ``Row(pseudonym)``."""

    def __init__(self, key: str = "k-user-1") -> None:
        self.key = key

    def get_current_key(self):
        return Row(self.key)


class FakeCounter:
    def __init__(self) -> None:
        self.count = 0

    def inc(self, n: int = 1) -> None:
        self.count += n

    def dec(self, n: int = 1) -> None:
        self.count -= n


class FakeMetrics:
    """The operator's metric group: counters by name, created on demand (and how often each was created)."""

    def __init__(self) -> None:
        self.counters: dict[str, FakeCounter] = {}
        self.created: dict[str, int] = {}
        self.groups: dict[tuple[str, str | None], FakeMetrics] = {}
        self.gauges: dict[str, object] = {}

    def counter(self, name: str) -> FakeCounter:
        self.created[name] = self.created.get(name, 0) + 1
        return self.counters.setdefault(name, FakeCounter())

    def add_group(self, name: str, extra: str | None = None) -> "FakeMetrics":
        group = FakeMetrics()
        self.groups[(name, extra)] = group
        return group

    def gauge(self, name: str, fn) -> None:
        self.gauges[name] = fn

    def distribution(self, name: str) -> "FakeDistribution":
        return FakeDistribution()


class FakeDistribution:
    def __init__(self) -> None:
        self.values: list[int] = []

    def update(self, value: int) -> None:
        self.values.append(value)


class ExplodingScorer:
    version = "m-broken"

    def score(self, features):
        raise RuntimeError("model blew up")


def _function(scorer=None, policy=None, audit: bool = False) -> Personalize:
    fn = Personalize(None, 3_600_000.0, "events", ValidationLimits(max_event_age_ms=10**13), profile_policy=policy,
                     control_topic="control", audit=audit)
    fn.key = key_from_text("t" * 40, "test")
    fn.key_id = fn.key.key_id
    fn.audit_encode = audit_codec().encode
    fn.identity_state = FakeState()
    fn.identity_messages = FakeCounter()
    fn.latency = FakeDistribution()
    fn.version_counters, fn.versions_active = {}, {}
    from udfs import gc_pauses
    fn.gc_recorder = gc_pauses.install()
    fn.gc_reported = (fn.gc_recorder.collections[2], int(fn.gc_recorder.total_pause_ms[2]))
    fn.gc_collections_counter, fn.gc_pause_counter = FakeCounter(), FakeCounter()
    fn.personalizer = Personalizer(scorer, 3_600_000.0, None, fn.profile_policy)
    fn.profile_state = FakeState()
    fn.metrics = FakeMetrics()
    fn.dead_letter_counters = {}
    fn.duplicates = FakeCounter()
    fn.encode = decision_codec().encode
    fn.event_codec = event_codec()
    fn.dlq_codec = dead_letter_codec()
    fn.decisions, fn.rejected, fn.failures = FakeCounter(), FakeCounter(), FakeCounter()
    fn.reloads, fn.reload_refusals = FakeCounter(), FakeCounter()
    fn.watcher = BundleWatcher(Path("."), 0, scorer.version if scorer else None)  # hot reload off
    fn.rules_watcher = RulesWatcher(Path("."), 0, None, compile_rules_text)
    fn.rules_reloads, fn.rules_refusals = FakeCounter(), FakeCounter()
    fn.experiments_watcher = RulesWatcher(Path("."), 0, None, parse_experiments, label="experiments")
    fn.experiments_reloads, fn.experiments_refusals = FakeCounter(), FakeCounter()
    return fn


def _consenting_event():
    event = make_event("signup")
    event["consent"] = {"personalization": True, "analytics": True, "marketing": False}
    return event


def _run(fn, payload: bytes, offset: int = 7):
    return list(fn.process_element(Row(payload, "events", 3, offset), FakeContext()))


def test_valid_event_yields_one_decision_and_updates_state():
    fn = _function()
    event = make_event("signup")
    (out,) = _run(fn, event_codec().encode(event))
    assert decision_codec().decode(out)["event_id"] == event["event_id"]
    assert fn.profile_state.data is not None and fn.decisions.count == 1


def test_invalid_record_is_dead_lettered_with_its_position():
    fn = _function()
    ((tag, out),) = _run(fn, b"not avro at all", offset=42)
    dead = dead_letter_codec().decode(out)
    assert tag is DEAD_LETTERS and dead["error_code"] == "not_single_object"
    assert (dead["topic"], dead["partition"], dead["offset"]) == ("events", 3, 42)
    assert fn.profile_state.data is None and fn.rejected.count == 1
    assert fn.metrics.counters["dead_letters_not_single_object"].count == 1


def test_dead_letters_are_counted_per_code_with_counters_created_once():
    fn = _function()
    for offset in range(3):
        _run(fn, b"not avro at all", offset=offset)
    blank_user = make_event("signup", user_id="")
    _run(fn, event_codec().encode(blank_user))
    counts = {name: c.count for name, c in fn.metrics.counters.items()}
    assert counts == {"dead_letters_not_single_object": 3, "dead_letters_missing_user_id": 1}
    assert set(fn.metrics.created.values()) == {1}  # each counter created once, then taken from the cache
    assert fn.rejected.count == 4


def test_failure_while_personalizing_is_dead_lettered_and_the_job_goes_on():
    fn = _function(ExplodingScorer())
    payload = event_codec().encode(_consenting_event())
    ((tag, out),) = _run(fn, payload)
    dead = dead_letter_codec().decode(out)
    assert tag is DEAD_LETTERS and dead["error_code"] == "processing_error"
    assert "model blew up" in dead["error_message"] and dead["original"] == payload
    fn.personalizer = Personalizer(None, 3_600_000.0)  # the next record is processed normally
    (decision,) = _run(fn, event_codec().encode(make_event("page_view")))
    assert decision_codec().decode(decision)["step_id"]
    assert fn.failures.count == 1 and fn.decisions.count == 1
    assert fn.metrics.counters["dead_letters_processing_error"].count == 1


def test_erasure_clears_the_profile():
    fn = _function()
    _run(fn, event_codec().encode(make_event("signup")))
    (out,) = _run(fn, event_codec().encode(make_event("erasure_requested")))
    assert fn.profile_state.data is None
    assert decision_codec().decode(out)["content_variant"] == "erased"


def test_metrics_name_the_versions_in_use_and_time_each_decision():
    fn = _function()
    fn._version_gauges()
    in_use = {key: group.counters["in_use"].count for key, group in fn.metrics.groups.items()}
    assert in_use == {("model_version", "none"): 1, ("rules_version", fn.personalizer.rules_version): 1,
                      ("experiments_version", "none"): 1}
    fn.personalizer.rules = type("R", (), {"version": "r-next"})()  # a hot reload swapped the rule set
    fn._version_gauges()
    in_use = {key: group.counters["in_use"].count for key, group in fn.metrics.groups.items()}
    assert in_use[("rules_version", "r-next")] == 1 and in_use[("model_version", "none")] == 1
    assert sum(v for (name, _), v in in_use.items() if name == "rules_version") == 1  # the old one went to 0
    _run(fn, event_codec().encode(make_event("signup")))
    assert len(fn.latency.values) == 1 and fn.latency.values[0] >= 0


def test_given_its_topics_every_output_is_a_row_for_the_one_sink():
    """The job's form: Row(topic, key, value) for everything; decisions and audit records keyed by the pseudonym
    (one user's decisions stay in one partition, in order), dead letters without a key."""
    from udfs.flink_functions import OutputTopics

    fn = _function(audit=True)
    fn.topics = OutputTopics("decisions", "dead-letters", "audit", "control")
    event = make_event("signup")
    decision, audit = _run(fn, event_codec().encode(event))
    assert tuple(decision[:2]) == ("decisions", b"k-user-1")
    assert decision_codec().decode(decision[2])["event_id"] == event["event_id"]
    assert tuple(audit[:2]) == ("audit", b"k-user-1")
    assert audit_codec().decode(audit[2])["decision_id"] == decision_codec().decode(decision[2])["decision_id"]
    (dead,) = _run(fn, b"not avro at all")
    assert tuple(dead[:2]) == ("dead-letters", None)
    assert dead_letter_codec().decode(dead[2])["error_code"] == "not_single_object"
    assert OutputTopics("d", "dl", "", "c").names() == ["d", "dl", "c"]  # audit off: no audit topic to write


def test_state_ttl_descriptor_needs_no_jvm(monkeypatch):
    """The TTL'd state descriptor is built in ``open()`` on the TaskManager; PyFlink's default periodic compaction
    time would launch a py4j gateway JVM there (seen: a 1 GB-heap PythonGatewayServer child of the TaskManager)."""
    import pyflink.common.time
    import pyflink.java_gateway

    from udfs.flink_functions import _descriptor

    def no_gateway(*_args, **_kwargs):
        raise AssertionError("building the state descriptor launched a JVM gateway")

    monkeypatch.setattr(pyflink.java_gateway, "launch_gateway", no_gateway)
    monkeypatch.setattr(pyflink.common.time, "get_gateway", no_gateway)
    descriptor = _descriptor("profile", 3_600_000)
    strategies = descriptor._ttl_config.get_cleanup_strategies()
    assert strategies.get_rocksdb_compact_filter_cleanup_strategy().get_query_time_after_num_entries() == 1000
    assert strategies.in_full_snapshot()
    assert strategies.get_incremental_cleanup_strategy().get_cleanup_size() == 2
