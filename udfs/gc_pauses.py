"""Python garbage-collector pauses in the TaskManager's interpreter: keep them out of the latency tail.

Why this exists: in thread mode every Python operator of a TaskManager shares one interpreter, which after
start-up holds ~140k long-lived objects (PyFlink, numpy, onnxruntime, scikit-learn's ONNX runtime pieces, the
job's own modules). CPython's cyclic collector walks all of them in every full (generation 2) collection: on
this 2-core machine one full collection takes ~100-170 ms, during which no event is processed. Full
collections come every few seconds at 1,000 events/s (objects alive during a bundle get promoted), so they
set the p99 and max latency of the job (docs/performance.md).

``gc.freeze()`` after start-up moves everything alive into a permanent generation the collector no longer
scans, so a full collection only walks what was allocated since (well under a millisecond). Nothing is
leaked by it: frozen objects are ones the process keeps until it exits anyway (modules, models, functions).

:class:`GcPauses` records pause durations per generation through ``gc.callbacks`` so the effect is visible in
the job's metrics (``gc_full_collections``, ``gc_max_pause_ms``) rather than inferred from latency.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

_install_lock = threading.Lock()
_installed: "GcPauses | None" = None


class GcPauses:
    """Counts collections and the longest pause per generation since install (process-wide)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.max_pause_ms = [0.0, 0.0, 0.0]
        self.total_pause_ms = [0.0, 0.0, 0.0]
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info.get("generation", 2)
        pause_ms = (time.perf_counter() - self._started) * 1000.0
        self.collections[generation] += 1
        self.total_pause_ms[generation] += pause_ms
        if pause_ms > self.max_pause_ms[generation]:
            self.max_pause_ms[generation] = pause_ms

    def full_collections(self) -> int:
        return self.collections[2]

    def max_full_pause_ms(self) -> float:
        return self.max_pause_ms[2]


def install() -> GcPauses:
    """The process-wide recorder, installed on first call (several operators share one interpreter)."""
    global _installed
    with _install_lock:
        if _installed is None:
            _installed = GcPauses()
            gc.callbacks.append(_installed._callback)
        return _installed


def freeze_startup_heap() -> int:
    """Collect once, then freeze everything alive: later full collections skip it. Returns the frozen count.

    Call at the end of an operator's ``open()``, when modules, models and rules are loaded. Calling it again
    (another operator, a restart in the same TaskManager) freezes what was loaded since, which is also
    long-lived.
    """
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("gc: froze %d start-up objects (%.0f ms); full collections now skip them", frozen,
             (time.perf_counter() - started) * 1000.0)
    return frozen
