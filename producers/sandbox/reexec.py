"""The sandbox side of re-execution: a `replay.reexecute.Runner` that re-runs recorded commands.

``prepare`` restores the workspace the first command started from (from the recording store)
into a fresh directory, which every re-run sees mounted at the *recorded* workspace path, so paths
in arguments, outputs and events stay comparable. ``run`` re-runs one command in the same
sandbox with the recorded environment, stdin and clock (libfaketime shifted to the recorded start),
answers its network requests from the recording (the egress proxy in replay mode: nothing leaves
the machine), re-applies the recorded approval decisions without asking anyone, and returns the
events the run produced. Changes made to the workspace between two recorded commands (by the agent
outside the sandbox, or by a person) are re-applied from the recorded trees, so each command
starts from what it started from when recorded — unless an earlier re-run already diverged.

What-if changes (``set_files``, ``set_env``, ``set_responses``) alter the inputs before the
re-run, so the report shows how the session would have diverged.

Escalated commands are re-run inside the sandbox (re-running something outside the sandbox
because a human once approved it is not a decision a replay should take); differences this
causes are reported as divergences.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections import defaultdict, deque
from typing import Any

from agentledger.producers.recorder import action_digest
from agentledger.schemas.config import Settings
from agentledger.schemas.policy import Policy

from . import tree
from .approvals import Answer, Ask
from .cas import ContentStore, sha256_hex
from .errors import SandboxError, StoreError
from .proxy import EgressProxy, ReplayResponses
from .runner import CommandSpec, Observation, Options, Tools, build_observations, env_digest, execute, sandbox_profile
from .session import EMPTY_OUTPUT


class ReplayApprover:
    """Gives each approval the decision recorded for the same action digest, in recorded order."""

    def __init__(self):
        self.decisions: dict[str, deque] = defaultdict(deque)
        self.grants: set[str] = set()

    def load(self, events: list[dict]) -> None:
        self.decisions.clear()
        requests = {}
        for e in events:
            p = e["payload"]
            if e["kind"] == "approval_requested":
                requests[p["request_id"]] = p["action_digest"]
            elif e["kind"] == "approval_decided" and p["request_id"] in requests:
                self.decisions[requests[p["request_id"]]].append(p)

    def decide(self, ask: Ask) -> Answer:
        if ask.action_digest in self.grants:
            return Answer("approved_for_session", "policy", "reexecution", "approvals.session_grant", 0)
        q = self.decisions.get(ask.action_digest)
        if not q:
            return Answer("denied", "policy", "reexecution", "reexecute.unrecorded_approval", 0)
        p = q.popleft()
        if p["decision"] == "approved_for_session":
            self.grants.add(ask.action_digest)
        return Answer(p["decision"], p["decided_by"], p.get("decider"), p.get("rule"), 0)


def _mount_point_needed(path: str) -> bool:
    """bwrap creates missing mount points only inside the sandbox's own tmpfs directories."""
    return not os.path.exists(path) and not any(path == t or path.startswith(t + "/") for t in ("/tmp", "/var/tmp", "/run"))


