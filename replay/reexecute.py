"""Re-execution replay: run a recorded session's commands again and compare, event by event.

The comparison lives here; the re-running does not. A `Runner` (the recording sandbox provides
one: ``producers.sandbox.reexec.SandboxReexecutor``, wired by the CLI) restores the recorded
workspace, re-runs each recorded command with its recorded environment, stdin and clock, serves
recorded network responses, and returns the events that run produced, shaped like recorded
events. This module groups the recorded events by command, asks the runner for each command, and
compares: approval decisions, the workspace and environment the command started from, every file
access (digests before/after), every denial, every sub-process and its exit, every network
request (decision, rule, outcome, status, response digest), and the command's exit, output
digests and workspace digest after.

The result names the first divergent ``seq`` (the earliest recorded event whose observation
differs, or, for something that happened only on re-execution, the ``command_finished`` that
closed the command without it) with a structured expected-vs-actual diff that says what changed
(which workspace file, which environment variable, which response), resolving digests through
the runner. Environment *values* are never shown, only the digests of values.
"""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Protocol

from agentledger.schemas.config import Settings
from agentledger.schemas.errors import AgentLedgerError

SANDBOX_SOURCE = "sandbox"


class ReexecutionError(AgentLedgerError):
    """The session cannot be re-executed (not found, chain broken, not recorded by the sandbox)."""


@dataclass(frozen=True)
class RecordedEvent:
    seq: int
    kind: str
    payload: dict
    occurred_at_us: int | None = None
    source: str | None = None  # producer.source


# -- reading a recorded session --------------------------------------------------------------------

def _kind_of(store, payload_name: str) -> str:
    return store.kind(payload_name).kind


def _from_records(items: Iterable[tuple[bytes, dict]], session_id: str, where: str) -> list[RecordedEvent]:
    from agentledger.schemas.contract import load_store
    from agentledger.schemas.envelope import ChainVerifier

    store = load_store()
    verifier = ChainVerifier(session_id)
    out = []
    for value, rec in items:
        problem = verifier.check(value, rec)
        if problem is not None:
            raise ReexecutionError(f"session {session_id} in {where}: event seq {problem.seq} fails verification "
                                   f"({problem.reason}: {problem.detail}); refusing to re-execute a broken record")
        name, payload = rec["payload"]
        occurred = rec.get("occurred_at")
        if hasattr(occurred, "timestamp"):
            occurred = int(occurred.timestamp() * 1_000_000)
        out.append(RecordedEvent(rec["seq"], _kind_of(store, name), dict(payload), occurred,
                                 (rec.get("producer") or {}).get("source")))
    return out


def load_from_warehouse(url: str, session_id: str) -> list[RecordedEvent]:
    from agentledger.schemas.contract import load_store
    from agentledger.schemas.rows import iter_session_values
    from agentledger.schemas.warehouse import open_warehouse

    with open_warehouse(url, read_only=True) as wh:
        rows = [(v, r) for v, r, _ in iter_session_values(wh.con, load_store(), session_id)]
    return _from_records(rows, session_id, f"warehouse {url}")


def load_from_transport(settings: Settings, session_id: str, timeout_s: float = 5.0) -> list[RecordedEvent]:
    """Scan the topic (local log or Kafka) for the session's events, in seq order."""
    from agentledger.schemas.contract import load_store
    from agentledger.schemas.transport import open_source

    store = load_store()
    source = open_source(settings)
    found: dict[int, tuple[bytes, dict]] = {}
    try:
        if not source.partitions(settings.topic):
            return []
        source.assign(settings.topic, {})
        end = source.end_offsets(settings.topic)
        while True:
            pos = source.positions()
            if all(pos.get((settings.topic, p), 0) >= e for p, e in end.items()):
                break
            batch = source.poll(5000, timeout_s)
            if not batch:
                break
            key = session_id.encode()
            for m in batch:
                if m.damaged is not None or (m.key is not None and m.key != key):
                    continue  # a damaged offset is no event of the session (ingest quarantines it)
                rec = store.decode(m.value)
                if rec["session_id"] == session_id:
                    found.setdefault(rec["seq"], (m.value, rec))
    finally:
        source.close()
    return _from_records([found[s] for s in sorted(found)], session_id, settings.transport_label)


