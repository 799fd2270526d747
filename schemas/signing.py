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
The key id is the first 16 hex characters of SHA-256 over the raw 32-byte public key. Every key
*file* passes `schemas.keys.check_key_path` first (not in a git work tree, not writable by others,
yours).

Simulator keys: the simulator signs with keys derived from its (public) seed, so anyone can sign
with them. Their public key files start with the line `SIMULATOR_MARKER` and live in a keyring of
their own (``$AGENTLEDGER_HOME/keys/simulator``). A `Keyring` never trusts them: a key file with the
marker, wherever it comes from (even ``--public-key``), and every key of ``simulator_paths``, is only
*recognised*, so that a checkpoint signed with it is reported as ``simulator_key`` -- which
``--require-signatures`` never accepts.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (fast-path imports)
if TYPE_CHECKING:
    from collections.abc import Mapping

    from .config import Settings

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import envvars
from .errors import ConfigError
from .homes import write_private_file
from .keys import check_key_path

ALGORITHM = "ed25519"
SIGNING_KEY_ENV = "AGENTLEDGER_SIGNING_KEY"
SIGNING_KEY_FILE_ENV = "AGENTLEDGER_SIGNING_KEY_FILE"
OPERATOR_KEY_ENV = "AGENTLEDGER_OPERATOR_KEY"
OPERATOR_KEY_FILE_ENV = "AGENTLEDGER_OPERATOR_KEY_FILE"
SIMULATOR_MARKER = b"# agentledger simulator key: derived from a public seed, anyone can sign with it; never trust it"


def checkpoint_message(session_id: str, head_seq: int, head_hash: str, event_count: int, final: bool) -> bytes:
    return (f"agentledger-checkpoint-v1\n{session_id}\n{head_seq}\n{head_hash}\n{event_count}\n"
            f"{1 if final else 0}").encode()


def tree_head_message(log_id: str, tree_size: int, root_hex: str, timestamp_ms: int) -> bytes:
    return f"agentledger-tree-head-v1\n{log_id}\n{int(tree_size)}\n{root_hex}\n{int(timestamp_ms)}".encode()


def bundle_header_message(session_id: str, first_seq: int, head_seq: int, head_hash: str, event_count: int,
                          final_checkpoint_seq: int | None, log_id: str, tree_size: int, root_hex: str,
                          coverage_digest: str | None = None) -> bytes:
    """What the log operator signs of a bundle's header. ``coverage_digest`` (SHA-256 hex of the
    header's ``agentledger.coverage`` bytes, issue 24): when the header has a coverage summary the
    message is v2 and ends with it, so the summary cannot be changed, added or removed unseen; headers
    without one keep the v1 message (older bundles verify as before)."""
    final = "none" if final_checkpoint_seq is None else str(int(final_checkpoint_seq))
    version = "v1" if coverage_digest is None else "v2"
    msg = (f"agentledger-bundle-header-{version}\n{session_id}\n{int(first_seq)}\n{int(head_seq)}\n{head_hash}\n"
           f"{int(event_count)}\n{final}\n{log_id}\n{int(tree_size)}\n{root_hex}")
    if coverage_digest is not None:
        msg += f"\n{coverage_digest}"
    return msg.encode()


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
    """Write <key_id>.key and <key_id>.pub (both mode 0600) into ``directory``."""
    priv = write_private_file(directory / f"{signer.key_id}.key", private_pem(signer), exclusive=True)
    pub = write_private_file(directory / f"{signer.key_id}.pub", public_pem(signer.public_key))
    return priv, pub


def write_simulator_key(public_key: Ed25519PublicKey, directory: Path, note: str = "") -> Path:
    """Write a simulator's public key, marked as such (`SIMULATOR_MARKER`), into ``directory``."""
    head = SIMULATOR_MARKER + (f" ({note})".encode() if note else b"") + b"\n"
    return write_private_file(directory / f"{key_id(public_key)}.pub", head + public_pem(public_key))


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


