"""The session recorder the agent side uses.

    recorder = Recorder(open_sink(settings), identity=ProducerIdentity("codex", "0.46.0"))
    with recorder.session(agent="codex", cwd="/work/repo", sandbox_mode="workspace_write") as s:
        cmd = s.command_started(["pytest", "-q"], cwd="/work/repo")
        s.command_finished(cmd, exit_code=0, duration_ms=1532, stdout=b"...")

The recorder assigns event ids (UUIDv7), the per-session ``seq`` and the hash chain, encodes with
the current schema and hands the bytes to a transport `Sink`, keyed by session id.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import random
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from schemas.config import DEFAULT_TOPIC
from schemas.contract import SchemaStore, load_store
from schemas.envelope import GENESIS_HASH, Sealed, Sealer, make_record, system_clock_us, uuid7
from schemas.transport.base import Sink

RECORDER_VERSION = "agentledger/0.1.0"
EXCERPT_BYTES = 2048


@dataclass(frozen=True)
class ProducerIdentity:
    agent_name: str
    agent_version: str | None = None
    host: str | None = None
    user: str | None = None
    source: str = "recorder"

    @classmethod
    def local(cls, agent_name: str, agent_version: str | None = None, source: str = "recorder") -> "ProducerIdentity":
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = None
        return cls(agent_name, agent_version, socket.gethostname(), user, source)

    def record(self) -> dict:
        return {
            "agent_name": self.agent_name,
            "agent_version": self.agent_version,
            "host": self.host,
            "user": self.user,
            "source": self.source,
            "recorder_version": RECORDER_VERSION,
        }


def output_digest(data: bytes | str | None, excerpt_bytes: int = EXCERPT_BYTES) -> dict:
    """Digest + size + bounded excerpt of a command's output; the output itself is never recorded."""
    if data is None:
        data = b""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    excerpt = data[:excerpt_bytes].decode("utf-8", "replace")
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "excerpt": excerpt,
        "truncated": len(data) > excerpt_bytes,
    }


