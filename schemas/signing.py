"""Ed25519 signatures for checkpoints (shared by the recorder, verify, replay and bundles).

A checkpoint states "events 0..head_seq of this session exist and event head_seq hashes to
head_hash". The signed message is fixed here and must never change for a given algorithm name:

    agentledger-checkpoint-v1\\n<session_id>\\n<head_seq>\\n<head_hash>\\n<event_count>\\n<final 0|1>

The log operator (the ingest side, see schemas/treelog.py) signs two more messages with its own key,
never a producer's: a tree head of the warehouse's Merkle tree, and the header of an evidence bundle:

    agentledger-tree-head-v1\\n<log_id>\\n<tree_size>\\n<root_hex>\\n<timestamp_ms>
    agentledger-bundle-header-v1\\n<session_id>\\n<first_seq>\\n<head_seq>\\n<head_hash>\\n<event_count>
        \\n<final_checkpoint_seq|none>\\n<log_id>\\n<tree_size>\\n<root_hex>

Each message starts with its own name, so a signature over one can never pass for another.

Keys: a private key is a PKCS#8 PEM file or the environment variable AGENTLEDGER_SIGNING_KEY
(PEM text, or the raw 32-byte seed in base64). A public key is a SubjectPublicKeyInfo PEM file.
The key id is the first 16 hex characters of SHA-256 over the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigError

ALGORITHM = "ed25519"
SIGNING_KEY_ENV = "AGENTLEDGER_SIGNING_KEY"
SIGNING_KEY_FILE_ENV = "AGENTLEDGER_SIGNING_KEY_FILE"
OPERATOR_KEY_ENV = "AGENTLEDGER_OPERATOR_KEY"
OPERATOR_KEY_FILE_ENV = "AGENTLEDGER_OPERATOR_KEY_FILE"


def checkpoint_message(session_id: str, head_seq: int, head_hash: str, event_count: int, final: bool) -> bytes:
    return (f"agentledger-checkpoint-v1\n{session_id}\n{head_seq}\n{head_hash}\n{event_count}\n"
            f"{1 if final else 0}").encode()


def tree_head_message(log_id: str, tree_size: int, root_hex: str, timestamp_ms: int) -> bytes:
    return f"agentledger-tree-head-v1\n{log_id}\n{int(tree_size)}\n{root_hex}\n{int(timestamp_ms)}".encode()


def bundle_header_message(session_id: str, first_seq: int, head_seq: int, head_hash: str, event_count: int,
                          final_checkpoint_seq: int | None, log_id: str, tree_size: int, root_hex: str) -> bytes:
    final = "none" if final_checkpoint_seq is None else str(int(final_checkpoint_seq))
    return (f"agentledger-bundle-header-v1\n{session_id}\n{int(first_seq)}\n{int(head_seq)}\n{head_hash}\n"
            f"{int(event_count)}\n{final}\n{log_id}\n{int(tree_size)}\n{root_hex}").encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def sign_checkpoint(self, session_id: str, head_seq: int, head_hash: str, event_count: int, final: bool) -> bytes:
        return self.sign(checkpoint_message(session_id, head_seq, head_hash, event_count, final))


def generate() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


def private_pem(signer: Signer) -> bytes:
    return signer.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_keypair(signer: Signer, directory: Path) -> tuple[Path, Path]:
    """Write <key_id>.key (mode 0600) and <key_id>.pub into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    priv = directory / f"{signer.key_id}.key"
    pub = directory / f"{signer.key_id}.pub"
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem(signer))
    pub.write_bytes(public_pem(signer.public_key))
    return priv, pub


def load_private(data: bytes | str) -> Signer:
    if isinstance(data, str):
        data = data.encode()
    data = data.strip()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(data))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not an Ed25519 private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("the signing key must be an Ed25519 key")
    return Signer(key)


def load_public(data: bytes | str) -> Ed25519PublicKey:
    if isinstance(data, str):
        data = data.encode()
    data = data.strip()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(data))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not an Ed25519 public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError("the public key must be an Ed25519 key")
    return key


