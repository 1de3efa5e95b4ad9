"""The Docker and Kubernetes deployments (docker/) agree with the local setup and validate against their specs.

- docker/compose.yaml: `docker compose config` with the real Compose CLI when docker/validate.sh has built it
  into .cache/tools/ (a few CPU minutes, so it is not built here unless ONRAMP_BUILD_COMPOSE=1); otherwise the
  file, interpolated with docker/.env, is validated against the Compose specification's JSON schema shipped in
  the compose-go module the CLI is built from (fetched through the Go module proxy).
- docker/kubernetes/flinkdeployment.yaml: the Flink Kubernetes Operator CRD's openAPIV3Schema, from the operator's
  API jar on Maven Central (docker/kubernetes/pom.xml), with unknown fields rejected as `kubectl --validate=strict`
  would.
- Broker and Flink settings, versions and paths: the same values as jobs/services.py, jvm/pom.xml, pyproject.toml.
- The pseudonymization key reaches every TaskManager (compose: a required variable; Kubernetes: a Secret) and is in
  no committed file; every topic the job reads or writes (OnrampConfig.job_topics()) is a Strimzi KafkaTopic.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from jobs import services
from jobs.config import REPO_ROOT, OnrampConfig, load_config
from jobs.deploy_config import image_flink_settings, render_flink_conf
from udfs.pseudonym import KEY_ENV, PseudonymKeyError, key_from_text

DOCKER = REPO_ROOT / "docker"
K8S = DOCKER / "kubernetes"
CACHE = REPO_ROOT / ".cache"
IMAGE_ROOT = "/opt/onramp"  # where the Dockerfile puts the checkout
COMPOSE_GO = "github.com/compose-spec/compose-go/v2"
# What a compose user exports as ONRAMP_PSEUDONYM_KEY (compose.yaml requires it); a stand-in, never a real key.
TEST_KEY = "test-only-pseudonymization-key-0123456789"

# Flink keys whose value depends on where a process runs; every other key a deployment sets must equal the local one.
HOST_SPECIFIC_FLINK_KEYS = {
    "jobmanager.rpc.address", "jobmanager.memory.process.size", "taskmanager.memory.process.size",
    "execution.checkpointing.dir", "execution.checkpointing.savepoint-dir", "python.executable",
    "python.client.executable", "python.pythonpath",
    # locally the JobManager and the TaskManager share a host, so each takes a port of a range; one per pod on k8s
    "metrics.reporter.prom.port",
}


# --- helpers --------------------------------------------------------------------------------------------------


def _dotenv() -> dict[str, str]:
    out = {}
    for line in (DOCKER / ".env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


class MissingComposeVariable(KeyError):
    """A `${VAR:?message}` variable is unset or empty: `docker compose` refuses the file with the message."""


def _interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ on every string of the model (what `config` does
    first)."""
    if isinstance(node, dict):
        return {k: _interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        if operator == ":?" and not env.get(name):
            raise MissingComposeVariable(f"required variable {name} is missing a value: {argument}")
        return env.get(name) or (argument if operator == ":-" else "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", one, node).replace("$$", "$")


def _compose(user_env: dict[str, str] | None = None) -> dict[str, Any]:
    """compose.yaml as `config` resolves it: docker/.env, overridden by the user's environment (by default one
    that exports the required pseudonymization key)."""
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    user_env = {KEY_ENV: TEST_KEY} if user_env is None else user_env
    return _interpolate(raw, {**_dotenv(), **{k: v for k, v in os.environ.items() if k in _dotenv()}, **user_env})


def _pom_properties(pom: Path) -> dict[str, str]:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(pom).getroot()
    props = {child.tag.split("}")[1]: (child.text or "").strip() for child in root.find("m:properties", ns)}
    props["project.version"] = root.find("m:version", ns).text.strip()
    props["project.artifactId"] = root.find("m:artifactId", ns).text.strip()
    return props


def _pyproject_pin(package: str) -> str:
    match = re.search(rf'"{re.escape(package)}==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert match, f"{package} is not pinned in pyproject.toml"
    return match.group(1)


def _flinkdeployment() -> dict[str, Any]:
    return yaml.safe_load((K8S / "flinkdeployment.yaml").read_text())


def _job_args(doc: dict[str, Any]) -> dict[str, list[str]]:
    args = doc["spec"]["job"]["args"]
    out: dict[str, list[str]] = {}
    for flag, value in zip(args[::2], args[1::2]):
        out.setdefault(flag, []).append(value)
    return out


def _k8s_onramp_config():
    return load_config(json.loads(_job_args(_flinkdeployment())["--config-json"][0]), environ={})


def _flink_properties(service: dict[str, Any]) -> dict[str, str]:
    text = service["environment"]["FLINK_PROPERTIES"]
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines() if line.strip())}


