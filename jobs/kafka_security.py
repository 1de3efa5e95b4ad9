"""Kafka transport security (TLS, SASL) for each client family, from the one config (docs/security.md).

Two spellings of the same settings: kafka-python keyword arguments for the Python clients (CLI, tools, training
reads, benchmarks) and Java client properties for the Kafka source and sinks inside Flink. Both read the same PEM
files (Kafka's Java clients accept ``ssl.truststore.type=PEM`` / ``ssl.keystore.type=PEM``), so there is one set
of certificates to rotate. ``cfg.extra`` ``kafka.<option>`` pass-through settings are applied by the callers after
these, so an explicit option always wins.

The SASL password is read here, when a client is built, from the config (``ONRAMP_KAFKA_SASL_PASSWORD``) or
``kafka_sasl_password_file``; nothing in this module logs it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from jobs.config import OnrampConfig

# Onramp ships flink-sql-connector-kafka, which relocates the Kafka client under this package: a JAAS login module
# must be named by its relocated class or the Java client cannot load it.
SHADED_KAFKA_PACKAGE = "org.apache.flink.kafka.shaded.org.apache.kafka"
KAFKA_PACKAGE = "org.apache.kafka"

_LOGIN_MODULES = {
    "PLAIN": "common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "common.security.scram.ScramLoginModule",
}


class KafkaSecurityError(ValueError):
    """A file the security settings name is missing or unreadable; the message says which setting."""


def uses_ssl(cfg: OnrampConfig) -> bool:
    return cfg.kafka_security_protocol in ("SSL", "SASL_SSL")


def uses_sasl(cfg: OnrampConfig) -> bool:
    return cfg.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


def _pem_file(setting: str, value: str) -> str:
    """The absolute path of an existing file (TaskManagers may run in another working directory)."""
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise KafkaSecurityError(f"{setting} {value!r} does not exist or is not a file (a PEM file); see docs/security.md")
    return str(path)


def sasl_password(cfg: OnrampConfig) -> str:
    """The SASL password: the setting itself, else the first line of ``kafka_sasl_password_file``."""
    if cfg.kafka_sasl_password:
        return cfg.kafka_sasl_password
    if cfg.kafka_sasl_password_file:
        try:
            lines = Path(cfg.kafka_sasl_password_file).expanduser().read_text().splitlines()
        except OSError as exc:
            raise KafkaSecurityError(f"kafka_sasl_password_file {cfg.kafka_sasl_password_file!r} cannot be read: "
                                     f"{exc.strerror}") from None
        if lines and lines[0]:
            return lines[0]
        raise KafkaSecurityError(f"kafka_sasl_password_file {cfg.kafka_sasl_password_file!r} is empty")
    raise KafkaSecurityError("no SASL password: set ONRAMP_KAFKA_SASL_PASSWORD or kafka_sasl_password_file")


def python_client_kwargs(cfg: OnrampConfig) -> dict[str, Any]:
    """Keyword arguments for kafka-python's KafkaProducer, KafkaConsumer and KafkaAdminClient."""
    kwargs: dict[str, Any] = {"security_protocol": cfg.kafka_security_protocol}
    if uses_ssl(cfg):
        kwargs["ssl_cafile"] = _pem_file("kafka_ssl_cafile", cfg.kafka_ssl_cafile)
        kwargs["ssl_check_hostname"] = cfg.kafka_ssl_check_hostname
        if cfg.kafka_ssl_certfile:
            # One file holds key and chain; Python's ssl reads the key out of it as well.
            kwargs["ssl_certfile"] = kwargs["ssl_keyfile"] = _pem_file("kafka_ssl_certfile", cfg.kafka_ssl_certfile)
    if uses_sasl(cfg):
        kwargs["sasl_mechanism"] = cfg.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = cfg.kafka_sasl_username
        kwargs["sasl_plain_password"] = sasl_password(cfg)
    return kwargs


