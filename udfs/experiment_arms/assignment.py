"""Which arm of which experiment a user is in: deterministic, sticky, layer-exclusive. Pure functions; the job
keeps the returned map in keyed state and passes it back as ``sticky`` with the user's next event.

Buckets
    ``bucket(text) = int(sha256(text)[:8 bytes]) mod 10,000``. The arm of a user is decided by
    ``bucket(f"{salt}:{experiment_id}:{pseudo_user_id}")`` against the cumulative arm weights (arm *i* owns
    buckets ``[t[i-1], t[i])``). Same user, experiment and salt -> same arm on every TaskManager and after every
    restart, with no coordination.

Layers (the "overlapping experiments" design of Tang et al., Google, KDD 2010)
    Every layer has its own hash ``bucket(f"{layer_salt}:{layer_id}:{pseudo_user_id}")``. The experiments of a
    layer own disjoint ranges of it (sized by ``layer_share``, in file order), so a user falls in at most one
    experiment's range per layer; the arm hash is independent of the layer hash, so the arms split each range
    by their weights. Experiments of different layers use independent hashes and overlap freely. On top of the
    ranges, a user who already holds an arm of one experiment of a layer is never assigned to another
    experiment of that layer (ranges move when shares change; stickiness wins).

Stickiness
    An entry of ``sticky`` is kept as long as its experiment is defined in the file -- also after a weight change
    (already-assigned users never move), after ``stop`` and while ``enabled: false``. Such a stopped or disabled
    experiment keeps being *recorded* in decisions (so outcomes can still be joined) but it is not running, so its
    arm's changes no longer apply (:func:`changes_for`). An experiment removed from the file drops out of the map.
    Removing an arm from a running experiment leaves its users with that (now unknown) arm: it is recorded and
    changes nothing.

When a user is assigned
    On the first event at which the experiment runs (``start <= now < stop`` and enabled), the user is eligible
    (every ``eligible`` field of ``context`` matches; a missing field does not match) and in the experiment's
    layer range. An ineligible user is looked at again at later events (e.g. once a segment id is known).
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

from udfs.experiment_arms.config import BUCKETS, NO_CHANGES, ArmChanges, Experiment, ExperimentSet

_sha256 = hashlib.sha256


def bucket(text: str) -> int:
    """0..BUCKETS-1 from the first 8 bytes of sha256(text) (uniform; modulo bias ~5e-16)."""
    return int.from_bytes(_sha256(text.encode()).digest()[:8], "big") % BUCKETS


def arm_bucket(experiment: Experiment, pseudo_user_id: str) -> int:
    return bucket(f"{experiment.salt}:{experiment.id}:{pseudo_user_id}")


def layer_bucket(experiment: Experiment, pseudo_user_id: str) -> int:
    return bucket(f"{experiment.layer_salt}:{experiment.layer}:{pseudo_user_id}")


def is_eligible(experiment: Experiment, context: Mapping[str, Any]) -> bool:
    """Every eligibility field present in ``context`` with an accepted value (compared as text: 3 matches "3")."""
    for name, accepted in experiment.eligible:
        value = context.get(name)
        if value is None or str(value) not in accepted:
            return False
    return True


def assign(experiments: ExperimentSet, pseudo_user_id: str, context: Mapping[str, Any], now_ms: int,
           sticky: Mapping[str, str]) -> dict[str, str]:
    """The user's full ``experiment id -> arm`` map after an event at ``now_ms`` (see the module doc).

    Cheap when nothing new is assigned (only dict look-ups; hashes are computed only for a running experiment
    the user is eligible for and not yet in).
    """
    defined = experiments.experiments
    out = {exp_id: arm for exp_id, arm in sticky.items() if exp_id in defined}
    held_layers: set[str] | None = None
    for exp in defined.values():
        if exp.id in out or not exp.enabled or not exp.start_ms <= now_ms < exp.stop_ms:
            continue
        if exp.eligible and not is_eligible(exp, context):
            continue
        if held_layers is None:
            held_layers = {defined[e].layer for e in out}
        if exp.layer in held_layers:
            continue
        lo, hi = exp.layer_range
        if (lo, hi) != (0, BUCKETS) and not lo <= layer_bucket(exp, pseudo_user_id) < hi:
            continue
        out[exp.id] = exp.arm_for_bucket(arm_bucket(exp, pseudo_user_id))
        held_layers.add(exp.layer)
    return out


def changes_for(experiments: ExperimentSet, assignments: Mapping[str, str], now_ms: int) -> ArmChanges:
    """What the user's arms change at ``now_ms``: the merged changes of the arms of *running* experiments.

    ``control`` is true if any running arm is a control arm. Each other key is set by the experiments of at most
    one layer (checked when the file is loaded) and a user is in one experiment per layer, so at most one arm
    sets it; should a user's sticky map hold two (a file that moved experiments between layers), the arm first
    in that map wins (the order the user was assigned in, which is file order for experiments assigned together).
    """
    if not assignments:
        return NO_CHANGES
    found: list[ArmChanges] = []
    defined = experiments.experiments
    for exp_id, arm_id in assignments.items():
        exp = defined.get(exp_id)
        if exp is None or not exp.enabled or not exp.start_ms <= now_ms < exp.stop_ms:
            continue
        arm = exp.arm(arm_id)
        if arm is None or arm.changes is NO_CHANGES or arm.changes.is_empty():
            continue
        found.append(arm.changes)
    if not found:
        return NO_CHANGES
    if len(found) == 1:  # the usual case: one running arm changes something; its changes as they are
        return found[0]
    return ArmChanges(any(c.control for c in found),
                      next((c.rules_version for c in found if c.rules_version), None),
                      next((c.model_version for c in found if c.model_version), None),
                      next((c.content_variant for c in found if c.content_variant), None))


def measure_assign_us(experiments: ExperimentSet, n: int = 20_000) -> float:
    """Microseconds per :func:`assign` call for a user already in every running experiment (the common case)."""
    import timeit

    now = max((e.start_ms for e in experiments.experiments.values()), default=0)
    sticky = assign(experiments, "user-measure", {}, now, {})
    context = {"country": "DE", "device": "mobile", "segment_id": 2}
    timer = timeit.Timer(lambda: assign(experiments, "user-measure", context, now, sticky))
    return min(timer.repeat(repeat=5, number=n)) / n * 1e6
