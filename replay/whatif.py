"""What would this policy have done? Re-decide every recorded request and report what differs.

Works on any ``events``-shaped table (a replay workset, or the whole warehouse), for one session or
many. The requests and how their *recorded* decision is read (docs/replay.md states the recording
conventions this relies on):

* network attempt -- recorded: its network_decided (allow | ask | deny); new: `Policy.evaluate_network`
  at the addresses the decision recorded (``network_decided.addresses``: what the sandbox's egress
  proxy resolved the host to and connected to), so an address rule re-decides a host name as the
  proxy decided it; without recorded addresses a name is decided on its own. Raw and packet socket
  attempts (host ``*``) have no destination and are refused by the sandbox whatever the policy:
  they are not re-decided.
* command -- every command the agent asked to run has a command_started (argv, escalated) and,
  when it did not run, a command_finished with status ``declined``. Recorded: an approval request
  linked by command_id means ``prompt`` (or, decided by ``policy``: ``allow`` / ``forbidden``);
  none means ``allow``, or ``forbidden`` when it was declined. New: `Policy.evaluate_command`
  (every simple command of a shell wrapper), or, for commands `agentledger hook` recorded,
  `Policy.evaluate_shell_call`: what the hook enforces (also URLs to denied destinations).
* approval request about no recorded command (action ``exec``) -- recorded ``prompt`` (or the
  policy's decision); new: the subject parsed as a command line, evaluated as escalated; a request
  the hook's policy refused is re-decided as the hook decides (escalated only when the escalation
  rule refused it).
* file write (write, create, delete, chmod, rename) -- recorded ``allow``; sandbox denial of a
  write -- recorded ``deny``; new: `Policy.evaluate_write` with the session's cwd as $WORKSPACE.
* file read -- recorded ``allow``; sandbox denial of a read -- ``deny``; new: `Policy.evaluate_read`.

``~`` in the policy is the *recorded* session's home, not the replaying user's (`recorded_home`):
the home directory the session's working directory is in (``/home/NAME/...``, ``/Users/NAME/...``,
``/root/...``), unless the recorded user (``producer.user``, when the producer ran as the agent) is
not NAME. A session
that did not record it that way is decided conservatively (``ANY_HOME``: a ``deny_read`` pattern
under ``~`` matches under any home directory, a writable root under ``~`` allows nothing), and the
report says so (``home_unknown`` per session, ``sessions_home_unknown`` in the summary).

A divergence's ``effect`` says what would have changed: ``block`` (was allowed, now denied or
forbidden), ``ask`` (was allowed, now asks), ``allow`` (was denied or forbidden, now allowed),
``no_ask`` (was asked, now allowed), ``refuse`` (was asked, now denied), ``ask_not_deny``.
``broke_work`` marks blocks of actions that had succeeded (exit 0, network outcome ok, file
written): the legitimate work the new policy would have broken.
"""

from __future__ import annotations

import os
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import pyarrow as pa

from agentledger.schemas.policy import ANY_HOME, HOME_DIRS, Decision, Policy

PERMIT = {"allow"}
ASK = {"ask", "prompt"}
RESTRICT = {"deny", "forbidden"}
WRITE_OPS = ("write", "create", "delete", "chmod", "rename")


@dataclass
class Request:
    session_id: str
    seq: int
    kind: str  # network | command | approval | file_write | file_read
    request: str  # human description
    recorded: str
    recorded_rule: str | None
    outcome: str | None  # what happened: ok, failed, blocked, declined, written, read, ...
    args: dict = field(default_factory=dict)


@dataclass
class Divergence:
    session_id: str
    seq: int
    kind: str
    request: str
    recorded: str
    recorded_rule: str | None
    new: str
    rule: str | None
    reason: str
    effect: str
    outcome: str | None
    broke_work: bool
    target: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SessionWhatIf:
    session_id: str
    requests: int = 0
    divergences: int = 0
    effects: Counter = field(default_factory=Counter)
    broke_work: int = 0
    recorded_policy_digest: str | None = None
    same_policy: bool = False
    home: str | None = None  # the recorded session's home (`~` of the policy); None: not recorded

    @property
    def home_unknown(self) -> bool:
        return self.home is None

    @property
    def stopped(self) -> bool:
        return self.effects.get("block", 0) + self.effects.get("refuse", 0) > 0

    def as_dict(self) -> dict:
        return {"session_id": self.session_id, "requests": self.requests, "divergences": self.divergences,
                "effects": dict(sorted(self.effects.items())), "stopped": self.stopped, "broke_work": self.broke_work,
                "recorded_policy_digest": self.recorded_policy_digest, "same_policy": self.same_policy,
                "home": self.home, "home_unknown": self.home_unknown}


