"""The project's own exceptions. Adapters translate library errors into these, with the cause attached."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (fast-path imports)
if TYPE_CHECKING:
    from typing import Any


class AgentLedgerError(Exception):
    """Base class of every error agentledger raises on purpose."""


class SchemaError(AgentLedgerError):
    """A schema file is missing, invalid, or incompatible."""


class DecodeError(AgentLedgerError):
    """Bytes that are not a valid event of any known schema version."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TransportError(AgentLedgerError):
    """The event transport (Kafka or the local log) failed."""


class NotDurableError(TransportError):
    """An event could not be made durable (no broker acknowledgement, no spool fsync).

    In fail-closed mode the agent side must turn this into a denial of the action.
    ``undelivered`` holds the messages (transport.base.Outgoing) not known to be durable.
    """

    def __init__(self, message: str, undelivered: list[Any] | None = None):
        super().__init__(message)
        self.undelivered = list(undelivered or [])


class WarehouseError(AgentLedgerError):
    """The DuckDB/DuckLake warehouse could not be opened or written."""


class ConfigError(AgentLedgerError):
    """Configuration is missing or inconsistent."""
