"""The settings every command shares, from the environment (flags override it in the CLI).

The variables (home, Kafka, warehouse, topics, partitions, DuckLake data path) are declared, with
their types, defaults and meaning, in `schemas/envvars.py`, the one list of every AGENTLEDGER_*
variable; this module only gathers them into `Settings`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (fast-path imports)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

from . import envvars
from .homes import resolve_home

DEFAULT_TOPIC = envvars.declared("AGENTLEDGER_TOPIC").default
ALERTS_TOPIC = envvars.declared("AGENTLEDGER_ALERTS_TOPIC").default
DEFAULT_PARTITIONS = envvars.declared("AGENTLEDGER_PARTITIONS").default


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

    def with_(self, **changes: Any) -> "Settings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    home = Path(resolve_home(env))
    return Settings(
        home=home,
        bootstrap_servers=envvars.get("AGENTLEDGER_BOOTSTRAP_SERVERS", env),
        warehouse=envvars.get("AGENTLEDGER_WAREHOUSE", env) or str(home / "warehouse.duckdb"),
        topic=envvars.get("AGENTLEDGER_TOPIC", env),
        partitions=envvars.get("AGENTLEDGER_PARTITIONS", env),
        lake_data_path=envvars.get("AGENTLEDGER_LAKE_DATA_PATH", env),
        alerts_topic=envvars.get("AGENTLEDGER_ALERTS_TOPIC", env),
    )
