"""`rules lint`'s semantic checks on raw rule tables: unreachable rules and ambiguous ties."""

from __future__ import annotations

from udfs.rules.lint import Atom, can_hold_together, conjunction, implies, table_findings


def _rule(rid, when=None, step="s", priority=0):
    rule = {"id": rid, "priority": priority, "description": rid, "then": {"step": step}}
    if when is not None:
        rule["when"] = when
    return rule


def _codes(rules):
    lines = {r["id"]: n for n, r in enumerate(rules, start=10)}
    return [(f.code, f.line, f.severity) for f in table_findings("r.yaml", "main", rules, lines)]


def test_conjunction_flattens_all_and_skips_any_not():
    assert conjunction({"a": {"gt": 1}, "all": [{"b": {"in": ["x"]}}]}) == [Atom("a", "gt", 1), Atom("b", "in", ("x",))]
    assert conjunction(None) == []
    assert conjunction({"any": [{"a": {"eq": 1}}]}) is None
    assert conjunction({"not": {"a": {"eq": 1}}}) is None


def test_rule_after_an_unconditional_one_is_unreachable():
    assert _codes([_rule("catch-all"), _rule("late", {"a": {"gt": 1}})]) == [("unreachable", 11, "error")]


def test_rule_implied_by_an_earlier_one_is_unreachable_but_priority_saves_it():
    broad = _rule("broad", {"churn_risk": {"gt": 0.7}}, step="call")
    narrow = _rule("narrow", {"churn_risk": {"gt": 0.7}, "country": {"in": ["DE"]}}, step="tour")
    assert ("unreachable", 11, "error") in _codes([broad, narrow])
    narrow["priority"] = 5
    assert _codes([broad, narrow]) == []


def test_overlap_at_equal_priority_with_different_outcomes_is_a_warning():
    a = _rule("eu", {"country": {"in": ["DE", "FR"]}}, step="tour")
    b = _rule("risky", {"churn_risk": {"gt": 0.7}}, step="call")
    assert _codes([a, b]) == [("overlap", 11, "warning")]
    b["then"] = dict(a["then"])  # same outcome: no ambiguity
    assert _codes([a, b]) == []


def test_exclusive_conditions_do_not_overlap():
    low = _rule("low", {"churn_risk": {"lte": 0.3}}, step="a")
    high = _rule("high", {"churn_risk": {"gt": 0.3}}, step="b")
    assert _codes([low, high]) == []
    de = _rule("de", {"country": {"in": ["DE"]}}, step="a")
    fr = _rule("fr", {"country": {"eq": "FR"}}, step="b")
    assert _codes([de, fr]) == []


def test_satisfiability_helpers():
    assert not can_hold_together([Atom("x", "between", (1, 2))], [Atom("x", "gt", 2)])
    assert can_hold_together([Atom("x", "between", (1, 2))], [Atom("x", "gte", 2)])
    assert not can_hold_together([Atom("c", "in", ("DE",))], [Atom("c", "not_in", ("DE",))])
    assert not can_hold_together([Atom("t", "present", True)], [Atom("t", "present", False)])
    assert implies([Atom("a", "eq", 1), Atom("b", "eq", 2)], [Atom("a", "eq", 1)])
    assert not implies([Atom("a", "eq", 1)], [Atom("a", "eq", 1), Atom("b", "eq", 2)])


def test_semantic_findings_name_the_rule_line():
    from udfs.rules.lint import semantic_findings

    text = """ruleset: t
version: "1"
changelog: c
default: {step: none}
tables:
  main:
    rules:
      - id: always
        description: catch-all
        then: {step: welcome_tour}
      - id: never
        description: dead
        when: {churn_risk: {gt: 0.5}}
        then: {step: concierge_call}
"""
    findings = semantic_findings(text, "t.yaml")
    assert [(f.code, f.line) for f in findings] == [("unreachable", 11)]
    assert str(findings[0]).startswith("t.yaml:11: error: unreachable:")
