"""The alert record on the wire: ``schemas/alert.avsc`` in Avro single-object encoding.

Alerts go to the alerts topic (`schemas.config.ALERTS_TOPIC`, key = session_id) with the same
framing as events (``C3 01`` + CRC-64-AVRO fingerprint + body), so any consumer that knows the
released alert schemas decodes them; a newer writer's alert stays readable under FULL_TRANSITIVE
compatibility (`agentledger schemas check --subject alert`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from . import codec
from .contract import SchemaStore, load_store

SUBJECT = "alert"
SEVERITIES = ("low", "medium", "high", "critical")
_EPOCH = dt.datetime(1970, 1, 1)


def store() -> SchemaStore:
    return load_store(SUBJECT)


def _micros(v: Any) -> int | None:
    """Warehouse TIMESTAMPs are naive UTC; the wire wants microseconds since the epoch."""
    if v is None or isinstance(v, int):
        return v
    if v.tzinfo is not None:
        v = v.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return int((v - _EPOCH) // dt.timedelta(microseconds=1))


_TIMESTAMPS = ("first_event_at", "last_event_at", "created_at", "updated_at")


def to_record(row: dict[str, Any]) -> dict[str, Any]:
    """An `alerts` row (or any mapping with the schema's field names) as an alert record."""
    s = store().current.schema
    rec = {}
    for f in s["fields"]:
        v = row.get(f["name"])
        if f["name"] in _TIMESTAMPS:
            v = _micros(v)
        elif f["name"] in ("mitre", "evidence_seqs"):
            v = list(v or [])
        rec[f["name"]] = v
    return rec


def encode_alert(row: dict[str, Any]) -> bytes:
    """Single-object-encoded bytes of one alert, under the current alert schema."""
    st = store()
    return codec.soe_frame(st.current.fingerprint, st.encode(to_record(row)))


def decode_alert(value: bytes) -> dict[str, Any]:
    """Decode an alert written by any released alert schema (resolved to the current one); the
    alert_id comes back as a string, timestamps as aware UTC datetimes."""
    rec = store().decode(value)
    rec["alert_id"] = str(rec["alert_id"])
    return rec
