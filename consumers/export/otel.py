"""Sessions as OpenTelemetry traces over OTLP/HTTP (protobuf), with the GenAI semantic conventions:
the one module that imports the OpenTelemetry SDK (extra ``otel``).

One trace per session (trace id = the first 16 bytes of SHA-256 of the session id, so a re-export
lands in the same trace):

* root span ``invoke_agent {agent}`` (kind INTERNAL): from the session's first event to its end;
  ``gen_ai.operation.name`` invoke_agent, ``gen_ai.agent.name``, ``gen_ai.conversation.id`` = session
  id, ``gen_ai.request.model``, ``gen_ai.provider.name`` (codex: openai, claude-code: anthropic);
  status ERROR when the session ended failed, aborted or crashed;
* child span ``execute_tool {tool}`` per MCP tool call (command_started with an ``mcp`` record ..
  command_finished): ``gen_ai.tool.name`` the MCP tool, ``gen_ai.tool.type`` extension,
  ``mcp.method.name`` tools/call, ``gen_ai.tool.call.arguments`` (as recorded: redacted),
  ``agentledger.mcp.server`` / ``.arguments_digest`` / ``.outcome``, ``error.type`` declined or
  tool_error; status ERROR unless the outcome is ok;
* child span ``execute_tool {tool}`` per command (command_started .. command_finished):
  ``gen_ai.operation.name`` execute_tool, ``gen_ai.tool.name`` (shell), ``gen_ai.tool.type``
  function, ``gen_ai.tool.call.id``, ``process.command_line`` / ``process.exit.code``; status ERROR
  unless it completed; and per tool call that touched files outside a command: ``execute_tool
  apply_patch`` (it changed files) or ``execute_tool read_file``, one span event per file;
* span events: file accesses, approvals (``agentledger.approval.requested`` / ``.decided``),
  network attempts, decisions and outcomes (``agentledger.network.*``, with ``server.address``,
  ``server.port``, ``url.full``), sandbox denials and gaps: on their command's span when the event
  names a command and falls within it, else on the root span.

Every value comes from the warehouse as stored (secrets are already ``[SECRET:rule:hmac8]`` tokens).
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode

from agentledger.schemas.errors import AgentLedgerError

from .ocsf_files import event_rows

PROVIDERS = {"codex": "openai", "claude-code": "anthropic", "claude": "anthropic", "gemini": "gcp.gemini",
             "gemini-cli": "gcp.gemini"}
FAILED_ENDS = ("failed", "aborted", "crashed")
CHUNK = 512


def ns(t: Any) -> int:
    if isinstance(t, datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        return int(t.timestamp() * 1_000_000) * 1000
    return int(t)


def _attrs(d: dict) -> dict:
    """OTel attribute values: str, bool, int, float or lists of one of them; None dropped."""
    out = {}
    for k, v in d.items():
        if v is None or v == []:
            continue
        if isinstance(v, (list, tuple)):
            v = [str(x) for x in v if x is not None]
        elif not isinstance(v, (str, bool, int, float)):
            v = str(v)
        out[k] = v
    return out


def trace_id_of(session_id: str) -> int:
    return int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:16], "big") or 1


class _Ids(RandomIdGenerator):
    """Trace ids derived from the session being exported; span ids random."""

    def __init__(self) -> None:
        self.next_trace: int | None = None

    def generate_trace_id(self) -> int:
        return self.next_trace if self.next_trace is not None else super().generate_trace_id()


class _Collect(SpanProcessor):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


@dataclass
class OtelExport:
    endpoint: str
    sessions: int = 0
    spans: int = 0
    span_events: int = 0
    trace_ids: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"endpoint": self.endpoint, "sessions": self.sessions, "spans": self.spans,
                "span_events": self.span_events, "trace_ids": self.trace_ids}


def traces_endpoint(endpoint: str) -> str:
    e = endpoint.rstrip("/")
    if not e.startswith(("http://", "https://")):
        raise AgentLedgerError(f"--endpoint must be an http:// or https:// URL, not {endpoint!r}")
    return e if e.endswith("/v1/traces") else e + "/v1/traces"


class _Session:
    """Builds one session's spans from its rows (in seq order)."""

    def __init__(self, tracer, rows: list[dict], res: OtelExport):
        self.tracer, self.rows, self.res = tracer, rows, res

    def _mcp_span(self, ctx, base: dict, t: int, cid: str, p: dict, fin: dict | None) -> list:
        """An MCP tool call: ``execute_tool {tool}`` (GenAI) with the MCP method and server, the
        arguments as recorded (already redacted) and their digest, the outcome; ERROR unless ok."""
        m = p["mcp"]
        fp = (fin or {}).get("command_finished") or {}
        outcome = _mcp_outcome(fp)
        argv = list(p.get("argv") or [])
        span = self.tracer.start_span(
            f"execute_tool {m.get('tool')}", context=ctx, kind=SpanKind.INTERNAL, start_time=t,
            attributes=_attrs({**base, "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": m.get("tool"),
                               "gen_ai.tool.type": "extension", "mcp.method.name": "tools/call",
                               "gen_ai.tool.call.arguments": argv[1] if len(argv) > 1 else None,
                               "agentledger.mcp.server": m.get("server"),
                               "agentledger.mcp.arguments_digest": m.get("arguments_digest"),
                               "agentledger.mcp.outcome": outcome,
                               "error.type": None if outcome == "ok" else ("declined" if outcome == "declined"
                                                                            else "tool_error" if fin else None),
                               "agentledger.command_id": cid, "agentledger.command_status": fp.get("status"),
                               "agentledger.duration_ms": fp.get("duration_ms")}))
        if outcome != "ok":
            err = (fp.get("mcp") or {}).get("error")
            span.set_status(Status(StatusCode.ERROR, (err or outcome)[:200] if fin else "no command_finished recorded"))
        end = max(ns(fin["occurred_at"]), t) if fin else t
        return [span, t, end]

    def build(self) -> None:
        rows = self.rows
        first = rows[0]
        sid = first["session_id"]
        producer = first.get("producer") or {}
        started = next((r["session_started"] for r in rows if r["kind"] == "session_started"), None) or {}
        ended = next((r for r in rows if r["kind"] == "session_ended"), None)
        agent = started.get("agent") or producer.get("agent_name") or "agent"
        root = self.tracer.start_span(
            f"invoke_agent {agent}", kind=SpanKind.INTERNAL, start_time=ns(first["occurred_at"]),
            attributes=_attrs({
                "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": agent,
                "gen_ai.conversation.id": sid, "gen_ai.request.model": started.get("model"),
                "gen_ai.provider.name": PROVIDERS.get(agent), "gen_ai.agent.version": producer.get("agent_version"),
                "user.name": producer.get("user"), "host.name": producer.get("host"),
                "agentledger.source": producer.get("source"), "agentledger.cwd": started.get("cwd"),
                "agentledger.sandbox_mode": started.get("sandbox_mode"),
                "agentledger.approval_policy": started.get("approval_policy"),
                "agentledger.event_count": len(rows), "agentledger.head_hash": rows[-1]["hash"]}))
        ctx = trace.set_span_in_context(root)
        commands: dict[str, list] = {}  # command_id -> [span, start_ns, end_ns]
        finishes = {r["command_finished"]["command_id"]: r for r in rows
                    if r["kind"] == "command_finished" and r["command_finished"].get("command_id")}
        patches: dict[str, list[dict]] = {}
        pending: list[tuple[str | None, str, int, dict]] = []  # (command_id, name, time, attributes)
        for r in rows:
            kind, p, t = r["kind"], r.get(r["kind"]) or {}, ns(r["occurred_at"])
            base = {"agentledger.seq": r["seq"], "agentledger.event_id": r["event_id"],
                    "gen_ai.tool.call.id": r.get("tool_call_id")}
            if kind == "command_started" and p.get("mcp"):
                cid = p.get("command_id") or r["event_id"]
                fin = finishes.get(cid)
                commands[cid] = self._mcp_span(ctx, base, t, cid, p, fin)
            elif kind == "command_started":
                cid = p.get("command_id") or r["event_id"]
                fin = finishes.get(cid)
                fp = (fin or {}).get("command_finished") or {}
                end = max(ns(fin["occurred_at"]), t) if fin else t
                argv = list(p.get("argv") or [])
                span = self.tracer.start_span(
                    "execute_tool shell", context=ctx, kind=SpanKind.INTERNAL, start_time=t,
                    attributes=_attrs({**base, "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "shell",
                                       "gen_ai.tool.type": "function",
                                       "process.command_line": p.get("shell") or (shlex.join(argv) if argv else None),
                                       "process.command_args": argv, "process.pid": p.get("pid"),
                                       "agentledger.command_id": cid, "agentledger.cwd": p.get("cwd"),
                                       "agentledger.escalated": p.get("escalated"),
                                       "process.exit.code": fp.get("exit_code"),
                                       "agentledger.command_status": fp.get("status"),
                                       "agentledger.duration_ms": fp.get("duration_ms")}))
                if fin is None or fp.get("status") != "completed":
                    span.set_status(Status(StatusCode.ERROR, fp.get("status") or "no command_finished recorded"))
                commands[cid] = [span, t, end]
            elif kind == "file_accessed" and not p.get("command_id") and r.get("tool_call_id"):
                patches.setdefault(r["tool_call_id"], []).append(r)
            elif kind in ("file_accessed", "sandbox_denied", "approval_requested", "approval_decided",
                          "network_attempted", "network_decided", "network_completed", "gap"):
                pending.append((p.get("command_id"), f"agentledger.{_event_name(kind)}", t,
                                _attrs({**base, **_event_attrs(kind, p)})))
        for call_id, frs in patches.items():
            t0, t1 = ns(frs[0]["occurred_at"]), ns(frs[-1]["occurred_at"])
            writes = any((f["file_accessed"].get("operation") or "read") != "read" for f in frs)
            tool = "apply_patch" if writes else "read_file"
            span = self.tracer.start_span(
                f"execute_tool {tool}", context=ctx, kind=SpanKind.INTERNAL, start_time=t0,
                attributes=_attrs({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
                                   "gen_ai.tool.type": "function", "gen_ai.tool.call.id": call_id,
                                   "agentledger.files": [f["file_accessed"].get("path") for f in frs]}))
            for f in frs:
                span.add_event("agentledger.file." + (f["file_accessed"].get("operation") or "access"),
                               _attrs({"agentledger.seq": f["seq"], **_event_attrs("file_accessed", f["file_accessed"])}),
                               timestamp=ns(f["occurred_at"]))
                self.res.span_events += 1
            span.end(end_time=t1)
        for cid, name, t, attrs in pending:
            target = commands.get(cid) if cid else None
            span = target[0] if target and target[1] <= t <= target[2] else root
            span.add_event(name, attrs, timestamp=t)
            self.res.span_events += 1
        for span, _t0, t1 in commands.values():
            span.end(end_time=t1)
        if ended is not None:
            e = ended["session_ended"] or {}
            root.set_attribute("agentledger.end_status", e.get("status") or "")
            if e.get("status") in FAILED_ENDS:
                root.set_status(Status(StatusCode.ERROR, e.get("reason") or e.get("status")))
        end = ns(rows[-1]["occurred_at"])
        root.end(end_time=max(end, ns(first["occurred_at"])))


