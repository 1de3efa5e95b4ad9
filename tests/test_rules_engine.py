"""YAML rule sets: loading with file:line findings, every operator, tables and hand-overs, reasons, the shipped
example, and parity of the generated code with the reference semantics."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from udfs.next_step import choose_step
from udfs.onboarding_catalog import ONBOARDING_STEPS, TOPICS
from udfs.profile_state import Profile, apply_event
from udfs.rules import (
    RULE_FIELDS, CompiledRuleSet, FieldType, RuleSetError, compile_rules_text, compile_ruleset, load_compiled, measure_evaluation_us,
    parse_ruleset, rule_context,
)
from udfs.rules.compiler import explain, holds
from udfs.rules.model import SCHEMA_PATH

from tests.conftest import NOW_MS, make_event

EXAMPLE = Path(__file__).resolve().parents[1] / "rules" / "onboarding.yaml"
HIT, MISS = "hit_step", "miss_step"


def ctx(**values: Any) -> dict[str, Any]:
    """A context with every field missing except ``values``."""
    out: dict[str, Any] = dict.fromkeys(RULE_FIELDS)
    out.update(values)
    return out


def ruleset_text(main_rules: list[dict], **extra: Any) -> str:
    doc: dict[str, Any] = {
        "ruleset": "t",
        "version": "1",
        "changelog": "test",
        "default": {"step": MISS},
        "tables": {"main": {"rules": main_rules}},
    }
    doc.update(extra)
    return yaml.safe_dump(doc, sort_keys=False)


def compiled(main_rules: list[dict], **extra: Any) -> CompiledRuleSet:
    return compile_ruleset(parse_ruleset(ruleset_text(main_rules, **extra), "t.yaml"))


def rule(rule_id: str, when: dict | None = None, step: str = HIT, **more: Any) -> dict:
    out: dict[str, Any] = {"id": rule_id, "description": "test rule"}
    if when is not None:
        out["when"] = when
    out["then"] = {"step": step, **more.pop("then", {})}
    out.update(more)
    return out


def findings_of(text: str, source: str = "bad.yaml") -> list[str]:
    with pytest.raises(RuleSetError) as info:
        compile_rules_text(textwrap.dedent(text), source)
    return [str(f) for f in info.value.findings]


# --------------------------------------------------------------------------------------------- the context


def test_rule_context_provides_exactly_the_rule_fields():
    assert set(rule_context(Profile(), None, None, None, None)) == set(RULE_FIELDS)


def test_rule_context_from_a_real_profile():
    from dataclasses import dataclass

    @dataclass
    class Scores:
        segment_id: int = 3
        segment_name: str = "integrator"
        churn_risk: float = 0.25

    profile = Profile()
    signup = make_event("signup")
    signup["demographic"] = {"country": "DE", "age_band": "25-34", "occupation": None}
    signup["context"] = {"device": "mobile", "referral_source": "ads", "locale": "de-DE", "session_id": "s"}
    signup["consent"] = {"personalization": True, "analytics": False, "marketing": False}
    for event in (signup, make_event("session_start"), make_event("step_completed", step_id="welcome_tour"),
                  make_event("step_skipped", step_id="profile_setup")):
        apply_event(profile, event, 3_600_000.0)
    c = rule_context(profile, [0.5] * 22, Scores(), "analytics", signup)
    assert c["country"] == "DE" and c["locale"] == "de-DE" and c["language"] == "de" and c["device"] == "mobile"
    assert c["occupation"] is None and c["event_type"] == "signup" and c["events"] == 4 and c["sessions"] == 1
    assert c["steps_done"] == ["welcome_tour"] and c["steps_skipped"] == ["profile_setup"]
    assert c["remaining_steps"] == list(ONBOARDING_STEPS[1:]) and c["steps_left"] == 5
    assert c["next_step"] == "profile_setup" and c["next_not_skipped_step"] == "connect_data"
    assert c["churn_risk"] == 0.25 and c["segment_name"] == "integrator" and c["top_topic"] == "analytics"
    assert c["consent_personalization"] is True and c["onboarding_completed"] is False
    checks = {FieldType.NUMBER: (int, float), FieldType.STRING: str, FieldType.BOOL: bool, FieldType.STRING_LIST: list}
    for name, kind in RULE_FIELDS.items():
        assert c[name] is None or isinstance(c[name], checks[kind]), name


def test_rule_context_when_everything_is_done_or_skipped():
    c = rule_context(Profile(steps_done=list(ONBOARDING_STEPS)), None, None, None, None)
    assert c["next_step"] == c["next_not_skipped_step"] == "none" and c["steps_left"] == 0
    c = rule_context(Profile(steps_skipped=list(ONBOARDING_STEPS)), None, None, None, None)
    assert c["next_not_skipped_step"] == "welcome_tour"  # all skipped: back to catalog order, like builtin-1
    assert c["churn_risk"] is None and c["segment_name"] is None and c["log_events"] is None


# --------------------------------------------------------------------------------------------- operators

OPERATOR_CASES = [
    ("churn_risk", "eq", 0.5, [(0.5, True), (0.6, False), (None, False)]),
    ("segment_name", "eq", "casual", [("casual", True), ("pro", False), (None, False)]),
    ("consent_personalization", "eq", True, [(True, True), (False, False), (None, False)]),
    ("segment_name", "ne", "casual", [("pro", True), ("casual", False), (None, False)]),
    ("churn_risk", "lt", 0.5, [(0.4, True), (0.5, False), (None, False)]),
    ("churn_risk", "lte", 0.5, [(0.5, True), (0.6, False), (None, False)]),
    ("churn_risk", "gt", 0.5, [(0.6, True), (0.5, False), (None, False)]),
    ("churn_risk", "gte", 0.5, [(0.5, True), (0.4, False), (None, False)]),
    ("sessions", "between", [2, 4], [(2, True), (4, True), (3, True), (1, False), (5, False), (None, False)]),
    ("country", "in", ["DE", "FR"], [("DE", True), ("US", False), (None, False)]),
    ("sessions", "in", [1, 2], [(2, True), (3, False), (None, False)]),
    ("country", "not_in", ["DE", "FR"], [("US", True), ("DE", False), (None, False)]),
    ("steps_done", "contains", "welcome_tour", [(["welcome_tour"], True), (["x"], False), ([], False), (None, False)]),
    ("segment_name", "present", True, [("x", True), ("", False), (None, False)]),
    ("steps_done", "present", True, [(["a"], True), ([], False), (None, False)]),
    ("sessions", "present", True, [(0, True), (None, False)]),
    ("consent_marketing", "present", True, [(False, True), (None, False)]),
    ("segment_name", "present", False, [(None, True), ("", True), ("x", False)]),
]


@pytest.mark.parametrize(
    "field, op, const, value, expected",
    [(f, o, k, v, e) for f, o, k, cases in OPERATOR_CASES for v, e in cases],
)
def test_operator(field, op, const, value, expected):
    rules = compiled([rule("r", {field: {op: const}})])
    choice = rules.evaluate(ctx(**{field: value}))
    assert choice.step_id == (HIT if expected else MISS)
    assert holds(rules.ruleset.tables["main"].rules[0].when, ctx(**{field: value})) is expected


def test_several_ops_on_one_field_and_several_fields_all_must_hold():
    rules = compiled([rule("r", {"churn_risk": {"gt": 0.2, "lt": 0.8}, "country": {"eq": "DE"}})])
    assert rules.evaluate(ctx(churn_risk=0.5, country="DE")).step_id == HIT
    assert rules.evaluate(ctx(churn_risk=0.9, country="DE")).step_id == MISS
    assert rules.evaluate(ctx(churn_risk=0.5, country="FR")).step_id == MISS


def test_all_any_not_nesting():
    when = {
        "any": [
            {"all": [{"country": {"in": ["DE", "AT"]}}, {"not": {"device": {"eq": "mobile"}}}]},
            {"not": {"any": [{"sessions": {"gte": 1}}, {"churn_risk": {"present": True}}]}},
        ]
    }
    rules = compiled([rule("r", when)])
    assert rules.evaluate(ctx(country="DE", device="desktop", sessions=3)).step_id == HIT
    assert rules.evaluate(ctx(country="DE", device="mobile", sessions=3)).step_id == MISS
    assert rules.evaluate(ctx(country="US", sessions=0)).step_id == HIT  # second branch: no session, no churn
    assert rules.evaluate(ctx(country="US", sessions=0, churn_risk=0.1)).step_id == MISS
    reason = rules.evaluate(ctx(country="DE", device="desktop", sessions=3)).reasons[0]
    assert reason == "r: country DE in [DE, AT] and not (device desktop = mobile)"


def test_generated_code_matches_the_reference_semantics_on_random_contexts():
    """Every operator through the generated code and through `holds` must agree, nested in all/any/not."""
    leaves = [{f: {o: k}} for f, o, k, _ in OPERATOR_CASES]
    values = {f: [v for v, _ in cases] for f, _, _, cases in OPERATOR_CASES}
    rng = random.Random(7)

    def random_condition(depth: int) -> dict:
        if depth == 0 or rng.random() < 0.3:
            return rng.choice(leaves)
        kind = rng.choice(["all", "any", "not"])
        if kind == "not":
            return {"not": random_condition(depth - 1)}
        return {kind: [random_condition(depth - 1) for _ in range(rng.randint(1, 3))]}

    conditions = [random_condition(3) for _ in range(40)]
    rules = compiled([rule(f"r{i}", c, step=f"s{i}") for i, c in enumerate(conditions)])
    model_rules = rules.ruleset.tables["main"].rules
    for _ in range(300):
        c = ctx(**{f: rng.choice(vs) for f, vs in values.items()})
        expected = next((r.then.step for r in model_rules if holds(r.when, c)), MISS)
        assert rules.evaluate(c).step_id == expected


# --------------------------------------------------------------------------------------------- ordering, tables


def test_priority_decides_and_ties_keep_file_order():
    rules = compiled([
        rule("low", step="low"),
        rule("tie-first", step="tie_first", priority=5),
        rule("tie-second", step="tie_second", priority=5),
        rule("high", {"churn_risk": {"gt": 0.5}}, step="high", priority=9),
    ])
    assert rules.evaluate(ctx(churn_risk=0.9)).step_id == "high"
    choice = rules.evaluate(ctx(churn_risk=0.1))
    assert choice.step_id == "tie_first" and choice.reasons == ["tie-first: always"]


def _with_sub(sub_default: dict | None) -> CompiledRuleSet:
    to_sub = {"id": "to-sub", "description": "d", "priority": 10, "when": {"segment_name": {"present": True}},
              "then": {"table": "sub"}}
    sub: dict[str, Any] = {"rules": [rule("pro-sub", {"segment_name": {"eq": "pro"}}, step="pro_step")]}
    if sub_default is not None:
        sub["default"] = sub_default
    text = ruleset_text([to_sub, rule("fallback", {"sessions": {"gte": 1}}, step="fallback")])
    doc = yaml.safe_load(text)
    doc["tables"]["sub"] = sub
    return compile_ruleset(parse_ruleset(yaml.safe_dump(doc, sort_keys=False), "t.yaml"))


def test_hand_over_to_a_sub_table():
    choice = _with_sub(None).evaluate(ctx(segment_name="pro", sessions=2))
    assert choice.step_id == "pro_step"
    assert choice.reasons == ["to-sub: segment_name present (pro)", "pro-sub: segment_name pro = pro"]


def test_sub_table_without_default_falls_through_to_the_parents_next_rule():
    rules = _with_sub(None)
    choice = rules.evaluate(ctx(segment_name="casual", sessions=2))
    assert choice.step_id == "fallback" and choice.reasons == ["fallback: sessions 2 >= 1"]
    choice = rules.evaluate(ctx(segment_name="casual", sessions=0))
    assert choice.step_id == MISS and choice.reasons == ["default: no rule matched"]


def test_sub_table_default_decides_when_its_rules_do_not():
    choice = _with_sub({"step": "sub_step", "variant": "v"}).evaluate(ctx(segment_name="casual", sessions=2))
    assert (choice.step_id, choice.content_variant) == ("sub_step", "v")
    assert choice.reasons == ["to-sub: segment_name present (casual)", "sub.default: no rule matched"]


# --------------------------------------------------------------------------------------------- outcomes


def test_field_step_and_template_vars():
    then = {"variant": "v1", "vars": {"left": "{{steps_left}} left", "hello": "Hi {{ segment_name }}, {{country}}!",
                                       "plain": "literal {not a field}", "risk": "{{churn_risk}}"}}
    rules = compiled([rule("r", step="$next_step", then=then)])
    choice = rules.evaluate(ctx(next_step="connect_data", steps_left=3, segment_name="pro", churn_risk=0.123456))
    assert choice.step_id == "connect_data" and choice.content_variant == "v1"
    assert choice.template_vars == {"left": "3 left", "hello": "Hi pro, !", "plain": "literal {not a field}",
                                    "risk": "0.1235"}
    assert rules.evaluate(ctx()).step_id == "none"  # a $field that is missing


def test_default_variant_and_reason():
    choice = compiled([rule("r", {"churn_risk": {"gt": 0.5}})]).evaluate(ctx())
    assert (choice.step_id, choice.content_variant, choice.template_vars) == (MISS, "default", {})
    assert choice.reasons == ["default: no rule matched"]


def test_reason_lists_the_held_comparisons_with_values():
    rules = compiled([rule("high-churn-concierge", {"churn_risk": {"gt": 0.7}},
                           then={"variant": "high_touch"}),
                      rule("eu", {"any": [{"country": {"in": ["DE"]}}, {"language": {"eq": "de"}}],
                                  "sessions": {"between": [1, 3]}})])
    assert rules.evaluate(ctx(churn_risk=0.83)).reasons == ["high-churn-concierge: churn_risk 0.83 > 0.7"]
    assert rules.evaluate(ctx(country="AT", language="de", sessions=2)).reasons == [
        "eu: language de = de and sessions 2 between 1 and 3"  # only the `any` branch that held
    ]
    assert rules.evaluate(ctx(country="DE", language="de", sessions=1)).reasons == [
        "eu: (country DE in [DE] or language de = de) and sessions 1 between 1 and 3"
    ]
    assert explain(rules.ruleset.tables["main"].rules[0], ctx(churn_risk=0.75)) == "high-churn-concierge: churn_risk 0.75 > 0.7"


def test_the_generated_source_is_kept_and_names_the_rules():
    rules = compiled([rule("r", {"churn_risk": {"gt": 0.5}})])
    assert "def _table_0" in rules.source and "'r'" in rules.source
    assert rules.version == "1" and rules.name == "t"


# --------------------------------------------------------------------------------------------- errors

VALID_HEAD = """\
ruleset: t
version: "1"
changelog: c
default: {step: $next_step}
tables:
  main:
    rules:
