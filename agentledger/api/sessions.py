"""The session ids commands take: every command resolves them here, with `schemas.sessionids.resolve`
(a full id, or a unique prefix of at least `MIN_PREFIX` characters; "too short", "ambiguous (N
sessions: …)" and "no such session" otherwise), looking where that command reads sessions from."""

from __future__ import annotations

from pathlib import Path

from agentledger.schemas.config import Settings
from agentledger.schemas.errors import WarehouseError
from agentledger.schemas.sessionids import Place, listed_place, resolve, warehouse_place


def in_warehouse(con, text: str, label: str) -> str:
    """A session id given to a command that reads the warehouse it has open (``con``)."""
    return resolve(text, [warehouse_place(con, label)])


def for_reading(s: Settings, text: str, *, transport: str | None = "auto", warehouse_only: bool = False) -> str:
    """A session id given to a command that reads a session from the warehouse or, when it is not
    there (yet), from the transport: ``transport`` is "auto" (the configured one), "local" (the local
    log), "kafka", or None; ``warehouse_only``: the warehouse must be there. The warehouse is asked
    first, so a full id it holds costs one lookup."""
    from agentledger.replay.sources import KafkaSessionSource, LocalLogSessionSource
    from agentledger.schemas.warehouse import open_warehouse

    places: list[Place] = []
    wh = None
    if s.warehouse.startswith("ducklake:") or s.warehouse == ":memory:" or Path(s.warehouse).exists():
        try:
            wh = open_warehouse(s.warehouse, read_only=True)
        except WarehouseError as exc:
            if warehouse_only:
                raise
            places.append(_nothing(f"the warehouse {s.warehouse} (not readable: {exc})"))
    elif warehouse_only:
        raise WarehouseError(f"no warehouse at {s.warehouse}: run `agentledger ingest` first")
    try:
        if wh is not None:
            places.insert(0, warehouse_place(wh.con, s.warehouse))
        if transport == "kafka" or (transport == "auto" and s.uses_kafka and s.bootstrap_servers):
            places.append(KafkaSessionSource(s.bootstrap_servers, s.topic).place())
        elif transport in ("auto", "local"):
            places.append(LocalLogSessionSource(s.log_dir, s.topic).place())
        return resolve(text, places)
    finally:
        if wh is not None:
            wh.close()


def _nothing(name: str) -> Place:
    return Place(name, lambda _sid: False, lambda _prefix, _n: [])


def in_sandbox(s: Settings, text: str) -> str:
    """A session of the recording sandbox on this machine: its state (HOME/sandbox/sessions/ID) or
    its recording store manifest (HOME/cas/sessions/ID.json)."""
    state, manifests = s.home / "sandbox" / "sessions", s.home / "cas" / "sessions"

    def ids() -> list[str]:
        out = {p.name for p in state.iterdir() if p.is_dir()} if state.is_dir() else set()
        out |= {p.stem for p in manifests.glob("*.json")} if manifests.is_dir() else set()
        return sorted(out)

    return resolve(text, [listed_place(f"the sandbox sessions of {s.home}", ids)])