def _local_flink_config(cfg) -> dict[str, Any]:
    return services._flink_config(cfg, services._paths(cfg), rpc_port=6123)


# --- versions and files ---------------------------------------------------------------------------------------


def test_versions_agree_with_pom_and_pyproject():
    env, pom = _dotenv(), _pom_properties(REPO_ROOT / "jvm" / "pom.xml")
    flink = _pyproject_pin("apache-flink")
    assert env["FLINK_VERSION"] == flink == pom["flink.version"]
    assert env["KAFKA_VERSION"] == pom["kafka.version"]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert f"ARG FLINK_VERSION={flink}" in dockerfile
    assert "FROM flink:${FLINK_VERSION}-scala_2.12-java17" in dockerfile  # the official image's tag form
    compose = _compose()
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{pom['kafka.version']}"
    assert compose["services"]["jobmanager"]["build"]["args"]["FLINK_VERSION"] == flink

    doc = _flinkdeployment()
    major, minor = flink.split(".")[:2]
    assert doc["spec"]["flinkVersion"] == f"v{major}_{minor}"
    assert doc["spec"]["job"]["jarURI"] == f"local:///opt/flink/opt/flink-python-{flink}.jar"
    plugin_env = {e["name"]: e.get("value") for e in doc["spec"]["podTemplate"]["spec"]["containers"][0]["env"]}
    assert plugin_env["ENABLE_BUILT_IN_PLUGINS"] == f"flink-s3-fs-presto-{flink}.jar"
    jars = [Path(j).name for j in _job_args(doc)["--jar"]]
    assert jars == [f"flink-sql-connector-kafka-{pom['flink.kafka.connector.version']}.jar",
                    f"{pom['project.artifactId']}-{pom['project.version']}.jar"]
    strimzi = list(yaml.safe_load_all((K8S / "kafka-strimzi.yaml").read_text()))
    assert next(d for d in strimzi if d["kind"] == "Kafka")["spec"]["kafka"]["version"] == pom["kafka.version"]