"""


def test_unknown_field_is_a_compile_error_naming_file_and_line():
    found = findings_of(VALID_HEAD + """\
      - id: r
        description: d
        when:
          churn_riks: {gt: 0.5}
        then: {step: x, vars: {a: "{{nope}}"}}
""")
    assert any(f.startswith("bad.yaml:11: [unknown-field]") and "churn_riks" in f and "churn_risk" in f for f in found)
    assert any(f.startswith("bad.yaml:12: [unknown-field]") and "'nope'" in f for f in found)


def test_unknown_step_field():
    found = findings_of(VALID_HEAD.replace("$next_step", "$nxt_step") + "      []\n")
    assert found and found[0].startswith("bad.yaml:4: [unknown-field]") and "next_step" in found[0]


def test_missing_default_is_reported():
    found = findings_of(VALID_HEAD.replace("default: {step: $next_step}\n", "") + "      []\n")
    assert found == ["bad.yaml:1: [missing] top level: missing required key 'default' (a rule set must say what to "
                     "show when no rule matches, e.g. default: {step: $next_step})"]


def test_bad_operator_points_at_its_line():
    found = findings_of(VALID_HEAD + """\
      - id: r
        description: d
        when:
          churn_risk:
            greater: 0.5
        then: {step: x}
""")
    assert len(found) == 1 and found[0].startswith("bad.yaml:12: [unknown-key]") and "unknown operator 'greater'" in found[0]
    assert "gt" in found[0]


def test_duplicate_rule_id_and_duplicate_key():
    found = findings_of(VALID_HEAD + """\
      - id: r
        description: d
        then: {step: x}
      - id: r
        description: d
        description: again
        then: {step: y}
