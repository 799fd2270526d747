"""Errors of the recording sandbox (all are `AgentLedgerError`s, so the CLI reports them cleanly)."""

from __future__ import annotations

from agentledger.schemas.errors import AgentLedgerError, ConfigError


class SandboxError(AgentLedgerError):
    """The sandbox could not run or record a command (missing tool, bad workspace, broken trace)."""


class SandboxUnavailable(SandboxError):
    """A tool the sandbox needs (bwrap, strace, ...) is missing or not permitted on this machine."""


class StoreError(SandboxError):
    """The recording store (CAS) is missing a blob, holds a corrupt one, or is over its bounds."""


class SessionStateError(ConfigError):
    """A sandbox session cannot be continued as asked (other workspace or policy, already ended)."""
