"""Workspace snapshots: the tree digest recorded before and after every command, and restoring a
recorded tree into a fresh directory.

A snapshot lists every entry under the workspace (directories, regular files, symlinks; others
are listed by type only) with its permission bits and content digest (a symlink: its target).
Modification times and owners are deliberately left out: they change on every re-execution and
would make every replay diverge. The tree digest is the SHA-256 of the snapshot's canonical JSON,
which is also its address in the recording store, so a recorded ``workspace_digest`` names the
exact manifest to restore or compare.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from agentledger.schemas.canonical import canonical_json

from .cas import ContentStore, file_digest, sha256_hex

TREE_FORMAT = "agentledger.tree/1"
_RACY_NS = 1_000_000_000  # a file changed this recently may change again within the same mtime tick


@dataclass(frozen=True)
class Entry:
    type: str  # f file, d directory, l symlink, o other (fifo, socket, device)
    mode: int
    digest: str | None  # files: sha256 of the content; symlinks: the target
    size: int

    def as_list(self) -> list:
        return [self.type, self.mode, self.digest, self.size]


class StatCache:
    """Remembers digests by (size, mtime, ctime, inode) so unchanged files are not re-read. Keyed
    by the SHA-256 of the file's path, not the path: the cache is sandbox state outside the
    recording store, and a workspace file may be named after a secret."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.entries: dict[str, list] = {}
        if path and path.exists():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                self.entries = {}

    def digest(self, abspath: str, st: os.stat_result, now_ns: int) -> str:
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        name = sha256_hex(abspath.encode("utf-8", "surrogateescape"))
        hit = self.entries.get(name)
        if hit and hit[:4] == key:
            return hit[4]
        d = file_digest(abspath)
        if now_ns - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
            self.entries[name] = key + [d]
        else:
            self.entries.pop(name, None)
        return d

    def save(self) -> None:
        if self.path:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)


class Snapshot:
    def __init__(self, root: str, entries: dict[str, Entry]):
        self.root = root
        self.entries = entries
        self._bytes: bytes | None = None

    @property
    def manifest(self) -> dict:
        return {"format": TREE_FORMAT, "entries": {p: e.as_list() for p, e in self.entries.items()}}

    @property
    def canonical(self) -> bytes:
        if self._bytes is None:
            self._bytes = canonical_json(self.manifest)
        return self._bytes

    @property
    def digest(self) -> str:
        return sha256_hex(self.canonical)

    def file_digest(self, rel: str) -> str | None:
        e = self.entries.get(rel)
        return e.digest if e is not None and e.type == "f" else None

    @classmethod
    def from_manifest(cls, root: str, manifest: dict) -> "Snapshot":
        if manifest.get("format") != TREE_FORMAT:
            raise ValueError(f"not a workspace tree manifest: format {manifest.get('format')!r}")
        return cls(root, {p: Entry(*v) for p, v in manifest["entries"].items()})


def take(root: str, *, exclude: tuple[str, ...] = (), cache: StatCache | None = None) -> Snapshot:
    """Snapshot the tree under ``root`` (symlinks are recorded, never followed)."""
    cache = cache or StatCache()
    now = time.time_ns()
    entries: dict[str, Entry] = {}
    excluded = {os.path.normpath(x) for x in exclude}
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            it = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for de in it:
            if de.path in excluded:
                continue
            rel = os.path.relpath(de.path, root)
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                entries[rel] = Entry("d", perm, None, 0)
                stack.append(de.path)
            elif stat.S_ISREG(st.st_mode):
                try:
                    entries[rel] = Entry("f", perm, cache.digest(de.path, st, now), st.st_size)
                except (FileNotFoundError, PermissionError):
                    continue
            elif stat.S_ISLNK(st.st_mode):
                entries[rel] = Entry("l", perm, os.readlink(de.path), 0)
            else:
                entries[rel] = Entry("o", perm, None, 0)
    return Snapshot(root, dict(sorted(entries.items())))


def store_snapshot(snap: Snapshot, store: ContentStore) -> list[tuple[str, str]]:
    """Put the tree manifest and every file it lists into the store.

    Returns (relative path, reason) for each file the store's bounds kept out."""
    missing = []
    for rel, e in snap.entries.items():
        if e.type != "f" or store.has(e.digest):
            continue
        try:
            res = store.put_file(os.path.join(snap.root, rel), known_digest=None)
        except (FileNotFoundError, PermissionError):
            missing.append((rel, "vanished"))
            continue
        if not res.stored:
            missing.append((rel, res.reason or "not stored"))
    store.put(snap.canonical)
    return missing


def changes(a: Snapshot | dict, b: Snapshot | dict) -> dict[str, tuple[list | None, list | None]]:
    """Entries that differ between two snapshots (or manifests' entry dicts): path -> (a, b)."""
    ea = a.manifest["entries"] if isinstance(a, Snapshot) else a
    eb = b.manifest["entries"] if isinstance(b, Snapshot) else b
    out = {}
    for p in sorted(set(ea) | set(eb)):
        va, vb = ea.get(p), eb.get(p)
        if va != vb:
            out[p] = (va, vb)
    return out


def _remove(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(path)


def _materialise(dest_root: str, rel: str, v: list, store: ContentStore, missing: list[str]) -> None:
    kind, mode, digest, _ = v
    path = os.path.join(dest_root, rel)
    if kind == "d":
        if os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path)):
            _remove(path)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode | 0o700)  # owner needs access while restoring; exact mode set at the end
        return
    if os.path.lexists(path):
        _remove(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "f":
        if store.has(digest):
            store.copy_to(digest, path)
        else:
            missing.append(rel)
            return
        os.chmod(path, mode)
    elif kind == "l":
        os.symlink(digest, path)


def apply(dest_root: str, target: dict, store: ContentStore, current: dict | None = None) -> list[str]:
    """Make the tree at ``dest_root`` equal ``target`` (a manifest's entries), given that it now
    equals ``current`` (None: it is empty). Returns paths whose content is not in the store."""
    current = current or {}
    missing: list[str] = []
    for rel in sorted((p for p in current if p not in target), key=lambda p: -p.count("/")):
        _remove(os.path.join(dest_root, rel))
    for rel in sorted(target, key=lambda p: (p.count("/"), p)):
        if current.get(rel) != target[rel]:
            _materialise(dest_root, rel, target[rel], store, missing)
    for rel in sorted((p for p, v in target.items() if v[0] == "d"), key=lambda p: -p.count("/")):
        os.chmod(os.path.join(dest_root, rel), target[rel][1])
    return missing
