"""Avro single-object encoding (magic ``C3 01`` + 8-byte CRC-64-AVRO fingerprint + body) with fastavro.

The schemas in ``avro/`` are the one source of truth. A :class:`SchemaStore` knows every schema version by its
fingerprint, so a reader built against the schema the code was written for still decodes records written with a
compatible newer (or older) version: fastavro resolves writer against reader schema.

Timestamps stay epoch milliseconds (ints) on the hot path: the ``timestamp-millis`` logical type is dropped from
the schemas used for (de)serialisation, which does not change a single byte on the wire (the parsing canonical
form and therefore the fingerprint ignore logical types), but avoids a datetime round trip per field.
"""

from __future__ import annotations

import copy
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from udfs.avro_reader import compile_reader
from udfs.avro_writer import compile_writer

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
AVRO_DIR = Path(os.environ.get("ONRAMP_AVRO_DIR", Path(__file__).resolve().parents[1] / "avro"))

EVENT_SCHEMA = "io.onramp.OnboardingEvent"
DECISION_SCHEMA = "io.onramp.NextStepDecision"
DEAD_LETTER_SCHEMA = "io.onramp.DeadLetter"
AUDIT_SCHEMA = "io.onramp.AuditRecord"


class CodecError(ValueError):
    """A record could not be decoded; ``code`` is the machine-readable dead-letter reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _strip_logical_timestamps(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _strip_logical_timestamps(v) for k, v in node.items()}
        if out.get("logicalType") in ("timestamp-millis", "timestamp-micros") and out.get("type") == "long":
            del out["logicalType"]
        return out
    if isinstance(node, list):
        return [_strip_logical_timestamps(v) for v in node]
    return node


@dataclass(frozen=True)
class SchemaVersion:
    """One parsed schema with its fingerprint (the 8 bytes that follow the magic on the wire)."""

    name: str
    fingerprint: bytes
    parsed: Any
    source: str

    @classmethod
    def from_json(cls, schema: dict[str, Any], source: str = "<inline>") -> "SchemaVersion":
        parsed = parse_schema(_strip_logical_timestamps(copy.deepcopy(schema)))
        canonical = to_parsing_canonical_form(parse_schema(copy.deepcopy(schema), _write_hint=False))
        fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))  # already little-endian, as the spec wants
        name = parsed["name"] if "." in parsed["name"] else f"{schema.get('namespace', '')}.{parsed['name']}"
        return cls(name=name, fingerprint=fp, parsed=parsed, source=source)


class SchemaStore:
    """Every known schema version, by fingerprint, plus the reader version per record name."""

    def __init__(self) -> None:
        self._by_fp: dict[bytes, SchemaVersion] = {}
        self._readers: dict[str, SchemaVersion] = {}

    def add(self, version: SchemaVersion, *, reader: bool = False) -> SchemaVersion:
        self._by_fp[version.fingerprint] = version
        if reader or version.name not in self._readers:
            self._readers[version.name] = version
        return version

    def add_file(self, path: Path, *, reader: bool = False) -> SchemaVersion:
        return self.add(SchemaVersion.from_json(json.loads(path.read_text()), str(path)), reader=reader)

    @classmethod
    def load(cls, avro_dir: Path = AVRO_DIR, extra_dirs: Iterable[Path] = ()) -> "SchemaStore":
        """The ``*.avsc`` files directly in ``avro_dir`` are the reader schemas; ``avro_dir/versions`` and
        ``extra_dirs`` hold other known writer versions, registered by fingerprint only."""
        store = cls()
        top = sorted(avro_dir.glob("*.avsc"))
        if not top:
            raise FileNotFoundError(f"no Avro schemas found in {avro_dir} (set ONRAMP_AVRO_DIR)")
        for path in top:
            store.add_file(path, reader=True)
        for directory in [avro_dir / "versions", *extra_dirs]:
            for path in sorted(Path(directory).glob("*.avsc")):
                store.add_file(path)
        return store

    def reader(self, name: str) -> SchemaVersion:
        try:
            return self._readers[name]
        except KeyError:
            raise KeyError(f"no schema named {name}; known: {sorted(self._readers)}") from None

    def by_fingerprint(self, fp: bytes) -> SchemaVersion | None:
        return self._by_fp.get(fp)


class SingleObjectCodec:
    """Encode/decode one record type in single-object encoding.

    Decoding a record written with another known version of the same record resolves it to this codec's schema.
    """

    def __init__(self, store: SchemaStore, name: str, writer: SchemaVersion | None = None) -> None:
        self.store = store
        self.schema = store.reader(name)
        self.writer = writer or self.schema
        self._header = MAGIC + self.writer.fingerprint
        self._resolved: dict[bytes, Any] = {}
        # Generated for this schema (udfs/avro_writer.py): the same bytes as fastavro at half the cost.
        self._compiled = compile_writer(self.writer.parsed, self._header)
        # Generated reader for records written with the reader schema itself (udfs/avro_reader.py)
        self._compiled_reader = compile_reader(self.schema.parsed)

    def encode(self, record: dict[str, Any]) -> bytes:
        if self._compiled is not None:
            try:
                return self._compiled(record)
            except Exception:  # a value it cannot write: fastavro writes it or raises its usual error
                pass
        return self._encode_fastavro(record)

    def _encode_fastavro(self, record: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(self._header)
        fastavro.schemaless_writer(buf, self.writer.parsed, record)
        return buf.getvalue()

    def decode(self, payload: bytes) -> dict[str, Any]:
        if len(payload) < HEADER_LEN or payload[:2] != MAGIC:
            raise CodecError("not_single_object", "record is not Avro single-object encoded (missing C3 01 header)")
        fp = bytes(payload[2:HEADER_LEN])
        if fp == self.schema.fingerprint and self._compiled_reader is not None:
            try:
                record, end = self._compiled_reader(payload, HEADER_LEN)
                if end == len(payload):
                    return record
            except Exception:  # anything unexpected: fastavro reads it or says what is wrong with it
                pass
        body = io.BytesIO(payload[HEADER_LEN:])
        if fp == self.schema.fingerprint:
            writer, reader = self.schema.parsed, None
        else:
            found = self.store.by_fingerprint(fp)
            if found is None:
                raise CodecError("unknown_schema", f"unknown writer schema fingerprint {fp.hex()}")
            if found.name != self.schema.name:
                raise CodecError("unknown_schema", f"record is a {found.name}, expected {self.schema.name}")
            writer, reader = found.parsed, self.schema.parsed
        try:
            record = fastavro.schemaless_reader(body, writer, reader)
        except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError, UnicodeDecodeError...
            raise CodecError("malformed_avro", f"cannot decode {self.schema.name}: {type(exc).__name__}: {exc}")
        if body.tell() != len(payload) - HEADER_LEN:
            raise CodecError("malformed_avro", f"{len(payload) - HEADER_LEN - body.tell()} trailing bytes after record")
        return record


_DEFAULT_STORE: SchemaStore | None = None


def default_store() -> SchemaStore:
    """The schema store of this installation, loaded once per process."""
    global _DEFAULT_STORE
    if _DEFAULT_STORE is None:
        _DEFAULT_STORE = SchemaStore.load()
    return _DEFAULT_STORE


def event_codec(store: SchemaStore | None = None) -> SingleObjectCodec:
    return SingleObjectCodec(store or default_store(), EVENT_SCHEMA)


def decision_codec(store: SchemaStore | None = None) -> SingleObjectCodec:
    return SingleObjectCodec(store or default_store(), DECISION_SCHEMA)


def dead_letter_codec(store: SchemaStore | None = None) -> SingleObjectCodec:
    return SingleObjectCodec(store or default_store(), DEAD_LETTER_SCHEMA)


def audit_codec(store: SchemaStore | None = None) -> SingleObjectCodec:
    return SingleObjectCodec(store or default_store(), AUDIT_SCHEMA)
