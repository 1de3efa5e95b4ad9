"""Recently decided profiles, kept deserialized beside Flink's keyed state, so reading one back is a dict look-up.

Reading a profile through PyFlink's state API is a call into the JVM plus an unpickle of ~1.3 KB and the
rebuild of a :class:`~udfs.profile_state.Profile`: ~9% of the keyed operator's Python time at 4,800 events/s
(py-spy, docs/performance.md). Onboarding events come in sessions, so the profile an event needs was usually
written a moment ago by the same operator.

The cache is *write-through*: every profile is still written to Flink's state on every event, so checkpoints,
savepoints, rescaling and state checks see exactly what they saw without it. It only answers reads, and only
with what this operator instance itself wrote since it was opened (a restart or a rescale opens a new instance
with an empty cache, and the state restored is the truth). Whoever changes a key's profile state other than
through :meth:`ProfileCache.put` (identity merges, erasure, a failed event halfway through its fold) drops the
key first.

TTL: Flink forgets a profile ``state_ttl`` after its last write (processing time); an entry is treated as gone
slightly earlier (:data:`CLOCK_MARGIN_MS`), so the cache never returns a profile Flink would no longer return.
"""

from __future__ import annotations

from udfs.profile_state import Profile

# An entry counts as expired this much before Flink's TTL would expire the state it mirrors: the entry's time
# is taken before the state write, Flink's at it, and both read the same wall clock. A lookup must pass the time
# of the lookup itself (Flink checks expiry when it reads), so the margin only has to cover the moment between.
CLOCK_MARGIN_MS = 1_000


class ProfileCache:
    """At most ``max_entries`` profiles by key, least recently written evicted first; ``max_entries`` 0 keeps
    none (every read goes to Flink's state). ``ttl_ms``: the profile state's TTL (0: none)."""

    __slots__ = ("max_entries", "ttl_ms", "_entries", "hits", "misses")

    def __init__(self, max_entries: int, ttl_ms: int = 0) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self.ttl_ms = ttl_ms
        self._entries: dict[str, tuple[Profile, int]] = {}  # insertion order = write order (oldest first)
        self.hits = 0
        self.misses = 0

    def get(self, key: str, now_ms: int) -> Profile | None:
        """The profile last :meth:`put` for ``key``, or None (never put, evicted, dropped or expired): then read
        Flink's state. The caller may change the profile in place, and must :meth:`put` or :meth:`drop` it."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if self.ttl_ms and now_ms - entry[1] >= self.ttl_ms - CLOCK_MARGIN_MS:
            del self._entries[key]
            self.misses += 1
            return None
        self.hits += 1
        return entry[0]

    def put(self, key: str, profile: Profile, written_ms: int) -> None:
        """Remember ``profile`` as what Flink's state holds for ``key`` since ``written_ms`` (a time taken before
        the state write)."""
        if not self.max_entries:
            return
        entries = self._entries
        entries.pop(key, None)  # re-inserted last: the most recently written
        entries[key] = (profile, written_ms)
        if len(entries) > self.max_entries:
            del entries[next(iter(entries))]

    def drop(self, key: str) -> None:
        """Forget ``key``: its state changed (or may have) other than through :meth:`put`."""
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
