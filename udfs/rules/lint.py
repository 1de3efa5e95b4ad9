"""`onramp rules lint`: what the schema cannot see — dead rules, ambiguous ties, type mismatches.

Schema errors, unknown fields and a missing default are reported by :func:`udfs.rules.model.parse_ruleset` and
the compiler with file and line; this module adds the checks that need the rules' meaning:

- ``unreachable`` (error): a rule that can never fire because an earlier rule of the same table (by evaluation
  order: priority, then file order) fires whenever it would: an earlier rule without ``when``, or one whose
  conditions are a subset of this rule's (so this rule's conditions imply the earlier one's).
- ``overlap`` (warning): two rules of one table at the same priority, with different outcomes, whose conditions
  can hold together; file order decides between them, which readers of the file may not expect.
- ``no_template`` / ``template`` (warnings): outcomes whose step has no content template, and template variables
  no outcome provides (:mod:`udfs.content_templates`).

(Operators and values that do not fit a field's type are errors of the compiler, with their line.)

Only plain conjunctions (``field: {op: value}`` mappings and ``all``) are analysed for implication and overlap;
rules using ``any``/``not`` are left out of those two checks (never reported falsely).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import yaml

NUMBER_OPS = ("lt", "lte", "gt", "gte", "between")
SET_OPS = ("in", "not_in")


@dataclass(frozen=True)
class LintFinding:
    file: str
    line: int
    severity: str  # "error" | "warning"
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.severity}: {self.code}: {self.message}"


@dataclass(frozen=True)
class Atom:
    """One ``field op value`` constraint of a conjunction."""

    field: str
    op: str
    value: Any


def conjunction(when: Any) -> list[Atom] | None:
    """The atoms of a plain conjunction, or None when the condition uses ``any``/``not`` (not analysed)."""
    if when is None:
        return []
    if not isinstance(when, dict):
        return None
    atoms: list[Atom] = []
    for key, spec in when.items():
        if key == "all":
            for part in spec or []:
                sub = conjunction(part)
                if sub is None:
                    return None
                atoms.extend(sub)
        elif key in ("any", "not"):
            return None
        elif isinstance(spec, dict):
            atoms.extend(Atom(key, op, _freeze(value)) for op, value in spec.items())
        else:
            return None
    return atoms


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _interval(atoms: Iterable[Atom]) -> tuple[float, float, bool, bool] | None:
    """(lo, hi, lo_open, hi_open) the numeric atoms allow; None if there are none."""
    lo, hi, lo_open, hi_open, seen = -math.inf, math.inf, False, False, False
    for a in atoms:
        if a.op not in NUMBER_OPS and a.op != "eq":
            continue
        if a.op == "eq" and not isinstance(a.value, (int, float)):
            continue
        seen = True
        if a.op in ("gt", "gte"):
            if a.value > lo or (a.value == lo and a.op == "gt"):
                lo, lo_open = a.value, a.op == "gt"
        elif a.op in ("lt", "lte"):
            if a.value < hi or (a.value == hi and a.op == "lt"):
                hi, hi_open = a.value, a.op == "lt"
        elif a.op == "between":
            if a.value[0] > lo:
                lo, lo_open = a.value[0], False
            if a.value[1] < hi:
                hi, hi_open = a.value[1], False
        elif a.op == "eq":
            lo, hi, lo_open, hi_open = max(lo, a.value), min(hi, a.value), False, False
    return (lo, hi, lo_open, hi_open) if seen else None


def _interval_empty(iv: tuple[float, float, bool, bool]) -> bool:
    lo, hi, lo_open, hi_open = iv
    return lo > hi or (lo == hi and (lo_open or hi_open))


def can_hold_together(a: list[Atom], b: list[Atom]) -> bool:
    """Conservative satisfiability of two conjunctions: False only when some field clearly cannot satisfy both."""
    fields = {x.field for x in a} & {x.field for x in b}
    for f in fields:
        atoms = [x for x in a + b if x.field == f]
        iv = _interval(atoms)
        if iv is not None and _interval_empty(iv):
            return False
        allowed: set | None = None
        for x in atoms:
            if x.op == "in":
                allowed = set(x.value) if allowed is None else allowed & set(x.value)
            elif x.op == "eq" and not isinstance(x.value, (int, float)):
                allowed = {x.value} if allowed is None else allowed & {x.value}
        if allowed is not None:
            excluded = set()
            for x in atoms:
                if x.op == "not_in":
                    excluded |= set(x.value)
                elif x.op == "ne":
                    excluded.add(x.value)
            if not (allowed - excluded):
                return False
        presence = {x.value for x in atoms if x.op == "present"}
        if len(presence) > 1:
            return False
    return True


def implies(specific: list[Atom], general: list[Atom]) -> bool:
    """True when every atom of ``general`` is also in ``specific`` (syntactic subset: sound, not complete)."""
    return set(general) <= set(specific)


def table_findings(file: str, table: str, rules: list[dict[str, Any]], lines: dict[str, int]) -> list[LintFinding]:
    """Unreachable and overlapping rules of one table; ``rules`` are the raw rule mappings in file order and
    ``lines`` maps rule id -> line."""
    order = sorted(range(len(rules)), key=lambda i: (-int(rules[i].get("priority", 0) or 0), i))
    findings: list[LintFinding] = []
    seen: list[tuple[dict[str, Any], list[Atom] | None]] = []
    for i in order:
        rule = rules[i]
        rid = str(rule.get("id"))
        atoms = conjunction(rule.get("when"))
        if atoms is not None:
            for earlier, e_atoms in seen:
                if e_atoms is not None and implies(atoms, e_atoms):
                    why = "fires always" if not e_atoms else "fires whenever this one would"
                    findings.append(LintFinding(
                        file, lines.get(rid, 0), "error", "unreachable",
                        f"rule {rid!r} in table {table!r} can never fire: rule {earlier.get('id')!r} "
                        f"(evaluated first) {why}; remove it, or give it a higher priority"))
                    break
        for earlier, e_atoms in seen:
            same_priority = int(earlier.get("priority", 0) or 0) == int(rule.get("priority", 0) or 0)
            if (same_priority and earlier.get("then") != rule.get("then") and atoms is not None
                    and e_atoms is not None and can_hold_together(atoms, e_atoms) and not implies(atoms, e_atoms)):
                findings.append(LintFinding(
                    file, lines.get(rid, 0), "warning", "overlap",
                    f"rules {earlier.get('id')!r} and {rid!r} in table {table!r} share priority "
                    f"{int(rule.get('priority', 0) or 0)}, can both match and decide differently; file order picks "
                    f"{earlier.get('id')!r}: give one a distinct priority or make the conditions exclusive"))
        seen.append((rule, atoms))
    return findings


def rule_lines(text: str) -> dict[str, dict[str, int]]:
    """table -> rule id -> 1-based line of the rule's mapping, from the YAML node marks."""
    root = yaml.compose(text)
    out: dict[str, dict[str, int]] = {}
    if not isinstance(root, yaml.MappingNode):
        return out
    for key, value in root.value:
        if key.value != "tables" or not isinstance(value, yaml.MappingNode):
            continue
        for table_key, table_node in value.value:
            lines = out.setdefault(str(table_key.value), {})
            if not isinstance(table_node, yaml.MappingNode):
                continue
            for tk, rules_node in table_node.value:
                if tk.value != "rules" or not isinstance(rules_node, yaml.SequenceNode):
                    continue
                for rule_node in rules_node.value:
                    if isinstance(rule_node, yaml.MappingNode):
                        for rk, rv in rule_node.value:
                            if rk.value == "id":
                                lines[str(rv.value)] = rule_node.start_mark.line + 1
    return out


