"""Identity resolution through the real keyed operator (udfs/flink_functions.Personalize), with its state handles
switched per key and the control topic modelled as a queue: pre-signup events under an anonymous id merge into
the user's profile once, also when some of them arrive after the link; erasure leaves neither key any profile.

tests/test_identity.py covers the protocol's transitions and random interleavings; this checks the wiring."""

from __future__ import annotations

from pyflink.common import Row

from udfs.avro_codec import decision_codec, event_codec
from udfs.flink_functions import IDENTITY
from udfs.profile_state import profile_from_state

from tests.conftest import NOW_MS, make_event
from tests.test_personalize_function import FakeCounter, _function


class Keyed:
    """Per-key values behind one state handle, like Flink's keyed state: reads follow the current key."""

    def __init__(self, current: list[str]) -> None:
        self.current, self.values = current, {}

    def value(self):
        return self.values.get(self.current[0])

    def update(self, value) -> None:
        self.values[self.current[0]] = value

    def clear(self) -> None:
        self.values.pop(self.current[0], None)


class Context:
    def __init__(self, current: list[str]) -> None:
        self.current = current

    def get_current_key(self):
        return Row(self.current[0])


class Loop:
    """The operator plus its control topic: every identity message is delivered to the key it names."""

    def __init__(self) -> None:
        self.fn = _function()
        self.current = [""]
        self.fn.profile_state, self.fn.identity_state = Keyed(self.current), Keyed(self.current)
        self.fn.identity_messages = FakeCounter()
        self.queue: list[tuple[bytes, bytes]] = []
        self.decided: list[dict] = []

    def _run(self, key: str, value: bytes, topic: str) -> None:
        self.current[0] = key
        for out in self.fn.process_element(Row(value, topic, 0, 0), Context(self.current)):
            if isinstance(out, tuple) and out[0] is IDENTITY:
                self.queue.append((out[1][0], out[1][1]))
            elif isinstance(out, bytes):
                self.decided.append(decision_codec().decode(out))

    def send(self, event: dict) -> None:
        key = self.fn.key.user(event["user_id"]) if event["user_id"] else self.fn.key.anon(event["anonymous_id"])
        self._run(key, event_codec().encode(event), "events")

    def drain(self) -> None:
        while self.queue:
            key, value = self.queue.pop(0)
            self._run(key.decode(), value, "control")

    def profile(self, key: str):
        stored = self.fn.profile_state.values.get(key)
        return profile_from_state(stored) if stored else None


def _event(kind: str, t: int, user: str = "", anon: str | None = "device-1", **props: str) -> dict:
    event = {**make_event(kind, user_id=user, t=NOW_MS + t, **props), "anonymous_id": anon}
    event["consent"] = {"personalization": True, "analytics": True, "marketing": False}
    return event


def test_pre_signup_behaviour_merges_into_the_user_once_even_out_of_order():
    loop = Loop()
    before = [_event("page_view", i * 1000, topic="analytics") for i in range(3)]
    late = _event("feature_used", 2500, topic="analytics")  # pre-signup, but arrives after the link
    for event in before:
        loop.send(event)
    signup = _event("signup", 10_000, user="u-1")  # carries both ids: the alias link
    loop.send(signup)
    loop.drain()
    loop.send(late)  # reaches the anonymous key after it merged: forwarded to the user
    loop.drain()
    loop.send(signup)  # a replayed link: no second decision, no second claim
    loop.drain()

    user_key, anon_key = loop.fn.key.user("u-1"), loop.fn.key.anon("device-1")
    merged = loop.profile(user_key)
    assert merged.counts == {"page_view": 3, "feature_used": 1, "signup": 1}
    assert loop.profile(anon_key) is None  # the anonymous profile moved, it was not copied
    assert sorted(d["event_id"] for d in loop.decided) == sorted(e["event_id"] for e in [*before, signup, late])
    assert [d["anonymous_id"] for d in loop.decided[:3]] == ["device-1"] * 3  # addressed to the visitor


def test_erasure_clears_the_user_and_the_anonymous_profile_it_merged():
    loop = Loop()
    loop.send(_event("page_view", 0, topic="analytics"))
    loop.send(_event("signup", 1000, user="u-1"))
    loop.drain()
    loop.send(_event("erasure_requested", 2000, user="u-1", anon=None))
    loop.drain()
    user_key, anon_key = loop.fn.key.user("u-1"), loop.fn.key.anon("device-1")
    assert loop.profile(user_key) is None and loop.profile(anon_key) is None
    assert loop.decided[-1]["step_id"] == "none"  # the confirmation
