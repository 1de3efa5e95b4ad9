"""Merge an anonymous (pre-signup) profile into a user's profile: the pure half of identity resolution.

Identity resolution (:mod:`udfs.identity`, ``docs/identity-resolution.md``) folds an anonymous id's events in
that id's own keyed state until an alias links it to a user; the anonymous profile is then handed to the user's
key and merged here, once. The merge is built so that folding the anonymous events and the user's events in two
profiles and merging them gives what folding all of them into one profile gives (:func:`fold_event`):

* exact: counts, sessions, the set of steps done / skipped, ``signup_ms``, ``completed_ms``, ``last_event_ms``,
  ``last_step_ms``, the deduplication ids (union, then the policy's window and cap, as :mod:`udfs.dedup` would
  have pruned them);
* interest scores: both decayed to the later of their timestamps and summed (the same sum the fold computes,
  to float rounding, ~1e-12 relative);
* ``first_seen_ms``: the earlier of the two (the fold keeps the time of the first event it *received*, so the
  merge is the time-ordered answer);
* the timings ``prev_gap_ms`` and ``step_gap_sum_ms``/``step_gaps`` are rebuilt from the two profiles'
  endpoints: exact when the two profiles' activity does not interleave in time (pre-signup behaviour, then the
  user's), an approximation otherwise (the profiles keep no per-event times to do better);
* steps keep completion order as far as it is known: the profile whose activity started first comes first.

Who wins where the two disagree: the user's consent flags (consent is never inherited from an anonymous
device), the user's demographic and context values (the anonymous profile only fills gaps), the user's signup.
Behavioural data (see :mod:`udfs.profile_state`) survives the merge only when the *user* has consented to
personalization at merge time; otherwise only onboarding progress is merged and the result holds no behaviour.
"""

from __future__ import annotations

from operator import itemgetter

from udfs.dedup import packed, remembered
from udfs.profile_state import Profile, ProfilePolicy, decayed

_by_time = itemgetter(1)


def merge_profiles(user: Profile, anon: Profile, half_life_ms: float, policy: ProfilePolicy) -> Profile:
    """A new profile: ``anon`` merged into ``user`` (neither is modified). Deterministic; symmetric in everything
    but the user-wins fields listed in the module docstring."""
    personal = user.consent_personalization is True
    merged = Profile(
        first_seen_ms=_min_set(user.first_seen_ms, anon.first_seen_ms),
        signup_ms=user.signup_ms or anon.signup_ms,
        last_event_ms=max(user.last_event_ms, anon.last_event_ms),
        steps_done=_ordered_union(user, anon, "steps_done"),
        completed_ms=_min_set(user.completed_ms, anon.completed_ms),
        consent_personalization=user.consent_personalization,
        consent_analytics=user.consent_analytics,
        consent_marketing=user.consent_marketing,
        # the visitor's arms carry over where the user has none: one person, one exposure per experiment
        experiments={**anon.experiments, **user.experiments},
    )
    ids = _merge_ids(remembered(user), remembered(anon), policy)
    merged.recent_id_keys, merged.recent_id_times = packed(ids.items())
    done = set(merged.steps_done)
    merged.steps_skipped = [s for s in _ordered_union(user, anon, "steps_skipped") if s not in done]
    if not personal:  # no consent: progress only (the user's own profile holds no behaviour either)
        return merged

    merged.counts = dict(user.counts)
    for etype, n in anon.counts.items():
        merged.counts[etype] = merged.counts.get(etype, 0) + n
    merged.sessions = user.sessions + anon.sessions
    merged.interest = _merge_interest(user.interest, anon.interest, half_life_ms)
    merged.demographic = _fill(user.demographic, anon.demographic, policy.allowed_demographic_fields)
    merged.context = _fill(user.context, anon.context, policy.allowed_context_fields)
    merged.prev_gap_ms = _prev_gap(user, anon)
    merged.last_step_ms = max(user.last_step_ms, anon.last_step_ms)
    merged.step_gap_sum_ms, merged.step_gaps = _step_gaps(user, anon)
    return merged


def _min_set(a: int, b: int) -> int:
    """The earlier of two times where 0 means "not set"."""
    if not a:
        return b
    if not b:
        return a
    return min(a, b)


