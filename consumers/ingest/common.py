"""What the parts of ingest share: limits, the batch and its results, the quarantine record, the offset
conflict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from agentledger.schemas.contract import SchemaStore
from agentledger.schemas.errors import AgentLedgerError
from agentledger.schemas.transport.base import Message
from agentledger.schemas.sql import literal

if TYPE_CHECKING:
    from agentledger.schemas.transport.local import RawRange

    from .native_path import _NativeStage

MAX_MESSAGE_BYTES = 1024 * 1024
# Large transactions: DuckDB's per-commit cost is high (see bench/ingest.py and docs/warehouse.md).
DEFAULT_BATCH = 100_000
_HASH_TAG = b"\x80\x01"
# Reasons whose dead letters may become acceptable later without any change to the event itself.
_PARKED = ("seq_gap",)
MAX_SESSION_ID = 256
_BAD_SESSION_ID = (f"(session_id = '' OR length(session_id) > {MAX_SESSION_ID} "
                   "OR regexp_matches(session_id, '[\\x00-\\x1f\\x7f]'))")


class OffsetConflict(AgentLedgerError):
    """The stored offset of a partition is not where this batch starts: another writer (a zombie, or
    the new owner after a rebalance) committed it. The batch is rolled back, never half-applied."""

    def __init__(self, conflicts: dict[tuple[str, int], tuple[int | None, int]]):
        self.conflicts = conflicts
        super().__init__("; ".join(f"{t}/{p}: stored {s}, batch starts at {b}" for (t, p), (s, b) in conflicts.items()))


class LogWentBackwards(AgentLedgerError):
    """A partition is not the one the warehouse has ingested: it now ends below the stored offset,
    or the record at the offset ingested last is another one. The log was replaced, truncated or
    restored from an older copy (or the Kafka topic recreated): what it holds now would be skipped
    below the stored offsets without a word, so ingest refuses."""

    def __init__(self, topic: str, why: dict[int, str]):
        self.topic = topic
        self.why = why  # partition -> what is wrong with it
        where = "; ".join(f"partition {p} {w}" for p, w in sorted(why.items()))
        super().__init__(
            f"the log went backwards: topic {topic}: {where}. It was replaced, truncated or restored from an "
            "older copy (or the Kafka topic was recreated), and what it holds now would be skipped. Nothing was "
            "ingested. Find out why first (a replaced log is what an attacker hiding events would do); if you know "
            "(you deleted the log yourself), `agentledger ingest --log-replaced` reads those partitions from their "
            "beginning again: events already in the warehouse are quarantined as duplicates, the rest ingested.")


@dataclass
class BatchResult:
    messages: int = 0
    accepted: int = 0
    dead_letters: int = 0
    healed: int = 0  # parked dead letters accepted because their predecessor arrived
    reasons: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    sessions: list[str] = field(default_factory=list)  # sessions that gained events (committed)
    decoder: str = "python"  # "native": agentledger-avro2arrow vouched for every message of the batch


@dataclass
class IngestStats:
    batches: int = 0
    messages: int = 0
    accepted: int = 0
    dead_letters: int = 0
    healed: int = 0
    retries: int = 0
    offset_conflicts: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, r: BatchResult) -> None:
        self.batches += 1
        self.messages += r.messages
        self.accepted += r.accepted
        self.dead_letters += r.dead_letters
        self.healed += r.healed
        self.retries += r.retries
        for k, v in r.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + v

    def as_dict(self) -> dict:
        return {"batches": self.batches, "messages": self.messages, "events": self.accepted,
                "dead_letters": self.dead_letters, "healed": self.healed, "retries": self.retries,
                "offset_conflicts": self.offset_conflicts, "seconds": round(self.seconds, 3),
                "reasons": self.reasons}


@dataclass
class _Dead:
    i: int
    reason: str
    detail: str
    session_id: str | None = None
    seq: int | None = None
    event_id: str | None = None


class Batch:
    """Messages polled together, with the source position of each of their partitions before and
    after. From the embedded log a batch comes as ``chunks`` (`LocalSource.poll_raw`: raw segment
    ranges, or lists of messages where there are no such bytes); its ``messages`` are made from
    them only when something needs them (the Python path, a dead letter's bytes). ``native``: the
    batch as the native decoder staged it ahead of time (`Ingestor._decode_loop`), None when it
    declined, `NOT_TRIED` when nothing tried yet."""

    def __init__(self, messages: list[Message] | None, start: dict[tuple[str, int], int],
                 end: dict[tuple[str, int], int], generation: int = 0, *,
                 chunks: list[RawRange | list[Message]] | None = None):
        self._messages = messages
        self.chunks = chunks
        self.start, self.end, self.generation = start, end, generation
        self.native: _NativeStage | None | object = NOT_TRIED

    @property
    def messages(self) -> list[Message]:
        if self._messages is None:
            self._messages = [m for c in self.chunks or [] for m in (c if isinstance(c, list) else c.messages())]
        return self._messages

    def __getitem__(self, i: int) -> Message:
        return self.messages[i]

    def __len__(self) -> int:
        if self._messages is not None:
            return len(self._messages)
        return sum(chunk_len(c) for c in self.chunks or [])

    @classmethod
    def of(cls, msgs: list[Message]) -> "Batch":
        start: dict[tuple[str, int], int] = {}
        end: dict[tuple[str, int], int] = {}
        for m in msgs:
            k = (m.topic, m.partition)
            if k not in start or m.offset < start[k]:
                start[k] = m.offset
            if m.offset + 1 > end.get(k, -1):
                end[k] = m.offset + 1
        return cls(msgs, start, end)

    @classmethod
    def of_chunks(cls, chunks: list[RawRange | list[Message]]) -> "Batch":
        start: dict[tuple[str, int], int] = {}
        end: dict[tuple[str, int], int] = {}
        for c in chunks:
            for k, first, stop in ([((m.topic, m.partition), m.offset, m.offset + 1) for m in c] if isinstance(c, list)
                                   else [((c.topic, c.partition), c.offset, c.offset + c.count)]):
                if k not in start or first < start[k]:
                    start[k] = first
                if stop > end.get(k, -1):
                    end[k] = stop
        return cls(None, start, end, chunks=chunks)


def chunk_len(c: RawRange | list[Message]) -> int:
    """Messages in one `LocalSource.poll_raw` chunk."""
    return len(c) if isinstance(c, list) else c.count


NOT_TRIED = object()


@dataclass
class _Retry:
    """Dead letters fed through validation again (deadletters retry, or a predecessor arrived)."""

    ids: list[str]


def _sql_list(items: Iterable[str]) -> str:
    return "(" + ", ".join(literal(i) for i in items) + ")"


def _best_effort_ids(store: SchemaStore, value: bytes | None) -> tuple[str | None, int | None, str | None]:
    """Session, seq and event id of a quarantined message, if it decodes at all (helps auditors)."""
    if not value:
        return None, None, None
    try:
        rec = store.decode(value)
        eid = rec.get("event_id")
        return rec.get("session_id"), rec.get("seq"), None if eid is None else str(eid)
    except Exception:  # bad input is data here, not an error
        return None, None, None
