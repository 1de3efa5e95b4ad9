"""Identity resolution: the pure protocol that merges an anonymous id's pre-signup profile into its user, once.

The job is keyed by a routing key: the pseudonym of ``user_id`` when the event has one, else the pseudonym of
``anonymous_id``. An event carrying both is an alias *link*. The anonymous key's state lives under another key
than the user's, and a keyed function cannot read another key's state, so the two keys talk through messages
on an internal Kafka topic the job also consumes (a loop); every message names its destination key, which is
the Kafka record key, so it lands on the subtask that owns that key. The protocol (see
``docs/identity-resolution.md`` for the sequence diagram, guarantees and limits):

1. link event at user key U naming anonymous key A: U records A as pending and sends ``Claim(to=A)``;
2. ``Claim`` at A: an unclaimed A sends its profile in ``Handoff(to=U)``, clears it and remembers
   ``merged_into=U`` for ``window_ms``; a claim by another user gets ``Reject``;
3. anonymous events reaching A while it is merged are forwarded (``Forward(to=U)``) and folded and decided at U;
4. ``Handoff`` at U answering its pending claim: A's profile is merged into U's (:mod:`udfs.profile_merge`), once;
5. erasure at U sends ``Erase(to=A)`` to every pending or merged anonymous key; A clears its state.

Every transition is a function ``(state, input) -> Outcome`` without I/O: the caller (the keyed Flink operator)
owns the state handles and the loop topic and applies the outcome (write the state back, produce the messages,
clear, merge or fold the profile). Transitions update the :class:`IdentityState` they are given in place (it is
deserialized per input anyway) and return what else to do; the common no-op answers are shared constants. All keys are opaque pseudonyms; no
raw id is stored, and forwarded events travel without their ``anonymous_id`` and ``context.session_id``.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from hashlib import blake2b
from operator import itemgetter
from typing import Any, NamedTuple, Union

from udfs.dedup import remembered
from udfs.profile_merge import merge_profiles
from udfs.profile_state import Profile, ProfilePolicy, ProfileState, profile_from_state, profile_to_state

IDENTITY_FORMAT = 1
MESSAGE_MAGIC = b"OI"  # Onramp Identity
MESSAGE_VERSION = 1
MAX_ALIASES = 16  # anonymous keys remembered per user in each of pending / merged / rejected (oldest dropped)
MAX_CLAIMS = 16  # claim ids remembered per anonymous key (duplicate claims)
MERGED_RETENTION_WINDOWS = 2  # a user key remembers a merged alias this many windows (late forwards, erasure)


class IdentityMessageError(ValueError):
    """A loop-topic record that is not a well-formed identity message of a version this code reads."""


# --- messages ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Claim:
    """User key ``user`` asks anonymous key ``to`` for its profile (answer: Handoff or Reject). ``claimed_at_ms``:
    the user key's clock when it claimed; answers echo it, so a user erased since can tell them apart."""

    to: str
    user: str
    claim_id: str
    claimed_at_ms: int


@dataclass(frozen=True, slots=True)
class Handoff:
    """Anonymous key ``anon`` gives its profile (a :func:`profile_to_state` tuple) to user key ``to``, answering
    claim ``claim_id``; the claim id makes a duplicated Handoff recognizable."""

    to: str
    anon: str
    claim_id: str
    claimed_at_ms: int
    profile: ProfileState


@dataclass(frozen=True, slots=True)
class Reject:
    """Anonymous key ``anon`` is already merged into another user: user key ``to`` stops waiting."""

    to: str
    anon: str
    claim_id: str


@dataclass(frozen=True, slots=True)
class Forward:
    """An anonymous event that reached ``anon`` after it merged into user key ``to`` (under a claim made at
    ``claimed_at_ms``): fold and decide it there."""

    to: str
    anon: str
    claimed_at_ms: int
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Erase:
    """User key ``user`` was erased at ``erased_at_ms`` (its clock): anonymous key ``to`` clears its state too,
    unless merged into another user, and ignores claims ``user`` made before."""

    to: str
    user: str
    erased_at_ms: int


Message = Union[Claim, Handoff, Reject, Forward, Erase]
_KIND = {Claim: "C", Handoff: "H", Reject: "R", Forward: "F", Erase: "E"}
_FIELDS = {"C": (Claim, ("to", "user", "claim_id", "claimed_at_ms")),
           "H": (Handoff, ("to", "anon", "claim_id", "claimed_at_ms", "profile")),
           "R": (Reject, ("to", "anon", "claim_id")), "F": (Forward, ("to", "anon", "claimed_at_ms", "event")),
           "E": (Erase, ("to", "user", "erased_at_ms"))}