def load_session(settings: Settings, session_id: str, source: str = "auto") -> list[RecordedEvent]:
    """The session's events, verified (hash and chain), from the warehouse or the transport.

    ``auto`` reads the warehouse when it holds the session and is readable, else the transport."""
    import os

    events: list[RecordedEvent] = []
    if source in ("auto", "warehouse"):
        wh = settings.warehouse
        if source == "warehouse" or (wh.startswith("ducklake:") or os.path.exists(wh)):
            try:
                events = load_from_warehouse(wh, session_id)
            except ReexecutionError:
                raise
            except AgentLedgerError:
                if source == "warehouse":
                    raise
                events = []
            except Exception as exc:  # noqa: BLE001 - a locked/absent warehouse falls back to the log
                if source == "warehouse":
                    raise ReexecutionError(f"cannot read the warehouse {wh}: {exc}") from exc
                events = []
    complete = bool(events) and events[-1].kind == "session_ended"
    if source == "log" or (source == "auto" and not complete):
        # the warehouse may lag behind the log: take the longer verified record
        try:
            logged = load_from_transport(settings, session_id)
        except ReexecutionError:
            raise
        except AgentLedgerError:
            if source == "log" or not events:
                raise
            logged = []
        if len(logged) > len(events):
            events = logged
    if not events:
        raise ReexecutionError(f"session {session_id} not found ({source}: warehouse {settings.warehouse}, "
                               f"{settings.transport_label})")
    return events


# -- grouping ----------------------------------------------------------------------------------------

@dataclass
class CommandGroup:
    """A top-level command of the session and every event that belongs to it."""
    command_id: str
    argv: list[str]
    cwd: str
    events: list[RecordedEvent] = field(default_factory=list)

    @property
    def started(self) -> RecordedEvent | None:
        return next((e for e in self.events if e.kind == "command_started"
                     and e.payload["command_id"] == self.command_id), None)

    @property
    def finished(self) -> RecordedEvent | None:
        return next((e for e in self.events if e.kind == "command_finished"
                     and e.payload["command_id"] == self.command_id), None)

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq

    def as_dict(self) -> dict:
        """What a runner receives: the command and its recorded events (plain data)."""
        return {"command_id": self.command_id, "argv": list(self.argv), "cwd": self.cwd,
                "events": [{"seq": e.seq, "kind": e.kind, "payload": e.payload} for e in self.events]}


def group_commands(events: list[RecordedEvent]) -> tuple[RecordedEvent, list[CommandGroup]]:
    if not events or events[0].kind != "session_started":
        raise ReexecutionError("the session's first event is not session_started")
    started = events[0]
    groups: list[CommandGroup] = []
    by_command: dict[str, CommandGroup] = {}
    by_attempt: dict[str, CommandGroup] = {}
    by_request: dict[str, CommandGroup] = {}
    by_seq: dict[int, CommandGroup] = {}
    pending_approvals: list[RecordedEvent] = []
    for e in events[1:]:
        p = e.payload
        g: CommandGroup | None = None
        if e.kind == "approval_requested":
            g = by_command.get(p.get("command_id") or "")
            if g is None:  # asked before its command started: it opens the group
                pending_approvals.append(e)
                continue
            by_request[p["request_id"]] = g
        elif e.kind == "approval_decided":
            g = by_request.get(p["request_id"])
            if g is None:
                pending_approvals.append(e)
                continue
        elif e.kind == "command_started":
            parent = p.get("parent_command_id")
            if parent is None and p["command_id"] not in by_command:
                g = CommandGroup(p["command_id"], list(p["argv"]), p["cwd"])
                groups.append(g)
                for a in pending_approvals:
                    g.events.append(a)
                    if a.kind == "approval_requested":
                        by_request[a.payload["request_id"]] = g
                pending_approvals = []
            else:
                g = by_command.get(parent or p["command_id"])
            if g is not None:
                by_command[p["command_id"]] = g
        elif e.kind in ("command_finished", "file_accessed", "sandbox_denied"):
            g = by_command.get(p.get("command_id") or "")
        elif e.kind == "network_attempted":
            g = by_command.get(p.get("command_id") or "")
            if g is not None:
                by_attempt[p["attempt_id"]] = g
        elif e.kind in ("network_decided", "network_completed"):
            g = by_attempt.get(p["attempt_id"])
        elif e.kind == "gap":
            g = by_seq.get(p.get("related_seq") if p.get("related_seq") is not None else -1)
        if g is not None:
            g.events.append(e)
            by_seq[e.seq] = g
    return started, groups


# -- the runner interface ---------------------------------------------------------------------------

