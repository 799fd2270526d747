"""The recording sandbox: run an agent's commands under bubblewrap with an egress policy and
approvals, observe them with strace, record everything as events, and keep what a re-execution
needs in a content-addressed store. See docs/sandbox.md."""

from .errors import SandboxError, SandboxUnavailable, SessionStateError, StoreError
from .session import RunResult, SandboxSession

__all__ = ["RunResult", "SandboxError", "SandboxSession", "SandboxUnavailable", "SessionStateError", "StoreError"]
