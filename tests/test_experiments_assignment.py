"""Assignment: deterministic, proportional to the weights, sticky, layer-exclusive, eligible-only, time-bound,
and cheap."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from udfs.experiment_arms import (
    NO_CHANGES, ArmChanges, ExperimentSet, bucket, load_experiments, measure_assign_us, parse_experiments,
)
from jobs.config import REPO_ROOT

NOW = 1_796_083_200_000  # 2026-12-01T00:00Z
DAY = 86_400_000


def _set(body: str) -> ExperimentSet:
    return parse_experiments('version: "t-1"\n' + textwrap.dedent(body), "t.yaml")


def _two_arm(weights: tuple[float, float] = (50, 50), **extra: str) -> ExperimentSet:
    more = "".join(f"\n                {k}: {v}" for k, v in extra.items())
    return _set(f"""
        layers:
          - id: flow
            experiments:
              - id: pvc{more}
                arms:
                  - {{id: personalized, weight: {weights[0]}}}
                  - {{id: control, weight: {weights[1]}, control: true}}
        """)


def _assign_many(es: ExperimentSet, n: int, prefix: str = "u", context: dict | None = None,
                 sticky: dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, str]]:
    return {f"{prefix}{i}": es.assign(f"{prefix}{i}", context or {}, NOW, (sticky or {}).get(f"{prefix}{i}", {}))
            for i in range(n)}


def test_bucket_is_sha256_based_and_stable() -> None:
    assert bucket("onramp:pvc:user-1") == bucket("onramp:pvc:user-1")
    assert {bucket(f"x{i}") for i in range(2000)} != {bucket("x0")}
    assert all(0 <= bucket(f"y{i}") < 10_000 for i in range(1000))


def test_assignment_is_deterministic_and_independent_of_context_and_sticky_order() -> None:
    es = _two_arm()
    first = es.assign("user-42", {"country": "DE"}, NOW, {})
    assert first == es.assign("user-42", {"country": "US", "device": "mobile"}, NOW + DAY, {})
    assert first == _two_arm().assign("user-42", {}, NOW, {})  # a fresh parse of the same file
    assert set(first) == {"pvc"}


def test_arms_follow_the_weights_over_100k_users() -> None:
    es = _two_arm((70, 30))
    exp = es.experiment("pvc")
    from udfs.experiment_arms.assignment import arm_bucket

    counts = {"personalized": 0, "control": 0}
    for i in range(100_000):
        counts[exp.arm_for_bucket(arm_bucket(exp, f"user-{i}"))] += 1
    assert counts["personalized"] / 100_000 == pytest.approx(0.7, abs=0.005)  # sd 0.0014


def test_three_arms_and_the_salt_reshuffles() -> None:
    es = _set("""
        layers:
          - id: l
            experiments:
              - id: e
                arms: [{id: a, weight: 1}, {id: b, weight: 2}, {id: c, weight: 1, control: true}]
        """)
    arms = [v["e"] for v in _assign_many(es, 20_000).values()]
    assert arms.count("b") / len(arms) == pytest.approx(0.5, abs=0.015)
    assert arms.count("a") / len(arms) == pytest.approx(0.25, abs=0.015)
    salted = _two_arm(salt="other")
    plain = _two_arm()
    same = sum(salted.assign(f"u{i}", {}, NOW, {}) == plain.assign(f"u{i}", {}, NOW, {}) for i in range(4000))
    assert same / 4000 == pytest.approx(0.5, abs=0.04)  # a new salt is a new, independent randomization


def test_a_weight_change_never_moves_an_assigned_user() -> None:
    before = _assign_many(_two_arm((50, 50)), 3000)
    after_es = _two_arm((90, 10))
    after = _assign_many(after_es, 3000, sticky=before)
    assert after == before
    newcomers = [v["pvc"] for v in _assign_many(after_es, 5000, prefix="new").values()]
    assert newcomers.count("personalized") / 5000 == pytest.approx(0.9, abs=0.02)


def test_sticky_entries_are_kept_while_defined_and_dropped_when_the_experiment_is_removed() -> None:
    es = _two_arm()
    kept = es.assign("u1", {}, NOW, {"pvc": "control", "gone": "x"})
    assert kept == {"pvc": "control"}
    assert es.assign("u1", {}, NOW, {"pvc": "removed-arm"}) == {"pvc": "removed-arm"}
    assert es.changes_for({"pvc": "removed-arm"}, NOW) == NO_CHANGES


def test_layer_experiments_are_mutually_exclusive_and_layers_overlap_independently() -> None:
    es = _set("""
        layers:
          - id: flow
            experiments:
              - {id: a, arms: [{id: t}, {id: c, control: true}]}
              - {id: b, arms: [{id: t, rules_version: r2}, {id: c}]}
          - id: content
            experiments:
              - {id: x, arms: [{id: t, content_variant: v}, {id: c}]}
        """)
    assert es.experiment("a").layer_range == (0, 5000) and es.experiment("b").layer_range == (5000, 10000)
    result = _assign_many(es, 20_000)
    in_a = sum("a" in r for r in result.values())
    in_b = sum("b" in r for r in result.values())
    assert not any("a" in r and "b" in r for r in result.values())
    assert in_a + in_b == 20_000 and in_a / 20_000 == pytest.approx(0.5, abs=0.015)
    assert all("x" in r for r in result.values())  # the other layer takes everybody
    a_and_xt = sum(r.get("a") == "t" and r["x"] == "t" for r in result.values())
    assert a_and_xt / 20_000 == pytest.approx(0.125, abs=0.01)  # independent: 0.5 * 0.5 * 0.5


def test_a_user_holding_an_arm_of_a_layer_is_not_put_in_another_experiment_of_it() -> None:
    es = _set("""
        layers:
          - id: flow
            experiments:
              - {id: a, layer_share: 0.5, arms: [{id: t}, {id: c, control: true}]}
              - {id: b, layer_share: 0.5, arms: [{id: t}, {id: c, control: true}]}
        """)
    # shares changed since the user was assigned to b: their layer bucket may now fall in a's range
    for i in range(300):
        assert es.assign(f"u{i}", {}, NOW, {"b": "t"}) == {"b": "t"}


def test_eligibility_matches_listed_values_as_text_and_missing_fields_do_not_match() -> None:
    es = _two_arm(eligible="{country: [DE, FR], segment_id: [1, 2]}")
    assert es.assign("u", {"country": "DE", "segment_id": 2}, NOW, {}) != {}
    assert es.assign("u", {"country": "DE", "segment_id": "1"}, NOW, {}) != {}
    assert es.assign("u", {"country": "US", "segment_id": 2}, NOW, {}) == {}
    assert es.assign("u", {"country": "DE"}, NOW, {}) == {}
    assert es.assign("u", {"country": "FR", "segment_id": None}, NOW, {}) == {}
    # once assigned, a user who stops matching (a new segment) keeps the arm
    sticky = es.assign("u", {"country": "DE", "segment_id": 2}, NOW, {})
    assert es.assign("u", {"country": "DE", "segment_id": 3}, NOW, sticky) == sticky


def test_start_stop_and_enabled() -> None:
    es = _two_arm(start="2026-12-01", stop="2026-12-10")
    assert es.assign("u", {}, NOW - 1, {}) == {}
    sticky = es.assign("u", {}, NOW, {})
    assert sticky
    after_stop = NOW + 9 * DAY
    assert es.assign("new-user", {}, after_stop, {}) == {}
    assert es.assign("u", {}, after_stop, sticky) == sticky  # still recorded ...
    control = {"pvc": "control"}
    assert es.changes_for(control, NOW) == ArmChanges(control=True)
    assert es.changes_for(control, after_stop) == NO_CHANGES  # ... but no longer changes anything
    disabled = _two_arm(enabled="false")
    assert disabled.assign("u", {}, NOW, {}) == {}
    assert disabled.changes_for(control, NOW) == NO_CHANGES and disabled.assign("u", {}, NOW, control) == control


def test_changes_merge_across_layers() -> None:
    es = _set("""
        layers:
          - id: flow
            experiments:
              - {id: a, arms: [{id: t, rules_version: r2}, {id: c, control: true}]}
          - id: content
            experiments:
              - {id: x, arms: [{id: t, content_variant: v}, {id: c}]}
        """)
    assert es.changes_for({}, NOW) is NO_CHANGES
    assert es.changes_for({"a": "t", "x": "t"}, NOW) == ArmChanges(rules_version="r2", content_variant="v")
    assert es.changes_for({"a": "c", "x": "t"}, NOW) == ArmChanges(control=True, content_variant="v")
    assert es.changes_for({"a": "t", "x": "c"}, NOW) == ArmChanges(rules_version="r2")


def test_assign_is_cheap_when_nothing_new_is_assigned() -> None:
    shipped = load_experiments(REPO_ROOT / "rules" / "experiments.yaml")
    mv = dataclasses.replace(shipped.experiments["tone-and-layout"], enabled=True, eligible=())
    three = _set("""
        layers:
          - id: flow
            experiments:
              - {id: a, layer_share: 0.5, arms: [{id: t}, {id: c, control: true}]}
              - {id: b, layer_share: 0.5, eligible: {device: desktop}, arms: [{id: t}, {id: c, control: true}]}
        """)
    three = dataclasses.replace(three, experiments={**three.experiments, mv.id: mv})
    us = measure_assign_us(three)
    print(f"assign(): {us:.2f} us per call with 3 experiments, nothing new assigned")
    assert us < 5.0