@dataclass
class WhatIfReport:
    policy: str
    policy_digest: str | None
    sessions: list[SessionWhatIf]
    divergences: list[Divergence]
    requests: int
    # requests of a kind the policy file says nothing about ([sandbox] / [network] / [approvals]
    # absent), by kind: reported, never re-decided under defaults the user did not write
    not_redecided: dict[str, Counter] = field(default_factory=dict)  # section -> kind -> count
    sections: tuple[str, ...] = ()
    uses_home: bool = False  # the policy has `~` paths

    def summary(self) -> dict:
        eff = Counter(d.effect for d in self.divergences)
        kinds = Counter(d.kind for d in self.divergences)
        return {
            "policy": self.policy, "policy_digest": self.policy_digest,
            "sessions": len(self.sessions), "requests": self.requests, "divergences": len(self.divergences),
            "sessions_diverging": sum(1 for s in self.sessions if s.divergences),
            "sessions_stopped": sum(1 for s in self.sessions if s.stopped),
            "sessions_with_broken_work": sum(1 for s in self.sessions if s.broke_work),
            "broken_work": sum(1 for d in self.divergences if d.broke_work),
            "by_effect": dict(sorted(eff.items())), "by_kind": dict(sorted(kinds.items())),
            "newly_blocked_destinations": sorted({d.target for d in self.divergences
                                                  if d.kind == "network" and d.effect in ("block", "refuse")}),
            "policy_sections": list(self.sections),
            "policy_uses_home": self.uses_home,
            "sessions_home_unknown": sum(1 for s in self.sessions if s.home_unknown),
            "not_redecided": {sec: dict(sorted(c.items())) for sec, c in sorted(self.not_redecided.items())},
        }

    def as_dict(self) -> dict:
        return {"summary": self.summary(), "sessions": [s.as_dict() for s in self.sessions],
                "divergences": [d.as_dict() for d in self.divergences]}


def _effect(recorded: str, new: str) -> str | None:
    if recorded == new:
        return None
    if recorded in PERMIT:
        return "block" if new in RESTRICT else "ask"
    if recorded in ASK:
        return "no_ask" if new in PERMIT else ("refuse" if new in RESTRICT else None)
    if recorded in RESTRICT:
        return "allow" if new in PERMIT else ("ask_not_deny" if new in ASK else None)
    return "decided" if new else None  # nothing recorded: any decision is new information


# --- collecting requests ---------------------------------------------------------------------------

def _scope(con, sessions: Iterable[str] | None) -> str:
    if sessions is None:
        return "(SELECT * FROM events)"
    con.register("_whatif_sessions", pa.table({"session_id": pa.array(sorted(set(sessions)), pa.string())}))
    return "(SELECT e.* FROM events e SEMI JOIN _whatif_sessions w ON e.session_id = w.session_id)"


def collect_requests(con, sessions: Iterable[str] | None = None) -> tuple[list[Request], dict[str, dict]]:
    """Every re-decidable request of the sessions (all when None), and per session its cwd and
    recorded policy digest."""
    ev = _scope(con, sessions)
    try:
        return _collect(con, ev)
    finally:
        if sessions is not None:
            con.unregister("_whatif_sessions")


def recorded_home(cwd: str | None, user: str | None = None, source: str | None = None) -> str | None:
    """The home directory of the user a recorded session ran as, from what it recorded: the home
    directory its working directory is in, unless the recorded user says it is someone else's
    (``producer.user`` is the agent's user only when the producer ran as the agent: the hook, the
    sandbox, a recorder; an importer records its own). None when that does not tell."""
    m = _HOME_OF.match(os.path.normpath(cwd)) if cwd and cwd.startswith("/") else None
    if not m:
        return None
    home = m.group(1)
    if user and source in _AS_THE_AGENT and (os.path.basename(home) != user if home != "/root" else user != "root"):
        return None
    return home


_HOME_OF = re.compile("^(" + "|".join(h.replace("*", "[^/]+") for h in HOME_DIRS) + ")(?:/|$)")
_AS_THE_AGENT = frozenset({"hook", "sandbox", "recorder", "simulator"})


