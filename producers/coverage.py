"""Coverage statements: what the source that recorded a session cannot contain at all (issue 24).

Each source sees only part of an agent session (docs/agents.md, "What each source cannot see"). So
that a reader knows what the evidence does *not* prove, every source states, once per (session,
source, field), what it cannot hold: a ``gap`` event with ``gap_kind = "not_observable"`` (schema
v4), ``field`` a stable short key of what is missing, ``reason`` a plain sentence. They are facts
like any other (fact key ``coverage:<source>:<field>``): recorded once, never again by a re-import.

Not a loss: a ``not_observable`` gap says what the source *could not* have recorded; losses (lines
that could not be read, spool overflows, ...) are the other gap kinds.
"""

from __future__ import annotations

from .ledger import Observation

# (field, reason) per source; "limited" / "extended": the Codex rollout's persistence mode.
CODEX_ROLLOUT_ALWAYS = (
    ("approval_requested",
     "Codex never writes approval requests (exec_approval_request, apply_patch_approval_request) to rollout files: "
     "a prompt shown to the user is not in this source (escalations asked for in a tool call's arguments and "
     "guardian reviews are)."),
)
CODEX_ROLLOUT_LIMITED = (
    ("approval_decided:user",
     "This rollout was written in Codex's default (limited) persistence mode -- no exec_command_end or *_begin "
     "lines: the user's approvals are not in it (a decline may still show in a command's output)."),
    ("command_finished",
     "Limited persistence mode: exec_command_end is not written, so a command's exit code, duration and status "
     "come only from its tool output and may be missing."),
)
CLAUDE_TRANSCRIPT = (
    ("approval_decided:user",
     "A Claude Code transcript never records a manual approval by the user (denials are recorded): approvals come "
     "only from the hook (PermissionRequest) or OTel (claude_code.tool_decision)."),
    ("network_destination:web_search",
     "WebSearch runs on the model provider's side: the transcript holds no network destination for it (recorded "
     "as the host \"(web search)\")."),
)
OTEL = {
    "claude-code": (
        ("command_input:truncated_512",
         "Claude Code's OTel tool_result events truncate tool inputs (tool_parameters, e.g. a Bash full_command) at "
         "about 512 characters: a longer command is cut in this source."),
    ),
    "codex": (
        ("approval_decided:command",
         "Codex's codex.tool_decision names the tool and the call id but not the command: a decision from this "
         "source is tied to its command only through another source's record of the same call_id."),
    ),
}
HOOK = (
    ("user_rejections",
     "A user's refusal at the agent's own permission prompt is not sent to hooks: only the transcript "
     "(Claude Code) or OTel records it."),
    ("subagents",
     "Tool calls of sub-agents are not sent to this session's hooks: the sub-agents' transcripts record them."),
)


def statements(kind: str, agent: str | None = None, mode: str | None = None) -> tuple[tuple[str, str], ...]:
    """(field, reason) of what a source cannot contain. ``kind``: codex_rollout, claude_code, otel,
    hook; ``agent`` for OTel (per agent); ``mode`` for a Codex rollout: "limited", "extended" or
    None (not decided yet: only what holds in both modes)."""
    if kind == "codex_rollout":
        return CODEX_ROLLOUT_ALWAYS + (CODEX_ROLLOUT_LIMITED if mode == "limited" else ())
    if kind == "claude_code":
        return CLAUDE_TRANSCRIPT
    if kind == "otel":
        return OTEL.get(agent or "", ())
    if kind == "hook":
        return HOOK
    return ()


def fact_key(kind: str, field: str) -> str:
    return f"coverage:{kind}:{field}"


def observation(session_id: str, kind: str, field: str, reason: str, at_us: int, *, source: str, agent: str,
                agent_version: str | None = None, order: tuple = ()) -> Observation:
    """The ``gap(not_observable)`` fact of one statement."""
    return Observation(session_id, fact_key(kind, field), "gap",
                       {"gap_kind": "not_observable", "reason": reason, "field": field, "lost_events": None,
                        "lost_bytes": None, "first_lost_at": None, "last_lost_at": None, "related_seq": None},
                       at_us, source=source, agent=agent, agent_version=agent_version, order=order)


MAX_STATED_KEPT = 2000  # per file, in the parser's saved context


def for_parser(parser, file_index: int) -> list[Observation]:
    """The statements a parsed file adds for the sessions it contributed to this run and not yet
    stated from this file (``parser.ctx["coverage"]``; the fact table dedupes across files and runs)."""
    kind = getattr(parser, "kind", None)
    firsts: dict[str, tuple[int, str, str | None, str]] = {}  # session -> (first time, agent, version, source)
    for o in parser.observations:
        f = firsts.get(o.session_id)
        if o.session_id and (f is None or o.at_us < f[0]):
            firsts[o.session_id] = (o.at_us, o.agent, o.agent_version, o.source)
    for i in parser.infos:
        f = firsts.get(i.session_id)
        if i.session_id and (f is None or i.at_us < f[0]):
            firsts[i.session_id] = (i.at_us, i.agent, i.agent_version, i.source)
    if not firsts:
        return []
    mode = parser.coverage_mode() if hasattr(parser, "coverage_mode") else None
    stated = parser.ctx.setdefault("coverage", [])
    done = set(stated)
    out: list[Observation] = []
    for sid in sorted(firsts):
        at, agent, version, source = firsts[sid]
        for n, (field, reason) in enumerate(statements(kind, agent, mode)):
            key = f"{sid}\x00{field}"
            if key in done:
                continue
            out.append(observation(sid, kind, field, reason, at, source=source, agent=agent, agent_version=version,
                                   order=(file_index, -1, n)))
            stated.append(key)
            done.add(key)
    if len(stated) > MAX_STATED_KEPT:
        del stated[:len(stated) - MAX_STATED_KEPT]
    return out
