"""The model registry: versioned bundle directories plus a ``CURRENT`` pointer, all on the local file system.

Layout::

    <model_dir>/
      CURRENT                         # one line: the current version
      m-20261129-224512-1a2b3c4d/     # one directory per published version (sortable: UTC time, then sha)
        model.onnx
        manifest.json                 # version, parent_version, created_at, data_window, feature_names,
                                      # segments, metrics, sha256, onnx_opset, ...

Publishing writes the bundle into a hidden staging directory, renames it into place, then replaces ``CURRENT``
atomically, so a reader (the Flink job) never sees a half-written bundle or pointer.

Each manifest records ``parent_version``: the version that was current when it was published. Rolling back
follows that link (:func:`rollback`), so it undoes a publish even when versions were not made current in
chronological order; it does not undo a promote (promote back, or roll back ``--to`` a version, for that). A running Flink job follows ``CURRENT`` when its TaskManagers can read the
model directory (hot reload, :mod:`udfs.model_watch`), otherwise it switches at the next ``onramp submit``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from udfs.model_bundle import CURRENT_FILE, MANIFEST_FILE, MODEL_FILE, read_current

VERSION_RE = re.compile(r"^m-\d{8}-\d{6}-[0-9a-f]{8}$")


class RegistryError(Exception):
    """The registry cannot do what was asked (unknown version, nothing published, no parent to roll back to)."""


class UnknownVersionError(RegistryError, FileNotFoundError):
    """A version that is not published in this registry (also a FileNotFoundError, as ``set_current`` raised)."""


@dataclass
class BundleArtifacts:
    """What training hands to :func:`publish`: the ONNX bytes and the manifest (the registry adds version,
    parent_version, created_at and sha256)."""

    model_bytes: bytes
    manifest: dict[str, Any]


def _opset_from_bytes(model_bytes: bytes) -> dict[str, int]:
    import onnx

    model = onnx.load_from_string(model_bytes)
    return {(imp.domain or "ai.onnx"): int(imp.version) for imp in model.opset_import}


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    return json.loads((Path(bundle_dir) / MANIFEST_FILE).read_text())


def list_versions(model_dir: Path) -> list[str]:
    """Published versions, oldest first."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(p.name for p in model_dir.iterdir() if p.is_dir() and VERSION_RE.match(p.name) and (p / MANIFEST_FILE).is_file())


def current_version(model_dir: Path) -> str | None:
    return read_current(Path(model_dir))


def current_bundle_path(model_dir: Path) -> Path | None:
    """Directory of the current bundle, or None when nothing was published (or CURRENT names a missing version)."""
    version = read_current(Path(model_dir))
    if version is None:
        return None
    path = Path(model_dir) / version
    return path if path.is_dir() else None


def _known_versions_hint(model_dir: Path) -> str:
    if not Path(model_dir).is_dir():
        return f"{model_dir} is not a directory: check --model-dir / ONRAMP_MODEL_DIR, or run `onramp train`"
    known = list_versions(model_dir)
    return f"known versions: {', '.join(known)}" if known else "nothing is published there yet (run `onramp train`)"


def require_version(model_dir: Path, version: str) -> Path:
    """The bundle directory of a published ``version``; :class:`UnknownVersionError` naming the known ones if not.

    Only names shaped like a version are accepted, so a typo or a path (``../x``) never reaches the file system.
    """
    model_dir = Path(model_dir)
    if not VERSION_RE.match(version) or not (model_dir / version / MANIFEST_FILE).is_file():
        raise UnknownVersionError(f"no published bundle {version!r} in {model_dir}; {_known_versions_hint(model_dir)}")
    return model_dir / version


def set_current(model_dir: Path, version: str) -> None:
    """Point CURRENT at an already published version (promote, roll back)."""
    model_dir = Path(model_dir)
    require_version(model_dir, version)
    _write_atomic(model_dir / CURRENT_FILE, version + "\n")


def current_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The current bundle's manifest, or None when nothing is current (or its manifest is gone)."""
    path = current_bundle_path(model_dir)
    if path is None or not (path / MANIFEST_FILE).is_file():
        return None
    return read_manifest(path)


def manifest_of(model_dir: Path, version: str | None = None) -> dict[str, Any]:
    """The manifest of ``version`` (default: the current one); :class:`RegistryError` when there is none."""
    model_dir = Path(model_dir)
    if version is None:
        version = current_version(model_dir)
        if version is None:
            raise RegistryError(f"no current model bundle in {model_dir}; {_known_versions_hint(model_dir)}")
    return read_manifest(require_version(model_dir, version))