def _collect(con, ev: str) -> tuple[list[Request], dict[str, dict]]:
    info = {sid: {"cwd": cwd, "policy_digest": pd, "home": recorded_home(cwd, user, source)}
            for sid, cwd, pd, user, source in con.execute(f"""
        WITH ev AS {ev}
        SELECT session_id, arg_min(session_started.cwd, seq), arg_min(session_started.policy_digest, seq),
               arg_min(producer."user", seq), arg_min(CAST(producer.source AS VARCHAR), seq)
        FROM ev WHERE kind = 'session_started' GROUP BY 1""").fetchall()}
    out: list[Request] = []
    # network attempts with their first decision and completion (a warehouse written before
    # network_decided had addresses, opened read-only, has no such field: no addresses then)
    fields = {r[0] for r in con.execute("DESCRIBE SELECT network_decided.* FROM events").fetchall()}
    addresses_sql = "d.x.addresses" if "addresses" in fields else "NULL::VARCHAR[]"
    for sid, seq, host, port, proto, method, decision, rule, addresses, outcome in con.execute(f"""
        WITH ev AS {ev},
        a AS (SELECT session_id, seq, network_attempted AS x FROM ev WHERE kind = 'network_attempted'),
        d AS (SELECT session_id, arg_min(network_decided, seq) AS x FROM ev WHERE kind = 'network_decided'
              GROUP BY session_id, network_decided.attempt_id),
        c AS (SELECT session_id, arg_min(network_completed, seq) AS x FROM ev WHERE kind = 'network_completed'
              GROUP BY session_id, network_completed.attempt_id)
        SELECT a.session_id, a.seq, a.x.host, a.x.port, a.x.protocol, a.x.method, d.x.decision, d.x.rule,
               {addresses_sql}, c.x.outcome
        FROM a LEFT JOIN d ON d.session_id = a.session_id AND d.x.attempt_id = a.x.attempt_id
               LEFT JOIN c ON c.session_id = a.session_id AND c.x.attempt_id = a.x.attempt_id
        WHERE NOT (a.x.host = '*' AND starts_with(coalesce(a.x.method, ''), 'socket('))
        ORDER BY a.session_id, a.seq""").fetchall():
        recorded = decision or ("allow" if outcome == "ok" else "unknown")
        out.append(Request(sid, seq, "network", f"{(method or '').upper()} {proto} {host}:{port}".strip(), recorded,
                           rule, outcome, {"host": host, "port": port, "protocol": proto, "method": method,
                                           "addresses": list(addresses or [])}))
    # commands with the approval linked to them
    for sid, seq, argv, shell, esc, source, status, exit_code, adec, aby, arule, has_req in con.execute(f"""
        WITH ev AS {ev},
        s AS (SELECT session_id, seq, producer, command_started AS c FROM ev WHERE kind = 'command_started'),
        f AS (SELECT session_id, arg_min(command_finished, seq) AS c FROM ev WHERE kind = 'command_finished'
              GROUP BY session_id, command_finished.command_id),
        r AS (SELECT session_id, approval_requested.command_id AS command_id, arg_min(approval_requested.request_id, seq) AS request_id
              FROM ev WHERE kind = 'approval_requested' AND approval_requested.command_id IS NOT NULL GROUP BY 1, 2),
        d AS (SELECT session_id, arg_min(approval_decided, seq) AS a FROM ev WHERE kind = 'approval_decided'
              GROUP BY session_id, approval_decided.request_id)
        SELECT s.session_id, s.seq, s.c.argv, s.c.shell, s.c.escalated, s.producer."source", f.c.status, f.c.exit_code,
               d.a.decision, d.a.decided_by, d.a.rule, r.request_id IS NOT NULL
        FROM s LEFT JOIN f ON f.session_id = s.session_id AND f.c.command_id = s.c.command_id
               LEFT JOIN r ON r.session_id = s.session_id AND r.command_id = s.c.command_id
               LEFT JOIN d ON d.session_id = s.session_id AND d.a.request_id = r.request_id
        ORDER BY s.session_id, s.seq""").fetchall():
        if has_req:
            recorded = _policy_verdict(adec, aby) or "prompt"
        else:
            recorded = "forbidden" if status == "declined" else "allow"
        outcome = status or "running"
        if status in ("completed", "failed"):
            outcome = "ok" if exit_code == 0 else f"exit {exit_code}"
        out.append(Request(sid, seq, "command", shell or shlex.join(argv or []), recorded, arule if has_req else None, outcome,
                           {"argv": list(argv or []), "escalated": bool(esc), "shell": shell, "source": source}))
    # approvals about no recorded command
    for sid, seq, source, akind, subject, adec, aby, arule in con.execute(f"""
        WITH ev AS {ev},
        cmds AS (SELECT DISTINCT session_id, command_started.command_id AS command_id FROM ev WHERE kind = 'command_started'),
        r AS (SELECT session_id, seq, producer, approval_requested AS a FROM ev WHERE kind = 'approval_requested'),
        d AS (SELECT session_id, arg_min(approval_decided, seq) AS a FROM ev WHERE kind = 'approval_decided'
              GROUP BY session_id, approval_decided.request_id)
        SELECT r.session_id, r.seq, r.producer."source", r.a.action_kind, r.a.subject, d.a.decision, d.a.decided_by, d.a.rule
        FROM r LEFT JOIN d ON d.session_id = r.session_id AND d.a.request_id = r.a.request_id
        WHERE r.a.action_kind IN ('exec', 'patch')
          AND (r.a.command_id IS NULL OR NOT EXISTS (SELECT 1 FROM cmds WHERE cmds.session_id = r.session_id
                                                     AND cmds.command_id = r.a.command_id))
        ORDER BY r.session_id, r.seq""").fetchall():
        recorded = _policy_verdict(adec, aby) or "prompt"
        outcome = adec or "pending"
        if akind == "patch":
            out.append(Request(sid, seq, "approval", f"patch {subject}", recorded, arule, outcome,
                               {"path": subject, "patch": True}))
            continue
        try:
            argv = shlex.split(subject)
        except ValueError:
            argv = subject.split()
        if source == "hook":
            # `agentledger hook` records a tool call its policy refused as a request decided by that
            # policy, whose subject is the command line; it was escalated only if the escalation
            # rule is what refused it (the request does not record the flag otherwise).
            args = {"argv": argv, "shell": subject, "source": source, "escalated": arule == "escalation"}
        else:  # an agent's own approval request for a command: it asks to run it outside the sandbox
            args = {"argv": argv, "escalated": True}
        out.append(Request(sid, seq, "approval", subject, recorded, arule, outcome, args))
    # file accesses and sandbox denials of files
    for sid, seq, path, op, new_path in con.execute(f"""
        WITH ev AS {ev}
        SELECT session_id, seq, file_accessed.path, file_accessed.operation, file_accessed.new_path
        FROM ev WHERE kind = 'file_accessed' ORDER BY session_id, seq""").fetchall():
        if op == "read":
            out.append(Request(sid, seq, "file_read", f"read {path}", "allow", None, "read", {"path": path}))
        elif op in WRITE_OPS:
            out.append(Request(sid, seq, "file_write", f"{op} {path}", "allow", None, "written", {"path": path}))
            if op == "rename" and new_path:
                out.append(Request(sid, seq, "file_write", f"rename to {new_path}", "allow", None, "written",
                                   {"path": new_path}))
    for sid, seq, op, target, rule in con.execute(f"""
        WITH ev AS {ev}
        SELECT session_id, seq, sandbox_denied.operation, sandbox_denied.target, sandbox_denied.rule
        FROM ev WHERE kind = 'sandbox_denied' AND sandbox_denied.operation IN ('file_write', 'file_read')
        ORDER BY session_id, seq""").fetchall():
        kind = "file_write" if op == "file_write" else "file_read"
        verb = "write" if op == "file_write" else "read"
        out.append(Request(sid, seq, kind, f"{verb} {target}", "deny", rule, "denied", {"path": target}))
    out.sort(key=lambda r: (r.session_id, r.seq))
    return out, info