def _mcp_outcome(fp: dict) -> str:
    m = fp.get("mcp") or {}
    if m.get("outcome") not in (None, "unknown"):
        return str(m["outcome"])
    return {"completed": "ok", "declined": "declined"}.get(fp.get("status") or "", "error" if fp else "pending")


def _event_name(kind: str) -> str:
    return {"file_accessed": "file.access", "sandbox_denied": "sandbox.denied", "gap": "gap"}.get(
        kind, kind.replace("_", ".", 1))


def _event_attrs(kind: str, p: dict) -> dict:
    if kind == "file_accessed":
        return {"file.path": p.get("path"), "agentledger.operation": p.get("operation"),
                "agentledger.inside_workspace": p.get("inside_workspace"), "file.size": p.get("size_after")}
    if kind == "sandbox_denied":
        return {"agentledger.operation": p.get("operation"), "agentledger.target": p.get("target"),
                "agentledger.rule": p.get("rule"), "agentledger.reason": p.get("reason")}
    if kind == "approval_requested":
        return {"agentledger.request_id": p.get("request_id"), "agentledger.action_kind": p.get("action_kind"),
                "agentledger.subject": p.get("subject"), "agentledger.risk": p.get("risk")}
    if kind == "approval_decided":
        return {"agentledger.request_id": p.get("request_id"), "agentledger.decision": p.get("decision"),
                "agentledger.decided_by": p.get("decided_by"), "agentledger.decider": p.get("decider"),
                "agentledger.rule": p.get("rule"), "agentledger.latency_ms": p.get("latency_ms")}
    if kind == "network_attempted":
        return {"agentledger.attempt_id": p.get("attempt_id"), "server.address": p.get("host"),
                "server.port": p.get("port"), "network.protocol.name": p.get("protocol"),
                "http.request.method": p.get("method"), "url.full": p.get("url")}
    if kind == "network_decided":
        return {"agentledger.attempt_id": p.get("attempt_id"), "agentledger.decision": p.get("decision"),
                "agentledger.rule": p.get("rule"), "agentledger.reason": p.get("reason"),
                "agentledger.addresses": p.get("addresses")}
    if kind == "network_completed":
        return {"agentledger.attempt_id": p.get("attempt_id"), "agentledger.outcome": p.get("outcome"),
                "http.response.status_code": p.get("status"), "agentledger.bytes_in": p.get("bytes_in"),
                "agentledger.bytes_out": p.get("bytes_out"), "agentledger.error": p.get("error")}
    if kind == "gap":
        return {"agentledger.gap_kind": p.get("gap_kind"), "agentledger.lost_events": p.get("lost_events"),
                "agentledger.reason": p.get("reason")}
    return {}