class Runner(Protocol):
    """Re-runs recorded commands. Implemented by the recording sandbox; injected by the CLI."""

    def prepare(self, session_started: dict) -> None:
        """Restore the recorded workspace into a fresh place; raise ReexecutionError if impossible."""

    def run(self, command: dict) -> list[dict]:
        """Re-run one command (``CommandGroup.as_dict()``); return the events it produced as
        ``{"kind": ..., "payload": ...}`` dicts shaped like recorded payloads."""

    def resolve(self, what: str, digest: str | None) -> Any:
        """Look a digest up: ``tree`` -> {path: [type, mode, digest, size]}, ``env`` -> {name:
        sha256 of the value}, ``blob`` -> bytes; None when unknown."""

    def close(self) -> None:
        """Release what prepare made (unless asked to keep it)."""


# -- comparing ---------------------------------------------------------------------------------------

@dataclass
class Divergence:
    seq: int
    command_id: str
    command: str
    event: str  # the recorded event kind the difference is about
    field: str
    expected: Any
    actual: Any
    change: dict  # what changed, named: {"type": "file"|"environment"|"network_response"|..., ...}
    summary: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    session_id: str
    commands: int = 0
    commands_run: int = 0
    events_compared: int = 0
    divergences: list[Divergence] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def reproducible(self) -> bool:
        return not self.divergences

    @property
    def first(self) -> Divergence | None:
        return min(self.divergences, key=lambda d: d.seq) if self.divergences else None

    @property
    def first_divergent_seq(self) -> int | None:
        f = self.first
        return f.seq if f else None

    def as_dict(self) -> dict:
        f = self.first
        return {"session_id": self.session_id, "reproducible": self.reproducible,
                "first_divergent_seq": f.seq if f else None, "first_divergence": f.as_dict() if f else None,
                "divergences": [d.as_dict() for d in sorted(self.divergences, key=lambda d: d.seq)],
                "commands": self.commands, "commands_run": self.commands_run,
                "events_compared": self.events_compared, "stopped_early": self.stopped_early}


def _get(payload: dict | None, dotted: str) -> Any:
    cur: Any = payload
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


@dataclass
class _Item:
    """One comparable thing (an approval, a file access, a request...) with its fields' seqs."""
    key: tuple
    fields: dict[str, Any]
    seqs: dict[str, int]
    label: str
    extra: dict = field(default_factory=dict)


def _items(events: list[dict], command_id: str, seq_of: Callable[[dict], int]) -> dict[tuple, _Item]:
    """Index a command's events (recorded or observed) into comparable items."""
    items: dict[tuple, _Item] = {}
    counters: Counter = Counter()

    def add(base: tuple, fields: dict, seqs: dict, label: str, extra: dict | None = None) -> _Item:
        counters[base] += 1
        key = base + (counters[base],)
        it = items[key] = _Item(key, fields, seqs, label, extra or {})
        return it

    requests: dict[str, _Item] = {}
    attempts: dict[str, _Item] = {}
    defaults = {"env_names": [], "escalated": False}
    subs: dict[str, _Item] = {}
    for ev in events:
        k, p, s = ev["kind"], ev["payload"], seq_of(ev)
        if k == "command_started" and p["command_id"] == command_id:
            add(("command_started",), {f: (_get(p, f) if _get(p, f) is not None else defaults.get(f)) for f in
                                       ("workspace_digest", "env_digest", "env_names", "stdin_digest", "escalated")},
                {"*": s}, "command started")
        elif k == "command_finished" and p["command_id"] == command_id:
            add(("command_finished",), {f: _get(p, f) for f in
                                        ("status", "exit_code", "stdout.sha256", "stderr.sha256", "workspace_digest")},
                {"*": s}, "command finished")
        elif k == "command_started":
            subs[p["command_id"]] = add(("process", tuple(p["argv"])), {"status": None, "exit_code": None},
                                        {"*": s}, f"process {shlex.join(p['argv'])[:120]}")
        elif k == "command_finished" and p["command_id"] in subs:
            it = subs[p["command_id"]]
            it.fields.update(status=p.get("status"), exit_code=p.get("exit_code"))
            it.seqs.update(status=s, exit_code=s)
        elif k == "approval_requested":
            requests[p["request_id"]] = add(("approval", p["action_kind"], p["action_digest"]), {"decision": None},
                                            {"*": s}, f"approval of {p['subject'][:120]}")
        elif k == "approval_decided" and p["request_id"] in requests:
            it = requests[p["request_id"]]
            it.fields["decision"] = p.get("decision")
            it.seqs["decision"] = s
        elif k == "file_accessed":
            add(("file", p["path"], p["operation"], p.get("new_path")),
                {f: p.get(f) for f in ("digest_before", "digest_after", "size_after", "mode")}, {"*": s},
                f"{p['operation']} {p['path']}" + (f" -> {p['new_path']}" if p.get("new_path") else ""),
                {"path": p["path"]})
        elif k == "sandbox_denied":
            add(("denied", p["operation"], p["target"], p.get("rule")), {}, {"*": s},
                f"denied {p['operation']} {p['target']}")
        elif k == "network_attempted":
            attempts[p["attempt_id"]] = add(
                ("network", p.get("protocol"), p["host"], p["port"], p.get("method"), p.get("url")),
                {"decision": None, "rule": None, "outcome": None, "status": None, "response_digest": None},
                {"*": s}, f"{p.get('method') or p.get('protocol')} {p.get('url') or p['host']}:{p['port']}",
                {"url": p.get("url"), "host": p["host"], "port": p["port"], "attempt_id": p["attempt_id"]})
        elif k == "network_decided" and p["attempt_id"] in attempts:
            it = attempts[p["attempt_id"]]
            it.fields.update(decision=p.get("decision"), rule=p.get("rule"))
            it.seqs.update(decision=s, rule=s)
        elif k == "network_completed" and p["attempt_id"] in attempts:
            it = attempts[p["attempt_id"]]
            it.fields.update(outcome=p.get("outcome"), status=p.get("status"), response_digest=p.get("response_digest"))
            it.seqs.update(outcome=s, status=s, response_digest=s)
    return items


