"""jobs/provision.py: Maven-backed jar provisioning, stamp idempotency and clear errors."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from jobs import provision as prov
from jobs.config import REPO_ROOT, load_config


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    """One real Maven run into a fresh jars_dir (artifacts come from ~/.m2 once cached)."""
    cfg = load_config({"jars_dir": tmp_path_factory.mktemp("jars")}, environ={})
    return cfg, prov.provision(cfg)


def test_first_run_fetches_pinned_jars(provisioned):
    cfg, result = provisioned
    assert result.ran_maven
    names = {p.name for p in result.kafka_jars}
    assert "kafka_2.13-4.1.1.jar" in names
    assert "kafka-clients-4.1.1.jar" in names
    assert any(n.startswith("log4j-core-") for n in names)
    assert any(n.startswith("log4j-slf4j-impl-") for n in names)
    assert not any(n.startswith("flink-") for n in names), "the connector must not land on the broker classpath"
    expected = ["flink-sql-connector-kafka-5.0.0-2.2.jar", "onramp-flink-functions-0.1.0.jar"]
    assert [p.name for p in result.flink_jars] == expected
    assert sorted(p.name for p in (Path(cfg.jars_dir) / "flink").iterdir()) == expected
    with zipfile.ZipFile(result.flink_jars[1]) as functions:
        assert "io/onramp/flink/RoutingKey.class" in functions.namelist()
    assert not (REPO_ROOT / "jvm" / "target").exists(), "Maven must build under the jars dir, not in the repo"
    stamp = json.loads(result.stamp.read_text())
    assert stamp["inputs_sha256"] == prov.jvm_inputs_sha256()
    assert sorted(stamp["jars"]["kafka"]) == sorted(names)


def test_second_run_runs_no_maven(provisioned, monkeypatch):
    cfg, first = provisioned

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"provision ran a subprocess on an up-to-date jars_dir: {args}")

    monkeypatch.setattr(prov.subprocess, "run", no_subprocess)
    monkeypatch.setattr(prov.subprocess, "Popen", no_subprocess)
    second = prov.provision(cfg)
    assert not second.ran_maven
    assert second.kafka_jars == first.kafka_jars
    assert second.flink_jars == first.flink_jars
    assert second.seconds < 2


def test_accessors_return_provisioned_paths(provisioned):
    cfg, result = provisioned
    jars = prov.flink_job_jars(cfg)
    assert jars == result.flink_jars and all(j.is_absolute() and j.is_file() for j in jars)
    assert jars[0].as_uri().startswith("file:///")
    cp = prov.kafka_classpath(cfg)
    assert cp == str(Path(cfg.jars_dir).resolve() / "kafka" / "*")


def test_accessors_raise_actionable_error_when_not_provisioned(tmp_path):
    cfg = load_config({"jars_dir": tmp_path / "empty"}, environ={})
    with pytest.raises(prov.ProvisionError, match=r"not provisioned.*python -m jobs\.provision"):
        prov.flink_job_jars(cfg)
    with pytest.raises(prov.ProvisionError, match="not provisioned"):
        prov.kafka_classpath(cfg)


def test_inputs_hash_covers_the_java_sources(tmp_path):
    jvm = tmp_path / "jvm"
    (jvm / "src" / "main" / "java").mkdir(parents=True)
    (jvm / "pom.xml").write_text("<project/>")
    before = prov.jvm_inputs_sha256(jvm)
    (jvm / "src" / "main" / "java" / "F.java").write_text("class F {}")
    assert prov.jvm_inputs_sha256(jvm) != before


def test_changed_pom_or_missing_jar_is_not_up_to_date(provisioned, tmp_path):
    cfg, _ = provisioned
    copy = tmp_path / "jars"
    for sub in ("kafka", "flink"):
        (copy / sub).mkdir(parents=True)
        for jar in (Path(cfg.jars_dir) / sub).glob("*.jar"):
            (copy / sub / jar.name).symlink_to(jar)
    stamp = json.loads((Path(cfg.jars_dir) / prov.STAMP_NAME).read_text())
    stamp["inputs_sha256"] = "0" * 64
    (copy / prov.STAMP_NAME).write_text(json.dumps(stamp))
    stale = load_config({"jars_dir": copy}, environ={})
    with pytest.raises(prov.ProvisionError, match="pom.xml or jvm/src changed"):
        prov.flink_job_jars(stale)

    stamp["inputs_sha256"] = prov.jvm_inputs_sha256()
    (copy / prov.STAMP_NAME).write_text(json.dumps(stamp))
    assert prov.flink_job_jars(stale)
    next((copy / "kafka").glob("kafka-clients-*.jar")).unlink()
    with pytest.raises(prov.ProvisionError, match="differ from the stamp"):
        prov.kafka_classpath(stale)


def test_mvn_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn (nor anything else) on PATH
    cfg = load_config({"jars_dir": tmp_path / "jars"}, environ={})
    with pytest.raises(prov.ProvisionError, match=r"Maven \(mvn\) not found on PATH; install"):
        prov.provision(cfg)


def test_java_missing_is_a_clear_error(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_mvn = bin_dir / "mvn"
    fake_mvn.write_text("#!/bin/sh\nexit 99\n")
    fake_mvn.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    cfg = load_config({"jars_dir": tmp_path / "jars"}, environ={})
    with pytest.raises(prov.ProvisionError, match="java not found on PATH / JAVA_HOME"):
        prov.provision(cfg)


def test_network_failure_says_what_to_do(tmp_path, monkeypatch):
    calls = []

    def offline_maven(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(
            cmd, 1, stdout="",
            stderr="[ERROR] Failed to execute goal on project onramp-jars: Could not resolve dependencies ... "
                   "Could not transfer artifact org.apache.kafka:kafka_2.13:pom:4.1.1 from/to central: "
                   "java.net.UnknownHostException: repo.maven.apache.org\n",
        )

    monkeypatch.setattr(prov.subprocess, "run", offline_maven)
    cfg = load_config({"jars_dir": tmp_path / "jars"}, environ={})
    with pytest.raises(prov.ProvisionError, match="could not download") as info:
        prov.provision(cfg)
    assert "Maven Central is reachable" in str(info.value)
    assert "UnknownHostException" in str(info.value)
    assert calls and calls[0][1:3] == ["-q", "-B"]
    assert not (tmp_path / "jars" / prov.STAMP_NAME).exists(), "a failed run must not leave a stamp"