def is_simulator_key(data: bytes | str) -> bool:
    """Whether a public key file's bytes carry the simulator's marker line."""
    if isinstance(data, str):
        data = data.encode()
    return data.lstrip().startswith(SIMULATOR_MARKER)


def load_public(data: bytes | str) -> Ed25519PublicKey:
    if isinstance(data, str):
        data = data.encode()
    data = b"\n".join(line for line in data.strip().splitlines() if not line.startswith(b"#")).strip()
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


def signer_from_env(env: Mapping[str, str] | None = None) -> Signer | None:
    """The configured signing key, or None when checkpoints are not to be signed."""
    env = os.environ if env is None else env
    if key := envvars.raw(SIGNING_KEY_ENV, env):
        return load_private(key)
    if key_file := envvars.raw(SIGNING_KEY_FILE_ENV, env):
        return load_private_file(Path(key_file), f"signing key ({SIGNING_KEY_FILE_ENV})")
    return None


def load_private_file(path: Path, what: str = "signing key") -> Signer:
    """A private key from a file that passes `check_key_path` (else `UnsafeKeyError`)."""
    check_key_path(path, what=what, secret=True)
    try:
        return load_private(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc}") from exc


def operator_key_dir(home: Path) -> Path:
    """Where the log operator's key pair lives, and where verify looks for trusted operator keys."""
    return Path(home) / "keys" / "operator"


def load_operator_signer(settings: Settings, env: Mapping[str, str] | None = None, *, create: bool = False) -> Signer | None:
    """The log operator's key, which signs tree heads and bundle headers (never checkpoints).

    ``AGENTLEDGER_OPERATOR_KEY`` (PEM or base64 seed) or ``AGENTLEDGER_OPERATOR_KEY_FILE``; else the key
    named by ``$AGENTLEDGER_HOME/keys/operator/current``; else, with ``create``, a new key pair made there
    once (directory 0700, private key 0600) and marked current. The public key is kept next to it
    (``<key_id>.pub``), where `agentledger verify` trusts operator keys. None when there is none and
    ``create`` is false. This is the one place operator keys are loaded."""
    env = os.environ if env is None else env
    directory = operator_key_dir(settings.home)
    signer: Signer | None = None
    if key := envvars.raw(OPERATOR_KEY_ENV, env):
        signer = load_private(key)
    elif key_file := envvars.raw(OPERATOR_KEY_FILE_ENV, env):
        signer = load_private_file(Path(key_file), f"operator key ({OPERATOR_KEY_FILE_ENV})")
    if signer is None:
        signer = _current_operator_key(directory)
    if signer is None and create:
        signer = _create_operator_key(directory)
    if signer is not None and create:
        pub = directory / f"{signer.key_id}.pub"
        if not pub.exists():
            write_private_file(pub, public_pem(signer.public_key))
    return signer


def _current_operator_key(directory: Path) -> Signer | None:
    try:
        kid = (directory / "current").read_text().strip()
    except OSError:
        return None
    if len(kid) != 16 or any(c not in "0123456789abcdef" for c in kid):
        raise ConfigError(f"{directory / 'current'} does not name a key id (16 hex digits): {kid[:40]!r}")
    return load_private_file(directory / f"{kid}.key", f"operator key {kid} (named in {directory / 'current'})")


def _create_operator_key(directory: Path) -> Signer:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    signer = generate()
    write_keypair(signer, directory)
    try:  # linked into place: another process that made one first wins
        write_private_file(directory / "current", (signer.key_id + "\n").encode(), exclusive=True)
    except FileExistsError:
        for suffix in (".key", ".pub"):
            (directory / f"{signer.key_id}{suffix}").unlink(missing_ok=True)
        existing = _current_operator_key(directory)
        if existing is None:
            raise ConfigError(f"{directory / 'current'} names no readable operator key") from None
        signer = existing
    return signer


def _pub_files(p: Path, *, checked: bool) -> list[Path]:
    if checked:
        check_key_path(p, what="trusted public key directory" if p.is_dir() else "trusted public key")
    files = sorted(p.glob("*.pub")) if p.is_dir() else [p] if p.exists() else []
    if checked and p.is_dir():
        for f in files:
            check_key_path(f, what="trusted public key")
    return files


