"""A recorded sandbox session: one or more `agentledger sandbox run` invocations sharing a
session id, a workspace and a policy, recorded as one hash-chained event stream plus a manifest
in the recording store.

Per command, in this order:

1. the approval, when the policy asks for one (``approval_requested`` / ``approval_decided``,
   emitted and flushed before anything runs); a refused command is recorded as started and
   ``declined`` and never runs;
2. the workspace is snapshotted (tree digest, every new file content into the store), the
   environment, stdin and start time are stored, and ``command_started`` is emitted and flushed
   (so a command that runs is on record before it runs);
3. the command runs sandboxed and traced; the egress proxy decides each request;
4. what the trace and the proxy observed is emitted in time order (sub-processes, file accesses
   with digests before/after, denials, network and approval events), then ``command_finished``
   with the output digests and the workspace digest after.

The chain head (next seq, head hash) is kept in ``$AGENTLEDGER_HOME/sandbox/sessions/<id>/``
under an exclusive lock, so commands of one session are recorded one at a time, in order, by
whichever process runs them. If a recorder dies mid-command, the next invocation records a
``gap`` (crash_recovered) and closes the command as ``killed``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from agentledger.producers.controlsurface import snapshot as control_snapshot
from agentledger.producers.recorder import ProducerIdentity, Recorder, SessionRecorder, action_digest
from agentledger.producers.redact import env_secrets, redactor_of
from agentledger.producers.sinks import open_producer_sink
from agentledger.schemas import envvars
from agentledger.schemas.config import Settings
from agentledger.schemas.policy import Policy

from . import tree
from .approvals import Approver, Ask
from .cas import ContentStore, check_session_id, sha256_hex
from .errors import SandboxError, SessionStateError
from .policy_default import DEFAULT_POLICY_SOURCE, DEFAULT_POLICY_TOML
from .proxy import EgressProxy, now_us
from .runner import (CommandSpec, Options, Tools, build_observations, env_digest, execute, sandbox_env,
                     sandbox_profile)

MANIFEST_FORMAT = "agentledger.sandbox.manifest/1"
AGENT = "agentledger-sandbox"
EMPTY_OUTPUT = {"sha256": sha256_hex(b""), "size": 0, "excerpt": "", "truncated": False}


def agent_version() -> str:
    try:
        from importlib.metadata import version

        return version("agentledger")
    except Exception:  # noqa: BLE001 - running from a checkout without metadata
        return "0.1.0"


def approval_policy_label(policy: Policy) -> str:
    """The closest session_started.approval_policy value for a policy's command rules."""
    decisions = {r.decision for r in policy.command_rules}
    if policy.command_default == "prompt":
        return "untrusted"
    if policy.command_default == "allow" and not decisions and policy.escalation == "allow":
        return "never"
    return "granular"


def load_policy(path: str | os.PathLike | None, env: dict | None = None) -> tuple[Policy, bytes]:
    """(policy, the exact bytes its digest covers). Default: $AGENTLEDGER_SANDBOX_POLICY, else built in."""
    env = os.environ if env is None else env
    path = path or envvars.raw("AGENTLEDGER_SANDBOX_POLICY", env)
    if path:
        policy = Policy.load(path)
        text = Path(path).read_text()
        return policy, text.encode()
    policy = Policy.from_toml(DEFAULT_POLICY_TOML, source=DEFAULT_POLICY_SOURCE)
    return policy, DEFAULT_POLICY_TOML.encode()


@dataclass
class RunResult:
    session_id: str
    command_id: str
    exit_code: int | None
    status: str  # completed | failed | declined | timed_out | killed
    signal: str | None = None
    events: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    gaps: list[str] = field(default_factory=list)

    @property
    def shell_code(self) -> int:
        """The exit status a shell would report: the command's, or 126 declined, 124 timeout, 128+N signal."""
        if self.status == "declined":
            return 126
        if self.status == "timed_out":
            return 124
        if self.exit_code is not None:
            return self.exit_code
        if self.signal:
            import signal as _s

            try:
                return 128 + int(getattr(_s, self.signal))
            except (AttributeError, TypeError, ValueError):
                return 137
        return 1