def test_dockerfile_copies_what_exists_and_submit_script_parses():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, flags=re.M):
        assert (REPO_ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    for package in ("jobs", "udfs", "models", "avro", "rules", "jvm"):
        assert f"COPY {package}/ {package}/" in dockerfile
    assert subprocess.run(["bash", "-n", str(DOCKER / "submit.sh")]).returncode == 0
    assert os.access(DOCKER / "submit.sh", os.X_OK)


# --- the same settings as the local services ------------------------------------------------------------------


def test_compose_broker_has_the_local_broker_settings():
    env = _compose()["services"]["kafka"]["environment"]
    cfg = load_config({"topic_partitions": int(_dotenv()["ONRAMP_TOPIC_PARTITIONS"])}, environ={})
    for key, value in services.kafka_broker_settings(cfg).items():
        name = "KAFKA_" + key.replace("_", "__").replace("-", "___").replace(".", "_").upper()
        assert str(env.get(name)) == value, f"{name} (= {key}) is {env.get(name)!r}, the local broker uses {value!r}"


def test_compose_flink_properties_agree_with_the_local_cluster():
    compose = _compose()["services"]
    local = _local_flink_config(load_config(environ={}))
    for role in ("jobmanager", "taskmanager"):
        props = _flink_properties(compose[role])
        assert props["jobmanager.rpc.address"] == "jobmanager"
        assert props["execution.checkpointing.dir"].startswith("file:///flink-data/")  # the shared volume
        for key, value in props.items():
            if key in ("jobmanager.rpc.address", "execution.checkpointing.dir", "execution.checkpointing.savepoint-dir"):
                continue
            assert str(local[key]) == value, f"{role}: {key}={value}, the local cluster uses {local[key]}"
        assert "/flink-data" in " ".join(compose[role]["volumes"]) and "/onramp/models" in " ".join(compose[role]["volumes"])


def test_compose_job_settings_match_partitions():
    compose, env = _compose(), _dotenv()
    submit = compose["services"]["submit"]["environment"]
    assert submit["ONRAMP_TOPIC_PARTITIONS"] == submit["ONRAMP_PARALLELISM"] == env["ONRAMP_TOPIC_PARTITIONS"]
    assert submit["ONRAMP_BOOTSTRAP_SERVERS"] == "kafka:9092" and submit["ONRAMP_FLINK_REST_URL"] == "http://jobmanager:8081"
    # ONRAMP_* names are real settings
    load_config(environ={k: v for k, v in submit.items()})


def test_image_config_carries_the_cluster_settings():
    cfg = load_config(environ={})
    base = (services.pyflink_home() / "conf" / "config.yaml").read_text()  # same layout as the distribution's
    rendered = services.flatten_flink_yaml(render_flink_conf(base, image_flink_settings(cfg)))
    for key, value in services.flink_cluster_settings(cfg).items():
        assert rendered[key] == value
    assert rendered["env.java.opts.all"] == services.flatten_flink_yaml(base)["env.java.opts.all"]  # kept


def test_flinkdeployment_config_agrees_with_the_local_cluster():
    doc, cfg = _flinkdeployment(), _k8s_onramp_config()
    conf = doc["spec"]["flinkConfiguration"]
    for key, value in services.flink_cluster_settings(cfg).items():
        assert conf.get(key) == str(value), f"flinkConfiguration[{key}]={conf.get(key)!r}, expected {value!r}"
    local = _local_flink_config(cfg)
    for key, value in conf.items():
        if key in local and key not in HOST_SPECIFIC_FLINK_KEYS:
            assert str(local[key]) == value, f"{key}: {value} here, {local[key]} locally"
    # Durable state and HA
    assert conf["execution.checkpointing.dir"].startswith("s3://")
    assert conf["execution.checkpointing.savepoint-dir"].startswith("s3://")
    assert conf["high-availability.type"] == "kubernetes" and conf["high-availability.storageDir"].startswith("s3://")
    assert doc["spec"]["job"]["upgradeMode"] == "savepoint"
    # Parallelism = input partitions, in the job spec, the job's config and the Strimzi topic
    topics = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "kafka-strimzi.yaml").read_text())
              if d["kind"] == "KafkaTopic"}
    assert doc["spec"]["job"]["parallelism"] == cfg.parallelism == cfg.topic_partitions
    assert topics[cfg.input_topic]["spec"]["partitions"] == cfg.topic_partitions
    assert set(cfg.job_topics()) <= set(topics)


def test_flinkdeployment_job_points_into_the_image():
    doc = _flinkdeployment()
    args = _job_args(doc)
    assert doc["spec"]["job"]["entryClass"] == "org.apache.flink.client.python.PythonDriver"
    script = args["-py"][0]
    assert script.startswith(IMAGE_ROOT + "/") and (REPO_ROOT / script[len(IMAGE_ROOT) + 1:]).is_file()
    # The job runs the image's code (application mode): nothing shipped, the image installs the project there.
    assert "-pyfs" not in args
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert f"pip install -e {IMAGE_ROOT}" in dockerfile and f"PYTHONPATH={IMAGE_ROOT}" in dockerfile
    cfg = _k8s_onramp_config()
    mounts = doc["spec"]["podTemplate"]["spec"]["containers"][0]["volumeMounts"]
    assert str(cfg.model_dir) in {m["mountPath"] for m in mounts}


# --- validation against the specifications --------------------------------------------------------------------


def _compose_binary() -> Path | None:
    built = sorted((CACHE / "tools").glob("compose-v*/docker-compose"))
    if built:
        return built[-1]
    if os.environ.get("ONRAMP_BUILD_COMPOSE") == "1":
        out = subprocess.run(["bash", str(DOCKER / "validate.sh"), "--build"], capture_output=True, text=True,
                             timeout=1800)
        assert out.returncode == 0, out.stderr[-3000:]
        return Path(out.stdout.strip().splitlines()[-1])
    return None


