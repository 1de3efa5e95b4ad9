"""Where Flink's embedded (thread-mode) Python finds Onramp and its dependencies.

In ``python.execution-mode: thread`` the TaskManager embeds CPython through pemja. pemja initialises the
interpreter of the base installation, not the virtualenv named by ``python.executable`` (FLINK-38585: the
Python home is set after ``Py_Initialize``), so the venv's site-packages and the project root are not on
``sys.path`` and the first operator fails with ``No module named 'pemja'``. Putting them on ``PYTHONPATH`` of
the JVM that runs the operators (the local mini-cluster's, or the standalone TaskManager's) fixes it.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def embedded_python_path() -> str:
    """PYTHONPATH value for the JVM that hosts the Python operators: project root + this venv's site-packages."""
    entries = [str(REPO_ROOT), *site.getsitepackages()]
    existing = os.environ.get("PYTHONPATH", "")
    for entry in existing.split(os.pathsep):
        if entry and entry not in entries:
            entries.append(entry)
    return os.pathsep.join(entries)


def ensure_embedded_python_path() -> None:
    """Set PYTHONPATH in this process so a JVM started from it (the mini-cluster gateway) inherits it."""
    os.environ["PYTHONPATH"] = embedded_python_path()
    os.environ.setdefault("PYFLINK_CLIENT_EXECUTABLE", sys.executable)
