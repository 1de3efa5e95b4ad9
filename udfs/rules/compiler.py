"""Rule sets -> fast Python callables: each table becomes one generated function, compiled once.

Why generate code: a decision runs per event, and walking a condition tree per event costs far more than a
chain of ``if`` statements over ``ctx.get``. The generated source contains only names the compiler makes up,
field names and constants emitted with ``repr`` (collections are bound into a private namespace), and field
names are checked against :data:`udfs.rules.fields.RULE_FIELDS` before any code is generated: no user text
is ever evaluated as code.

Operator semantics live once, in :data:`OPS`: each operator has the code it compiles to and an interpreted
``holds``, the reference semantics the tests cross-check the generated code against (and which picks the
``any`` branches that held when a reason is written). Reasons are written only for the few rules on the
decision's path, by explainers built once per rule at compile time (constant text preformatted).
"""

from __future__ import annotations

import difflib
import math
import re
import time
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from udfs.next_step import StepChoice
from udfs.rules.fields import RULE_FIELDS, FieldType
from udfs.rules.model import (
    MAIN_TABLE, AllOf, AnyOf, Condition, Finding, Not, Outcome, Rule, RuleSet, RuleSetError, Table, Test, load_ruleset,
    parse_ruleset,
)

_N, _S, _B, _L = FieldType.NUMBER, FieldType.STRING, FieldType.BOOL, FieldType.STRING_LIST
_ABSENT = (None, "", [])  # what `present` treats as missing (tuple membership compares with ==)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_absent(value: Any) -> bool:
    return value in _ABSENT


# ----------------------------------------------------------------------------------------------- operators


@dataclass(frozen=True, slots=True)
class Op:
    name: str
    field_types: frozenset[FieldType]
    holds: Callable[[Any, Any], bool]  # (context value or None, constant) -> bool
    code: Callable[[str, str], str]  # (expression reading the value, constant expression) -> Python expression
    symbol: str  # for reasons


def _cmp(name: str, symbol: str, holds: Callable[[Any, Any], bool], types: Iterable[FieldType]) -> Op:
    return Op(name, frozenset(types), lambda v, k: v is not None and holds(v, k),
              lambda g, k: f"(_v := {g}) is not None and _v {symbol} {k}", symbol)


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("eq", frozenset({_N, _S, _B}), lambda v, k: v is not None and v == k, lambda g, k: f"{g} == {k}", "="),
        _cmp("ne", "!=", lambda v, k: v != k, (_N, _S, _B)),
        _cmp("lt", "<", lambda v, k: v < k, (_N,)),
        _cmp("lte", "<=", lambda v, k: v <= k, (_N,)),
        _cmp("gt", ">", lambda v, k: v > k, (_N,)),
        _cmp("gte", ">=", lambda v, k: v >= k, (_N,)),
        Op("between", frozenset({_N}), lambda v, k: v is not None and k[0] <= v <= k[1],
           lambda g, k: f"(_v := {g}) is not None and {k}", "between"),  # k: "lo <= _v <= hi", see _Codegen.test
        Op("in", frozenset({_N, _S}), lambda v, k: v is not None and v in k, lambda g, k: f"{g} in {k}", "in"),
        _cmp("not_in", "not in", lambda v, k: v not in k, (_N, _S)),
        Op("contains", frozenset({_L}), lambda v, k: v is not None and k in v,
           lambda g, k: f"(_v := {g}) is not None and {k} in _v", "contains"),
        Op("present", frozenset(FieldType), lambda v, k: _is_absent(v) is not k,
           lambda g, k: f"{g} {'not in' if k == 'True' else 'in'} _ABSENT", "present"),
    )
}


def holds(condition: Condition | None, ctx: Mapping[str, Any]) -> bool:
    """Interpreted evaluation (the reference semantics the generated code must match)."""
    if condition is None:
        return True
    if isinstance(condition, Test):
        return OPS[condition.op].holds(ctx.get(condition.field), condition.value)
    if isinstance(condition, AllOf):
        return all(holds(c, ctx) for c in condition.items)
    if isinstance(condition, AnyOf):
        return any(holds(c, ctx) for c in condition.items)
    return not holds(condition.item, ctx)


# ----------------------------------------------------------------------------------------------- reasons


