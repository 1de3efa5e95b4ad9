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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from udfs.model_bundle import CURRENT_FILE, MANIFEST_FILE, MODEL_FILE, read_current

VERSION_RE = re.compile(r"^m-\d{8}-\d{6}-[0-9a-f]{8}$")


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


def set_current(model_dir: Path, version: str) -> None:
    """Point CURRENT at an already published version (e.g. roll back)."""
    model_dir = Path(model_dir)
    if not (model_dir / version / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"no published bundle {version!r} in {model_dir}; known: {list_versions(model_dir)}")
    _write_atomic(model_dir / CURRENT_FILE, version + "\n")


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
