"""Hot reload of the rule set: the running job follows its rules file.

Publishing a rule set means replacing the file the job was submitted with (``rules_file``; write it to a temporary
name and rename it into place, which ``onramp rules publish`` does). Every keyed operator instance looks at the
file's size and modification time at most once per ``rules_reload_interval_ms`` of processing time and, when they
changed, reads, validates and compiles it. A file that fails (schema error, unknown field, missing default...)
is refused: the job keeps deciding with the rule set it has, logs the findings once per refused content and counts
the refusal. A compiled rule set is swapped in between two events, so every decision names the one rule set
version that decided it (``rules_version``).

As with model bundles (``udfs/model_watch.py``), the job ships the rules it was submitted with inside the job
graph, so it runs without access to the file; on a cluster, mount the rules directory on every TaskManager to
follow changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def content_sha(content: str | bytes) -> str:
    """sha256 of a file's content, given as its text or its bytes (the same sha for UTF-8 text)."""
    return hashlib.sha256(content.encode() if isinstance(content, str) else content).hexdigest()


@dataclass
class RulesWatcher:
    """Polls ``path``; :meth:`poll` returns a newly compiled rule set when the file's content changed.

    ``compile_text(text, source_name)`` parses, validates and compiles (raises on any finding);
    ``current_sha`` is the sha256 of the text in use.
    """

    path: Path
    interval_ms: int
    current_sha: str | None
    compile_text: Callable[[str, str], Any]
    next_check_ms: int = 0
    label: str = "rules"  # what the file holds, for log lines (the experiments file is followed the same way)
    refused: dict[str, str] = field(default_factory=dict)  # content sha -> why it was refused
    reloads: int = 0
    _stamp: tuple[int, int] | None = None  # (size, mtime_ns) last seen
    _unreachable_logged: bool = False

    def due(self, now_ms: int) -> bool:
        """Cheap check for the event path: is it time to look at the file again?"""
        return self.interval_ms > 0 and now_ms >= self.next_check_ms

    def poll(self, now_ms: int) -> Any | None:
        """Look at the file (if due); the compiled rule set if its content changed and compiles, else None."""
        if not self.due(now_ms):
            return None
        self.next_check_ms = now_ms + self.interval_ms
        try:
            stat = os.stat(self.path)
        except OSError:
            if not self._unreachable_logged:
                log.warning("%s hot reload: %s is not visible from this TaskManager; keeping what the job was "
                            "submitted with", self.label, self.path)
                self._unreachable_logged = True
            return None
        stamp = (stat.st_size, stat.st_mtime_ns)
        if stamp == self._stamp:
            return None
        try:
            data = Path(self.path).read_bytes()
        except OSError as exc:
            log.warning("%s hot reload: cannot read %s yet: %s", self.label, self.path, exc)
            return None
        self._stamp = stamp
        sha = content_sha(data)
        if sha == self.current_sha or sha in self.refused:
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # not a text file at all: refused like any other broken content
            self.refused[sha] = "not a UTF-8 text file"
            log.error("%s hot reload: refused %s (keeping the current version): not a UTF-8 text file", self.label,
                      self.path)
            return None
        try:
            compiled = self.compile_text(text, str(self.path))
        except Exception as exc:  # any finding refuses the file; the job keeps its rule set
            self.refused[sha] = str(exc)
            log.error("%s hot reload: refused %s (keeping the current version): %s", self.label, self.path, exc)
            return None
        log.info("%s hot reload: %s -> version %s", self.label, self.path, getattr(compiled, "version", "?"))
        self.current_sha = sha
        self.reloads += 1
        return compiled