def semantic_findings(text: str, source: str) -> list[LintFinding]:
    """Unreachable and overlapping rules of every table (the file must already parse)."""
    doc = yaml.safe_load(text) or {}
    lines = rule_lines(text)
    findings: list[LintFinding] = []
    for table, spec in (doc.get("tables") or {}).items():
        findings += table_findings(source, str(table), list((spec or {}).get("rules") or []), lines.get(str(table), {}))
    return findings


def _outcomes(ruleset: Any) -> Iterable[tuple[Any, str]]:
    """Every step outcome of a parsed rule set with a label (hand-overs excluded)."""
    yield ruleset.default, "default"
    for table in ruleset.tables.values():
        if table.default is not None:
            yield table.default, f"{table.name}.default"
        for rule in table.rules:
            if rule.then.table is None:
                yield rule.then, rule.id


def template_findings(compiled: Any, source: str, template_dir: Any = None) -> list[LintFinding]:
    """Content templates against the rule set's outcomes (warnings): a literal step/variant with no template of
    its own (the step's default renders), a step with no template at all, and a template variable that no
    outcome provides (it would render empty)."""
    from udfs.content_templates import DEFAULT_TEMPLATE_DIR, TemplateCatalog, TemplateNotFoundError

    catalog = TemplateCatalog.load(template_dir or DEFAULT_TEMPLATE_DIR)
    findings: list[LintFinding] = []
    provided: set[str] = set()
    for outcome, label in _outcomes(compiled.ruleset):
        provided |= {name for name, _ in outcome.vars}
        step = outcome.step or ""
        if step.startswith("$"):
            continue  # decided at run time: every catalog step has a default template (checked below)
        try:
            catalog.resolve(step, outcome.variant)
        except TemplateNotFoundError as exc:
            findings.append(LintFinding(source, outcome.line, "warning", "no_template", f"{label}: {exc}"))
    for problem in catalog.check(provided):
        findings.append(LintFinding(source, 0, "warning", "template", problem))
    return findings
