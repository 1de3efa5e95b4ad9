"""The profile cache (udfs/profile_cache.py): the operator decides exactly as it does reading every profile from
Flink's state, through identity merges, duplicates, erasures, consent changes, evictions and failures."""

from __future__ import annotations

import pickle
import random

import pytest
from pyflink.common import Row

from udfs.avro_codec import decision_codec, event_codec
from udfs.personalizer import Personalizer
from udfs.profile_cache import CLOCK_MARGIN_MS, ProfileCache
from udfs.profile_state import Profile, profile_from_state

from tests.conftest import NOW_MS
from tests.test_identity_operator import Keyed, Loop, _event
from tests.test_personalize_function import DEAD_LETTERS, ExplodingScorer, FakeContext, _function


def test_a_put_profile_is_read_back_until_evicted_least_recently_written_first():
    cache = ProfileCache(2)
    a, b, c = Profile(sessions=1), Profile(sessions=2), Profile(sessions=3)
    assert cache.get("a", 0) is None
    cache.put("a", a, 0)
    cache.put("b", b, 0)
    cache.put("a", a, 1)  # rewritten: now the most recent
    cache.put("c", c, 2)
    assert cache.get("a", 3) is a and cache.get("c", 3) is c and cache.get("b", 3) is None
    assert len(cache) == 2 and (cache.hits, cache.misses) == (2, 2)
    cache.drop("a")
    assert cache.get("a", 3) is None


def test_an_entry_expires_before_the_state_ttl_would_expire_the_state():
    cache = ProfileCache(10, ttl_ms=60_000)
    profile = Profile()
    cache.put("k", profile, 1_000)
    assert cache.get("k", 1_000 + 60_000 - CLOCK_MARGIN_MS - 1) is profile
    assert cache.get("k", 1_000 + 60_000 - CLOCK_MARGIN_MS) is None
    assert len(cache) == 0  # dropped, not kept to be found again


def test_size_zero_keeps_nothing_and_a_negative_size_is_refused():
    cache = ProfileCache(0)
    cache.put("k", Profile(), 0)
    assert cache.get("k", 0) is None and len(cache) == 0
    with pytest.raises(ValueError, match="max_entries"):
        ProfileCache(-1)


class PickledKeyed(Keyed):
    """Keyed state that pickles on write and unpickles on read, as PyFlink's ``PICKLED_BYTE_ARRAY`` state does:
    what a later read returns shares nothing with the objects written."""

    def value(self):
        stored = super().value()
        return None if stored is None else pickle.loads(stored)

    def update(self, value) -> None:
        super().update(pickle.dumps(value))


def _random_traffic(seed: int) -> list[dict]:
    """Events of a few users and visitors: pre-signup browsing, signups that link a device, replays (duplicates),
    consent withdrawn and given again, erasures; event times mostly increasing, some late."""
    rng = random.Random(seed)
    users, devices = ["u-1", "u-2", "u-3"], ["d-1", "d-2", "d-3", "d-4"]
    sent: list[dict] = []
    for i in range(160):
        t = i * 1000 - (rng.randrange(5_000) if rng.random() < 0.1 else 0)
        roll = rng.random()
        if sent and roll < 0.1:
            event = dict(rng.choice(sent))  # a redelivery
        elif roll < 0.35:
            event = _event(rng.choice(["page_view", "feature_used"]), t, anon=rng.choice(devices),
                           topic=rng.choice(["analytics", "automation", "reporting"]))
        elif roll < 0.45:
            event = _event("signup", t, user=rng.choice(users), anon=rng.choice(devices))
        elif roll < 0.5:
            event = _event("erasure_requested", t, user=rng.choice(users), anon=None)
        else:
            event = _event(rng.choice(["page_view", "step_completed", "session_start"]), t, user=rng.choice(users),
                           anon=None, topic="analytics", step_id=rng.choice(["profile", "invite_team", "tour"]))
            if rng.random() < 0.1:
                event["consent"] = {"personalization": rng.random() < 0.5, "analytics": True, "marketing": False}
        sent.append(event)
    return sent


def _replay(traffic: list[dict], cache_size: int) -> tuple[list[dict], dict]:
    loop = Loop()
    loop.fn.profile_state = PickledKeyed(loop.current)
    loop.fn.identity_state = PickledKeyed(loop.current)
    loop.fn.profiles = ProfileCache(cache_size)
    for event in traffic:
        loop.send(event)
        loop.drain()
    decisions = [{k: v for k, v in d.items() if k != "decided_at"} for d in loop.decided]
    states = {key: profile_from_state(pickle.loads(value)) for key, value in loop.fn.profile_state.values.items()
              if value}
    return decisions, states


