"""Every ``AGENTLEDGER_*`` environment variable, declared once: name, type, default, meaning, reader.

Code reads the environment only through `get` / `raw` (an undeclared name is a KeyError, so a new
variable cannot be read before it is declared here). The README's configuration tables are made
from `VARIABLES` (`agentledger config --markdown`, checked by tests/test_config.py), and
`agentledger config` shows the effective value of each and where it came from, secrets masked.

Types: ``str``, ``path``, ``int``, ``float``, ``bool`` (1/true/yes/on or 0/false/no/off), ``size``
(bytes: ``512M``, ``2G``), ``choice``. An empty value counts as unset. A value that does not parse
is a `ConfigError` naming the variable.

Sections: ``main`` ... ``sandbox`` are what users set; ``dev`` are read by scripts/, tests/ and
bench/ only; ``set`` are variables agentledger sets for a command it runs (never read).

This module imports only ``os``: the hook's fast path reads its settings through it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (fast-path imports)
if TYPE_CHECKING:
    from collections.abc import Collection, Mapping
    from typing import Any

from .errors import ConfigError

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")

SECTIONS = {
    "main": "Where things are",
    "kafka": "Kafka security (real clusters)",
    "lake": "DuckLake data on S3 (docs/scale.md)",
    "producers": "Producers and the hook",
    "keys": "Keys",
    "detection": "Detection and replay",
    "sandbox": "Recording sandbox",
    "dev": "Development (scripts/, tests/, bench/)",
    "set": "Set by agentledger for the commands it runs",
}


class Var:
    __slots__ = ("name", "type", "default", "default_doc", "doc", "reader", "section", "secret", "choices")

    def __init__(self, name: str, type: str, default: Any, default_doc: str, doc: str, reader: str, section: str,
                 secret: bool = False, choices: tuple[str, ...] = ()):
        assert name.startswith("AGENTLEDGER_") and section in SECTIONS
        self.name, self.type, self.default, self.default_doc = name, type, default, default_doc
        self.doc, self.reader, self.section, self.secret, self.choices = doc, reader, section, secret, choices

    def parse(self, text: str) -> Any:
        """The typed value of ``text`` (not empty)."""
        t = self.type
        try:
            if t == "int":
                return int(text)
            if t == "float":
                return float(text)
            if t == "size":
                return parse_size(text)
        except ValueError:
            raise ConfigError(f"{self.name} must be {'a number' if t != 'size' else 'a size (e.g. 512M, 2G)'}, "
                              f"not {text!r}") from None
        if t == "bool":
            v = text.strip().lower()
            if v in ON or v in OFF:
                return v in ON
            raise ConfigError(f"{self.name} must be one of {'/'.join(ON + OFF)}, not {text!r}")
        if t == "choice":
            v = text.strip().lower().replace("-", "_")
            if v not in self.choices:
                raise ConfigError(f"{self.name} must be one of {', '.join(self.choices)}, not {text!r}")
            return v
        return text


def parse_size(text: str) -> int:
    """Bytes from ``512M``, ``2G``, ``1.5GiB``, ``4096``."""
    t = text.strip().upper()
    mult = 1
    for suffix, m in (("KIB", 1 << 10), ("MIB", 1 << 20), ("GIB", 1 << 30), ("K", 1 << 10), ("M", 1 << 20),
                      ("G", 1 << 30), ("B", 1)):
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], m
            break
    try:
        return int(float(t) * mult)
    except ValueError:
        raise ConfigError(f"not a size: {text.strip()!r} (e.g. 512M, 2G)") from None


_V = Var
VARIABLES: tuple[Var, ...] = (
    # -- where things are ------------------------------------------------------------------------
    _V("AGENTLEDGER_HOME", "path", None, "`$XDG_DATA_HOME/agentledger`, else `~/.local/share/agentledger`",
       "local state: embedded log, spool, keys, warehouse (private: 0700/0600); also `--home`",
       "schemas/homes.py", "main"),
    _V("AGENTLEDGER_BOOTSTRAP_SERVERS", "str", None, "unset (embedded log)",
       "when set, Kafka is the transport; also `--bootstrap-servers`", "schemas/config.py", "main"),
    _V("AGENTLEDGER_WAREHOUSE", "str", None, "`$AGENTLEDGER_HOME/warehouse.duckdb`",
       "DuckDB file, or `ducklake:<catalog>` ([docs/warehouse.md](docs/warehouse.md)); also `--warehouse`",
       "schemas/config.py", "main"),
    _V("AGENTLEDGER_LAKE_DATA_PATH", "str", None, "`<catalog file>.files/`",
       "DuckLake data (Parquet) directory or URL; required with a Postgres catalog", "schemas/config.py", "main"),
    _V("AGENTLEDGER_TOPIC", "str", "agentledger.events", "`agentledger.events`", "events topic; also `--topic`",
       "schemas/config.py", "main"),
    _V("AGENTLEDGER_ALERTS_TOPIC", "str", "agentledger.alerts", "`agentledger.alerts`", "alerts topic (Kafka)",
       "schemas/config.py", "main"),
    _V("AGENTLEDGER_PARTITIONS", "int", 6, "`6`", "partitions of the topics agentledger creates",
       "schemas/config.py", "main"),
    _V("AGENTLEDGER_DUCKDB_THREADS", "int", None, "all cores",
       "DuckDB worker threads per warehouse connection (fewer on a machine shared with other jobs)",
       "schemas/warehouse.py", "main"),
    _V("AGENTLEDGER_SCHEMA_PATH", "str", None, "none",
       "more writer schema directories (`:`-separated) the decoder knows", "schemas/contract.py", "main"),
    # -- Kafka security ----------------------------------------------------------------------------
    _V("AGENTLEDGER_KAFKA_SECURITY_PROTOCOL", "choice", None, "`PLAINTEXT`",
       "`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`, for every Kafka client",
       "schemas/transport/kafka/clients.py", "kafka", choices=("plaintext", "ssl", "sasl_plaintext", "sasl_ssl")),
    _V("AGENTLEDGER_KAFKA_SASL_MECHANISM", "choice", None, "`PLAIN` (with a SASL protocol)",
       "`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`", "schemas/transport/kafka/clients.py", "kafka",
       choices=("plain", "scram_sha_256", "scram_sha_512")),
    _V("AGENTLEDGER_KAFKA_SASL_USERNAME", "str", None, "none", "SASL user name", "schemas/transport/kafka/clients.py",
       "kafka"),
    _V("AGENTLEDGER_KAFKA_SASL_PASSWORD", "str", None, "none", "SASL password (shown masked)",
       "schemas/transport/kafka/clients.py", "kafka", secret=True),
    _V("AGENTLEDGER_KAFKA_SSL_CAFILE", "path", None, "the system's CAs",
       "PEM file of the CAs that sign the brokers' certificates", "schemas/transport/kafka/clients.py", "kafka"),
    _V("AGENTLEDGER_KAFKA_SSL_CERTFILE", "path", None, "none", "PEM client certificate (mutual TLS)",
       "schemas/transport/kafka/clients.py", "kafka"),
    _V("AGENTLEDGER_KAFKA_SSL_KEYFILE", "path", None, "none", "PEM private key of the client certificate",
       "schemas/transport/kafka/clients.py", "kafka"),
    # -- DuckLake data on S3 ---------------------------------------------------------------------------
    _V("AGENTLEDGER_S3_ENDPOINT", "str", None, "AWS S3",
       "`host:port` of an S3-compatible store (MinIO, Ceph, S3Proxy) for an `s3://` data path",
       "schemas/warehouse.py", "lake"),
    _V("AGENTLEDGER_S3_REGION", "str", None, "`us-east-1`", "S3 region", "schemas/warehouse.py", "lake"),
    _V("AGENTLEDGER_S3_ACCESS_KEY_ID", "str", None, "the AWS credential chain (environment, config files, instance role)",
       "S3 access key id", "schemas/warehouse.py", "lake"),
    _V("AGENTLEDGER_S3_SECRET_ACCESS_KEY", "str", None, "none", "S3 secret access key (shown masked, never logged)",
       "schemas/warehouse.py", "lake", secret=True),
    _V("AGENTLEDGER_S3_URL_STYLE", "choice", "vhost", "`vhost`", "`vhost` (AWS) or `path` (most self-hosted stores)",
       "schemas/warehouse.py", "lake", choices=("vhost", "path")),
    _V("AGENTLEDGER_S3_USE_SSL", "bool", True, "`true`", "HTTPS to the S3 endpoint (`false` only on a trusted network)",
       "schemas/warehouse.py", "lake"),
    # -- producers and the hook ----------------------------------------------------------------------
    _V("AGENTLEDGER_RECORDING_MODE", "choice", "spool", "`spool`",
       "`spool` (never block or fail the agent) or `fail_closed` (refuse actions that cannot be recorded)",
       "producers/sinks.py", "producers", choices=("spool", "fail_closed")),
    _V("AGENTLEDGER_MAX_BLOCK_MS", "int", 500, "`500`", "longest a producer may block on one event",
       "producers/sinks.py", "producers"),
    _V("AGENTLEDGER_FLUSH_TIMEOUT_MS", "int", 5000, "`5000`",
       "how long a flush waits for Kafka before spooling the rest", "producers/sinks.py", "producers"),
    _V("AGENTLEDGER_SPOOL_DIR", "path", None, "`$AGENTLEDGER_HOME/spool`",
       "where events wait while Kafka is down", "producers/sinks.py", "producers"),
    _V("AGENTLEDGER_SPOOL_MAX_BYTES", "size", 1 << 30, "`1G`",
       "bound on events spooled while Kafka is down (`512M`, `2G`)", "producers/sinks.py", "producers"),
    _V("AGENTLEDGER_KAFKA_PROCESS", "bool", False, "`0`",
       "`1`: bulk producers (simulator, importers) run the Kafka client in a child process",
       "producers/sinks.py", "producers"),
    _V("AGENTLEDGER_CHECKPOINT_EVERY", "int", 1000, "`1000`",
       "a signed checkpoint every N events of a session (and at its end)", "producers/recorder.py", "producers"),
    _V("AGENTLEDGER_POLICY", "path", None, "unset (record only)",
       "policy file whose denials `agentledger hook` answers", "agentledger/hookmain.py", "producers"),
    _V("AGENTLEDGER_HOOK_DAEMON", "bool", True, "`1`",
       "`0`: every hook call does its work in-process (no warm hook server)", "agentledger/hookmain.py",
       "producers"),
    _V("AGENTLEDGER_HOOK_DAEMON_IDLE", "float", 900.0, "`900`",
       "seconds the warm hook server waits for a call before it exits", "producers/hookd.py", "producers"),
    _V("AGENTLEDGER_REDACTION", "bool", True, "`on`",
       "`off` records secrets in clear: only for tests of raw data, never elsewhere", "producers/redact.py",
       "producers"),
    # -- keys ------------------------------------------------------------------------------------------
    _V("AGENTLEDGER_SIGNING_KEY", "str", None, "none: unsigned",
       "Ed25519 key signing checkpoints, PEM or base64 seed (else `$AGENTLEDGER_HOME/keys/current`)",
       "schemas/signing.py", "keys", secret=True),
    _V("AGENTLEDGER_SIGNING_KEY_FILE", "path", None, "none",
       "file of the signing key; key files are refused in a git work tree, when writable by others or not "
       "yours ([docs/keys.md](docs/keys.md))", "schemas/signing.py", "keys"),
    _V("AGENTLEDGER_OPERATOR_KEY", "str", None, "generated",
       "the log operator's Ed25519 key, signing tree heads and bundle headers (else "
       "`$AGENTLEDGER_HOME/keys/operator/current`, created on first ingest)", "schemas/signing.py", "keys",
       secret=True),
    _V("AGENTLEDGER_OPERATOR_KEY_FILE", "path", None, "none", "file of the operator key; checked as above",
       "schemas/signing.py", "keys"),
    _V("AGENTLEDGER_REDACTION_KEY", "str", None, "generated",
       "HMAC key of secret tokens (else `$AGENTLEDGER_HOME/keys/redaction.key`, created once, 0600)",
       "producers/redact.py", "keys", secret=True),
    _V("AGENTLEDGER_REDACTION_KEY_FILE", "path", None, "none", "file of the redaction key; checked as above",
       "producers/redact.py", "keys"),
    _V("AGENTLEDGER_TREE_HEAD_EVERY_S", "float", 1.0, "`1`",
       "with `ingest --follow`: at most one signed tree head per this many seconds (and one at the end)",
       "schemas/treelog.py", "keys"),
    # -- detection and replay ----------------------------------------------------------------------------
    _V("AGENTLEDGER_RULES_DIR", "str", None, "none", "more detection rules (`:`-separated directories)",
       "consumers/detect/rules.py", "detection"),
    _V("AGENTLEDGER_MODEL", "str", None, "the warehouse's own model (`agentledger model train`), else the shipped `isoforest-v1`",
       "anomaly model artifact (`none`: rules only)", "agentledger/api/models.py", "detection"),
    _V("AGENTLEDGER_AVRO2ARROW", "str", None, "`.venv/bin/agentledger-avro2arrow` when built",
       "the native decoder (native/avro2arrow) replay uses for big bundles and ingest for batches of 2,000+ messages (a path, or `off`)", "schemas/native.py",
       "detection"),
    _V("AGENTLEDGER_AVRO2ARROW_TIMINGS", "bool", False, "unset",
       "when set, the native decoder prints its phase timings on stderr", "native/avro2arrow", "detection"),
    # -- recording sandbox ---------------------------------------------------------------------------------
    _V("AGENTLEDGER_SANDBOX_POLICY", "path", None, "built in (no network, read-only outside the work dir)",
       "policy of `agentledger sandbox run`; also `--policy`", "producers/sandbox/session.py", "sandbox"),
    _V("AGENTLEDGER_CAS_MAX_BLOB_BYTES", "int", 16 << 20, "`16777216` (16 MiB)",
       "largest file `sandbox run` keeps for re-execution; also `--cas-max-blob`", "producers/sandbox/cas.py",
       "sandbox"),
    _V("AGENTLEDGER_CAS_MAX_BYTES", "int", 2 << 30, "`2147483648` (2 GiB)",
       "bound on the re-execution store; also `--cas-max-bytes`", "producers/sandbox/cas.py", "sandbox"),
    _V("AGENTLEDGER_BWRAP", "path", None, "`bwrap` on PATH", "bubblewrap binary", "producers/sandbox/runner.py",
       "sandbox"),
    _V("AGENTLEDGER_STRACE", "path", None, "`strace` on PATH", "strace binary", "producers/sandbox/runner.py",
       "sandbox"),
    _V("AGENTLEDGER_FAKETIME_LIB", "path", None, "found in the usual libfaketime places",
       "libfaketime library re-execution preloads", "producers/sandbox/runner.py", "sandbox"),
    # -- set by agentledger ------------------------------------------------------------------------------
    _V("AGENTLEDGER_SANDBOX", "str", None, "set", "`bwrap` or `none`: tells a command run by `sandbox run` how "
       "it is confined", "producers/sandbox/runner.py", "set"),
    # -- development -----------------------------------------------------------------------------------
    _V("AGENTLEDGER_NATIVE", "str", "auto", "`auto`",
       "`auto` (build the native decoder when cargo is present), `require` or `off`", "scripts/bootstrap", "dev"),
    _V("AGENTLEDGER_BOOTSTRAP_PYTHON", "path", "python3", "`python3`", "the python that makes `.venv`",
       "scripts/bootstrap", "dev"),
    _V("AGENTLEDGER_APT", "str", None, "none", "extra `command:package` pairs to install (set by scripts/test)",
       "scripts/bootstrap", "dev"),
    _V("AGENTLEDGER_TEST_APT", "str", None, "none", "more `command:package` pairs for scripts/test",
       "scripts/test", "dev"),
    _V("AGENTLEDGER_TEST_BOOTSTRAP", "str", None, "a broker scripts/test starts",
       "the Kafka broker the tests use", "tests/conftest.py", "dev"),
    _V("AGENTLEDGER_PYTHON", "path", "python3", "`python3`",
       "python scripts/kafka uses for its readiness check", "scripts/kafka", "dev"),
    _V("AGENTLEDGER_KAFKA_PORT", "int", 9092, "`9092`", "port of `scripts/kafka start`", "scripts/kafka", "dev"),
    _V("AGENTLEDGER_KAFKA_DIR", "path", None, "`<repo>/.kafka/<port>`", "broker data directory",
       "scripts/kafka", "dev"),
    _V("AGENTLEDGER_KAFKA_LIBS", "path", None, "`<repo>/.kafka/libs-<version>`", "Kafka jar cache",
       "scripts/kafka", "dev"),
    _V("AGENTLEDGER_KAFKA_START_TIMEOUT", "int", 120, "`120`", "seconds to wait for the broker",
       "scripts/kafka", "dev"),
    _V("AGENTLEDGER_KAFKA_STOP_TIMEOUT", "int", 60, "`60`", "seconds to wait after SIGTERM", "scripts/kafka",
       "dev"),
    _V("AGENTLEDGER_KAFKA_JAVA_OPTS", "str", None, "none", "extra JVM options for the broker", "scripts/kafka",
       "dev"),
    _V("AGENTLEDGER_S3PROXY_JAVA_OPTS", "str", None, "none", "extra JVM options for S3Proxy", "scripts/lakestack",
       "dev"),
    _V("AGENTLEDGER_KAFKA_CLUSTER_HEAP", "str", "384m", "`384m`", "JVM heap of each node of `scripts/kafka cluster`",
       "scripts/kafka", "dev"),
    _V("AGENTLEDGER_S3PROXY_LIBS", "path", None, "`<repo>/.s3proxy/libs-<version>`", "S3Proxy jar cache",
       "scripts/lakestack", "dev"),
    _V("AGENTLEDGER_PG_BIN", "path", None, "`pg_ctl` on PATH, else `/usr/lib/postgresql/*/bin`",
       "PostgreSQL binaries of `scripts/lakestack`", "scripts/lakestack", "dev"),
    _V("AGENTLEDGER_LAKESTACK_START_TIMEOUT", "int", 90, "`90`", "seconds `scripts/lakestack` waits for each server",
       "scripts/lakestack", "dev"),
    _V("AGENTLEDGER_TEST_WORKERS", "int", 4, "`4`", "pytest-xdist workers scripts/test starts (`-n 0` runs serially)",
       "scripts/test", "dev"),
    _V("AGENTLEDGER_TEST_SCALE", "str", None, "small", "`full`: the scaled-down tests run at the size their issues asked for",
       "tests/conftest.py", "dev"),
    _V("AGENTLEDGER_TEST_FORK", "str", "1", "`1`", "`0`: the tests' CLI runs each start a new interpreter instead of forking "
       "from a preloaded one (tests/forkcli.py)", "tests/conftest.py", "dev"),
    _V("AGENTLEDGER_BENCH_CLI", "path", None, "none", "an executable the chaos benchmarks run instead of "
       "`python -m agentledger` (the tests' smokes give them the fork server's shim, conftest.cli_shim)",
       "bench/chaos_scenarios", "dev"),
    _V("AGENTLEDGER_OUTAGE_EVENTS", "int", 100_000, "`100000`", "events of the spool outage test (20000 unless set or full scale)",
       "tests/test_spool_outage.py", "dev"),
    _V("AGENTLEDGER_QUARANTINE_SCALE", "str", None, "small", "`full`: the quarantine scale test at full size",
       "tests/test_ingest_kafka_scale.py", "dev"),
    _V("AGENTLEDGER_HOOK_BENCH_REPORT", "path", None, "none", "file the hook latency test writes its numbers to",
       "tests/test_hook.py", "dev"),
)
BY_NAME: dict[str, Var] = {v.name: v for v in VARIABLES}
assert len(BY_NAME) == len(VARIABLES)


def declared(name: str) -> Var:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name} is not declared in agentledger/schemas/envvars.py") from None


def raw(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The text of a declared variable, None when unset or empty."""
    declared(name)
    value = (os.environ if env is None else env).get(name)
    return value if value else None


