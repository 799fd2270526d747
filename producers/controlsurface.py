"""The agent's control surface at session start: its configuration, permission rules,
instructions, MCP servers, hooks and git hooks, as digests and (redacted) contents.

`snapshot(cwd, home)` lists, for the working directory ``cwd`` of a session and the user's home
``home``:

=====================================================  ==============
``~/.codex/config.toml``, ``<repo>/.codex/config.toml``  agent_config
``~/.codex/rules/*.rules``, ``<repo>/.codex/rules/*``    exec_rules
``~/.claude/settings.json``, ``<repo>/.claude/settings.json``  agent_config
``<repo>/.claude/settings.local.json``                   permissions
``~/.claude/CLAUDE.md``, ``~/.codex/AGENTS.md``, and       instructions
``CLAUDE.md`` / ``CLAUDE.local.md`` / ``AGENTS.md`` /
``AGENTS.override.md`` in ``cwd`` and each parent up to
the git root
``<repo>/.mcp.json``                                     mcp_config
``<repo>/.claude/hooks/*``                               hooks
``<repo>/.git/hooks/*`` (not ``*.sample``), and the       git_hooks
files of ``core.hooksPath`` (read from .git/config)
=====================================================  ==============

``<repo>`` is the git root above ``cwd`` (the nearest directory with a ``.git``), else ``cwd``; a
``.git`` file (a worktree, a submodule) has no hooks listed: they live in another repository.
The files whose appearance matters (the settings, ``.mcp.json``, ``config.toml``, ``CLAUDE.md`` /
``AGENTS.md`` of the repository root) are listed even when absent, with digest null, so that
their creation shows as a change. Paths are absolute, the home written as ``~``.

``workspace_trusted``: Codex's ``[projects."<path>"] trust_level = "trusted"`` in
``~/.codex/config.toml`` and Claude Code's ``projects["<path>"].hasTrustDialogAccepted`` in
``~/.claude.json`` (for ``cwd`` or the repository root). ``~/.claude.json`` is a secret store (it
holds OAuth state and per-project history): only that key is read, and the file is not listed.

The workspace is written by whoever wrote the repository, so reading it is defensive: every path
component below the working directory, its git root or the home is opened with ``O_NOFOLLOW``
relative to its parent. A symlink anywhere on the way is recorded as a symlink -- the digest of its
target string, its content ``symlink -> <target>`` -- and not followed, except a file's own symlink
whose target (taken lexically) stays inside the repository (or, for the home's files, the home: a
dotfiles checkout), which is read as that target, reached the same way without following any
further symlink. Only regular files are read (FIFOs, devices and sockets are recorded by type,
never opened for reading: ``O_NONBLOCK`` and a type check before and after opening), reads are
bounded (``MAX_HASH_BYTES`` hashed, ``MAX_CONTENT`` kept per file, ``MAX_TOTAL_CONTENT`` per
snapshot: the files after it keep their digest, their content null and ``truncated``), and so are the number of files
(``MAX_FILES``, ``MAX_DIR_ENTRIES`` per directory) and the parents walked. Nothing raises: a file
that cannot be read is listed as what could be learnt of it.

Contents are not redacted here: they become a string field of ``session_started``, and every
string of an event goes through the recorder's transforms (producers/redact.py) before it is
sealed, as every other recorded text does. The cut at ``MAX_CONTENT`` falls on a line end, so that
a secret is not cut in half where the redactor could no longer recognise it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass

MAX_CONTENT = 16 * 1024          # bytes of text kept per file
MAX_HASH_BYTES = 4 * 1024 * 1024  # bytes hashed per file (a larger file: digest of this prefix, truncated)
MAX_FILES = 200                  # files listed per snapshot
MAX_TOTAL_CONTENT = 256 * 1024   # text kept per snapshot: later files keep their digest, not their content
MAX_DIR_ENTRIES = 64             # files listed per directory (hooks, rules)
MAX_PARENTS = 32                 # directories walked up from cwd to find the git root
MAX_TRUST_FILE = 8 * 1024 * 1024  # ~/.claude.json larger than this is not parsed (trust unknown)
MAX_GIT_CONFIG = 256 * 1024

INSTRUCTION_NAMES = ("AGENTS.md", "AGENTS.override.md", "CLAUDE.md", "CLAUDE.local.md")
ALWAYS_LISTED_INSTRUCTIONS = ("AGENTS.md", "CLAUDE.md")  # at the repository root, even when absent
ROLES = ("unknown", "agent_config", "permissions", "instructions", "mcp_config", "hooks", "git_hooks",
         "exec_rules", "trust")

_O_BASE = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_O_DIR = _O_BASE | os.O_NOFOLLOW
_O_FILE = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class _Entry:
    path: str
    role: str
    digest: str | None = None
    size: int | None = None
    content: str | None = None
    truncated: bool = False

    def record(self) -> dict:
        return {"path": self.path, "role": self.role, "digest": self.digest, "size": self.size,
                "content": self.content, "truncated": self.truncated}


def _text(data: bytes, size: int) -> tuple[str | None, bool]:
    """The content kept of a file's first bytes: None when binary; cut on a line end."""
    if b"\0" in data[:MAX_CONTENT + 1]:
        return None, size > MAX_CONTENT
    truncated = size > MAX_CONTENT or len(data) > MAX_CONTENT
    keep = data[:MAX_CONTENT]
    if truncated:
        nl = keep.rfind(b"\n")
        if nl >= MAX_CONTENT // 2:
            keep = keep[:nl + 1]
    try:
        return keep.decode("utf-8"), truncated
    except UnicodeDecodeError as exc:
        if truncated and exc.start >= len(keep) - 3:  # a character cut at the end
            try:
                return keep[:exc.start].decode("utf-8"), truncated
            except UnicodeDecodeError:
                pass
        return None, truncated