@pytest.mark.parametrize("seed", range(6))
def test_the_operator_decides_and_stores_the_same_with_and_without_the_cache(seed):
    traffic = _random_traffic(seed)
    reference = _replay(traffic, 0)
    assert len(reference[0]) > 50  # the traffic exercised the operator
    for size in (1, 2, 1000):
        assert _replay(traffic, size) == reference, f"cache of {size} profiles"


def test_a_failure_halfway_through_an_event_leaves_the_next_event_reading_the_stored_profile():
    """The fold changes the cached profile in place before the model runs; when the model fails the event is
    dead-lettered, and the next event must see the profile as stored, without the failed event's counts."""
    results = []
    for size in (0, 10):
        fn = _function()
        current = ["u"]
        fn.profile_state = PickledKeyed(current)
        fn.profiles = ProfileCache(size)
        consenting = {"personalization": True, "analytics": True, "marketing": False}

        def send(kind: str, t: int):
            event = _event(kind, t, user="u-1", anon=None, topic="analytics")
            event["consent"] = consenting
            return list(fn.process_element(Row(event_codec().encode(event), "events", 0, t), FakeContext()))

        send("signup", 0)
        working = fn.personalizer
        fn.personalizer = Personalizer(ExplodingScorer(), 3_600_000.0, None, fn.profile_policy)
        ((tag, _),) = send("page_view", 1000)
        assert tag is DEAD_LETTERS
        fn.personalizer = working
        (out,) = send("feature_used", 2000)
        results.append((profile_from_state(fn.profile_state.value()).counts, decision_codec().decode(out)["step_id"]))
    assert results[0] == results[1]
    assert results[1][0] == {"signup": 1, "feature_used": 1}



def test_the_operator_sizes_its_cache_from_the_config_and_expires_entries_with_the_state_ttl():
    from udfs.flink_functions import Personalize
    from udfs.validation import ValidationLimits

    fn = Personalize(None, 3_600_000.0, "events", ValidationLimits(), state_ttl_ms=7_200_000, profile_cache_size=5)
    assert (fn.profiles.max_entries, fn.profiles.ttl_ms) == (5, 7_200_000)
    fn.profiles.put("k", Profile(), 0)
    assert fn.profiles.get("k", 7_200_000 - CLOCK_MARGIN_MS) is None  # Flink would soon forget it: read the state


def test_the_operator_ages_a_cached_profile_when_it_looks_it_up_not_when_the_record_arrived(monkeypatch):
    """A model reload or a long pause between a record's arrival and the profile lookup must not let the cache
    serve a profile that Flink's TTL, which checks when it reads, would refuse by then."""
    import udfs.flink_functions as flink_functions

    base = NOW_MS  # the test events' clock
    clock = {"arrival": base + 10_000, "later": base + 10_000}
    calls = []

    def fake_now() -> int:
        calls.append(None)
        return clock["arrival"] if len(calls) == 1 else clock["later"]

    monkeypatch.setattr(flink_functions, "_now_ms", fake_now)
    fn = _function()
    fn.profile_state = PickledKeyed(["u"])
    fn.profiles = ProfileCache(10, ttl_ms=60_000)

    def send(kind: str, t: int) -> list:
        calls.clear()
        event = _event(kind, t, user="u-1", anon=None, topic="analytics")
        return list(fn.process_element(Row(event_codec().encode(event), "events", 0, t), FakeContext()))

    send("signup", 10_000)
    assert len(fn.profiles) == 1
    # Arrives 1.5 s before the entry would expire, then stalls 1.6 s before deciding: by then it has expired.
    clock["arrival"], clock["later"] = base + 10_000 + 58_500, base + 10_000 + 60_100
    hits = fn.profiles.hits
    send("page_view", 10_000 + 58_500)
    assert fn.profiles.hits == hits  # read from the state, as Flink (with its TTL) decides
    # Without the stall the same arrival is served from the cache.
    clock["arrival"] = clock["later"] = base + 10_000 + 60_100 + 1_000
    send("page_view", 10_000 + 60_100 + 1_000)
    assert fn.profiles.hits == hits + 1