class _Lock:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class SandboxSession:
    def __init__(self, settings: Settings, session_id: str, policy: Policy, workspace: str, store: ContentStore,
                 recorder: Recorder, rec: SessionRecorder, state: dict, state_dir: Path, lock: _Lock, tools: Tools,
                 options: Options, approver: Approver, host_env: dict):
        self.settings = settings
        self.session_id = session_id
        self.policy = policy
        self.workspace = workspace
        self.store = store
        self.recorder = recorder
        self.rec = rec
        self.state = state
        self.state_dir = state_dir
        self.lock = lock
        self.tools = tools
        self.options = options
        self.approver = approver
        self.host_env = host_env
        self.manifest = store.load_manifest(session_id) or {}
        self.statcache = tree.StatCache(state_dir / "statcache.json")

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: Settings, *, session_id: str | None = None, policy_path: str | os.PathLike | None = None,
             workspace: str | os.PathLike | None = None, interactive: bool | None = None,
             options: Options | None = None, env: dict | None = None, max_blob_bytes: int | None = None,
             max_total_bytes: int | None = None, policy_text: tuple[bytes, str | None] | None = None) -> "SandboxSession":
        """Start or continue a session. ``policy_text`` (bytes, source) gives the policy itself, e.g.
        the copy the recording store kept, instead of a file."""
        host_env = dict(os.environ if env is None else env)
        ws = os.path.realpath(workspace or os.getcwd())
        if ws == "/":
            raise SandboxError("the workspace cannot be / (it would make the whole machine writable)")
        if policy_text is not None:
            policy_bytes = policy_text[0]
            policy = Policy.from_toml(policy_bytes.decode(), source=policy_text[1])
        else:
            policy, policy_bytes = load_policy(policy_path, host_env)
        tools = Tools.find(host_env)
        tools.require(policy.sandbox_mode != "danger_full_access")
        options = options or Options()
        store = ContentStore.open(settings.home, host_env, max_blob_bytes=max_blob_bytes,
                                  max_total_bytes=max_total_bytes)
        options.max_capture_bytes = store.max_blob_bytes
        if not store.put(policy_bytes).stored:
            raise SandboxError("the recording store refused the policy file (raise AGENTLEDGER_CAS_MAX_BYTES)")
        recorder = Recorder(open_producer_sink(settings), topic=settings.topic,
                            identity=ProducerIdentity.local(AGENT, agent_version(), source="sandbox"))
        sid = check_session_id(session_id or recorder.new_id())
        state_dir = settings.home / "sandbox" / "sessions" / sid
        lock = _Lock(state_dir / ".lock")
        try:
            os.chmod(settings.home / "sandbox", 0o700)
            state_path = state_dir / "state.json"
            state = json.loads(state_path.read_text()) if state_path.exists() else None
            if state is not None:
                if state.get("ended"):
                    raise SessionStateError(f"session {sid} has ended; start a new one")
                if state["workspace"] != ws:
                    raise SessionStateError(f"session {sid} records workspace {state['workspace']}, not {ws}")
                if state["policy_digest"] != policy.digest:
                    raise SessionStateError(f"session {sid} was started with another policy "
                                            f"(sha256 {state['policy_digest'][:12]}…); one session has one policy")
                rec = recorder.resume(sid, state["next_seq"], state["head_hash"])
            else:
                if not os.path.isdir(ws):
                    raise SandboxError(f"workspace {ws} is not a directory")
                rec = recorder.session(agent=AGENT, cwd=ws, session_id=sid, agent_version=agent_version(),
                                       sandbox_mode=policy.sandbox_mode, writable_roots=policy.roots(ws),
                                       approval_policy=approval_policy_label(policy),
                                       network_policy=policy.network_summary(), policy_digest=policy.digest,
                                       originator="cli", recording_mode="spool", observed_by="sandbox",
                                       **control_snapshot(ws, host_env.get("HOME")))
                state = {"format": 1, "session_id": sid, "workspace": ws, "policy_digest": policy.digest,
                         "ended": False, "in_flight": None, "grants": [], "topic": settings.topic}
            approver = Approver(policy, interactive=interactive, grants=state.get("grants", []))
            s = cls(settings, sid, policy, ws, store, recorder, rec, state, state_dir, lock, tools, options, approver,
                    host_env)
            if not s.manifest:
                s.manifest = {"format": MANIFEST_FORMAT, "session_id": sid, "workspace": ws,
                              "policy": policy.digest, "policy_source": policy.source,
                              "proxy_port": options.proxy_port, "hostname": options.hostname,
                              "faketime": bool(tools.faketime), "commands": {}, "order": [], "exchanges": {},
                              "session_started_seq": 0}
            s._recover()
            s._save()
            return s
        except BaseException:
            lock.release()
            recorder.close()
            raise

    def _recover(self) -> None:
        """Close a command a crashed recorder left open."""
        fl = self.state.get("in_flight")
        if not fl:
            return
        self.rec.gap("crash_recovered", f"the recorder stopped while command {shlex.join(fl['argv'])[:300]} ran; "
                                        "what it did after command_started is not recorded",
                     related_seq=fl.get("seq"))
        self.rec.command_finished(fl["command_id"], exit_code=None, duration_ms=0, status="killed",
                                  stdout=dict(EMPTY_OUTPUT), stderr=dict(EMPTY_OUTPUT))
        if fl.get("scratch", "").startswith(tempfile.gettempdir() + "/agentledger-sbx-"):
            shutil.rmtree(fl["scratch"], ignore_errors=True)
        self.state["in_flight"] = None

    def _save(self) -> None:
        self.recorder.flush()
        self.state["next_seq"] = self.rec.seq
        self.state["head_hash"] = self.rec.head_hash
        self.state["grants"] = sorted(self.approver.grants)
        path = self.state_dir / "state.json"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.store.save_manifest(self.session_id, self.manifest)

    # -- running a command ------------------------------------------------------------------------
    def _emit(self, kind: str, payload: dict, at_us: int | None = None) -> int:
        sealed = self.rec.emit(kind, payload, occurred_at_us=at_us)
        return sealed.record["seq"]

    def run(self, argv: list[str], *, cwd: str | None = None, stdin: bytes | None = None, escalate: bool = False,
            justification: str | None = None, timeout_s: float | None = None,
            echo_stdout: BinaryIO | None = None, echo_stderr: BinaryIO | None = None) -> RunResult:
        if not argv:
            raise SandboxError("no command given")
        if self.state.get("ended"):
            raise SessionStateError(f"session {self.session_id} has ended")
        ws = self.workspace
        if not os.path.isdir(ws):
            raise SandboxError(f"workspace {ws} is not a directory")
        cwd = os.path.realpath(cwd) if cwd else (os.path.realpath(os.getcwd())
                                                if tree_inside(os.path.realpath(os.getcwd()), ws) else ws)
        if not os.path.isdir(cwd):
            raise SandboxError(f"cwd {cwd} is not a directory")
        sandboxed = not escalate and self.policy.sandbox_mode != "danger_full_access"
        profile = sandbox_profile(self.policy, sandboxed, escalate)
        command_id = self.recorder.new_id()
        first_seq = self.rec.seq
        result = RunResult(self.session_id, command_id, None, "declined")

        # 1. approval
        decision = self.policy.evaluate_command(list(argv), escalated=escalate)
        decision = type(decision)(decision.action, decision.rule or "approvals.default", decision.reason)
        if decision.action != "allow":
            rule = next((r for r in self.policy.command_rules if r.id == decision.rule), None)
            ask = Ask("exec", shlex.join(argv), action_digest(list(argv), cwd), decision.rule, decision.reason,
                      justification=justification or (rule.justification if rule else None),
                      risk="high" if escalate else "medium", details=(("cwd", cwd), ("sandbox", profile)))
            request_id = self.recorder.new_id()
            self._emit("approval_requested", {"request_id": request_id, "action_kind": "exec", "subject": ask.subject,
                                              "action_digest": ask.action_digest, "risk": ask.risk,
                                              "justification": ask.justification, "command_id": command_id})
            if decision.action == "forbidden":
                from .approvals import Answer

                answer = Answer("denied", "policy", self.policy.source or self.policy.name, decision.rule, 0)
            else:
                answer = self.approver.decide(ask)
            self._emit("approval_decided", {"request_id": request_id, "decision": answer.decision,
                                            "decided_by": answer.decided_by, "decider": answer.decider,
                                            "rule": answer.rule, "latency_ms": answer.latency_ms,
                                            "action_digest": ask.action_digest})
            if not answer.approved:
                s = self._emit("command_started", {"command_id": command_id, "argv": list(argv), "cwd": cwd,
                                                   "sandbox_profile": profile, "escalated": escalate})
                f = self._emit("command_finished", {"command_id": command_id, "exit_code": None, "duration_ms": 0,
                                                    "status": "declined", "stdout": dict(EMPTY_OUTPUT),
                                                    "stderr": dict(EMPTY_OUTPUT)})
                self.manifest["commands"][command_id] = {"seq_started": s, "seq_finished": f, "argv": list(argv),
                                                         "cwd": cwd, "status": "declined", "escalated": escalate}
                self.manifest["order"].append(command_id)
                self._save()
                result.events, result.first_seq, result.last_seq = self.rec.seq - first_seq, first_seq, f
                return result
            self._save()

        # 2. what the command starts from
        exclude = tuple(p for p in (str(self.settings.home),) if tree_inside(p, ws))
        before = tree.take(ws, exclude=exclude, cache=self.statcache)
        gaps = [f"{p} ({why})" for p, why in tree.store_snapshot(before, self.store)]
        env = sandbox_env(self.policy, self.host_env, tools=self.tools, options=self.options, sandboxed=sandboxed)
        red = redactor_of(self.recorder.transforms)
        if red is not None:
            # the command may print a secret of its environment bare (`echo $TOKEN`), or pass it on to
            # a sub-process's argv (`curl -H "X: $TOKEN"`): nothing around it says secret there
            red.add_known_secrets(env_secrets(env))
            # and a secret in its command line may name a file it creates (`echo x > $SECRET`, or
            # `asana>7376…` as bash reads it): the file events come after the command's
            red.remember_found = True
        env_blob = self.store.put_json(env)
        if not env_blob.stored:
            gaps.append(f"environment ({env_blob.reason})")
        stdin_digest = None
        if stdin is not None:
            put = self.store.put(stdin)
            stdin_digest = put.digest
            if not put.stored:
                gaps.append(f"stdin ({put.reason})")
        s_seq = self._emit("command_started", {"command_id": command_id, "argv": list(argv), "cwd": cwd,
                                               "env_names": sorted(env), "sandbox_profile": profile,
                                               "escalated": escalate, "workspace_digest": before.digest,
                                               "env_digest": env_digest(env), "stdin_digest": stdin_digest})
        # scratch (trace, proxy socket) in /tmp: a unix socket path must stay short
        scratch = tempfile.mkdtemp(prefix="agentledger-sbx-")
        self.state["in_flight"] = {"command_id": command_id, "argv": list(argv), "seq": s_seq, "scratch": scratch}
        self._save()

        # 3. run it
        collected: list = []
        hide = tuple(p for p in (str(self.settings.home),) if os.path.exists(p))
        spec = CommandSpec(list(argv), cwd, env, stdin, ws, ws, sandboxed=sandboxed, clock_offset_s=0.0,
                           timeout_s=timeout_s, hide=hide)
        proxy = None
        try:
            if sandboxed:
                from .runner import Observation

                proxy = EgressProxy(self.policy, os.path.join(scratch, "proxy.sock"),
                                    observe=lambda k, p, t: collected.append(Observation(k, p, t)),
                                    approver=self.approver, new_id=self.recorder.new_id, command_id=command_id,
                                    store=self.store).start()
            ex = execute(spec, self.policy, self.tools, self.options,
                         proxy_socket=proxy.socket_path if proxy else None,
                         echo_stdout=echo_stdout, echo_stderr=echo_stderr, run_dir=scratch)
        finally:
            if proxy is not None:
                proxy.stop()
            shutil.rmtree(scratch, ignore_errors=True)

        # 4. what happened
        after = tree.take(ws, exclude=exclude, cache=self.statcache)
        self.statcache.save()
        gaps += [f"{p} ({why})" for p, why in tree.store_snapshot(after, self.store)]
        obs = build_observations(spec, ex, before, after, self.policy, command_id=command_id,
                                 new_id=self.recorder.new_id, profile=profile,
                                 proxy_port=self.options.proxy_port if sandboxed else None, escalated=escalate)
        events = sorted(obs.events + collected, key=lambda o: o.at_us)
        completed_seq: dict[str, int] = {}
        for o in events:
            seq = self._emit(o.kind, o.payload, o.at_us)
            if o.kind == "network_completed":
                completed_seq[o.payload["attempt_id"]] = seq
        outputs = {}
        for name, cap in (("stdout", ex.stdout), ("stderr", ex.stderr)):
            if cap.complete:
                put = self.store.put(bytes(cap.kept))
                outputs[name] = put.digest if put.stored else None
            else:
                outputs[name] = None
        if obs.unexplained:
            self.rec.gap("source_incomplete", "workspace changes no traced syscall explains: "
                         + ", ".join(obs.unexplained[:20]) + (" …" if len(obs.unexplained) > 20 else ""),
                         field="file_accessed", related_seq=s_seq)
        if gaps:
            self.rec.gap("truncated", "not kept in the recording store (re-execution cannot restore them): "
                         + ", ".join(gaps[:20]) + (" …" if len(gaps) > 20 else ""), field="cas", related_seq=s_seq,
                         lost_events=None)
        end_us = ex.started_us + ex.duration_ms * 1000
        f_seq = self._emit("command_finished", {"command_id": command_id, "exit_code": ex.exit_code,
                                                "duration_ms": ex.duration_ms, "status": ex.status,
                                                "stdout": ex.stdout.digest(), "stderr": ex.stderr.digest(),
                                                "workspace_digest": after.digest}, max(end_us, now_us() - 1))
        self.manifest["commands"][command_id] = {
            "seq_started": s_seq, "seq_finished": f_seq, "argv": list(argv), "cwd": cwd, "status": ex.status,
            "exit_code": ex.exit_code, "escalated": escalate, "sandboxed": sandboxed, "env": env_blob.digest,
            "stdin": stdin_digest, "clock_us": ex.started_us, "workspace_before": before.digest,
            "workspace_after": after.digest, "stdout": outputs["stdout"], "stderr": outputs["stderr"],
        }
        self.manifest["order"].append(command_id)
        for ex_ in (proxy.exchanges if proxy else []):
            self.manifest["exchanges"][ex_.attempt_id] = {
                "command_id": command_id, "request_key": ex_.request_key, "response": ex_.response,
                "body_digest": ex_.body_digest, "body_stored": ex_.body_stored,
                "seq": completed_seq.get(ex_.attempt_id), "addresses": list(ex_.addresses)}
        self.state["in_flight"] = None
        self._save()
        result.exit_code, result.status, result.signal = ex.exit_code, ex.status, ex.signal
        result.events, result.first_seq, result.last_seq = self.rec.seq - first_seq, first_seq, f_seq
        result.gaps = gaps
        return result

    # -- ending ---------------------------------------------------------------------------------
    def end(self, status: str = "completed", reason: str | None = None) -> int:
        seq = self.rec.end(status, reason).record["seq"]
        self.state["ended"] = True
        self.manifest["session_ended_seq"] = seq
        self._save()
        return seq

    def close(self) -> None:
        try:
            self._save()
        finally:
            self.lock.release()
            self.recorder.close()

    def __enter__(self) -> "SandboxSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tree_inside(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")