def _policy_verdict(decision: str | None, decided_by: str | None) -> str | None:
    if decided_by == "policy" and decision:
        return "allow" if decision in ("approved", "approved_for_session") else "forbidden"
    return None


# --- deciding -------------------------------------------------------------------------------------

def section_of(req: Request) -> str:
    """The policy section that decides ``req``: network, approvals (commands) or sandbox (files)."""
    if req.kind == "network":
        return "network"
    if req.kind in ("command", "approval") and "argv" in req.args:
        return "approvals"
    return "sandbox"


def decide(policy: Policy, req: Request, cwd: str | None, home: str | None = None) -> Decision:
    """The policy's decision on a recorded request; ``home``: the session's (None: not known)."""
    a = req.args
    home = home or ANY_HOME
    if req.kind == "network":
        return policy.evaluate_network(a["host"], a["port"], a["protocol"], a["method"], addresses=a.get("addresses"))
    if req.kind in ("command", "approval") and "argv" in a:
        if a.get("source") == "hook":  # decided as the hook decides a shell tool call
            return policy.evaluate_shell_call(a["argv"], a.get("shell"), escalated=a["escalated"])
        return policy.evaluate_command(a["argv"], escalated=a["escalated"])
    if req.kind == "file_write" or a.get("patch"):
        d = policy.evaluate_write(a["path"], cwd, home=home)
        if req.kind == "approval":  # a patch approval lives in the command decision space
            return Decision("allow" if d.allowed else "forbidden", d.rule, d.reason)
        return d
    if req.kind == "file_read":
        return policy.evaluate_read(a["path"], home=home)
    raise ValueError(f"cannot decide a {req.kind} request")


