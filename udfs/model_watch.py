"""Hot reload of the model bundle: the running job follows the registry's ``CURRENT`` pointer.

Publishing (``onramp train``) or promoting / rolling back (``onramp models ...``) rewrites
``<model_dir>/CURRENT`` atomically. Every keyed operator instance checks that one small file at most once per
``model_reload_interval_ms`` of processing time, from the event path (one clock comparison per event otherwise),
and swaps its scorer between two events when the pointer names another version. So no event is lost or decided
twice, and every decision names the version that scored it (``model_version``).

A bundle that fails to load (missing, damaged: sha256 mismatch, a feature list other than the job's, another
interest half-life) is refused: the job keeps scoring with its current bundle, logs the reason once per refused
version and counts it. The job also keeps its bundle when the registry directory is not visible from the
TaskManager (a remote cluster without shared storage): the bundle shipped inside the job graph stays in use, and
the watcher says so once.

Why a watched location rather than a control topic: a published bundle is a directory of files the job can load
as is, with the same verification as at submission, and the pointer file is already the registry's single source
of truth; on a cluster the model directory is a volume mounted on every TaskManager (see docker/). After a
restart the job starts with the bundle it was submitted with and follows the pointer again within one interval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from udfs.model_bundle import BundleError, ModelBundle, read_current

log = logging.getLogger(__name__)


@dataclass
class BundleWatcher:
    """Polls ``<model_dir>/CURRENT``; :meth:`poll` returns a newly loaded bundle when the pointer moved.

    ``loader`` is :meth:`ModelBundle.load` (replaceable in tests); ``current_version`` is the version in use.
    """

    model_dir: Path
    interval_ms: int
    current_version: str | None
    half_life_hours: float | None = None
    loader: Callable[..., ModelBundle] = ModelBundle.load
    next_check_ms: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # version -> why it was refused
    reloads: int = 0
    _unreachable_logged: bool = False

    @property
    def enabled(self) -> bool:
        return self.interval_ms > 0

    def due(self, now_ms: int) -> bool:
        """Cheap check for the event path: is it time to look at the pointer again?"""
        return self.interval_ms > 0 and now_ms >= self.next_check_ms

    def poll(self, now_ms: int) -> ModelBundle | None:
        """Look at the pointer (if due); the new bundle if it moved to a loadable version, else None."""
        if not self.due(now_ms):
            return None
        self.next_check_ms = now_ms + self.interval_ms
        model_dir = Path(self.model_dir)
        if not model_dir.is_dir():
            if not self._unreachable_logged:
                log.warning("model hot reload: %s is not visible from this TaskManager; keeping bundle %s "
                            "(mount the model directory on every TaskManager to follow CURRENT)",
                            model_dir, self.current_version)
                self._unreachable_logged = True
            return None
        try:
            version = read_current(model_dir)
        except (OSError, ValueError) as exc:  # unreadable pointer (permissions, EIO, not text): next interval
            log.warning("model hot reload: cannot read %s/CURRENT, keeping %s: %s", model_dir, self.current_version,
                        exc)
            return None
        if version is None or version == self.current_version or version in self.refused:
            return None
        try:
            bundle = self.loader(model_dir / version, half_life_hours=self.half_life_hours)
        except BundleError as exc:  # the bundle itself is wrong: refuse this version for good
            self.refused[version] = str(exc)
            log.error("model hot reload: refused bundle %s, keeping %s: %s", version, self.current_version, exc)
            return None
        except OSError as exc:  # storage hiccup (or a version still being copied): try again next interval
            log.warning("model hot reload: cannot read bundle %s yet, keeping %s: %s", version, self.current_version, exc)
            return None
        except Exception as exc:  # a manifest of the wrong shape (null or missing keys...): wrong for good too
            self.refused[version] = f"{type(exc).__name__}: {exc}"
            log.error("model hot reload: refused bundle %s (unreadable manifest?), keeping %s: %s: %s", version,
                      self.current_version, type(exc).__name__, exc)
            return None
        log.info("model hot reload: %s -> %s", self.current_version, bundle.version)
        self.current_version = bundle.version
        self.reloads += 1
        return bundle
