"""Fetch and build the JVM jars Onramp needs, once: the Kafka broker classpath, the Flink Kafka connector and
Onramp's own Flink SQL function (``jvm/src``: the routing key, computed in the JVM so the job has no Python
key selector).

``jvm/pom.xml`` pins every version; Maven resolves, compiles and copies the jars into ``<jars_dir>/kafka/`` and
``<jars_dir>/flink/``. A stamp file records the sha256 of the pom and Java sources and the jars they produced, so
a second ``provision()`` with unchanged inputs checks a few files and runs no Maven at all.

    python -m jobs.provision            # provision (no-op when up to date)
    python -m jobs.provision --force    # re-run Maven even when the stamp says up to date
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.config import REPO_ROOT, OnrampConfig, load_config
from jobs.file_lock import file_lock

log = logging.getLogger("jobs.provision")

JVM_DIR = REPO_ROOT / "jvm"
POM = JVM_DIR / "pom.xml"
STAMP_NAME = ".provisioned.json"
KAFKA_SUBDIR = "kafka"
FLINK_SUBDIR = "flink"
# The jar PyFlink needs in pipeline.jars (fat jar: Table API factory, DataStream source/sink, shaded kafka-clients).
FLINK_CONNECTOR_GLOB = "flink-sql-connector-kafka-*.jar"
# Onramp's SQL functions (io.onramp.flink.*), compiled from jvm/src.
FLINK_FUNCTIONS_GLOB = "onramp-flink-functions-*.jar"
# Jars without which the broker cannot start; checked so a half-copied folder is never taken as provisioned.
KAFKA_REQUIRED_GLOBS = ("kafka_2.13-*.jar", "kafka-clients-*.jar", "kafka-server-*.jar", "log4j-core-*.jar")
MVN_TIMEOUT_S = 900
PROVISION_HINT = "run `python -m jobs.provision` (or jobs.provision.provision(cfg)) first"


class ProvisionError(RuntimeError):
    """Provisioning failed or has not been done; the message says what to do."""


@dataclass(frozen=True)
class Provisioned:
    jars_dir: Path
    kafka_jars: list[Path]
    flink_jars: list[Path]
    inputs_sha256: str
    ran_maven: bool
    seconds: float = 0.0
    stamp: Path = field(default=Path())

    @property
    def kafka_classpath(self) -> str:
        return str(self.jars_dir / KAFKA_SUBDIR / "*")


def jvm_inputs_sha256(jvm_dir: Path = JVM_DIR) -> str:
    """sha256 over the pom and the Java sources: a change to either means Maven must run again."""
    digest = hashlib.sha256()
    for path in [jvm_dir / "pom.xml", *sorted((jvm_dir / "src").rglob("*.java"))]:
        digest.update(str(path.relative_to(jvm_dir)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _jars(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jar")) if folder.is_dir() else []


def _stamp_path(cfg: OnrampConfig) -> Path:
    return Path(cfg.jars_dir) / STAMP_NAME


def _read_stamp(cfg: OnrampConfig) -> dict | None:
    try:
        return json.loads(_stamp_path(cfg).read_text())
    except (OSError, ValueError):
        return None


def _up_to_date(cfg: OnrampConfig, sha: str) -> str | None:
    """None when the jars on disk match the stamp and the pom; otherwise why not."""
    stamp = _read_stamp(cfg)
    if stamp is None:
        return "no provisioning stamp"
    if stamp.get("inputs_sha256") != sha:
        return "jvm/pom.xml or jvm/src changed since the last provisioning"
    jars_dir = Path(cfg.jars_dir)
    for sub in (KAFKA_SUBDIR, FLINK_SUBDIR):
        present = [p.name for p in _jars(jars_dir / sub)]
        if present != sorted(stamp.get("jars", {}).get(sub, [])):
            return f"jars in {jars_dir / sub} differ from the stamp"
    return None


def _check_layout(jars_dir: Path) -> None:
    missing = [g for g in KAFKA_REQUIRED_GLOBS if not list((jars_dir / KAFKA_SUBDIR).glob(g))]
    for glob in (FLINK_CONNECTOR_GLOB, FLINK_FUNCTIONS_GLOB):
        if not list((jars_dir / FLINK_SUBDIR).glob(glob)):
            missing.append(f"{FLINK_SUBDIR}/{glob}")
    if missing:
        raise ProvisionError(f"Maven finished but {jars_dir} lacks {', '.join(missing)}; check {POM}")


def _lock(jars_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Serialise concurrent provision() calls (two shells, a test run and a CLI) on the same jars_dir."""
    return file_lock(jars_dir / ".provision.lock")


