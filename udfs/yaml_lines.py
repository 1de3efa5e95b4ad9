"""YAML text -> plain data + a map from JSON path to line number (and the schema helpers that go with it).

Why: rule sets (``udfs.rules.model``) and experiment files (``udfs.experiment_arms.config``) are edited by hand, so
every error message must name ``file:line`` of the key or item at fault. ``yaml.safe_load`` forgets lines and
silently keeps the last of two duplicate keys, so :func:`compose_with_lines` builds the data from YAML *nodes*
instead, recording each key's and item's line and collecting every bad key (not just the first).

This module only finds problems; it does not word them. Each loader keeps its own error type and message style
(``RuleSetError`` of findings, ``ExperimentConfigError`` of problem strings) and converts a
:class:`YamlSourceError` into it. The JSON-Schema side is shared too: :func:`schema_validator` (a cached
Draft 2020-12 validator per schema file), :data:`TYPE_WORDS` (schema type names in plain words) and
:func:`where` (a JSON path as ``layers[0].id``).

Ships to the Flink cluster: the standard library, PyYAML and jsonschema only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal, Union

import jsonschema
import yaml

JsonPath = tuple[Union[str, int], ...]

#: How a JSON-Schema ``type`` reads in an error message ("expected a mapping, got ...").
TYPE_WORDS = {
    "object": "a mapping", "array": "a list", "string": "a string", "number": "a number",
    "integer": "an integer", "boolean": "true or false", "null": "nothing",
}


class LineMap:
    """1-based line of each key/item of the document, by JSON path; unknown paths use their nearest ancestor."""

    def __init__(self) -> None:
        self.by_path: dict[JsonPath, int] = {}

    def at(self, path: JsonPath) -> int:
        while path not in self.by_path and path:
            path = path[:-1]
        return self.by_path.get(path, 1)


ProblemKind = Literal["empty", "syntax", "key-not-plain", "duplicate-key"]


@dataclass(frozen=True, slots=True)
class YamlProblem:
    """One reason the text is not usable data; the caller words it.

    ``empty``: no document. ``syntax``: not YAML; ``detail`` is PyYAML's explanation. ``key-not-plain``: a key
    that is a mapping or list. ``duplicate-key``: ``key`` appears again; ``first_line`` is its first line.
    ``line`` is the offending line (the key's line for key problems); ``path`` is the mapping holding the key.
    """

    kind: ProblemKind
    line: int
    path: JsonPath = ()
    detail: str = ""
    key: str = ""
    first_line: int = 0


class YamlSourceError(ValueError):
    """YAML that cannot become data. ``problems``: either one ``empty``/``syntax`` problem, or every key problem
    in document order."""

    def __init__(self, problems: list[YamlProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"line {p.line}: {p.kind}" for p in problems))


def _node_to_data(node: yaml.Node, path: JsonPath, lines: LineMap, loader: yaml.SafeLoader,
                  problems: list[YamlProblem], convert_scalar: Callable[[Any], Any]) -> Any:
    lines.by_path.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(YamlProblem("key-not-plain", key_line, path))
                continue
            key = key_node.value  # raw text: `no:` / `on:` stay names instead of becoming YAML 1.1 booleans
            if key in out:
                problems.append(YamlProblem("duplicate-key", key_line, path, key=key,
                                            first_line=lines.at(path + (key,))))
                continue
            lines.by_path[path + (key,)] = key_line
            out[key] = _node_to_data(value_node, path + (key,), lines, loader, problems, convert_scalar)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_data(item, path + (i,), lines, loader, problems, convert_scalar)
                for i, item in enumerate(node.value)]
    try:
        return convert_scalar(loader.construct_object(node))
    except (ValueError, TypeError) as exc:  # a tag that does not fit its text, such as `!!int x`
        raise yaml.MarkedYAMLError(problem=f"cannot read {node.tag} value {node.value!r}: {exc}",
                                   problem_mark=node.start_mark) from None


def syntax_problem(exc: yaml.YAMLError) -> YamlProblem:
    """PyYAML's error as a ``syntax`` problem at the line it points to (1 when it points nowhere)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        return YamlProblem("syntax", mark.line + 1 if mark else 1, detail=problem)
    return YamlProblem("syntax", 1, detail=str(exc))


def _unchanged(value: Any) -> Any:
    return value


def compose_with_lines(text: str, convert_scalar: Callable[[Any], Any] = _unchanged) -> tuple[Any, LineMap]:
    """Parse one YAML document into plain data and the line of every key/item.

    Keys are kept as their raw text; scalars are constructed by ``yaml.SafeLoader`` and passed through
    ``convert_scalar``. Raise :class:`YamlSourceError` if the text is empty or not YAML, or lists every key that
    is not a plain name or appears twice in its mapping.
    """
    lines = LineMap()
    problems: list[YamlProblem] = []
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise YamlSourceError([YamlProblem("empty", 1)])
        data = _node_to_data(node, (), lines, loader, problems, convert_scalar)
    except yaml.YAMLError as exc:
        raise YamlSourceError([syntax_problem(exc)]) from None
    finally:
        loader.dispose()
    if problems:
        raise YamlSourceError(problems)
    return data, lines


@lru_cache(maxsize=None)
def schema_validator(path: Path) -> jsonschema.Draft202012Validator:
    """The Draft 2020-12 validator of the schema file at ``path``, checked once and cached for the process."""
    schema = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def where(path: JsonPath) -> str:
    """A JSON path as an author reads it: ``layers[0].experiments[1].id``; the root is ``top level``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "top level"
