"""jobs/services.py + jobs/kafka_admin.py against a real local Kafka broker and Flink cluster.

Uses its own state dir and non-default ports (19092/19093/18081 when free, else any free port) so it never
collides with services a developer runs on the default ports. Everything started here is stopped at the end.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from jobs import kafka_admin, services
from jobs.config import load_config
from jobs.provision import flink_job_jars, provision
from jobs.services import ServiceError

logging.getLogger("kafka").setLevel(logging.CRITICAL)


def _pick_port(preferred: int, taken: set[int]) -> int:
    port = preferred
    if port in taken or not services._port_free(port):
        port = services._free_port()
        while port in taken:
            port = services._free_port()
    taken.add(port)
    return port


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    taken: set[int] = set()
    cfg = load_config(
        {
            "state_dir": tmp_path_factory.mktemp("onramp-state"),
            "kafka_port": _pick_port(19092, taken),
            "kafka_controller_port": _pick_port(19093, taken),
            "flink_rest_port": _pick_port(18081, taken),
            "service_timeout_s": 120,
        },
        environ={},
    )
    provision(cfg)  # shared .cache/jars; a no-op when already provisioned
    yield cfg
    services.down(cfg)


def _pids(status: dict) -> tuple:
    return status["kafka"]["pid"], status["flink"]["pid"], tuple(status["flink"]["taskmanager_pids"])


def _alive(pid: int) -> bool:
    return services._alive(pid)


# ---- failures that must happen before anything starts ---------------------------------------------------------


def test_status_when_nothing_runs(cfg):
    st = services.status(cfg)
    assert st["kafka"]["running"] is False and st["kafka"]["healthy"] is False
    assert st["flink"]["running"] is False and st["flink"]["taskmanagers"] == 0
    assert st["kafka"]["port"] == cfg.kafka_port
    assert st["flink"]["rest_url"] == f"http://localhost:{cfg.flink_rest_port}"
    assert services.down(cfg) == {"flink": {"stopped": [], "killed": []}, "kafka": {"stopped": [], "killed": []}}


def test_no_java_gives_clear_error(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(ServiceError, match=r"java not found on PATH / JAVA_HOME; install a JDK 17"):
        services.up(cfg)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))  # a JAVA_HOME pointing at nothing is named
    with pytest.raises(ServiceError, match=r"java not found on PATH / JAVA_HOME \(JAVA_HOME=.*no-jdk has no bin/java\)"):
        services.up(cfg, kafka=False)
    assert not services.status(cfg)["kafka"]["running"]


def test_flink_alone_runs_on_java_11_and_kafka_needs_17(tmp_path):
    fake = tmp_path / "jdk11" / "bin"
    fake.mkdir(parents=True)
    (fake / "java").write_text('#!/bin/sh\necho \'openjdk version "11.0.22" 2024-01-16\' >&2\n')
    (fake / "java").chmod(0o755)
    env = {"JAVA_HOME": str(fake.parent), "PATH": ""}
    assert services.find_java(env, minimum=services.MIN_FLINK_JAVA, needed_by="Flink 2.x") == fake / "java"
    with pytest.raises(ServiceError, match=r"is Java 11; the Kafka 4.x broker needs Java 17\+"):
        services.find_java(env)


@pytest.mark.parametrize(
    "field, env_name, kwargs",
    [
        ("kafka_port", "ONRAMP_KAFKA_PORT", {"flink": False}),
        ("kafka_controller_port", "ONRAMP_KAFKA_CONTROLLER_PORT", {"flink": False}),
        ("flink_rest_port", "ONRAMP_FLINK_REST_PORT", {"kafka": False}),
        # Both asked for: the busy Flink port is found before Kafka starts, so no broker is left running alone.
        ("flink_rest_port", "ONRAMP_FLINK_REST_PORT", {}),
    ],
)
def test_port_in_use_gives_clear_error(cfg, field, env_name, kwargs):
    port = getattr(cfg, field)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT from earlier runs
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(ServiceError) as info:
            services.up(cfg, **kwargs)
    assert str(info.value) == f"port {port} is in use by another process; stop it or set {env_name}"
    st = services.status(cfg)
    assert not st["kafka"]["running"] and not st["flink"]["running"]


def test_an_unwritable_state_dir_names_the_setting(cfg, tmp_path):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a directory")
    with pytest.raises(ServiceError, match=r"cannot write .*a-file.*set --state-dir / ONRAMP_STATE_DIR to a writable"):
        services.up(cfg.replace(state_dir=in_the_way, pseudonym_key_file=in_the_way / "key"))


def test_unprovisioned_jars_give_clear_error(cfg, tmp_path):
    with pytest.raises(ServiceError, match=r"cannot start Kafka: .*not provisioned.*python -m jobs\.provision"):
        services.up(cfg.replace(jars_dir=tmp_path / "no-jars"), flink=False)


def test_broker_not_up_in_time_reports_log_tail_and_cleans_up(cfg):
    with pytest.raises(ServiceError) as info:
        services.up(cfg.replace(service_timeout_s=0.5), flink=False)
    message = str(info.value)
    assert f"Kafka broker not up at localhost:{cfg.kafka_port} within 0.5s" in message
    assert "Last lines:" in message and "onramp: starting Kafka" in message  # the tail of kafka.log
    assert not services.status(cfg)["kafka"]["running"]
    assert not (Path(cfg.run_dir) / "kafka.pid").exists()


# ---- the real thing ---------------------------------------------------------------------------------------------


def test_up_starts_kafka_and_flink(cfg):
    result = services.up(cfg)
    assert result["kafka"]["healthy"] and result["kafka"]["started"]
    assert result["flink"]["healthy"] and result["flink"]["started"]
    assert (Path(cfg.run_dir) / "kafka.pid").read_text().strip() == str(result["kafka"]["pid"])
    assert (Path(cfg.log_dir) / "kafka.log").stat().st_size > 0

    # Kafka: one message round trip with kafka-python.
    topic = f"svc-test-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=cfg.bootstrap_servers)
    producer.send(topic, b"hello onramp").get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(
        topic, bootstrap_servers=cfg.bootstrap_servers, group_id="svc-test", auto_offset_reset="earliest",
        consumer_timeout_ms=30_000,
    )
    try:
        first = next(iter(consumer), None)  # consumer_timeout_ms ends the iteration if nothing arrives
    finally:
        consumer.close()
    assert first is not None and first.value == b"hello onramp"

    # Flink: the REST API reports a taskmanager with slots.
    with urllib.request.urlopen(f"http://localhost:{cfg.flink_rest_port}/overview", timeout=10) as resp:
        overview = json.loads(resp.read())
    assert overview["taskmanagers"] >= 1 and overview["slots-total"] >= 1
    conf = (Path(cfg.state_dir) / "flink-conf" / "config.yaml").read_text()
    assert "--add-opens=java.base/java.lang=ALL-UNNAMED" in conf, "the wheel's Java 17 opts must survive"
    assert "python.execution-mode: thread" in conf


def test_up_twice_is_harmless(cfg):
    before = services.status(cfg)
    assert before["kafka"]["healthy"] and before["flink"]["healthy"]
    again = services.up(cfg)
    assert again["kafka"]["started"] is False and again["flink"]["started"] is False
    assert _pids(services.status(cfg)) == _pids(before)


def test_up_with_another_port_refuses_at_once_and_keeps_what_runs(cfg):
    """It used to wait the whole service timeout on the new port, then stop the healthy service."""
    before = _pids(services.status(cfg))
    for field, kwargs, what in (("kafka_port", {"flink": False}, "Kafka"),
                                ("flink_rest_port", {"kafka": False}, "Flink")):
        other = _pick_port(getattr(cfg, field) + 7, {cfg.kafka_port, cfg.kafka_controller_port, cfg.flink_rest_port})
        started = time.monotonic()
        with pytest.raises(ServiceError, match=rf"{what} from state_dir .* is already running .*, not {field} "
                                               rf"{other}: `onramp down` first"):
            services.up(cfg.replace(**{field: other}), **kwargs)
        assert time.monotonic() - started < 10
    after = services.status(cfg)
    assert after["kafka"]["healthy"] and after["flink"]["healthy"] and _pids(after) == before


def test_kafka_admin_topics_are_idempotent(cfg):
    names = [f"adm-{uuid.uuid4().hex[:6]}", f"adm-{uuid.uuid4().hex[:6]}"]
    assert kafka_admin.wait_for_broker(cfg.bootstrap_servers, 10)["brokers"]
    assert sorted(kafka_admin.ensure_topics(cfg, names, partitions=2)) == sorted(names)
    assert kafka_admin.ensure_topics(cfg, names, partitions=2) == []
    assert sorted(kafka_admin.delete_topics(cfg, names)) == sorted(names)
    assert kafka_admin.delete_topics(cfg, names) == []


def _flink_run(cfg, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(services.flink_bin(cfg)), "run", *args]
    return subprocess.run(cmd, env=services.flink_env(cfg), capture_output=True, text=True, timeout=180)


def _tm_stdout(cfg) -> str:
    return "".join(p.read_text() for p in (Path(cfg.log_dir) / "flink").glob("*taskexecutor*.out"))


KAFKA_JOB = """
import sys
from pyflink.common import Types, WatermarkStrategy
from pyflink.common.serialization import SimpleStringSchema
from pyflink.datastream import StreamExecutionEnvironment
from pyflink.datastream.connectors.kafka import KafkaOffsetsInitializer, KafkaSource

