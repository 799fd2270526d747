"""FULL_TRANSITIVE compatibility of a candidate schema against every released version.

Uses the Apache `avro` package's ReaderWriterCompatibilityChecker; we do not write a checker.
BACKWARD: the candidate (as reader) reads data of each released version (as writer).
FORWARD: each released version (as reader) reads data of the candidate (as writer).
FULL = both; TRANSITIVE = against every released version, not only the latest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from .contract import SchemaStore, SchemaVersion
from .errors import SchemaError


@dataclass(frozen=True)
class CompatResult:
    version: str
    backward: bool
    forward: bool
    messages: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.backward and self.forward


def _parse(schema: dict[str, Any], where: str) -> avro.schema.Schema:
    try:
        return avro.schema.parse(json.dumps(schema))
    except Exception as exc:  # avro raises SchemaParseException and others
        raise SchemaError(f"{where}: not a valid Avro schema: {exc}") from exc


def _where(schemas: list[dict[str, Any]], location: str) -> str:
    """A checker location (a JSON pointer such as ``/fields/9/type/13``) in words: the field path
    and, for a union branch, the branch's record name -- read from the first schema it exists in."""
    for schema in schemas:
        node: Any = schema
        words: list[str] = []
        parts = [p for p in location.split("/") if p]
        try:
            for i, part in enumerate(parts):
                if isinstance(node, list):
                    node = node[int(part)]
                    if isinstance(node, dict) and parts[i - 1] == "type":
                        words.append(f"union branch {part}" + (f" ({node['name']})" if node.get("name") else ""))
                elif part == "fields":
                    continue
                elif parts[i - 1] == "fields":
                    node = node["fields"][int(part)]
                    words.append(str(node["name"]))
                else:
                    node = node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            continue
        return " > ".join(words) or "the record"
    return location


def _check(reader: avro.schema.Schema, writer: avro.schema.Schema,
           schemas: list[dict[str, Any]] | None = None) -> tuple[bool, list[str]]:
    r = ReaderWriterCompatibilityChecker().get_compatibility(reader, writer)  # type: ignore[no-untyped-call]
    ok = r.compatibility is SchemaCompatibilityType.compatible
    kinds = ", ".join(sorted(i.name for i in r.incompatibilities))
    msgs = [] if ok else [f"{kinds}: {m}" for m in sorted(r.messages)] + [
        f"at {loc}" + (f" ({_where(schemas, loc)})" if schemas and loc != "/" else "") for loc in sorted(r.locations)]
    return ok, msgs


def check_full_transitive(candidate: dict[str, Any], released: list[SchemaVersion]) -> list[CompatResult]:
    cand = _parse(candidate, "candidate")
    out = []
    for v in released:
        old = _parse(v.schema, str(v.path))
        back, m1 = _check(cand, old, [candidate, v.schema])
        fwd, m2 = _check(old, cand, [candidate, v.schema])
        out.append(CompatResult(v.label, back, fwd, tuple([*(f"backward: {m}" for m in m1), *(f"forward: {m}" for m in m2)])))
    return out


def check_store(store: SchemaStore, candidate_path: Path | None = None) -> list[CompatResult]:
    if candidate_path is None:
        candidate = store.current.schema
    else:
        try:
            candidate = json.loads(Path(candidate_path).read_text())
        except (OSError, ValueError) as exc:
            raise SchemaError(f"cannot read {candidate_path}: {exc}") from exc
    return check_full_transitive(candidate, store.released)
