"""Transport security against a real broker: a local KRaft broker with a TLS listener and a SASL_SSL (PLAIN)
listener on throwaway certificates (jobs/tls_certs.py).

(a) the CLI's produce path, the admin client and the reader work over TLS and over SASL_SSL with the settings of
jobs/kafka_security.py; (b) wrong settings fail with a message that names the cause (a plaintext client on the TLS
port, a TLS client on the plaintext port, a CA that did not sign the broker's certificate, a wrong password);
(c) the personalize job's Kafka source and sinks (Java clients inside Flink, local mini-cluster) work over both.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from jobs.config import OnrampConfig, load_config
from jobs.kafka_security import KafkaConnectionProblem

pytestmark = pytest.mark.e2e

SASL_USER = "onramp-test"
SASL_PASSWORD = 'p4ss "quoted" \\ word'  # quotes and a backslash: JAAS and .properties escaping both matter


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory) -> OnrampConfig:
    """A broker of its own (plaintext, TLS and SASL_SSL listeners on free ports); the plaintext config."""
    from jobs import services
    from jobs.provision import provision

    ports: list[int] = []
    while len(ports) < 4:
        port = services._free_port()
        if port not in ports:
            ports.append(port)
    overrides = {
        "state_dir": str(tmp_path_factory.mktemp("onramp-tls")),
        "kafka_port": ports[0], "kafka_controller_port": ports[1], "kafka_tls_port": ports[2],
        "kafka_sasl_ssl_port": ports[3], "kafka_sasl_username": SASL_USER, "kafka_sasl_password": SASL_PASSWORD,
        "service_timeout_s": 120,
    }
    if os.environ.get("ONRAMP_JARS_DIR"):
        overrides["jars_dir"] = os.environ["ONRAMP_JARS_DIR"]
    cfg = load_config(overrides, environ={})
    provision(cfg)
    services.up(cfg, flink=False)
    try:
        yield cfg
    finally:
        services.down(cfg, flink=False)


def _ca(broker: OnrampConfig) -> str:
    return str(Path(broker.state_dir) / "tls" / "ca.pem")


def _secure(broker: OnrampConfig, protocol: str, **changes) -> OnrampConfig:
    """The client config for one of the broker's secure listeners."""
    settings = {"kafka_security_protocol": protocol, "kafka_ssl_cafile": _ca(broker)}
    if protocol == "SSL":
        settings["bootstrap_servers"] = f"localhost:{broker.kafka_tls_port}"
    else:
        settings |= {"bootstrap_servers": f"localhost:{broker.kafka_sasl_ssl_port}", "kafka_sasl_mechanism": "PLAIN"}
    return broker.replace(**{**settings, **changes})


@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
def test_cli_produce_admin_and_reader_over_tls(tls_broker, protocol, monkeypatch, capsys):
    from jobs.cli import main
    from jobs.event_stream import generated_events
    from jobs.kafka_admin import delete_topics, ensure_topics
    from jobs.kafka_io import read_records
    from udfs.avro_codec import event_codec

    topic = f"tls-cli-{protocol.lower()}"
    cfg = _secure(tls_broker, protocol, input_topic=topic)
    assert ensure_topics(cfg, [topic]) == [topic]
    # `onramp produce` as a user runs it: settings from the environment, the password too (never a flag).
    env = {"ONRAMP_BOOTSTRAP_SERVERS": cfg.bootstrap_servers, "ONRAMP_KAFKA_SECURITY_PROTOCOL": protocol,
           "ONRAMP_KAFKA_SSL_CAFILE": cfg.kafka_ssl_cafile, "ONRAMP_INPUT_TOPIC": topic,
           "ONRAMP_STATE_DIR": str(cfg.state_dir)}
    if protocol == "SASL_SSL":
        env |= {"ONRAMP_KAFKA_SASL_MECHANISM": "PLAIN", "ONRAMP_KAFKA_SASL_USERNAME": SASL_USER,
                "ONRAMP_KAFKA_SASL_PASSWORD": SASL_PASSWORD}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["produce", "--users", "4", "--seed", "3", "--max-events", "40"]) == 0
    assert SASL_PASSWORD not in capsys.readouterr().out

    codec = event_codec()
    got = [codec.decode(r.value)["event_id"] for r in read_records(cfg, topic, max_records=40, timeout_s=60)]
    assert Counter(got) == Counter(e["event_id"] for e in generated_events(4, seed=3, max_events=40))
    assert delete_topics(cfg, [topic]) == [topic]


