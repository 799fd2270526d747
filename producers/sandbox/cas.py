"""The recording store: a content-addressed store (CAS) of what a sandboxed session read, wrote and
received, plus one manifest per session that ties event seqs to blobs.

Layout under ``$AGENTLEDGER_HOME/cas`` (directory mode 0700, files 0600, because blobs hold file
contents, environment values and response bodies that events deliberately never carry)::

    blobs/ab/cd/abcd...   a blob, named by the hex SHA-256 of its bytes
    sessions/<id>.json    the session manifest (see `SessionManifest`)
    tmp/                  partial writes, renamed into place when complete

Guarantees:

- A blob's name is the SHA-256 of its content; `get` re-hashes what it reads and raises
  `StoreError` on a mismatch, so a tampered or truncated blob is never served as evidence.
- Blobs are written to ``tmp/`` and renamed into place: a reader never sees half a blob. Blob
  files are not fsync-ed one by one (a session snapshot may be thousands of files); manifests are
  fsync-ed and replaced atomically. After a power loss a manifest may name a blob that did not
  reach the disk; re-execution then reports it as missing rather than using wrong bytes.
- Bounds: a blob larger than ``max_blob_bytes`` is not stored, nor is any blob once the store
  holds ``max_total_bytes``; ``put`` says so (``stored=False`` with a reason) and the caller
  records a ``gap`` event, so the record states what cannot be re-executed. The total is
  measured when the store is opened and counted up by this process: concurrent writers may
  overshoot it by what they add in parallel.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agentledger.schemas import envvars
from agentledger.schemas.canonical import canonical_json
from agentledger.schemas.errors import ConfigError

from .errors import StoreError

DEFAULT_MAX_BLOB_BYTES = envvars.declared("AGENTLEDGER_CAS_MAX_BLOB_BYTES").default
DEFAULT_MAX_TOTAL_BYTES = envvars.declared("AGENTLEDGER_CAS_MAX_BYTES").default
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_CHUNK = 1024 * 1024


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_session_id(session_id: str) -> str:
    if not _SESSION_ID.match(session_id or "") or session_id in (".", ".."):
        raise StoreError(f"invalid session id {session_id!r}: use letters, digits and . _ : - (at most 128)")
    return session_id


def _env_int(env: dict, name: str) -> int:
    try:
        value = envvars.get(name, env)
    except ConfigError as exc:
        raise StoreError(str(exc)) from None
    if value < 0:
        raise StoreError(f"{name} must not be negative")
    return value


@dataclass(frozen=True)
class Stored:
    digest: str
    size: int
    stored: bool
    reason: str | None = None  # why it was not stored: blob_too_large | store_full


class ContentStore:
    def __init__(self, root: Path, *, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
                 max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES):
        self.root = Path(root)
        self.max_blob_bytes = max_blob_bytes
        self.max_total_bytes = max_total_bytes
        self._usage: int | None = None
        self._dirs: set[Path] = set()
        for d in (self.root, self.root / "blobs", self.root / "sessions", self.root / "tmp"):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, 0o700)

    @classmethod
    def open(cls, home: Path, env: dict | None = None, **overrides) -> "ContentStore":
        """The store under ``home``; bounds from AGENTLEDGER_CAS_MAX_BLOB_BYTES / _MAX_BYTES unless given."""
        env = os.environ if env is None else env
        opts = {
            "max_blob_bytes": _env_int(env, "AGENTLEDGER_CAS_MAX_BLOB_BYTES"),
            "max_total_bytes": _env_int(env, "AGENTLEDGER_CAS_MAX_BYTES"),
        }
        opts.update({k: v for k, v in overrides.items() if v is not None})
        return cls(Path(home) / "cas", **opts)

    # -- blobs ----------------------------------------------------------------------------
    def path(self, digest: str) -> Path:
        if not _HEX64.match(digest or ""):
            raise StoreError(f"not a sha256 digest: {digest!r}")
        return self.root / "blobs" / digest[:2] / digest[2:4] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def usage(self) -> int:
        if self._usage is None:
            total = 0
            for dirpath, _, files in os.walk(self.root / "blobs"):
                for f in files:
                    try:
                        total += os.stat(os.path.join(dirpath, f)).st_size
                    except FileNotFoundError:
                        pass
            self._usage = total
        return self._usage

    def _admit(self, digest: str, size: int) -> Stored | None:
        """None when the blob may be written; otherwise the answer to give."""
        if self.has(digest):
            return Stored(digest, size, True)
        if size > self.max_blob_bytes:
            return Stored(digest, size, False, "blob_too_large")
        if self.usage() + size > self.max_total_bytes:
            return Stored(digest, size, False, "store_full")
        return None

    def _place(self, tmp: Path, digest: str, size: int) -> Stored:
        dest = self.path(digest)
        if dest.parent not in self._dirs:  # one mkdir per fan-out directory and process, not per blob
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._dirs.add(dest.parent)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
        self._usage = self.usage() + size
        return Stored(digest, size, True)

    def put(self, data: bytes) -> Stored:
        digest = sha256_hex(data)
        answer = self._admit(digest, len(data))
        if answer is not None:
            return answer
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self._place(Path(tmp), digest, len(data))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, path: str | os.PathLike, known_digest: str | None = None) -> Stored:
        """Store a file's content. ``known_digest`` (from a snapshot) saves re-reading a stored blob."""
        size = os.stat(path).st_size
        if known_digest and self.has(known_digest):
            return Stored(known_digest, size, True)
        if size > self.max_blob_bytes or (self.usage() + size > self.max_total_bytes):
            digest = known_digest or file_digest(path)
            return self._admit(digest, size) or Stored(digest, size, False, "store_full")
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        h = hashlib.sha256()
        n = 0
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
            digest = h.hexdigest()
            if self.has(digest):
                Path(tmp).unlink()
                return Stored(digest, n, True)
            return self._place(Path(tmp), digest, n)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, digest: str) -> bytes:
        p = self.path(digest)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"blob {digest[:16]}… is not in the recording store {self.root}") from None
        if sha256_hex(data) != digest:
            raise StoreError(f"blob {digest[:16]}… in {self.root} is corrupt (its content does not hash to its name)")
        return data

    def get_or_none(self, digest: str | None) -> bytes | None:
        if not digest:
            return None
        try:
            return self.get(digest)
        except StoreError:
            return None

    def copy_to(self, digest: str, dest: str | os.PathLike) -> None:
        """Write a blob to ``dest`` (verified while copying)."""
        src = self.path(digest)
        h = hashlib.sha256()
        try:
            with open(src, "rb") as f, open(dest, "wb") as out:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
        except FileNotFoundError:
            raise StoreError(f"blob {digest[:16]}… is not in the recording store {self.root}") from None
        if h.hexdigest() != digest:
            raise StoreError(f"blob {digest[:16]}… in {self.root} is corrupt")

    def put_json(self, obj) -> Stored:
        return self.put(canonical_json(obj))

    def get_json(self, digest: str):
        return json.loads(self.get(digest))

    # -- manifests ------------------------------------------------------------------------
    def manifest_path(self, session_id: str) -> Path:
        return self.root / "sessions" / f"{check_session_id(session_id)}.json"

    def load_manifest(self, session_id: str) -> dict | None:
        p = self.manifest_path(session_id)
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise StoreError(f"manifest {p} is not valid JSON: {exc}") from exc

    def save_manifest(self, session_id: str, manifest: dict) -> None:
        p = self.manifest_path(session_id)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def referenced(store: ContentStore, manifest: dict) -> set[str]:
    """Every blob a session manifest needs (directly, or through trees and response records)."""
    refs: set[str] = set()

    def add(d):
        if isinstance(d, str) and _HEX64.match(d):
            refs.add(d)

    add(manifest.get("policy"))
    for c in manifest.get("commands", {}).values():
        for k in ("env", "stdin", "stdout", "stderr"):
            add(c.get(k))
        for k in ("workspace_before", "workspace_after"):
            d = c.get(k)
            add(d)
            if d and store.has(d):
                try:
                    for entry in store.get_json(d).get("entries", {}).values():
                        if entry[0] == "f":
                            add(entry[2])
                except (StoreError, ValueError):
                    pass
    for x in manifest.get("exchanges", {}).values():
        add(x.get("response"))
        add(x.get("body_digest"))
    return refs


def forget(store: ContentStore, session_id: str) -> tuple[int, int]:
    """Delete a session's manifest and every blob no other manifest needs. Returns (blobs, bytes) freed."""
    store.manifest_path(session_id).unlink(missing_ok=True)
    keep: set[str] = set()
    for m in (store.root / "sessions").glob("*.json"):
        try:
            keep |= referenced(store, json.loads(m.read_text()))
        except (OSError, json.JSONDecodeError):
            return 0, 0  # an unreadable manifest: keep everything rather than guess
    n = size = 0
    for dirpath, _, files in os.walk(store.root / "blobs"):
        for f in files:
            if f not in keep:
                p = os.path.join(dirpath, f)
                size += os.stat(p).st_size
                os.unlink(p)
                n += 1
    store._usage = None
    return n, size


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def stream_digest(f: BinaryIO) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while chunk := f.read(_CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n
