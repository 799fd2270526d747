"""doctor: what this machine has for agentledger, what is missing, and the command that fixes each.

Required (``ok`` says whether they are all there): the DuckDB extension wheels, Kafka when it is
configured, and any key that is configured (a configured key that is refused would leave sessions
unsigned). Optional unless named in ``require``: the native bundle decoder, the recording sandbox's
tools, a signing key of your own, the Python extras of the notebooks.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from agentledger.invocation import clone_root, prog, short_path
from agentledger.schemas import envvars
from agentledger.schemas.config import Settings

from .sandbox import sandbox_doctor

AREAS = ("sandbox", "native", "signing", "ml", "notebooks")  # what ``require`` may name
# The duckdb-extension-* wheels pyproject.toml declares (tests/test_doctor.py holds this to it).
EXTENSIONS = ("avro", "ducklake", "sqlite_scanner")
# Python extras: the distributions each declares, by the module that imports them (tests hold it to pyproject.toml).
EXTRAS: dict[str, dict[str, str]] = {
    "ml": {"scikit-learn": "sklearn", "matplotlib": "matplotlib"},
    "notebooks": {"jupyterlab": "jupyterlab", "ipykernel": "ipykernel", "nbclient": "nbclient"},
}
# Debian packages of the sandbox's tools, by the check's name (agentledger sandbox doctor).
APT = {"bwrap": "bubblewrap", "strace": "strace", "faketime": "faketime"}


@dataclass
class Check:
    area: str
    check: str
    ok: bool
    required: bool
    detail: str
    fix: str = ""


def _install_extra(extra: str) -> str:
    """The command that installs an extra: the clone's bootstrap script, or pip for an installed package."""
    root = clone_root()
    if root is not None:
        return f"{short_path(str(root / 'scripts' / 'bootstrap'))} {extra}"
    return f"{short_path(sys.executable)} -m pip install 'agentledger[{extra}]'"


def _sudo() -> str:
    return "" if os.geteuid() == 0 else "sudo "


def check_extensions() -> list[Check]:
    import duckdb

    from agentledger.schemas.errors import WarehouseError
    from agentledger.schemas.warehouse import extension_path, load_extension

    out = []
    for name in EXTENSIONS:
        dist = f"duckdb-extension-{name.replace('_', '-')}"
        fix = f"{short_path(sys.executable)} -m pip install '{dist}=={duckdb.__version__}'"
        try:
            path = extension_path(name)
            con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                                     "autoload_known_extensions": False})
            try:
                load_extension(con, name)
            finally:
                con.close()
        except (WarehouseError, duckdb.Error) as exc:
            out.append(Check("duckdb", name, False, True, str(exc).strip().splitlines()[0], fix))
        else:
            out.append(Check("duckdb", name, True, True, f"{dist} loads ({path.parent.name})"))
    return out


def check_kafka(s: Settings) -> list[Check]:
    if not s.uses_kafka:
        return [Check("kafka", "bootstrap", True, False, "not configured: the embedded local log is the transport "
                                                         f"({s.log_dir})")]
    from agentledger.schemas.errors import TransportError
    from agentledger.schemas.transport import kafka_source

    try:
        src = kafka_source(s.bootstrap_servers, client_id="agentledger-doctor", request_timeout_ms=6_000)
        try:
            parts = len(src.partitions(s.topic))
        finally:
            src.close()
    except TransportError as exc:
        return [Check("kafka", "bootstrap", False, True, str(exc),
                      "start the broker (from a clone: scripts/kafka start), or unset AGENTLEDGER_BOOTSTRAP_SERVERS "
                      "to record to the embedded log")]
    topic = (f"topic {s.topic}: {parts} partitions" if parts else f"topic {s.topic} does not exist yet (the first "
             "producer creates it)")
    return [Check("kafka", "bootstrap", True, True, f"{s.bootstrap_servers} answered; {topic}")]


