"""agentledger's application layer: everything the CLI does, as plain Python.

Functions take a `Settings` (`settings()` reads the environment, with overrides) and typed
arguments, and return result objects (dataclasses); long runs report progress to an optional
``progress`` callback (one `ProgressUpdate` per step). Nothing here prints or exits: the CLI
(`agentledger/commands/`) parses arguments, calls these and renders what they return.

    import agentledger.api as al

    s = al.settings(home="/tmp/al-demo")
    sim = al.simulate(s, sessions=20, seed=7)
    al.ingest(s, detect=True)
    al.sql(s, "select kind, count(*) from events group by 1").as_dicts()
"""

from agentledger.schemas.config import Settings
from agentledger.schemas.errors import AgentLedgerError

from .console import (SessionsPage, SessionView, SessionViews, alert_queue, export_to_temp, label_alert, policy_files,
                      session_view, sessions_page, sql_limited, whatif_text)
from .common import ProgressCallback, ProgressUpdate, Rows, settings
from .decisions import NoSuchAction, Why, decider_text, why, why_line
from .health import Doctor, doctor
from .export import export_ocsf, export_otel, ocsf_sink, otel_install_hint
from .evidence import (Exported, Imported, Replayed, SessionRecord, export_bundle, file_sha256, import_bundle,
                       keyring, operator_keyring, read_session, replay, verify_bundle, whatif, whatif_summary)
from .mcp import McpDrift, mcp_drift, mcp_proxy
from .ledger import (GeneratedKey, Retried, Verification, compact, dead_letters, generate_key, list_keys,
                     retry_dead_letters, snapshots, spool_drain, spool_status, verify)
from .models import (ModelInfo, ModelStatus, deployment_model_path, model_status, resolve_model, train_model)
from .pipeline import (SEVERITIES, Alerts, Detection, Ingested, IngestDetection, Simulation, alerts, check_rules,
                       detect, import_agent_logs, ingest, make_detector, rules, session_overview,
                       simulate, simulator_policy_path, sql)
from .sandbox import (END_STATUSES, NotRecorded, Reexecution, divergence_rows, reexecute, sandbox_doctor,
                      sandbox_end, sandbox_forget, sandbox_run)
from .sessions import for_reading, in_sandbox, in_warehouse

__all__ = [
    "AgentLedgerError", "Alerts", "Detection", "Doctor", "END_STATUSES", "Exported", "GeneratedKey", "Imported", "Ingested",
    "IngestDetection", "ModelInfo", "ModelStatus", "NotRecorded", "ProgressCallback", "ProgressUpdate", "Reexecution", "Replayed", "Retried",
    "Rows", "SEVERITIES", "SessionRecord", "Settings", "Simulation", "Verification", "alerts", "check_rules",
    "compact", "dead_letters", "deployment_model_path", "detect", "divergence_rows", "doctor", "export_bundle", "export_ocsf", "export_otel", "file_sha256", "for_reading",
    "generate_key", "import_agent_logs", "import_bundle", "in_sandbox", "in_warehouse", "ingest", "keyring",
    "list_keys", "make_detector", "ocsf_sink", "otel_install_hint", "model_status", "operator_keyring", "read_session", "reexecute", "replay", "resolve_model",
    "retry_dead_letters", "rules", "sandbox_doctor", "sandbox_end", "sandbox_forget", "sandbox_run",
    "session_overview", "settings", "simulate", "simulator_policy_path", "snapshots", "spool_drain", "spool_status",
    "sql", "train_model", "SessionsPage", "SessionView", "SessionViews", "alert_queue", "export_to_temp", "label_alert",
    "policy_files", "session_view", "sessions_page", "sql_limited", "whatif_text", "verify", "verify_bundle", "whatif", "whatif_summary",
    "McpDrift", "mcp_drift", "mcp_proxy",
    "NoSuchAction", "Why", "decider_text", "why", "why_line",
]
