"""Checking a signed checkpoint against the chain it claims to cover (shared by verify, replay, bundles).

A checkpoint event (kind ``checkpoint``) at seq ``n`` states, signed with Ed25519: events
``0..head_seq`` of the session exist, event ``head_seq`` hashes to ``head_hash`` and there are
``event_count`` of them. The producer emits it right after the events it covers, so in an intact
chain ``head_seq == n - 1``. Verifying a checkpoint needs the chain head *as it was at that point*
(what a sequential `ChainVerifier` holds just before the checkpoint event), never the final head.
"""

from __future__ import annotations

from dataclasses import dataclass

from .signing import ALGORITHM, Keyring


@dataclass(frozen=True)
class CheckpointResult:
    ok: bool
    reason: str  # ok | unknown_key | bad_signature | head_mismatch | count_mismatch | unsupported_algorithm
    detail: str = ""


def checkpoint_fields(record: dict) -> dict:
    """The checkpoint payload of a decoded event record (``payload`` as a (name, value) tuple or a dict)."""
    payload = record.get("payload")
    if isinstance(payload, tuple):
        payload = payload[1]
    if payload is None and "checkpoint" in record:  # a warehouse row
        payload = record["checkpoint"]
    if not isinstance(payload, dict) or "head_seq" not in payload:
        raise ValueError("not a checkpoint event")
    return payload


def verify_checkpoint(record: dict, keyring: Keyring, head_seq: int, head_hash: str) -> CheckpointResult:
    """Check the checkpoint ``record`` against the chain head that precedes it (``head_seq``,
    ``head_hash`` as computed by the verifier from the events themselves)."""
    cp = checkpoint_fields(record)
    if cp.get("algorithm", ALGORITHM) != ALGORITHM:
        return CheckpointResult(False, "unsupported_algorithm", f"algorithm {cp.get('algorithm')!r}")
    if cp["key_id"] not in keyring:
        return CheckpointResult(False, "unknown_key", f"no public key with id {cp['key_id']} in the keyring")
    ok = keyring.verify_checkpoint(cp["key_id"], bytes(cp["signature"]), record["session_id"], cp["head_seq"],
                                   cp["head_hash"], cp["event_count"], bool(cp.get("final")))
    if not ok:
        return CheckpointResult(False, "bad_signature", "the signature does not match the checkpoint's fields")
    if cp["head_seq"] != head_seq or cp["head_hash"] != head_hash:
        return CheckpointResult(False, "head_mismatch",
                                f"signed head seq {cp['head_seq']} {cp['head_hash'][:12]}…, chain has seq {head_seq} "
                                f"{head_hash[:12]}…")
    if cp["event_count"] != head_seq + 1:
        return CheckpointResult(False, "count_mismatch", f"event_count {cp['event_count']} for head seq {head_seq}")
    return CheckpointResult(True, "ok")
