"""Turning a bundle into transport messages for the normal ingest (`agentledger import bundle`).

Each event keeps its exact sealed bytes, so ingest re-checks every hash and the chain. The
messages get topic ``bundle:<first 16 hex of the file's SHA-256>``, partition 0 and offset = the
event's position in the bundle, so ``events.source_*`` says which bundle an event came from and
``ingest_offsets`` records how far that bundle was imported. Importing is idempotent: events the
warehouse already holds (same session and seq with the same hash, from any source) and positions
below the stored offset of that bundle topic are not sent again.
"""

from __future__ import annotations

import hashlib

from agentledger.schemas.transport.base import Message

from .bundle import Bundle
from .chain import envelope_head


def bundle_topic(b: Bundle) -> str:
    return f"bundle:{hashlib.sha256(b.data).hexdigest()[:16]}"


def bundle_messages(b: Bundle) -> tuple[str, list[Message]]:
    topic = bundle_topic(b)
    key = b.session_id.encode()
    return topic, [Message(topic, 0, i, key, b.value(i)) for i in range(len(b.spans))]


def new_messages(con, session_id: str, topic: str, msgs: list[Message]) -> list[Message]:
    """The messages the warehouse behind ``con`` does not hold yet."""
    row = con.execute('SELECT next_offset FROM ingest_offsets WHERE topic = ? AND "partition" = 0', [topic]).fetchone()
    done = row[0] if row else 0
    have = dict(con.execute("SELECT seq, hash FROM events WHERE session_id = ?", [session_id]).fetchall())
    out = []
    for m in msgs:
        if m.offset < done:
            continue
        seq = envelope_head(m.value)[2]
        if have.get(seq) == m.value[-64:].decode("ascii", "replace"):
            continue
        out.append(m)
    return out
