"""Step content templates: a small, strict Mustache subset and the catalog of one template per step and variant.

A decision names a step, a content variant and the resolved ``template_vars``; the onboarding UI renders the
copy. The copy lives in ``rules/templates/<step_id>/<variant>.mustache`` so product people can edit it without
touching rules, and ``rules preview`` / lint can show and check exactly what a user would see.

Supported syntax (the part of Mustache onboarding copy needs, nothing that needs a runtime):

* ``{{name}}`` HTML-escaped, ``{{{name}}}`` and ``{{& name}}`` raw;
* ``{{#name}}...{{/name}}`` rendered when the value is truthy: once for a scalar or a mapping (pushed as the
  context), once per item for a list (``{{.}}`` is the current item); ``{{^name}}...{{/name}}`` when it is not;
* ``{{! comment }}``; dotted names ``a.b`` (resolved like the Mustache spec: ``a`` through the context stack,
  the rest strictly inside it);
* a section, inverted, closing or comment tag alone on its line takes the line with it (spec "standalone").

Partials, delimiter changes and lambdas are refused at parse time rather than rendered wrongly. A template is
parsed once into nodes (:func:`parse`) and rendered many times. An unknown variable renders as ``""`` (a
decision must never fail on copy) but is reported in :attr:`RenderedContent.missing_variables`, and
:meth:`TemplateCatalog.check` lets a linter catch it before deploying.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from udfs.onboarding_catalog import ONBOARDING_STEPS

TEMPLATE_SUFFIX = ".mustache"
DEFAULT_VARIANT = "default"
# Steps a decision can name: the onboarding flow plus the rules' special answers (see udfs/next_step.py).
CATALOG_STEPS: tuple[str, ...] = (*ONBOARDING_STEPS, "concierge_call", "none")
DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "rules" / "templates"

_NAME = re.compile(r"^(?:\.|[A-Za-z0-9_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_][A-Za-z0-9_-]*)*)$")
_UNSUPPORTED = {">": "partials", "<": "parent templates", "$": "blocks", "=": "delimiter changes"}


class TemplateError(ValueError):
    """A template cannot be parsed (or loaded): ``origin:line: message``."""

    def __init__(self, origin: str, line: int | None, message: str) -> None:
        super().__init__(f"{origin}:{line}: {message}" if line is not None else f"{origin}: {message}")
        self.origin = origin
        self.line = line
        self.message = message


class TemplateNotFoundError(LookupError):
    """The catalog has neither the requested variant nor a default template for a step."""


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    escape: bool
    line: int


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    inverted: bool
    children: tuple["Node", ...]
    line: int


Node = Text | Variable | Section

_MISSING: Any = object()


def _path(name: str) -> tuple[str, ...]:
    return () if name == "." else tuple(name.split("."))


def _lookup(stack: list[Any], name: str) -> Any:
    """Mustache name resolution: the first part through the context stack (innermost first), the rest strictly
    inside the value found, so ``{{user.name}}`` never picks up an unrelated outer ``name``."""
    path = _path(name)
    if not path:
        return stack[-1]
    head, rest = path[0], path[1:]
    for frame in reversed(stack):
        if isinstance(frame, Mapping) and head in frame:
            value = frame[head]
            break
    else:
        return _MISSING
    for part in rest:
        if not (isinstance(value, Mapping) and part in value):
            return _MISSING
        value = value[part]
    return value


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template; immutable, so one instance can be rendered concurrently and many times."""

    origin: str
    nodes: tuple[Node, ...]

    def render(self, variables: Mapping[str, Any]) -> str:
        return self.render_reporting(variables)[0]

    def render_reporting(self, variables: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
        """The text, and the interpolated names that resolved to nothing (each once, in order of use).

        A section over a missing name is not reported: ``{{#top_topic}}...{{/top_topic}}`` is how a template
        says "only if there is one"."""
        out: list[str] = []
        missing: dict[str, None] = {}
        _render(self.nodes, [variables], out, missing)
        return "".join(out), tuple(missing)


def _render(nodes: Sequence[Node], stack: list[Any], out: list[str], missing: dict[str, None]) -> None:
    for node in nodes:
        if isinstance(node, Text):
            out.append(node.text)
        elif isinstance(node, Variable):
            value = _lookup(stack, node.name)
            if value is _MISSING:
                missing[node.name] = None
            elif value is not None:
                text = str(value)
                out.append(html.escape(text) if node.escape else text)
        else:
            value = _lookup(stack, node.name)
            truthy = value is not _MISSING and bool(value)
            if node.inverted:
                if not truthy:
                    _render(node.children, stack, out, missing)
            elif truthy:
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    stack.append(item)
                    _render(node.children, stack, out, missing)
                    stack.pop()


@dataclass(frozen=True, slots=True)
class _Tag:
    sigil: str  # "" for a variable, "{" for triple mustache, else the Mustache sigil
    name: str
    line: int


def _tokens(source: str, origin: str) -> Iterator[str | _Tag]:
    """Text and tags in order; a standalone section, inverted, closing or comment tag takes its line with it."""
    pos, line = 0, 1
    while (start := source.find("{{", pos)) >= 0:
        line += source.count("\n", pos, start)
        triple = source.startswith("{{{", start)
        opener, closer = ("{{{", "}}}") if triple else ("{{", "}}")
        end = source.find(closer, start + len(opener))
        if end < 0:
            raise TemplateError(origin, line, f"tag opened with {opener} is never closed with {closer}")
        body = source[start + len(opener):end]
        end += len(closer)
        first = body[:1]
        sigil = "{" if triple else (first if first and (first in "#^/!&" or first in _UNSUPPORTED) else "")
        name = "" if sigil == "!" else body[0 if triple else len(sigil):].strip()
        text_end, next_pos = start, end
        if sigil in ("#", "^", "/", "!"):
            line_start = source.rfind("\n", 0, start) + 1
            line_end = source.find("\n", end)
            line_end = len(source) if line_end < 0 else line_end
            if not source[line_start:start].strip(" \t") and not source[end:line_end].strip(" \t\r"):
                text_end, next_pos = line_start, min(line_end + 1, len(source))
        if text_end > pos:
            yield source[pos:text_end]
        yield _Tag(sigil, name, line)
        line += source.count("\n", start, next_pos)
        pos = next_pos
    if pos < len(source):
        yield source[pos:]


def parse(source: str, origin: str = "<string>") -> Template:
    """Compile ``source`` once; raises :class:`TemplateError` naming ``origin`` and the line of the problem."""
    root: list[Node] = []
    # Open sections, innermost last: (name, inverted, line, children collected so far, parent's list).
    open_sections: list[tuple[str, bool, int, list[Node], list[Node]]] = []
    children = root
    for token in _tokens(source, origin):
        if isinstance(token, str):
            children.append(Text(token))
            continue
        if token.sigil == "!":
            continue
        if token.sigil in _UNSUPPORTED:
            raise TemplateError(origin, token.line, f"{_UNSUPPORTED[token.sigil]} ({{{{{token.sigil}...}}}}) are not "
                                                    f"supported by Onramp templates; inline the text instead")
        if not _NAME.match(token.name):
            raise TemplateError(origin, token.line, f"invalid variable name {token.name!r} in tag; use letters, "
                                                    f"digits, _ or -, dotted for nested values (a.b), or . for the "
                                                    f"current item")
        if token.sigil in ("#", "^"):
            open_sections.append((token.name, token.sigil == "^", token.line, [], children))
            children = open_sections[-1][3]
        elif token.sigil == "/":
            if not open_sections:
                raise TemplateError(origin, token.line, f"{{{{/{token.name}}}}} closes a section that was never opened")
            name, inverted, line, body, parent = open_sections.pop()
            if name != token.name:
                raise TemplateError(origin, token.line, f"{{{{/{token.name}}}}} does not match the open section "
                                                        f"{{{{{'^' if inverted else '#'}{name}}}}} from line {line}; "
                                                        f"close it with {{{{/{name}}}}} first")
            parent.append(Section(name, inverted, tuple(body), line))
            children = parent
        else:
            children.append(Variable(token.name, escape=token.sigil == "", line=token.line))
    if open_sections:
        name, inverted, line, _body, _parent = open_sections[-1]
        raise TemplateError(origin, line, f"section {{{{{'^' if inverted else '#'}{name}}}}} is never closed; add "
                                          f"{{{{/{name}}}}}")
    return Template(origin, tuple(root))


def variable_uses(template: Template) -> Iterator[tuple[str, int]]:
    """Every name the template looks up (variables and sections, not ``.``) with its line, in source order."""
    pending: list[Node] = list(reversed(template.nodes))
    while pending:
        node = pending.pop()
        if isinstance(node, Text):
            continue
        if node.name != ".":
            yield node.name, node.line
        if isinstance(node, Section):
            pending.extend(reversed(node.children))


def template_variables(template: Template) -> set[str]:
    """The names a template refers to, for linting against the variables the rules provide.

    Names inside a section over a list of mappings may be the items' keys rather than top-level variables;
    they are listed all the same (onboarding ``template_vars`` are flat strings, so this is the safe reading).
    """
    return {name for name, _line in variable_uses(template)}


@dataclass(frozen=True, slots=True)
class RenderedContent:
    """What a user sees for one decision. ``variant`` is the variant actually rendered: ``default`` when the
    requested one has no template of its own."""

    step_id: str
    variant: str
    text: str
    template_path: str
    missing_variables: tuple[str, ...]


@dataclass(frozen=True)
class TemplateCatalog:
    """All templates under one directory, parsed at load so a broken file fails at startup, not per event."""

    root: Path
    templates: Mapping[tuple[str, str], Template]  # (step_id, variant) -> template
    steps: tuple[str, ...] = CATALOG_STEPS

    @classmethod
    def load(cls, root: Path | str = DEFAULT_TEMPLATE_DIR, steps: Sequence[str] = CATALOG_STEPS) -> "TemplateCatalog":
        root = Path(root)
        if not root.is_dir():
            raise TemplateError(str(root), None, "template directory does not exist; expected "
                                                 f"<dir>/<step_id>/<variant>{TEMPLATE_SUFFIX} files")
        templates: dict[tuple[str, str], Template] = {}
        for path in sorted(root.glob(f"*/*{TEMPLATE_SUFFIX}")):
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TemplateError(str(path), None, f"cannot read template: {exc}") from None
            templates[(path.parent.name, path.name[: -len(TEMPLATE_SUFFIX)])] = parse(source, str(path))
        return cls(root, templates, tuple(steps))

    def path_for(self, step_id: str, variant: str) -> Path:
        return self.root / step_id / f"{variant}{TEMPLATE_SUFFIX}"

    def resolve(self, step_id: str, variant: str) -> tuple[str, Template]:
        """The variant to render and its template: ``variant`` itself, else the step's default."""
        for candidate in (variant, DEFAULT_VARIANT):
            template = self.templates.get((step_id, candidate))
            if template is not None:
                return candidate, template
        raise TemplateNotFoundError(
            f"no template for step {step_id!r} variant {variant!r}: neither {self.path_for(step_id, variant)} nor "
            f"{self.path_for(step_id, DEFAULT_VARIANT)} exists; add the step's {DEFAULT_VARIANT}{TEMPLATE_SUFFIX}")

    def render(self, step_id: str, variant: str, variables: Mapping[str, Any]) -> RenderedContent:
        """The copy for a decision. Trailing whitespace is dropped: files end with a newline and a closing tag on
        the last line leaves one behind, neither of which is copy."""
        used, template = self.resolve(step_id, variant)
        text, missing = template.render_reporting(variables)
        return RenderedContent(step_id, used, text.rstrip(), template.origin, missing)

    def check(self, known_variables: set[str] | frozenset[str]) -> list[str]:
        """Lint findings, one actionable line each (empty when all is well): steps without a default template,
        template directories for steps no rule can choose, and names no rule provides (``a.b`` counts as
        provided when ``a`` is)."""
        problems = [
            f"{self.path_for(step, DEFAULT_VARIANT)}: missing; step {step!r} needs a {DEFAULT_VARIANT} template "
            f"(the fallback for every variant without its own file)"
            for step in self.steps
            if (step, DEFAULT_VARIANT) not in self.templates
        ]
        problems += [
            f"{self.root / step}: step {step!r} is not in the catalog ({', '.join(self.steps)}); its templates are "
            f"never rendered"
            for step in sorted({step for step, _variant in self.templates} - set(self.steps))
        ]
        known_list = ", ".join(sorted(known_variables)) or "none"
        for _key, template in sorted(self.templates.items()):
            reported: set[str] = set()
            for name, line in variable_uses(template):
                if name in reported or name in known_variables or name.split(".")[0] in known_variables:
                    continue
                reported.add(name)
                problems.append(f"{template.origin}:{line}: variable {name!r} is never provided by the rules "
                                f"(provided: {known_list})")
        return problems
