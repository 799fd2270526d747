"""Hand-written agent sessions for detection tests: real Recorder (redaction on, hash chain), the
embedded local log, the real Ingestor and a real DuckDB warehouse -- nothing simulated by the
simulator, so rules are tested on shapes it never produces too."""

from __future__ import annotations

import itertools
from pathlib import Path

from agentledger.producers.recorder import ProducerIdentity, Recorder, action_digest
from agentledger.producers.redact import Redactor
from agentledger.schemas.transport.local import LocalLog, LocalSink, LocalSource

TOPIC = "agentledger.events"
ALLOWED = ["pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "github.com", "crates.io"]
T0 = 1_767_225_600_000_000


class Clock:
    def __init__(self, start: int = T0):
        self.now = start

    def __call__(self) -> int:
        self.now += 1_000_000  # one second per event
        return self.now


class Session:
    """``s = Session(rec); s.cmd("env"); s.net("203.0.113.9", method="POST"); s.end()``"""

    def __init__(self, rec: Recorder, cwd: str = "/home/dev/src/app", allowed: list[str] | None = None,
                 mode: str = "allowlist", agent: str = "codex"):
        self.cwd = cwd
        self.s = rec.session(agent=agent, cwd=cwd, sandbox_mode="workspace_write", writable_roots=[cwd],
                             approval_policy="on_request",
                             network_policy={"mode": mode, "allowed_domains": ALLOWED if allowed is None else allowed,
                                             "denied_domains": []})
        self.id = self.s.session_id

    @property
    def seq(self) -> int:
        """The seq the next event will get."""
        return self.s.seq

    def cmd(self, command: str | list[str], stdout: str = "", exit_code: int = 0, escalated: bool = False,
            env_names: list[str] | None = None) -> str:
        if isinstance(command, str):
            argv, shell = ["bash", "-lc", command], command
        else:
            argv, shell = list(command), None
        cid = self.s.command_started(argv, self.cwd, shell=shell, escalated=escalated,
                                     env_names=env_names or ["PATH", "HOME"])
        self.s.command_finished(cid, exit_code=exit_code, duration_ms=120, stdout=stdout)
        self._last_cmd = cid
        return cid

    def file(self, path: str, op: str = "read", inside: bool | None = None, mode: int | None = None) -> None:
        if not path.startswith("/"):
            path = f"{self.cwd}/{path}"
        inside = path.startswith(self.cwd + "/") if inside is None else inside
        self.s.file_accessed(path, op, inside_workspace=inside, mode=mode)

    def net(self, host: str, port: int = 443, method: str | None = "GET", decision: str = "allow",
            protocol: str = "https", url: str | None = None, bytes_out: int = 500, command_id: str | None = None) -> None:
        att = self.s.network_attempted(host, port, protocol, method=method, url=url, command_id=command_id)
        self.s.network_decided(att, decision, rule="test", reason="test", policy_source="baseline_policy")
        if decision == "allow":
            self.s.network_completed(att, "ok", status=200, bytes_in=1000, bytes_out=bytes_out, duration_ms=30)
        else:
            self.s.network_completed(att, "blocked")

    def approval(self, subject: str, decision: str, kind: str = "exec", risk: str = "high") -> None:
        digest = action_digest(kind, subject, self.cwd)
        req = self.s.approval_requested(kind, subject, digest, risk=risk, justification="needed")
        self.s.approval_decided(req, decision, "user", decider="dev", latency_ms=900, action_digest=digest)

    def denied(self, target: str, op: str = "file_write") -> None:
        self.s.sandbox_denied(op, target, "outside writable roots", rule="workspace-write")

    def work(self, n: int = 3) -> None:
        """Ordinary work: read and edit workspace files, run the tests."""
        for i in range(n):
            self.file(f"src/mod{i}.py", "read")
            self.file(f"src/mod{i}.py", "write")
        self.cmd(["pytest", "-q"], stdout="12 passed")

    def end(self) -> None:
        self.s.end("completed")


class Lab:
    """A home with an embedded log and a warehouse; record sessions, ingest them, detect."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.log = LocalLog(self.root / "log", default_partitions=2)
        self.sink = LocalSink(self.log)
        self.clock = Clock()
        self.rec = Recorder(self.sink, topic=TOPIC, identity=ProducerIdentity("codex", "0.63.0", "devbox", "dev"),
                            clock=self.clock, transforms=[Redactor(b"k" * 32)], signer=None)
        self.warehouse = str(self.root / "warehouse.duckdb")
        self._ids = itertools.count()

    def session(self, **kw) -> Session:
        return Session(self.rec, **kw)

    def flush(self) -> None:
        self.rec.flush()
        self.sink.flush()

    def ingest(self, wh, *, batch: int = 100_000, after_commit=None):
        from agentledger.consumers.ingest import Ingestor

        self.flush()
        source = LocalSource(self.log)
        try:
            ing = Ingestor(wh, source, TOPIC, batch_records=batch, after_commit=after_commit)
            ing.assign()
            return ing.run()
        finally:
            source.close()


def alerts_of(wh, session_id: str) -> dict[str, dict]:
    cur = wh.con.execute("SELECT * FROM alerts WHERE session_id = ?", [session_id])
    cols = [d[0] for d in cur.description]
    return {r["rule_id"]: r for r in (dict(zip(cols, row)) for row in cur.fetchall())}
