"""Versioned YAML rule sets that choose the next onboarding step; they replace the built-in rules of
:mod:`udfs.next_step` without changing :class:`udfs.next_step.StepChoice`.

Format (validated against ``rules/ruleset.schema.json``; the shipped example is ``rules/onboarding.yaml``)::

    ruleset: onboarding                 # name
    version: "2026.11.30-1"             # string, recorded in every decision
    changelog: "what changed and why"   # required, non-empty
    default: {step: $next_step, variant: default, vars: {steps_left: "{{steps_left}}"}}   # mandatory
    tables:
      main:                             # evaluation starts here (required; no own default)
        rules:
          - id: high-churn-concierge    # unique across the file, [a-z0-9][a-z0-9_-]*
            priority: 100               # optional int, default 0; higher first; ties keep file order
            description: Users likely to drop out get a human
            when: {churn_risk: {gt: 0.7}}           # omitted = always
            then: {step: concierge_call, variant: high_touch, vars: {segment: "{{segment_name}}"}}
          - id: by-segment
            when: {segment_name: {present: true}}
            then: {table: by_segment}   # hand over to a sub-table
      by_segment:
        default: {...}                  # optional; without it, a sub-table that matches nothing lets the
        rules: [...]                    # parent table continue with its next rule

Conditions: ``field: {op: value}`` (several fields, or several ops on one field, must all hold) and the
combinators ``all: [...]``, ``any: [...]``, ``not: {...}``. Operators: ``eq ne lt lte gt gte``,
``between: [lo, hi]`` (inclusive), ``in``/``not_in: [...]``, ``contains`` (list fields), ``present: true|false``
(not None, not "" and not an empty list). Any comparison on a missing (None) value is false -- ``ne`` and
``not_in`` included; only ``present: false`` holds for it. Usable fields and their types:
:data:`udfs.rules.fields.RULE_FIELDS`.

Outcomes: ``step`` (an id, or ``$field`` to take it from the context), ``variant`` (default "default"),
``vars`` (``{{field}}`` filled at decision time), or ``table: name`` (a hand-over, exclusive with ``step``).

Reasons: one per rule on the decision's path, ``"<rule id>: <the comparisons that held>"`` such as
``"high-churn-concierge: churn_risk 0.83 > 0.7"``; then ``"default: no rule matched"`` or
``"<table>.default: no rule matched"`` if a default decided.

Modules: :mod:`.fields` (what rules can see), :mod:`.model` (loading + validation with file:line findings),
:mod:`.compiler` (code generation and evaluation).
"""

from udfs.rules.compiler import (
    CompiledRuleSet, compile_rules_text, compile_ruleset, load_compiled, measure_evaluation_us,
)
from udfs.rules.fields import RULE_FIELDS, FieldType, rule_context
from udfs.rules.model import Finding, RuleSet, RuleSetError, load_ruleset, parse_ruleset

__all__ = [
    "RULE_FIELDS", "CompiledRuleSet", "FieldType", "Finding", "RuleSet", "RuleSetError", "compile_rules_text", "compile_ruleset",
    "load_compiled", "load_ruleset", "measure_evaluation_us", "parse_ruleset", "rule_context",
]
