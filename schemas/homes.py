"""Where agentledger keeps its state (the home), and keeping it private to its user.

The home holds the embedded log, the spool, the warehouse, producer state and keys: what every
recorded event says, and what decides whether a session is trusted. So it is per user and never
relative to the current directory (which, for the hook, is the agent's own workspace):

    $AGENTLEDGER_HOME (or --home)   when set
    $XDG_DATA_HOME/agentledger      when XDG_DATA_HOME is set and absolute (XDG Base Directory spec)
    ~/.local/share/agentledger      otherwise

Private: the entry points (`agentledger`, the hook, the warm hook server) set the umask to 077 once,
so every directory agentledger creates is 0700 and every file 0600 -- including files made by
libraries (DuckDB and its WAL, DuckLake's catalog and Parquet files, SQLite). A home that already
exists and is open to group or others (made by an older version under a 022 umask) is tightened
in place when it belongs to this user, and reported otherwise. Commands agentledger runs *for* the
user (the sandboxed command of `sandbox run`) get the user's own umask back (`user_umask`).

This module uses only ``os``, ``pwd`` and `envvars` (which uses only ``os``): the hook's fast path imports it.

Why not platformdirs: on Linux it computes exactly the rule above, and importing it costs the hook
~10 ms on every tool call (measured here: a bare interpreter start went from 38 ms to 48 ms).
"""

from __future__ import annotations

import os
import stat
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (fast-path imports)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path
    from typing import TypeVar

    PathT = TypeVar("PathT", str, Path)

from . import envvars

APP = "agentledger"
HOME_ENV = "AGENTLEDGER_HOME"
HOME_VARS = ("HOME", "XDG_DATA_HOME")  # what the default home is computed from (the warm hook server gets them)
LEGACY_DIR = ".agentledger"  # the home before issue 20: relative to the current directory
PRIVATE_UMASK = 0o077

_user_umask: int | None = None


def user_home(env: Mapping[str, str] | None = None) -> str:
    """The user's home directory: $HOME when absolute, else the password database."""
    env = os.environ if env is None else env
    h = env.get("HOME") or ""
    if os.path.isabs(h):
        return h
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError):
        return os.path.abspath(os.path.expanduser("~"))


def default_home(env: Mapping[str, str] | None = None) -> str:
    """The per-user home used when AGENTLEDGER_HOME is not set (see the module doc)."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_DATA_HOME") or ""
    base = xdg if os.path.isabs(xdg) else os.path.join(user_home(env), ".local", "share")
    return os.path.join(base, APP)


def resolve_home(env: Mapping[str, str] | None = None) -> str:
    """The home as an absolute path: AGENTLEDGER_HOME (``~`` expanded with the env's HOME) or the default."""
    env = os.environ if env is None else env
    given = envvars.raw(HOME_ENV, env)
    if not given:
        return default_home(env)
    if given == "~" or given.startswith("~/"):
        given = user_home(env) + given[1:]
    return os.path.abspath(os.path.expanduser(given))


def legacy_home_notice(env: Mapping[str, str] | None = None, cwd: str | None = None) -> str | None:
    """One line for stderr when a pre-issue-20 ``./.agentledger`` sits in the current directory and
    AGENTLEDGER_HOME is not set: it is no longer used, and how to migrate. None otherwise."""
    env = os.environ if env is None else env
    if envvars.raw(HOME_ENV, env):
        return None
    old = os.path.join(cwd or os.getcwd(), LEGACY_DIR)
    if not os.path.isdir(old):
        return None
    return (f"agentledger: {old} is no longer used (the home is now {default_home(env)}); to keep its data, "
            f"move it there (mv {old} {default_home(env)}) or set AGENTLEDGER_HOME -- outside any repository. "
            "See README: Migrating from ./.agentledger\n")


def restrict_umask() -> None:
    """Set the umask to 077 (once per process), remembering the user's for the commands we run for them."""
    global _user_umask
    old = os.umask(PRIVATE_UMASK)
    if _user_umask is None:
        _user_umask = old


def user_umask() -> int:
    """The umask this process started with (before `restrict_umask`)."""
    if _user_umask is not None:
        return _user_umask
    cur = os.umask(0)
    os.umask(cur)
    return cur


# what agentledger creates at the top of a home (the tightening walk touches nothing else)
HOME_ENTRIES = ("log", "spool", "state", "keys", "sandbox", "cas", "policies", "heads")


def secure_home(home: str | os.PathLike[str]) -> str | None:
    """Tighten an existing home open to group/others when this user owns it: the home itself to
    owner-only, and everything under the entries agentledger makes in it (`HOME_ENTRIES`, the default
    warehouse ``warehouse.duckdb*``) to 0700 directories / 0600 files; anything else in it is left
    as is (and, the home being 0700, unreachable for others). A home owned by someone else, your
    home directory or ``/`` is only reported. Returns the message for stderr (None: nothing to say).
    Cheap when the home is already private (one stat)."""
    home = os.path.abspath(os.fspath(home))
    try:
        st = os.stat(home)
    except OSError:
        return None  # made later, under the private umask
    if not stat.S_ISDIR(st.st_mode) or not st.st_mode & 0o077:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid() or home in ("/", user_home(), os.path.realpath(user_home())):
        why = f"owned by uid {st.st_uid}, not you" if st.st_uid != os.geteuid() else "not a directory of its own"
        return (f"agentledger: warning: the home {home} is open to group/others (mode {mode:o}) and {why}: "
                f"others may read every event. Use a home of its own (unset AGENTLEDGER_HOME for "
                f"{default_home()}).\n")
    changed = 0
    tops = [home] + [os.path.join(home, n) for n in sorted(os.listdir(home))
                     if n in HOME_ENTRIES or n.startswith("warehouse.duckdb")]
    for top in tops:
        entries = [top] if top == home else [top] + [os.path.join(d, n) for d, ds, fs in os.walk(top)
                                                     for n in ds + fs]
        for p in entries:
            try:
                s = os.lstat(p)
                if stat.S_ISLNK(s.st_mode) or s.st_uid != os.geteuid() or not s.st_mode & 0o077:
                    continue
                os.chmod(p, stat.S_IMODE(s.st_mode) & 0o700)
                changed += 1
            except OSError:
                continue
    return f"agentledger: tightened {home}: {changed} entries were open to group/others (now owner-only)\n"


def write_private_file(path: PathT, data: bytes, *, exclusive: bool = False) -> PathT:
    """Write ``data`` to ``path`` with mode 0600 from the start (whatever the umask), whole: under a
    private temporary name, fsynced, then renamed into place -- or with ``exclusive``, linked into
    place (`FileExistsError` if ``path`` exists: a concurrent writer won). Readers see no file or the
    whole file, never a partial one. Missing directories are made 0700. Returns ``path``."""
    p = os.fspath(path)
    os.makedirs(os.path.dirname(p) or ".", mode=0o700, exist_ok=True)
    tmp = os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, p)
        else:
            os.replace(tmp, p)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return path


def prepare_process(env: Mapping[str, str] | None = None, *, legacy_cwd: str | None = None, home: str | None = None) -> list[str]:
    """What every entry point does first: the private umask, the existing home tightened, and the
    old ./.agentledger named. Returns the lines for stderr."""
    restrict_umask()
    env = os.environ if env is None else env
    lines = []
    notice = legacy_home_notice(env, legacy_cwd)
    if notice:
        lines.append(notice)
    msg = secure_home(home or resolve_home(env))
    if msg:
        lines.append(msg)
    return lines


def say(lines: list[str]) -> None:
    for line in lines:
        sys.stderr.write(line)
    sys.stderr.flush()
