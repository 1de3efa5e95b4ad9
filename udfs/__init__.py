"""Onramp's per-event logic and the thin Flink functions that run it.

Importing this package loads numpy and onnxruntime first. Flink unpickles every Onramp operator function
(importing ``udfs.*``) before the operator processes records, so the native libraries are loaded before any
thread runs Python in the TaskManager: loading onnxruntime in one thread-mode operator while another
operator's thread was running Python deadlocked in the dynamic loader (PyFlink 2.2.1, pemja, onnxruntime 1.32).
"""

import numpy  # noqa: F401
import onnxruntime  # noqa: F401
