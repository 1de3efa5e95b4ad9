"""A schemaless Avro writer generated for one schema: the job's encoder for the records it makes.

fastavro's writer walks the parsed schema for every record; for the records the job emits per event (the
decision and the audit record) that walk cost 11-15 µs each, as much as the rules. Generating straight-line
Python for the schema once (one ``append`` per field, lengths from a table) writes the same bytes in 6-7 µs
(docs/performance.md). Byte-for-byte equality with fastavro is tested over every record kind the job makes.

Only what the job's schemas use is compiled: primitives, records, enums, arrays, maps, fixed and two-branch
unions with null. :func:`compile_writer` returns None for anything else, and the caller keeps fastavro. A
record the generated code cannot write (a wrong type, a missing field, a datetime for a timestamp) raises, and
:class:`udfs.avro_codec.SingleObjectCodec` then lets fastavro write it or report the error as it always did.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from udfs.avro_codegen import SchemaCodeGenerator, Unsupported

Writer = Callable[[Any], bytes]

_pack_double = struct.Struct("<d").pack
_pack_float = struct.Struct("<f").pack


def zigzag_varint(n: int) -> bytes:
    """An Avro int/long: zig-zag, then 7 bits a byte, low first."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Encoded lengths 0..4095 by table: every string and collection starts with one.
_LENGTHS = tuple(zigzag_varint(i) for i in range(4096))


class _WriterGenerator(SchemaCodeGenerator):
    """Emits the body of ``write(record)``: each value is appended to ``out`` through ``a``."""

    def length(self, indent: int, expr: str) -> None:
        self.emit(indent, f"n = len({expr}); a(N[n] if n < 4096 else V(n))")

    def kind(self, kind: str, schema: Any, expr: str, indent: int) -> None:
        if kind == "null":
            return
        if kind == "boolean":
            self.emit(indent, f"a(b'\\x01' if {expr} else b'\\x00')")
        elif kind in ("int", "long"):
            self.emit(indent, f"a(V({expr}))")
        elif kind == "double":
            self.emit(indent, f"a(D({expr}))")
        elif kind == "float":
            self.emit(indent, f"a(F({expr}))")
        elif kind == "string":
            s = self.name("s")
            self.emit(indent, f"{s} = {expr}.encode()")
            self.length(indent, s)
            self.emit(indent, f"a({s})")
        elif kind == "bytes":
            s = self.name("b")
            self.emit(indent, f"{s} = bytes({expr})")
            self.length(indent, s)
            self.emit(indent, f"a({s})")
        elif kind == "fixed":
            s = self.name("f")
            self.emit(indent, f"{s} = bytes({expr})")
            self.emit(indent, f"if len({s}) != {int(schema['size'])}: raise ValueError('fixed size')")
            self.emit(indent, f"a({s})")
        elif kind == "enum":
            table = self.name("E")
            self.constants[table] = {s: zigzag_varint(i) for i, s in enumerate(schema["symbols"])}
            self.emit(indent, f"a({table}[{expr}])")
        elif kind == "array":
            items, item = self.name("x"), self.name("i")
            self.emit(indent, f"{items} = {expr}")
            self.emit(indent, f"if {items}:")
            self.length(indent + 1, items)
            self.emit(indent + 1, f"for {item} in {items}:")
            self.value(schema["items"], item, indent + 2)
            self.emit(indent, "a(b'\\x00')")
        elif kind == "map":
            entries, key, value = self.name("m"), self.name("k"), self.name("v")
            self.emit(indent, f"{entries} = {expr}")
            self.emit(indent, f"if {entries}:")
            self.length(indent + 1, entries)
            self.emit(indent + 1, f"for {key}, {value} in {entries}.items():")
            self.emit(indent + 2, f"{key} = {key}.encode()")
            self.length(indent + 2, key)
            self.emit(indent + 2, f"a({key})")
            self.value(schema["values"], value, indent + 2)
            self.emit(indent, "a(b'\\x00')")
        elif kind == "record":
            record = self.name("r")
            self.emit(indent, f"{record} = {expr}")
            for field in schema["fields"]:
                nullable = isinstance(field["type"], list) and "null" in field["type"]
                # A nullable field may be left out of the dict (fastavro writes null); any other must be there.
                read = f"{record}.get({field['name']!r})" if nullable else f"{record}[{field['name']!r}]"
                self.value(field["type"], read, indent)
        else:
            raise Unsupported(str(kind))

    def union(self, branches: list[Any], expr: str, indent: int) -> None:
        null_index, other = self.null_union(branches)
        value = self.name("u")
        self.emit(indent, f"{value} = {expr}")
        self.emit(indent, f"if {value} is None:")
        self.emit(indent + 1, f"a({zigzag_varint(null_index)!r})")
        self.emit(indent, "else:")
        self.emit(indent + 1, f"a({zigzag_varint(1 - null_index)!r})")
        self.value(other, value, indent + 1)


def compile_writer(schema: Any, header: bytes = b"") -> Writer | None:
    """``write(record) -> header + Avro body`` for ``schema`` (the JSON form, as in the .avsc file), or None when
    the schema uses something this generator does not compile (then use fastavro)."""
    return _WriterGenerator().generate(
        schema, header="def write(record):", prologue="out = [HEADER]; a = out.append",
        epilogue="return b''.join(out)", kind="writer",
        namespace={"N": _LENGTHS, "V": zigzag_varint, "D": _pack_double, "F": _pack_float, "HEADER": header})