def get(name: str, env: Mapping[str, str] | None = None) -> Any:
    """The typed value of a declared variable, or its default when unset."""
    var = declared(name)
    value = (os.environ if env is None else env).get(name)
    return var.parse(value) if value else var.default


def mask(value: str) -> str:
    return "****" if value else ""


def mask_dsn(value: str) -> str:
    """A connection string with its ``password=...`` masked (a Postgres catalog URL may carry one)."""
    import re

    return re.sub(r"(?i)(password\s*=\s*)('[^']*'|\S+)", r"\1****", value)


def effective(env: Mapping[str, str] | None = None,
              sections: Collection[str] | None = None) -> list[dict[str, Any]]:
    """One row per variable: name, value (secrets masked), source (``env`` or ``default``)."""
    env = os.environ if env is None else env
    rows = []
    for v in VARIABLES:
        if sections and v.section not in sections:
            continue
        value = env.get(v.name)
        rows.append({"name": v.name, "section": v.section, "type": v.type,
                     "value": (mask(value) if v.secret else mask_dsn(value)) if value else v.default_doc.replace("`", ""),
                     "source": "env" if value else "default", "reader": v.reader})
    return rows


def markdown(sections: Collection[str] | None = None) -> str:
    """The README's configuration tables (one per section)."""
    out = []
    for sec, title in SECTIONS.items():
        if sections and sec not in sections:
            continue
        out += [f"**{title}**", "", "| variable | type | meaning | default | read by |", "|---|---|---|---|---|"]
        for v in VARIABLES:
            if v.section == sec:
                doc = v.doc.replace("|", "\\|")
                out.append(f"| `{v.name}` | {v.type} | {doc} | {v.default_doc} | `{v.reader}` |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
