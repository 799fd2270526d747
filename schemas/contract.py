"""Loading the Avro contract: the current schema, every released version, and their fingerprints.

``schemas/<subject>.avsc`` is the current (reader) schema. ``schemas/released/<subject>.v<N>.avsc``
are the versions that have ever been written to a topic; they are never edited or deleted, because
old messages stay in Kafka, in local logs and in evidence bundles, and must stay decodable.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterable

from . import codec, envvars
from .errors import DecodeError, SchemaError

SCHEMA_DIR = Path(__file__).resolve().parent
RELEASED_DIR = SCHEMA_DIR / "released"
EXTRA_SCHEMA_PATH_ENV = "AGENTLEDGER_SCHEMA_PATH"
_RELEASED_RE = re.compile(r"^(?P<subject>[a-z_]+)\.v(?P<version>\d+)\.avsc$")


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass(frozen=True)
class PayloadKind:
    """One member of the payload union."""

    index: int
    name: str  # full Avro name, e.g. dev.agentledger.CommandStarted
    family: str  # session | sandbox | approval | network
    kind: str  # globally unique: session_started, command_finished, network_decided, ...

    @property
    def column(self) -> str:
        """The per-kind STRUCT column of the warehouse's events table."""
        return self.kind

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class SchemaVersion:
    subject: str
    version: int | None  # None: the current, not (yet) released schema
    path: Path
    schema: dict[str, Any] = field(repr=False)
    fingerprint: bytes = b""

    @cached_property
    def parsed(self) -> Any:
        return codec.parse(self.schema)

    @property
    def label(self) -> str:
        return "current" if self.version is None else f"v{self.version}"

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()


def _load(path: Path, subject: str, version: int | None) -> SchemaVersion:
    try:
        schema = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SchemaError(f"cannot read schema {path}: {exc}") from exc
    codec.parse(schema)  # validate early, with a clear error
    return SchemaVersion(subject, version, path, schema, codec.fingerprint(schema))


def payload_kinds(schema: dict[str, Any]) -> list[PayloadKind]:
    namespace = schema.get("namespace", "")
    for f in schema.get("fields", []):
        if f["name"] == "payload":
            members = f["type"]
            break
    else:
        return []
    kinds = []
    for i, member in enumerate(members):
        if not isinstance(member, dict) or member.get("type") != "record":
            raise SchemaError("every payload union member must be an inline record")
        name = member["name"] if "." in member["name"] else f"{member.get('namespace', namespace)}.{member['name']}"
        try:
            family, kind = member["agentledger.family"], member["agentledger.kind"]
        except KeyError as exc:
            raise SchemaError(f"payload record {name} lacks agentledger.family / agentledger.kind") from exc
        kinds.append(PayloadKind(i, name, family, kind))
    return kinds


class SchemaStore:
    """Every schema version of one subject, by fingerprint, resolving to the current reader."""

    def __init__(self, subject: str = "event", extra_dirs: Iterable[Path] = ()):
        self.subject = subject
        current_path = SCHEMA_DIR / f"{subject}.avsc"
        if not current_path.exists():
            raise SchemaError(f"no current schema {current_path}")
        self.current = _load(current_path, subject, None)
        self.released: list[SchemaVersion] = []
        dirs = [RELEASED_DIR, *extra_dirs]
        for d in dirs:
            if not Path(d).is_dir():
                continue
            for p in sorted(Path(d).iterdir()):
                m = _RELEASED_RE.match(p.name)
                if m and m["subject"] == subject:
                    self.released.append(_load(p, subject, int(m["version"])))
        self.released.sort(key=lambda v: v.version or 0)
        self._by_fp: dict[bytes, SchemaVersion] = {v.fingerprint: v for v in self.released}
        self._by_fp.setdefault(self.current.fingerprint, self.current)
        self.kinds = payload_kinds(self.current.schema)
        self._kind_by_name = {k.name: k for k in self.kinds}
        self._kind_by_short = {k.short_name: k for k in self.kinds}

    # -- lookup ---------------------------------------------------------------------------
    @property
    def fingerprints(self) -> list[bytes]:
        return list(self._by_fp)

    def by_fingerprint(self, fp: bytes) -> SchemaVersion | None:
        return self._by_fp.get(fp)

    def kind(self, record_name: str) -> PayloadKind:
        k = self._kind_by_name.get(record_name) or self._kind_by_short.get(record_name.rsplit(".", 1)[-1])
        if k is None:
            raise SchemaError(f"unknown payload record {record_name!r}")
        return k

    def kind_by_label(self, family: str, kind: str) -> PayloadKind:
        for k in self.kinds:
            if k.family == family and k.kind == kind:
                return k
        raise SchemaError(f"unknown event kind {family}.{kind}")

    @property
    def is_current_released(self) -> bool:
        return any(v.fingerprint == self.current.fingerprint for v in self.released)

    # -- codec ----------------------------------------------------------------------------
    def encode(self, record: dict[str, Any]) -> bytes:
        """Body bytes of ``record`` under the current schema."""
        return codec.encode(self.current.parsed, record)

    def decode(self, value: bytes) -> dict[str, Any]:
        """Decode a single-object-encoded message, resolved to the current reader schema."""
        fp, body = codec.soe_split(value)
        writer = self._by_fp.get(fp)
        if writer is None:
            raise DecodeError("unknown_fingerprint", fp.hex())
        reader = None if writer is self.current or writer.fingerprint == self.current.fingerprint else self.current.parsed
        return codec.decode(body, writer.parsed, reader)


def _extra_dirs_from_env() -> tuple[Path, ...]:
    raw = envvars.raw(EXTRA_SCHEMA_PATH_ENV) or ""
    return tuple(Path(p) for p in raw.split(os.pathsep) if p)


@lru_cache(maxsize=8)
def _store(subject: str, extra: tuple[Path, ...]) -> SchemaStore:
    return SchemaStore(subject, extra)


def load_store(subject: str = "event") -> SchemaStore:
    """The process-wide store, including schema dirs named in $AGENTLEDGER_SCHEMA_PATH."""
    return _store(subject, _extra_dirs_from_env())