bootstrap, topic, jar = sys.argv[1:4]
env = StreamExecutionEnvironment.get_execution_environment()
env.add_jars(jar)  # pipeline.jars
source = (KafkaSource.builder().set_bootstrap_servers(bootstrap).set_topics(topic).set_group_id("svc-job")
          .set_starting_offsets(KafkaOffsetsInitializer.earliest())
          .set_bounded(KafkaOffsetsInitializer.latest())
          .set_value_only_deserializer(SimpleStringSchema()).build())
env.from_source(source, WatermarkStrategy.no_watermarks(), "kafka") \\
    .map(lambda s: "seen:" + s.upper(), Types.STRING()).print()
env.execute("onramp-services-kafka-smoke")
"""

SIMPLE_JOB = """
from pyflink.datastream import StreamExecutionEnvironment
env = StreamExecutionEnvironment.get_execution_environment()
env.from_collection(["a", "b"]).map(lambda s: "second-job:" + s).print()
env.execute("onramp-services-second-job")
"""


def test_flink_run_python_jobs_in_thread_mode(cfg, tmp_path):
    """`flink run -py` against our cluster: a KafkaSource job, then a second job on the same TaskManager.

    The second job guards the flink-python-in-lib overlay: without it pemja's native library stays bound to
    the first job's classloader and every later thread-mode job fails.
    """
    topic = f"job-in-{uuid.uuid4().hex[:8]}"
    kafka_admin.ensure_topics(cfg, [topic])
    producer = KafkaProducer(bootstrap_servers=cfg.bootstrap_servers)
    for word in ("alpha", "beta"):
        producer.send(topic, word.encode())
    producer.flush()
    producer.close()

    (tmp_path / "kafka_job.py").write_text(KAFKA_JOB)
    jar = flink_job_jars(cfg)[0].as_uri()
    run = _flink_run(cfg, "-py", str(tmp_path / "kafka_job.py"), cfg.bootstrap_servers, topic, jar)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "seen:ALPHA" in _tm_stdout(cfg) and "seen:BETA" in _tm_stdout(cfg)

    (tmp_path / "simple_job.py").write_text(SIMPLE_JOB)
    run = _flink_run(cfg, "-py", str(tmp_path / "simple_job.py"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "second-job:a" in _tm_stdout(cfg)
    tm_log = "".join(p.read_text() for p in (Path(cfg.log_dir) / "flink").glob("*taskexecutor*.log"))
    assert "EmbeddedPythonEnvironmentManager" in tm_log, "the jobs did not run in thread mode"


def test_down_leaves_nothing_of_ours(cfg):
    before = services.status(cfg)
    pids = [before["kafka"]["pid"], before["flink"]["pid"], *before["flink"]["taskmanager_pids"]]
    assert all(pids)
    result = services.down(cfg)
    assert sorted(result["kafka"]["stopped"] + result["flink"]["stopped"]) == sorted(pids)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    assert not list(Path(cfg.run_dir).glob("*.pid"))
    for port in (cfg.kafka_port, cfg.kafka_controller_port, cfg.flink_rest_port):
        assert services._port_free(port), f"port {port} still bound after down"
    st = services.status(cfg)
    assert not st["kafka"]["running"] and not st["flink"]["running"]
    assert services.down(cfg)["kafka"]["stopped"] == []  # harmless when nothing runs
