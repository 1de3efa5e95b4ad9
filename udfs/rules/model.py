"""Rule files -> validated, line-numbered :class:`RuleSet` objects (no evaluation here: see compiler.py).

Loading has three passes, each reporting *every* problem it finds (not just the first) as a :class:`Finding`
``file:line: [code] message``, so an author fixes a file in one round:

1. YAML is composed into nodes (not constructed), so each key and item keeps its line; duplicate keys, which
   plain ``yaml.safe_load`` silently merges, are errors (:mod:`udfs.yaml_lines`, shared with experiment files).
2. The data is validated against the published JSON Schema ``rules/ruleset.schema.json``; jsonschema's
   messages are rewritten to say what is wrong and what is expected at which line.
3. Checks a schema cannot express: rule ids unique across the file, hand-overs to existing tables, no
   hand-over cycles.

Field names and operator/type fit are checked by the compiler against :data:`udfs.rules.fields.RULE_FIELDS`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import jsonschema
import yaml

from udfs.yaml_lines import (
    TYPE_WORDS, JsonPath, LineMap, YamlProblem, YamlSourceError, compose_with_lines, schema_validator,
    syntax_problem, where as _where,
)

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "rules" / "ruleset.schema.json"
MAIN_TABLE = "main"


# ----------------------------------------------------------------------------------------------- findings


@dataclass(frozen=True, slots=True)
class Finding:
    file: str
    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: [{self.code}] {self.message}"


class RuleSetError(ValueError):
    """A rule set that cannot be used; ``findings`` lists every problem, sorted by line."""

    def __init__(self, findings: Iterable[Finding]) -> None:
        self.findings: list[Finding] = sorted(set(findings), key=lambda f: (f.file, f.line, f.code, f.message))
        count = len(self.findings)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in rule set:\n" + "\n".join(map(str, self.findings)))


# ----------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class Test:
    """``field: {op: value}``: one operator on one field."""

    field: str
    op: str
    value: Any  # lists are stored as tuples
    line: int


@dataclass(frozen=True, slots=True)
class AllOf:
    items: tuple[Condition, ...]
    line: int


@dataclass(frozen=True, slots=True)
class AnyOf:
    items: tuple[Condition, ...]
    line: int


@dataclass(frozen=True, slots=True)
class Not:
    item: Condition
    line: int


Condition = Union[Test, AllOf, AnyOf, Not]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a rule (or a default) decides: a step (literal id or ``$field``) with variant and template vars,
    or a hand-over to another table (``table`` set, ``step`` None)."""

    line: int
    step: str | None = None
    variant: str = "default"
    vars: tuple[tuple[str, str], ...] = ()
    table: str | None = None

    @property
    def step_field(self) -> str | None:
        """The context field named by a ``$field`` step, else None."""
        return self.step[1:] if self.step is not None and self.step.startswith("$") else None


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    description: str
    priority: int
    when: Condition | None  # None: always
    then: Outcome
    line: int
    index: int  # position in its table, in file order (the priority tie-break)


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    rules: tuple[Rule, ...]
    default: Outcome | None
    line: int


@dataclass(frozen=True, slots=True)
class RuleSet:
    name: str
    version: str
    changelog: str
    default: Outcome
    tables: Mapping[str, Table]
    source: str  # file name, for findings


# ----------------------------------------------------------------------------------------------- YAML with lines


def _compose(text: str, source: str) -> tuple[Any, LineMap]:
    """:func:`compose_with_lines`, its problems worded as findings."""
    try:
        return compose_with_lines(text)
    except YamlSourceError as exc:
        raise RuleSetError([_yaml_finding(p, source) for p in exc.problems]) from None


def yaml_error_finding(exc: yaml.YAMLError, source: str) -> Finding:
    """PyYAML's error for a rule file, worded and placed as every rule-set finding is (for tools that load a rule
    file as plain YAML, such as ``rules diff``)."""
    return _yaml_finding(syntax_problem(exc), source)


def _yaml_finding(problem: YamlProblem, source: str) -> Finding:
    if problem.kind == "empty":
        return Finding(source, 1, "empty", "the file is empty; expected a rule set (ruleset, version, changelog, default, tables)")
    if problem.kind == "key-not-plain":
        return Finding(source, problem.line, "yaml-key", "keys must be plain names")
    if problem.kind == "duplicate-key":
        return Finding(source, problem.line, "duplicate-key",
                       f"duplicate key '{problem.key}' (first at line {problem.first_line}); each key may appear once")
    return Finding(source, problem.line, "yaml", f"not valid YAML: {problem.detail}")


# ----------------------------------------------------------------------------------------------- schema