def _special(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


class _Walker:
    def __init__(self, home: str | None):
        self.home = os.path.normpath(home) if home else None
        self.entries: dict[str, _Entry] = {}

    def display(self, path: str) -> str:
        h = self.home
        if h and h != "/" and (path == h or path.startswith(h + "/")):
            return "~" + path[len(h):]
        return path

    def full(self, full_path: str) -> bool:
        return len(self.entries) >= MAX_FILES and full_path not in self.entries

    def add(self, e: _Entry) -> None:
        if e.path not in self.entries and len(self.entries) < MAX_FILES:
            self.entries[e.path] = e

    # -- opening without following symlinks ---------------------------------------------------
    def _open_dir(self, base: str, parts: list[str], role: str, record: bool = True) -> int | None:
        """A descriptor of ``base/parts...``: ``base`` (the working directory, its git root, the
        home) is opened as it is, then each component without following a symlink; a symlink on
        the way is recorded (with ``role``, unless not ``record``) and None returned; so is a
        missing directory (nothing recorded)."""
        try:
            fd = os.open(base, _O_BASE)
        except OSError:
            return None
        done = base
        for comp in parts:
            try:
                st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
                here = os.path.join(done, comp)
                if stat.S_ISLNK(st.st_mode):
                    if record:
                        self._symlink(fd, comp, here, role)
                    os.close(fd)
                    return None
                if not stat.S_ISDIR(st.st_mode):
                    os.close(fd)
                    return None
                nfd = os.open(comp, _O_DIR, dir_fd=fd)
            except OSError:
                os.close(fd)
                return None
            os.close(fd)
            fd, done = nfd, here
        return fd

    def _symlink(self, dir_fd: int, name: str, full_path: str, role: str) -> None:
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            target = ""
        shown = self.display(target) if os.path.isabs(target) else target
        self.add(_Entry(self.display(full_path), role, _sha(os.fsencode(target)), len(os.fsencode(target)),
                        f"symlink -> {shown}"[:MAX_CONTENT]))

    def _follow(self, dir_fd: int, name: str, full_path: str, role: str, scope: str | None) -> bool:
        """A symlink whose target stays inside ``scope`` (the repository, or the home for the
        home's files: a dotfiles checkout) is read as its target, itself reached without following
        any further symlink; True when it was."""
        if not scope:
            return False
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            return False
        tpath = os.path.normpath(os.path.join(os.path.dirname(full_path), target))
        if not _inside(tpath, scope) or tpath == scope:
            return False
        parts = os.path.relpath(tpath, scope).split("/")
        if ".." in parts:
            return False
        fd = self._open_dir(scope, parts[:-1], role, record=False)
        if fd is None:
            return False
        try:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                return False
            self.add(_Entry(self.display(full_path), role, *self._read(fd, parts[-1], st)))
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _read(self, dir_fd: int, name: str, st: os.stat_result) -> tuple:
        """(digest, size, content, truncated) of a regular file, opened without following a symlink
        or blocking, checked to be the file ``st`` describes."""
        try:
            fd = os.open(name, _O_FILE, dir_fd=dir_fd)
        except OSError:
            return None, st.st_size, None, False
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                return _sha(f"special:{_special(fst.st_mode)}".encode()), None, None, False
            h = hashlib.sha256()
            head = bytearray()
            read = 0
            while read < MAX_HASH_BYTES:
                chunk = os.read(fd, min(65536, MAX_HASH_BYTES - read))
                if not chunk:
                    break
                h.update(chunk)
                if len(head) <= MAX_CONTENT:
                    head += chunk[:MAX_CONTENT + 1 - len(head)]
                read += len(chunk)
            size = max(fst.st_size, read)
            more = bool(os.read(fd, 1)) if read >= MAX_HASH_BYTES else False
            content, truncated = _text(bytes(head), size)
            return "sha256:" + h.hexdigest(), size, content, truncated or more
        except OSError:
            return None, st.st_size, None, False
        finally:
            os.close(fd)

    def _leaf(self, dir_fd: int, name: str, full_path: str, role: str, list_absent: bool,
              scope: str | None = None) -> None:
        shown = self.display(full_path)
        if shown in self.entries or self.full(shown):
            return
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if list_absent:
                self.add(_Entry(shown, role))
            return
        except OSError:
            self.add(_Entry(shown, role, content=None))
            return
        if stat.S_ISLNK(st.st_mode):
            if not self._follow(dir_fd, name, full_path, role, scope):
                self._symlink(dir_fd, name, full_path, role)
            return
        if not stat.S_ISREG(st.st_mode):  # never opened: a FIFO would block, a device could act
            self.add(_Entry(shown, role, _sha(f"special:{_special(st.st_mode)}".encode()), None, None))
            return
        self.add(_Entry(shown, role, *self._read(dir_fd, name, st)))

    # -- what a snapshot lists ------------------------------------------------------------------
    def file(self, base: str, rel: str, role: str, list_absent: bool = False, scope: str | None = None) -> None:
        parts = [p for p in rel.split("/") if p]
        fd = self._open_dir(base, parts[:-1], role)
        if fd is None:
            if list_absent:
                shown = self.display(os.path.join(base, *parts))
                if not any(shown.startswith(p + "/") for p in self.entries):  # (not under a recorded symlink)
                    self.add(_Entry(shown, role))
            return
        try:
            self._leaf(fd, parts[-1], os.path.join(base, *parts), role, list_absent, scope or base)
        finally:
            os.close(fd)

    def directory(self, base: str, rel: str, role: str, skip=lambda name: False) -> None:
        parts = [p for p in rel.split("/") if p]
        fd = self._open_dir(base, parts, role)
        if fd is None:
            return
        here = os.path.join(base, *parts)
        try:
            names = []
            with os.scandir(fd) as it:
                for i, de in enumerate(it):
                    if i >= 4 * MAX_DIR_ENTRIES:
                        break
                    if not skip(de.name):
                        names.append(de.name)
            for name in sorted(names)[:MAX_DIR_ENTRIES]:
                self._leaf(fd, name, os.path.join(here, name), role, False, base)
        except OSError:
            pass
        finally:
            os.close(fd)


def _git_root(cwd: str) -> str | None:
    d = cwd
    for _ in range(MAX_PARENTS):
        try:
            os.lstat(os.path.join(d, ".git"))
            return d
        except OSError:
            pass
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent
    return None


def _read_small(base: str, rel: str, limit: int) -> bytes | None:
    """A regular file's bytes (at most ``limit``; None when larger, absent, not regular, or behind a
    symlink), read as `_Walker` reads."""
    parts = [p for p in rel.split("/") if p]
    w = _Walker(None)
    fd = w._open_dir(base, parts[:-1], "unknown")
    if fd is None:
        return None
    try:
        st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        ffd = os.open(parts[-1], _O_FILE, dir_fd=fd)
        try:
            if not stat.S_ISREG(os.fstat(ffd).st_mode):
                return None
            out = bytearray()
            while len(out) <= limit:
                chunk = os.read(ffd, 65536)
                if not chunk:
                    break
                out += chunk
            return bytes(out) if len(out) <= limit else None
        finally:
            os.close(ffd)
    except OSError:
        return None
    finally:
        os.close(fd)


def hooks_path(git_config: bytes) -> str | None:
    """``core.hooksPath`` of a git config file's text (the last one wins, as in git)."""
    section, value = None, None
    for raw in git_config.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line[1:line.find("]")].strip().lower() if "]" in line else None
            continue
        if section == "core" and "=" in line:
            k, v = line.split("=", 1)
            if k.strip().lower() == "hookspath":
                v = v.strip()
                if len(v) >= 2 and v[0] == v[-1] == '"':
                    v = v[1:-1]
                value = v or None
    return value


def _inside(path: str, root: str | None) -> bool:
    return bool(root) and (path == root or path.startswith(root.rstrip("/") + "/"))


def workspace_trusted(cwd: str, home: str | None, agent: str = "", root: str | None = None) -> bool | None:
    """Whether the agent's own configuration marks ``cwd`` (or its repository ``root``) trusted:
    True, False (configuration read, no trust for it), None (unknown)."""
    if not home or not cwd:
        return None
    paths = [p for p in dict.fromkeys((cwd, root)) if p]
    codex = claude = None
    if agent != "claude-code":
        data = _read_small(home, ".codex/config.toml", MAX_HASH_BYTES)
        if data is not None:
            try:
                import tomllib

                projects = tomllib.loads(data.decode("utf-8", "replace")).get("projects")
                codex = False
                if isinstance(projects, dict):
                    for p in paths:
                        entry = projects.get(p)
                        if isinstance(entry, dict) and entry.get("trust_level") == "trusted":
                            codex = True
            except (ValueError, TypeError):
                codex = None
    if agent != "codex":
        data = _read_small(home, ".claude.json", MAX_TRUST_FILE)
        if data is not None:
            try:
                projects = json.loads(data).get("projects")
                claude = False
                if isinstance(projects, dict):
                    for p in paths:
                        entry = projects.get(p)
                        if isinstance(entry, dict) and entry.get("hasTrustDialogAccepted") is True:
                            claude = True
            except (ValueError, TypeError, AttributeError, RecursionError):
                claude = None
    if agent == "codex":
        return codex
    if agent == "claude-code":
        return claude
    if codex or claude:
        return True
    return False if (codex is False or claude is False) else None


def snapshot(cwd: str, home: str | None, agent: str = "") -> dict:
    """``{"control_surface": [...], "workspace_trusted": ...}`` for a session in ``cwd`` (see the
    module doc). Never raises, never follows a symlink, never blocks on a special file."""
    out: dict = {"control_surface": [], "workspace_trusted": None}
    try:
        cwd = os.path.normpath(cwd) if cwd and os.path.isabs(cwd) else ""
        home = os.path.normpath(home) if home and os.path.isabs(home) else None
        w = _Walker(home)
        if home:
            w.file(home, ".codex/config.toml", "agent_config", list_absent=True)
            w.directory(home, ".codex/rules", "exec_rules", skip=lambda n: not n.endswith(".rules"))
            w.file(home, ".codex/AGENTS.md", "instructions")
            w.file(home, ".claude/settings.json", "agent_config", list_absent=True)
            w.file(home, ".claude/CLAUDE.md", "instructions", list_absent=True)
        root = None
        if cwd and os.path.isdir(cwd):
            root = _git_root(cwd) or cwd
            w.file(root, ".codex/config.toml", "agent_config", list_absent=True)
            w.directory(root, ".codex/rules", "exec_rules")
            w.file(root, ".claude/settings.json", "agent_config", list_absent=True)
            w.file(root, ".claude/settings.local.json", "permissions", list_absent=True)
            w.file(root, ".mcp.json", "mcp_config", list_absent=True)
            w.directory(root, ".claude/hooks", "hooks")
            d = cwd
            for _ in range(MAX_PARENTS):  # instructions in cwd and each parent up to the root
                for name in INSTRUCTION_NAMES:
                    w.file(d, name, "instructions", list_absent=d == root and name in ALWAYS_LISTED_INSTRUCTIONS,
                           scope=root)
                if d == root or os.path.dirname(d) == d:
                    break
                d = os.path.dirname(d)
            w.directory(root, ".git/hooks", "git_hooks", skip=lambda n: n.endswith(".sample"))
            cfg = _read_small(root, ".git/config", MAX_GIT_CONFIG)
            hp = hooks_path(cfg) if cfg else None
            if hp:
                target = hp
                if hp.startswith("~/") and home:
                    target = home + hp[1:]
                target = os.path.normpath(target if os.path.isabs(target) else os.path.join(root, target))
                base = root if _inside(target, root) else (home if _inside(target, home) else None)
                if base is not None and target != base:
                    w.directory(base, os.path.relpath(target, base), "git_hooks", skip=lambda n: n.endswith(".sample"))
                elif base is None:  # outside the repository and the home: named, not read
                    w.add(_Entry(w.display(target), "git_hooks", _sha(os.fsencode(hp)), None,
                                 f"core.hooksPath = {hp} (outside the repository and the home: not read)"))
        kept = 0
        for e in w.entries.values():  # one session_started stays well under the recorder's event size
            if e.content is not None:
                kept += len(e.content.encode())
                if kept > MAX_TOTAL_CONTENT:
                    e.content, e.truncated = None, True
        out["control_surface"] = [e.record() for e in w.entries.values()]
        out["workspace_trusted"] = workspace_trusted(cwd, home, agent, root) if cwd else None
    except Exception:  # noqa: BLE001 - a snapshot never stops a session from being recorded
        pass
    return out