def rollback_target(model_dir: Path, to: str | None = None) -> str:
    """The version :func:`rollback` would make current: ``to`` if given (must be published), else the current
    bundle's ``parent_version``. Raises :class:`RegistryError` saying what to do instead when nothing is current,
    the current bundle has no parent, or the parent was deleted."""
    model_dir = Path(model_dir)
    if to is not None:
        require_version(model_dir, to)
        return to
    current = current_version(model_dir)
    if current is None:
        raise RegistryError(f"nothing to roll back: no current model bundle in {model_dir}; "
                            f"{_known_versions_hint(model_dir)}")
    parent = manifest_of(model_dir, current).get("parent_version")
    if not parent:
        raise RegistryError(f"cannot roll back: the current bundle {current} has no parent_version (it was the first "
                            f"one published); pick a version with `onramp models rollback --to VERSION`; "
                            f"{_known_versions_hint(model_dir)}")
    if parent not in list_versions(model_dir):
        raise RegistryError(f"cannot roll back: {current}'s parent {parent} is no longer in {model_dir}; pick a "
                            f"version with `onramp models rollback --to VERSION`; {_known_versions_hint(model_dir)}")
    return parent


def rollback(model_dir: Path, to: str | None = None) -> str:
    """Make the current bundle's ``parent_version`` (or ``to``) current again; returns the new current version.

    Repeating it walks further back along the parent links (see :func:`rollback_target` for the errors).
    """
    target = rollback_target(model_dir, to)
    set_current(model_dir, target)
    return target


@dataclass(frozen=True)
class VersionSummary:
    """One line of ``onramp models list``: when and on what a bundle was trained, and how well it scored."""

    version: str
    is_current: bool
    created_at: str | None = None
    parent_version: str | None = None
    data_window: dict[str, int] | None = None
    k: int | None = None
    silhouette: float | None = None
    ari_vs_personas: float | None = None
    churn_model: str | None = None
    churn_auc: float | None = None
    churn_log_loss: float | None = None
    quality_gate_passed: bool | None = None  # None: published without a gate record (older bundles)
    problem: str | None = None  # set when the manifest could not be read

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _summarize(model_dir: Path, version: str, current: str | None) -> VersionSummary:
    try:
        manifest = read_manifest(model_dir / version)
    except (OSError, ValueError) as exc:  # a damaged bundle must not hide the others
        return VersionSummary(version, version == current, problem=f"cannot read {MANIFEST_FILE}: {exc}")
    metrics = manifest.get("metrics") or {}
    segmentation = metrics.get("segmentation") or {}
    churn = metrics.get("churn") or {}
    gate = manifest.get("quality_gate")
    return VersionSummary(
        version=version,
        is_current=version == current,
        created_at=manifest.get("created_at"),
        parent_version=manifest.get("parent_version"),
        data_window=manifest.get("data_window"),
        k=segmentation.get("k"),
        silhouette=segmentation.get("silhouette"),
        ari_vs_personas=segmentation.get("ari_vs_personas"),
        churn_model=churn.get("model") or manifest.get("churn_model"),
        churn_auc=churn.get("auc"),
        churn_log_loss=churn.get("log_loss"),
        quality_gate_passed=gate.get("passed") if isinstance(gate, dict) else None,
    )


def describe_versions(model_dir: Path) -> list[VersionSummary]:
    """Every published version, oldest first, with the current one marked."""
    model_dir = Path(model_dir)
    current = current_version(model_dir)
    return [_summarize(model_dir, version, current) for version in list_versions(model_dir)]


def publish(artifacts: BundleArtifacts | Path | str, model_dir: Path, *, make_current: bool = True) -> str:
    """Publish a bundle and (by default) make it current; returns the new version.

    ``artifacts`` is a :class:`BundleArtifacts` or a directory holding ``model.onnx`` and ``manifest.json``.
    """
    model_dir = Path(model_dir)
    if isinstance(artifacts, (str, Path)):
        src = Path(artifacts)
        missing = [n for n in (MODEL_FILE, MANIFEST_FILE) if not (src / n).is_file()]
        if missing:
            raise FileNotFoundError(f"cannot publish {src}: missing {', '.join(missing)}")
        artifacts = BundleArtifacts((src / MODEL_FILE).read_bytes(), json.loads((src / MANIFEST_FILE).read_text()))
    for key in ("feature_names", "segments", "metrics", "data_window"):
        if key not in artifacts.manifest:
            raise ValueError(f"manifest lacks {key!r}")
    model_dir.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256(artifacts.model_bytes).hexdigest()
    now = datetime.now(timezone.utc)
    version = f"m-{now:%Y%m%d-%H%M%S}-{sha[:8]}"
    target = model_dir / version
    if target.exists():  # the same model published twice within a second
        if make_current:
            set_current(model_dir, version)
        return version
    manifest = dict(artifacts.manifest)
    manifest.update(
        version=version,
        parent_version=read_current(model_dir),
        created_at=now.isoformat(timespec="seconds"),
        sha256=sha,
    )
    manifest.setdefault("onnx_opset", _opset_from_bytes(artifacts.model_bytes))
    ordered = {k: manifest[k] for k in ("version", "parent_version", "created_at", "sha256", "onnx_opset", "data_window",
                                          "feature_names", "segments", "metrics")}
    ordered.update({k: v for k, v in manifest.items() if k not in ordered})
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".staging-{version}-"))
    try:
        (staging / MODEL_FILE).write_bytes(artifacts.model_bytes)
        (staging / MANIFEST_FILE).write_text(json.dumps(ordered, indent=2, sort_keys=False) + "\n")
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if make_current:
        set_current(model_dir, version)
    return version
