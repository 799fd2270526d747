"""Approvals: ask a human on the terminal, or apply the policy's non-interactive default.

Interactive means: a controlling terminal can be opened (``/dev/tty``) and the caller did not ask
for non-interactive mode. The prompt shows the exact action (command line and cwd, or
destination) and the digest the decision is bound to, then waits at most ``approvals.timeout_s``.
Answers: ``y`` approve once, ``a`` approve for the rest of the session (same digest), anything
else denies. Without a terminal the decision is ``approvals.noninteractive`` (decided by the
policy, rule ``approvals.noninteractive``); a prompt nobody answers in time is ``timed_out``
(and the action is refused) unless ``approvals.noninteractive`` is ``allow``.

One prompt at a time: the egress proxy may ask from several threads.
"""

from __future__ import annotations

import getpass
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from agentledger.schemas.policy import Policy
from agentledger.schemas.terminal import printable


@dataclass(frozen=True)
class Ask:
    action_kind: str  # exec | network | permission
    subject: str  # what the approver sees: the command line or the destination
    action_digest: str
    rule: str | None
    reason: str
    justification: str | None = None
    risk: str = "unknown"
    details: tuple[tuple[str, str], ...] = ()  # extra lines for the prompt (cwd, url, ...)


@dataclass(frozen=True)
class Answer:
    decision: str  # approved | approved_for_session | denied | timed_out
    decided_by: str  # user | policy
    decider: str | None
    rule: str | None
    latency_ms: int

    @property
    def approved(self) -> bool:
        return self.decision in ("approved", "approved_for_session")


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


class Approver:
    """Decides `Ask`s for one process. ``grants`` holds digests approved for the session."""

    def __init__(self, policy: Policy, *, interactive: bool | None = None, tty: str = "/dev/tty",
                 grants: Iterable[str] = (), clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.tty_path = tty
        self.grants = set(grants)
        self.clock = clock
        self._lock = threading.Lock()
        self.interactive = self._can_prompt() if interactive is None else interactive

    def _can_prompt(self) -> bool:
        try:
            fd = os.open(self.tty_path, os.O_RDWR | os.O_NOCTTY)
        except OSError:
            return False
        os.close(fd)
        return True

    def decide(self, ask: Ask) -> Answer:
        with self._lock:
            t0 = self.clock()
            if ask.action_digest in self.grants:
                return Answer("approved_for_session", "policy", self.policy.source or self.policy.name,
                              "approvals.session_grant", 0)
            if not self.interactive:
                decision = "approved" if self.policy.noninteractive == "allow" else "denied"
                return Answer(decision, "policy", self.policy.source or self.policy.name, "approvals.noninteractive",
                              int((self.clock() - t0) * 1000))
            answer = self._prompt(ask)
            latency = int((self.clock() - t0) * 1000)
            if answer is None:
                if self.policy.noninteractive == "allow":
                    return Answer("approved", "policy", self.policy.source or self.policy.name,
                                  "approvals.timeout_s", latency)
                return Answer("timed_out", "policy", self.policy.source or self.policy.name, "approvals.timeout_s",
                              latency)
            if answer == "a":
                self.grants.add(ask.action_digest)
                return Answer("approved_for_session", "user", _user(), ask.rule, latency)
            if answer == "y":
                return Answer("approved", "user", _user(), ask.rule, latency)
            return Answer("denied", "user", _user(), ask.rule, latency)

    def _prompt(self, ask: Ask) -> str | None:
        """The first letter the user typed (lower case), '' for an empty line, None on timeout."""
        fd = os.open(self.tty_path, os.O_RDWR | os.O_NOCTTY)
        try:
            lines = [
                "",
                f"agentledger sandbox: approval needed ({ask.action_kind}, rule {ask.rule or 'default'})",
                f"  {'command' if ask.action_kind == 'exec' else 'destination'}: {ask.subject}",
                *[f"  {k}: {v}" for k, v in ask.details],
                f"  action digest: sha256:{ask.action_digest}",
                f"  why asked: {ask.reason}",
            ]
            if ask.justification:
                lines.append(f"  justification: {ask.justification}")
            timeout = max(0.0, float(self.policy.approval_timeout_s))
            lines.append(f"Allow? [y]es once / [a]lways this session / [N]o  (no answer in {timeout:g}s: "
                         f"{'allow' if self.policy.noninteractive == 'allow' else 'refuse'}) ")
            # what the command chose (its URL, its argv) is shown, never acted on by the terminal
            os.write(fd, "\r\n".join(printable(line) for line in lines).encode())
            deadline = self.clock() + timeout
            buf = b""
            while b"\n" not in buf and b"\r" not in buf:
                left = deadline - self.clock()
                if left <= 0:
                    os.write(fd, b"\r\n(no answer: timed out)\r\n")
                    return None
                ready, _, _ = select.select([fd], [], [], left)
                if not ready:
                    continue
                chunk = os.read(fd, 1024)
                if not chunk:
                    return None
                buf += chunk
            text = buf.decode("utf-8", "replace").strip().lower()
            os.write(fd, b"\r\n")
            return text[:1]
        finally:
            os.close(fd)