_STRINGS = frozenset(("to", "user", "anon", "claim_id"))
_INTS = frozenset(("claimed_at_ms", "erased_at_ms"))
_HEADER = MESSAGE_MAGIC + bytes([MESSAGE_VERSION])


def message_key(msg: Message) -> bytes:
    """The Kafka record key of ``msg`` on the loop topic: its destination key, so it is routed to that key."""
    return msg.to.encode()


def encode_message(msg: Message) -> bytes:
    """``b"OI" + version byte + compact JSON [kind, field...]``; the profile of a Handoff travels as its state
    tuple with the dedup ids as ``[id, time]`` pairs (JSON has no integer keys)."""
    kind = _KIND[type(msg)]
    values = [getattr(msg, name) for name in _FIELDS[kind][1]]
    if kind == "H":
        values[4] = _profile_to_json(values[4])
    return _HEADER + json.dumps([kind, *values], separators=(",", ":"), ensure_ascii=False).encode()


def decode_message(data: bytes) -> Message:
    """Inverse of :func:`encode_message`; :class:`IdentityMessageError` on anything else."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 4:
        raise IdentityMessageError("identity message: too short or not bytes")
    if data[:2] != MESSAGE_MAGIC:
        raise IdentityMessageError("identity message: bad magic (not written by udfs.identity.encode_message)")
    if data[2] != MESSAGE_VERSION:
        raise IdentityMessageError(f"identity message: version {data[2]} unknown to this job (reads {MESSAGE_VERSION})")
    try:
        body = json.loads(bytes(data[3:]).decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise IdentityMessageError(f"identity message: body is not JSON ({exc})") from None
    if not isinstance(body, list) or not body or body[0] not in _FIELDS:
        raise IdentityMessageError("identity message: body is not [kind, ...] with a known kind")
    cls, names = _FIELDS[body[0]]
    values = body[1:]
    if len(values) != len(names):
        raise IdentityMessageError(f"identity message {cls.__name__}: {len(values)} fields, expected {len(names)}")
    for name, value in zip(names, values):
        if name in _STRINGS and (not isinstance(value, str) or not value):
            raise IdentityMessageError(f"identity message {cls.__name__}: {name} must be a non-empty string")
        if name in _INTS and not _is_int(value):
            raise IdentityMessageError(f"identity message {cls.__name__}: {name} must be an integer")
    if cls is Handoff:
        values[4] = _profile_from_json(values[4])
    elif cls is Forward:
        _check_event(values[3])
    return cls(*values)


_PROFILE_TYPES = {f.name: f.type for f in fields(Profile)}


# On the wire a profile keeps format 1's layout: the dedup ids as one ``recent_event_ids`` field of [id, time]
# pairs where the state packs them in two bytes fields (JSON has no bytes), so jobs before and after the
# packing (PROFILE_FORMAT 2) read each other's Handoffs during an upgrade.
_WIRE_FORMAT = 1
_WIRE_IDS = "recent_event_ids"
_PACKED_IDS = ("recent_id_keys", "recent_id_times")
_WIRE_NAMES = tuple(_WIRE_IDS if n == _PACKED_IDS[0] else n for n in _PROFILE_TYPES if n != _PACKED_IDS[1])


def _profile_to_json(state: ProfileState) -> list:
    profile = profile_from_state(state)
    return [_WIRE_FORMAT, list(_WIRE_NAMES),
            [[[k, t] for k, t in remembered(profile).items()] if n == _WIRE_IDS else getattr(profile, n)
             for n in _WIRE_NAMES]]


def _profile_from_json(body: Any) -> ProfileState:
    """The state tuple back, type-checked field by field (a merge must not crash on a malformed handoff)."""
    if not (isinstance(body, list) and len(body) == 3 and isinstance(body[1], list) and isinstance(body[2], list)
            and len(body[1]) == len(body[2])):
        raise IdentityMessageError("identity message Handoff: profile is not [format, names, values]")
    names, values = tuple(body[1]), list(body[2])
    for i, (name, value) in enumerate(zip(names, values)):
        if name == _WIRE_IDS:  # left as format 1's dict: profile_from_state packs it
            if not isinstance(value, list) or not all(_is_id_pair(p) for p in value):
                raise IdentityMessageError("identity message Handoff: recent_event_ids is not [[id, time], ...]")
            values[i] = {k: t for k, t in value}
            continue
        kind = _PROFILE_TYPES.get(name)
        if kind is None:
            continue  # a newer writer's field: profile_from_state drops it
        if not _matches(kind, value):
            raise IdentityMessageError(f"identity message Handoff: profile field {name} has the wrong type")
    return (body[0], names, tuple(values))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_id_pair(p: Any) -> bool:
    """[id, time] with an id and a time that fit the packed dedup fields (64 bits, unsigned and signed)."""
    return (isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and _is_int(p[1])
            and 0 <= p[0] < 1 << 64 and -(1 << 63) <= p[1] < 1 << 63)


def _matches(kind: str, value: Any) -> bool:
    if kind == "int":
        return _is_int(value)
    if kind == "bool | None":
        return value is None or isinstance(value, bool)
    if kind.startswith("dict[str, list"):  # interest: topic -> [score, at]
        return isinstance(value, dict) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        for x in v) for v in value.values())
    if kind.startswith("dict[str, int"):
        return isinstance(value, dict) and all(_is_int(v) for v in value.values())
    if kind.startswith("dict[str, str"):
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    if kind.startswith("list[str"):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "bytes":  # the packed dedup ids: never on the wire (see _WIRE_NAMES)
        return False
    return True


def _check_event(event: Any) -> None:
    if not (isinstance(event, dict) and isinstance(event.get("event_id"), str) and isinstance(event.get("event_type"), str)
            and _is_int(event.get("event_time")) and isinstance(event.get("user_id"), str)):
        raise IdentityMessageError("identity message Forward: event lacks event_id / event_type / event_time / user_id")


# --- state -------------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class IdentityState:
    """What a key remembers about aliases, stored next to its profile. A user key uses ``pending``, ``merged``,
    ``rejected`` and ``erased_at_ms``; an anonymous key the rest. A key that never took part in a link has an
    empty state, stored as nothing. Dicts are in insertion (= time) order, so the bound drops the oldest."""

    pending: dict[str, list] = field(default_factory=dict)  # anon key -> [since_ms, claim_id]
    merged: dict[str, list] = field(default_factory=dict)  # anon key -> [at_ms, claim_id]
    rejected: dict[str, int] = field(default_factory=dict)  # anon key -> at_ms (claimed first by another user)
    erased_at_ms: int = 0  # user key: erased then; loop messages about claims made before are dropped
    merged_into: str = ""  # anon key: the user key it handed its profile to
    merged_at_ms: int = 0
    merged_claimed_at_ms: int = 0  # the claimed_at_ms of the claim it merged under (Forwards carry it)
    claims: dict[str, int] = field(default_factory=dict)  # anon key: claim ids answered -> at_ms
    erasures: dict[str, int] = field(default_factory=dict)  # anon key: user key -> erased_at_ms (its clock)

    def is_empty(self) -> bool:
        return not (self.pending or self.merged or self.rejected or self.erased_at_ms or self.merged_into
                    or self.claims or self.erasures)


_STATE_NAMES = tuple(f.name for f in fields(IdentityState))
IdentityStateValue = tuple  # (format, field names, field values), like profile_state's


def identity_to_state(state: IdentityState) -> IdentityStateValue | None:
    """The value to store, or None for an empty state: the caller then clears its state handle (no bytes kept)."""
    if state.is_empty():
        return None
    return (IDENTITY_FORMAT, _STATE_NAMES, tuple(getattr(state, n) for n in _STATE_NAMES))


def identity_from_state(value: IdentityStateValue | None) -> IdentityState:
    """Inverse of :func:`identity_to_state`; fields unknown to this version dropped, missing ones defaulted."""
    if not value:
        return IdentityState()
    _fmt, names, values = value
    if names == _STATE_NAMES:
        return IdentityState(*values)
    known = set(_STATE_NAMES)
    return IdentityState(**{n: v for n, v in zip(names, values) if n in known})


# --- transitions -------------------------------------------------------------------------------------------------

class Outcome(NamedTuple):
    """What the caller must do after a transition (which has updated the :class:`IdentityState` in place).

    ``changed``: write the state back (``identity_to_state``; None means clear the handle). ``messages``: produce
    each to the loop topic (key :func:`message_key`, value :func:`encode_message`). ``clear_profile``: clear this
    key's profile state. ``profile``: this key's new profile (a merge), to store. ``fold``: an event to fold into
    this key's profile and decide on as if it had arrived here (duplicates by event id yield nothing, as usual).
    ``fold_locally``: (anonymous events) fold and decide the event at this key, the normal path. ``note``: why,
    for metrics and logs (``""`` when the outcome says it all)."""

    messages: tuple = ()
    changed: bool = False
    clear_profile: bool = False
    profile: Profile | None = None
    fold: dict[str, Any] | None = None
    fold_locally: bool = False
    note: str = ""


# The common no-op answers, built once: the hot path allocates nothing.
NOTHING = Outcome()
FOLD_LOCALLY = Outcome(fold_locally=True)
_NO_ALIAS, _PENDING, _MERGED, _REJECTED = (Outcome(note=n) for n in ("no_alias", "pending", "merged", "rejected"))


def claim_id_for(user_key: str, anon_key: str, link_event_id: str) -> str:
    """Deterministic (a replayed link event makes the same claim) and unique per link event."""
    return blake2b(f"{user_key}\x1f{anon_key}\x1f{link_event_id}".encode(), digest_size=8).hexdigest()


def on_link(state: IdentityState, user_key: str, anon_key: str, link_event_id: str, now_ms: int,
            window_ms: int) -> Outcome:
    """A (non-duplicate) event at user key ``user_key`` names ``anon_key``: claim it unless a claim is pending, it
    merged or was refused within the window. Apps often send the anonymous id on every event after signup, so the
    repeated case is the common one: at most three dict lookups, nothing written."""
    if not anon_key or anon_key == user_key:
        return _NO_ALIAS
    pending = state.pending.get(anon_key)
    if pending is not None and now_ms - pending[0] <= window_ms:
        return _PENDING
    merged = state.merged.get(anon_key)
    if merged is not None and now_ms - merged[0] <= window_ms:
        return _MERGED
    rejected = state.rejected.get(anon_key)
    if rejected is not None and now_ms - rejected <= window_ms:
        return _REJECTED
    claim_id = claim_id_for(user_key, anon_key, link_event_id)
    state.pending.pop(anon_key, None)
    state.pending[anon_key] = [now_ms, claim_id]
    state.rejected.pop(anon_key, None)
    _prune(state, now_ms, window_ms)
    return Outcome((Claim(anon_key, user_key, claim_id, now_ms),), changed=True)


def on_claim(state: IdentityState, profile: Profile, claim: Claim, now_ms: int, window_ms: int) -> Outcome:
    """A ``Claim`` at anonymous key ``claim.to``. First claim wins: an unclaimed key hands off its profile and
    clears it; a new claim by the user it merged into gets a Handoff of what it holds now (nothing, normally:
    a merged key forwards instead of folding) and refreshes the window; another user is rejected. A claim id
    answered before is a duplicate, and a claim made before its user's erasure is void: no answer."""
    expired = _expire_marker(state, now_ms, window_ms)
    if claim.claim_id in state.claims:
        return Outcome(changed=expired, note="duplicate_claim")
    erased_at = state.erasures.get(claim.user)
    if erased_at is not None and claim.claimed_at_ms <= erased_at:
        return Outcome(changed=expired, note="claim_before_erasure")
    state.claims[claim.claim_id] = now_ms
    if state.merged_into and state.merged_into != claim.user:
        _prune(state, now_ms, window_ms)
        return Outcome((Reject(claim.user, claim.to, claim.claim_id),), changed=True, note="claimed_by_other")
    again = state.merged_into == claim.user
    state.merged_into, state.merged_at_ms, state.merged_claimed_at_ms = claim.user, now_ms, claim.claimed_at_ms
    _prune(state, now_ms, window_ms)
    handoff = Handoff(claim.user, claim.to, claim.claim_id, claim.claimed_at_ms, profile_to_state(profile))
    return Outcome((handoff,), changed=True, clear_profile=True, note="again" if again else "")


