"""The wheel carries every Onramp package: a non-editable install (`pip install .`, an image without the
checkout) must import udfs.rules and udfs.experiment_arms and find the JSON schema they validate with."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from jobs.config import REPO_ROOT

TOP_LEVEL = ("jobs", "udfs", "models", "experiments")


def test_wheel_holds_every_package_and_its_schemas(tmp_path):
    # From a copy of the sources: a build in the checkout would reuse a stale build/ directory.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    for top in TOP_LEVEL:
        shutil.copytree(REPO_ROOT / top, source / top, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = tmp_path.glob("onramp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for top in TOP_LEVEL:
        for init in (REPO_ROOT / top).rglob("__init__.py"):
            package = init.parent
            for module in package.glob("*.py"):
                assert str(module.relative_to(REPO_ROOT)) in names, f"{module.relative_to(REPO_ROOT)} not in {wheel.name}"
            for schema in package.glob("*.json"):
                assert str(schema.relative_to(REPO_ROOT)) in names, f"{schema.relative_to(REPO_ROOT)} not in {wheel.name}"
    assert not any(Path(n).parts[0] == "tests" for n in names)
