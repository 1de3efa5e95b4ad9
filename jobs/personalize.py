"""The personalize job: onboarding events (Kafka, Avro) -> keyed per-user profile -> next-step decisions (Kafka).

Graph (one Python operator; everything around it runs in the JVM):

    Kafka SQL source: input + control topics (key, value, partition, offset;
      routing key = onramp_routing_key(value) (Java: pseudonym of the user id), or the control record's key)
      -> key by routing key (JVM) -> Personalize (Python) -> Row(topic, key, value)
      -> one Kafka SQL sink (topic from the row): decisions, dead letters, audit records, identity messages

Personalize decodes and validates each record once, then updates the profile, scores, and decides; records of
the control topic (udfs/control.py) are messages to the key they name, such as a state check.

Run it with ``onramp submit`` (which calls ``flink run -py jobs/personalize.py --config-json ...``), or import
:func:`build_pipeline` to wire it to other sources and sinks (the mini-cluster tests do).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

from pyflink.common import Configuration, Types
from pyflink.common.serialization import ByteArraySchema
from pyflink.datastream import CheckpointingMode, DataStream, KeyedStream, StreamExecutionEnvironment
from pyflink.datastream.connectors.base import DeliveryGuarantee
from pyflink.datastream.connectors.kafka import (
    KafkaRecordSerializationSchema,
    KafkaSink,
)
from pyflink.table import StreamTableEnvironment

# `flink run -py jobs/personalize.py` puts jobs/ first on sys.path; the project root must be importable too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.config import REPO_ROOT, OnrampConfig, load_config  # noqa: E402
from jobs.python_env import ensure_embedded_python_path  # noqa: E402
from udfs.flink_functions import KAFKA_RECORD, OUTPUT_RECORD, ROUTED_RECORD, OutputTopics, Personalize, read_bundle_files  # noqa: E402
from udfs.validation import ValidationLimits  # noqa: E402

log = logging.getLogger("onramp.personalize")

JOB_NAME = "onramp-personalize"
# The Java SQL function that reads the user id off the wire (jvm/src/main/java/io/onramp/flink/RoutingKey.java).
ROUTING_KEY_FUNCTION = "onramp_routing_key"
ROUTING_KEY_CLASS = "io.onramp.flink.RoutingKey"
# Job parameter naming the pseudonymization key file (RoutingKey.KEY_FILE_PARAMETER in the Java function).
KEY_FILE_PARAMETER = "onramp.pseudonym-key-file"


def python_settings(cfg: OnrampConfig) -> dict[str, str]:
    """Flink settings for the Python operators; measured choices are explained in docs/performance.md.

    The Python workers run the interpreter that builds the job (the project's .venv), which has Onramp and its
    dependencies installed; on a remote cluster set ``flink.python.executable`` in ``extra`` instead."""
    return {
        "python.executable": sys.executable,
        "python.client.executable": sys.executable,
        "python.execution-mode": cfg.execution_mode,
        "python.fn-execution.bundle.size": str(cfg.bundle_size),
        "python.fn-execution.bundle.time": str(cfg.bundle_time_ms),
        "python.operator-chaining.enabled": "true",
    }


def reliability_settings(cfg: OnrampConfig) -> dict[str, str]:
    """Flink settings for checkpoints, state and restarts (docs/operations.md): checkpoints kept on cancel so a
    new job version can start from one, the state backend, and how the job restarts after a failure."""
    settings = {
        "execution.checkpointing.dir": cfg.checkpoint_uri,
        "execution.checkpointing.savepoint-dir": cfg.savepoint_uri,
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "state.backend.type": cfg.state_backend,
        "execution.checkpointing.incremental": "true" if cfg.state_backend == "rocksdb" else "false",
        "restart-strategy.type": cfg.restart_strategy,
    }
    if cfg.restart_strategy == "exponential-delay":
        settings["restart-strategy.exponential-delay.initial-backoff"] = f"{cfg.restart_delay_ms} ms"
        settings["restart-strategy.exponential-delay.max-backoff"] = f"{cfg.restart_max_delay_ms} ms"
    elif cfg.restart_strategy == "fixed-delay":
        settings["restart-strategy.fixed-delay.attempts"] = str(cfg.restart_attempts)
        settings["restart-strategy.fixed-delay.delay"] = f"{cfg.restart_delay_ms} ms"
    return settings


def process_mode_warning(cfg: OnrampConfig) -> str | None:
    """Why ``execution_mode: process`` will be slow with this config, or None.

    PyFlink's process mode caches state reads and writes in the Python worker and commits them per bundle, but
    not for state whose TTL never returns expired values (Onramp's, so expired profiles are never served): then
    every ``update`` is a synchronous gRPC round trip to the TaskManager. Measured on a 2-core machine
    (docs/performance.md): ~900-1,000 events/s, against ~6,000 in thread mode and 3,600-4,800 in process mode
    without TTL."""
    if cfg.execution_mode != "process" or not cfg.state_ttl_ms:
        return None
    return ("execution_mode=process with state_ttl_hours > 0: PyFlink commits every state write of never-return-"
            "expired TTL state synchronously in process mode (~1,000 events/s measured against ~6,000 in thread "
            "mode); use execution_mode=thread, the default, unless you need the Python worker in its own process")


def create_env(cfg: OnrampConfig, jars: list[Path] | None = None) -> StreamExecutionEnvironment:
    if (warning := process_mode_warning(cfg)) is not None:
        log.warning(warning)
    ensure_embedded_python_path()  # before the gateway JVM starts: a local mini-cluster inherits it
    conf = Configuration()
    for key, value in {**python_settings(cfg), **reliability_settings(cfg)}.items():
        conf.set_string(key, value)
    # The Java routing-key function reads the pseudonymization key from this file on each TaskManager: the job
    # graph carries the path, never the key (udfs/pseudonym.py).
    conf.set_string("pipeline.global-job-parameters",
                    f"{KEY_FILE_PARAMETER}:{Path(cfg.pseudonym_key_file).resolve()}")
    for key, value in cfg.extra.items():  # pass-through: flink.<option> -> <option>
        if key.startswith("flink."):
            conf.set_string(key[len("flink."):], str(value))
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    if jars:
        env.add_jars(*(p.resolve().as_uri() for p in jars))
    env.set_parallelism(cfg.parallelism)
    env.set_buffer_timeout(cfg.buffer_timeout_ms)
    mode = CheckpointingMode.EXACTLY_ONCE if cfg.delivery == "exactly-once" else CheckpointingMode.AT_LEAST_ONCE
    env.enable_checkpointing(cfg.checkpoint_interval_ms, mode)
    return env


def resolve_bundle(cfg: OnrampConfig, bundle_path: Path | None = None) -> Path:
    """The bundle the job ships with: an explicit one, else the registry's current one (verified here, at the
    client, so a missing or broken bundle fails the submission rather than a TaskManager)."""
    from udfs.model_bundle import ModelBundle, load_current

    bundle = ModelBundle.load(bundle_path) if bundle_path else load_current(cfg.model_dir)
    return bundle.path


class ShippedRules(NamedTuple):
    """The rule set the job ships with: its YAML text, the absolute path the job follows, and the compiled set
    (all None for the built-in rules)."""

    text: str | None
    path: str | None
    compiled: Any

    @property
    def version(self) -> str:
        from udfs.next_step import RULES_VERSION

        return self.compiled.version if self.compiled is not None else RULES_VERSION


def resolve_rules(cfg: OnrampConfig) -> ShippedRules:
    """The rule set the job ships with. Compiled here, at the client, so a broken rule set fails the submission
    with its findings."""
    from jobs.config import BUILTIN_RULES
    from udfs.rules.compiler import compile_rules_text

    if cfg.rules_file == BUILTIN_RULES:
        return ShippedRules(None, None, None)
    path = Path(cfg.rules_file).resolve()
    text = path.read_text()
    compiled = compile_rules_text(text, str(path))
    log.info("rule set %s (%s)", compiled.version, path)
    return ShippedRules(text, str(path), compiled)


def _bundle_version(bundle_dir: Path) -> str:
    from udfs.model_bundle import MANIFEST_FILE

    manifest = json.loads((Path(bundle_dir) / MANIFEST_FILE).read_text())
    return str(manifest.get("version") or Path(bundle_dir).name)


class ArmAssets(NamedTuple):
    """What the experiments' arms pin, shipped with the job: rule set texts and model bundle files by version."""

    rules: dict[str, str]
    bundles: dict[str, dict[str, bytes]]


def _rule_files_by_version(rules_dir: Path) -> dict[str, Path]:
    """The YAML rule sets next to the configured one, by their ``version``."""
    from udfs.rules.model import RuleSetError, load_ruleset

    found: dict[str, Path] = {}
    for path in sorted(rules_dir.glob("*.yaml")):
        try:
            found.setdefault(load_ruleset(path).version, path)
        except (RuleSetError, OSError):
            continue  # not a rule set (the experiments file lives here too) or a broken one: not a candidate
    return found


def resolve_experiments(cfg: OnrampConfig, rules_version: str,
                        model_version: str) -> tuple[str | None, str | None, ArmAssets]:
    """The experiments file the job ships with: (YAML text, absolute path to follow, what its arms pin), or
    (None, None, empty) when ``experiments_file`` is "none". Validated here, at the client, so a broken file
    fails the submission. An arm may pin a rule set version (a YAML rule set in the directory of ``rules_file``
    with that ``version``) or a model bundle version (a bundle in the registry, ``model_dir``); both ship with
    the job, and a version that cannot be found fails the submission."""
    from jobs.config import BUILTIN_RULES, NO_EXPERIMENTS
    from udfs.experiment_arms import ExperimentConfigError, parse_experiments

    assets = ArmAssets({}, {})
    if cfg.experiments_file == NO_EXPERIMENTS:
        return None, None, assets
    path = Path(cfg.experiments_file).resolve()
    text = path.read_text()
    experiments = parse_experiments(text, str(path))
    pins = experiments.pinned_versions()
    wanted_rules = {v for _, _, kind, v in pins if kind == "rules_version" and v != rules_version}
    wanted_models = {v for _, _, kind, v in pins if kind == "model_version" and v != model_version}
    problems = []
    if wanted_rules:
        rules_dir = (Path(cfg.rules_file) if cfg.rules_file != BUILTIN_RULES else REPO_ROOT / "rules" / "x").parent
        files = _rule_files_by_version(rules_dir)
        for version in sorted(wanted_rules):
            if version in files:
                assets.rules[version] = files[version].read_text()
            else:
                problems.append(f"{path}: an arm pins rules_version {version}, but no rule set in {rules_dir} has "
                                f"that version (found: {', '.join(sorted(files)) or 'none'})")
    for version in sorted(wanted_models):
        bundle_dir = Path(cfg.model_dir) / version
        if (bundle_dir / "model.onnx").is_file():
            assets.bundles[version] = read_bundle_files(bundle_dir)
        else:
            problems.append(f"{path}: an arm pins model_version {version}, but {cfg.model_dir} has no such bundle "
                            "(`onramp models list`)")
    if problems:
        raise ExperimentConfigError(problems)
    log.info("experiments %s (%s); arms pin rule sets %s and model bundles %s", experiments.version, path,
             sorted(assets.rules) or "none", sorted(assets.bundles) or "none")
    return text, str(path), assets


def key_by_routing_key(records: DataStream) -> KeyedStream:
    """Key a stream of :data:`ROUTED_RECORD` rows by their first field, in the JVM.

    ``DataStream.key_by`` always inserts a Python operator that computes the key; this uses the same JVM key
    selector PyFlink puts behind it (field 0 of a ``Row(key, record)``), so the key computed in SQL costs no
    Python and the keyed function receives the record itself.
    """
    from pyflink.java_gateway import get_gateway

    selector = get_gateway().jvm.KeyByKeySelector()
    key_type = Types.ROW([Types.STRING()]).get_java_type_info()
    return KeyedStream(records._j_data_stream.keyBy(selector, key_type), KAFKA_RECORD, records)


def output_topics(cfg: OnrampConfig) -> OutputTopics:
    return OutputTopics(cfg.decisions_topic, cfg.dead_letter_topic, cfg.audit_topic, cfg.control_topic)


def build_pipeline(records: DataStream, cfg: OnrampConfig, bundle_path: Path | None = None) -> DataStream:
    """Wire the Onramp operators onto a stream of :data:`ROUTED_RECORD` rows ``Row(routing_key, Row(value,
    topic, partition, offset))``; returns every record the job makes as :data:`OUTPUT_RECORD` rows ``Row(topic,
    key, value)``: decisions and audit records (keyed by the user's pseudonym), dead letters (no key) and
    identity messages to the control topic (keyed by their destination), topics from :func:`output_topics`."""
    limits = ValidationLimits(cfg.max_future_skew_ms, cfg.max_event_age_ms)
    bundle_dir = resolve_bundle(cfg, bundle_path)
    bundle_files = read_bundle_files(bundle_dir)
    rules = resolve_rules(cfg)
    rules_text, rules_path = rules.text, rules.path
    experiments_text, experiments_path, arm_assets = resolve_experiments(cfg, rules.version,
                                                                         _bundle_version(bundle_dir))
    return (
        key_by_routing_key(records)
        .process(
            Personalize(bundle_files, cfg.interest_half_life_hours * 3_600_000.0, cfg.input_topic, limits,
                        model_dir=str(Path(cfg.model_dir).resolve()), reload_interval_ms=cfg.model_reload_interval_ms,
                        rules_text=rules_text, rules_path=rules_path,
                        rules_reload_interval_ms=cfg.rules_reload_interval_ms,
                        profile_policy=cfg.profile_policy(), gc_freeze=cfg.gc_freeze,
                        control_topic=cfg.control_topic, audit=bool(cfg.audit_topic),
                        key_file=str(Path(cfg.pseudonym_key_file).resolve()), alias_window_ms=cfg.alias_window_ms,
                        experiments_text=experiments_text, experiments_path=experiments_path,
                        experiments_reload_interval_ms=cfg.experiments_reload_interval_ms,
                        state_ttl_ms=cfg.state_ttl_ms, arm_rules=arm_assets.rules,
                        arm_bundles=arm_assets.bundles, topics=output_topics(cfg),
                        profile_cache_size=cfg.profile_cache_size),
            output_type=OUTPUT_RECORD,
        )
        .uid("personalize")
        .name("personalize")
    )


def kafka_properties(cfg: OnrampConfig) -> dict[str, str]:
    """Client settings of the Kafka source and sinks: transport security (jobs/kafka_security.py), then the
    ``cfg.extra`` pass-through keys prefixed ``kafka.``."""
    from jobs.kafka_security import java_client_properties

    extra = {k[len("kafka."):]: v for k, v in cfg.extra.items() if k.startswith("kafka.")}
    return {**java_client_properties(cfg), **extra}


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def kafka_source_options(cfg: OnrampConfig, topics: list[str], group_id: str, *, bounded: bool) -> dict[str, str]:
    """WITH options of a Kafka SQL source over ``topics`` (raw values): the group's committed offsets, earliest for
    a new group, read_committed in exactly-once mode, bounded at the current end for benchmarks, and the
    client's security settings. Callers add the format options."""
    options = {
        "connector": "kafka",
        "topic": ";".join(topics),
        "properties.bootstrap.servers": cfg.bootstrap_servers,
        "properties.group.id": group_id,
        "properties.auto.offset.reset": "earliest",
        "scan.startup.mode": "group-offsets",
    }
    if cfg.delivery == "exactly-once":
        options["properties.isolation.level"] = "read_committed"
    if bounded:
        options["scan.bounded.mode"] = "latest-offset"
    for key, value in kafka_properties(cfg).items():
        options[f"properties.{key}"] = value
    return options


def kafka_records(env: StreamExecutionEnvironment, cfg: OnrampConfig, *, bounded: bool = False,
                  t_env: StreamTableEnvironment | None = None) -> DataStream:
    """The input topic as a stream of :data:`ROUTED_RECORD` rows: ``Row(routing_key, Row(value, topic,
    partition, offset))``.

    Read through the Kafka table connector with the ``raw`` format because its metadata columns carry each
    record's partition and offset, which dead letters must name; the DataStream KafkaSource exposes only a
    value-only deserializer to Python. The routing key (the user id read off the wire) is computed in the same
    SQL by ``onramp_routing_key``, a Java function (jvm/src, shipped in ``pipeline.jars``), so no Python runs
    before the keyed operator. Same KafkaSource underneath: offsets are committed on checkpoints and the job
    resumes from the group's committed offsets (earliest for a new group).
    """
    options = kafka_source_options(cfg, [cfg.input_topic, cfg.control_topic], cfg.group_id, bounded=bounded)
    options.update({"key.format": "raw", "key.fields": "key", "value.format": "raw",
                    "value.fields-include": "EXCEPT_KEY"})
    t_env = t_env or StreamTableEnvironment.create(env)
    # Fixed operator uids for the source too (from the plan: "<id>_<transformation>"), so a savepoint maps back to
    # the Kafka source's offsets after an upgrade that keeps this query (docs/operations.md).
    t_env.get_config().set("table.exec.uid.generation", "ALWAYS")
    t_env.create_java_temporary_system_function(ROUTING_KEY_FUNCTION, ROUTING_KEY_CLASS)
    t_env.execute_sql(
        "CREATE TEMPORARY TABLE onboarding_events (`key` BYTES, `value` BYTES, `topic` STRING METADATA VIRTUAL, "
        "`partition` INT METADATA VIRTUAL, `offset` BIGINT METADATA VIRTUAL) WITH ("
        + ", ".join(f"{_sql_string(k)} = {_sql_string(str(v))}" for k, v in options.items())
        + ")"
    )
    routed = t_env.sql_query(
        f"SELECT CASE WHEN `topic` = {_sql_string(cfg.control_topic)} THEN COALESCE(DECODE(`key`, 'UTF-8'), '') "
        f"ELSE {ROUTING_KEY_FUNCTION}(`value`) END AS routing_key, "
        "ROW(`value`, `topic`, `partition`, `offset`) AS record FROM onboarding_events"
    )
    stream = t_env.to_data_stream(routed)
    # toDataStream types its rows as ExternalTypeInfo, which the keyed Python operator cannot read (it casts its
    # input type to RowTypeInfo); the rows themselves are plain Rows, so declare the equivalent RowTypeInfo.
    stream._j_data_stream.getTransformation().setOutputType(ROUTED_RECORD.get_java_type_info())
    return stream


def kafka_sink(cfg: OnrampConfig, topic: str, name: str) -> KafkaSink:
    builder = (
        KafkaSink.builder()
        .set_bootstrap_servers(cfg.bootstrap_servers)
        .set_record_serializer(
            KafkaRecordSerializationSchema.builder().set_topic(topic).set_value_serialization_schema(ByteArraySchema()).build()
        )
        .set_property("linger.ms", str(cfg.sink_linger_ms))
    )
    if cfg.delivery == "exactly-once":
        builder.set_delivery_guarantee(DeliveryGuarantee.EXACTLY_ONCE)
        builder.set_transactional_id_prefix(f"{cfg.group_id}-{name}")
        builder.set_property("transaction.timeout.ms", str(cfg.transaction_timeout_ms))
    else:
        builder.set_delivery_guarantee(DeliveryGuarantee.AT_LEAST_ONCE)
    for key, value in kafka_properties(cfg).items():
        builder.set_property(key, value)
    return builder.build()


def keyed_kafka_sink(t_env: StreamTableEnvironment, cfg: OnrampConfig, rows: DataStream, *, table: str,
                     topic: str | list[str], transactional_id: str, column_type: str = "BYTES") -> None:
    """Write ``Row(key, value)`` rows to ``topic`` with ``key`` as the Kafka record key; or, given a list of
    topics, ``Row(topic, key, value)`` rows each to the topic it names (one of the list).

    A Table sink because the DataStream KafkaSink's Python API serializes the whole element for key and value
    alike; the SQL connector writes one column as key and another as value, and takes the topic from a
    writable ``topic`` metadata column. Same delivery guarantee as the other sinks: in exactly-once mode a row
    commits with the checkpoint of the state change that made it."""
    options = {
        "connector": "kafka",
        "topic": topic if isinstance(topic, str) else ";".join(topic),
        "properties.bootstrap.servers": cfg.bootstrap_servers,
        "properties.linger.ms": str(cfg.sink_linger_ms),
        "key.format": "raw",
        "key.fields": "key",
        "value.format": "raw",
        "value.fields-include": "EXCEPT_KEY",
        "sink.delivery-guarantee": cfg.delivery,
    }
    if cfg.delivery == "exactly-once":
        options["sink.transactional-id-prefix"] = transactional_id
        options["properties.transaction.timeout.ms"] = str(cfg.transaction_timeout_ms)
    for key, value in kafka_properties(cfg).items():
        options[f"properties.{key}"] = value
    topic_column = "" if isinstance(topic, str) else "`topic` STRING METADATA, "
    t_env.execute_sql(
        f"CREATE TEMPORARY TABLE {table} ({topic_column}`key` {column_type}, `value` {column_type}) WITH ("
        + ", ".join(f"{_sql_string(k)} = {_sql_string(str(v))}" for k, v in options.items())
        + ")"
    )
    statements = t_env.create_statement_set()
    statements.add_insert(table, t_env.from_data_stream(rows))
    statements.attach_as_datastream()


def sink_thread(operator: DataStream, cfg: OnrampConfig) -> DataStream:
    """``operator`` (the one feeding the sink) unchained when ``cfg.sink_own_thread``: Flink then runs the sink in
    its own task thread, so the producer's work overlaps the Python operator's instead of adding to its thread
    (its input is a keyed shuffle, never chained anyway). Savepoints map state per operator id whatever the
    chaining, but a *generated* id hashes the chaining: the operators around this one need fixed uids (the
    personalize operator has one, the table source and sink get theirs from ``table.exec.uid.generation``)."""
    return operator.disable_chaining() if cfg.sink_own_thread else operator


def build_kafka_job(cfg: OnrampConfig, jars: list[Path] | None = None, *, bounded: bool = False) -> StreamExecutionEnvironment:
    env = create_env(cfg, jars)
    t_env = StreamTableEnvironment.create(env)
    outputs = sink_thread(build_pipeline(kafka_records(env, cfg, bounded=bounded, t_env=t_env), cfg), cfg)
    # One sink, one producer (one transaction per checkpoint) for decisions, dead letters, audit records and the
    # identity messages that go back through the control topic to the key they name.
    keyed_kafka_sink(t_env, cfg, outputs, table="onramp_out", topic=output_topics(cfg).names(),
                     transactional_id=f"{cfg.group_id}-out")
    return env


def config_from_json(text: str) -> OnrampConfig:
    """The config ``onramp submit`` passed; secrets (never on the command line) come from the environment."""
    from jobs.config import secrets_from_environ

    data: dict[str, Any] = json.loads(text)
    return load_config(overrides=data, environ=secrets_from_environ(os.environ))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Onramp personalize job (submit with `onramp submit`).")
    parser.add_argument("--config-json", help="full Onramp config as JSON (written by `onramp submit`)")
    parser.add_argument("--jar", action="append", default=[], help="connector jar to add (repeatable)")
    parser.add_argument("--bounded", action="store_true", help="stop at the input topic's current end (benchmarks)")
    parser.add_argument("--job-name", default=JOB_NAME,
                        help=f"the Flink job name (default {JOB_NAME}, which `onramp submit/stop/status` look for; "
                             "the benchmark uses its own)")
    args, _ = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_json(args.config_json) if args.config_json else load_config()
    env = build_kafka_job(cfg, [Path(j) for j in args.jar], bounded=args.bounded)
    log.info("submitting %s: %s -> %s (delivery %s)", args.job_name, cfg.input_topic, cfg.decisions_topic,
             cfg.delivery)
    env.execute(args.job_name)


if __name__ == "__main__":
    main()