def _first_line_difference(a: bytes | None, b: bytes | None) -> dict | None:
    if a is None or b is None:
        return None
    la = a.decode("utf-8", "replace").splitlines()
    lb = b.decode("utf-8", "replace").splitlines()
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return {"line": i + 1, "expected": x[:200], "actual": y[:200]}
    if len(la) != len(lb):
        i = min(len(la), len(lb))
        return {"line": i + 1, "expected": (la[i][:200] if i < len(la) else None),
                "actual": (lb[i][:200] if i < len(lb) else None)}
    return None


def _short(d: Any) -> Any:
    return f"sha256:{d[:12]}…" if isinstance(d, str) and len(d) == 64 else d


def _explain(runner: Runner, item: _Item, fname: str, expected: Any, actual: Any) -> tuple[dict, str]:
    """Name what changed behind a differing field."""
    if fname == "workspace_digest":
        a, b = runner.resolve("tree", expected), runner.resolve("tree", actual)
        files = []
        if isinstance(a, dict) and isinstance(b, dict):
            for path in sorted(set(a) | set(b)):
                if a.get(path) != b.get(path):
                    ea, eb = a.get(path), b.get(path)
                    files.append({"path": path,
                                  "expected": None if ea is None else {"type": ea[0], "mode": oct(ea[1]), "digest": ea[2]},
                                  "actual": None if eb is None else {"type": eb[0], "mode": oct(eb[1]), "digest": eb[2]}})
        names = ", ".join(f["path"] for f in files[:5]) or "unknown files"
        when = "before" if item.key[0] == "command_started" else "after"
        return {"type": "workspace", "files": files}, f"workspace {when} the command differs: {names}"
    if fname == "env_digest":
        a, b = runner.resolve("env", expected), runner.resolve("env", actual)
        variables = []
        if isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    variables.append({"name": name, "expected": _short(a.get(name)), "actual": _short(b.get(name))})
        names = ", ".join(v["name"] for v in variables) or "unknown variables"
        return {"type": "environment", "variables": variables}, f"environment differs: {names}"
    if fname == "env_names":
        added = sorted(set(actual or []) - set(expected or []))
        removed = sorted(set(expected or []) - set(actual or []))
        return ({"type": "environment", "added": added, "removed": removed},
                f"environment variables added {added} / removed {removed}")
    if fname == "stdin_digest":
        return {"type": "stdin"}, "stdin differs"
    if fname in ("stdout.sha256", "stderr.sha256"):
        stream = fname.split(".")[0]
        diff = _first_line_difference(runner.resolve("blob", expected), runner.resolve("blob", actual))
        text = f"{stream} differs" + (f" at line {diff['line']}: expected {diff['expected']!r}, got {diff['actual']!r}"
                                      if diff else "")
        return {"type": "output", "stream": stream, "first_difference": diff}, text
    if item.key[0] == "file":
        path = item.extra.get("path")
        return {"type": "file", "path": path, "field": fname}, f"file {path}: {fname} differs"
    if item.key[0] == "network":
        url = item.extra.get("url") or f"{item.extra.get('host')}:{item.extra.get('port')}"
        if fname == "response_digest":
            diff = _first_line_difference(runner.resolve("blob", expected), runner.resolve("blob", actual))
            return ({"type": "network_response", "url": url, "recorded_attempt": item.extra.get("attempt_id"),
                     "first_difference": diff}, f"network response for {url} differs")
        return {"type": "network", "url": url, "field": fname}, f"network {url}: {fname} differs"
    if item.key[0] == "approval":
        return {"type": "approval", "action_digest": item.key[2]}, f"{item.label}: decision differs"
    if item.key[0] == "process":
        return {"type": "process", "argv": list(item.key[1])}, f"{item.label}: {fname} differs"
    if fname in ("exit_code", "status"):
        return {"type": "exit"}, f"the command's {fname.replace('_', ' ')} differs"
    return {"type": fname}, f"{item.label}: {fname} differs"