def on_handoff(state: IdentityState, profile: Profile, handoff: Handoff, now_ms: int, window_ms: int,
               half_life_ms: float, policy: ProfilePolicy) -> Outcome:
    """A ``Handoff`` at user key ``handoff.to``: merge the anonymous profile into ``profile``, once per claim.

    A Handoff is only ever sent to the key that claimed, so one answering a claim this key does not remember is
    still accepted: in at-least-once mode a failure rolls this key's state back behind the claim it had already
    sent and the anonymous key had already answered (its profile is cleared; dropping the answer would lose it).
    Dropped: answers to claims made before this key's erasure; a second answer to the claim merged last (see
    :func:`_second_answer`)."""
    if state.erased_at_ms and handoff.claimed_at_ms <= state.erased_at_ms:
        return Outcome(note="handoff_after_erasure")
    merged = state.merged.get(handoff.anon)
    if merged is not None and merged[1] == handoff.claim_id:
        return _second_answer(state, profile, handoff, half_life_ms, policy)
    pending = state.pending.pop(handoff.anon, None)
    state.merged.pop(handoff.anon, None)
    state.merged[handoff.anon] = [now_ms, handoff.claim_id]
    _prune(state, now_ms, window_ms)
    merged_profile = merge_profiles(profile, profile_from_state(handoff.profile), half_life_ms, policy)
    return Outcome(changed=True, profile=merged_profile,
                   note="" if pending is not None and pending[1] == handoff.claim_id else "unsolicited_handoff")