_REQUIRED_HINTS = {
    "default": "a rule set must say what to show when no rule matches, e.g. default: {step: $next_step}",
    "changelog": "say what changed in this version and why",
    "version": 'e.g. version: "2026.11.30-1"',
    "main": "evaluation starts at table 'main'",
    "rules": "a table needs a list of rules (may be empty: rules: [])",
    "description": "say why the rule exists",
    "then": "what the rule decides: {step: ..., variant: ..., vars: {...}} or {table: name}",
    "step": "a step id such as welcome_tour, or $field such as $next_step",
}
_PATTERN_HINTS = {
    "^[a-z0-9][a-z0-9_-]*$": "lower-case letters, digits, '_' and '-', starting with a letter or digit",
    "^[a-z_][a-z0-9_]*$": "lower-case letters, digits and '_', not starting with a digit",
    "^[a-z][a-z0-9_]*$": "lower-case letters, digits and '_', starting with a letter",
    "^(\\$[a-z_][a-z0-9_]*|[a-z0-9][a-z0-9_]*)$": "a step id (lower-case letters, digits, '_') or $field such as $next_step",
    "\\S": "some text",
}


def _describe(value: Any) -> str:
    kind = {dict: "a mapping", list: "a list", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return f"{kind.get(type(value), type(value).__name__)} ({json.dumps(value, default=str)[:60]})"


def _schema_findings(error: jsonschema.ValidationError, lines: LineMap, source: str) -> list[Finding]:
    """One jsonschema error -> findings that name the line, what is wrong and what is expected."""
    path: JsonPath = tuple(error.absolute_path)
    where = _where(path)
    kind = error.validator
    instance = error.instance

    def finding(code: str, message: str, at: JsonPath = path) -> Finding:
        return Finding(source, lines.at(at), code, message)

    if kind == "required":
        missing = [k for k in error.validator_value if isinstance(instance, dict) and k not in instance]
        return [
            finding("missing", f"{where}: missing required key '{k}'" + (f" ({_REQUIRED_HINTS[k]})" if k in _REQUIRED_HINTS else ""))
            for k in missing
        ]
    if kind == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        extras = [k for k in instance if k not in allowed]
        if allowed == ["table"]:
            return [finding("step-and-table", f"{where}: '{k}' cannot be combined with 'table': a rule either hands over to a table or names a step", path + (k,)) for k in extras]
        noun = "operator" if "between" in allowed else "key"
        also = " (or only 'table: name' to hand over to a table)" if allowed == ["step", "variant", "vars"] and path[-1:] == ("then",) else ""
        return [finding("unknown-key", f"{where}: unknown {noun} '{k}'; expected one of: {', '.join(allowed)}{also}", path + (k,)) for k in extras]
    if kind is None or error.schema is False:  # a `false` subschema (jsonschema drops the property name from the path)
        if path[:2] == ("tables", MAIN_TABLE):
            return [finding("main-default", "table 'main' cannot have its own default: the top-level 'default' is main's default",
                            ("tables", MAIN_TABLE, "default"))]
        return [finding("not-allowed", f"{where}: not allowed here")]
    if kind == "type":
        expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        words = " or ".join(TYPE_WORDS.get(t, t) for t in expected)
        hint = "; quote it" if "string" in expected and not isinstance(instance, (dict, list)) else ""
        if "between" in error.schema.get("properties", {}):  # a condition's field test given a bare value
            hint = f"; write an operator mapping such as {path[-1]}: {{eq: {json.dumps(instance, default=str)}}}"
        return [finding("type", f"{where}: expected {words}, got {_describe(instance)}{hint}")]
    if kind == "pattern":
        hint = _PATTERN_HINTS.get(error.validator_value, f"text matching {error.validator_value}")
        if "propertyNames" in error.relative_schema_path:
            return [finding("bad-name", f"{where}: invalid name '{instance}'; expected {hint}", path + (instance,))]
        return [finding("pattern", f"{where}: invalid value {instance!r}; expected {hint}")]
    if kind in ("minItems", "maxItems"):
        if path and path[-1] == "between":
            return [finding("between", f"{where}: expected a list of two numbers [low, high], got {len(instance)} item(s)")]
        return [finding("size", f"{where}: expected at least {error.validator_value} item(s)" if kind == "minItems" else f"{where}: expected at most {error.validator_value} item(s)")]
    if kind in ("minProperties", "minLength"):
        return [finding("empty", f"{where}: must not be empty")]
    return [finding("schema", f"{where}: {error.message}")]


def validate_against_schema(data: Any, lines: LineMap, source: str) -> list[Finding]:
    findings: list[Finding] = []
    for error in schema_validator(SCHEMA_PATH).iter_errors(data):
        findings.extend(_schema_findings(error, lines, source))
    return findings


# ----------------------------------------------------------------------------------------------- build + checks


class _Builder:
    """Validated data -> dataclasses, collecting the cross-reference findings a schema cannot express."""

    def __init__(self, lines: LineMap, source: str) -> None:
        self.lines = lines
        self.source = source
        self.findings: list[Finding] = []
        self.rule_lines: dict[str, int] = {}

    def condition(self, data: Mapping[str, Any], path: JsonPath) -> Condition:
        items: list[Condition] = []
        for key, value in data.items():
            sub = path + (key,)
            line = self.lines.at(sub)
            if key in ("all", "any"):
                children = tuple(self.condition(c, sub + (i,)) for i, c in enumerate(value))
                items.append(AllOf(children, line) if key == "all" else AnyOf(children, line))
            elif key == "not":
                items.append(Not(self.condition(value, sub), line))
            else:
                for op, const in value.items():
                    items.append(Test(key, op, tuple(const) if isinstance(const, list) else const, self.lines.at(sub + (op,))))
        return items[0] if len(items) == 1 else AllOf(tuple(items), self.lines.at(path))

    def outcome(self, data: Mapping[str, Any], path: JsonPath) -> Outcome:
        return Outcome(
            line=self.lines.at(path),
            step=data.get("step"),
            variant=data.get("variant", "default"),
            vars=tuple((data.get("vars") or {}).items()),
            table=data.get("table"),
        )

    def rule(self, data: Mapping[str, Any], path: JsonPath, index: int) -> Rule:
        line = self.lines.at(path)
        rule_id = data["id"]
        if rule_id in self.rule_lines:
            self.findings.append(Finding(
                self.source, self.lines.at(path + ("id",)), "duplicate-id",
                f"rule id '{rule_id}' is already used at line {self.rule_lines[rule_id]}; ids must be unique across the file",
            ))
        else:
            self.rule_lines[rule_id] = self.lines.at(path + ("id",))
        when = data.get("when")
        return Rule(
            id=rule_id,
            description=data["description"],
            priority=data.get("priority", 0),
            when=self.condition(when, path + ("when",)) if when is not None else None,
            then=self.outcome(data["then"], path + ("then",)),
            line=line,
            index=index,
        )

    def table(self, name: str, data: Mapping[str, Any]) -> Table:
        path: JsonPath = ("tables", name)
        rules = tuple(self.rule(r, path + ("rules", i), i) for i, r in enumerate(data["rules"]))
        default = self.outcome(data["default"], path + ("default",)) if "default" in data else None
        return Table(name, rules, default, self.lines.at(path))

    def check_hand_overs(self, tables: Mapping[str, Table]) -> None:
        """Every hand-over names an existing table, and no table can be re-entered (that would never end)."""
        for table in tables.values():
            for rule in table.rules:
                target = rule.then.table
                if target is not None and target not in tables:
                    self.findings.append(Finding(
                        self.source, rule.then.line, "unknown-table",
                        f"rule '{rule.id}' hands over to table '{target}', which does not exist; tables: {', '.join(tables)}",
                    ))
        state: dict[str, int] = {}  # 1: on the current path, 2: finished

        def visit(name: str, trail: list[str]) -> None:
            state[name] = 1
            for rule in tables[name].rules:
                target = rule.then.table
                if target is None or target not in tables:
                    continue
                if state.get(target) == 1:
                    cycle = " -> ".join(trail[trail.index(target):] + [target])
                    self.findings.append(Finding(
                        self.source, rule.then.line, "cycle",
                        f"rule '{rule.id}' hands over in a cycle ({cycle}); a table cannot hand over to itself or to a table that leads back to it",
                    ))
                elif target not in state:
                    visit(target, trail + [target])
            state[name] = 2

        for name in tables:
            if name not in state:
                visit(name, [name])


def parse_ruleset(text: str, source_name: str = "<rules>") -> RuleSet:
    """Parse and validate rule-set YAML; raise :class:`RuleSetError` listing every problem found."""
    data, lines = _compose(text, source_name)
    findings = validate_against_schema(data, lines, source_name)
    if findings:
        raise RuleSetError(findings)
    builder = _Builder(lines, source_name)
    tables = {name: builder.table(name, table) for name, table in data["tables"].items()}
    builder.check_hand_overs(tables)
    if builder.findings:
        raise RuleSetError(builder.findings)
    return RuleSet(
        name=data["ruleset"],
        version=data["version"],
        changelog=data["changelog"],
        default=builder.outcome(data["default"], ("default",)),
        tables=tables,
        source=source_name,
    )


def read_rule_text(path: str | Path) -> str:
    """A rule file's text, or a :class:`RuleSetError` naming the file: missing, a directory, unreadable, or not
    UTF-8 text (every command that takes a rule file reports these as findings, not tracebacks)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleSetError([Finding(str(path), 0, "io", f"cannot read rule file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise RuleSetError([Finding(str(path), 0, "io", f"not a UTF-8 text file (byte {exc.start}): expected a YAML "
                                                       f"rule set")]) from None


def load_ruleset(path: str | Path) -> RuleSet:
    """:func:`parse_ruleset` of a file; findings name the file as given."""
    return parse_ruleset(read_rule_text(path), str(path))
