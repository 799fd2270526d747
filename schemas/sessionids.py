"""Session ids as people type them: the full id, or a unique prefix of one.

One resolver for every command that takes a session id (replay, export, verify, alerts, detect,
deadletters, sandbox reexecute/end/forget, ...). It looks in *places* -- the warehouse, the local
log, the sandbox's session directory -- each able to say whether it holds an id exactly and which of
its ids start with a prefix:

1. an id some place holds exactly is that session, whatever its length (sandbox sessions may be
   called ``s1``), at the cost of one exact lookup per place;
2. otherwise the text is a prefix, and must be at least `MIN_PREFIX` characters (shorter ones match
   too much to be meant: "too short");
3. one session starting with it is that session; several are "ambiguous" (up to `MAX_LISTED` of
   them are named); none is "no such session", naming where it looked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import duckdb

from .errors import AgentLedgerError

MIN_PREFIX = 6
MAX_LISTED = 5


class SessionIdError(AgentLedgerError):
    """A session id that names no session, or not exactly one."""


class NoSuchSession(SessionIdError):
    pass


class AmbiguousSession(SessionIdError):
    def __init__(self, text: str, candidates: list[str], more: bool):
        self.candidates = candidates
        n = f"{len(candidates)}{'+' if more else ''}"
        listed = ", ".join(candidates[:MAX_LISTED]) + (", …" if more or len(candidates) > MAX_LISTED else "")
        super().__init__(f"session id {text} is ambiguous ({n} sessions: {listed}): give more of it")


class PrefixTooShort(SessionIdError):
    pass


@dataclass
class Place:
    """Somewhere sessions are found. ``exact(id)``: does it hold that id; ``starting(prefix, n)``: up
    to ``n`` of its ids that start with ``prefix``."""

    name: str
    exact: Callable[[str], bool]
    starting: Callable[[str, int], list[str]]


def resolve(text: str, places: Sequence[Place]) -> str:
    """The one session ``text`` names in ``places`` (see the module doc); raises `SessionIdError`."""
    text = text.strip()
    where = _where(places)
    if not text:
        raise NoSuchSession("an empty session id names no session")
    for p in places:
        if p.exact(text):
            return text
    if len(text) < MIN_PREFIX:
        raise PrefixTooShort(f"session id {text} is too short: no session is called that ({where}), and a prefix "
                             f"must have at least {MIN_PREFIX} characters")
    found: list[str] = []
    limit = 50
    for p in places:
        for sid in p.starting(text, limit + 1):
            if sid not in found:
                found.append(sid)
    if not found:
        raise NoSuchSession(f"no such session: {text} ({where})")
    if len(found) > 1:
        raise AmbiguousSession(text, sorted(found)[:limit], len(found) > limit)
    return found[0]


def _where(places: Sequence[Place]) -> str:
    if not places:
        return "nowhere to look"
    names = [p.name for p in places]
    return "looked in " + (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0])


def warehouse_place(con: duckdb.DuckDBPyConnection, label: str) -> Place:
    """The warehouse's sessions, as `agentledger verify` lists them: those with events, a chain head,
    leaves in the Merkle tree (a session deleted from the tables is still one to verify: it fails),
    or unresolved dead letters only (all of whose events were quarantined)."""
    from .treelog import has_tree
    from .warehouse import scalar

    tables = ["chain_heads", "events", *(["tree_leaves"] if has_tree(con) else [])]
    unresolved = "dead_letters WHERE session_id = $1 AND resolved_at IS NULL"

    def exact(sid: str) -> bool:
        # one place at a time, the cheap one (a row per session) first: DuckDB evaluates every EXISTS
        # of an OR, and the one over `events` plans and scans 13 kind tables (~30 ms at 1M events)
        return any(bool(scalar(con.execute(f"SELECT EXISTS (SELECT 1 FROM {t})", [sid])))
                   for t in [*(f"{t} WHERE session_id = $1" for t in tables), unresolved])

    def starting(prefix: str, n: int) -> list[str]:
        return [r[0] for r in con.execute(
            " UNION ".join(f"SELECT session_id FROM {t} WHERE starts_with(session_id, $1)" for t in tables)
            + " UNION SELECT session_id FROM dead_letters WHERE starts_with(session_id, $1) AND resolved_at IS NULL"
            " ORDER BY 1 LIMIT $2", [prefix, n]).fetchall()]

    return Place(f"the warehouse {label}", exact, starting)


def listed_place(name: str, ids: Callable[[], Sequence[str]]) -> Place:
    """A place whose ids are cheap to list (e.g. a directory of sandbox sessions)."""
    return Place(name, lambda sid: sid in ids(), lambda prefix, n: sorted(i for i in ids() if i.startswith(prefix))[:n])