def _find_java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


_NETWORK_MARKERS = (
    "Could not transfer artifact",
    "Could not resolve dependencies",
    "Could not resolve artifact",
    "Could not resolve plugin",
    "Plugin org.apache.maven",
    "UnknownHostException",
    "Connection refused",
    "Connect to repo",
    "Network is unreachable",
    "connect timed out",
    "Read timed out",
    "resolution will not be reattempted",
)


def _run_maven(mvn: str, jars_dir: Path) -> None:
    cmd = [
        mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(POM),
        f"-Donramp.jars.dir={jars_dir}", "package",
    ]
    log.info("running Maven to fetch and build jars into %s (first run downloads ~70 MB)", jars_dir)
    log.debug("command: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=POM.parent, capture_output=True, text=True, timeout=MVN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise ProvisionError(
            f"Maven did not finish within {MVN_TIMEOUT_S}s; check network access to Maven Central "
            "(or a mirror/proxy in ~/.m2/settings.xml) and retry"
        ) from exc
    if proc.returncode == 0:
        return
    output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr).strip()  # Debian's mvn colours even with -B
    tail = "\n".join(output.splitlines()[-25:])
    if any(marker in output for marker in _NETWORK_MARKERS):
        raise ProvisionError(
            "Maven could not download the pinned jars (network failure or artifact missing). Check that "
            "Maven Central is reachable (proxy/mirror settings in ~/.m2/settings.xml), then retry "
            "`python -m jobs.provision`. Maven caches failed downloads; once the network is back, if it still "
            "fails, force a retry by hand:\n"
            f"  mvn -U -B -f {POM} -Donramp.jars.dir={jars_dir} package\nMaven said:\n{tail}"
        )
    raise ProvisionError(f"Maven failed (exit {proc.returncode}) running {' '.join(cmd)}:\n{tail}")


def provision(cfg: OnrampConfig, *, force: bool = False) -> Provisioned:
    """Make ``<jars_dir>/kafka`` and ``<jars_dir>/flink`` hold the jars pinned and built by jvm/pom.xml.

    Idempotent: when the stamp matches the sha256 of jvm/ and the jars on disk, returns at once without Maven.
    """
    started = time.monotonic()
    jars_dir = Path(cfg.jars_dir).resolve()
    if not POM.is_file():
        raise ProvisionError(f"{POM} is missing; it pins the jars to fetch")
    sha = jvm_inputs_sha256()
    with _lock(jars_dir):
        reason = "forced" if force else _up_to_date(cfg, sha)
        if reason is None:
            log.info("jars already provisioned in %s (pom unchanged); nothing to do", jars_dir)
            return _result(jars_dir, sha, ran_maven=False, started=started)
        log.info("provisioning jars: %s", reason)
        mvn = shutil.which("mvn")
        if mvn is None:
            raise ProvisionError(
                "Maven (mvn) not found on PATH; install Maven 3.8+ (Debian/Ubuntu: apt-get install maven) "
                "and retry"
            )
        if _find_java() is None:
            raise ProvisionError(
                "java not found on PATH / JAVA_HOME; Maven needs a JDK: install a JDK 11/17 "
                "(Debian/Ubuntu: apt-get install openjdk-17-jdk-headless) or set JAVA_HOME"
            )
        _stamp_path(cfg).unlink(missing_ok=True)
        # Start from empty folders so a version bump in the pom leaves no stale jar on a classpath.
        for sub in (KAFKA_SUBDIR, FLINK_SUBDIR):
            shutil.rmtree(jars_dir / sub, ignore_errors=True)
        _run_maven(mvn, jars_dir)
        _check_layout(jars_dir)
        _write_stamp(cfg, jars_dir, sha)
        result = _result(jars_dir, sha, ran_maven=True, started=started)
        log.info(
            "provisioned %d broker jars and %d Flink jar(s) in %.1fs",
            len(result.kafka_jars), len(result.flink_jars), result.seconds,
        )
        return result


