"""Configuration from the environment (flags override it in the CLI).

AGENTLEDGER_HOME               local state: the embedded log, spool, keys, warehouse  ($XDG_DATA_HOME/agentledger,
                                                                                       else ~/.local/share/agentledger:
                                                                                       schemas/homes.py)
AGENTLEDGER_BOOTSTRAP_SERVERS  when set, Kafka is the transport                       (unset: embedded log)
AGENTLEDGER_WAREHOUSE          DuckDB file path, or ducklake:<catalog>                 ($HOME/warehouse.duckdb)
AGENTLEDGER_TOPIC              events topic                                            (agentledger.events)
AGENTLEDGER_LAKE_DATA_PATH     DuckLake data (Parquet) directory or URL                (<catalog file>.files/)
AGENTLEDGER_ALERTS_TOPIC       alerts topic (Kafka only)                               (agentledger.alerts)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from .homes import resolve_home

DEFAULT_TOPIC = "agentledger.events"
ALERTS_TOPIC = "agentledger.alerts"
DEFAULT_PARTITIONS = 6


@dataclass(frozen=True)
class Settings:
    home: Path
    bootstrap_servers: str | None
    warehouse: str
    topic: str = DEFAULT_TOPIC
    partitions: int = DEFAULT_PARTITIONS
    lake_data_path: str | None = None
    alerts_topic: str = ALERTS_TOPIC

    @property
    def uses_kafka(self) -> bool:
        return bool(self.bootstrap_servers)

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def transport_label(self) -> str:
        return f"kafka {self.bootstrap_servers}" if self.uses_kafka else f"local log {self.log_dir}"

    def with_(self, **changes) -> "Settings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def from_env(env: dict[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    home = Path(resolve_home(env))
    warehouse = env.get("AGENTLEDGER_WAREHOUSE") or str(home / "warehouse.duckdb")
    return Settings(
        home=home,
        bootstrap_servers=env.get("AGENTLEDGER_BOOTSTRAP_SERVERS") or None,
        warehouse=warehouse,
        topic=env.get("AGENTLEDGER_TOPIC") or DEFAULT_TOPIC,
        partitions=int(env.get("AGENTLEDGER_PARTITIONS") or DEFAULT_PARTITIONS),
        lake_data_path=env.get("AGENTLEDGER_LAKE_DATA_PATH") or None,
        alerts_topic=env.get("AGENTLEDGER_ALERTS_TOPIC") or ALERTS_TOPIC,
    )
