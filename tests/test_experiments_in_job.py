"""Experiments in the decision path (udfs/personalizer.py): assignment sticky in the profile, recorded in every
decision, the control arm getting the default flow, content variants applied, and arms the job cannot honour
refused at submission."""

from __future__ import annotations

from collections import Counter

import pytest

from jobs.config import load_config
from jobs.personalize import resolve_experiments
from udfs.experiment_arms import ExperimentConfigError, parse_experiments
from udfs.personalizer import Personalizer
from udfs.profile_state import Profile

from tests.conftest import make_event

TWO_ARMS = """
version: "t-1"
layers:
  - id: flow
    experiments:
      - id: pvc
        salt: s1
        arms:
          - {id: personalized, weight: 50}
          - {id: control, weight: 50, control: true}
  - id: content
    experiments:
      - id: tone
        salt: s2
        arms:
          - {id: formal, weight: 50}
          - {id: friendly, weight: 50, content_variant: friendly}
"""


class FixedScorer:
    version = "m-test"

    def score(self, features):
        from udfs.model_bundle import Scores

        return Scores(segment_id=1, segment_name="explorer", churn_risk=0.2)


def _consenting(user: str) -> dict:
    event = make_event("signup", user_id=user)
    event["consent"] = {"personalization": True, "analytics": True, "marketing": False}
    return event


def test_arms_are_recorded_sticky_and_applied():
    personalizer = Personalizer(FixedScorer(), 3_600_000.0, experiments=parse_experiments(TWO_ARMS, "t.yaml"))
    arms = Counter()
    for i in range(400):
        profile, event = Profile(), _consenting(f"u-{i}")
        personalizer.fold(profile, event)
        decision = personalizer.decide(profile, event, subject=f"pseudo-{i}")
        assert decision["experiments"] == profile.experiments and set(profile.experiments) == {"pvc", "tone"}
        arms[decision["experiments"]["pvc"]] += 1
        if decision["experiments"]["pvc"] == "control":
            assert not decision["personalized"] and any(r.startswith("experiment_control") for r in decision["reasons"])
        else:
            assert decision["personalized"]
        if decision["experiments"]["tone"] == "friendly":
            assert decision["content_variant"] == "friendly"
        # sticky: the next event keeps the arms, whatever the weights say now
        again = make_event("page_view", user_id=f"u-{i}")
        personalizer.fold(profile, again)
        assert personalizer.decide(profile, again, subject=f"pseudo-{i}")["experiments"] == decision["experiments"]
    assert 150 < arms["control"] < 250  # 50/50 by hash


def test_a_weight_change_moves_nobody_already_assigned():
    before = Personalizer(None, 3_600_000.0, experiments=parse_experiments(TWO_ARMS, "t.yaml"))
    after = Personalizer(None, 3_600_000.0, experiments=parse_experiments(
        TWO_ARMS.replace("{id: personalized, weight: 50}", "{id: personalized, weight: 5}"), "t.yaml"))
    for i in range(100):
        profile, event = Profile(), _consenting(f"u-{i}")
        before.fold(profile, event)
        first = before.decide(profile, event, subject=f"p-{i}")["experiments"]
        assert after.decide(profile, event, subject=f"p-{i}")["experiments"] == first


def test_arms_pin_rule_sets_and_bundles_that_ship_with_the_job(tmp_path):
    import shutil

    from jobs.config import REPO_ROOT

    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    shipped = (REPO_ROOT / "rules" / "onboarding.yaml").read_text()
    (rules_dir / "onboarding.yaml").write_text(shipped)
    import re
    compact = re.sub(r'(?m)^version: .*$', 'version: "2026.12.01-compact"', shipped)
    (rules_dir / "compact.yaml").write_text(compact)
    shutil.copytree(REPO_ROOT / "rules" / "templates", rules_dir / "templates")
    path = rules_dir / "experiments.yaml"
    path.write_text(TWO_ARMS.replace("content_variant: friendly", "rules_version: 2026.12.01-compact"))
    cfg = load_config({"experiments_file": str(path), "rules_file": str(rules_dir / "onboarding.yaml"),
                       "model_dir": str(tmp_path / "models")}, environ={})
    text, followed, assets = resolve_experiments(cfg, rules_version="2026.11.30-1", model_version="m-1")
    assert followed == str(path.resolve()) and set(assets.rules) == {"2026.12.01-compact"} and not assets.bundles

    path.write_text(TWO_ARMS.replace("content_variant: friendly", "rules_version: nowhere-1"))
    with pytest.raises(ExperimentConfigError, match="pins rules_version nowhere-1, but no rule set"):
        resolve_experiments(cfg, rules_version="2026.11.30-1", model_version="m-1")
    path.write_text(TWO_ARMS.replace("content_variant: friendly", "model_version: m-missing"))
    with pytest.raises(ExperimentConfigError, match="pins model_version m-missing, but .* has no such bundle"):
        resolve_experiments(cfg, rules_version="2026.11.30-1", model_version="m-1")