def _compose_schema() -> dict[str, Any]:
    """compose-spec.json from the compose-go module docker/validate.sh's Compose CLI is built with."""
    version_pin = re.search(r'COMPOSE_VERSION="\$\{ONRAMP_COMPOSE_VERSION:-(v[^}]+)\}"',
                            (DOCKER / "validate.sh").read_text()).group(1)
    cached = CACHE / "tools" / f"compose-spec-{version_pin}.json"
    if not cached.is_file():
        if shutil.which("go") is None:
            pytest.skip("no go toolchain to fetch the Compose schema, and no docker-compose built in .cache/tools")
        compose_mod = subprocess.run(["go", "mod", "download", "-json", f"github.com/docker/compose/v5@{version_pin}"],
                                     capture_output=True, text=True, timeout=600)
        if compose_mod.returncode != 0:
            pytest.skip(f"Go module proxy not reachable: {compose_mod.stderr[-300:]}")
        gomod = Path(json.loads(compose_mod.stdout)["GoMod"]).read_text()
        spec_version = re.search(rf"{re.escape(COMPOSE_GO)} (v\S+)", gomod).group(1)
        spec_mod = subprocess.run(["go", "mod", "download", "-json", f"{COMPOSE_GO}@{spec_version}"],
                                  capture_output=True, text=True, timeout=600)
        assert spec_mod.returncode == 0, spec_mod.stderr
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(json.loads(spec_mod.stdout)["Dir"]) / "schema" / "compose-spec.json", cached)
    return json.loads(cached.read_text())


def test_compose_file_is_valid():
    binary = _compose_binary()
    if binary is not None:
        def config(key: str | None) -> subprocess.CompletedProcess[str]:
            env = {k: v for k, v in os.environ.items() if k != KEY_ENV} | ({KEY_ENV: key} if key else {})
            return subprocess.run([str(binary), "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
                                  capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env)

        out = config(TEST_KEY)
        assert out.returncode == 0, out.stderr
        refused = config(None)  # the real CLI refuses to run without the key, and says how to make one
        assert refused.returncode != 0 and f"required variable {KEY_ENV} is missing" in refused.stderr
        assert "32+ characters" in refused.stderr
        return
    model = _compose()
    model = {k: v for k, v in model.items() if not k.startswith("x-")}  # extension fields are allowed, not typed
    for service in model["services"].values():  # compose casts interpolated numbers before validating
        deploy = service.get("deploy") or {}
        if isinstance(deploy.get("replicas"), str):
            deploy["replicas"] = int(deploy["replicas"])
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)  # the draft the schema names (2020-12)
    validator.validate(model)
    model["services"]["submit"]["restart_policy"] = "no"  # not a Compose key: the schema must say so
    assert not validator.is_valid(model)


