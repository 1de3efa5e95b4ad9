"""One typed configuration for every Onramp command and job.

Precedence, lowest to highest: the defaults below, ``ONRAMP_<FIELD>`` environment variables, then explicit
overrides (CLI flags). Every value is validated in one place so a typo fails before a job is submitted, not
minutes later inside a TaskManager.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from functools import lru_cache
from typing import Any, Mapping

from udfs.dedup import DEFAULT_MAX_IDS, DEFAULT_WINDOW_MS
from udfs.profile_state import DEFAULT_CONTEXT_FIELDS, DEFAULT_DEMOGRAPHIC_FIELDS

REPO_ROOT = Path(__file__).resolve().parents[1]

DELIVERY_MODES = ("at-least-once", "exactly-once")
BUILTIN_RULES = "builtin"
NO_EXPERIMENTS = "none"
EXECUTION_MODES = ("thread", "process")
# Kafka transport security (docs/security.md)
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# Settings never written to logs, `repr`, ``as_dict()`` (the job's command line) or status output: they reach a
# job through the submitting process's environment (``secret_environ``) or a file (``kafka_sasl_password_file``).
SECRET_FIELDS = ("kafka_sasl_password",)
# Pass-through client options that would carry a secret onto the job's command line; the typed settings replace them.
_SECRET_PASS_THROUGH = ("kafka.sasl.password", "kafka.sasl.jaas.config", "kafka.ssl.key.password",
                        "kafka.ssl.keystore.password", "kafka.ssl.truststore.password", "kafka.ssl.keystore.key")
STATE_BACKENDS = ("hashmap", "rocksdb")
RESTART_STRATEGIES = ("exponential-delay", "fixed-delay", "none")


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


@dataclass(frozen=True)
class OnrampConfig:
    """Everything a job, the CLI and the local services need to agree on."""

    # Kafka
    bootstrap_servers: str = "localhost:9092"
    input_topic: str = "onboarding-events"
    decisions_topic: str = "next-step-decisions"
    dead_letter_topic: str = "onboarding-dead-letters"
    # Audit records (avro/audit_record.avsc): one per decision, erasure and state check; "" turns them off
    audit_topic: str = "onramp-audit"
    # Messages to one key of the running job (state checks; udfs/control.py), read next to the input topic
    control_topic: str = "onramp-control"
    group_id: str = "onramp-personalize"
    # Experiment outcomes (jobs/experiment_outcomes.py): per-user outcome rows, keyed (user, experiment), for a
    # compacted topic. The job reads events and decisions as consumer group "<group_id>-experiment-outcomes".
    experiment_outcomes_topic: str = "experiment-outcomes"
    # Outcomes are product analytics: only users whose last stated consent allows analytics get rows.
    outcomes_require_analytics_consent: bool = True
    topic_partitions: int = 1
    # Kafka transport security for every client (CLI, tools, the job's source and sinks); docs/security.md.
    # One set of PEM files serves the Python clients and the Java ones inside Flink (PEM trust/key stores).
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_ssl_cafile: str = ""  # CA certificate(s) that signed the brokers' certificates (PEM)
    kafka_ssl_certfile: str = ""  # mutual TLS only: ONE PEM file with the client's private key + certificate chain
    kafka_ssl_check_hostname: bool = True
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)  # secret: set ONRAMP_KAFKA_SASL_PASSWORD, never a flag
    kafka_sasl_password_file: str = ""  # or a file holding the password (first line)
    # Flink
    flink_rest_url: str = "http://localhost:8081"
    parallelism: int = 1
    delivery: str = "at-least-once"
    checkpoint_interval_ms: int = 5000
    execution_mode: str = "thread"
    bundle_size: int = 1000
    bundle_time_ms: int = 5
    # Network buffers flush after at most this long (Flink's default 100 ms). 1 ms with sink_linger_ms 1: p50
    # 6 ms at 1,000 events/s instead of 10 ms with 5/5, for ~4% more CPU per event (docs/performance.md).
    buffer_timeout_ms: int = 1
    transaction_timeout_ms: int = 600_000
    # Reliability (docs/operations.md). Checkpoints go to checkpoint_dir (a path or a URI; empty:
    # <state_dir>/checkpoints) and are kept when the job is cancelled, so `onramp submit --from-checkpoint latest`
    # can resume from one. state_backend "rocksdb" keeps state on local disk with incremental checkpoints (for
    # user counts whose profiles do not fit the TaskManager heap); "hashmap" keeps it on the heap (faster).
    checkpoint_dir: str = ""
    savepoint_dir: str = ""  # where `onramp stop --savepoint` writes (empty: <state_dir>/savepoints)
    state_backend: str = "hashmap"
    # A user's profile expires this long after its last update (processing time); 0 keeps profiles forever.
    state_ttl_hours: float = 30 * 24.0
    # Profiles the personalize operator keeps deserialized after writing them (write-through; udfs/profile_cache.py),
    # so the next event of a recently active user reads no state: +3% events/s on the heap backend, +10% with
    # RocksDB, for ~4 kB of Python memory per profile (docs/operations.md); 0: every event reads Flink's state.
    profile_cache_size: int = 10_000
    # After a failure (a TaskManager lost, the broker gone) the job restarts from its last checkpoint:
    # exponential-delay waits restart_delay_ms, growing to restart_max_delay_ms, without limit; fixed-delay waits
    # restart_delay_ms up to restart_attempts times, then the job fails; none fails at once.
    restart_strategy: str = "exponential-delay"
    restart_delay_ms: int = 1000
    restart_max_delay_ms: int = 60_000
    restart_attempts: int = 10
    # `onramp submit` waits this long (retrying with backoff) for the broker before it gives up with a clear error
    broker_wait_s: float = 30.0
    # Kafka sinks batch records for up to this long: with 0 every record wakes the producer's I/O thread from
    # the keyed operator's thread (a syscall and a lock hand-off per decision), which capped throughput at
    # ~3,800 events/s against ~5,600 with 5 ms; 1 ms keeps the batching and halves the latency it adds
    # (docs/performance.md).
    sink_linger_ms: int = 1
    # The Kafka sink in a task (thread) of its own instead of chained to the Python operator: the row conversion,
    # serialization and producer send then run beside the Python work, on the second core, for one more local
    # network hop (flushed after buffer_timeout_ms). Full job: ~8% more events/s here (docs/performance.md).
    sink_own_thread: bool = True
    # Freeze the TaskManager interpreter's start-up heap (gc.freeze) once the personalize operator is open: a
    # full garbage collection then skips ~140k long-lived objects instead of pausing ~100-170 ms, which set the
    # p99/max latency (udfs/gc_pauses.py, docs/performance.md). Off only to measure the difference.
    gc_freeze: bool = True
    # Validation of incoming events
    max_future_skew_ms: int = 5 * 60 * 1000
    max_event_age_ms: int = 365 * 24 * 3600 * 1000
    # Hot reload: how often (processing time) each operator instance checks <model_dir>/CURRENT; 0 disables
    model_reload_interval_ms: int = 1000
    # Decision rules: a YAML rule set (rules/ruleset.schema.json), or "builtin" for the built-in rules; the running
    # job re-reads the file at most every rules_reload_interval_ms (0: never)
    rules_file: str = str(REPO_ROOT / "rules" / "onboarding.yaml")
    rules_reload_interval_ms: int = 1000
    # Experiments: a YAML experiments file (udfs/experiment_arms/experiments.schema.json, docs/experiments.md), or
    # "none" for no experiments; the running job re-reads it at most every experiments_reload_interval_ms (0: never)
    experiments_file: str = str(REPO_ROOT / "rules" / "experiments.yaml")
    experiments_reload_interval_ms: int = 1000
    # Profile and interest scoring
    interest_half_life_hours: float = 72.0
    # Deduplication: an event id seen before for the user within this window (of event time, before the newest
    # event of that user) gets no second decision; 0 disables. At most dedup_max_ids ids per user, oldest dropped.
    dedup_window_ms: int = DEFAULT_WINDOW_MS
    dedup_max_ids: int = DEFAULT_MAX_IDS
    # Identity resolution (docs/identity-resolution.md): how long after an anonymous id merged into a user its late
    # events are still forwarded to the user (and a pending claim is not re-sent)
    alias_window_ms: int = 24 * 3600 * 1000
    # Data minimization: the only demographic / context fields (avro/onboarding_event.avsc Demographic and
    # EventContext) a profile may hold, for the purpose "personalization". Comma-separated in env / --set.
    allowed_demographic_fields: tuple[str, ...] = DEFAULT_DEMOGRAPHIC_FIELDS
    allowed_context_fields: tuple[str, ...] = DEFAULT_CONTEXT_FIELDS
    # Training labels: a user churned if no onboarding_completed came within this long after signup
    churn_horizon_hours: float = 96.0
    # Training: holdout AUC the costlier churn model (boosted trees) must gain over the logistic regression to be
    # published; every event pays for the model it runs (models/training.py _choose_churn). -1 always takes trees.
    churn_auc_margin: float = 0.005
    # Files
    state_dir: Path = REPO_ROOT / ".onramp"
    jars_dir: Path = REPO_ROOT / ".cache" / "jars"
    model_dir: Path = REPO_ROOT / ".onramp" / "models"
    # Pseudonymization key (udfs/pseudonym.py): read by every TaskManager from this path, unless the TaskManager
    # has ONRAMP_PSEUDONYM_KEY in its environment. Only the path travels with the job, never the key.
    # `onramp up` creates it for the local cluster; on a real cluster mount it (a Kubernetes Secret).
    pseudonym_key_file: Path = REPO_ROOT / ".onramp" / "secrets" / "pseudonym.key"
    # Local services
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    # The local broker also listens with TLS (SSL) on this port, and with SASL_SSL (PLAIN, the configured
    # username/password) on the next one; 0: off. Certificates: <state_dir>/tls/ (jobs/tls_certs.py).
    kafka_tls_port: int = 0
    kafka_sasl_ssl_port: int = 0
    flink_rest_port: int = 8081
    # Prometheus reporter of the local cluster: JobManager and TaskManagers serve /metrics on ports from this one
    # up (9249-9258); 0 turns it off. The job's own metrics (decisions, dead_letters_<code>, event_to_decision_ms,
    # model_version...) are there too, as on the Flink REST API.
    prometheus_port: int = 9249
    service_timeout_s: float = 90.0
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        for name in ("allowed_demographic_fields", "allowed_context_fields"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = _split_list(value)
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                object.__setattr__(self, name, tuple(value))  # lists (JSON, overrides) become tuples
            else:
                problems.append(f"{name} must be a list of field names, got {value!r}")
        problems += _allow_list_problems(self.allowed_demographic_fields, self.allowed_context_fields)
        if self.delivery not in DELIVERY_MODES:
            problems.append(f"delivery must be one of {', '.join(DELIVERY_MODES)}, got {self.delivery!r}")
        if self.state_backend not in STATE_BACKENDS:
            problems.append(f"state_backend must be one of {', '.join(STATE_BACKENDS)}, got {self.state_backend!r}")
        if self.restart_strategy not in RESTART_STRATEGIES:
            problems.append(f"restart_strategy must be one of {', '.join(RESTART_STRATEGIES)}, "
                            f"got {self.restart_strategy!r}")
        if self.state_ttl_hours < 0:
            problems.append(f"state_ttl_hours must be >= 0 (0: profiles never expire), got {self.state_ttl_hours}")
        if self.restart_max_delay_ms < self.restart_delay_ms:
            problems.append("restart_max_delay_ms must be >= restart_delay_ms")
        if self.execution_mode not in EXECUTION_MODES:
            problems.append(f"execution_mode must be one of {', '.join(EXECUTION_MODES)}, got {self.execution_mode!r}")
        for name in ("parallelism", "topic_partitions", "bundle_size", "checkpoint_interval_ms", "restart_delay_ms",
                     "restart_attempts"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("bundle_time_ms", "buffer_timeout_ms", "sink_linger_ms", "max_future_skew_ms", "max_event_age_ms",
                     "profile_cache_size",
                     "model_reload_interval_ms", "rules_reload_interval_ms", "experiments_reload_interval_ms",
                     "dedup_window_ms", "alias_window_ms"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.prometheus_port and not 0 < self.prometheus_port < 65527:
            problems.append(f"prometheus_port must be 0 (off) or a TCP port below 65527, got {self.prometheus_port}")
        for name in ("kafka_port", "kafka_controller_port", "flink_rest_port"):
            if not 0 < getattr(self, name) < 65536:
                problems.append(f"{name} must be a TCP port (1-65535), got {getattr(self, name)}")
        for name in ("kafka_tls_port", "kafka_sasl_ssl_port"):
            if not 0 <= getattr(self, name) < 65536:
                problems.append(f"{name} must be a TCP port (1-65535) or 0 (off), got {getattr(self, name)}")
        problems += _security_problems(self)
        if self.dedup_max_ids < 1:
            problems.append(f"dedup_max_ids must be >= 1, got {self.dedup_max_ids}")
        local_ports = {name: getattr(self, name) for name in ("kafka_port", "kafka_controller_port", "flink_rest_port",
                                                              "kafka_tls_port", "kafka_sasl_ssl_port",
                                                              "prometheus_port") if getattr(self, name)}
        by_port: dict[int, list[str]] = {}
        for name, port in local_ports.items():
            by_port.setdefault(port, []).append(name)
        for port, names in by_port.items():
            if len(names) > 1:  # the local services would fight over it (the second fails to bind, or worse)
                problems.append(f"{' and '.join(names)} are both {port}; the local services need a port each")
        if self.interest_half_life_hours <= 0:
            problems.append("interest_half_life_hours must be > 0")
        if self.churn_horizon_hours <= 0:
            problems.append("churn_horizon_hours must be > 0")
        if not -1.0 <= self.churn_auc_margin <= 1.0:
            problems.append(f"churn_auc_margin must be between -1 and 1 (an AUC difference), got {self.churn_auc_margin}")
        if self.rules_file != BUILTIN_RULES and not Path(self.rules_file).is_file():
            problems.append(f"rules_file {self.rules_file!r} does not exist (a YAML rule set, or {BUILTIN_RULES!r})")
        if not self.control_topic.strip():
            problems.append("control_topic must not be empty (the job reads state checks from it)")
        named = [t for t in (self.input_topic, self.decisions_topic, self.dead_letter_topic, self.audit_topic,
                             self.control_topic) if t]
        if len(set(named)) != len(named):
            problems.append(f"input, decisions, dead-letter, audit and control topics must differ, got {named}")
        if self.experiments_file != NO_EXPERIMENTS and not Path(self.experiments_file).is_file():
            problems.append(f"experiments_file {self.experiments_file!r} does not exist (a YAML experiments file, "
                            f"or {NO_EXPERIMENTS!r})")
        if not self.experiment_outcomes_topic.strip():
            problems.append("experiment_outcomes_topic must not be empty")
        if not self.bootstrap_servers.strip():
            problems.append("bootstrap_servers must not be empty")
        if self.delivery == "exactly-once" and self.transaction_timeout_ms > 900_000:
            problems.append("transaction_timeout_ms must stay below the broker's transaction.max.timeout.ms (900000)")
        if problems:
            raise ConfigError("invalid Onramp configuration:\n  - " + "\n  - ".join(problems))

    def job_topics(self) -> list[str]:
        """Every topic the personalize job reads or writes (created by `onramp up` / `onramp submit`)."""
        return [t for t in (self.input_topic, self.decisions_topic, self.dead_letter_topic, self.audit_topic,
                            self.control_topic) if t]

    @property
    def run_dir(self) -> Path:
        """Pid files of the local services."""
        return self.state_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def checkpoint_uri(self) -> str:
        """Where checkpoints go, as the URI Flink wants (``file:///...`` for a local path)."""
        return _as_uri(self.checkpoint_dir, self.state_dir / "checkpoints")

    @property
    def savepoint_uri(self) -> str:
        return _as_uri(self.savepoint_dir, self.state_dir / "savepoints")

    @property
    def state_ttl_ms(self) -> int:
        return int(self.state_ttl_hours * 3_600_000)

    def replace(self, **changes: Any) -> "OnrampConfig":
        return load_config(overrides=changes, base=self, environ={})

    def profile_policy(self) -> Any:
        """The :class:`udfs.profile_state.ProfilePolicy` the job and training fold events with."""
        from udfs.profile_state import ProfilePolicy

        return ProfilePolicy(self.allowed_demographic_fields, self.allowed_context_fields, self.dedup_window_ms,
                             self.dedup_max_ids)

    def as_dict(self) -> dict[str, Any]:
        """Every setting except the secrets (:data:`SECRET_FIELDS`): safe to print, log and pass on a command line."""
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v) for f in fields(self)
                if f.name not in SECRET_FIELDS}

    def secret_environ(self) -> dict[str, str]:
        """The secrets set on this config as ``ONRAMP_*`` environment entries, for a child process (``flink run``)
        that rebuilds the config from :meth:`as_dict`: a process's environment is readable only by its user,
        its command line by everyone (``ps``)."""
        return {"ONRAMP_" + name.upper(): value for name in SECRET_FIELDS if (value := getattr(self, name))}