""")
    assert found == ["bad.yaml:13: [duplicate-key] duplicate key 'description' (first at line 12); each key may appear once"]
    found = findings_of(VALID_HEAD + """\
      - id: r
        description: d
        then: {step: x}
      - id: r
        description: d
        then: {step: y}
""")
    assert found == ["bad.yaml:11: [duplicate-id] rule id 'r' is already used at line 8; ids must be unique across the file"]


def test_schema_errors_are_all_reported_with_lines():
    found = findings_of("""\
ruleset: t
version: 2026-11-30
changelog: c
default: {step: $next_step}
tables:
  main:
    default: {step: x}
    rules:
      - id: Bad Id
        description: d
        when: {sessions: {between: [1]}}
        then: {step: x, table: sub}
""")
    codes = {(f.split(":")[1], f.split("[")[1].split("]")[0]) for f in found}
    assert ("2", "type") in codes  # unquoted date version: "expected a string ... quote it"
    assert ("7", "main-default") in codes
    assert ("9", "pattern") in codes
    assert ("11", "between") in codes
    assert ("12", "step-and-table") in codes
    assert any("quote it" in f for f in found)


def test_hand_over_errors():
    found = findings_of(VALID_HEAD + """\
      - {id: a, description: d, then: {table: missing}}
      - {id: b, description: d, then: {table: sub}}
  sub:
    rules:
      - {id: c, description: d, then: {table: main}}