def _crd_schema() -> dict[str, Any]:
    """openAPIV3Schema of FlinkDeployment v1beta1 from the operator's API jar (docker/kubernetes/pom.xml)."""
    crd_dir = CACHE / "crd"
    jars = sorted(crd_dir.glob("flink-kubernetes-operator-api-*.jar"))
    if not jars:
        if shutil.which("mvn") is None:
            pytest.skip("Maven not installed: cannot fetch the FlinkDeployment CRD")
        out = subprocess.run(["mvn", "-q", "-B", "-Dstyle.color=never", "-f", str(K8S / "pom.xml"),
                              f"-Dcrd.dir={crd_dir}", "package"], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            pytest.skip(f"could not fetch the operator API jar from Maven Central: {out.stdout[-500:]}")
        jars = sorted(crd_dir.glob("flink-kubernetes-operator-api-*.jar"))
    with zipfile.ZipFile(jars[-1]) as jar:
        crd = yaml.safe_load(jar.read("META-INF/fabric8/flinkdeployments.flink.apache.org-v1.yml"))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    return version["schema"]["openAPIV3Schema"]


def _strict(schema: Any) -> Any:
    """Reject unknown fields, as `kubectl apply --validate=strict` does (Kubernetes would silently drop them)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def test_flinkdeployment_validates_against_the_operator_crd():
    schema = _strict(copy.deepcopy(_crd_schema()))
    flink_versions = schema["properties"]["spec"]["properties"]["flinkVersion"]["enum"]
    if "v2_2" not in flink_versions:
        # The operator API jar Maven Central serves here (1.10.0) predates Flink 2; operator releases with Flink 2
        # support add v2_0, v2_1, v2_2 and keep the rest of the FlinkDeployment schema as checked here.
        flink_versions += ["v2_0", "v2_1", "v2_2"]
    doc = _flinkdeployment()
    jsonschema.validate({k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}, schema)
    assert (doc["apiVersion"], doc["kind"]) == ("flink.apache.org/v1beta1", "FlinkDeployment")
    # And a mistake is caught: an unknown field, a wrong type.
    broken = copy.deepcopy(doc)
    broken["spec"]["job"]["paralelism"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"spec": broken["spec"]}, schema)
    broken = copy.deepcopy(doc)
    broken["spec"]["flinkConfiguration"]["parallelism.default"] = 4  # flinkConfiguration values are strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"spec": broken["spec"]}, schema)


def test_support_manifests_parse():
    for path in (K8S / "kafka-strimzi.yaml", K8S / "onramp-support.yaml"):
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs), path
    support = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "onramp-support.yaml").read_text())}
    claim = _flinkdeployment()["spec"]["podTemplate"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert support[claim]["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in support[claim]["spec"]["accessModes"]


# --- the pseudonymization key and the job's topics --------------------------------------------------------------


def _strimzi_topics() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "kafka-strimzi.yaml").read_text())
            if d["kind"] == "KafkaTopic"}


def test_compose_gives_the_pseudonymization_key_to_taskmanagers_and_the_cli():
    compose_services = _compose()["services"]
    assert compose_services["taskmanager"]["environment"][KEY_ENV] == TEST_KEY  # Python and Java functions read it
    assert compose_services["submit"]["environment"][KEY_ENV] == TEST_KEY  # `onramp privacy ...`: same pseudonyms
    # Required from the user, with no default anywhere: compose refuses to start rather than run without a key.
    with pytest.raises(MissingComposeVariable, match=r"32\+ characters"):
        _compose(user_env={})
    raw = (DOCKER / "compose.yaml").read_text()
    assert re.search(r"\$\{ONRAMP_PSEUDONYM_KEY:\?[^}]+\}", raw) and "ONRAMP_PSEUDONYM_KEY:-" not in raw
    # Never in a committed file or the image.
    assert KEY_ENV not in _dotenv()
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert KEY_ENV not in dockerfile and "pseudonym" not in dockerfile.lower() and "COPY .onramp" not in dockerfile


def test_flinkdeployment_gives_the_pseudonymization_key_from_a_secret():
    doc = _flinkdeployment()
    env = {e["name"]: e for e in doc["spec"]["podTemplate"]["spec"]["containers"][0]["env"]}
    assert env[KEY_ENV]["valueFrom"]["secretKeyRef"] == {"name": "onramp-pseudonym-key", "key": "key"}
    assert "value" not in env[KEY_ENV]
    # A per-role pod template would be merged by array position and could replace this env list.
    assert "podTemplate" not in doc["spec"]["taskManager"] and "podTemplate" not in doc["spec"]["jobManager"]
    assert "pseudonym" not in " ".join(doc["spec"]["job"]["args"]).lower()  # the job graph carries no key
    support = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "onramp-support.yaml").read_text())}
    secret = support["onramp-pseudonym-key"]
    assert secret["kind"] == "Secret" and set(secret["stringData"]) == {"key"}
    with pytest.raises(PseudonymKeyError):  # the template's placeholder is no usable key: the job fails, not runs
        key_from_text(secret["stringData"]["key"], "onramp-support.yaml")


def test_strimzi_has_every_topic_the_job_uses():
    topics = _strimzi_topics()
    for cfg in (OnrampConfig(), _k8s_onramp_config()):
        missing = set(cfg.job_topics()) - set(topics)
        assert not missing, f"kafka-strimzi.yaml has no KafkaTopic for {sorted(missing)} (auto-create is off there)"
    cfg = _k8s_onramp_config()
    config = {name: topics[name]["spec"].get("config", {}) for name in cfg.job_topics()}
    # Control messages are events (state checks, identity resolution), not latest-state: never compacted.
    assert "compact" not in str(config[cfg.control_topic].get("cleanup.policy", "delete"))
    # It is keyed by destination and read with the input topic: the same partitioning.
    assert topics[cfg.control_topic]["spec"]["partitions"] == cfg.topic_partitions
    # Audit records outlive the events they are about.
    assert int(config[cfg.audit_topic]["retention.ms"]) > int(config[cfg.input_topic]["retention.ms"])
    assert "compact" not in str(config[cfg.audit_topic].get("cleanup.policy", "delete"))
