"""Where key material may be read from: the one check every key loader applies.

A key decides what a secret's token means (the redaction key) or whether a session is trusted
(a signing key, the trusted public keyring, the log operator's key). Whoever can put a key file
where agentledger reads it can make tokens dictionary-guessable or forge sessions that verify.
So a key file, or a directory of keys, is **refused** (`UnsafeKeyError`, a `ConfigError` naming the
path, the reason and the command that fixes it) when:

- it lives inside a **git work tree**: a ``.git`` next to it or in any directory above it, up to
  but not including your home directory (a dotfiles repository in ``~`` itself is not counted: an
  agent working in ``~`` can change any of your files anyway). The agent's workspace is a repository
  it can write;
- it, or any directory above it up to your home directory (or ``/``), is **writable by group or
  others** -- like OpenSSH's StrictModes. A root-owned sticky directory such as ``/tmp`` is fine:
  nobody else can rename what is in it;
- it is **not owned by you** (a directory above it: by you or root);
- a **secret** key (signing, redaction, operator) is readable by group or others.

A symbolic link is checked as itself (its directory) and as its target (the target's directories).
Keys given as the *contents* of environment variables (AGENTLEDGER_SIGNING_KEY,
AGENTLEDGER_REDACTION_KEY, AGENTLEDGER_OPERATOR_KEY) are not files and are not checked; ``..._FILE`` variables are.

Only ``os`` is used: the hook's path loads keys.
"""

from __future__ import annotations

import os
import stat

from .errors import ConfigError
from .homes import default_home, user_home


class UnsafeKeyError(ConfigError):
    """A key file or key directory that anyone but its user could have planted or changed."""

    def __init__(self, path: str, what: str, reason: str, fix: str):
        super().__init__(f"refusing the {what} {path}: {reason}. Fix: {fix}")
        self.path, self.what, self.reason, self.fix = path, what, reason, fix


def _owner_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _git_work_tree(directory: str, stops: set[str]) -> str | None:
    d = directory
    while d not in stops:
        if os.path.exists(os.path.join(d, ".git")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent
    return None


def git_work_tree(path: str | os.PathLike[str]) -> str | None:
    """The git work tree ``path`` lies in (a ``.git`` in it or above it, below your home directory), or None."""
    home = user_home()
    return _git_work_tree(os.path.abspath(os.fspath(path)), {home, os.path.realpath(home)})


def _check_dirs(directory: str, stops: set[str], what: str, path: str) -> None:
    uid = os.geteuid()
    d = directory
    while True:
        try:
            st = os.stat(d)
        except OSError:
            return
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in (uid, 0):
            raise UnsafeKeyError(path, what, f"the directory {d} above it is owned by {_owner_name(st.st_uid)}, "
                                             "who could replace the key",
                                 f"keep keys in a directory you own, e.g. {os.path.join(default_home(), 'keys')}")
        if mode & 0o022 and not (st.st_mode & stat.S_ISVTX and st.st_uid == 0):
            raise UnsafeKeyError(path, what, f"the directory {d} above it is writable by group or others "
                                             f"(mode {mode:o}), who could replace the key", f"chmod go-w {d}")
        parent = os.path.dirname(d)
        if d in stops or parent == d:
            return
        d = parent


def check_key_path(path: str | os.PathLike[str], *, what: str = "key", secret: bool = False) -> str:
    """Refuse ``path`` (a key file, or a directory of keys) as the module doc says; return it as an
    absolute path. ``what`` names it in the message ("signing key", "trusted public key directory").
    A path that does not exist is returned unchecked (the caller reports it as missing)."""
    p = os.path.abspath(os.fspath(path))
    try:
        lst = os.lstat(p)
        st = os.stat(p)
    except OSError:
        return p  # missing (or a dangling link): the caller says so
    uid = os.geteuid()
    is_dir = stat.S_ISDIR(st.st_mode)
    real = os.path.realpath(p)
    home = user_home()
    stops = {home, os.path.realpath(home)}
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(lst.st_mode) and lst.st_uid not in (uid, 0):
        raise UnsafeKeyError(p, what, f"it is a symbolic link owned by {_owner_name(lst.st_uid)}",
                             f"rm {p}, and put the key itself there")
    if st.st_uid != uid:
        raise UnsafeKeyError(p, what, f"it is owned by {_owner_name(st.st_uid)}, not by you ({_owner_name(uid)})",
                             f"use a key you own: cp {real} {os.path.join(default_home(), 'keys')}/ (then check "
                             f"it), or chown {_owner_name(uid)} {real}")
    if mode & 0o022:
        raise UnsafeKeyError(p, what, f"it is writable by group or others (mode {mode:o})", f"chmod go-w {real}")
    if secret and not is_dir and mode & 0o044:
        raise UnsafeKeyError(p, what, f"it is a secret key readable by group or others (mode {mode:o})",
                             f"chmod 600 {real}")
    # the directories it is reached through (a link's own, and its target's)
    for top in dict.fromkeys([p if is_dir else os.path.dirname(p), real if is_dir else os.path.dirname(real)]):
        tree = _git_work_tree(top, stops)
        if tree is not None:
            keys = os.path.join(default_home(), "keys")
            raise UnsafeKeyError(p, what, f"it is inside the git work tree {tree}, which an agent working there "
                                          "can write",
                                 f"keep keys outside any repository: unset AGENTLEDGER_HOME (the per-user home is "
                                 f"{default_home()}) or point it outside {tree}; move the key with "
                                 f"mkdir -p -m 700 {keys} && mv {real} {keys}/")
        _check_dirs(os.path.dirname(top) if is_dir else top, stops, what, p)
    return p
