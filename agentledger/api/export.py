"""Events and alerts out to the security ecosystem: OCSF JSON lines (`export_ocsf`, and the
`ocsf_sink` of `ingest --ocsf`) and OpenTelemetry traces over OTLP/HTTP (`export_otel`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from agentledger.schemas.config import Settings
from agentledger.schemas.errors import AgentLedgerError

from .sessions import in_warehouse


def _version() -> str:
    from agentledger import __version__

    return __version__


def export_ocsf(s: Settings, out: str | Path, *, sessions: Sequence[str] | None = None, since: str | None = None,
                ai_agent_activity: bool = False):
    """Write the warehouse's events and alerts (of ``sessions``: ids or unique prefixes; at or after
    ``since``, UTC) as OCSF 1.8.0 JSON lines to ``out`` (a file, or a directory: one file per OCSF
    class). Returns the counts (`OcsfExport`: paths, events, alerts, classes, skipped kinds).
    ``ai_agent_activity``: also AI Agent Activity (6009, an OCSF draft class) records of permission
    requests and tool uses, in addition to their 1.8.0 records (docs/export.md)."""
    from agentledger.consumers.export.ocsf_files import export_ocsf as run
    from agentledger.schemas.warehouse import open_for_query

    with open_for_query(s) as wh:
        ids = [in_warehouse(wh.con, x, s.warehouse) for x in sessions] if sessions else None
        return run(wh, Path(out), product_version=_version(), sessions=ids, since=since,
                   ai_agent_activity=ai_agent_activity)


def ocsf_sink(wh, path: str | Path):
    """The `ingest --ocsf PATH` hook on the ingesting warehouse ``wh`` (see `OcsfSink`)."""
    from agentledger.consumers.export.ocsf_files import OcsfSink

    return OcsfSink(wh, Path(path), product_version=_version())


OTEL_EXTRA = "otel"


def otel_install_hint() -> str:
    from .health import _install_extra

    return _install_extra(OTEL_EXTRA)


def export_otel(s: Settings, endpoint: str, *, sessions: Sequence[str] | None = None, since: str | None = None,
                timeout_s: float = 30.0):
    """Send sessions (``sessions``: ids or unique prefixes, else every session; ``since``: started at
    or after, UTC) as OpenTelemetry traces (GenAI semantic conventions) to an OTLP/HTTP ``endpoint``
    (``http://host:4318``; ``/v1/traces`` is added unless given). Needs the ``otel`` extra."""
    try:
        from agentledger.consumers.export import otel
    except ImportError as exc:
        raise AgentLedgerError(f"export otel needs the OpenTelemetry SDK ({exc.name} is not installed): "
                               f"{otel_install_hint()}") from exc
    from agentledger.schemas.warehouse import open_for_query

    with open_for_query(s) as wh:
        ids = [in_warehouse(wh.con, x, s.warehouse) for x in sessions] if sessions else None
        return otel.export_traces(wh, endpoint, product_version=_version(), sessions=ids, since=since,
                                  timeout_s=timeout_s)
