"""Transport security settings without a broker: validation, both client spellings, and where secrets may go."""

from __future__ import annotations

import json

import pytest

from jobs.config import ConfigError, load_config
from jobs.kafka_security import (
    KAFKA_PACKAGE,
    SHADED_KAFKA_PACKAGE,
    KafkaSecurityError,
    java_client_properties,
    python_client_kwargs,
)

PASSWORD = 's3cr"et\\pw'


@pytest.fixture
def ca(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    return path


def sasl_ssl(ca, **more):
    return load_config({"kafka_security_protocol": "SASL_SSL", "kafka_ssl_cafile": str(ca), "kafka_sasl_mechanism": "PLAIN",
                        "kafka_sasl_username": "alice", "kafka_sasl_password": PASSWORD, **more}, environ={})


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol must be one of"),
        ({"kafka_security_protocol": "SSL"}, "SSL needs kafka_ssl_cafile"),
        ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": "a", "kafka_sasl_password": "p"},
         "needs kafka_sasl_mechanism"),
        ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN"}, "needs kafka_sasl_username"),
        ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN", "kafka_sasl_username": "a"},
         "needs a password: set ONRAMP_KAFKA_SASL_PASSWORD"),
        ({"kafka_sasl_password_file": "/no/such/file"}, "kafka_sasl_password_file '/no/such/file' does not exist"),
        ({"kafka_sasl_ssl_port": "9095"}, "kafka_sasl_ssl_port needs kafka_tls_port"),
        ({"extra": {"kafka.sasl.jaas.config": "x"}}, "would put a secret on the job's command line"),
    ],
)
def test_bad_security_settings_fail_clearly(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides, environ={})


def test_secrets_stay_out_of_repr_dict_and_command_line(ca, monkeypatch):
    from jobs.cli import build_parser, config_from_args
    from jobs.personalize import config_from_json

    cfg = sasl_ssl(ca)
    assert PASSWORD not in repr(cfg)
    assert "kafka_sasl_password" not in cfg.as_dict() and PASSWORD not in json.dumps(cfg.as_dict())
    # `onramp submit` hands the secret to `flink run` through the environment; the job reads it back from there.
    assert cfg.secret_environ() == {"ONRAMP_KAFKA_SASL_PASSWORD": PASSWORD}
    monkeypatch.setenv("ONRAMP_KAFKA_SASL_PASSWORD", PASSWORD)
    monkeypatch.setenv("ONRAMP_PARALLELISM", "7")  # other env settings do not leak into the job's config
    assert config_from_json(json.dumps(cfg.as_dict())) == cfg
    with pytest.raises(ConfigError, match="must not be given on the command line"):
        config_from_args(build_parser().parse_args(["status", "--set", f"kafka_sasl_password={PASSWORD}"]))


def test_python_kwargs(ca, tmp_path):
    assert python_client_kwargs(load_config(environ={})) == {"security_protocol": "PLAINTEXT"}
    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD + "\n")
    client = tmp_path / "client.pem"
    client.write_text("key and chain")
    cfg = sasl_ssl(ca, kafka_sasl_password="", kafka_sasl_password_file=str(password_file),
                   kafka_ssl_certfile=str(client), kafka_ssl_check_hostname="false")
    assert python_client_kwargs(cfg) == {
        "security_protocol": "SASL_SSL", "ssl_cafile": str(ca), "ssl_check_hostname": False,
        "ssl_certfile": str(client), "ssl_keyfile": str(client),
        "sasl_mechanism": "PLAIN", "sasl_plain_username": "alice", "sasl_plain_password": PASSWORD,
    }


def test_java_properties(ca):
    props = java_client_properties(sasl_ssl(ca, kafka_sasl_mechanism="SCRAM-SHA-512"))
    assert props == {
        "security.protocol": "SASL_SSL", "ssl.truststore.type": "PEM", "ssl.truststore.certificates": ca.read_text(),
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.jaas.config": f'{SHADED_KAFKA_PACKAGE}.common.security.scram.ScramLoginModule required '
                            'username="alice" password="s3cr\\"et\\\\pw";',
    }
    plain = java_client_properties(sasl_ssl(ca), kafka_package=KAFKA_PACKAGE)["sasl.jaas.config"]
    assert plain.startswith("org.apache.kafka.common.security.plain.PlainLoginModule required")


def test_job_source_and_sinks_get_the_properties(ca):
    from jobs.personalize import kafka_properties

    cfg = load_config({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": str(ca),
                       "extra": {"kafka.ssl.endpoint.identification.algorithm": ""}}, environ={})
    assert kafka_properties(cfg) == {"security.protocol": "SSL", "ssl.truststore.type": "PEM",
                                     "ssl.truststore.certificates": ca.read_text(),
                                     "ssl.endpoint.identification.algorithm": ""}


def test_missing_pem_file_names_the_setting(tmp_path):
    cfg = load_config({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": str(tmp_path / "gone.pem")}, environ={})
    with pytest.raises(KafkaSecurityError, match="kafka_ssl_cafile .*gone.pem' does not exist"):
        python_client_kwargs(cfg)
