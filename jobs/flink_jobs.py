"""Submit, find and cancel Onramp jobs on a Flink cluster (the `flink` CLI and the REST API).

Works against the local standalone cluster that ``onramp up`` starts and against any reachable cluster
(``--flink-rest-url``); the job script is shipped with ``flink run -py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from jobs.config import REPO_ROOT, OnrampConfig

log = logging.getLogger(__name__)

JOB_SCRIPT = REPO_ROOT / "jobs" / "personalize.py"
# Project directories shipped with a job: TaskManagers import Onramp's code and read its schemas from these.
SHIPPED_DIRS: tuple[str, ...] = ("jobs", "udfs", "models", "avro", "rules")
_STAGED_TO_KEEP = 5
_JOB_ID = re.compile(r"JobID ([0-9a-f]{32})")


class FlinkJobError(RuntimeError):
    """Submitting or controlling a job failed; the message says what to do."""


def rest(cfg: OnrampConfig, path: str, method: str = "GET", body: dict | None = None, timeout: float = 10.0) -> Any:
    url = cfg.flink_rest_url.rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
    except urllib.error.URLError as exc:
        raise FlinkJobError(
            f"Flink REST API at {cfg.flink_rest_url} is not reachable ({exc}); start the local cluster with "
            "`onramp up` or pass --flink-rest-url"
        ) from exc
    return json.loads(text) if text else None


def taskmanager_metaspace_mb(cfg: OnrampConfig) -> float | None:
    """Metaspace in use summed over the cluster's TaskManagers (MB), or None when the REST API does not say.

    Classes every job loads for itself stay there when its classloader is not collected: a TaskManager then
    fails a later job with OutOfMemoryError: Metaspace (jobs/services.py ``_write_flink_lib``)."""
    try:
        total = 0.0
        for tm in rest(cfg, "/taskmanagers").get("taskmanagers", []):
            values = rest(cfg, f"/taskmanagers/{tm['id']}/metrics?get=Status.JVM.Memory.Metaspace.Used")
            total += sum(float(v["value"]) for v in values or [])
        return round(total / 2**20, 1)
    except (FlinkJobError, KeyError, ValueError, TypeError):
        return None


def list_jobs(cfg: OnrampConfig) -> list[dict[str, Any]]:
    return rest(cfg, "/jobs/overview").get("jobs", [])


def operator_metrics(cfg: OnrampConfig, job_id: str, names: tuple[str, ...]) -> dict[str, float]:
    """Current values of user metrics (e.g. the personalize function's ``gc_full_collections``), summed over
    subtasks, by metric name. Metric ids in the REST API look like ``0.personalize.<name>``; a metric not
    reported (yet) is left out."""
    found: dict[str, float] = {}
    for vertex in rest(cfg, f"/jobs/{job_id}").get("vertices", []):
        base = f"/jobs/{job_id}/vertices/{vertex['id']}/metrics"
        ids = [m["id"] for m in rest(cfg, base) or [] if m["id"].rsplit(".", 1)[-1] in names]
        if not ids:
            continue
        for metric in rest(cfg, base + "?get=" + ",".join(ids)) or []:
            name = metric["id"].rsplit(".", 1)[-1]
            try:
                found[name] = found.get(name, 0.0) + float(metric["value"])
            except (TypeError, ValueError):
                continue
    return found


def check_pseudonym_key(cfg: OnrampConfig) -> None:
    """Before submitting a job keyed by pseudonyms: the local cluster gets a key file made on first use; for a
    remote one the key cannot be checked from here (each TaskManager reads its own copy), so say where it must be."""
    from urllib.parse import urlparse

    from udfs.pseudonym import KEY_ENV, ensure_key_file

    if urlparse(cfg.flink_rest_url).hostname in ("localhost", "127.0.0.1", "::1"):
        log.info("pseudonymization key %s", ensure_key_file(cfg.pseudonym_key_file).key_id)
    else:
        log.info("TaskManagers must have the pseudonymization key at %s or in %s", cfg.pseudonym_key_file, KEY_ENV)


def running_jobs(cfg: OnrampConfig, name: str) -> list[dict[str, Any]]:
    return [j for j in list_jobs(cfg) if j["name"] == name and j["state"] in ("RUNNING", "CREATED", "RESTARTING", "INITIALIZING")]


def cancel(cfg: OnrampConfig, job_id: str, timeout_s: float = 60.0) -> None:
    rest(cfg, f"/jobs/{job_id}", method="PATCH")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if rest(cfg, f"/jobs/{job_id}")["state"] in ("CANCELED", "FAILED", "FINISHED"):
            return
        time.sleep(0.5)
    raise FlinkJobError(f"job {job_id} did not stop within {timeout_s:.0f}s")


def cancel_all(cfg: OnrampConfig, name: str) -> list[str]:
    ids = [j["jid"] for j in running_jobs(cfg, name)]
    for job_id in ids:
        log.info("cancelling previous %s job %s", name, job_id)
        cancel(cfg, job_id)
    return ids


def wait_running(cfg: OnrampConfig, job_id: str, timeout_s: float = 120.0) -> None:
    """Wait until every task of the job runs (sources are reading), or fail with the job's exception."""
    deadline = time.monotonic() + timeout_s
    state = "?"
    while time.monotonic() < deadline:
        job = rest(cfg, f"/jobs/{job_id}")
        state = job["state"]
        if state in ("FAILED", "CANCELED", "FINISHED", "RESTARTING"):
            reason = root_exception(cfg, job_id)
            if state == "RESTARTING":  # failing at start: it would restart forever and hold its slots
                cancel(cfg, job_id)
            raise FlinkJobError(f"job {job_id} is {state} (cancelled): {reason}" if state == "RESTARTING"
                                else f"job {job_id} is {state}: {reason}")
        if state == "RUNNING" and all(v["status"] == "RUNNING" for v in job["vertices"]):
            return
        time.sleep(0.5)
    raise FlinkJobError(f"job {job_id} not running after {timeout_s:.0f}s (state {state})")


def wait_finished(cfg: OnrampConfig, job_id: str, timeout_s: float) -> str:
    """Wait for a bounded job to end; returns its final state. A job that fails and restarts (which, under a
    restart strategy, it may do forever) is cancelled and reported with its exception at once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = rest(cfg, f"/jobs/{job_id}")["state"]
        if state in ("FAILED", "CANCELED", "FINISHED"):
            return state
        if state in ("RESTARTING", "FAILING"):
            reason = root_exception(cfg, job_id)
            cancel(cfg, job_id)
            raise FlinkJobError(f"job {job_id} failed while running (cancelled it): {reason}")
        time.sleep(0.25)
    raise FlinkJobError(f"job {job_id} did not finish within {timeout_s:.0f}s")


_NON_RESTORED_STATE = (
    "the savepoint holds state of operators this version of the job does not have (versions before 2026-11-30 "
    "had four Kafka sinks, this one has one): resubmit with `onramp submit --from-savepoint PATH "
    "--allow-non-restored-state` to drop it (docs/operations.md)"
)


def explain(message: str, output: str | None = None) -> str:
    """``message`` about a failure, followed by what to do in Onramp's terms when Flink's text (``output``, e.g.
    the whole ``flink run`` output, whose tail is only a stack trace; default ``message``) shows a failure users
    meet, with Flink's own line for it."""
    text = message if output is None else output
    marker = "Cannot map checkpoint/savepoint state"
    if marker in text or "allowNonRestoredState" in text:
        cause = next((ln.strip() for ln in text.splitlines() if marker in ln), "")
        cause = cause[cause.find("Failed to rollback"):] if "Failed to rollback" in cause else cause
        extra = f"\n{cause}" if cause and cause not in message else ""
        return f"{message}{extra}\n{_NON_RESTORED_STATE}"
    return message


def root_exception(cfg: OnrampConfig, job_id: str) -> str:
    try:
        info = rest(cfg, f"/jobs/{job_id}/exceptions")
    except FlinkJobError:
        return "unknown (REST API unreachable)"
    text = (info.get("rootException") or "") if isinstance(info, dict) else ""
    if not text and isinstance(info, dict) and info.get("exceptionHistory", {}).get("entries"):
        text = info["exceptionHistory"]["entries"][0].get("stacktrace", "")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("\tat ")]
    return explain("\n".join(lines[:12]) or "no exception recorded")