def secrets_from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``ONRAMP_*`` entries of ``environ`` that carry secrets (see :meth:`OnrampConfig.secret_environ`)."""
    names = {"ONRAMP_" + name.upper() for name in SECRET_FIELDS}
    return {k: v for k, v in environ.items() if k in names}


def _security_problems(cfg: OnrampConfig) -> list[str]:
    """Transport security settings that cannot work together; checked before any client connects."""
    problems = []
    protocol = cfg.kafka_security_protocol
    if protocol not in SECURITY_PROTOCOLS:
        return [f"kafka_security_protocol must be one of {', '.join(SECURITY_PROTOCOLS)}, got {protocol!r}"]
    if protocol.endswith("SSL") and not cfg.kafka_ssl_cafile:
        problems.append(f"kafka_security_protocol={protocol} needs kafka_ssl_cafile: the PEM file of the CA that "
                        "signed the brokers' certificates (for a public CA, the system bundle, e.g. "
                        "/etc/ssl/certs/ca-certificates.crt; for the local broker, <state_dir>/tls/ca.pem)")
    if protocol.startswith("SASL"):
        if cfg.kafka_sasl_mechanism not in SASL_MECHANISMS:
            problems.append(f"kafka_security_protocol={protocol} needs kafka_sasl_mechanism, one of "
                            f"{', '.join(SASL_MECHANISMS)}; got {cfg.kafka_sasl_mechanism or 'none'!r}")
        if not cfg.kafka_sasl_username:
            problems.append(f"kafka_security_protocol={protocol} needs kafka_sasl_username")
        if not cfg.kafka_sasl_password and not cfg.kafka_sasl_password_file:
            problems.append(f"kafka_security_protocol={protocol} needs a password: set ONRAMP_KAFKA_SASL_PASSWORD "
                            "or kafka_sasl_password_file (a file holding it)")
    elif cfg.kafka_sasl_mechanism and cfg.kafka_sasl_mechanism not in SASL_MECHANISMS:
        problems.append(f"kafka_sasl_mechanism must be one of {', '.join(SASL_MECHANISMS)}, "
                        f"got {cfg.kafka_sasl_mechanism!r}")
    if cfg.kafka_sasl_password and cfg.kafka_sasl_password_file:
        problems.append("set kafka_sasl_password or kafka_sasl_password_file, not both")
    if cfg.kafka_sasl_password_file and not Path(cfg.kafka_sasl_password_file).is_file():
        problems.append(f"kafka_sasl_password_file {cfg.kafka_sasl_password_file!r} does not exist")
    if cfg.kafka_sasl_ssl_port and not (cfg.kafka_tls_port and cfg.kafka_sasl_username
                                        and (cfg.kafka_sasl_password or cfg.kafka_sasl_password_file)):
        problems.append("kafka_sasl_ssl_port needs kafka_tls_port (the certificates) and the SASL user the local "
                        "broker accepts: kafka_sasl_username and ONRAMP_KAFKA_SASL_PASSWORD or kafka_sasl_password_file")
    leaked = sorted(k for k in cfg.extra if k.lower() in _SECRET_PASS_THROUGH)
    if leaked:
        problems.append(f"{', '.join(leaked)} would put a secret on the job's command line; use the typed settings "
                        "instead (kafka_sasl_username + ONRAMP_KAFKA_SASL_PASSWORD or kafka_sasl_password_file; "
                        "PEM files for TLS), see docs/security.md")
    return problems


def _as_uri(value: str, default: Path) -> str:
    """``value`` if it is a URI (s3://, hdfs://, file://), else the absolute ``file://`` URI of the path."""
    if value and "://" in value:
        return value
    return Path(value or default).expanduser().resolve().as_uri()


def _split_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@lru_cache(maxsize=1)
def _event_record_fields() -> dict[str, tuple[str, ...]]:
    """Field names of the event's nested records (Demographic, EventContext, ...) in the reader schema."""
    from udfs.avro_codec import EVENT_SCHEMA, default_store

    out: dict[str, tuple[str, ...]] = {}
    for f in default_store().reader(EVENT_SCHEMA).parsed["fields"]:
        for branch in f["type"] if isinstance(f["type"], list) else [f["type"]]:
            if isinstance(branch, dict) and branch.get("type") == "record":
                out[f["name"]] = tuple(g["name"] for g in branch["fields"])
    return out


def _allow_list_problems(demographic: Any, context: Any) -> list[str]:
    if not isinstance(demographic, tuple) or not isinstance(context, tuple):
        return []  # already reported
    problems = []
    records = _event_record_fields()
    for name, record, allowed in (("allowed_demographic_fields", "demographic", demographic),
                                  ("allowed_context_fields", "context", context)):
        known = records.get(record, ())
        unknown = [v for v in allowed if v not in known]
        if unknown:
            problems.append(f"{name}: {', '.join(map(repr, unknown))} not a field of the event's {record} record "
                            f"(avro/onboarding_event.avsc); known: {', '.join(known)}")
    return problems


_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def _coerce(name: str, raw: Any, target: Any) -> Any:
    """Convert a string (env or CLI) to the type of the field's default; a tuple from a comma-separated list."""
    if isinstance(target, tuple) and isinstance(raw, list):
        return tuple(raw)
    if raw is None or not isinstance(raw, str):
        return raw
    if isinstance(target, tuple):
        return _split_list(raw)
    try:
        if isinstance(target, bool):
            word = raw.strip().lower()
            if word in _TRUE_WORDS or word in _FALSE_WORDS:
                return word in _TRUE_WORDS
            # A typo must not silently turn a safety setting off (e.g. kafka_ssl_check_hostname=ture).
            raise ValueError(f"not one of {', '.join(_TRUE_WORDS)} / {', '.join(_FALSE_WORDS)}")
        if isinstance(target, int):
            return int(raw.replace("_", ""))
        if isinstance(target, float):
            value = float(raw)
            if not math.isfinite(value):  # nan passes every range check (comparisons are false): refuse it here
                raise ValueError("not a finite number")
            return value
        if isinstance(target, Path):
            return Path(raw).expanduser()
    except ValueError as exc:
        raise ConfigError(f"{name}: cannot read {raw!r} as {type(target).__name__} ({exc})") from exc
    return raw


# ONRAMP_* variables that are not settings of OnrampConfig but are read elsewhere (keys, paths, test and image
# knobs), so a near-miss warning never fires for them.
_OTHER_ENV_VARS = frozenset({
    "ONRAMP_PSEUDONYM_KEY", "ONRAMP_KAFKA_SASL_PASSWORD_FILE", "ONRAMP_AVRO_DIR", "ONRAMP_SERVICE_TIMEOUT_S",
    "ONRAMP_LOG_FILE", "ONRAMP_JARS_DIR", "ONRAMP_FUZZ_RANDOM", "ONRAMP_FUZZ_EXAMPLES", "ONRAMP_BUILD_COMPOSE",
    "ONRAMP_IMAGE", "ONRAMP_COMPOSE_VERSION", "ONRAMP_TRAIN_USERS", "ONRAMP_KAFKA_TLS_PORT",
    "ONRAMP_KAFKA_SASL_SSL_PORT",
})


def misspelled_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """Warnings for ``ONRAMP_*`` variables that are no setting but look like one (``ONRAMP_PARALELISM``): a
    mistyped ``--set`` key is refused, but the environment cannot be, since other tools share it; so the CLI says
    so instead of silently running with the default."""
    import difflib

    environ = os.environ if environ is None else environ
    settings = {"ONRAMP_" + f.name.upper() for f in fields(OnrampConfig) if f.name != "extra"}
    warnings = []
    for name in sorted(environ):
        if not name.startswith("ONRAMP_") or name in settings or name in _OTHER_ENV_VARS:
            continue
        close = difflib.get_close_matches(name, settings, n=1, cutoff=0.85)
        if close:
            warnings.append(f"{name} is not an Onramp setting and is ignored; did you mean {close[0]}?")
    return warnings


def _unknown_setting(name: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else "."
    return (f"unknown setting {name!r}{hint} The settings are the fields of OnrampConfig (jobs/config.py); Kafka "
            f"client and Flink options pass through as kafka.<option> / flink.<option>")


def load_config(
    overrides: Mapping[str, Any] | None = None,
    *,
    base: OnrampConfig | None = None,
    environ: Mapping[str, str] | None = None,
) -> OnrampConfig:
    """Build the config: defaults (or ``base``), then ``ONRAMP_*`` env vars, then ``overrides``.

    Overrides whose value is ``None`` are ignored so argparse namespaces can be passed straight in.
    """
    base = base or OnrampConfig()
    environ = os.environ if environ is None else environ
    known = {f.name for f in fields(OnrampConfig)}
    values: dict[str, Any] = {}
    for name in known - {"extra"}:
        env_name = "ONRAMP_" + name.upper()
        if env_name in environ:
            values[name] = _coerce(env_name, environ[env_name], getattr(base, name))
    for name, raw in (overrides or {}).items():
        if raw is None:
            continue
        if name not in known:
            raise ConfigError(_unknown_setting(name, known - {"extra"}))
        values[name] = _coerce(name, raw, getattr(base, name))
    # Derived defaults follow their parents unless set explicitly.
    if "kafka_port" in values and "bootstrap_servers" not in values and base.bootstrap_servers == "localhost:9092":
        values["bootstrap_servers"] = f"localhost:{values['kafka_port']}"
    if "flink_rest_port" in values and "flink_rest_url" not in values and base.flink_rest_url == "http://localhost:8081":
        values["flink_rest_url"] = f"http://localhost:{values['flink_rest_port']}"
    if "state_dir" in values and "model_dir" not in values and base.model_dir == base.state_dir / "models":
        values["model_dir"] = Path(values["state_dir"]) / "models"
    if ("state_dir" in values and "pseudonym_key_file" not in values
            and base.pseudonym_key_file == base.state_dir / "secrets" / "pseudonym.key"):
        values["pseudonym_key_file"] = Path(values["state_dir"]) / "secrets" / "pseudonym.key"
    return dataclasses.replace(base, **values)
