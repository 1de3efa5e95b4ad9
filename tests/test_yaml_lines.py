"""udfs.yaml_lines: YAML -> data + line of every key/item, and the problems it finds (worded by the callers)."""

from __future__ import annotations

import datetime as dt

import pytest

from udfs.rules.model import SCHEMA_PATH
from udfs.yaml_lines import YamlSourceError, compose_with_lines, schema_validator, where


def test_lines_by_json_path_and_nearest_ancestor():
    data, lines = compose_with_lines("a: 1\nb:\n  - x\n  - c: 2\n    no: 3\n")
    assert data == {"a": 1, "b": ["x", {"c": 2, "no": 3}]}  # `no:` stays a name, not a YAML 1.1 boolean
    assert lines.at(("a",)) == 1
    assert lines.at(("b", 1, "c")) == 4
    assert lines.at(("b", 1, "no")) == 5
    assert lines.at(("b", 1, "missing", 7)) == 4  # unknown path -> nearest known ancestor
    assert lines.at(()) == 1


def test_every_bad_key_is_reported_in_document_order():
    with pytest.raises(YamlSourceError) as caught:
        compose_with_lines("a: 1\nb:\n  c: 1\n  c: 2\n  ? [k]\n  : 3\na: 3\n")
    found = [(p.kind, p.line, p.path, p.key, p.first_line) for p in caught.value.problems]
    assert found == [
        ("duplicate-key", 4, ("b",), "c", 3),
        ("key-not-plain", 5, ("b",), "", 0),
        ("duplicate-key", 7, (), "a", 1),
    ]


@pytest.mark.parametrize("text, kind, line", [("", "empty", 1), ("# only a comment\n", "empty", 1),
                                              ("a: [1,\n", "syntax", 2), ("a: 1\n---\nb: 2\n", "syntax", 2)])
def test_empty_or_unparsable_text_is_one_problem(text: str, kind: str, line: int):
    with pytest.raises(YamlSourceError) as caught:
        compose_with_lines(text)
    [problem] = caught.value.problems
    assert (problem.kind, problem.line) == (kind, line)
    assert (problem.detail != "") == (kind == "syntax")


def test_scalars_pass_through_the_callers_conversion():
    data, _ = compose_with_lines("start: 2026-12-01\nn: 3\n", convert_scalar=lambda v: v.isoformat()
                                 if isinstance(v, dt.date) else v)
    assert data == {"start": "2026-12-01", "n": 3}


def test_where_and_cached_validator():
    assert where(()) == "top level"
    assert where(("layers", 0, "experiments", 1, "id")) == "layers[0].experiments[1].id"
    assert schema_validator(SCHEMA_PATH) is schema_validator(SCHEMA_PATH)


def test_a_tag_that_does_not_fit_its_text_is_a_yaml_problem_with_its_line():
    from udfs.experiment_arms import ExperimentConfigError, parse_experiments
    from udfs.rules.model import RuleSetError, parse_ruleset

    for parse, error in ((parse_ruleset, RuleSetError), (parse_experiments, ExperimentConfigError)):
        with pytest.raises(error, match=r"t.yaml:2: .*not valid YAML: cannot read .*int"):
            parse("version: x\na: !!int x\n", "t.yaml")