def _target(r: Request) -> str:
    a = r.args
    if r.kind == "network":
        return f"{a['host']}:{a['port']}"
    if "argv" in a:
        return a["argv"][0] if a["argv"] else ""
    return a.get("path", "")


def what_if(con, policy: Policy, sessions: Iterable[str] | None = None) -> WhatIfReport:
    """Re-decide every request of ``sessions`` (all sessions of ``con`` when None) under ``policy``."""
    requests, info = collect_requests(con, sessions)
    per: dict[str, SessionWhatIf] = {}
    for sid in sorted(set(info) | {r.session_id for r in requests} | set(sessions or [])):
        i = info.get(sid, {})
        per[sid] = SessionWhatIf(sid, recorded_policy_digest=i.get("policy_digest"),
                                 same_policy=bool(policy.digest and i.get("policy_digest") == policy.digest),
                                 home=i.get("home"))
    divs: list[Divergence] = []
    skipped: dict[str, Counter] = {}
    for r in requests:
        sec = section_of(r)
        if sec not in policy.sections:
            skipped.setdefault(sec, Counter())[r.kind] += 1
            continue
        s = per[r.session_id]
        s.requests += 1
        d = decide(policy, r, info.get(r.session_id, {}).get("cwd"), per[r.session_id].home)
        eff = _effect(r.recorded, d.action)
        if eff is None:
            continue
        broke = eff in ("block", "refuse") and r.outcome in ("ok", "written", "read", "approved", "approved_for_session")
        divs.append(Divergence(r.session_id, r.seq, r.kind, r.request, r.recorded, r.recorded_rule, d.action, d.rule,
                               d.reason, eff, r.outcome, broke, _target(r)))
        s.divergences += 1
        s.effects[eff] += 1
        s.broke_work += broke
    return WhatIfReport(policy.name, policy.digest, list(per.values()), divs, len(requests) - sum(sum(c.values()) for c in skipped.values()),
                        skipped, tuple(sorted(policy.sections)), uses_home=policy.uses_home())


def session_ids(con, query: str | None) -> list[str] | None:
    """Session ids selected by a user query (its column ``session_id``, else its first column): user
    SQL, so through the read-only guard of `agentledger sql` first (`check_read_only`, which raises
    WarehouseError for what it refuses)."""
    from agentledger.schemas.warehouse import check_read_only

    if not query:
        return None
    check_read_only(con, query)
    cur = con.execute(query)
    cols = [d[0] for d in cur.description or []]
    if not cols:
        return []
    i = cols.index("session_id") if "session_id" in cols else 0
    return [str(r[i]) for r in cur.fetchall() if r[i] is not None]


def summarize_for_humans(rep: "WhatIfReport | dict") -> list[str]:
    """The report's summary as sentences (the CLI and notebook 03 print these).

    Takes a report or its ``summary()`` dict."""
    s = rep.summary() if isinstance(rep, WhatIfReport) else rep
    lines = [f"{s['requests']} requests in {s['sessions']} sessions re-decided under policy {s['policy']!r}: "
             f"{s['divergences']} would differ, in {s['sessions_diverging']} sessions."]
    if s["divergences"]:
        lines.append(f"would stop {s['sessions_stopped']} sessions; would break {s['broken_work']} successful actions "
                     f"in {s['sessions_with_broken_work']} sessions; effects: "
                     + ", ".join(f"{k} {v}" for k, v in s["by_effect"].items()))
    if s["newly_blocked_destinations"]:
        lines.append("newly blocked destinations: " + ", ".join(s["newly_blocked_destinations"]))
    if s.get("policy_uses_home") and s.get("sessions_home_unknown"):
        lines.append(f"{s['sessions_home_unknown']} of {s['sessions']} sessions did not record their home directory: "
                     f"~ in the policy was taken as any home directory ({', '.join(HOME_DIRS)}) for them, so reads "
                     "under ~ count as denied and writes under ~ as not allowed.")
    for sec, kinds in (s.get("not_redecided") or {}).items():
        lines.append(f"not re-decided (the policy has no [{sec}] section): "
                     + ", ".join(f"{v} {k} requests" for k, v in kinds.items()))
    return lines


__all__ = ["Divergence", "Request", "SessionWhatIf", "WhatIfReport", "collect_requests", "decide", "what_if",
           "recorded_home", "session_ids", "summarize_for_humans"]
