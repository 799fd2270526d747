"""Observation by ``strace -f``: the command line to trace a sandbox, and a parser that turns the
trace into processes, file operations and connects of the sandboxed command.

Why strace: it is packaged everywhere, follows every process (``-f``) across the namespaces
bubblewrap creates, and shows each syscall's *result*, so a denial is an observed errno
(``EROFS`` on a write outside the writable roots, ``ENETUNREACH`` on a connect or a datagram that
bypasses the proxy, ``EPERM`` on a raw socket) rather than a guess from the command's output. ``--seccomp-bpf`` stops the tracee only on
the syscalls listed here, which keeps the overhead small (see bench/sandbox.py).

What is attributed to the command: the tracer also sees bubblewrap's own setup and our launcher
(which starts the proxy forwarder). The launcher opens a per-run marker path just before it
``exec``s the command; only that process after its next successful ``execve``, and every process
it creates afterwards, count as the command. Everything else is infrastructure and ignored.

Limits (stated, not hidden): syscalls strace does not decode into paths (io_uring submissions,
writes through file descriptors received over a socket) are not seen; the runner compares the
workspace before and after each command and records a ``gap`` for changes no syscall explains.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator

FILE_SYSCALLS = (
    "open", "openat", "openat2", "creat", "truncate",
    "unlink", "unlinkat", "rmdir", "rename", "renameat", "renameat2",
    "chmod", "fchmod", "fchmodat", "mkdir", "mkdirat",
    "link", "linkat", "symlink", "symlinkat", "mknod", "mknodat",
    "chdir", "fchdir",
)
PROCESS_SYSCALLS = ("execve", "execveat", "clone", "clone3", "fork", "vfork")
# connect; datagrams sent to an address (DNS included); raw and packet sockets (created, or refused)
NETWORK_SYSCALLS = ("connect", "sendto", "sendmsg", "sendmmsg", "socket")
TRACED = FILE_SYSCALLS + PROCESS_SYSCALLS + NETWORK_SYSCALLS


def strace_argv(strace: str, trace_path: str, *, seccomp_bpf: bool = True) -> list[str]:
    # -y (descriptor paths), not -yy: decoding a socket's endpoints costs strace a sock_diag query
    # per call, which on every send(2) of a TCP connection is most of the command's time (bench:
    # 2000 sends 8.3 s with -yy, 0.17 s with -y). A socket's kind is read from the socket() call
    # that made it instead (`TraceAnalysis.socket_kinds`).
    argv = [strace, "-f", "-q", "-ttt", "-y", "--pidns-translation", "-s", "65535",
            "-e", "signal=none", "-e", "trace=" + ",".join(TRACED), "-o", trace_path]
    if seccomp_bpf:
        argv.insert(1, "--seccomp-bpf")
    return argv


# -- low-level parsing -----------------------------------------------------------------------

_LINE = re.compile(r"^(\d+)\s+(\d+(?:\.\d+)?)\s+(.*)$")
_RESUMED = re.compile(r"^<\.\.\. ([A-Za-z0-9_]+) resumed>(.*)$")
_EXITED = re.compile(r"^\+\+\+ exited with (\d+) \+\+\+$")
_KILLED = re.compile(r"^\+\+\+ killed by (SIG[A-Z0-9]+)")
_RESULT = re.compile(r"^\s*=\s*(-?\d+|\?|0x[0-9a-fA-F]+)(.*)$")
_ERRNO = re.compile(r"^\s*([A-Z][A-Z0-9_]+)")
_PIDNS = re.compile(r"/\* (\d+) in strace's PID NS \*/")
_SIMPLE_ESC = {"n": 0x0A, "t": 0x09, "r": 0x0D, "v": 0x0B, "f": 0x0C, "a": 0x07, "b": 0x08,
               '"': 0x22, "\\": 0x5C, "'": 0x27}


def unescape(s: str) -> str:
    """strace's C-style escapes (\\n, \\", \\ooo octal, \\xHH) back to the original bytes, as a str
    with surrogate escapes for bytes that are not UTF-8 (like os.fsdecode)."""
    out = bytearray()
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c != "\\" or i + 1 >= n:
            out += c.encode("utf-8", "surrogateescape")
            i += 1
            continue
        nxt = s[i + 1]
        if nxt in _SIMPLE_ESC:
            out.append(_SIMPLE_ESC[nxt])
            i += 2
        elif nxt == "x" and i + 3 < n + 1 and re.match(r"[0-9a-fA-F]{2}", s[i + 2:i + 4]):
            out.append(int(s[i + 2:i + 4], 16))
            i += 4
        elif nxt.isdigit():
            j = i + 1
            while j < n and j < i + 4 and s[j] in "01234567":
                j += 1
            out.append(int(s[i + 1:j], 8) & 0xFF)
            i = j
        else:
            out += nxt.encode("utf-8", "surrogateescape")
            i += 2
    return os.fsdecode(bytes(out))


def _decoration_end(text: str, i: int) -> int:
    """Index just past the ``<...>`` decoration starting at ``text[i]``. Paths escape ``<`` and
    ``>``; device decorations nest (``</dev/null<char 1:3>>``); socket ones contain ``->``."""
    depth, j, n = 0, i, len(text)
    while j < n:
        ch = text[j]
        if ch == "\\":
            j += 2
            continue
        if ch == "<":
            depth += 1
        elif ch == ">" and text[j - 1] != "-":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return n


_FD_TAIL = re.compile(r"(?:\d|AT_FDCWD)$")
_QUOTED_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.S)  # a string's body, up to its closing quote


def split_args(text: str) -> tuple[list[str], str]:
    """Split ``a, "b,c", [d, e], 3</p>) = 0`` into top-level args and the text after the ``)``."""
    args: list[str] = []
    stack: list[str] = []
    cur: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':  # a string (up to -s bytes of data a command sent): skipped at C speed
            j = min(_QUOTED_BODY.match(text, i + 1).end() + 1, n)
            if text.startswith("...", j):
                j += 3
            cur.append(text[i:j])
            i = j
            continue
        if c == "<" and cur and _FD_TAIL.search("".join(cur[-12:])):
            j = _decoration_end(text, i)
            cur.append(text[i:j])
            i = j
            continue
        if c in "[{(":
            stack.append(c)
        elif c in "]})":
            if not stack:
                if c == ")":
                    tail = "".join(cur).strip()
                    if tail:
                        args.append(tail)
                    return args, text[i + 1:]
            else:
                stack.pop()
        elif c == "," and not stack:
            args.append("".join(cur).strip())
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    tail = "".join(cur).strip()
    if tail:
        args.append(tail)
    return args, ""


def string_arg(arg: str) -> tuple[str | None, bool]:
    """(decoded string, truncated) of a quoted argument; (None, False) when it is not a string."""
    arg = arg.strip()
    if not arg.startswith('"'):
        return None, False
    truncated = arg.endswith('"...')
    body = arg[1:-4] if truncated else arg[1:-1]
    return unescape(body), truncated


_DECOR = re.compile(r"^(-?\d+|AT_FDCWD)<(.*)>$", re.S)


def decoration(arg: str) -> str | None:
    """The path strace -y prints for a descriptor argument (``3</a/b>``, ``AT_FDCWD</cwd>``)."""
    m = _DECOR.match(arg.strip())
    if not m:
        return None
    inner = m.group(2)
    cut = inner.find("<")  # a nested device decoration (/dev/null<char 1:3>); paths escape '<'
    if cut >= 0:
        inner = inner[:cut]
    if not inner.startswith("/"):
        return None
    return unescape(inner)


def socket_kind(arg: str, kinds: dict[str, str] | None = None) -> str | None:
    """TCP, UDP, TCPv6, UDPv6, RAW, ... of a socket descriptor argument: as ``-yy`` prints it
    (``3<TCP:[...]>``), or by its inode (``3<socket:[123]>``, ``-y``) in ``kinds``."""
    m = re.match(r"^\d+<([A-Za-z0-9-]+):(?:\[(\d+)\])?", arg.strip())
    if not m:
        return None
    if m.group(1) != "socket":
        return m.group(1)
    return (kinds or {}).get(m.group(2) or "")


def _new_socket_kind(args: list[str]) -> str | None:
    """The kind (as ``-yy`` names it) of the socket a ``socket()`` call makes."""
    if len(args) < 2:
        return None
    family, base = args[0].strip(), args[1].strip().split("|", 1)[0]
    v6 = "v6" if family in ("AF_INET6", "PF_INET6") else ""
    if family not in ("AF_INET", "PF_INET", "AF_INET6", "PF_INET6"):
        return family.removeprefix("AF_").removeprefix("PF_")
    return {"SOCK_STREAM": "TCP", "SOCK_DGRAM": "UDP", "SOCK_RAW": "RAW"}.get(base, base) + v6


def list_strings(arg: str) -> tuple[list[str], bool]:
    """Elements of a ``["a", "b", ...]`` argument; ``truncated`` when strace elided some."""
    arg = arg.strip()
    if not (arg.startswith("[") and arg.endswith("]")):
        return [], False
    items, _ = split_args(arg[1:-1] + ")")
    out, truncated = [], False
    for it in items:
        if it == "...":
            truncated = True
            continue
        s, t = string_arg(it)
        if s is None:
            continue
        truncated |= t
        out.append(s)
    return out, truncated


@dataclass
class Call:
    index: int
    pid: int
    ts: float
    name: str
    args: list[str]
    ret: int | None  # None for '?'
    errno: str | None
    ret_path: str | None  # -y decoration of a returned descriptor
    child: int | None  # clone/fork: the new process id in strace's namespace
    ret_decoration: str | None = None  # a returned descriptor as printed (``3<socket:[123]>``)


@dataclass
class Exit:
    index: int
    pid: int
    ts: float
    code: int | None
    signal: str | None


def _parse_call(index: int, pid: int, ts: float, text: str) -> Call | None:
    p = text.find("(")
    if p <= 0:
        return None
    name = text[:p]
    if not re.match(r"^[A-Za-z0-9_]+$", name):
        return None
    args, rest = split_args(text[p + 1:])
    m = _RESULT.match(rest)
    if not m:
        return None
    raw, after = m.group(1), m.group(2)
    ret = None if raw == "?" else int(raw, 16) if raw.startswith("0x") else int(raw)
    errno = None
    ret_path = None
    ret_decoration = None
    child = None
    if ret is not None and ret < 0:
        e = _ERRNO.match(after)
        errno = e.group(1) if e else "E?"
    elif after.startswith("<"):
        ret_decoration = raw + after[:_decoration_end(after, 0)]
        ret_path = decoration(ret_decoration)
    if name in ("clone", "clone3", "fork", "vfork") and ret is not None and ret > 0:
        t = _PIDNS.search(after)
        child = int(t.group(1)) if t else ret
    return Call(index, pid, ts, name, args, ret, errno, ret_path, child, ret_decoration)


def parse(lines: Iterable[str]) -> Iterator[Call | Exit]:
    """Syscalls and exits in the order they *started*; unfinished/resumed pairs are joined."""
    pending: dict[int, tuple[int, float, str]] = {}
    done: dict[int, Call | Exit] = {}
    emitted = 0
    index = 0
    for raw in lines:
        line = raw.rstrip("\n")
        m = _LINE.match(line)
        if not m:
            continue
        pid, ts, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        if rest.startswith("+++"):
            e = _EXITED.match(rest)
            k = _KILLED.match(rest)
            if e or k:
                done[index] = Exit(index, pid, ts, int(e.group(1)) if e else None, k.group(1) if k else None)
                index += 1
        elif rest.startswith("---"):
            pass
        elif rest.endswith("<unfinished ...>"):
            pending[pid] = (index, ts, rest[: -len("<unfinished ...>")].rstrip())
            index += 1
        else:
            r = _RESUMED.match(rest)
            if r:
                start = pending.pop(pid, None)
                if start is None:
                    continue
                i0, ts0, head = start
                call = _parse_call(i0, pid, ts0, head + r.group(2))
                if call:
                    done[i0] = call
                else:
                    done[i0] = None  # type: ignore[assignment]
            else:
                call = _parse_call(index, pid, ts, rest)
                done[index] = call  # type: ignore[assignment]
                index += 1
        # release everything up to the oldest call still waiting for its result
        limit = min((v[0] for v in pending.values()), default=index)
        while emitted < limit:
            item = done.pop(emitted, None)
            if item is not None:
                yield item
            emitted += 1
    for i in range(emitted, index):
        item = done.pop(i, None)
        if item is not None:
            yield item


# -- attribution -------------------------------------------------------------------------------

@dataclass
class Image:
    """One program a process of the command ran (each successful execve)."""
    index: int
    pid: int
    path: str
    argv: list[str]
    argv_truncated: bool
    ts: float
    parent: int | None  # index of the image that started it
    cwd: str | None
    exit_code: int | None = None
    signal: str | None = None
    ts_end: float | None = None


@dataclass
class FileOp:
    ts: float
    pid: int
    image: int | None
    op: str  # open | unlink | rmdir | rename | chmod | mkdir | link | symlink | truncate | mknod
    path: str
    new_path: str | None = None
    write: bool = False
    create: bool = False
    mode: int | None = None
    errno: str | None = None


@dataclass
class NetAttempt:
    """One way out the command tried: ``connect``, a ``sendto``/``sendmsg``/``sendmmsg`` to an
    address, or ``socket`` creating a raw or packet socket (``host`` ``*``: it could reach any)."""
    ts: float
    pid: int
    image: int | None
    family: str  # inet | inet6 | packet | unix (host: the socket's path, or @name when abstract; port 0)
    host: str
    port: int
    sock: str | None  # TCP, UDP, TCPv6, UDPv6, ... (None: not known); for socket(): its type (SOCK_RAW, ...)
    errno: str | None
    call: str = "connect"
    detail: str | None = None  # socket(): the call as made, e.g. "socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)"


@dataclass
class TraceAnalysis:
    images: list[Image] = field(default_factory=list)
    file_ops: list[FileOp] = field(default_factory=list)
    network: list[NetAttempt] = field(default_factory=list)
    socket_kinds: dict[str, str] = field(default_factory=dict)  # socket inode -> kind, from socket() calls
    top: Image | None = None
    top_exit_code: int | None = None
    top_signal: str | None = None
    calls: int = 0


class _Fs:
    __slots__ = ("cwd",)

    def __init__(self, cwd: str | None):
        self.cwd = cwd


@dataclass
class _Proc:
    pid: int
    role: str  # infra | armed | user
    fs: _Fs
    image: int | None


_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")


def _join(base: str | None, path: str) -> str | None:
    if path.startswith("/"):
        return os.path.normpath(path)
    if not base:
        return None
    return os.path.normpath(os.path.join(base, path))


def _mode(arg: str | None) -> int | None:
    if arg is None:
        return None
    m = re.match(r"^0[0-7]*$", arg.strip())
    return int(arg.strip(), 8) if m else None


def _sockaddr(arg: str) -> tuple[str, str, int] | None:
    fam = re.search(r"sa_family=(AF_[A-Z0-9]+)", arg)
    if not fam:
        return None
    port = re.search(r"sin6?_port=htons\((\d+)\)", arg)
    if fam.group(1) == "AF_INET":
        addr = re.search(r'sin_addr=inet_addr\("([^"]+)"\)', arg)
        if addr and port:
            return "inet", addr.group(1), int(port.group(1))
    elif fam.group(1) == "AF_INET6":
        addr = re.search(r'inet_pton\(AF_INET6, "([^"]+)"', arg)
        if addr and port:
            return "inet6", addr.group(1), int(port.group(1))
    elif fam.group(1) == "AF_UNIX":
        # a path (as the command gave it: relative to its cwd), or @name in the abstract namespace
        path = re.search(r'sun_path=(@?)"((?:[^"\\]|\\.)*)"', arg)
        if path:
            return "unix", path.group(1) + unescape(path.group(2)), 0
    return None


def _unix_at(sa: tuple[str, str, int] | None, p: "_Proc") -> tuple[str, str, int] | None:
    """A unix socket's path made absolute against the process's cwd (an abstract name stays)."""
    if sa is None or sa[0] != "unix" or sa[1].startswith(("/", "@")):
        return sa
    return "unix", _join(p.fs.cwd, sa[1]) or sa[1], 0


def _field(struct: str, name: str) -> str | None:
    """The value of field ``name`` of a decoded structure ``{a=..., name=..., ...}``; strings in it
    (data the command sent) are skipped whole, so they can never pose as a field."""
    struct = struct.strip()
    if not (struct.startswith("{") and struct.endswith("}")):
        return None
    items, _ = split_args(struct[1:-1] + ")")
    for it in items:
        key, eq, value = it.partition("=")
        if eq and key.strip() == name:
            return value
    return None


def _destinations(name: str, args: list[str]) -> list[str]:
    """The destination address arguments of a send call (none when the socket's peer is used)."""
    if name == "sendto":
        return [args[4]] if len(args) > 4 and args[4].strip() != "NULL" else []
    if name == "sendmsg":
        dest = _field(args[1], "msg_name") if len(args) > 1 else None
        return [dest] if dest and dest.strip() != "NULL" else []
    if name == "sendmmsg" and len(args) > 1 and args[1].strip().startswith("["):
        items, _ = split_args(args[1].strip()[1:-1] + ")")
        out = []
        for it in items:
            hdr = _field(it, "msg_hdr")
            dest = _field(hdr, "msg_name") if hdr else None
            if dest and dest.strip() != "NULL":
                out.append(dest)
        return out
    return []


_RAW_FAMILIES = ("AF_PACKET", "PF_PACKET")
_RAW_TYPES = ("SOCK_RAW", "SOCK_PACKET")
_ICMP = ("IPPROTO_ICMP", "IPPROTO_ICMPV6")


def _raw_socket(args: list[str]) -> tuple[str, str] | None:
    """(family, type) of a ``socket()`` call that makes a raw, packet or ICMP socket; else None."""
    if len(args) < 3:
        return None
    family, stype, proto = args[0].strip(), args[1].strip(), args[2].strip()
    base = stype.split("|", 1)[0]
    if family in _RAW_FAMILIES:
        return "packet", base
    if family in ("AF_INET", "AF_INET6", "PF_INET", "PF_INET6") and (base in _RAW_TYPES or proto in _ICMP):
        return ("inet6" if family.endswith("6") else "inet"), base
    return None


def analyse(lines: Iterable[str], marker: str) -> TraceAnalysis:
    """Attribute a trace to the command (see the module docstring)."""
    out = TraceAnalysis()
    procs: dict[int, _Proc] = {}

    def proc(pid: int) -> _Proc:
        p = procs.get(pid)
        if p is None:  # seen before its parent's clone returned, or the traced root itself
            p = procs[pid] = _Proc(pid, "infra", _Fs(None), None)
        return p

    for item in parse(lines):
        if isinstance(item, Exit):
            p = procs.get(item.pid)
            if p is None:
                continue
            for img in out.images:
                if img.pid == item.pid and img.ts_end is None:
                    img.exit_code, img.signal, img.ts_end = item.code, item.signal, item.ts
            if out.top is not None and item.pid == out.top.pid:
                out.top_exit_code, out.top_signal = item.code, item.signal
            continue
        c = item
        out.calls += 1
        p = proc(c.pid)
        name = c.name
        if name == "socket" and c.ret_decoration:  # whoever makes it: a descriptor can be handed on
            inode = re.search(r"socket:\[(\d+)\]", c.ret_decoration)
            kind = _new_socket_kind(c.args)
            if inode and kind:
                out.socket_kinds[inode.group(1)] = kind
        if name in ("clone", "clone3", "fork", "vfork"):
            if c.child is None:
                continue
            flags = " ".join(c.args)
            shared_fs = "CLONE_FS" in flags
            child = procs.get(c.child)
            fs = p.fs if shared_fs else _Fs(p.fs.cwd)
            role = "user" if p.role == "user" else "infra"
            if child is None:
                procs[c.child] = _Proc(c.child, role, fs, p.image)
            else:  # its first lines came before this clone's result: adopt it
                child.role, child.fs, child.image = role, fs, p.image
            continue
        if name in ("execve", "execveat"):
            if c.ret != 0 or p.role == "infra":
                continue
            k = 1 if name == "execveat" else 0
            path, _ = string_arg(c.args[k]) if len(c.args) > k else (None, False)
            argv, truncated = list_strings(c.args[k + 1]) if len(c.args) > k + 1 else ([], True)
            img = Image(len(out.images), c.pid, path or (argv[0] if argv else "?"), argv, truncated, c.ts,
                        p.image if p.role == "user" else None, p.fs.cwd)
            out.images.append(img)
            if p.role == "armed":
                p.role = "user"
                out.top = img
            p.image = img.index
            continue
        if p.role == "armed" or (p.role == "infra" and name in ("open", "openat")):
            if name in ("open", "openat"):
                s, _ = string_arg(c.args[1 if name == "openat" else 0]) if c.args else (None, False)
                if s == marker:
                    p.role = "armed"
                    if name == "openat":
                        p.fs.cwd = decoration(c.args[0]) or p.fs.cwd
            continue
        if p.role != "user":
            continue
        _file_or_net(out, p, c)
    return out


def _at(p: _Proc, dirarg: str | None, patharg: str | None) -> str | None:
    """Resolve a path argument against its directory descriptor (or the process cwd)."""
    if patharg is None:
        return None
    s, _ = string_arg(patharg)
    if s is None:
        return None
    if s.startswith("/"):
        return os.path.normpath(s)
    base = None
    if dirarg is not None:
        base = decoration(dirarg)
    if base is None:
        base = p.fs.cwd
    return _join(base, s)


def _file_or_net(out: TraceAnalysis, p: _Proc, c: Call) -> None:
    name, a = c.name, c.args
    arg = (lambda i: a[i] if len(a) > i else None)
    op: FileOp | None = None
    if name in ("open", "openat", "openat2", "creat"):
        if name == "openat" or name == "openat2":
            path = _at(p, arg(0), arg(1))
            flags = arg(2) or ""
            mode = _mode(arg(3)) if name == "openat" else None
        elif name == "open":
            path = _at(p, None, arg(0))
            flags = arg(1) or ""
            mode = _mode(arg(2))
        else:
            path = _at(p, None, arg(0))
            flags = "O_WRONLY|O_CREAT|O_TRUNC"
            mode = _mode(arg(1))
        if "O_PATH" in flags or "O_DIRECTORY" in flags:
            return
        if c.ret_path and c.errno is None:
            path = c.ret_path
        if path is None:
            return
        write = any(f in flags for f in _WRITE_FLAGS)
        op = FileOp(c.ts, c.pid, p.image, "open", path, write=write, create="O_CREAT" in flags,
                    mode=mode, errno=c.errno)
    elif name in ("unlink", "rmdir"):
        op = FileOp(c.ts, c.pid, p.image, "rmdir" if name == "rmdir" else "unlink", _at(p, None, arg(0)) or "",
                    write=True, errno=c.errno)
    elif name == "unlinkat":
        rm = "AT_REMOVEDIR" in (arg(2) or "")
        op = FileOp(c.ts, c.pid, p.image, "rmdir" if rm else "unlink", _at(p, arg(0), arg(1)) or "",
                    write=True, errno=c.errno)
    elif name == "rename":
        op = FileOp(c.ts, c.pid, p.image, "rename", _at(p, None, arg(0)) or "", _at(p, None, arg(1)),
                    write=True, errno=c.errno)
    elif name in ("renameat", "renameat2"):
        op = FileOp(c.ts, c.pid, p.image, "rename", _at(p, arg(0), arg(1)) or "", _at(p, arg(2), arg(3)),
                    write=True, errno=c.errno)
    elif name == "chmod":
        op = FileOp(c.ts, c.pid, p.image, "chmod", _at(p, None, arg(0)) or "", write=True,
                    mode=_mode(arg(1)), errno=c.errno)
    elif name == "fchmodat":
        op = FileOp(c.ts, c.pid, p.image, "chmod", _at(p, arg(0), arg(1)) or "", write=True,
                    mode=_mode(arg(2)), errno=c.errno)
    elif name == "fchmod":
        path = decoration(arg(0) or "")
        if path:
            op = FileOp(c.ts, c.pid, p.image, "chmod", path, write=True, mode=_mode(arg(1)), errno=c.errno)
    elif name in ("mkdir", "mkdirat"):
        path = _at(p, None, arg(0)) if name == "mkdir" else _at(p, arg(0), arg(1))
        mode = _mode(arg(1) if name == "mkdir" else arg(2))
        if c.errno != "EEXIST":
            op = FileOp(c.ts, c.pid, p.image, "mkdir", path or "", write=True, create=True, mode=mode, errno=c.errno)
    elif name in ("link", "symlink"):
        op = FileOp(c.ts, c.pid, p.image, name, _at(p, None, arg(1)) or "", write=True, create=True, errno=c.errno)
    elif name == "linkat":
        op = FileOp(c.ts, c.pid, p.image, "link", _at(p, arg(2), arg(3)) or "", write=True, create=True,
                    errno=c.errno)
    elif name == "symlinkat":
        op = FileOp(c.ts, c.pid, p.image, "symlink", _at(p, arg(1), arg(2)) or "", write=True, create=True,
                    errno=c.errno)
    elif name in ("mknod", "mknodat"):
        path = _at(p, None, arg(0)) if name == "mknod" else _at(p, arg(0), arg(1))
        op = FileOp(c.ts, c.pid, p.image, "mknod", path or "", write=True, create=True, errno=c.errno)
    elif name == "truncate":
        op = FileOp(c.ts, c.pid, p.image, "truncate", _at(p, None, arg(0)) or "", write=True, errno=c.errno)
    elif name == "chdir":
        if c.errno is None:
            new = _at(p, None, arg(0))
            if new:
                p.fs.cwd = new
        return
    elif name == "fchdir":
        if c.errno is None:
            new = decoration(arg(0) or "")
            if new:
                p.fs.cwd = new
        return
    elif name == "connect":
        sa = _unix_at(_sockaddr(arg(1) or ""), p)
        if sa:
            out.network.append(NetAttempt(c.ts, c.pid, p.image, sa[0], sa[1], sa[2],
                                          socket_kind(arg(0) or "", out.socket_kinds), c.errno))
        return
    elif name in ("sendto", "sendmsg", "sendmmsg"):
        for dest in _destinations(name, a):
            sa = _unix_at(_sockaddr(dest), p)
            if sa:
                out.network.append(NetAttempt(c.ts, c.pid, p.image, sa[0], sa[1], sa[2],
                                              socket_kind(arg(0) or "", out.socket_kinds), c.errno, name))
        return
    elif name == "socket":
        raw = _raw_socket(a)
        if raw:
            out.network.append(NetAttempt(c.ts, c.pid, p.image, raw[0], "*", 0, raw[1], c.errno, "socket",
                                          f"socket({', '.join(x.strip() for x in a[:3])})"))
        return
    if op is not None and op.path:
        out.file_ops.append(op)