class Keyring:
    """Public keys by key id, for verification (a directory of *.pub files, plus explicit keys).

    Trusted keys verify checkpoints; simulator keys (see the module doc) are only recognised:
    `simulator_kid` says a key id is one, and `verify_simulator` checks a signature with it so that
    a report can say "signed by a simulator key" -- never "signed"."""

    def __init__(self, keys: list[Ed25519PublicKey] | None = None,
                 simulator: list[Ed25519PublicKey] | None = None):
        self._simulator = {key_id(k): k for k in simulator or []}
        self._keys = {key_id(k): k for k in keys or [] if key_id(k) not in self._simulator}

    @classmethod
    def from_paths(cls, *paths: Path, simulator_paths: tuple[Path, ...] | list[Path] = ()) -> "Keyring":
        """Trusted keys from ``paths`` (*.pub files, or directories of them), each checked by
        `check_key_path` (`UnsafeKeyError` when refused); a file carrying the simulator marker is
        recognised as a simulator key instead. ``simulator_paths``: simulator keyrings (never trusted,
        so not checked; a damaged file there is skipped)."""
        ring = cls()
        for p in paths:
            for f in _pub_files(Path(p), checked=True):
                data = f.read_bytes()
                ring.add(load_public(data), simulator=is_simulator_key(data))
        for p in simulator_paths:
            for f in _pub_files(Path(p), checked=False):
                try:
                    ring.add(load_public(f.read_bytes()), simulator=True)
                except ConfigError:
                    continue
        return ring

    def add(self, key: Ed25519PublicKey, *, simulator: bool = False) -> None:
        kid = key_id(key)
        if simulator:
            self._simulator[kid] = key
            self._keys.pop(kid, None)
        elif kid not in self._simulator:
            self._keys[kid] = key

    def pems(self) -> dict[str, bytes]:
        """Every key as a PEM file's bytes by key id (simulator keys with their marker), to embed in bundles."""
        out = {kid: public_pem(k) for kid, k in self._keys.items()}
        out.update({kid: SIMULATOR_MARKER + b"\n" + public_pem(k) for kid, k in self._simulator.items()})
        return out

    def __contains__(self, kid: str) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def simulator_kid(self, kid: str) -> bool:
        return kid in self._simulator

    def verify_simulator(self, kid: str, signature: bytes, message: bytes) -> bool:
        return _verify(self._simulator.get(kid), signature, message)

    def verify(self, kid: str, signature: bytes, message: bytes) -> bool:
        return _verify(self._keys.get(kid), signature, message)

    def verify_tree_head(self, kid: str, signature: bytes, log_id: str, tree_size: int, root_hex: str,
                         timestamp_ms: int) -> bool:
        return self.verify(kid, signature, tree_head_message(log_id, tree_size, root_hex, timestamp_ms))

    def verify_checkpoint(self, kid: str, signature: bytes, session_id: str, head_seq: int, head_hash: str,
                          event_count: int, final: bool) -> bool:
        return self.verify(kid, signature, checkpoint_message(session_id, head_seq, head_hash, event_count, final))


def home_keyring(home: Path, public_keys: list[Path] | tuple[Path, ...] = ()) -> Keyring:
    """The keys `verify`, `replay`, `export` and `verify-bundle` trust: ``public_keys`` (files or
    directories; each must exist) and ``home/keys/*.pub``, all checked by `check_key_path`; the home's
    simulator keyring ``home/keys/simulator`` is recognised, never trusted."""
    for p in public_keys:
        if not Path(p).exists():
            raise ConfigError(f"no public key at {p}")
    keys = Path(home) / "keys"
    return Keyring.from_paths(*public_keys, keys, simulator_paths=[keys / "simulator"])


def _verify(key: Ed25519PublicKey | None, signature: bytes, message: bytes) -> bool:
    if key is None:
        return False
    try:
        key.verify(signature, message)
        return True
    except InvalidSignature:
        return False
