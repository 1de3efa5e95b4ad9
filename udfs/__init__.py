"""Onramp's per-event logic and the thin Flink functions that run it.

Importing this package loads numpy and onnxruntime first, on a short-lived Python thread of its own.

Why a thread: in ``python.execution-mode: thread`` Flink runs operator code on pemja thread states that
CPython's ``PyGILState`` API does not know. onnxruntime's module init calls ``PyGILState_Ensure()``, which on
such a thread creates a second thread state and waits for the GIL its own thread already holds: the operator
hangs in ``open()`` (seen with PyFlink 2.2.1, pemja, onnxruntime 1.32, Python 3.11; gdb shows ``take_gil`` under
``PyInit_onnxruntime_pybind11_state``). A thread started by ``threading`` has a registered thread state, so the
init succeeds there; afterwards the module is in ``sys.modules`` for every thread. Flink unpickles Onramp's
functions (importing ``udfs``) before any record is processed, so this runs once per interpreter, at start.
"""

import threading


def _load_native_modules() -> None:
    def load() -> None:
        import numpy  # noqa: F401
        import onnxruntime  # noqa: F401

    loader = threading.Thread(target=load, name="onramp-native-import", daemon=True)
    loader.start()
    loader.join()
    import onnxruntime  # noqa: F401  (cached when the thread succeeded; raises the real ImportError if not)


_load_native_modules()
