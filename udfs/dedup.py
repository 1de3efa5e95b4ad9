"""Deduplication of events per user, inside the profile state (no state handle of its own).

An event id seen before for the same user, within ``dedup_window_ms`` of the newest event time seen for that
user, is a duplicate: it produces no second decision and is not folded into the profile twice. The ids live in
:attr:`udfs.profile_state.Profile.recent_event_ids` (``event_id -> event_time``), so the job keeps its budget
of one state read and one state write per event; Flink's state TTL on the profile expires them with it.

Ids are stored as a 64-bit BLAKE2b hash of the event id, not the id itself: a day of ids then pickles to about
a fifth of the bytes, and the profile state (read and written on every event) stays small. Two ids of one user
colliding among at most ``dedup_max_ids`` is a ~1e-14 chance.

The dict is kept in ascending event-time order (insertion order; a late event re-sorts it, which is rare), so
pruning the window and the cap (``dedup_max_ids``, oldest dropped first) only ever touches its head: O(1) per
event in the common in-order case, not a scan of every id.

Pure functions over the profile; :func:`udfs.profile_state.fold_event` calls them for the stream and training.
"""

from __future__ import annotations

from hashlib import blake2b
from itertools import islice
from operator import itemgetter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # profile_state imports this module
    from udfs.profile_state import Profile

DEFAULT_WINDOW_MS = 24 * 3600 * 1000
DEFAULT_MAX_IDS = 500

_by_time = itemgetter(1)


def id_key(event_id: str) -> int:
    """The stored form of an event id: 64 bits of BLAKE2b (stable across processes, unlike ``hash``)."""
    return int.from_bytes(blake2b(event_id.encode(), digest_size=8).digest(), "little")


def is_duplicate(profile: "Profile", event: dict[str, Any], key: int | None = None) -> bool:
    """True if ``event``'s id was remembered for this user (and not pruned from the window since); ``key``:
    its :func:`id_key`, when the caller has it already."""
    return (id_key(event["event_id"]) if key is None else key) in profile.recent_event_ids


def remember(profile: "Profile", event: dict[str, Any], window_ms: int, max_ids: int, key: int | None = None) -> None:
    """Record ``event``'s id, then drop ids older than ``window_ms`` before the newest event time and, beyond
    ``max_ids``, the oldest. ``window_ms <= 0`` disables deduplication (and forgets what was kept)."""
    ids = profile.recent_event_ids
    if window_ms <= 0 or max_ids <= 0:
        if ids:
            ids.clear()
        return
    t = event["event_time"]
    event_id = id_key(event["event_id"]) if key is None else key
    if not ids:
        ids[event_id] = t
        return
    newest = next(reversed(ids.values()))
    ids.pop(event_id, None)  # re-remembering an id moves it to its place in time
    ids[event_id] = t
    if t < newest:  # late event: keep the dict in event-time order (sorted() is stable: ties keep arrival order)
        ids = profile.recent_event_ids = dict(sorted(ids.items(), key=_by_time))
    else:
        newest = t
    cutoff = newest - window_ms
    if next(iter(ids.values())) < cutoff:
        for k in _stale_head(ids, cutoff):
            del ids[k]
    excess = len(ids) - max_ids
    if excess > 0:
        for k in list(islice(ids, excess)):
            del ids[k]


def _stale_head(ids: dict[int, int], cutoff: int) -> list[int]:
    """The leading ids (oldest first) whose time is before ``cutoff``."""
    stale = []
    for k, at in ids.items():
        if at >= cutoff:
            break
        stale.append(k)
    return stale