def _second_answer(state: IdentityState, profile: Profile, handoff: Handoff, half_life_ms: float,
                   policy: ProfilePolicy) -> Outcome:
    """Another Handoff for the claim already merged. A duplicate (producer retry, replay) holds only events known
    here by dedup id: dropped. In at-least-once mode a failure can also make the anonymous key replay its inputs
    in another order than the first attempt, whose Handoff this key already merged; the replayed Handoff then
    holds events nobody forwarded here. Merging it keeps them (no loss) at the price of counting the events both
    Handoffs hold twice: at-least-once, as the mode says. In exactly-once mode this cannot happen."""
    anon = profile_from_state(handoff.profile)
    if remembered(anon).keys() <= remembered(profile).keys():
        return Outcome(note="duplicate_handoff")
    return Outcome(profile=merge_profiles(profile, anon, half_life_ms, policy), note="replayed_handoff")


def on_reject(state: IdentityState, reject: Reject, now_ms: int, window_ms: int) -> Outcome:
    """A ``Reject`` at user key ``reject.to``: the anonymous key belongs to another user; stop waiting and do not
    claim it again within the window."""
    pending = state.pending.get(reject.anon)
    if pending is None or pending[1] != reject.claim_id:
        return Outcome(note="stale_reject")
    del state.pending[reject.anon]
    state.rejected[reject.anon] = now_ms
    _prune(state, now_ms, window_ms)
    return Outcome(changed=True, note="rejected")


