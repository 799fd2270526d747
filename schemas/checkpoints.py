"""Checking a signed checkpoint against the chain it claims to cover (shared by verify, replay, bundles).

A checkpoint event (kind ``checkpoint``) at seq ``n`` states, signed with Ed25519: events
``0..head_seq`` of the session exist, event ``head_seq`` hashes to ``head_hash`` and there are
``event_count`` of them. The producer emits it right after the events it covers, so in an intact
chain ``head_seq == n - 1``. Verifying a checkpoint needs the chain head *as it was at that point*
(what a sequential `ChainVerifier` holds just before the checkpoint event), never the final head.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .signing import ALGORITHM, Keyring, checkpoint_message


@dataclass(frozen=True)
class CheckpointResult:
    """``status``: valid | unsigned | head_mismatch | count_mismatch | unsupported_algorithm |
    bad_signature | unknown_key (no trusted key with its id) | embedded_key_only (verifies only with
    a key that came with the evidence itself, which proves nothing until someone trusts it) |
    simulator_key (verifies with a simulator's seed-derived key, which anyone can sign with: it
    proves nothing, and ``--require-signatures`` never accepts it)."""

    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "valid"


def signature_bytes(v: Any) -> bytes:
    """A signature as stored: bytes, or hex / base64 text (a bundle header's list)."""
    if v is None:
        return b""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    s = str(v)
    try:
        return bytes.fromhex(s)
    except ValueError:
        return base64.b64decode(s)


def check_checkpoint(cp: dict[str, Any], seq: int, session_id: str, hash_at: Callable[[int], str | None], keyring: Keyring,
                     embedded: Keyring | None = None) -> CheckpointResult:
    """The one check of a checkpoint (payload ``cp``, recorded at ``seq``) against its chain, used by
    `agentledger verify`, replay and bundle verification alike. ``hash_at(s)``: the verified hash of
    event ``s`` of the chain (None when the chain holds no such verified event). The head it claims
    must be an earlier event with that hash and the count must match; then the signature, with a
    trusted key (``keyring``) or, failing that, a key the evidence brought along (``embedded``)."""
    head_seq, head_hash, count = int(cp["head_seq"]), cp["head_hash"], int(cp["event_count"])
    actual = hash_at(head_seq) if 0 <= head_seq < seq else None
    if actual is None:
        return CheckpointResult("head_mismatch", f"the checkpoint at seq {seq} claims head_seq {head_seq}, which is not "
                                                 "an earlier verified event of the chain")
    if actual != head_hash:
        return CheckpointResult("head_mismatch", f"the checkpoint at seq {seq}: head_hash is not the hash of seq {head_seq}")
    if count != head_seq + 1:
        return CheckpointResult("count_mismatch", f"the checkpoint at seq {seq}: event_count {count} is not head_seq + 1 "
                                                  f"= {head_seq + 1}")
    sig = signature_bytes(cp.get("signature"))
    if not sig:
        return CheckpointResult("unsigned", f"the checkpoint at seq {seq} carries no signature")
    if (cp.get("algorithm") or ALGORITHM) != ALGORITHM:
        return CheckpointResult("unsupported_algorithm", f"the checkpoint at seq {seq} uses algorithm "
                                                         f"{cp.get('algorithm')!r}")
    kid = cp.get("key_id") or ""
    args = (kid, sig, session_id, head_seq, head_hash, count, bool(cp.get("final")))
    for ring in (keyring, None if kid in keyring else embedded):  # (a bundle cannot demote a trusted key)
        if ring is not None and ring.simulator_kid(kid):
            if ring.verify_simulator(kid, sig, checkpoint_message(*args[2:])):
                return CheckpointResult("simulator_key", f"the checkpoint at seq {seq} is signed with the simulator key "
                                                         f"{kid}, derived from a public seed: anyone can sign with it")
            return CheckpointResult("bad_signature", f"the signature of the checkpoint at seq {seq} does not verify "
                                                     f"with the simulator key {kid}")
    if kid in keyring:
        if keyring.verify_checkpoint(*args):
            return CheckpointResult("valid")
        return CheckpointResult("bad_signature", f"the signature of the checkpoint at seq {seq} does not verify with "
                                                 f"key {kid}")
    if embedded is not None and kid in embedded:
        if embedded.verify_checkpoint(*args):
            return CheckpointResult("embedded_key_only", "verifies with the public key embedded in the bundle, which "
                                                         "is not trusted: pass --public-key to trust it")
        return CheckpointResult("bad_signature", f"the signature of the checkpoint at seq {seq} does not verify with "
                                                 f"the embedded key {kid}")
    return CheckpointResult("unknown_key", f"no trusted public key with id {kid}")


def checkpoint_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint payload of a decoded event record (``payload`` as a (name, value) tuple or a dict)."""
    payload = record.get("payload")
    if isinstance(payload, tuple):
        payload = payload[1]
    if payload is None and "checkpoint" in record:  # a warehouse row
        payload = record["checkpoint"]
    if not isinstance(payload, dict) or "head_seq" not in payload:
        raise ValueError("not a checkpoint event")
    return payload


def verify_checkpoint(record: dict[str, Any], keyring: Keyring, head_seq: int, head_hash: str) -> CheckpointResult:
    """`check_checkpoint` for a decoded checkpoint event ``record``, given the chain head that
    precedes it (``head_seq``, ``head_hash`` as a sequential verifier holds them just before it)."""
    return check_checkpoint(checkpoint_fields(record), int(record["seq"]), record["session_id"],
                            lambda s: head_hash if s == head_seq else None, keyring)
