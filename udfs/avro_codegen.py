"""What the generated Avro writer and reader (udfs/avro_writer.py, udfs/avro_reader.py) share: walking a schema
into lines of Python, resolving named types, and compiling the lines into one function.

Each subclass says how to write or read one kind of value (:meth:`SchemaCodeGenerator.kind`) and a union; this
base resolves what the schema names to that kind, so both stay in step on what is compiled and what is left to
fastavro (:class:`Unsupported`).
"""

from __future__ import annotations

from typing import Any, Callable


class Unsupported(Exception):
    """A schema construct the generators do not compile: the caller keeps fastavro."""


class SchemaCodeGenerator:
    """Collects the lines of one generated function; ``constants`` become its globals."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.constants: dict[str, Any] = {}
        self.named: dict[str, Any] = {}
        self.count = 0

    def name(self, prefix: str) -> str:
        """A fresh local (or constant) name."""
        self.count += 1
        return f"{prefix}{self.count}"

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def register(self, schema: dict[str, Any]) -> None:
        """A named type (record, enum, fixed), by its name and its full name, for later references."""
        self.named[schema["name"]] = schema
        if "namespace" in schema:
            self.named[f"{schema['namespace']}.{schema['name']}"] = schema

    def value(self, schema: Any, expr: str, indent: int) -> None:
        """The code for one value of ``schema``: a union, a reference to a named type, ``{"type": ...}`` or a
        kind (primitive or complex); ``expr`` is what the subclass writes from or reads into."""
        if isinstance(schema, list):
            return self.union(schema, expr, indent)
        if isinstance(schema, str):
            if schema in self.named:
                return self.value(self.named[schema], expr, indent)
            return self.kind(schema, schema, expr, indent)
        if isinstance(schema, dict):
            kind = schema["type"]
            if isinstance(kind, (list, dict)) or kind in self.named:  # {"type": <a type>}: that type
                return self.value(kind, expr, indent)
            if kind in ("record", "enum", "fixed"):
                self.register(schema)
            return self.kind(kind, schema, expr, indent)
        raise Unsupported(repr(schema))

    def kind(self, kind: str, schema: Any, expr: str, indent: int) -> None:
        raise NotImplementedError

    def union(self, branches: list[Any], expr: str, indent: int) -> None:
        raise NotImplementedError

    def null_union(self, branches: list[Any]) -> tuple[int, Any]:
        """(index of null, the other branch) of a two-branch union with null, the only unions compiled."""
        if len(branches) != 2 or "null" not in branches:
            raise Unsupported(f"union {branches}")
        null_index = branches.index("null")
        return null_index, branches[1 - null_index]

    def generate(self, schema: Any, *, header: str, prologue: str, epilogue: str, kind: str,
                 namespace: dict[str, Any]) -> Callable[..., Any] | None:
        """The function ``header`` whose body is ``prologue``, the code for one value of ``schema`` (held in
        ``record``) and ``epilogue``; None when the schema has something not compiled (then use fastavro)."""
        self.emit(1, prologue)
        try:
            self.value(schema, "record", 1)
        except Unsupported:
            return None
        self.emit(1, epilogue)
        return self.build(header, schema, kind, namespace)

    def build(self, header: str, schema: Any, kind: str, namespace: dict[str, Any]) -> Callable[..., Any]:
        """Compile ``header`` + the emitted lines into a function; ``kind`` and the schema's name label it in
        tracebacks; its source is kept as ``.source`` for debugging."""
        source = header + "\n" + "\n".join(self.lines) + "\n"
        label = schema.get("name", "?") if isinstance(schema, dict) else "?"
        scope = {**namespace, **self.constants}
        exec(compile(source, f"<avro {kind} {label}>", "exec"), scope)
        function = scope[header.split()[1].split("(")[0]]
        function.source = source
        return function
