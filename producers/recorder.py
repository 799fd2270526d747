"""The session recorder the agent side uses.

    recorder = Recorder(open_sink(settings), identity=ProducerIdentity("codex", "0.46.0"))
    with recorder.session(agent="codex", cwd="/work/repo", sandbox_mode="workspace_write") as s:
        cmd = s.command_started(["pytest", "-q"], cwd="/work/repo")
        s.command_finished(cmd, exit_code=0, duration_ms=1532, stdout=b"...")

The recorder assigns event ids (UUIDv7), the per-session ``seq`` and the hash chain, applies the
transforms (secret redaction by default, see `default_transforms`), encodes with the current schema
and hands the bytes to a transport `Sink`, keyed by session id. `Recorder.from_settings` wires the
defaults every producer should use (spooling sink, redaction, signing key, checkpoint interval).

Guarantees:
- **The chain never breaks silently.** If the sink refuses or loses events (spool full, spool
  unwritable while Kafka is down), the session rolls back to its last event the sink still holds
  and the next event it can record is a ``gap`` (``spool_overflow`` or ``dropped``) saying how many
  events, bytes and which time range were lost. Events that Kafka or the spool accepted are never
  rolled back.
- **Events fit the broker.** An event larger than ``max_event_bytes`` (default just under Kafka's
  1 MiB) has its largest fields cut, and a ``gap`` of kind ``truncated`` follows it naming the field,
  the bytes lost and the event's seq.
- **Signed checkpoints.** With a signing key, a ``checkpoint`` event follows every
  ``checkpoint_every`` events and the session end (``final``), signing head_seq/head_hash/event_count
  of the events before it (schemas/checkpoints.py verifies them).
- **Fail-closed** (``mode="fail_closed"``): `SessionRecorder.guarded` makes the events of an action
  durable before the action may run, or raises `RecordingRefused` with nothing of them recorded; an
  event that cannot be accepted raises `RecordingRefused` too. In ``spool`` mode (the default) the
  recorder never raises for transport reasons: losses become gap events.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import random
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from agentledger.schemas import envvars, signing
from agentledger.schemas.config import DEFAULT_TOPIC, Settings
from agentledger.schemas.contract import SchemaStore, load_store
from agentledger.schemas.envelope import GENESIS_HASH, Sealed, Sealer, make_record, peek, system_clock_us, uuid7
from agentledger.schemas.errors import NotDurableError
from agentledger.schemas.transport.base import Sink

from .sinks import ProducerSink, RecordingRefused, SpoolFullError

log = logging.getLogger(__name__)

RECORDER_VERSION = "agentledger/0.1.0"
EXCERPT_BYTES = 2048
# Kafka's default max message size is 1 MiB (kafka-python max_request_size counts the whole request):
# keep every event comfortably below it.
MAX_EVENT_BYTES = 1_000_000
CHECKPOINT_EVERY_ENV = "AGENTLEDGER_CHECKPOINT_EVERY"
DEFAULT_CHECKPOINT_EVERY = envvars.declared(CHECKPOINT_EVERY_ENV).default
CONTROL_KINDS = frozenset({"gap", "checkpoint", "session_ended"})  # not counted towards checkpoints
_DEFAULT = object()


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
        transforms: Iterable[Transform] | None = None,
        signer: signing.Signer | None | object = _DEFAULT,
        checkpoint_every: int | None = None,
        mode: str | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ):
        """``transforms``/``signer`` left out: with a sink from `open_producer_sink` (which knows the
        settings), redaction is on and the configured signing key (if any) signs checkpoints every
        AGENTLEDGER_CHECKPOINT_EVERY events; with any other sink, neither. Pass ``transforms=[]`` or
        ``signer=None`` to turn them off explicitly."""
        settings = sink.settings if isinstance(sink, ProducerSink) else None
        if transforms is None:
            from .redact import default_transforms

            transforms = default_transforms(settings) if isinstance(settings, Settings) else []
        if signer is _DEFAULT:
            signer = load_signer(settings) if isinstance(settings, Settings) else None
        if checkpoint_every is None:
            checkpoint_every = envvars.get(CHECKPOINT_EVERY_ENV)
        self.sink = sink
        self.topic = topic
        self.identity = identity or ProducerIdentity.local("unknown")
        self.clock = clock
        self.rng = rng
        self.store = store or load_store()
        self.sealer = Sealer(self.store)
        self.transforms = list(transforms)
        self.signer = signer
        self.checkpoint_every = checkpoint_every if signer else 0
        self.mode = mode or (sink.mode if isinstance(sink, ProducerSink) else None) or "spool"
        self.max_event_bytes = max_event_bytes
        self.events_sent = 0
        self.events_lost = 0
        self._kinds = {k.kind: k.name for k in self.store.kinds}
        self._sessions: dict[str, SessionRecorder] = {}  # sessions whose events may not be durable yet
        self._send_control = sink.send_control
        self._id_rng: random.Random | None = None
        self._id_pid = -1
        sink.ensure_topic(topic)

    @classmethod
    def from_settings(cls, settings: Settings, *, identity: ProducerIdentity | None = None,
                      env: dict[str, str] | None = None, sink: Sink | None = None, **options: Any) -> "Recorder":
        """The recorder every producer should use: `open_producer_sink` (``options`` go to it: mode,
        max_block_ms, spool_max_bytes, ...), redaction on, the configured signing key (env
        AGENTLEDGER_SIGNING_KEY / _FILE, else ``$AGENTLEDGER_HOME/keys/current``) and a checkpoint
        every AGENTLEDGER_CHECKPOINT_EVERY (1000) events."""
        from .redact import default_transforms
        from .sinks import open_producer_sink

        env = os.environ if env is None else env
        sink = sink or open_producer_sink(settings, **options)
        every = envvars.get(CHECKPOINT_EVERY_ENV, env)
        return cls(sink, topic=settings.topic, identity=identity, transforms=default_transforms(settings, env),
                   signer=load_signer(settings, env), checkpoint_every=every)

    def new_id(self, at_us: int | None = None) -> str:
        ms = (at_us if at_us is not None else self.clock()) // 1000
        rng = self.rng
        if rng is None:
            # One os.urandom per event costs a syscall, and with Kafka's sender thread running, a GIL
            # hand-over (~10 us). Ids need uniqueness, not secrecy: a generator seeded from the OS,
            # reseeded after fork so that parent and child never share a sequence.
            if self._id_pid != os.getpid():
                self._id_rng, self._id_pid = random.Random(os.urandom(32)), os.getpid()
            rng = self._id_rng
        return uuid7(ms, rng.randbytes(10))

    def session(self, *, agent: str, cwd: str, session_id: str | None = None, **started: Any) -> "SessionRecorder":
        """A new session; ``started`` are the fields of session_started (model, sandbox_mode, ...)."""
        s = SessionRecorder(self, session_id or self.new_id())
        s.start(agent=agent, cwd=cwd, **started)
        return s

    def resume(self, session_id: str, next_seq: int, head_hash: str, *, crash_recovered: str | None = None,
               lost_events: int | None = None, **step: Any) -> "SessionRecorder":
        """Continue a session whose chain head is known (another process recorded the start).

        ``crash_recovered``: the previous recorder of this session died (its reason, e.g. "hook process
        killed"); the first event of the resumed chain is then a ``gap`` of kind ``crash_recovered``
        saying that events after seq ``next_seq - 1`` may be missing (``lost_events`` if known)."""
        s = SessionRecorder(self, session_id)
        s.seq, s.head_hash, s.started = next_seq, head_hash, True
        if crash_recovered:
            s.gap("crash_recovered", crash_recovered[:500], lost_events=lost_events,
                  related_seq=next_seq - 1 if next_seq else None, **step)
        return s

    def payload_name(self, kind: str) -> str:
        try:
            return self._kinds[kind]
        except KeyError:
            raise ValueError(f"unknown event kind {kind!r}; known: {sorted(self._kinds)}") from None

    def publish(self, session_id: str, sealed: Sealed, control: bool = False) -> None:
        (self._send_control if control else self.sink.send)(self.topic, session_id.encode(), sealed.value)
        self.events_sent += 1

    def flush(self, timeout: float | None = None) -> bool:
        """Make every event recorded so far durable. Returns True if it is. Otherwise the events that
        are not durable are rolled back into pending gap records; in fail-closed mode it then raises
        `RecordingRefused`, in spool mode it returns False."""
        try:
            self.sink.flush(timeout)
        except NotDurableError as exc:
            self._lost(exc)
            if self.mode == "fail_closed":
                raise RecordingRefused(f"events could not be made durable: {exc}", exc.undelivered) from exc
            return False
        for sid, s in list(self._sessions.items()):
            s.durable_seq = s.seq
            if s.ended and not s.gap_pending:
                del self._sessions[sid]
        return True

    def close(self, timeout: float | None = None) -> None:
        """Record pending gap events where possible, flush, and close the sink."""
        for s in list(self._sessions.values()):
            s.settle()
        try:
            self.flush(timeout)
        finally:
            self.sink.close(timeout)

    def _lost(self, exc: NotDurableError, current: "SessionRecorder | None" = None) -> None:
        """The sink forgot ``exc.undelivered``: roll each session back to its last held event."""
        gap_kind = "spool_overflow" if isinstance(exc, SpoolFullError) else "dropped"
        by_session: dict[str, list] = {}
        for m in exc.undelivered:
            try:
                p = peek(m.value)
            except Exception:  # noqa: BLE001 -- not ours; nothing to roll back
                continue
            by_session.setdefault(p.session_id, []).append((p, len(m.value)))
        for sid, items in by_session.items():
            s = self._sessions.get(sid)
            if s is None:
                self.events_lost += len(items)
                log.error("agentledger: %d event(s) of session %s lost and the session is no longer open", len(items), sid)
                continue
            counted = sum(1 for p, _ in items if p.seq < s.seq)  # the current event was never counted
            self.events_sent -= counted
            self.events_lost += len(items)
            s.rolled_back(items, gap_kind, str(exc))


class SessionRecorder:
    """Records one session: seq, chain head, and one method per event kind."""

    def __init__(self, recorder: Recorder, session_id: str):
        self.recorder = recorder
        self.session_id = session_id
        self.seq = 0
        self.head_hash = GENESIS_HASH
        self.started = False
        self.ended = False
        self.durable_seq = 0
        self.gap_pending: dict | None = None  # losses not yet recorded as a gap event
        self._end_lost: tuple[str, str | None] | None = None
        self._since_checkpoint = 0
        self._end_seq = -1
        self._end_args: tuple[str, str | None] | None = None
        recorder._sessions[session_id] = self

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
        """Record one event. Returns it sealed. In spool mode an event the sink refused is not recorded
        (a gap will say so); in fail-closed mode that raises `RecordingRefused`."""
        r = self.recorder
        if self.gap_pending is not None and kind != "gap":
            self._record_gap()
        sealed, truncated = self._seal(kind, payload, occurred_at_us, turn_id, tool_call_id, trace, event_id)
        try:
            r.publish(self.session_id, sealed, control=kind in CONTROL_KINDS)
        except NotDurableError as exc:
            r._lost(exc, self)
            if r.mode == "fail_closed":
                raise RecordingRefused(f"{kind} could not be recorded (fail-closed): {exc}", exc.undelivered) from exc
            return sealed
        self.seq += 1
        self.head_hash = sealed.hash
        if kind == "checkpoint":
            self._since_checkpoint = 0
        else:
            self._since_checkpoint += 1
        for path, lost in truncated:
            self.gap("truncated", f"the event exceeded {r.max_event_bytes} bytes; field cut to fit",
                     field=path, lost_bytes=lost, related_seq=self.seq - 1, occurred_at_us=sealed.record["occurred_at"])
        if r.checkpoint_every and self._since_checkpoint >= r.checkpoint_every and kind not in CONTROL_KINDS:
            self.checkpoint(final=False, occurred_at_us=sealed.record["occurred_at"])
        return sealed

    def _seal(self, kind, payload, occurred_at_us, turn_id, tool_call_id, trace, event_id):
        r = self.recorder
        at = occurred_at_us if occurred_at_us is not None else r.clock()
        record = self._record(kind, payload, at, turn_id, tool_call_id, trace, event_id)
        sealed = r.sealer.seal(record)
        truncated: list[tuple[str, int]] = []
        while len(sealed.value) > r.max_event_bytes:
            cut = _cut_largest(record, len(sealed.value) - r.max_event_bytes)
            if cut is None:
                raise ValueError(f"{kind} event of {len(sealed.value)} bytes cannot be cut below {r.max_event_bytes}")
            truncated.append(cut)
            sealed = r.sealer.seal(record)
        return sealed, truncated

    def _record(self, kind, payload, at, turn_id, tool_call_id, trace, event_id) -> dict:
        r = self.recorder
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
        return record

    # -- losses, checkpoints, fail-closed -------------------------------------------------------
    def rolled_back(self, items: list, gap_kind: str, reason: str) -> None:
        """Called by the recorder: the sink lost ``items`` (envelope peeks + sizes), a suffix of this
        session. Continue the chain from the event before the first of them, and owe a gap record."""
        first = min(items, key=lambda it: it[0].seq)[0]
        if first.seq < self.seq:
            self.seq, self.head_hash = first.seq, first.prev_hash
        times = [p.occurred_at_us for p, _ in items]
        g = self.gap_pending or {"gap_kind": gap_kind, "lost_events": 0, "lost_bytes": 0,
                                 "first_lost_at": min(times), "last_lost_at": max(times), "reason": reason}
        if g["gap_kind"] != gap_kind:
            g["gap_kind"] = "dropped"
        g["lost_events"] += len(items)
        g["lost_bytes"] += sum(n for _, n in items)
        g["first_lost_at"] = min(g["first_lost_at"], *times)
        g["last_lost_at"] = max(g["last_lost_at"], *times)
        g["reason"] = reason[:300]
        self.gap_pending = g
        if self.ended and self.seq <= self._end_seq:
            self.ended = False
            self._end_lost = self._end_args

    def _record_gap(self, force: bool = False) -> bool:
        """Write the owed gap event. Unforced, only once ordinary events fit again (so the gap is not
        followed by more losses); forced (session end, close) it may use the spool's control reserve."""
        g = self.gap_pending
        sink = self.recorder.sink
        if g is None or (not force and not sink.accepting()):
            return False
        self.gap_pending = None
        what = "refused: the spool was full" if g["gap_kind"] == "spool_overflow" else "lost: neither Kafka nor the spool could take them"
        reason = f"{g['lost_events']} event(s), {g['lost_bytes']} bytes {what} ({g['reason']})"[:500]
        before = self.seq
        self.gap(g["gap_kind"], reason, lost_events=g["lost_events"], lost_bytes=g["lost_bytes"],
                 first_lost_at=g["first_lost_at"], last_lost_at=g["last_lost_at"])
        if self.seq == before:  # the gap itself was refused: keep owing the original one
            self.gap_pending = g
        return self.seq > before

    def settle(self) -> None:
        """Record an owed gap (and a session end that was lost) if the sink takes events again."""
        if self.gap_pending is not None and self._record_gap(force=True) and self._end_lost is not None:
            status, reason = self._end_lost
            self._end_lost = None
            self.end(status, reason)

    def checkpoint(self, final: bool = False, **step: Any) -> Sealed | None:
        """Sign the chain head (the events before this checkpoint). No-op without a signing key."""
        signer = self.recorder.signer
        if signer is None or self.seq == 0:
            return None
        head_seq, count = self.seq - 1, self.seq
        sig = signer.sign_checkpoint(self.session_id, head_seq, self.head_hash, count, final)
        payload = {"head_seq": head_seq, "head_hash": self.head_hash, "event_count": count,
                   "algorithm": signing.ALGORITHM, "key_id": signer.key_id, "signature": sig, "final": final}
        return self.emit("checkpoint", payload, **step)

    @contextmanager
    def guarded(self) -> Iterator["SessionRecorder"]:
        """Record the events of an action that must not run unrecorded::

            with session.guarded():
                cmd = session.command_started(argv, cwd)
            run(argv)            # only reached when the event is durable

        On exit the events are flushed (Kafka ack or spool fsync). In fail-closed mode, if that fails,
        `RecordingRefused` is raised, the session is rolled back (nothing claims to be recorded) and the
        agent side must deny the action. In spool mode it never raises."""
        yield self
        self.recorder.flush()

    # -- session family -------------------------------------------------------------------
    def start(self, *, agent: str, cwd: str, network_policy: dict | None = None, **fields: Any) -> Sealed:
        step = _pop_step(fields)
        signer = self.recorder.signer
        payload = {
            "agent": agent,
            "cwd": cwd,
            "sandbox_mode": "unknown",
            "approval_policy": "unknown",
            "network_policy": network_policy or {"mode": "unknown", "allowed_domains": [], "denied_domains": []},
            "recording_mode": self.recorder.mode,
            "checkpoint_key_id": signer.key_id if signer else None,
            **fields,
        }
        self.started = True
        return self.emit("session_started", payload, **step)

    def end(self, status: str = "completed", reason: str | None = None, **step: Any) -> Sealed:
        """End the session; a final signed checkpoint follows when a signing key is configured."""
        if self.gap_pending is not None:
            self._record_gap(force=True)
        self._end_seq, self._end_args = self.seq, (status, reason)
        before = self.seq
        sealed = self.emit("session_ended", {"status": status, "reason": reason}, **step)
        if self.seq > before:
            self.ended = True
            self.checkpoint(final=True, **{k: v for k, v in step.items() if k == "occurred_at_us"})
        else:
            self._end_lost = (status, reason)
        return sealed

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


def _cut_largest(record: dict, excess: int) -> tuple[str, int] | None:
    """Shorten the largest string of the payload by at least ``excess`` bytes (+ room for the marker).
    Returns (field path, bytes cut) or None if there is nothing left to cut."""
    best: tuple[int, Any, Any, str] | None = None

    def walk(container, key, value, path):
        nonlocal best
        if isinstance(value, str):
            n = len(value.encode("utf-8", "surrogateescape"))
            if best is None or n > best[0]:
                best = (n, container, key, path)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(value, k, v, f"{path}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(value, i, v, f"{path}[{i}]")

    name, payload = record["payload"]
    payload = _deep_copy(payload)
    record["payload"] = (name, payload)
    walk(None, None, payload, "payload")
    if best is None or best[0] <= 64:
        return None
    size, container, key, path = best
    keep = max(0, size - excess - 128)
    raw = container[key].encode("utf-8", "surrogateescape")[:keep].decode("utf-8", "ignore")
    container[key] = raw + f"…[truncated {size - keep} bytes]"
    return path, size - keep


def _deep_copy(v):
    if isinstance(v, dict):
        return {k: _deep_copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_deep_copy(x) for x in v]
    return v


def load_signer(settings: Settings, env: dict[str, str] | None = None) -> signing.Signer | None:
    """The checkpoint signing key: AGENTLEDGER_SIGNING_KEY / AGENTLEDGER_SIGNING_KEY_FILE, else the key
    `agentledger keys generate` marked current in ``$AGENTLEDGER_HOME/keys``; None means unsigned.
    A key file that `schemas.keys.check_key_path` refuses raises `UnsafeKeyError`."""
    from agentledger.schemas.errors import ConfigError

    signer = signing.signer_from_env(env)
    if signer is not None:
        return signer
    keys = settings.home / "keys"
    try:
        kid = (keys / "current").read_text().strip()
    except OSError:
        return None
    if len(kid) != 16 or any(c not in "0123456789abcdef" for c in kid):
        raise ConfigError(f"{keys / 'current'} does not name a key id (16 hex digits): {kid[:40]!r}")
    return signing.load_private_file(keys / f"{kid}.key", f"signing key {kid} (named in {keys / 'current'})")