def stop_with_savepoint(cfg: OnrampConfig, job_id: str, target_dir: str | None = None, *,
                        timeout_s: float = 180.0) -> str:
    """Stop the job with a savepoint (REST ``POST /jobs/:id/stop``, no drain: a streaming job resumes from it) and
    return the savepoint's path. ``target_dir``: a path or URI (default ``cfg.savepoint_uri``)."""
    target = target_dir or cfg.savepoint_uri
    if "://" not in target:
        target = Path(target).expanduser().resolve().as_uri()
    trigger = rest(cfg, f"/jobs/{job_id}/stop", method="POST", body={"targetDirectory": target, "drain": False})
    request_id = trigger["request-id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = rest(cfg, f"/jobs/{job_id}/savepoints/{request_id}")
        if status["status"]["id"] == "COMPLETED":
            operation = status.get("operation") or {}
            if "location" in operation:
                _wait_terminal(cfg, job_id, deadline)  # so a resubmit right after does not meet it still finishing
                log.info("job %s stopped with savepoint %s", job_id, operation["location"])
                return operation["location"]
            cause = (operation.get("failure-cause") or {}).get("stack-trace", "") or str(operation)
            first = next((ln for ln in cause.splitlines() if ln.strip()), "unknown reason")
            raise FlinkJobError(f"stop-with-savepoint of job {job_id} failed: {first} (the job keeps running)")
        time.sleep(0.5)
    raise FlinkJobError(f"stop-with-savepoint of job {job_id} did not complete within {timeout_s:.0f}s")


def _wait_terminal(cfg: OnrampConfig, job_id: str, deadline: float) -> str:
    while True:
        state = rest(cfg, f"/jobs/{job_id}")["state"]
        if state in ("FINISHED", "CANCELED", "FAILED") or time.monotonic() > deadline:
            return state
        time.sleep(0.25)


def latest_checkpoint(cfg: OnrampConfig) -> Path:
    """The newest retained checkpoint (``<checkpoint_dir>/<job id>/chk-<n>`` with a ``_metadata``) of any job that
    wrote to this config's checkpoint_dir; only for a local (file://) checkpoint_dir."""
    uri = cfg.checkpoint_uri
    if not uri.startswith("file://"):
        raise FlinkJobError(f"--from-checkpoint latest needs a local checkpoint_dir, not {uri}; give the path")
    root = Path(urlparse(uri).path)
    found = [m.parent for m in root.glob("*/chk-*/_metadata")]
    if not found:
        raise FlinkJobError(f"no completed checkpoint under {root}; was the job ever checkpointed there?")
    return max(found, key=lambda d: d.joinpath("_metadata").stat().st_mtime)


def checkpoint_stats(cfg: OnrampConfig, job_id: str) -> dict[str, Any]:
    """The latest completed checkpoint of a job (REST ``/jobs/:id/checkpoints``): id, state size, path..."""
    info = rest(cfg, f"/jobs/{job_id}/checkpoints")
    return ((info or {}).get("latest") or {}).get("completed") or {}


def stage_code(project_root: Path, ship_dirs: tuple[str, ...], staging_root: Path) -> Path:
    """One directory holding copies of ``ship_dirs``, for a single ``-pyfs`` entry; named by its content.

    ``flink run -pyfs DIR`` puts ``DIR`` itself on the workers' ``sys.path`` (seen in a TaskManager with 2.2.1:
    ``python-files/udfs/udfs``), not its parent. Shipping ``udfs/`` therefore made its modules top-level names
    (``audit``, ``features``...) while ``import udfs`` found whatever the TaskManager had installed: locally the
    editable checkout, on a remote cluster nothing. Shipping the parent of the packages makes the job run the
    code it was submitted with. Content-named, so resubmitting unchanged code reuses the copy."""
    files = sorted(
        p for d in ship_dirs for p in (project_root / d).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(project_root)).encode() + b"\0" + path.read_bytes() + b"\0")
    staged = staging_root / f"onramp-{digest.hexdigest()[:16]}"
    if not staged.is_dir():
        partial = staging_root / f".{staged.name}.{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        for path in files:
            target = partial / path.relative_to(project_root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        try:
            partial.rename(staged)
        except OSError:  # staged meanwhile by a concurrent submit: same content
            shutil.rmtree(partial, ignore_errors=True)
    staged.touch()
    older = sorted((p for p in staging_root.glob("onramp-*") if p != staged), key=lambda p: p.stat().st_mtime)
    for old in older[: max(0, len(older) - (_STAGED_TO_KEEP - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return staged


def submit(
    cfg: OnrampConfig,
    *,
    flink_bin: Path,
    env: dict[str, str],
    jars: list[Path],
    script: Path = JOB_SCRIPT,
    job_args: list[str] | None = None,
    timeout_s: float = 180.0,
    ship_dirs: tuple[str, ...] = SHIPPED_DIRS,
    from_savepoint: str | None = None,
    allow_non_restored_state: bool = False,
    project_root: Path = REPO_ROOT,
) -> str:
    """``flink run -d -py <script>`` against ``cfg.flink_rest_url``; returns the job id. ``ship_dirs``: the
    project directories the job's Python code needs on the TaskManagers; ``from_savepoint``: a savepoint or
    retained checkpoint to start from (``flink run -s``); ``project_root``: the checkout whose code the job runs
    (``script`` is taken relative to it when it lies under this one), e.g. a new version's for an upgrade."""
    if project_root != REPO_ROOT and script.is_relative_to(REPO_ROOT):
        script = project_root / script.relative_to(REPO_ROOT)
    target = urlparse(cfg.flink_rest_url)
    # The workers' Python: the one the job config names (flink.python.executable), else this venv's.
    worker_python = cfg.extra.get("flink.python.executable", sys.executable)
    staged = stage_code(project_root, ship_dirs, cfg.state_dir / "shipped")
    command = [
        str(flink_bin), "run", "-d",
        "-m", f"{target.hostname}:{target.port or 8081}",
        "-pyexec", worker_python, "-pyclientexec", sys.executable,
        *(["-s", str(from_savepoint)] if from_savepoint else []),
        *(["--allowNonRestoredState"] if allow_non_restored_state else []),
        "-py", str(script),
        # Ship the project's code and schemas: TaskManagers import them from the job's own files.
        "-pyfs", str(staged),
        "--config-json", json.dumps(cfg.as_dict()),
        *[arg for jar in jars for arg in ("--jar", str(jar))],
        *(job_args or []),
    ]
    log.info("submitting %s to %s", script.name, cfg.flink_rest_url)
    run_env = {**os.environ, **env, **cfg.secret_environ()}  # secrets by environment, never on the command line
    try:
        done = subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise FlinkJobError(f"`flink run` did not return within {timeout_s:.0f}s") from exc
    output = done.stdout + done.stderr
    match = _JOB_ID.search(output)
    if done.returncode != 0 or not match:
        tail = "\n".join(output.strip().splitlines()[-25:])
        raise FlinkJobError(explain(f"`flink run` failed (exit {done.returncode}):\n{tail}", output))
    return match.group(1)