def on_anon_event(state: IdentityState | None, anon_key: str, event: dict[str, Any], now_ms: int, window_ms: int) -> Outcome:
    """An anonymous-only event (no user id) at ``anon_key``. Not merged (the common case, one attribute check;
    ``state`` may be None when the key stores none, sparing its deserialization): fold it here. Merged within the window: forward it to the user, who folds and decides it. Merged longer
    ago: the marker expires and the key starts afresh."""
    if state is None or not state.merged_into:
        return FOLD_LOCALLY
    if now_ms - state.merged_at_ms > window_ms:
        _expire_marker(state, now_ms, window_ms)
        _prune(state, now_ms, window_ms)
        return Outcome(changed=True, fold_locally=True, note="window_passed")
    forward = Forward(state.merged_into, anon_key, state.merged_claimed_at_ms, forwardable(event))
    return Outcome((forward,))


def on_forward(state: IdentityState, profile: Profile, forward: Forward, now_ms: int, window_ms: int) -> Outcome:
    """A ``Forward`` at user key ``forward.to``: fold the anonymous event here (only an anonymous key merged into
    this one forwards to it; accepted even if this key forgot the alias, for the reason given in
    :func:`on_handoff`), unless it was forwarded under a claim made before this key's erasure. Its consent may
    withdraw but never grant (see :func:`restrict_consent`)."""
    if state.erased_at_ms and forward.claimed_at_ms <= state.erased_at_ms:
        return Outcome(note="forward_after_erasure")
    return Outcome(fold=restrict_consent(forward.event, profile))


def on_erasure(state: IdentityState, own_key: str, now_ms: int, anon_key: str | None = None) -> Outcome:
    """``erasure_requested`` at ``own_key``: clear the profile and the identity state, and tell every pending or
    merged anonymous key (and ``anon_key``, the request's own anonymous id, linked or not) to clear theirs.
    What is kept: the erasure time (under the pseudonymous key, no data), so that Handoffs and Forwards still on
    the loop for claims made before are dropped; it expires like a merged alias. At an anonymous key (an
    anonymous-only request) this clears that key only."""
    targets = dict.fromkeys([*state.pending, *state.merged, *([anon_key] if anon_key and anon_key != own_key else [])])
    messages = tuple(Erase(target, own_key, now_ms) for target in targets)
    _reset(state)
    state.erased_at_ms = now_ms
    return Outcome(messages, changed=True, clear_profile=True)