def test_an_arm_decides_with_the_rule_set_and_model_it_pins():
    from udfs.rules.compiler import compile_rules_text
    from jobs.config import REPO_ROOT

    class ArmScorer(FixedScorer):
        version = "m-arm"

    shipped = (REPO_ROOT / "rules" / "onboarding.yaml").read_text()
    base = compile_rules_text(shipped, "onboarding.yaml")
    arm_rules = compile_rules_text(shipped.replace(f'version: "{base.version}"', 'version: "r-arm"'), "arm.yaml")
    experiments = parse_experiments(TWO_ARMS.replace("content_variant: friendly",
                                                     "rules_version: r-arm, model_version: m-arm"), "t.yaml")
    personalizer = Personalizer(FixedScorer(), 3_600_000.0, base, experiments=experiments,
                                arm_rules={"r-arm": arm_rules}, arm_scorers={"m-arm": ArmScorer()})
    seen = set()
    for i in range(200):
        profile, event = Profile(), _consenting(f"u-{i}")
        personalizer.fold(profile, event)
        d = personalizer.decide(profile, event, subject=f"s-{i}")
        arm = d["experiments"]["tone"]
        want = ("r-arm", "m-arm") if arm == "friendly" else (base.version, "m-test")
        assert (d["rules_version"], d["model_version"]) == want
        assert not any(r.startswith("experiment_arm_not_applied") for r in d["reasons"])
        seen.add(arm)
    assert seen == {"formal", "friendly"}


def test_the_running_function_follows_the_experiments_file(tmp_path, monkeypatch):
    from pathlib import Path

    from pyflink.common import Row

    from udfs import flink_functions
    from udfs.avro_codec import decision_codec, event_codec
    from udfs.rules_watch import RulesWatcher
    from tests.test_personalize_function import FakeContext, _function

    path = tmp_path / "experiments.yaml"
    path.write_text(TWO_ARMS)
    fn = _function()
    fn.experiments_watcher = RulesWatcher(Path(path), 1, None, parse_experiments, label="experiments")
    from tests.conftest import NOW_MS

    clock = iter(range(NOW_MS, NOW_MS + 10_000, 100))
    monkeypatch.setattr(flink_functions, "_now_ms", lambda: next(clock))
    (first,) = fn.process_element(Row(event_codec().encode(_consenting("u-1")), "events", 0, 0), FakeContext("p-1"))
    assert fn.personalizer.experiments.version == "t-1" and fn.experiments_reloads.count == 1
    assert set(decision_codec().decode(first)["experiments"]) == {"pvc", "tone"}
    path.write_text(TWO_ARMS.replace('version: "t-1"', 'version: "t-2"').replace("salt: s2", "salt: s3"))
    import os
    os.utime(path, ns=(1, 2))  # a new stamp even within the file system's time resolution
    list(fn.process_element(Row(event_codec().encode(_consenting("u-2")), "events", 0, 1), FakeContext("p-2")))
    assert fn.personalizer.experiments.version == "t-2" and fn.experiments_reloads.count == 2
    path.write_text("version: broken\nlayers: [")
    os.utime(path, ns=(3, 4))
    list(fn.process_element(Row(event_codec().encode(_consenting("u-3")), "events", 0, 2), FakeContext("p-3")))
    assert fn.personalizer.experiments.version == "t-2" and fn.experiments_refusals.count == 1