""")
    assert any(f.startswith("bad.yaml:8: [unknown-table]") for f in found)
    assert any(f.startswith("bad.yaml:12: [cycle]") and "main -> sub -> main" in f for f in found)


def test_operator_must_fit_the_field_type_and_constants_their_type():
    found = findings_of(VALID_HEAD + """\
      - id: r
        description: d
        when:
          country: {in: [DE, NO]}
          steps_done: {gt: 1}
          sessions: {between: [5, 1]}
        then: {step: x}
""")
    assert any(f.startswith("bad.yaml:11: [bad-value]") and "False" in f and "quote it" in f for f in found)
    assert any(f.startswith("bad.yaml:12: [bad-operator]") and "contains, present" in f for f in found)
    assert any(f.startswith("bad.yaml:13: [bad-value]") and "[low, high]" in f for f in found)


def test_invalid_yaml_and_missing_file():
    assert findings_of("ruleset: [unclosed\n")[0].startswith("bad.yaml:")
    with pytest.raises(RuleSetError, match="cannot read"):
        load_compiled("/nonexistent/rules.yaml")


def test_schema_is_valid_json_schema():
    import json

    import jsonschema

    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_PATH.read_text()))


# --------------------------------------------------------------------------------------------- the example


@pytest.fixture(scope="module")
def example() -> CompiledRuleSet:
    return load_compiled(EXAMPLE)


def _profile_ctx(profile: Profile, churn: float | None = 0.1, topic: str | None = None, **fields: Any) -> dict[str, Any]:
    from types import SimpleNamespace

    scores = None if churn is None else SimpleNamespace(segment_id=1, segment_name="casual", churn_risk=churn)
    c = rule_context(profile, None, scores, topic, make_event("page_view"))
    c.update(fields)
    return c


def test_example_decisions(example):
    new_de = Profile(demographic={"country": "DE"})
    assert example.version == "2026.11.30-1" and example.name == "onboarding"

    choice = example.evaluate(_profile_ctx(Profile(), churn=0.9))
    assert (choice.step_id, choice.content_variant) == ("concierge_call", "high_touch")
    assert choice.reasons == ["high-churn-concierge: churn_risk 0.9 > 0.7"]

    choice = example.evaluate(_profile_ctx(new_de))
    assert (choice.step_id, choice.content_variant) == ("welcome_tour", "eu")
    assert choice.template_vars == {"steps_left": "6", "country": "DE"}

    choice = example.evaluate(_profile_ctx(Profile(demographic={"country": "US"}), topic="integrations"))
    assert (choice.step_id, choice.content_variant) == ("welcome_tour", "tutorial")

    after_tour = Profile(steps_done=["welcome_tour"], demographic={"country": "DE"})
    choice = example.evaluate(_profile_ctx(after_tour, topic="integrations"))
    assert (choice.step_id, choice.content_variant) == ("connect_data", "interest")
    assert choice.reasons == ["interest-first: top_topic present (integrations)",
                              "integrations-connect-data: top_topic integrations in [integrations, automation] and "
                              "remaining_steps contains connect_data and not (steps_skipped contains connect_data)"]

    choice = example.evaluate(_profile_ctx(Profile(steps_done=["welcome_tour", "first_project"]), topic="reporting"))
    assert choice.step_id == "profile_setup" and choice.reasons == ["default: no rule matched"]  # fell through

    choice = example.evaluate(_profile_ctx(Profile(steps_done=["welcome_tour"], steps_skipped=["profile_setup"])))
    assert choice.step_id == "connect_data" and choice.reasons[0].startswith("skipped-last: steps_skipped present")

    assert example.evaluate(_profile_ctx(Profile(completed_ms=1))).step_id == "none"
    assert example.evaluate(_profile_ctx(Profile(steps_done=list(ONBOARDING_STEPS)), churn=0.9)).content_variant == "done"
    assert example.evaluate(_profile_ctx(new_de, churn=None)).step_id == "welcome_tour"  # not personalized


def test_example_picks_the_same_steps_as_builtin_1_outside_its_new_rules(example):
    """Where the EU tour and tutorial rules do not apply, the YAML port decides like choose_step."""
    rng = random.Random(11)
    compared = 0
    for _ in range(2000):
        done = [s for s in ONBOARDING_STEPS if rng.random() < 0.4] or ["welcome_tour"]
        remaining = [s for s in ONBOARDING_STEPS if s not in done]
        skipped = [s for s in remaining if rng.random() < 0.3]
        if remaining and set(skipped) == set(remaining):
            continue  # builtin-1 then still prefers the interest step; the port shows the next step
        profile = Profile(steps_done=done, steps_skipped=skipped, completed_ms=rng.choice([0, 0, 0, 1]))
        churn = rng.random()
        topic = rng.choice([None, *TOPICS])
        expected = choose_step(profile, "casual", churn, topic).step_id
        assert example.evaluate(_profile_ctx(profile, churn=churn, topic=topic)).step_id == expected
        compared += 1
    assert compared > 1000


def test_measure_evaluation_us(example):
    contexts = [
        _profile_ctx(Profile(), churn=0.9),
        _profile_ctx(Profile(demographic={"country": "DE"})),
        _profile_ctx(Profile(steps_done=["welcome_tour"]), topic="collaboration"),
        _profile_ctx(Profile(steps_done=["welcome_tour", "invite_team"]), topic="collaboration"),
        _profile_ctx(Profile(steps_done=["welcome_tour"], steps_skipped=["profile_setup"])),
    ]
    us = measure_evaluation_us(example, contexts, 20_000)
    print(f"\nexample rule set: {us:.2f} µs per evaluation")
    assert us > 0
