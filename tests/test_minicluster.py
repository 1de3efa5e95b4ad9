"""The personalize graph on Flink's local mini-cluster (thread mode), over an in-memory source.

Checks the job end to end inside Flink: every valid event gets exactly one decision, every malformed record one
dead letter with its code, and the decisions equal what the pure per-event logic computes offline for the same
events, so the Flink wrapper adds nothing and loses nothing.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.event_stream import MALFORMED_KINDS, malformed_event
from models.generator import generate
from udfs.avro_codec import dead_letter_codec, decision_codec, event_codec
from udfs.model_bundle import load_current
from udfs.personalizer import Personalizer
from udfs.profile_state import Profile

pytestmark = pytest.mark.minicluster


def _run_on_minicluster(cfg, payloads: list[bytes], bundle_path: Path) -> list[bytes]:
    from pyflink.common import Types

    from pyflink.common import Row

    from jobs.personalize import build_pipeline, create_env
    from udfs.flink_functions import BYTES, ROUTED_RECORD, routed
    from udfs.pseudonym import ensure_key_file

    key = ensure_key_file(cfg.pseudonym_key_file)
    env = create_env(cfg)
    # from_collection cannot carry byte[] in PyFlink 2.2 (ClassCastException in PythonBridgeUtils); carry the
    # payloads as latin-1 strings with their offset and build the routed Kafka-shaped rows in a chained map.
    topic = cfg.input_topic
    records = env.from_collection(
        [(offset, p.decode("latin-1")) for offset, p in enumerate(payloads)],
        type_info=Types.TUPLE([Types.LONG(), Types.STRING()]),
    ).map(lambda t: routed(Row(t[1].encode("latin-1"), topic, 0, t[0]), key), output_type=ROUTED_RECORD)
    outputs = build_pipeline(records, cfg, bundle_path=bundle_path)
    wanted = {cfg.decisions_topic, cfg.dead_letter_topic}
    # (topic, value) only: PyFlink's collect cannot bring back a row with a null byte[] field (a dead letter's key)
    values = outputs.map(lambda row: (row[0], row[2]), output_type=Types.TUPLE([Types.STRING(), BYTES]))
    with values.execute_and_collect("onramp-minicluster-test") as results:
        return [bytes(b % 256 for b in value) for topic, value in results if topic in wanted]


def test_keyed_job_decides_every_valid_event_and_dead_letters_the_rest(trained_model_dir, tmp_path):
    cfg = load_config({"model_dir": str(trained_model_dir), "state_dir": str(tmp_path)}, environ={})
    cfg = dataclasses.replace(cfg, extra={"flink.restart-strategy.type": "none"})
    events, _truth = generate(25, seed=11)
    codec = event_codec()
    payloads = [codec.encode(e) for e in events] + [malformed_event(kind) for kind in MALFORMED_KINDS]
    bundle = load_current(trained_model_dir)

    out = _run_on_minicluster(cfg, payloads, bundle.path)

    decision_fp = decision_codec().schema.fingerprint
    decisions = [decision_codec().decode(b) for b in out if b[2:10] == decision_fp]
    dead = [dead_letter_codec().decode(b) for b in out if b[2:10] != decision_fp]
    assert len(decisions) == len(events)
    assert sorted(d["error_code"] for d in dead) == sorted(MALFORMED_KINDS)
    # Dead letters name where the record was read: the malformed ones were appended after the events.
    assert sorted(d["offset"] for d in dead) == list(range(len(events), len(payloads)))
    assert {(d["topic"], d["partition"]) for d in dead} == {(cfg.input_topic, 0)}
    assert Counter(d["event_id"] for d in decisions) == Counter(e["event_id"] for e in events)
    assert {d["model_version"] for d in decisions} == {bundle.version}
    assert any(d["personalized"] for d in decisions)

    # Offline replay through the same pure functions (and the same rule set) gives the same decisions.
    from udfs.rules.compiler import compile_rules_text

    rules = compile_rules_text(Path(cfg.rules_file).read_text(), cfg.rules_file)
    assert {d["rules_version"] for d in decisions} == {rules.version}
    from udfs.experiment_arms import load_experiments
    from udfs.pseudonym import load_key

    key = load_key(cfg.pseudonym_key_file)  # the job hashes experiment arms on the pseudonym, so must the replay
    personalizer = Personalizer(bundle, cfg.interest_half_life_hours * 3_600_000.0, rules,
                                experiments=load_experiments(cfg.experiments_file))
    profiles: dict[str, Profile] = {}
    expected = {}
    for event in events:
        profile = personalizer.update(profiles.setdefault(event["user_id"], Profile()), event)
        expected[event["event_id"]] = personalizer.decide(profile, event, decided_at_ms=0,
                                                          subject=key.user(event["user_id"]))
    for decision in decisions:
        want = expected[decision["event_id"]]
        assert {**decision, "decided_at": 0, "churn_risk": pytest.approx(want["churn_risk"], abs=1e-6)} == want


def test_java_routing_key_agrees_with_the_python_one(tmp_path):
    """The Kafka source keys by ``onramp_routing_key`` (Java, jvm/src); the offline code and tests use
    udfs.wire_peek.routing_key. Both must route every payload, valid or broken, to the same pseudonym, with the
    key read from the file the job parameter names."""
    from pyflink.table import EnvironmentSettings, TableEnvironment

    from jobs.personalize import ROUTING_KEY_CLASS, ROUTING_KEY_FUNCTION
    from jobs.provision import flink_job_jars
    from jobs.python_env import ensure_embedded_python_path
    from tests.conftest import make_event
    from jobs.personalize import KEY_FILE_PARAMETER
    from udfs.pseudonym import write_new_key
    from udfs.wire_peek import routing_key

    key = write_new_key(tmp_path / "pseudonym.key")
    codec = event_codec()
    valid = codec.encode(make_event(user_id="ü-user-" + "x" * 70))  # multi-byte UTF-8, two-byte varint length
    payloads = [
        valid,
        codec.encode(make_event(user_id="u-1")),
        codec.encode(make_event(user_id="")),
        codec.encode({**make_event(user_id=""), "anonymous_id": "device-ü-1"}),  # before signup: by anonymous id
        codec.encode({**make_event(user_id="u-2"), "anonymous_id": "device-1"}),  # alias link: by user id
        codec.encode({**make_event(user_id=""), "anonymous_id": ""}),
        valid[:12],  # cut inside the first string
        b"\x00\x01" + valid[2:],  # not single-object encoded
        b"",
        valid[:10] + b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # runaway varint
        valid[:10] + b"\x03abc",  # negative length
        *(malformed_event(kind) for kind in MALFORMED_KINDS),
    ]
    ensure_embedded_python_path()
    t_env = TableEnvironment.create(EnvironmentSettings.in_batch_mode())
    t_env.get_config().set("pipeline.jars", ";".join(j.as_uri() for j in flink_job_jars(load_config())))
    t_env.get_config().set("pipeline.global-job-parameters", f"{KEY_FILE_PARAMETER}:{tmp_path / 'pseudonym.key'}")
    t_env.create_java_temporary_system_function(ROUTING_KEY_FUNCTION, ROUTING_KEY_CLASS)
    values = ", ".join(f"({i}, X'{p.hex()}')" for i, p in enumerate(payloads))
    rows = t_env.execute_sql(
        f"SELECT i, {ROUTING_KEY_FUNCTION}(p) FROM (VALUES {values}) AS t(i, p)"
    ).collect()
    with rows:
        java = {row[0]: row[1] for row in rows}
    assert java == {i: routing_key(p, key) for i, p in enumerate(payloads)}
    assert java[1] == key.user("u-1") and java[3] == key.anon("device-ü-1") and java[4] == key.user("u-2")


@pytest.mark.parametrize("own_thread", [True, False])
def test_kafka_sink_runs_in_its_own_task_by_default(trained_model_dir, tmp_path, own_thread):
    """``sink_own_thread`` (default on): the Kafka sink is a task of its own, not chained behind the Python
    operator, so its work runs on another thread; off, it is chained as before. Read from the job graph Flink
    would run (building it connects to nothing)."""
    from jobs.personalize import build_kafka_job
    from jobs.provision import flink_job_jars

    cfg = load_config({"model_dir": str(trained_model_dir), "state_dir": str(tmp_path),
                       "sink_own_thread": own_thread}, environ={})
    env = build_kafka_job(cfg, flink_job_jars(cfg), bounded=True)
    job_graph = env._j_stream_execution_environment.getStreamGraph(False).getJobGraph()
    names = [vertex.getName() for vertex in job_graph.getVerticesAsArray()]
    personalize = next(n for n in names if "personalize" in n)
    sink = next(n for n in names if "onramp_out" in n and "Writer" in n)  # the Kafka table sink's writer
    assert (sink == personalize) is not own_thread, names