def on_erase(state: IdentityState, erase: Erase, now_ms: int, window_ms: int) -> Outcome:
    """An ``Erase`` at anonymous key ``erase.to``: clear profile and identity state, merged marker included,
    unless the key is merged into another user (its data is that user's now). Kept: which user was erased when,
    so that a duplicated claim it made before (at-least-once) does not claim the cleared key again."""
    _expire_marker(state, now_ms, window_ms)
    if state.merged_into and state.merged_into != erase.user:
        return Outcome(note="merged_into_other")
    erasures = {k: v for k, v in state.erasures.items() if k != erase.user}
    erasures[erase.user] = erase.erased_at_ms
    _reset(state)
    state.erasures = erasures
    _prune(state, now_ms, window_ms)
    return Outcome(changed=True, clear_profile=True)


def expire(state: IdentityState, now_ms: int, window_ms: int) -> Outcome:
    """Forget what is older than the window (merged aliases, answered claims and erasure times: two windows;
    pending claims wait for their answer, see :func:`_prune`). Called by every transition that writes; the
    caller may also call it from a timer so idle keys shed their identity state."""
    before = _sizes(state)
    _expire_marker(state, now_ms, window_ms)
    _prune(state, now_ms, window_ms)
    return Outcome(changed=_sizes(state) != before)


def _sizes(state: IdentityState) -> tuple:
    """Expiry only removes entries, so sizes tell whether it changed anything."""
    return (len(state.pending), len(state.merged), len(state.rejected), len(state.claims), len(state.erasures),
            state.merged_into, state.erased_at_ms)


def forwardable(event: dict[str, Any]) -> dict[str, Any]:
    """The event as it travels on the loop topic: without the raw ``anonymous_id`` and ``context.session_id``
    (the keys are pseudonyms; nothing downstream needs them)."""
    out = dict(event)
    out["anonymous_id"] = None
    context = out.get("context")
    if context and context.get("session_id") is not None:
        out["context"] = {**context, "session_id": None}
    return out


def restrict_consent(event: dict[str, Any], profile: Profile) -> dict[str, Any]:
    """A forwarded anonymous event's consent, as the user's profile may take it: a refusal (False) applies, a
    grant does not (consent stated on an anonymous device is not the user's); nothing left to apply: no consent."""
    consent = event.get("consent")
    if not consent:
        return event
    current = {"personalization": profile.consent_personalization, "analytics": profile.consent_analytics,
               "marketing": profile.consent_marketing}
    restricted = {k: (False if consent.get(k) is False else v) for k, v in current.items()}
    return {**event, "consent": None if restricted == current else restricted}


def _reset(state: IdentityState) -> None:
    """Back to an empty state, in place."""
    for f in fields(IdentityState):
        setattr(state, f.name, f.default_factory() if f.default_factory is not MISSING else f.default)


def _expire_marker(state: IdentityState, now_ms: int, window_ms: int) -> bool:
    if state.merged_into and now_ms - state.merged_at_ms > window_ms:
        state.merged_into, state.merged_at_ms, state.merged_claimed_at_ms = "", 0, 0
        return True
    return False


def _prune(state: IdentityState, now_ms: int, window_ms: int) -> None:
    """Drop expired entries and bound each dict (oldest first). A pending claim is not dropped by age: its answer
    will come (the loop loses nothing) and after a window :func:`on_link` may claim again. Rejections live one
    window; merged aliases, answered claim ids and erasure times two (a late Forward, a duplicated Claim or
    Handoff still finds them)."""
    keep = MERGED_RETENTION_WINDOWS * window_ms
    if state.erased_at_ms and now_ms - state.erased_at_ms > keep:
        state.erased_at_ms = 0
    for name, limit, age, bound in (("pending", None, None, MAX_ALIASES),
                                    ("merged", keep, itemgetter(0), MAX_ALIASES),
                                    ("rejected", window_ms, None, MAX_ALIASES),
                                    ("claims", keep, None, MAX_CLAIMS),
                                    ("erasures", keep, None, MAX_ALIASES)):
        entries = getattr(state, name)
        if not entries:
            continue
        if limit is not None:
            stale = [k for k, v in entries.items() if now_ms - (age(v) if age else v) > limit]
            for k in stale:
                del entries[k]
        for k in list(entries)[:max(0, len(entries) - bound)]:
            del entries[k]