def _text(value: Any) -> str:
    """A context value as template / reason text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(round(value, 4))
    if isinstance(value, (list, tuple)):
        return ",".join(map(_text, value))
    return str(value)


def _const_text(value: Any) -> str:
    if isinstance(value, tuple):
        shown = ", ".join(_text(v) for v in value[:5])
        return f"[{shown}, +{len(value) - 5} more]" if len(value) > 5 else f"[{shown}]"
    return _text(value)


Getter = Callable[[str], Any]  # ctx.get
Explainer = Callable[[Getter], str]


def _shown(value: Any) -> str:
    return "missing" if value is None else _text(value)


def _test_explainer(test: Test) -> Explainer:
    """``"<field> <actual value> <op> <constant>"``; the constant text is formatted once, here."""
    field = test.field
    if test.op == "present":
        if not test.value:
            absent = f"{field} absent"
            return lambda get: absent
        return lambda get: f"{field} present ({_const_text(v) if isinstance(v := get(field), list) else _shown(v)})"
    if test.op == "contains":
        text = f"{field} contains {_text(test.value)}"
        return lambda get: text
    if test.op == "between":
        suffix = f" between {_text(test.value[0])} and {_text(test.value[1])}"
    else:
        suffix = f" {OPS[test.op].symbol} {_const_text(test.value)}"
    prefix = f"{field} "
    return lambda get: prefix + _shown(get(field)) + suffix


def _holds_getter(condition: Condition) -> Callable[[Getter], bool]:
    return lambda get: holds(condition, _GetterMapping(get))


class _GetterMapping:
    """Lets :func:`holds` read through ``ctx.get`` (explainers receive the getter, like the generated code)."""

    __slots__ = ("get",)

    def __init__(self, get: Getter) -> None:
        self.get = get


def explainer(condition: Condition, only_held: bool = True, top: bool = True) -> Explainer:
    """Builds, once per rule, the function that says why ``condition`` held: its comparisons with the actual
    values. With ``only_held``, ``any`` branches that did not hold are left out (they are not why it fired);
    under ``not`` everything is shown (nothing in it held)."""
    if isinstance(condition, Test):
        return _test_explainer(condition)
    if isinstance(condition, Not):
        inner = explainer(condition.item, only_held=False, top=True)
        return lambda get: f"not ({inner(get)})"
    items = condition.items
    if len(items) == 1:
        return explainer(items[0], only_held, top)
    parts = [explainer(c, only_held, top=False) for c in items]
    opening, closing = ("", "") if top else ("(", ")")
    if isinstance(condition, AnyOf) and only_held:
        branches = [(_holds_getter(c), part, explainer(c, only_held, top)) for c, part in zip(items, parts)]

        def held_branches(get: Getter) -> str:
            held = [(part, alone) for test, part, alone in branches if test(get)]
            if len(held) == 1:
                return held[0][1](get)  # a lone branch reads as if it were the whole condition
            shown = [part for part, _ in held] if held else parts
            return opening + " or ".join([part(get) for part in shown]) + closing

        return held_branches
    sep = " or " if isinstance(condition, AnyOf) else " and "
    return lambda get: opening + sep.join([part(get) for part in parts]) + closing


def explain(rule: Rule, ctx: Mapping[str, Any]) -> str:
    """``"<rule id>: <why>"`` for a rule that fired (slow path; evaluation uses the prebuilt explainer)."""
    return _FiredRule.of(rule).reason(ctx)


@dataclass(frozen=True, slots=True)
class _FiredRule:
    prefix: str
    why: Explainer

    @classmethod
    def of(cls, rule: Rule) -> _FiredRule:
        if rule.when is None:
            return cls(f"{rule.id}: always", lambda get: "")
        return cls(f"{rule.id}: ", explainer(rule.when))

    def reason(self, ctx: Mapping[str, Any]) -> str:
        return self.prefix + self.why(ctx.get)


@dataclass(frozen=True, slots=True)
class _FiredDefault:
    text: str

    def reason(self, ctx: Mapping[str, Any]) -> str:
        return self.text


# ----------------------------------------------------------------------------------------------- outcomes

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True, slots=True)
class Template:
    """A template string split once into literal text and field parts: ``(is_field, text_or_field_name)``."""

    parts: tuple[tuple[bool, str], ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        parts: list[tuple[bool, str]] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(text):
            if match.start() > pos:
                parts.append((False, text[pos:match.start()]))
            parts.append((True, match.group(1)))
            pos = match.end()
        if pos < len(text):
            parts.append((False, text[pos:]))
        return cls(tuple(parts))

    @property
    def fields(self) -> list[str]:
        return [text for is_field, text in self.parts if is_field]

    def render(self, ctx: Mapping[str, Any]) -> str:
        parts = self.parts
        if len(parts) == 1:
            is_field, text = parts[0]
            return _text(ctx.get(text)) if is_field else text
        return "".join(_text(ctx.get(text)) if is_field else text for is_field, text in parts)


@dataclass(frozen=True, slots=True)
class CompiledOutcome:
    step: str | None  # literal step id
    step_field: str | None  # or the context field holding it
    variant: str
    vars: tuple[tuple[str, Template], ...]

    @classmethod
    def of(cls, outcome: Outcome) -> CompiledOutcome:
        field = outcome.step_field
        return cls(None if field else outcome.step, field, outcome.variant,
                   tuple((name, Template.parse(text)) for name, text in outcome.vars))

    def choose(self, ctx: Mapping[str, Any], fired: list[_FiredRule | _FiredDefault]) -> StepChoice:
        step = self.step if self.step_field is None else (_text(ctx.get(self.step_field)) or "none")
        return StepChoice(step, self.variant, {name: t.render(ctx) for name, t in self.vars},
                          [f.reason(ctx) for f in fired])


# ----------------------------------------------------------------------------------------------- checks


class _Checker:
    """Field names, operator/type fit and constants, before any code is generated."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.findings: list[Finding] = []

    def _add(self, line: int, code: str, message: str) -> None:
        self.findings.append(Finding(self.source, line, code, message))

    def field(self, name: str, line: int, where: str) -> FieldType | None:
        kind = RULE_FIELDS.get(name)
        if kind is None:
            close = difflib.get_close_matches(name, RULE_FIELDS, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            self._add(line, "unknown-field",
                      f"{where}: unknown field '{name}'{hint} (the fields rules can use are RULE_FIELDS in udfs/rules/fields.py)")
        return kind

    def _constant(self, test: Test, kind: FieldType, value: Any) -> None:
        fits = {_N: _is_number, _S: lambda v: isinstance(v, str), _B: lambda v: isinstance(v, bool),
                _L: lambda v: isinstance(v, str)}[kind]
        if not fits(value):
            quote = "; YAML reads unquoted yes/no/on/off/true/false as booleans and digits as numbers, quote it" if kind in (_S, _L) else ""
            expected = {_N: "a number", _S: "a string", _B: "true or false", _L: "a string"}[kind]
            self._add(test.line, "bad-value",
                      f"'{test.field}' is a {kind} field, so '{test.op}' needs {expected}, got {value!r}{quote}")

    def test(self, test: Test) -> None:
        kind = self.field(test.field, test.line, "condition")
        if kind is None:
            return
        op = OPS[test.op]
        if kind not in op.field_types:
            usable = ", ".join(name for name, o in OPS.items() if kind in o.field_types)
            self._add(test.line, "bad-operator", f"'{test.op}' does not apply to '{test.field}', a {kind} field; use one of: {usable}")
            return
        if test.op == "present":
            return
        for value in test.value if isinstance(test.value, tuple) else (test.value,):
            self._constant(test, kind, value)
        if test.op == "between" and all(map(_is_number, test.value)) and test.value[0] > test.value[1]:
            self._add(test.line, "bad-value", f"'{test.field}': between [{test.value[0]}, {test.value[1]}] is empty; write [low, high]")

    def condition(self, condition: Condition | None) -> None:
        if isinstance(condition, Test):
            self.test(condition)
        elif isinstance(condition, (AllOf, AnyOf)):
            for item in condition.items:
                self.condition(item)
        elif isinstance(condition, Not):
            self.condition(condition.item)

    def outcome(self, outcome: Outcome, where: str) -> None:
        if outcome.step_field is not None:
            kind = self.field(outcome.step_field, outcome.line, f"{where} step")
            if kind is not None and kind is not _S:
                self._add(outcome.line, "bad-step", f"{where}: step ${outcome.step_field} must name a string field, '{outcome.step_field}' is a {kind} field")
        for name, text in outcome.vars:
            for field in Template.parse(text).fields:
                self.field(field, outcome.line, f"{where} vars.{name}")
            if "{{" in _PLACEHOLDER.sub("", text) or "}}" in _PLACEHOLDER.sub("", text):
                self._add(outcome.line, "bad-template", f"{where} vars.{name}: malformed placeholder in {text!r}; write {{{{field}}}}")


# ----------------------------------------------------------------------------------------------- codegen


def _ordered(table: Table) -> list[Rule]:
    """Priority descending; equal priorities keep file order (sorted() is stable)."""
    return sorted(table.rules, key=lambda r: -r.priority)


class _Codegen:
    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.namespace: dict[str, Any] = {"_ABSENT": _ABSENT, "__builtins__": {}}
        self.function_names = {name: f"_table_{i}" for i, name in enumerate(ruleset.tables)}
        self.lines: list[str] = [f"# rule set {ruleset.name!r} version {ruleset.version!r} from {ruleset.source!r}"]

    def bind(self, value: Any, prefix: str) -> str:
        name = f"_{prefix}{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def const(self, value: Any) -> str:
        if isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
            return repr(value)
        return self.bind(value, "k")

    def test(self, test: Test) -> str:
        read = f"_g({test.field!r})"
        if test.op == "between":
            constant = f"{self.const(test.value[0])} <= _v <= {self.const(test.value[1])}"
        elif test.op in ("in", "not_in"):
            constant = self.bind(frozenset(test.value), "k")
        else:
            constant = self.const(test.value)
        return OPS[test.op].code(read, constant)

    def condition(self, condition: Condition | None) -> str:
        if condition is None:
            return "True"
        if isinstance(condition, Test):
            return f"({self.test(condition)})"
        if isinstance(condition, Not):
            return f"(not {self.condition(condition.item)})"
        sep = " and " if isinstance(condition, AllOf) else " or "
        return "(" + sep.join(self.condition(c) for c in condition.items) + ")"

    def table(self, table: Table) -> None:
        is_main = table.name == MAIN_TABLE
        default = self.ruleset.default if is_main else table.default
        emit = self.lines.append
        emit("")
        emit(f"def {self.function_names[table.name]}(_g, _f):  # table {table.name!r}")
        for rule in _ordered(table):
            emit(f"    # rule {rule.id!r} (priority {rule.priority}, line {rule.line})")
            emit(f"    if {self.condition(rule.when)}:")
            emit(f"        _f.append({self.bind(_FiredRule.of(rule), 'r')})")
            if rule.then.table is None:
                emit(f"        return {self.bind(CompiledOutcome.of(rule.then), 'o')}")
            else:
                emit(f"        _o = {self.function_names[rule.then.table]}(_g, _f)")
                emit("        if _o is not None:")
                emit("            return _o")
                emit("        _f.pop()")
        if default is None:
            emit("    return None  # no default: the table that handed over continues")
        else:
            label = "default" if is_main else f"{table.name}.default"
            emit(f"    _f.append({self.bind(_FiredDefault(f'{label}: no rule matched'), 'd')})")
            emit(f"    return {self.bind(CompiledOutcome.of(default), 'o')}")

    def build(self) -> tuple[str, Callable[..., CompiledOutcome]]:
        for table in self.ruleset.tables.values():
            self.table(table)
        source = "\n".join(self.lines) + "\n"
        code = compile(source, f"<rules {self.ruleset.source}>", "exec")
        exec(code, self.namespace)  # noqa: S102 - generated from validated names and repr'd constants only
        return source, self.namespace[self.function_names[MAIN_TABLE]]


# ----------------------------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class CompiledRuleSet:
    """A rule set ready to decide: ``evaluate(ctx)`` with ``ctx`` from :func:`udfs.rules.fields.rule_context`."""

    ruleset: RuleSet
    source: str  # the generated Python, for debugging
    _entry: Callable[..., CompiledOutcome]

    @property
    def name(self) -> str:
        return self.ruleset.name

    @property
    def version(self) -> str:
        return self.ruleset.version

    def evaluate(self, ctx: Mapping[str, Any]) -> StepChoice:
        """The step for this context; ``reasons`` name every rule on the decision's path and why it fired."""
        fired: list[_FiredRule | _FiredDefault] = []
        return self._entry(ctx.get, fired).choose(ctx, fired)


def compile_ruleset(ruleset: RuleSet) -> CompiledRuleSet:
    """Check every field, operator and constant against RULE_FIELDS, then generate and compile the tables once.
    Raises :class:`RuleSetError` (file:line findings) on any problem."""
    checker = _Checker(ruleset.source)
    checker.outcome(ruleset.default, "default")
    for table in ruleset.tables.values():
        if table.default is not None:
            checker.outcome(table.default, f"{table.name}.default")
        for rule in table.rules:
            checker.condition(rule.when)
            checker.outcome(rule.then, f"rule '{rule.id}'")
    if checker.findings:
        raise RuleSetError(checker.findings)
    source, entry = _Codegen(ruleset).build()
    return CompiledRuleSet(ruleset, source, entry)


def compile_rules_text(text: str, source_name: str = "<rules>") -> CompiledRuleSet:
    """Parse, validate and compile rule-set YAML text; findings name ``source_name``."""
    return compile_ruleset(parse_ruleset(text, source_name))


def load_compiled(path: str | Path) -> CompiledRuleSet:
    """Load, validate and compile a rule file in one call."""
    return compile_ruleset(load_ruleset(path))


def measure_evaluation_us(compiled: CompiledRuleSet, contexts: Sequence[Mapping[str, Any]], n: int = 100_000) -> float:
    """Mean wall-clock µs per ``evaluate`` over ``n`` calls cycling through ``contexts`` (for reports, not asserts)."""
    if not contexts or n <= 0:
        raise ValueError("need at least one context and n > 0")
    evaluate = compiled.evaluate
    batch = list(islice(cycle(contexts), n))
    start = time.perf_counter_ns()
    for ctx in batch:
        evaluate(ctx)
    return (time.perf_counter_ns() - start) / n / 1000.0
