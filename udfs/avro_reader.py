"""A schemaless Avro reader generated for one schema: the job's decoder for events written with the schema it reads.

The twin of :mod:`udfs.avro_writer`. fastavro's reader walks the parsed schema for every record and builds a
file-like reader around it; straight-line Python for the one schema the events are written with (one-byte
lengths and union indexes read inline) decodes the same dicts in a fraction of the time (docs/performance.md).

It is deliberately strict and has no error messages of its own: anything unexpected (a truncated record, a bad
union or enum index, invalid UTF-8, a negative length) raises, and :class:`udfs.avro_codec.SingleObjectCodec`
then decodes the record with fastavro, which either reads it or gives the error a dead letter carries. Records
written with another version of the schema (schema resolution) always go to fastavro.

Compiled: primitives, records, enums, arrays, maps, fixed and two-branch unions with null; :func:`compile_reader`
returns None for anything else.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from udfs.avro_codegen import SchemaCodeGenerator, Unsupported

Reader = Callable[[bytes, int], tuple[Any, int]]

_unpack_double = struct.Struct("<d").unpack_from
_unpack_float = struct.Struct("<f").unpack_from


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The raw (still zig-zag encoded) varint at ``pos`` and the position after it."""
    shift = result = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 56:  # a tenth byte: values near ±2**63, left to fastavro, whose C longs wrap as Avro's do
            raise ValueError("varint of ten bytes")


class _ReaderGenerator(SchemaCodeGenerator):
    """Emits the body of ``read(b, p)``: ``b`` the bytes, ``p`` the position, ``E`` their length."""

    def long(self, indent: int, target: str) -> None:
        """``target`` = the next Avro int/long (one-byte values inline)."""
        self.emit(indent, "x = b[p]; p += 1")
        self.emit(indent, "if x > 0x7F: x, p = VARINT(b, p - 1)")
        self.emit(indent, f"{target} = (x >> 1) ^ -(x & 1)")

    def sized(self, indent: int, target: str, convert: str) -> None:
        """``target`` = the next length-prefixed bytes, through ``convert`` (e.g. ``.decode()``)."""
        self.long(indent, "n")
        self.emit(indent, "if n < 0 or p + n > E: raise EOFError")
        self.emit(indent, f"{target} = b[p:p + n]{convert}; p += n")

    def kind(self, kind: str, schema: Any, target: str, indent: int) -> None:
        if kind == "null":
            self.emit(indent, f"{target} = None")
        elif kind == "boolean":
            self.emit(indent, "x = b[p]; p += 1")
            self.emit(indent, "if x > 1: raise ValueError")
            self.emit(indent, f"{target} = x == 1")
        elif kind in ("int", "long"):
            self.long(indent, target)
        elif kind == "double":
            self.emit(indent, f"{target} = UD(b, p)[0]; p += 8")
        elif kind == "float":
            self.emit(indent, f"{target} = UF(b, p)[0]; p += 4")
        elif kind == "string":
            self.sized(indent, target, ".decode()")
        elif kind == "bytes":
            self.sized(indent, target, "")
        elif kind == "fixed":
            size = int(schema["size"])
            self.emit(indent, f"if p + {size} > E: raise EOFError")
            self.emit(indent, f"{target} = b[p:p + {size}]; p += {size}")
        elif kind == "enum":
            symbols = self.name("S")
            self.constants[symbols] = tuple(schema["symbols"])
            self.long(indent, "i")
            self.emit(indent, "if i < 0: raise IndexError")
            self.emit(indent, f"{target} = {symbols}[i]")
        elif kind in ("array", "map"):
            self.collection(schema, kind, target, indent)
        elif kind == "record":
            names = [self.name("f") for _ in schema["fields"]]
            for field, local in zip(schema["fields"], names):
                self.value(field["type"], local, indent)
            fields = ", ".join(f"{f['name']!r}: {local}" for f, local in zip(schema["fields"], names))
            self.emit(indent, f"{target} = {{{fields}}}")
        else:
            raise Unsupported(str(kind))

    def collection(self, schema: Any, kind: str, target: str, indent: int) -> None:
        """Arrays and maps: blocks of ``count`` items until a zero count; a negative count has a byte size."""
        items, count, item = self.name("c"), self.name("k"), self.name("v")
        self.emit(indent, f"{items} = {'[]' if kind == 'array' else '{}'}")
        self.emit(indent, "while True:")
        self.long(indent + 1, count)
        self.emit(indent + 1, f"if {count} == 0: break")
        self.emit(indent + 1, f"if {count} < 0:")
        self.emit(indent + 2, f"{count} = -{count}")
        self.long(indent + 2, "_size")
        self.emit(indent + 1, f"for _ in range({count}):")
        if kind == "array":
            self.value(schema["items"], item, indent + 2)
            self.emit(indent + 2, f"{items}.append({item})")
        else:
            key = self.name("m")
            self.sized(indent + 2, key, ".decode()")
            self.value(schema["values"], item, indent + 2)
            self.emit(indent + 2, f"{items}[{key}] = {item}")
        self.emit(indent, f"{target} = {items}")

    def union(self, branches: list[Any], target: str, indent: int) -> None:
        null_index, other = self.null_union(branches)
        self.emit(indent, "x = b[p]; p += 1")  # index 0 or 1: one zig-zag byte, 0x00 or 0x02
        self.emit(indent, f"if x == {2 * null_index}:")
        self.emit(indent + 1, f"{target} = None")
        self.emit(indent, f"elif x == {2 * (1 - null_index)}:")
        self.value(other, target, indent + 1)
        self.emit(indent, "else:")
        self.emit(indent + 1, "raise ValueError")


def compile_reader(schema: Any) -> Reader | None:
    """``read(payload, start) -> (record, end)`` for records written with ``schema`` (parsed or JSON form), or
    None when the schema uses something this generator does not compile (then use fastavro)."""
    return _ReaderGenerator().generate(
        schema, header="def read(b, p):", prologue="E = len(b)", epilogue="return record, p", kind="reader",
        namespace={"VARINT": read_varint, "UD": _unpack_double, "UF": _unpack_float})