def jaas_quote(value: str) -> str:
    """A JAAS option value in double quotes, escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def jaas_config(cfg: OnrampConfig, *, kafka_package: str = SHADED_KAFKA_PACKAGE) -> str:
    """``sasl.jaas.config`` for the configured mechanism (PLAIN or SCRAM) and user."""
    module = f"{kafka_package}.{_LOGIN_MODULES[cfg.kafka_sasl_mechanism]}"
    return (f"{module} required username={jaas_quote(cfg.kafka_sasl_username)} "
            f"password={jaas_quote(sasl_password(cfg))};")


def java_client_properties(cfg: OnrampConfig, *, kafka_package: str = SHADED_KAFKA_PACKAGE) -> dict[str, str]:
    """Kafka Java client properties (for the Flink Kafka source and sinks).

    ``kafka_package`` names the package of the Kafka client classes the JAAS login module is loaded from: the
    relocated one inside flink-sql-connector-kafka by default, :data:`KAFKA_PACKAGE` for a plain kafka-clients jar.
    """
    props = {"security.protocol": cfg.kafka_security_protocol}
    if uses_ssl(cfg):
        # The CA certificates themselves, not their path: they are public, and travel inside the job graph, so
        # TaskManagers on other hosts need no copy of the file (`onramp submit` ships no other files).
        props["ssl.truststore.type"] = "PEM"
        props["ssl.truststore.certificates"] = Path(_pem_file("kafka_ssl_cafile", cfg.kafka_ssl_cafile)).read_text()
        if not cfg.kafka_ssl_check_hostname:
            props["ssl.endpoint.identification.algorithm"] = ""
        if cfg.kafka_ssl_certfile:  # a private key: by path, so it must exist there on every TaskManager
            props["ssl.keystore.type"] = "PEM"
            props["ssl.keystore.location"] = _pem_file("kafka_ssl_certfile", cfg.kafka_ssl_certfile)
    if uses_sasl(cfg):
        props["sasl.mechanism"] = cfg.kafka_sasl_mechanism
        props["sasl.jaas.config"] = jaas_config(cfg, kafka_package=kafka_package)
    return props


class KafkaConnectionProblem(ConnectionError):
    """No broker could be reached with the configured transport security; the message says what looks wrong."""


def _first_broker(cfg: OnrampConfig) -> tuple[str, int]:
    host, _, port = cfg.bootstrap_servers.split(",")[0].strip().rpartition(":")
    return host.strip("[]") or "localhost", int(port or 9092)


def _tls_handshake(host: str, port: int, cafile: str | None, check_hostname: bool, timeout_s: float) -> str | None:
    """None if a TLS handshake with ``host:port`` succeeds (verified against ``cafile`` if given), else why not."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=cafile) if cafile else ssl._create_unverified_context()
    context.check_hostname = bool(cafile) and check_hostname
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as exc:
        return f"certificate not trusted: {exc.verify_message}"
    except (ssl.SSLError, OSError) as exc:
        return f"no TLS handshake: {exc}"


def diagnose_connection(cfg: OnrampConfig, timeout_s: float = 3.0) -> str:
    """Why clients with ``cfg``'s security settings may not reach the first bootstrap broker, in one sentence.

    Checks only what can be told from outside: whether the port is open and whether it speaks TLS, and whether
    its certificate is trusted by ``kafka_ssl_cafile``."""
    import socket

    host, port = _first_broker(cfg)
    where = f"{host}:{port}"
    protocol = cfg.kafka_security_protocol
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"nothing accepts connections at {where} ({exc.strerror or exc}); is the broker up, is bootstrap_servers right?"
    speaks_tls = _tls_handshake(host, port, None, False, timeout_s) is None
    if not uses_ssl(cfg) and speaks_tls:
        return (f"{where} is a TLS listener but kafka_security_protocol is {protocol}; set kafka_security_protocol="
                f"SSL (or SASL_SSL) and kafka_ssl_cafile (docs/security.md)")
    if uses_ssl(cfg) and not speaks_tls:
        return (f"{where} does not speak TLS (a PLAINTEXT listener?) but kafka_security_protocol is {protocol}; "
                "point bootstrap_servers at the broker's TLS listener")
    if uses_ssl(cfg):
        problem = _tls_handshake(host, port, cfg.kafka_ssl_cafile, cfg.kafka_ssl_check_hostname, timeout_s)
        if problem:
            return (f"TLS to {where} failed, {problem} (kafka_ssl_cafile={cfg.kafka_ssl_cafile}"
                    f"{', kafka_ssl_check_hostname=true' if cfg.kafka_ssl_check_hostname else ''})")
    if uses_sasl(cfg):
        return (f"{where} accepted the connection but the {protocol} session failed: check kafka_sasl_mechanism="
                f"{cfg.kafka_sasl_mechanism}, kafka_sasl_username={cfg.kafka_sasl_username} and the password")
    return f"no Kafka broker answered at {where} with kafka_security_protocol={protocol}"


@contextlib.contextmanager
def explain_connection_errors(cfg: OnrampConfig | None) -> Iterator[None]:
    """Around building a kafka-python client: a failed bootstrap (kafka-python says only "Unable to bootstrap")
    becomes :class:`KafkaConnectionProblem` naming the likely cause, e.g. a PLAINTEXT client on a TLS port."""
    from kafka import errors as kafka_errors

    try:
        yield
    except (kafka_errors.KafkaTimeoutError, kafka_errors.KafkaConnectionError) as exc:
        if cfg is None:
            raise
        raise KafkaConnectionProblem(f"{exc}: {diagnose_connection(cfg)}") from exc