class SandboxReexecutor:
    def __init__(self, settings: Settings, session_id: str, *, set_files: dict[str, bytes] | None = None,
                 set_env: dict[str, str | None] | None = None, set_responses: dict[int, bytes] | None = None,
                 into: str | None = None, keep: bool = False, options: Options | None = None,
                 timeout_s: float | None = None, env: dict | None = None):
        self.settings = settings
        self.session_id = session_id
        self.set_files = dict(set_files or {})
        self.set_env = dict(set_env or {})
        self.set_responses = dict(set_responses or {})
        self.into = into
        self.keep = keep
        self.options = options or Options()
        self.timeout_s = timeout_s
        self.store = ContentStore.open(settings.home, env)
        self.tools = Tools.find(env)
        self.actual: dict[str, Any] = {}  # digest -> resolved object, for things produced by re-runs
        self.fresh: str | None = None
        self._made_root: str | None = None
        self._mount_point: str | None = None
        self.restore_missing: list[str] = []
        self.used_response_overrides: set[int] = set()

    # -- Runner -------------------------------------------------------------------------------------
    def prepare(self, session_started: dict) -> None:
        m = self.store.load_manifest(self.session_id)
        if m is None:
            raise StoreError(f"no recording of session {self.session_id} in {self.store.root}: re-execution needs "
                             "the AGENTLEDGER_HOME that recorded it")
        self.manifest = m
        text = self.store.get(m["policy"]).decode()
        self.policy = Policy.from_toml(text, source=m.get("policy_source"))
        if session_started.get("policy_digest") and self.policy.digest != session_started["policy_digest"]:
            raise StoreError("the stored policy does not match the session's policy_digest")
        self.workspace = m["workspace"]
        self.options.proxy_port = m.get("proxy_port", self.options.proxy_port)
        self.options.hostname = m.get("hostname", self.options.hostname)
        self.options.max_capture_bytes = self.store.max_blob_bytes
        self.tools.require(True)
        if self.into:
            if os.path.exists(self.into) and os.listdir(self.into):
                raise SandboxError(f"{self.into} is not empty")
            os.makedirs(self.into, exist_ok=True)
            self.fresh = os.path.realpath(self.into)
        else:
            self._made_root = tempfile.mkdtemp(prefix="agentledger-reexec-")
            self.fresh = os.path.join(self._made_root, "workspace")
            os.mkdir(self.fresh)
        first = next((m["commands"][c] for c in m["order"] if m["commands"][c].get("workspace_before")), None)
        if first is not None:
            entries = self._tree(first["workspace_before"])
            self.restore_missing = tree.apply(self.fresh, entries, self.store)
        for rel, data in self.set_files.items():
            rel = os.path.relpath(rel, self.workspace) if os.path.isabs(rel) else rel
            if rel.startswith(".."):
                raise SandboxError(f"--set-file {rel}: not inside the workspace {self.workspace}")
            dest = os.path.join(self.fresh, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(data)
        if _mount_point_needed(self.workspace):
            try:
                os.makedirs(self.workspace)
                self._mount_point = self.workspace
            except OSError as exc:
                raise SandboxError(f"cannot create the mount point {self.workspace} for the recorded workspace: "
                                   f"{exc}") from exc
        self.prev_after: str | None = None

    def _tree(self, digest: str) -> dict:
        got = self.resolve("tree", digest)
        if got is None:
            raise StoreError(f"workspace tree {digest[:12]}… is not in the recording store")
        return got

    def run(self, command: dict) -> list[dict]:
        cid = command["command_id"]
        entry = self.manifest["commands"].get(cid)
        argv, cwd = command["argv"], command["cwd"]
        events = command["events"]
        approver = ReplayApprover()
        approver.load(events)
        out: list[dict] = []
        new_id = lambda: str(uuid.uuid4())  # noqa: E731
        escalated = bool(entry.get("escalated")) if entry else False
        profile = sandbox_profile(self.policy, True, escalated)

        decision = self.policy.evaluate_command(list(argv), escalated=escalated)
        decision = type(decision)(decision.action, decision.rule or "approvals.default", decision.reason)
        approved = True
        if decision.action != "allow":
            digest = action_digest(list(argv), cwd)
            if decision.action == "forbidden":
                answer = Answer("denied", "policy", self.policy.source or self.policy.name, decision.rule, 0)
            else:
                answer = approver.decide(Ask("exec", "", digest, decision.rule, decision.reason))
            rid = new_id()
            out.append({"kind": "approval_requested", "payload": {"request_id": rid, "action_kind": "exec",
                                                                   "action_digest": digest, "subject": " ".join(argv),
                                                                   "command_id": cid}})
            out.append({"kind": "approval_decided", "payload": {"request_id": rid, "decision": answer.decision,
                                                                 "decided_by": answer.decided_by}})
            approved = answer.approved
        if not approved or entry is None or entry.get("status") == "declined":
            out.append({"kind": "command_started", "payload": {"command_id": cid, "argv": list(argv), "cwd": cwd,
                                                                "escalated": escalated}})
            out.append({"kind": "command_finished", "payload": {"command_id": cid, "status": "declined",
                                                                 "exit_code": None, "stdout": EMPTY_OUTPUT,
                                                                 "stderr": EMPTY_OUTPUT}})
            return out

        # the workspace as this command found it when recorded (changes made between commands)
        if self.prev_after and entry["workspace_before"] != self.prev_after:
            missing = tree.apply(self.fresh, self._tree(entry["workspace_before"]), self.store,
                                 current=self._tree(self.prev_after))
            self.restore_missing += missing
        env = dict(self.store.get_json(entry["env"]))
        for k, v in self.set_env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        self.actual[env_digest(env)] = ("env", env)
        stdin = self.store.get(entry["stdin"]) if entry.get("stdin") else None
        overrides = {}
        for e in events:
            if e["kind"].startswith("network_") and e["seq"] in self.set_responses:
                overrides[e["payload"]["attempt_id"]] = self.set_responses[e["seq"]]
                self.used_response_overrides.add(e["seq"])
        exchanges = [dict(x, attempt_id=a) for a, x in self.manifest["exchanges"].items() if x.get("command_id") == cid]
        collected: list[Observation] = []
        before = tree.take(self.fresh)
        self.actual[before.digest] = ("tree", before.manifest["entries"])
        timeout_s = self.timeout_s
        if timeout_s is None and entry.get("status") == "timed_out":  # it was cut off: cut it off again
            fin = next((e["payload"] for e in events if e["kind"] == "command_finished"
                        and e["payload"]["command_id"] == cid), None)
            timeout_s = max(1.0, (fin or {}).get("duration_ms", 1000) / 1000)
        spec = CommandSpec(list(argv), cwd, env, stdin, self.workspace, self.fresh, sandboxed=True,
                           clock_offset_s=entry["clock_us"] / 1e6 - time.time(), timeout_s=timeout_s,
                           hide=(str(self.settings.home),))
        sock_dir = tempfile.mkdtemp(prefix="agentledger-sbx-")
        proxy = EgressProxy(self.policy, os.path.join(sock_dir, "proxy.sock"),
                            observe=lambda k, p, t: collected.append(Observation(k, p, t)), approver=approver,
                            new_id=new_id, command_id=cid,
                            replay=ReplayResponses(self.store, exchanges, overrides)).start()
        try:
            ex = execute(spec, self.policy, self.tools, self.options, proxy_socket=proxy.socket_path, run_dir=sock_dir)
        finally:
            proxy.stop()
            shutil.rmtree(sock_dir, ignore_errors=True)
        after = tree.take(self.fresh)
        self.actual[after.digest] = ("tree", after.manifest["entries"])
        for cap in (ex.stdout, ex.stderr):
            if cap.complete:
                self.actual[cap.digest()["sha256"]] = ("blob", bytes(cap.kept))
        for x in exchanges:
            if x["attempt_id"] in overrides:
                self.actual[sha256_hex(overrides[x["attempt_id"]])] = ("blob", overrides[x["attempt_id"]])
        obs = build_observations(spec, ex, before, after, self.policy, command_id=cid, new_id=new_id,
                                 profile=profile, proxy_port=self.options.proxy_port, escalated=escalated)
        out.append({"kind": "command_started", "payload": {
            "command_id": cid, "argv": list(argv), "cwd": cwd, "env_names": sorted(env), "sandbox_profile": profile,
            "escalated": escalated, "workspace_digest": before.digest, "env_digest": env_digest(env),
            "stdin_digest": sha256_hex(stdin) if stdin is not None else None}})
        for o in sorted(obs.events + collected, key=lambda o: o.at_us):
            out.append({"kind": o.kind, "payload": o.payload})
        out.append({"kind": "command_finished", "payload": {
            "command_id": cid, "exit_code": ex.exit_code, "duration_ms": ex.duration_ms, "status": ex.status,
            "stdout": ex.stdout.digest(), "stderr": ex.stderr.digest(), "workspace_digest": after.digest}})
        self.prev_after = entry["workspace_after"]
        return out

    def resolve(self, what: str, digest: str | None) -> Any:
        if not digest or not isinstance(digest, str):
            return None
        hit = self.actual.get(digest)
        if hit is not None:
            kind, obj = hit
            if kind == "env" and what == "env":
                return {k: sha256_hex(v.encode("utf-8", "surrogateescape")) for k, v in obj.items()}
            return obj if kind == what else None
        try:
            if what == "tree":
                return self.store.get_json(digest)["entries"]
            if what == "env":
                env = self.store.get_json(digest)
                return {k: sha256_hex(v.encode("utf-8", "surrogateescape")) for k, v in env.items()}
            if what == "blob":
                return self.store.get(digest)
        except (StoreError, ValueError, KeyError, TypeError):
            return None
        return None

    def close(self) -> None:
        if not self.keep:
            if self._made_root:
                shutil.rmtree(self._made_root, ignore_errors=True)
        if self._mount_point:
            try:
                os.rmdir(self._mount_point)
            except OSError:
                pass
