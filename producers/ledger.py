"""Appending observed facts to a session's chain, from any number of processes and sources.

The importers and the hook do not write events directly: they describe what a source states as
`Observation`s, each with a semantic *fact key* (``cmd:<call_id>:started``,
``approval:<call_id>:decided``, ...). `SessionAppender.append` turns the new ones into events of
one session, through `producers.recorder` (ids, seq, hash chain, transforms, encoding), and sends
them to the producer sink.

Guarantees, per session (all producers of this host share them through `ProducerState`):

* **One chain.** seq and prev_hash continue from the stored head, whichever source or process
  appended last; the per-session lock is held from reading the head to committing the new one,
  with the send and flush to the transport inside, so seq order is transport order.
* **Each fact once.** A fact already recorded (re-import, the other source of the same session,
  a retried hook) is skipped; several observations of the same new fact in one batch become one
  event, the most informative one (highest priority, then earliest), completed with the
  fields only the others state.
* **Crash consistency (write-ahead outbox).** Sealed events are committed to the outbox before
  they are sent; the head advances, and their facts are recorded, only in the transaction that
  follows a successful ``flush()``. A crash or a `NotDurableError` leaves them in the outbox, and
  the next producer to lock the session re-sends exactly those bytes first. So every assigned seq
  reaches the transport, in order; a re-send of an event that had in fact arrived is a
  byte-identical duplicate that ingest refuses as ``duplicate`` without breaking the chain.
* **Deterministic ids.** event_id = UUIDv7(time from the source, sha256(session, fact)).
* **Like every producer.** Records pass through `producer_transforms` (secret redaction) before
  sealing; session ids, call and turn ids and fact keys are redacted as ids (`Redactor.redact_id`)
  before they are used, so one call's facts from the hook and an importer still meet; with a signing key, a signed checkpoint follows every ``AGENTLEDGER_CHECKPOINT_EVERY``
  events of a session (counted from the recorded facts, so across processes and sources) and its
  end; the producer sink (`open_producer_sink`) spools when Kafka is slow or down.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable, Iterable

from agentledger.schemas import envvars
from agentledger.schemas.config import Settings
from agentledger.schemas.contract import SchemaStore, load_store
from agentledger.schemas.envelope import claimed_hash, peek
from agentledger.schemas.errors import NotDurableError, TransportError
from agentledger.schemas.keys import UnsafeKeyError
from agentledger.schemas.transport.base import MemorySink, Sink

from .importstate import Head, ProducerState, Staged
from .normalize import fact_event_id
from .redact import id_redaction
from .recorder import (CHECKPOINT_EVERY_ENV, CONTROL_KINDS, ProducerIdentity, Recorder,
                       Transform, load_signer)
from .sinks import ProducerOptions, open_producer_sink

SESSION_STARTED = "session_started"
SESSION_ENDED = "session_ended"


@dataclass
class Observation:
    """One fact a source states about a session, ready to become one event."""

    session_id: str
    fact: str
    kind: str
    payload: dict
    at_us: int
    turn_id: str | None = None
    tool_call_id: str | None = None
    source: str = "codex_rollout"
    agent: str = "codex"
    agent_version: str | None = None
    priority: int = 0
    order: tuple = ()


@dataclass
class SessionInfo:
    """Partial session_started fields a source knows (policies, cwd, git, model, ...)."""

    session_id: str
    at_us: int
    agent: str
    source: str
    fields: dict = field(default_factory=dict)
    agent_version: str | None = None
    priority: int = 0


@dataclass
class EndRule:
    """End the session (session_ended at its last activity) when nothing happened since ``idle_before_us``."""

    idle_before_us: int
    reason: str = "no activity recorded for the idle period; the source has no session-end record"


@dataclass
class AppendResult:
    session_id: str
    added: int = 0
    already_recorded: int = 0
    merged: int = 0
    resent: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    ended: bool = False
    kinds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("session_id", "added", "already_recorded", "merged", "resent",
                                              "first_seq", "last_seq", "ended", "kinds")}


def producer_transforms(settings: Settings, env: Mapping[str, str] | None = None, *,
                        key_fallback: bool = False) -> list[Transform]:
    """The record transforms of importers and the hook: secret redaction (keyed HMAC tokens, see
    producers/redact.py), as for every producer. Deterministic, so a re-import computes the same
    events (the outbox re-sends stored bytes and does not depend on it). ``key_fallback``: see
    `SessionAppender`."""
    from .redact import default_transforms

    return default_transforms(settings, env, key_fallback=key_fallback)


_UNINFORMATIVE = (None, "", "unknown", [], {})
_UNSET_DEFAULT = object()


def build_session_started(infos: list[SessionInfo], default_agent: str, default_version: str | None) -> dict:
    """session_started from every source's partial view: per field, the highest-priority source
    that states it wins."""
    ordered = sorted(infos, key=lambda i: (-i.priority, i.at_us))
    payload: dict[str, Any] = {
        "agent": ordered[0].agent if ordered else default_agent,
        "agent_version": None, "model": None, "cwd": "", "sandbox_mode": "unknown", "writable_roots": [],
        "approval_policy": "unknown",
        "network_policy": {"mode": "unknown", "allowed_domains": [], "denied_domains": []},
        "recording_mode": "spool", "policy_digest": None, "originator": None, "git": None,
        # v4: the control surface when the session started (producers/controlsurface.py), who read it, and
        # the MCP tool definitions in force (producers/mcpdefs.py)
        "control_surface": [], "workspace_trusted": None, "observed_by": None, "mcp_tools": [],
    }
    filled: set[str] = set()
    for info in ordered:
        fields = dict(info.fields)
        if info.agent_version and "agent_version" not in fields:
            fields["agent_version"] = info.agent_version
        for k, v in fields.items():
            if k not in payload or k in filled:
                continue
            if k == "network_policy":
                if not isinstance(v, dict) or (v.get("mode") in _UNINFORMATIVE and not v.get("allowed_domains")):
                    continue
            elif v in _UNINFORMATIVE:
                continue
            payload[k] = v
            filled.add(k)
    if payload["agent_version"] is None:
        payload["agent_version"] = default_version
    return payload


def _merge(group: list[Observation]) -> Observation:
    """One event from several observations of the same fact: the most informative one (highest
    priority, then earliest), with fields it leaves unknown filled from the others."""
    if len(group) == 1:
        return group[0]
    ranked = sorted(group, key=lambda o: (-o.priority, o.at_us))
    best = ranked[0]
    payload = dict(best.payload)
    for other in ranked[1:]:
        for k, v in other.payload.items():
            if payload.get(k) in _UNINFORMATIVE and v not in _UNINFORMATIVE:
                payload[k] = v
    return Observation(best.session_id, best.fact, best.kind, payload, best.at_us,
                       turn_id=best.turn_id or next((o.turn_id for o in ranked if o.turn_id), None),
                       tool_call_id=best.tool_call_id or next((o.tool_call_id for o in ranked if o.tool_call_id), None),
                       source=best.source, agent=best.agent, agent_version=best.agent_version, priority=best.priority,
                       order=best.order)


class SessionAppender:
    """Appends observations to sessions; one instance per process run (importer or hook)."""

    def __init__(
        self,
        settings: Settings,
        *,
        state: ProducerState | None = None,
        sink: Sink | None = None,
        sink_options: dict | None = None,
        lock_timeout_s: float = 30.0,
        flush_timeout_s: float | None = 30.0,
        transforms: Iterable[Transform] | None = None,
        store: SchemaStore | None = None,
        signer: Any = _UNSET_DEFAULT,
        env: Mapping[str, str] | None = None,
        key_fallback: bool = False,
    ):
        """``env``: the environment the producer settings are read from (recording mode, redaction,
        signing key, checkpoint interval, sink options); os.environ when None. The warm hook server
        passes each client's.

        A key file `schemas.keys.check_key_path` refuses raises `UnsafeKeyError` (an importer: a
        person is there to fix it). With ``key_fallback`` (the hook, which must never block the agent
        for it) the events are recorded anyway, never with the refused key: redacted with the per-user
        home's key (`producers.redact.hook_redaction_key`) and, for a refused signing key, unsigned;
        ``notices`` says what happened, for stderr."""
        self.env = os.environ if env is None else env
        self.notices: list[str] = []
        self.settings = settings
        self.state = state or ProducerState(settings.home)
        self._sink = sink
        self._sink_options = sink_options or {}
        self.lock_timeout_s = lock_timeout_s
        self.flush_timeout_s = flush_timeout_s
        self.transforms = (list(transforms) if transforms is not None else
                           producer_transforms(settings, self.env, key_fallback=key_fallback))
        self.notices += [t.notice for t in self.transforms if getattr(t, "notice", None)]
        # Ids from the agent that carry a secret become tokens wherever they are used: the session
        # (Kafka key, state rows), fact keys, call ids (see producers/redact.py).
        self.redact_id = id_redaction(self.transforms)
        self.redact_key = id_redaction(self.transforms, keys=True)
        self.store = store or load_store()
        # Signed checkpoints as every producer writes them (issue 3): every N events of a session and
        # after its end, when a signing key is configured. Counted from the recorded facts, so they
        # continue across processes and sources.
        if signer is _UNSET_DEFAULT:
            try:
                signer = load_signer(settings, self.env)
            except UnsafeKeyError as exc:
                if not key_fallback:
                    raise
                signer = None
                self.notices.append(f"agentledger hook: {exc}\nagentledger hook: recording unsigned (no checkpoint "
                                    "signatures) until it is fixed\n")
        self.signer = signer
        self.checkpoint_every = envvars.get(CHECKPOINT_EVERY_ENV, self.env)
        self.recording_mode = ProducerOptions.from_env(self.env).mode
        self._capture = MemorySink()  # collects what the recorder publishes; staged before the real send
        self._recorders: dict[tuple, Recorder] = {}
        self._topic_ready = False

    # -- plumbing -------------------------------------------------------------------------
    @property
    def sink(self) -> Sink:
        if self._sink is None:
            self._sink = open_producer_sink(self.settings, self.env, **self._sink_options)
        if not self._topic_ready:
            self._ensure_topic()
        return self._sink

    def _ensure_topic(self) -> None:
        # Creating/listing topics costs a Kafka admin round trip; a marker per (transport, topic)
        # lets short-lived processes (one hook call per tool use) skip it after the first time.
        where = self.settings.bootstrap_servers or str(self.settings.log_dir)
        marker = self.state.dir / "topics" / hashlib.sha256(f"{where}\x00{self.settings.topic}".encode()).hexdigest()[:32]
        if not marker.exists():
            self._sink.ensure_topic(self.settings.topic)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{where} {self.settings.topic}\n")
        self._topic_ready = True

    def _recorder(self, agent: str, version: str | None, source: str) -> Recorder:
        key = (agent, version, source)
        rec = self._recorders.get(key)
        if rec is None:
            # Checkpoints are placed by _seal (the count spans processes); the recorder's own is off.
            rec = Recorder(self._capture, topic=self.settings.topic, store=self.store, transforms=self.transforms,
                           identity=ProducerIdentity.local(agent, version, source=source), signer=self.signer,
                           checkpoint_every=0, mode=self.recording_mode)
            self._recorders[key] = rec
        return rec

    def close(self) -> None:
        try:
            if self._sink is not None:
                self._sink.close(self.flush_timeout_s)
        finally:
            self._sink = None
            self.state.close()

    def _send(self, session_id: str, staged: list[Staged]) -> None:
        """Deliver in seq order; any transport failure is a `NotDurableError` (the outbox keeps them)."""
        try:
            sink = self.sink
            key = session_id.encode("utf-8", "surrogateescape")
            for s in staged:
                sink.send(self.settings.topic, key, s.value)
            sink.flush(self.flush_timeout_s)
        except NotDurableError:
            raise
        except TransportError as exc:
            raise NotDurableError(f"transport unavailable: {exc}") from exc

    # -- outbox ---------------------------------------------------------------------------
    def _drain_locked(self, head: Head) -> int:
        staged = self.state.outbox(head.session_id)
        if not staged:
            return 0
        self._send(head.session_id, staged)
        head.head_hash = claimed_hash(staged[-1].value) or head.head_hash
        if any(s.fact == SESSION_ENDED for s in staged):
            head.ended = True
        self.state.commit_head(head, staged)
        return len(staged)

    def drain(self, session_id: str) -> int:
        """Re-send what a crashed or failed producer left in the session's outbox."""
        with self.state.session_lock(session_id, self.lock_timeout_s):
            return self._drain_locked(self.state.head(session_id))

    def drain_all(self) -> int:
        return sum(self.drain(sid) for sid in self.state.sessions_with_outbox())

    # -- appending ------------------------------------------------------------------------
    def append(
        self,
        session_id: str,
        observations: Iterable[Observation] = (),
        infos: Iterable[SessionInfo] = (),
        *,
        prepare: Callable[[Head], tuple[list[Observation], list[SessionInfo]]] | None = None,
        end: EndRule | None = None,
        end_hint: str | None = None,
        extra: Callable[[Any], None] | None = None,
        start_if_new: bool = True,
        activity_us: int | None = None,
        default_agent: tuple[str, str | None, str] = ("unknown", None, "unknown"),
    ) -> AppendResult:
        """Record the observations of one session that are not recorded yet; see the module doc
        for the guarantees. ``prepare(head)`` is called under the session lock and may add
        observations that depend on recorded state. ``activity_us``: the latest time the sources
        show activity in the session (also records that are not events), for ``end``.

        Events still in the outbox from an earlier failure are sent first. If the transport is
        still down, the new events are sealed after them and join them in the outbox (so nothing
        is lost and the order holds) and `NotDurableError` is raised; nothing is marked recorded
        until a later append or `drain` delivers them. Also raises `LockTimeout`."""
        rid = self.redact_id
        session_id = rid(session_id)
        res = AppendResult(session_id)
        with self.state.session_lock(session_id, self.lock_timeout_s):
            head = self.state.head(session_id)
            pending: list[Staged] = []
            try:
                res.resent = self._drain_locked(head)
            except NotDurableError:
                pending = self.state.outbox(session_id)
            obs, infs = list(observations), list(infos)
            if prepare is not None:
                more_obs, more_infos = prepare(head)
                obs += more_obs
                infs += more_infos
            for o in obs:  # ids from the agent, and fact keys built from them (and from paths), redacted
                o.session_id, o.fact = session_id, self.redact_key(o.fact)
                o.tool_call_id = rid(o.tool_call_id) if o.tool_call_id else o.tool_call_id
                o.turn_id = rid(o.turn_id) if o.turn_id else o.turn_id
            known = self.state.known_facts(session_id, [o.fact for o in obs] + [SESSION_STARTED, SESSION_ENDED])
            known |= {p.fact for p in pending}
            candidates: dict[str, list[Observation]] = {}
            for o in obs:
                if o.fact in known:
                    res.already_recorded += 1
                    continue
                candidates.setdefault(o.fact, []).append(o)
            chosen = []
            for group in candidates.values():
                res.merged += len(group) - 1
                chosen.append(_merge(group))
            chosen.sort(key=lambda o: (o.at_us, o.order))
            started = SESSION_STARTED in known or head.next_seq > 0
            ending = [o for o in chosen if o.kind == "session_ended"]
            chosen = [o for o in chosen if o.kind != "session_ended"] + ending[:1]
            events: list[Observation] = []
            if not started and (chosen or (infs and start_if_new)):
                events.append(self._start_event(session_id, chosen, infs, default_agent))
            events += chosen
            if activity_us and events:
                head.last_at = max(head.last_at or 0, activity_us)
            if end is not None and not head.ended and SESSION_ENDED not in known and not ending:
                last = max([t for t in (head.last_at, activity_us, *(e.at_us for e in events)) if t], default=None)
                if last is not None and last < end.idle_before_us and (events or head.exists):
                    ref = events[-1] if events else None
                    hint = end_hint or head.end_hint
                    events.append(Observation(
                        session_id, SESSION_ENDED, "session_ended",
                        {"status": "interrupted" if hint == "interrupted" else "completed",
                         "reason": f"{end.reason}; last turn: {hint or 'unknown'}"},
                        last, source=ref.source if ref else default_agent[2],
                        agent=ref.agent if ref else (head.agent or default_agent[0]),
                        agent_version=ref.agent_version if ref else default_agent[1]))
            if end_hint:
                head.end_hint = end_hint
            if not events:
                if pending:
                    raise NotDurableError(f"{len(pending)} event(s) of session {session_id} wait in the outbox: "
                                          "the transport is still not accepting them")
                if extra is not None or (end_hint and head.exists):
                    self.state.commit_head(head, [], extra=extra)
                return res
            base = head
            if pending:  # seal after what waits in the outbox: it will be delivered first
                base = Head(session_id, pending[-1].seq + 1, claimed_hash(pending[-1].value) or head.head_hash)
            staged = self._seal(base, events, res)
            self.state.stage(session_id, staged)
            self._send(session_id, pending + staged)
            head.head_hash = claimed_hash(staged[-1].value) or head.head_hash
            if head.agent is None:
                head.agent = events[0].agent
            if any(e.kind == "session_ended" for e in events) or any(p.fact == SESSION_ENDED for p in pending):
                head.ended = True
            self.state.commit_head(head, pending + staged, extra=extra)
            res.added = len(staged)
            res.resent += len(pending)
            res.first_seq, res.last_seq = staged[0].seq, staged[-1].seq
            res.ended = head.ended
        return res

    def _start_event(self, session_id: str, chosen: list[Observation], infos: list[SessionInfo],
                     default_agent: tuple[str, str | None, str]) -> Observation:
        ref = chosen[0] if chosen else None
        agent = infos[0].agent if infos else (ref.agent if ref else default_agent[0])
        version = next((i.agent_version for i in infos if i.agent_version), ref.agent_version if ref else default_agent[1])
        source = (sorted(infos, key=lambda i: -i.priority)[0].source if infos else (ref.source if ref else default_agent[2]))
        payload = build_session_started(infos, agent, version)
        ats = [i.at_us for i in infos] + ([ref.at_us] if ref else [])
        at = min(ats) if ats else int(time.time() * 1e6)
        return Observation(session_id, SESSION_STARTED, "session_started", payload, at, source=source,
                           agent=payload["agent"], agent_version=payload["agent_version"])

    def _seal(self, head: Head, events: list[Observation], res: AppendResult) -> list[Staged]:
        self._capture.clear()
        seq, prev = head.next_seq, head.head_hash
        staged: list[Staged] = []
        since = self._since_checkpoint(head) if self.signer else 0
        for e in events:
            rec = self._recorder(e.agent, e.agent_version, e.source)
            sr = rec.resume(head.session_id, seq, prev)
            if e.kind == "session_started":
                e.payload.setdefault("recording_mode", self.recording_mode)
                if self.signer and not e.payload.get("checkpoint_key_id"):
                    e.payload["checkpoint_key_id"] = self.signer.key_id
            event_id = fact_event_id(head.session_id, e.fact, e.at_us)
            sr.emit(e.kind, e.payload, occurred_at_us=e.at_us, event_id=event_id, turn_id=e.turn_id,
                    tool_call_id=e.tool_call_id)
            # What the recorder published for this fact, in order: the event, then what it adds to it
            # (a `truncated` gap per oversized field), then our checkpoint if one is due.
            kinds = [e.kind] + ["gap"] * (len(self._capture.sent) - 1)
            if self.signer:
                since += e.kind not in CONTROL_KINDS
                if e.kind == "session_ended" or since >= self.checkpoint_every:
                    if sr.checkpoint(final=e.kind == "session_ended", occurred_at_us=e.at_us) is not None:
                        kinds.append("checkpoint")
                    since = 0
            for i, (value, kind) in enumerate(zip(self._capture.values, kinds)):
                p = peek(value)
                fact = e.fact if i == 0 else f"{e.fact}#{kind}{i}"
                staged.append(Staged(p.seq, value, fact, p.event_id, p.occurred_at_us))
                res.kinds[kind] = res.kinds.get(kind, 0) + 1
            self._capture.clear()
            seq, prev = sr.seq, sr.head_hash
        return staged

    def _since_checkpoint(self, head: Head) -> int:
        """Events of the session after its last checkpoint (by any producer of this host)."""
        row = self.state.con.execute(
            "SELECT max(seq) FROM facts WHERE session_id = ? AND fact GLOB '*#checkpoint*'", (head.session_id,)).fetchone()
        last = row[0] if row and row[0] is not None else -1
        return max(0, head.next_seq - 1 - last)