def check_native(required: bool) -> list[Check]:
    from agentledger.replay.native import ENV, decoder

    found = decoder()
    if found is not None:
        return [Check("native", "agentledger-avro2arrow", True, required, str(found))]
    if (envvars.raw(ENV) or "").strip().lower() in ("off", "0", "none"):
        return [Check("native", "agentledger-avro2arrow", False, required,
                      f"turned off ({ENV}={envvars.raw(ENV)}): replay decodes big bundles with DuckDB (slower)",
                      f"unset {ENV}")]
    root = clone_root()
    if root is None:
        fix = "build native/avro2arrow of the source clone with cargo (docs/replay.md)"
    else:
        fix = f"AGENTLEDGER_NATIVE=require {short_path(str(root / 'scripts' / 'bootstrap'))}"
        if not _has_cargo():
            fix = "install Rust's cargo (rustup), then " + fix
    where = f" ({ENV}={envvars.raw(ENV)} is not an executable file)" if envvars.raw(ENV) else ""
    return [Check("native", "agentledger-avro2arrow", False, required,
                  f"missing{where}: replay decodes big bundles with DuckDB's reader (slower, never different)", fix)]


def _has_cargo() -> bool:
    import shutil

    return bool(shutil.which("cargo")) or (Path.home() / ".cargo" / "bin" / "cargo").is_file()


def check_sandbox(required: bool) -> list[Check]:
    out = []
    for c in sandbox_doctor():
        fix = ""
        if not c["ok"] and c["check"] in APT:
            fix = f"{_sudo()}apt-get install -y {APT[c['check']]}"
        elif not c["ok"]:
            fix = "see docs/sandbox.md (unprivileged user namespaces, ptrace)"
        out.append(Check("sandbox", c["check"], c["ok"], required and c["required"], c["detail"], fix))
    return out


def _load_key(name: str, load, config_fix: str):
    """(the key or None, None) -- or (None, the failed check) when the configured key is refused."""
    from agentledger.schemas.errors import ConfigError
    from agentledger.schemas.keys import UnsafeKeyError

    try:
        return load(), None
    except UnsafeKeyError as exc:
        return None, Check("signing", name, False, True, f"refused: {exc.reason} ({exc.path})", exc.fix)
    except ConfigError as exc:
        return None, Check("signing", name, False, True, str(exc), config_fix)


def check_keys(s: Settings, require_signing: bool) -> list[Check]:
    from agentledger.producers.recorder import load_signer
    from agentledger.schemas.signing import load_operator_signer

    configured = bool(envvars.raw("AGENTLEDGER_SIGNING_KEY") or envvars.raw("AGENTLEDGER_SIGNING_KEY_FILE")
                      or (s.home / "keys" / "current").exists())
    signer, key_check = _load_key("signing key", lambda: load_signer(s),
                                  f"{prog()} keys generate   # a new key, marked current")
    if key_check is None and signer is not None:
        key_check = Check("signing", "signing key", True, True, f"key {signer.key_id}: checkpoints are signed")
    elif key_check is None:
        key_check = Check("signing", "signing key", False, require_signing or configured,
                          "none: checkpoints are unsigned (verify --require-signatures refuses them)",
                          f"{prog()} keys generate")
    op, op_check = _load_key("operator key", lambda: load_operator_signer(s),
                             f"fix or remove {s.home / 'keys' / 'operator' / 'current'}")
    if op_check is None:
        op_check = Check("signing", "operator key", True, True,
                         f"key {op.key_id}: signs tree heads and bundle headers" if op is not None else
                         "none yet: the first ingest creates it")
    return [key_check, op_check]


def check_extras(required: set[str]) -> list[Check]:
    import importlib.util

    out = []
    for extra, dists in EXTRAS.items():
        missing = [d for d, mod in dists.items() if importlib.util.find_spec(mod) is None]
        fix = _install_extra(extra) if missing else ""
        need = extra in required
        out.append(Check("python", f"extra {extra}", not missing, need,
                         f"missing: {', '.join(missing)}" if missing else ", ".join(dists), fix))
    return out


def run_checks(s: Settings, require: set[str]) -> list[Check]:
    return [*check_extensions(), *check_kafka(s), *check_keys(s, "signing" in require),
            *check_native("native" in require), *check_sandbox("sandbox" in require), *check_extras(require)]


@dataclass
class Doctor:
    """Every check; ``ok``: nothing required is missing."""

    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok or not c.required for c in self.checks)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


def doctor(s: Settings, require: set[str] | frozenset[str] = frozenset()) -> Doctor:
    """Check what this machine has for agentledger (see the module doc); ``require``: also require
    these of `AREAS`."""
    unknown = set(require) - set(AREAS)
    if unknown:
        raise ValueError(f"doctor can require {', '.join(AREAS)}, not {', '.join(sorted(unknown))}")
    return Doctor(run_checks(s, set(require)))