def _ordered_union(user: Profile, anon: Profile, name: str) -> list[str]:
    """Both profiles' step lists, each step once, the profile whose activity began first leading (pre-signup
    behaviour normally precedes the user's)."""
    anon_first = bool(anon.first_seen_ms) and (not user.first_seen_ms or anon.first_seen_ms < user.first_seen_ms)
    first, second = (anon, user) if anon_first else (user, anon)
    out = list(getattr(first, name))
    seen = set(out)
    out.extend(s for s in getattr(second, name) if s not in seen)
    return out


def _merge_ids(a: dict[int, int], b: dict[int, int], policy: ProfilePolicy) -> dict[int, int]:
    """Union of two dedup id maps, oldest first, pruned as :func:`udfs.dedup.remember` prunes: ids older than
    ``dedup_window_ms`` before the newest, then the oldest beyond ``dedup_max_ids``. An id in both keeps its
    later time."""
    if policy.dedup_window_ms <= 0 or policy.dedup_max_ids <= 0:
        return {}
    if not b:
        return dict(a)
    union = dict(a)
    for k, t in b.items():
        if union.get(k, t) <= t:
            union[k] = t
    items = sorted(union.items(), key=_by_time)  # stable: ties keep a's order, then b's
    cutoff = items[-1][1] - policy.dedup_window_ms
    kept = [kv for kv in items if kv[1] >= cutoff]
    return dict(kept[-policy.dedup_max_ids:])


def _merge_interest(a: dict[str, list[float]], b: dict[str, list[float]], half_life_ms: float) -> dict[str, list[float]]:
    """Per topic: both scores decayed to the later reference time, summed."""
    out = {topic: [score, at] for topic, (score, at) in a.items()}
    for topic, (score, at) in b.items():
        entry = out.get(topic)
        if entry is None:
            out[topic] = [score, at]
            continue
        ref = max(entry[1], at)
        entry[0] = decayed(entry[0], int(entry[1]), int(ref), half_life_ms) + decayed(score, int(at), int(ref), half_life_ms)
        entry[1] = ref
    return out


def _fill(mine: dict[str, str], theirs: dict[str, str], allowed: tuple[str, ...]) -> dict[str, str]:
    """``mine`` with gaps filled from ``theirs``, limited to the allow-list (minimization holds after a merge)."""
    out = {}
    for key in allowed:
        value = mine.get(key) or theirs.get(key)
        if value:
            out[key] = value
    return out


def _events(profile: Profile) -> int:
    """How many events were folded with consent (the counts), a lower bound on the events folded."""
    return sum(profile.counts.values())


def _prev_gap(user: Profile, anon: Profile) -> int:
    """The gap between the merged profile's latest event and the one before it: the later profile's own previous
    event, or the other profile's latest event if that is nearer."""
    later, other = (user, anon) if user.last_event_ms >= anon.last_event_ms else (anon, user)
    if not other.last_event_ms:
        return later.prev_gap_ms
    previous = other.last_event_ms
    if _events(later) >= 2:  # the later profile's own previous event is known: last - prev_gap
        previous = max(previous, later.last_event_ms - later.prev_gap_ms)
    return later.last_event_ms - previous


def _step_gaps(user: Profile, anon: Profile) -> tuple[int, int]:
    """(sum of gaps between step completions, number of gaps). The fold's sum telescopes to last - first step
    time, so each profile's first step is ``last_step_ms - step_gap_sum_ms``; when one profile's steps all come
    before the other's, the bridge between them is one more gap. Interleaved steps: the two sums, unbridged."""
    total = user.step_gap_sum_ms + anon.step_gap_sum_ms
    gaps = user.step_gaps + anon.step_gaps
    if not user.last_step_ms or not anon.last_step_ms:
        return total, gaps
    first_u = user.last_step_ms - user.step_gap_sum_ms
    first_a = anon.last_step_ms - anon.step_gap_sum_ms
    if anon.last_step_ms <= first_u:
        bridge = first_u - anon.last_step_ms
    elif user.last_step_ms <= first_a:
        bridge = first_a - user.last_step_ms
    else:
        return total, gaps
    return (total + bridge, gaps + 1) if bridge > 0 else (total, gaps)
