"""A small policy-driven session generator for replay tests: every request is decided with
schemas/policy.py and recorded the way docs/replay.md says what-if reads it, so re-deciding the
sessions under the same policy must reproduce every recorded decision.

(The simulator in producers/simulate.py hard-codes its decisions; these sessions do not.)
"""

from __future__ import annotations

import random
import shlex
from dataclasses import dataclass, field

from agentledger.producers.recorder import ProducerIdentity, Recorder, SessionRecorder, action_digest
from agentledger.schemas.policy import Policy

POLICY_TOML = """
name = "replay-test"

[sandbox]
mode = "workspace_write"
writable_roots = ["$WORKSPACE", "/tmp"]
deny_read = ["/home/dev/.ssh/**", "/home/dev/.aws/**"]

[network]
default = "deny"

[[network.rules]]
id = "registries"
action = "allow"
hosts = ["pypi.org", "*.pythonhosted.org", "registry.npmjs.org", "github.com"]
ports = [443]

[[network.rules]]
id = "docs"
action = "allow"
hosts = ["docs.python.org", "share.example.com"]

[[network.rules]]
id = "apis-ask"
action = "ask"
hosts = ["api.*.com"]

[[network.rules]]
id = "no-raw-ip"
action = "deny"
raw_ip = true

[approvals]
default = "prompt"
escalation = "prompt"

[[approvals.rules]]
id = "read-only-git"
decision = "allow"
prefix = ["git", ["status", "diff", "log"]]

[[approvals.rules]]
id = "tests"
decision = "allow"
prefix = [["pytest", "ls", "cat"]]

[[approvals.rules]]
id = "no-force-delete"
decision = "forbidden"
prefix = ["rm", "-rf"]
"""

# the share.example.com rule is the domain "one simulated session reached" in the what-if tests
SPECIAL_HOST = "share.example.com"
HOSTS = [("pypi.org", 443, "https"), ("files.pythonhosted.org", 443, "https"), ("github.com", 443, "https"),
         ("docs.python.org", 443, "https"), ("api.openai.com", 443, "https"), ("telemetry.example.net", 443, "https"),
         ("203.0.113.9", 80, "http"), ("pypi.org", 80, "http")]
COMMANDS = [["pytest", "-q"], ["git", "status"], ["git", "push", "origin", "main"], ["ls", "-la"],
            ["rm", "-rf", "build"], ["pip", "install", "requests"], ["make", "build"], ["cat", "README.md"]]
FILES_IN = ["src/app.py", "tests/test_app.py", "README.md"]
FILES_OUT = ["/etc/hosts", "/tmp/cache/x.json", "/home/dev/.bashrc", "/usr/local/bin/tool"]
READS_OUT = ["/home/dev/.ssh/id_ed25519", "/home/dev/.aws/credentials", "/etc/os-release"]


def policy() -> Policy:
    return Policy.from_toml(POLICY_TOML, source="replay-test.toml")


@dataclass
class Generated:
    sessions: list[str] = field(default_factory=list)
    events: int = 0
    special_session: str | None = None
    special_seqs: list[int] = field(default_factory=list)  # seqs of network_attempted to SPECIAL_HOST


class PolicyDriven:
    def __init__(self, s: SessionRecorder, pol: Policy, rng: random.Random, cwd: str):
        self.s, self.pol, self.rng, self.cwd = s, pol, rng, cwd

    def network(self, host: str, port: int, protocol: str, method: str = "GET") -> int:
        seq = self.s.seq
        d = self.pol.evaluate_network(host, port, protocol, method)
        att = self.s.network_attempted(host, port, protocol, method=method)
        self.s.network_decided(att, d.action, rule=d.rule, reason=d.reason, policy_source=self.pol.name)
        allowed = d.action == "allow"
        if d.action == "ask":
            req = self.s.approval_requested("network", f"{host}:{port}", action_digest(host, port), risk="medium")
            allowed = self.rng.random() < 0.5
            self.s.approval_decided(req, "approved" if allowed else "denied", "user", decider="dev", latency_ms=900)
        if allowed:
            self.s.network_completed(att, "ok", status=200, bytes_in=self.rng.randint(100, 10_000), bytes_out=300)
        else:
            self.s.network_completed(att, "blocked")
        return seq

    def command(self, argv: list[str], escalated: bool = False) -> None:
        d = self.pol.evaluate_command(argv, escalated=escalated)
        cid = self.s.recorder.new_id()
        run = d.action == "allow"
        if d.action == "prompt":
            req = self.s.approval_requested("exec", shlex.join(argv), action_digest(argv, self.cwd), command_id=cid,
                                            risk="high" if escalated else "low")
            run = self.rng.random() < 0.7
            self.s.approval_decided(req, "approved" if run else "denied", "user", decider="dev", latency_ms=1500)
        self.s.command_started(argv, self.cwd, command_id=cid, escalated=escalated)
        if run:
            code = 0 if self.rng.random() < 0.85 else 1
            self.s.command_finished(cid, exit_code=code, duration_ms=self.rng.randint(10, 5000), stdout="ok")
        else:
            self.s.command_finished(cid, exit_code=None, duration_ms=0, status="declined")

    def write(self, path: str) -> None:
        d = self.pol.evaluate_write(path, self.cwd)
        if d.allowed:
            self.s.file_accessed(path, "write", digest_after=f"{self.rng.getrandbits(256):064x}", size_after=100)
        else:
            self.s.sandbox_denied("file_write", path, d.reason, rule=d.rule)

    def read(self, path: str) -> None:
        d = self.pol.evaluate_read(path)
        if d.allowed:
            self.s.file_accessed(path, "read", digest_after=f"{self.rng.getrandbits(256):064x}")
        else:
            self.s.sandbox_denied("file_read", path, d.reason, rule=d.rule)


def generate(recorder: Recorder, sessions: int, seed: int, pol: Policy | None = None, special_index: int = 1,
             actions: int = 25) -> Generated:
    """``sessions`` sessions following ``pol``; session ``special_index`` (only it) reaches SPECIAL_HOST."""
    pol = pol or policy()
    out = Generated()
    for i in range(sessions):
        rng = random.Random(f"policy-sessions/{seed}/{i}")
        cwd = f"/home/dev/src/proj-{i}"
        recorder.identity = ProducerIdentity("codex", "0.63.0", f"devbox-{i % 3}", "dev", source="recorder")
        s = recorder.session(agent="codex", cwd=cwd, model="gpt-5.1-codex", sandbox_mode=pol.sandbox_mode,
                             writable_roots=pol.roots(cwd), approval_policy="on_request",
                             network_policy=pol.network_summary(), policy_digest=pol.digest)
        g = PolicyDriven(s, pol, rng, cwd)
        for k in range(actions):
            r = rng.random()
            if r < 0.3:
                host, port, proto = rng.choice(HOSTS)
                g.network(host, port, proto, rng.choice(["GET", "POST"]))
            elif r < 0.6:
                g.command(rng.choice(COMMANDS), escalated=rng.random() < 0.15)
            elif r < 0.8:
                g.write(f"{cwd}/{rng.choice(FILES_IN)}" if rng.random() < 0.7 else rng.choice(FILES_OUT))
            else:
                g.read(f"{cwd}/{rng.choice(FILES_IN)}" if rng.random() < 0.7 else rng.choice(READS_OUT))
            if i == special_index and k in (3, 11):
                out.special_seqs.append(g.network(SPECIAL_HOST, 443, "https", "POST"))
        s.end("completed")
        out.sessions.append(s.session_id)
        if i == special_index:
            out.special_session = s.session_id
    recorder.flush()
    out.events = recorder.events_sent
    return out