def compare(group: CommandGroup, observed: list[dict], runner: Runner) -> tuple[list[Divergence], int]:
    """Divergences between a command's recorded events and a re-run's; and how many were compared."""
    recorded = [{"kind": e.kind, "payload": e.payload, "seq": e.seq} for e in group.events]
    exp = _items(recorded, group.command_id, lambda ev: ev["seq"])
    top_observed = next((o["payload"]["command_id"] for o in observed if o["kind"] == "command_started"
                         and not o["payload"].get("parent_command_id")), group.command_id)
    act = _items(observed, top_observed, lambda ev: -1)
    command = shlex.join(group.argv)
    finished = group.finished
    close_seq = finished.seq if finished else group.last_seq
    out: list[Divergence] = []
    for key in sorted(set(exp) | set(act), key=repr):
        e, a = exp.get(key), act.get(key)
        if e is not None and a is None:
            seq = min(e.seqs.values())
            out.append(Divergence(seq, group.command_id, command, key[0], "presence", "recorded", "absent",
                                  _presence_change(e), f"{e.label}: recorded, did not happen on re-execution"))
            continue
        if e is None and a is not None:
            out.append(Divergence(close_seq, group.command_id, command, key[0], "presence", "absent", "happened",
                                  _presence_change(a), f"{a.label}: happened on re-execution only"))
            continue
        for fname, ev in e.fields.items():
            av = a.fields.get(fname)
            if ev == av:
                continue
            if fname == "env_names" and "env_digest" in e.fields and e.fields["env_digest"] != a.fields.get("env_digest"):
                continue  # reported with the environment digest
            change, summary = _explain(runner, e, fname, ev, av)
            out.append(Divergence(e.seqs.get(fname, e.seqs.get("*", close_seq)), group.command_id, command, key[0],
                                  fname, ev, av, change, summary))
    return out, len(group.events)


def _presence_change(it: _Item) -> dict:
    kind = it.key[0]
    if kind == "file":
        return {"type": "file", "path": it.extra.get("path"), "operation": it.key[2]}
    if kind == "network":
        return {"type": "network", "url": it.extra.get("url") or f"{it.extra.get('host')}:{it.extra.get('port')}"}
    if kind == "denied":
        return {"type": "denial", "operation": it.key[1], "target": it.key[2]}
    if kind == "process":
        return {"type": "process", "argv": list(it.key[1])}
    return {"type": kind}


def reexecute(events: list[RecordedEvent], runner: Runner, *, session_id: str = "", stop_at_first: bool = False,
              progress: Callable[[int, int], None] | None = None) -> Report:
    """Re-run every recorded top-level command through ``runner`` and compare (see module doc)."""
    if not events:
        raise ReexecutionError("no events")
    started, groups = group_commands(events)
    if started.source != SANDBOX_SOURCE:
        raise ReexecutionError("only sessions recorded by `agentledger sandbox run` can be re-executed "
                               f"(this one was recorded by {started.source or 'an unknown producer'})")
    report = Report(session_id)
    report.commands = len(groups)
    runner.prepare({"seq": started.seq, **started.payload})
    try:
        for i, g in enumerate(groups):
            observed = runner.run(g.as_dict())
            report.commands_run += 1
            divs, n = compare(g, observed, runner)
            report.events_compared += n
            report.divergences.extend(divs)
            if progress:
                progress(i + 1, len(groups))
            if divs and stop_at_first:
                report.stopped_early = i + 1 < len(groups)
                break
    finally:
        runner.close()
    return report


def render_rows(report: Report) -> tuple[list[str], list[list[Any]]]:
    """The divergences as table rows (seq, command, event, field, expected, actual, what changed)."""
    cols = ["seq", "command", "event", "field", "expected", "actual", "what changed"]
    rows = []
    for d in sorted(report.divergences, key=lambda d: d.seq):
        rows.append([d.seq, d.command[:60], d.event, d.field, _fmt(d.expected), _fmt(d.actual), d.summary])
    return cols, rows


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    v = _short(v)
    if isinstance(v, list):
        return ", ".join(map(str, v))[:200]
    return str(v)[:200]