def _write_stamp(cfg: OnrampConfig, jars_dir: Path, sha: str) -> None:
    stamp = {
        "inputs_sha256": sha,
        "jars": {sub: [p.name for p in _jars(jars_dir / sub)] for sub in (KAFKA_SUBDIR, FLINK_SUBDIR)},
        "provisioned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = _stamp_path(cfg).with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    tmp.replace(_stamp_path(cfg))


def adopt(cfg: OnrampConfig) -> Provisioned:
    """Record jars that ``mvn -f jvm/pom.xml -Donramp.jars.dir=<jars_dir> package`` produced elsewhere (the
    Docker image's Maven build stage, which has no Python) as provisioned for this jvm/, so commands in the image
    find them without looking for Maven. Raises ProvisionError when a required jar is missing."""
    started = time.monotonic()
    jars_dir = Path(cfg.jars_dir).resolve()
    sha = jvm_inputs_sha256()
    with _lock(jars_dir):
        _check_layout(jars_dir)
        _write_stamp(cfg, jars_dir, sha)
    return _result(jars_dir, sha, ran_maven=False, started=started)


def _result(jars_dir: Path, sha: str, *, ran_maven: bool, started: float) -> Provisioned:
    return Provisioned(
        jars_dir=jars_dir,
        kafka_jars=_jars(jars_dir / KAFKA_SUBDIR),
        flink_jars=_flink_jars(jars_dir),
        inputs_sha256=sha,
        ran_maven=ran_maven,
        seconds=time.monotonic() - started,
        stamp=jars_dir / STAMP_NAME,
    )


def _require_provisioned(cfg: OnrampConfig) -> Path:
    jars_dir = Path(cfg.jars_dir).resolve()
    reason = _up_to_date(cfg, jvm_inputs_sha256())
    if reason is not None:
        raise ProvisionError(f"jars in {jars_dir} are not provisioned ({reason}); {PROVISION_HINT}")
    return jars_dir


def _flink_jars(jars_dir: Path) -> list[Path]:
    folder = jars_dir / FLINK_SUBDIR
    return [jar for glob in (FLINK_CONNECTOR_GLOB, FLINK_FUNCTIONS_GLOB) for jar in sorted(folder.glob(glob))]


def flink_job_jars(cfg: OnrampConfig) -> list[Path]:
    """Absolute paths of the jars every Onramp job ships in ``pipeline.jars`` (as ``file://`` URLs:
    ``p.as_uri()``): the Kafka connector and Onramp's SQL functions."""
    folder = _require_provisioned(cfg) / FLINK_SUBDIR
    for glob in (FLINK_CONNECTOR_GLOB, FLINK_FUNCTIONS_GLOB):
        if not list(folder.glob(glob)):
            raise ProvisionError(f"no {glob} in {folder}; {PROVISION_HINT}")
    return _flink_jars(folder.parent)


def kafka_classpath(cfg: OnrampConfig) -> str:
    """The ``-cp`` value for the local Kafka broker (a Java classpath wildcard over ``<jars_dir>/kafka``)."""
    folder = _require_provisioned(cfg) / KAFKA_SUBDIR
    missing = [g for g in KAFKA_REQUIRED_GLOBS if not list(folder.glob(g))]
    if missing:
        raise ProvisionError(f"{folder} lacks {', '.join(missing)}; {PROVISION_HINT}")
    return str(folder / "*")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.provision", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="run Maven even when the stamp says up to date")
    parser.add_argument("--jars-dir", type=Path, default=None, help="override ONRAMP_JARS_DIR")
    parser.add_argument("--adopt", action="store_true",
                        help="record jars Maven already built into the jars dir (Docker build stage) as provisioned")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config({"jars_dir": args.jars_dir})
        result = adopt(cfg) if args.adopt else provision(cfg, force=args.force)
    except ProvisionError as exc:
        log.error("%s", exc)
        return 1
    log.info("kafka classpath: %s", result.kafka_classpath)
    for jar in result.flink_jars:
        log.info("flink job jar: %s", jar)
    return 0


if __name__ == "__main__":
    sys.exit(main())