def _other_ca(folder: Path) -> Path:
    """A CA certificate that signed nothing the broker has."""
    from jobs.tls_certs import _keytool, find_keytool

    keytool, store, pem = find_keytool(), folder / "other.p12", folder / "other.pem"
    auth = ("-storetype", "PKCS12", "-storepass", "changeit", "-keypass", "changeit")
    _keytool(keytool, "-genkeypair", "-alias", "ca", "-keyalg", "EC", "-dname", "CN=Someone else",
             "-ext", "bc:c", "-keystore", str(store), *auth)
    pem.write_text(_keytool(keytool, "-exportcert", "-rfc", "-alias", "ca", "-keystore", str(store), *auth[2:4]))
    return pem


def test_wrong_settings_fail_with_the_cause(tls_broker, tmp_path):
    from jobs.kafka_admin import admin_client
    from jobs.kafka_io import make_producer

    fast = {"bootstrap_timeout_ms": 3000}
    cases = [
        (tls_broker.replace(bootstrap_servers=f"localhost:{tls_broker.kafka_tls_port}"),
         "is a TLS listener but kafka_security_protocol is PLAINTEXT"),
        (_secure(tls_broker, "SSL", bootstrap_servers=f"localhost:{tls_broker.kafka_port}"), "does not speak TLS"),
        (_secure(tls_broker, "SSL", kafka_ssl_cafile=str(_other_ca(tmp_path))), "certificate not trusted"),
        (_secure(tls_broker, "SASL_SSL", kafka_sasl_password="not-the-password"), "SASL_SSL session failed"),
    ]
    for cfg, cause in cases:
        with pytest.raises(KafkaConnectionProblem, match=cause) as failure:
            make_producer(cfg, **fast)
        assert "not-the-password" not in str(failure.value)
    with pytest.raises(KafkaConnectionProblem, match=cases[0][1]):
        with admin_client(cases[0][0].bootstrap_servers, timeout_s=3, cfg=cases[0][0]):
            pass


@pytest.mark.minicluster
@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
def test_personalize_job_reads_and_writes_over_tls(tls_broker, trained_model_dir, protocol):
    """The job's SQL Kafka source and both KafkaSinks (Java clients, Flink's relocated Kafka classes, so SASL's
    login module must be named by its relocated class) over TLS: one decision per event."""
    from jobs.event_stream import encode_events, generated_events
    from jobs.kafka_admin import ensure_topics
    from jobs.kafka_io import make_producer, produce, read_records
    from jobs.personalize import build_kafka_job
    from jobs.provision import flink_job_jars
    from udfs.pseudonym import ensure_key_file
    from udfs.avro_codec import decision_codec

    name = f"tls-job-{protocol.lower()}"
    cfg = _secure(tls_broker, protocol, model_dir=str(trained_model_dir), input_topic=f"{name}-events",
                  decisions_topic=f"{name}-decisions", dead_letter_topic=f"{name}-dead", audit_topic=f"{name}-audit",
                  control_topic=f"{name}-control", group_id=name)
    cfg = cfg.replace(extra={"flink.restart-strategy.type": "none"})
    ensure_topics(cfg, cfg.job_topics())
    ensure_key_file(cfg.pseudonym_key_file)  # the mini-cluster's routing key reads it (`onramp up` makes it)
    events = generated_events(5, seed=17)
    producer = make_producer(cfg)
    produce(producer, cfg.input_topic, encode_events(events))
    producer.close()

    build_kafka_job(cfg, flink_job_jars(cfg), bounded=True).execute(f"onramp-tls-{protocol}")

    codec = decision_codec()
    decisions = [codec.decode(r.value) for r in read_records(cfg, cfg.decisions_topic, timeout_s=60, idle_timeout_s=3)]
    assert Counter(d["event_id"] for d in decisions) == Counter(e["event_id"] for e in events)
    assert not list(read_records(cfg, cfg.dead_letter_topic, timeout_s=10, idle_timeout_s=2))
