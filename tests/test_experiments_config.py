"""Experiment files: the shipped example, the multivariate crossing, and every validation error with a location
and a hint."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from jobs.config import REPO_ROOT, ConfigError, load_config
from udfs.experiment_arms import (
    ArmChanges, ExperimentConfigError, load_experiments, parse_experiments,
)

SHIPPED = REPO_ROOT / "rules" / "experiments.yaml"


def _yaml(body: str) -> str:
    return 'version: "t-1"\n' + textwrap.dedent(body)


def _problems(text: str) -> list[str]:
    with pytest.raises(ExperimentConfigError) as info:
        parse_experiments(text, "exp.yaml")
    return info.value.problems


def test_shipped_file_defines_personalization_vs_control_and_a_disabled_multivariate_test() -> None:
    experiments = load_experiments(SHIPPED)
    assert experiments.version and experiments.source == str(SHIPPED)
    pvc = experiments.experiment("personalization-vs-control")
    assert [a.id for a in pvc.arms] == ["personalized", "control"]
    assert pvc.baseline == "control" and pvc.weight_share() == {"personalized": 0.5, "control": 0.5}
    assert pvc.arm("control").changes == ArmChanges(control=True)
    assert pvc.arm("personalized").changes.is_empty() and pvc.eligible == () and pvc.enabled
    mv = experiments.experiment("tone-and-layout")
    assert not mv.enabled and mv.layer != pvc.layer
    assert [a.id for a in mv.arms] == ["tone=formal|layout=classic", "tone=formal|layout=compact",
                                       "tone=friendly|layout=classic", "tone=friendly|layout=compact"]
    assert mv.baseline == "tone=formal|layout=classic"
    assert mv.arm("tone=friendly|layout=compact").changes == ArmChanges(
        rules_version="2026.12.01-compact", content_variant="friendly")


def test_multivariate_weights_default_equal_and_can_be_set_per_combination() -> None:
    text = _yaml("""
        layers:
          - id: content
            experiments:
              - id: mv
                baseline: a=x|b=u
                factors:
                  a: [{level: x}, {level: y, content_variant: y}]
                  b: [{level: u}, {level: v, model_version: m-2}, {level: w, model_version: m-3}]
                arm_weights: {"a=y|b=w": 3}
        """)
    mv = parse_experiments(text).experiment("mv")
    assert len(mv.arms) == 6 and mv.factors == (("a", ("x", "y")), ("b", ("u", "v", "w")))
    shares = mv.weight_share()
    assert shares["a=y|b=w"] == pytest.approx(3 / 8) and shares["a=x|b=u"] == pytest.approx(1 / 8)
    assert mv.arm("a=y|b=v").levels == (("a", "y"), ("b", "v"))


def test_timestamps_quoted_or_not_and_dates_are_utc() -> None:
    text = _yaml("""
        layers:
          - id: l
            experiments:
              - id: e
                start: 2026-12-01
                stop: "2026-12-02T12:00:00+01:00"
                arms: [{id: t}, {id: c, control: true}]
        """)
    e = parse_experiments(text).experiment("e")
    assert e.start_ms == 1_796_083_200_000
    assert e.stop_ms == 1_796_083_200_000 + 35 * 3_600_000


@pytest.mark.parametrize(("body", "expected"), [
    ("arms: [{id: t, weight: 0}, {id: c, control: true}]", "weight must be > 0"),
    ("arms: [{id: t, weight: -2}, {id: c, control: true}]", "weight must be > 0"),
    ("arms: [{id: t}, {id: t, control: true}]", "arm id 't' is already used"),
    ("arms: [{id: t}, {id: c}]", "cannot tell the baseline arm"),
    ("arms: [{id: t, control: true}, {id: c, control: true}]", "2 arms have control: true"),
    ("arms: [{id: t, rules_version: a}, {id: c, rules_version: b}]", "name it with baseline:"),
    ("baseline: nope\n  arms: [{id: t}, {id: c, control: true}]", "baseline 'nope' is not an arm"),
    ("arms: [{id: t, colour: red}, {id: c, control: true}]", "unknown key 'colour'"),
    ("arms: [{id: t, control: true, rules_version: r}, {id: c}]", "cannot also set rules_version"),
    ("arms: [{id: t, control: false}, {id: c, control: true}]", "control can only be true"),
    ("arms: [{id: t}]", "at least two arms"),
    ("start: 2026-12-02\n  stop: 2026-12-01\n  arms: [{id: t}, {id: c, control: true}]", "must be after start"),
    ("start: next tuesday\n  arms: [{id: t}, {id: c, control: true}]", "cannot read 'next tuesday'"),
    ("eligible: {planet: mars}\n  arms: [{id: t}, {id: c, control: true}]", "eligibility can test: segment_id"),
    ("eligible: {country: {de: 1}}\n  arms: [{id: t}, {id: c, control: true}]", "a value or a list of values"),
    ("arms: [{id: t}, {id: c, control: true}]\n  factors: {a: [{level: x}, {level: y}]}", "either 'arms' or 'factors'"),
    ("description: nothing", "missing 'arms'"),
    ("factors: {a: [{level: x}, {level: x, content_variant: v}]}", "level 'x' appears twice"),
    ("factors: {a: [{level: x}, {level: y, content_variant: v}], b: [{level: u}, {level: w, content_variant: z}]}",
     "both set content_variant"),
    ("factors: {a: [{level: x}, {level: y}]}\n  arm_weights: {'a=z': 2}", "not a combination of the factors"),
    ("factors: {a: [{level: x}]}", "at least two levels"),
    ("id: Upper\n  arms: [{id: t}, {id: c, control: true}]", "invalid value 'Upper'"),
])
def test_invalid_experiment_is_refused_with_location_and_hint(body: str, expected: str) -> None:
    lines = body.split("\n  ")
    first = lines[0] if lines[0].startswith("id:") else "id: e"
    rest = lines[1:] if lines[0].startswith("id:") else lines
    experiment = "\n".join(["- " + first] + ["  " + r for r in rest])
    text = _yaml("layers:\n  - id: main\n    experiments:\n" + textwrap.indent(experiment, "      ") + "\n")
    problems = _problems(text)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith("exp.yaml:") for p in problems)
    assert any("layers[0].experiments[0]" in p for p in problems), problems


def test_problem_names_the_line_and_all_problems_are_reported_at_once() -> None:
    text = _yaml("""
        layers:
          - id: l
            experiments:
              - id: e
                arms:
                  - {id: t, weight: 0}
                  - {id: c, control: true}
              - id: e
                arms: [{id: t}, {id: c, control: true}]
        """)
    problems = _problems(text)
    assert len(problems) == 2
    assert problems[0].startswith("exp.yaml:8: layers[0].experiments[0].arms[0].weight: weight must be > 0")
    assert "experiment id 'e' is already defined" in problems[1]


def test_layer_shares_must_fit_and_layers_and_change_keys_are_exclusive() -> None:
    text = _yaml("""
        layers:
          - id: l
            experiments:
              - {id: a, layer_share: 0.7, arms: [{id: t, rules_version: r}, {id: c, control: true}]}
              - {id: b, layer_share: 0.5, arms: [{id: t}, {id: c, control: true}]}
          - id: m
            experiments:
              - {id: c, arms: [{id: t, rules_version: s}, {id: c, control: true}]}
          - id: l
            experiments: []
        """)
    problems = "\n".join(_problems(text))
    assert "add up to 1.2 > 1" in problems
    assert "layer id 'l' is already used" in problems
    assert "both set rules_version" in problems


def test_layer_ranges_are_disjoint_in_file_order() -> None:
    text = _yaml("""
        layers:
          - id: l
            experiments:
              - {id: a, layer_share: 0.2, arms: [{id: t}, {id: c, control: true}]}
              - {id: b, arms: [{id: t}, {id: c, control: true}]}
              - {id: c, arms: [{id: t}, {id: c, control: true}]}
        """)
    es = parse_experiments(text)
    assert [es.experiment(e).layer_range for e in "abc"] == [(0, 2000), (2000, 6000), (6000, 10000)]


@pytest.mark.parametrize(("text", "expected"), [
    ("", "the file is empty"),
    ("version: 1\nlayers: []\n", "version: expected a string, got 1; quote it"),
    ("layers: []\n", "missing required key 'version'"),
    ('version: "1"\nlayers: [\n', "not valid YAML"),
    ('version: "1"\nversion: "2"\nlayers: []\n', "duplicate key 'version'"),
    ('version: "1"\nlayers: []\ncolour: red\n', "unknown key 'colour'"),
])
def test_file_level_errors(text: str, expected: str) -> None:
    problems = _problems(text)
    assert any(expected in p for p in problems), problems


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ExperimentConfigError, match="cannot read experiments file"):
        load_experiments(tmp_path / "nope.yaml")


def test_onramp_config_checks_the_experiments_file(tmp_path: Path) -> None:
    assert Path(load_config(environ={}).experiments_file) == SHIPPED
    assert load_config({"experiments_file": "none"}, environ={}).experiments_file == "none"
    with pytest.raises(ConfigError, match="experiments_file"):
        load_config({"experiments_file": str(tmp_path / "missing.yaml")}, environ={})
    with pytest.raises(ConfigError, match="experiments_reload_interval_ms"):
        load_config({"experiments_reload_interval_ms": -1}, environ={})


def test_cli_lint_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.cli import main

    assert main(["experiments", "lint", str(SHIPPED)]) == 0
    assert "personalization-vs-control (running" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(_yaml("layers:\n  - id: l\n    experiments:\n      - {id: e, arms: [{id: t}, {id: c}]}\n"))
    assert main(["experiments", "lint", str(bad)]) == 1
    assert f"{bad}:5: layers[0].experiments[0]: cannot tell the baseline arm" in capsys.readouterr().out