def export_traces(wh, endpoint: str, *, product_version: str, sessions: Sequence[str] | None = None,
                  since: str | None = None, timeout_s: float = 30.0) -> OtelExport:
    """Build the selected sessions' traces and send them to ``endpoint`` over OTLP/HTTP; raises when
    the receiver does not accept them."""
    url = traces_endpoint(endpoint)
    res = OtelExport(url)
    ids = _Ids()
    collect = _Collect()
    provider = TracerProvider(resource=Resource.create({"service.name": "agentledger",
                                                        "service.version": product_version}), id_generator=ids)
    provider.add_span_processor(collect)
    tracer = provider.get_tracer("agentledger.export", product_version)
    exporter = OTLPSpanExporter(endpoint=url, timeout=timeout_s)

    def flush() -> None:
        if not collect.spans:
            return
        batch, collect.spans = collect.spans, []
        for i in range(0, len(batch), CHUNK):
            if exporter.export(batch[i:i + CHUNK]) is not SpanExportResult.SUCCESS:
                raise AgentLedgerError(f"the OTLP receiver at {url} did not accept the spans (unreachable, or it "
                                       "answered with an error: run with -v for the exporter's log)")
        res.spans += len(batch)

    chosen = None
    if since:
        chosen = [r[0] for r in wh.query("SELECT session_id FROM events GROUP BY 1 HAVING min(occurred_at) >= "
                                         "CAST(? AS TIMESTAMP)", [since]).fetchall()]
        chosen = [s for s in chosen if sessions is None or s in sessions]
    elif sessions is not None:
        chosen = list(sessions)
    try:
        current: list[dict] = []
        for row in event_rows(wh, chosen):
            if current and row["session_id"] != current[0]["session_id"]:
                _one(tracer, ids, current, res)
                current = []
                if len(collect.spans) >= CHUNK:
                    flush()
            current.append(row)
        if current:
            _one(tracer, ids, current, res)
        flush()
    finally:
        exporter.shutdown()
        provider.shutdown()
    return res


def _one(tracer, ids: _Ids, rows: list[dict], res: OtelExport) -> None:
    sid = rows[0]["session_id"]
    ids.next_trace = trace_id_of(sid)
    _Session(tracer, rows, res).build()
    ids.next_trace = None
    res.sessions += 1
    res.trace_ids[sid] = f"{trace_id_of(sid):032x}"