def signer_from_env(env: dict[str, str] | None = None) -> Signer | None:
    """The configured signing key, or None when checkpoints are not to be signed."""
    env = os.environ if env is None else env
    if env.get(SIGNING_KEY_ENV):
        return load_private(env[SIGNING_KEY_ENV])
    if env.get(SIGNING_KEY_FILE_ENV):
        try:
            return load_private(Path(env[SIGNING_KEY_FILE_ENV]).read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read signing key: {exc}") from exc
    return None


def operator_key_dir(home: Path) -> Path:
    """Where the log operator's key pair lives, and where verify looks for trusted operator keys."""
    return Path(home) / "keys" / "operator"


def load_operator_signer(settings, env: dict[str, str] | None = None, *, create: bool = False) -> Signer | None:
    """The log operator's key, which signs tree heads and bundle headers (never checkpoints).

    ``AGENTLEDGER_OPERATOR_KEY`` (PEM or base64 seed) or ``AGENTLEDGER_OPERATOR_KEY_FILE``; else the key
    named by ``$AGENTLEDGER_HOME/keys/operator/current``; else, with ``create``, a new key pair made there
    once (directory 0700, private key 0600) and marked current. The public key is kept next to it
    (``<key_id>.pub``), where `agentledger verify` trusts operator keys. None when there is none and
    ``create`` is false. This is the one place operator keys are loaded."""
    env = os.environ if env is None else env
    directory = operator_key_dir(settings.home)
    signer: Signer | None = None
    if env.get(OPERATOR_KEY_ENV):
        signer = load_private(env[OPERATOR_KEY_ENV])
    elif env.get(OPERATOR_KEY_FILE_ENV):
        try:
            signer = load_private(Path(env[OPERATOR_KEY_FILE_ENV]).read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read the operator key: {exc}") from exc
    if signer is None:
        signer = _current_operator_key(directory)
    if signer is None and create:
        signer = _create_operator_key(directory)
    if signer is not None and create:
        pub = directory / f"{signer.key_id}.pub"
        if not pub.exists():
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            pub.write_bytes(public_pem(signer.public_key))
    return signer


def _current_operator_key(directory: Path) -> Signer | None:
    try:
        kid = (directory / "current").read_text().strip()
    except OSError:
        return None
    try:
        return load_private((directory / f"{kid}.key").read_bytes())
    except OSError as exc:
        raise ConfigError(f"operator key {kid} named in {directory / 'current'} is unreadable: {exc}") from exc


def _create_operator_key(directory: Path) -> Signer:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    signer = generate()
    write_keypair(signer, directory)
    tmp = directory / f".current.{os.getpid()}.{signer.key_id}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(signer.key_id + "\n")
    try:
        os.link(tmp, directory / "current")  # atomic: another process that made one first wins
    except FileExistsError:
        for suffix in (".key", ".pub"):
            (directory / f"{signer.key_id}{suffix}").unlink(missing_ok=True)
        existing = _current_operator_key(directory)
        if existing is None:
            raise ConfigError(f"{directory / 'current'} names no readable operator key") from None
        signer = existing
    finally:
        tmp.unlink(missing_ok=True)
    return signer


class Keyring:
    """Public keys by key id, for verification (a directory of *.pub files, plus explicit keys)."""

    def __init__(self, keys: list[Ed25519PublicKey] | None = None):
        self._keys = {key_id(k): k for k in keys or []}

    @classmethod
    def from_paths(cls, *paths: Path) -> "Keyring":
        keys = []
        for p in paths:
            p = Path(p)
            files = sorted(p.glob("*.pub")) if p.is_dir() else [p] if p.exists() else []
            keys.extend(load_public(f.read_bytes()) for f in files)
        return cls(keys)

    def add(self, key: Ed25519PublicKey) -> None:
        self._keys[key_id(key)] = key

    def __contains__(self, kid: str) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, kid: str, signature: bytes, message: bytes) -> bool:
        key = self._keys.get(kid)
        if key is None:
            return False
        try:
            key.verify(signature, message)
            return True
        except InvalidSignature:
            return False

    def verify_tree_head(self, kid: str, signature: bytes, log_id: str, tree_size: int, root_hex: str,
                         timestamp_ms: int) -> bool:
        return self.verify(kid, signature, tree_head_message(log_id, tree_size, root_hex, timestamp_ms))

    def verify_checkpoint(self, kid: str, signature: bytes, session_id: str, head_seq: int, head_hash: str,
                          event_count: int, final: bool) -> bool:
        return self.verify(kid, signature, checkpoint_message(session_id, head_seq, head_hash, event_count, final))