def action_digest(*parts: Any) -> str:
    """Digest of the exact action an approval is about (argv, cwd, patch text, destination...)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, (list, tuple)):
            for item in p:
                h.update(str(item).encode("utf-8", "surrogateescape") + b"\x00")
        else:
            h.update(str(p).encode("utf-8", "surrogateescape"))
        h.update(b"\x1e")
    return h.hexdigest()


Transform = Callable[[dict], dict]


class Recorder:
    """Shared by all sessions of one process: sink, identity, clock, id source, schema."""

    def __init__(
        self,
        sink: Sink,
        *,
        topic: str = DEFAULT_TOPIC,
        identity: ProducerIdentity | None = None,
        clock: Callable[[], int] = system_clock_us,
        rng: random.Random | None = None,
        store: SchemaStore | None = None,
        transforms: Iterable[Transform] = (),
    ):
        self.sink = sink
        self.topic = topic
        self.identity = identity or ProducerIdentity.local("unknown")
        self.clock = clock
        self.rng = rng
        self.store = store or load_store()
        self.sealer = Sealer(self.store)
        self.transforms = list(transforms)
        self.events_sent = 0
        self._kinds = {k.kind: k.name for k in self.store.kinds}
        sink.ensure_topic(topic)

    def new_id(self, at_us: int | None = None) -> str:
        ms = (at_us if at_us is not None else self.clock()) // 1000
        return uuid7(ms, self.rng.randbytes(10) if self.rng else os.urandom(10))

    def session(self, *, agent: str, cwd: str, session_id: str | None = None, **started: Any) -> "SessionRecorder":
        """A new session; ``started`` are the fields of session_started (model, sandbox_mode, ...)."""
        s = SessionRecorder(self, session_id or self.new_id())
        s.start(agent=agent, cwd=cwd, **started)
        return s

    def resume(self, session_id: str, next_seq: int, head_hash: str) -> "SessionRecorder":
        """Continue a session whose chain head is known (another process recorded the start)."""
        s = SessionRecorder(self, session_id)
        s.seq, s.head_hash, s.started = next_seq, head_hash, True
        return s

    def payload_name(self, kind: str) -> str:
        try:
            return self._kinds[kind]
        except KeyError:
            raise ValueError(f"unknown event kind {kind!r}; known: {sorted(self._kinds)}") from None

    def publish(self, session_id: str, sealed: Sealed) -> None:
        self.sink.send(self.topic, session_id.encode(), sealed.value)
        self.events_sent += 1

    def flush(self, timeout: float | None = None) -> None:
        self.sink.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        self.sink.close(timeout)


class SessionRecorder:
    """Records one session: seq, chain head, and one method per event kind."""

    def __init__(self, recorder: Recorder, session_id: str):
        self.recorder = recorder
        self.session_id = session_id
        self.seq = 0
        self.head_hash = GENESIS_HASH
        self.started = False
        self.ended = False

    # -- core -----------------------------------------------------------------------------
    def emit(
        self,
        kind: str,
        payload: dict,
        *,
        occurred_at_us: int | None = None,
        turn_id: str | None = None,
        tool_call_id: str | None = None,
        trace: dict | None = None,
        event_id: str | None = None,
    ) -> Sealed:
        r = self.recorder
        at = occurred_at_us if occurred_at_us is not None else r.clock()
        record = make_record(
            event_id=event_id or r.new_id(at),
            session_id=self.session_id,
            seq=self.seq,
            occurred_at_us=at,
            producer=r.identity.record(),
            payload_name=r.payload_name(kind),
            payload=payload,
            prev_hash=self.head_hash,
            turn_id=turn_id,
            tool_call_id=tool_call_id,
            trace=trace,
        )
        for t in r.transforms:
            record = t(record)
        sealed = r.sealer.seal(record)
        r.publish(self.session_id, sealed)
        self.seq += 1
        self.head_hash = sealed.hash
        return sealed

    # -- session family -------------------------------------------------------------------
    def start(self, *, agent: str, cwd: str, network_policy: dict | None = None, **fields: Any) -> Sealed:
        step = _pop_step(fields)
        payload = {
            "agent": agent,
            "cwd": cwd,
            "sandbox_mode": "unknown",
            "approval_policy": "unknown",
            "network_policy": network_policy or {"mode": "unknown", "allowed_domains": [], "denied_domains": []},
            "recording_mode": "spool",
            **fields,
        }
        self.started = True
        return self.emit("session_started", payload, **step)

    def end(self, status: str = "completed", reason: str | None = None, **step: Any) -> Sealed:
        self.ended = True
        return self.emit("session_ended", {"status": status, "reason": reason}, **step)

    def gap(self, gap_kind: str, reason: str, **fields: Any) -> Sealed:
        step = _pop_step(fields)
        return self.emit("gap", {"gap_kind": gap_kind, "reason": reason, **fields}, **step)

    def __enter__(self) -> "SessionRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.ended:
            if exc_type is None:
                self.end("completed")
            else:
                self.end("failed", f"{exc_type.__name__}: {exc}"[:500])
        self.recorder.flush()

    # -- sandbox family -------------------------------------------------------------------
    def command_started(self, argv: list[str], cwd: str, *, command_id: str | None = None, **fields: Any) -> str:
        step = _pop_step(fields)
        command_id = command_id or self.recorder.new_id()
        self.emit("command_started", {"command_id": command_id, "argv": list(argv), "cwd": cwd, **fields}, **step)
        return command_id

    def command_finished(
        self,
        command_id: str,
        *,
        exit_code: int | None,
        duration_ms: int,
        status: str | None = None,
        stdout: bytes | str | None = b"",
        stderr: bytes | str | None = b"",
        **fields: Any,
    ) -> Sealed:
        step = _pop_step(fields)
        if status is None:
            status = "completed" if exit_code == 0 else "failed"
        payload = {
            "command_id": command_id,
            "exit_code": exit_code,
            "duration_ms": int(duration_ms),
            "status": status,
            "stdout": stdout if isinstance(stdout, dict) else output_digest(stdout),
            "stderr": stderr if isinstance(stderr, dict) else output_digest(stderr),
            **fields,
        }
        return self.emit("command_finished", payload, **step)

    def file_accessed(self, path: str, operation: str, **fields: Any) -> Sealed:
        step = _pop_step(fields)
        return self.emit("file_accessed", {"path": path, "operation": operation, **fields}, **step)

    def sandbox_denied(self, operation: str, target: str, reason: str, **fields: Any) -> Sealed:
        step = _pop_step(fields)
        payload = {"operation": operation, "target": target, "reason": reason, **fields}
        return self.emit("sandbox_denied", payload, **step)

    # -- approval family ------------------------------------------------------------------
    def approval_requested(
        self, action_kind: str, subject: str, action_digest: str, *, request_id: str | None = None, **fields: Any
    ) -> str:
        step = _pop_step(fields)
        request_id = request_id or self.recorder.new_id()
        payload = {"request_id": request_id, "action_kind": action_kind, "subject": subject,
                   "action_digest": action_digest, **fields}
        self.emit("approval_requested", payload, **step)
        return request_id

    def approval_decided(self, request_id: str, decision: str, decided_by: str, **fields: Any) -> Sealed:
        step = _pop_step(fields)
        payload = {"request_id": request_id, "decision": decision, "decided_by": decided_by, **fields}
        return self.emit("approval_decided", payload, **step)

    # -- network family -------------------------------------------------------------------
    def network_attempted(
        self, host: str, port: int, protocol: str, *, attempt_id: str | None = None, **fields: Any
    ) -> str:
        step = _pop_step(fields)
        attempt_id = attempt_id or self.recorder.new_id()
        payload = {"attempt_id": attempt_id, "host": host, "port": int(port), "protocol": protocol, **fields}
        self.emit("network_attempted", payload, **step)
        return attempt_id

    def network_decided(self, attempt_id: str, decision: str, **fields: Any) -> Sealed:
        step = _pop_step(fields)
        return self.emit("network_decided", {"attempt_id": attempt_id, "decision": decision, **fields}, **step)

    def network_completed(self, attempt_id: str, outcome: str, **fields: Any) -> Sealed:
        step = _pop_step(fields)
        return self.emit("network_completed", {"attempt_id": attempt_id, "outcome": outcome, **fields}, **step)


_STEP_KEYS = ("occurred_at_us", "turn_id", "tool_call_id", "trace", "event_id")


def _pop_step(fields: dict) -> dict:
    """Envelope arguments (time, agent-step links, trace) travel in the same kwargs as payload fields."""
    return {k: fields.pop(k) for k in _STEP_KEYS if k in fields}
