"""Deduplication of events per user, inside the profile state (no state handle of its own).

An event id seen before for the same user, within ``dedup_window_ms`` of the newest event time seen for that
user, is a duplicate: it produces no second decision and is not folded into the profile twice. The ids live in
the profile (:attr:`udfs.profile_state.Profile.recent_id_keys` and ``recent_id_times``), so the job keeps its
budget of one state read and one state write per event; Flink's state TTL on the profile expires them with it.

Ids are stored as a 64-bit BLAKE2b hash of the event id, not the id itself: a day of ids then pickles to about
a fifth of the bytes, and the profile state (read and written on every event) stays small. Two ids of one user
colliding among at most ``dedup_max_ids`` is a ~1e-14 chance.

Packed, not a dict: the profile is unpickled and pickled again on every event (PyFlink's
``PICKLED_BYTE_ARRAY``), and a ``dict[int, int]`` makes pickle build and walk two int objects per id each way,
about 0.2 µs per id and round trip: most of the state's cost for a user with a day of ids (the round trip of a
profile was 12.5 µs with 25 ids, 50 µs with 200, 7 µs without ids; packed, 7.5 µs with either). The ids are
kept instead as two ``bytes`` values, ``recent_id_keys`` (the 8-byte BLAKE2b digest of each id, as is;
:func:`id_key` reads it as a little-endian int) and ``recent_id_times`` (8 bytes little-endian signed, the
event time), entry *i* of one belonging to entry *i* of the other; pickle copies each as one buffer, whatever
the number of ids.

Nor are they unpacked per event, which would give the saving back: membership is a ``bytes.find`` of the 8-byte
key (C speed, ~0.25 µs for 25 ids, ~1.5 µs for 500; a match counts only 8-byte aligned), a new id is appended by
concatenation, and pruning reads the one or two oldest times with :mod:`struct` (bisecting a ``memoryview`` of
the times only when more are stale) and slices both values. :func:`remembered` / :func:`packed` convert to and
from a dict for the rare callers that want one (profile merge, identity handoffs, format-1 state, tests).

The entries are kept in ascending event-time order (arrival order; a late event is inserted at its place,
which is rare), so pruning the window and the cap (``dedup_max_ids``, oldest dropped first) only ever cuts
the head: one slice, not a scan of every id.

Pure functions over the profile; :func:`udfs.profile_state.fold_event` calls them for the stream and training.
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # profile_state imports this module
    from udfs.profile_state import Profile

DEFAULT_WINDOW_MS = 24 * 3600 * 1000
DEFAULT_MAX_IDS = 500

_ENTRY = 8  # bytes per id in each packed value
_TIME = struct.Struct("<q")  # an event time as stored; struct reads and writes one faster than int.from_bytes
_pack_time, _unpack_time = _TIME.pack, _TIME.unpack_from
_LITTLE_ENDIAN = sys.byteorder == "little"  # the stored byte order: memoryview casts read it natively


def id_key(event_id: str) -> int:
    """The stored form of an event id as an int: 64 bits of BLAKE2b (stable across processes, unlike ``hash``)."""
    return int.from_bytes(packed_id(event_id), "little")


def packed_id(event_id: str) -> bytes:
    """:func:`id_key` as stored, 8 bytes little-endian: the digest itself, so the per-event path never converts."""
    return blake2b(event_id.encode(), digest_size=_ENTRY).digest()


def is_duplicate(profile: "Profile", event: dict[str, Any], key: bytes | None = None) -> bool:
    """True if ``event``'s id was remembered for this user (and not pruned from the window since); ``key``:
    its :func:`packed_id`, when the caller has it already."""
    return _find(profile.recent_id_keys, packed_id(event["event_id"]) if key is None else key) >= 0


def remember(profile: "Profile", event: dict[str, Any], window_ms: int, max_ids: int, key: bytes | None = None,
             *, known_new: bool = False) -> None:
    """Record ``event``'s id, then drop ids older than ``window_ms`` before the newest event time and, beyond
    ``max_ids``, the oldest. ``window_ms <= 0`` disables deduplication (and forgets what was kept).

    Re-remembering an id moves it to its place in time. ``known_new``: the caller has just seen
    :func:`is_duplicate` answer False for this key (:func:`udfs.profile_state.fold_event`), so the search for an
    earlier record of it is skipped."""
    keys, times = profile.recent_id_keys, profile.recent_id_times
    if window_ms <= 0 or max_ids <= 0:
        if keys:
            profile.recent_id_keys = profile.recent_id_times = b""
        return
    t = event["event_time"]
    entry_key = packed_id(event["event_id"]) if key is None else key
    entry_time = _pack_time(t)
    if not keys:
        profile.recent_id_keys, profile.recent_id_times = entry_key, entry_time
        return
    newest = _unpack_time(times, len(times) - _ENTRY)[0]
    at = -1 if known_new else _find(keys, entry_key)
    if at >= 0:  # re-remembered: drop the old entry, the new one goes to its place in time
        keys, times = keys[:at] + keys[at + _ENTRY:], times[:at] + times[at + _ENTRY:]
    if t >= newest:
        keys += entry_key
        times += entry_time
        newest = t
    else:  # late event: insert after every entry not newer (ties keep arrival order)
        i = bisect_right(_times_view(times), t) * _ENTRY
        keys = keys[:i] + entry_key + keys[i:]
        times = times[:i] + entry_time + times[i:]
    stale = _stale_bytes(times, newest - window_ms)
    excess = len(keys) - stale - max_ids * _ENTRY
    drop = stale + excess if excess > 0 else stale
    if drop:
        keys, times = keys[drop:], times[drop:]
    profile.recent_id_keys, profile.recent_id_times = keys, times


def remembered(profile: "Profile") -> dict[int, int]:
    """The remembered ids as ``{id_key: event_time}``, oldest first (decoded: for merges and tests, not per event)."""
    return dict(zip(_ints(profile.recent_id_keys, "Q"), _ints(profile.recent_id_times, "q")))


def packed(ids: Iterable[tuple[int, int]]) -> tuple[bytes, bytes]:
    """``(recent_id_keys, recent_id_times)`` for ``(id_key, event_time)`` pairs given oldest first."""
    keys, times = array("Q"), array("q")
    for k, t in ids:
        keys.append(k)
        times.append(t)
    if not _LITTLE_ENDIAN:
        keys.byteswap()
        times.byteswap()
    return keys.tobytes(), times.tobytes()


def _find(keys: bytes, key: bytes) -> int:
    """Byte offset of the 8-byte ``key`` in ``keys``, -1 if absent. ``bytes.find`` can also match across two
    entries; only an aligned match is the entry."""
    i = keys.find(key)
    while i > 0 and i % _ENTRY:
        i = keys.find(key, i + 1)
    return i


def _stale_bytes(times: bytes, cutoff: int) -> int:
    """How many bytes at the head of ``times`` (oldest first) are entries older than ``cutoff``. Usually none or
    the one entry the newest event pushed out of the window, read directly; more are found by bisection."""
    if _unpack_time(times)[0] >= cutoff:
        return 0
    if len(times) > _ENTRY and _unpack_time(times, _ENTRY)[0] >= cutoff:
        return _ENTRY
    return bisect_left(_times_view(times), cutoff, 1) * _ENTRY


def _times_view(times: bytes) -> Sequence[int]:
    """The event times as a sequence of ints for ``bisect``, without copying on little-endian hosts."""
    if _LITTLE_ENDIAN:
        return memoryview(times).cast("q")
    return _ints(times, "q")


def _ints(blob: bytes, code: str) -> list[int]:
    """A packed value decoded (``code``: ``"Q"`` for keys, ``"q"`` for times)."""
    values = array(code, blob)
    if not _LITTLE_ENDIAN:
        values.byteswap()
    return values.tolist()
