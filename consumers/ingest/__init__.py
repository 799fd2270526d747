"""Exactly-once ingest of encoded events from a transport into the warehouse (DuckDB file or DuckLake).

Guarantee (the one auditors rely on): for every batch, the accepted events, the quarantined
messages, the new chain heads and the next offset of every (topic, partition) in the batch are
written in ONE warehouse transaction. A crash before COMMIT loses the whole batch and the offsets
with it, so the restarted consumer reads the same messages again; a crash after COMMIT keeps both.
The source never commits offsets of its own.

Two guards make a stale writer harmless (a "zombie": a group member that lost its partitions but
does not know yet, or a second process on the same warehouse): the offset of a partition only
advances if the stored offset is exactly where the batch starts, checked inside the transaction
(else the transaction rolls back and the consumer re-seeks); and an event is only accepted if it
extends its session's chain head (seq = head + 1, prev_hash = head hash) and its event_id is new.
On a DuckLake, a commit that loses a race with another writer is retried from the start.

Speed: a fetch thread polls the source (kafka-python decodes record batches in Python) while the
main thread runs the previous batch through DuckDB, which releases the GIL -- the two overlap on
two cores. Decoding is native. A batch of `NATIVE_MIN_MESSAGES` or more goes to
``agentledger-avro2arrow --ingest`` (native/avro2arrow/src/ingest.rs, adapter `schemas.native`): it
checks every message's header, size, writer schema and hash, decodes it, and writes one Arrow file
per event kind that goes straight into that kind's table; the chain guard below then runs on the
envelope rows as always. Only when it vouches for *every* message of the batch are its rows used;
otherwise (damage, an older writer schema, a decoder missing or failing) the whole batch takes the
Python path, so the verdicts never depend on the decoder (tests/test_native_ingest.py). The Python
path: message bodies that share a writer schema are framed as one in-memory Avro Object Container
File and DuckDB's avro extension turns them into rows; Python checks each message's header and
hash (SHA-256 over the raw bytes).

Chains continue across batches, restarts and partitions (the heads are in `chain_heads`). An event
that arrived before its predecessor is parked in `dead_letters` (seq_gap) and ingested, in the same
transaction, as soon as the predecessor lands; its dead letter is then marked resolved.

The log-wide Merkle tree (schemas/treelog.py): every transaction that advances sessions -- a batch,
the healing of parked events, `deadletters retry`, `import bundle`, all through `_update_heads` --
appends one leaf per advanced session (its new chain head) in that same transaction. With an
operator key (``tree_heads``), the tree head is signed in the committing transaction (while
following: at most every ``every_s`` seconds, and always at the end of a run), then published.
"""


from .common import (
    DEFAULT_BATCH,
    MAX_MESSAGE_BYTES,
    MAX_SESSION_ID,
    Batch,
    BatchResult,
    IngestStats,
    LogWentBackwards,
    OffsetConflict,
)
from .native_path import NATIVE_MIN_MESSAGES
from .runner import Ingestor

__all__ = ["DEFAULT_BATCH", "MAX_MESSAGE_BYTES", "MAX_SESSION_ID", "NATIVE_MIN_MESSAGES", "Batch", "BatchResult",
           "IngestStats", "Ingestor", "LogWentBackwards", "OffsetConflict"]
