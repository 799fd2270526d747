"""Tampering: seeded random mutations of exported bundles and of warehouse rows, each checked with
the library's `verify` / `verify-bundle` (plus a few real CLI runs). Figures: tried, detected,
undetected (must be 0), detected with the first bad seq named, with the expected one, tracebacks
(must be 0), and counts per kind.

Warehouse mutations are made inside a transaction that is rolled back after the check, so each
starts from the same pristine warehouse. Sealed event fields only: the provenance columns the
warehouse adds (source offset, ingested_at, ...) are not evidence and are not mutated.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import traceback
from collections import Counter
from pathlib import Path

from chaos_scenarios import agentledger_cmd, scenario

REPO = Path(__file__).resolve().parents[2]
WAREHOUSE_KINDS = ("field_edit", "delete_row", "tail_truncation", "session_deletion", "session_and_leaves_deletion",
                   "reorder", "insert", "duplicate", "heads_edit", "heads_delete", "leaf_edit",
                   "rewrite_resigned_by_attacker")
BUNDLE_KINDS = ("byte_flip", "delete_block", "reorder_blocks", "insert_block", "duplicate_block", "tail_truncation",
                "header_field_edit", "resigned_by_attacker")


def _env(home: Path) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
    env.update({"AGENTLEDGER_HOME": str(home), "PYTHONPATH": str(REPO), "NO_COLOR": "1", "COLUMNS": "200"})
    return env


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*agentledger_cmd(), *args], capture_output=True, text=True,
                          env=_env(home), cwd=REPO, timeout=600)


def _setup(args, work: Path) -> tuple[Path, list[str], list[Path]]:
    from agentledger import api
    from agentledger.schemas.config import from_env

    from agentledger.schemas import signing

    home = work / "home"
    s = from_env({"AGENTLEDGER_HOME": str(home)})
    signer = signing.generate()  # a producer key the home trusts (the simulator's own seed key never is)
    signing.write_keypair(signer, home / "keys")
    api.simulate(s, args.sessions, args.seed, force_attack_first=True, checkpoint_every=6,
                   signer=signer)
    api.ingest(s)
    import duckdb

    con = duckdb.connect(s.warehouse, read_only=True)
    ids = [r[0] for r in con.execute("SELECT session_id FROM chain_heads ORDER BY session_id").fetchall()]
    con.close()
    bundles = []
    for sid in ids[:3]:
        out = work / f"{sid}.avro"
        proc = _cli(home, "export", sid, "--out", str(out), "--source", "warehouse")
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        bundles.append(out)
    return home, ids, bundles


# --- warehouse -----------------------------------------------------------------------------------

class _Warehouse:
    def __init__(self, home: Path):
        from agentledger.schemas import signing, treelog
        from agentledger.schemas.warehouse import open_warehouse

        self.home = home
        self.wh = open_warehouse(str(home / "warehouse.duckdb"))
        self.con = self.wh.con
        self.keyring = signing.Keyring.from_paths(home / "keys")
        self.operators = signing.Keyring.from_paths(signing.operator_key_dir(home))
        log_id = treelog.read_state(self.con).log_id
        self.sources = [treelog.HeadsFile(treelog.heads_file_path(home, log_id))]

    def check(self, sessions: list[str]) -> tuple[bool, list[int | None]]:
        from agentledger.consumers.verify import verify
        from agentledger.schemas import treelog

        tree = treelog.check_tree(self.con, self.operators, self.sources)
        verdicts = list(verify(self.wh, sessions, self.keyring, require_signatures=True, tree=tree))
        bad = [v for v in verdicts if not v.ok]
        return bool(bad) or not tree.ok, [v.first_bad_seq for v in bad]

    def rows(self, sid: str) -> int:
        return self.con.execute("SELECT count(*) FROM events WHERE session_id = ?", [sid]).fetchone()[0]


# the hash with another first digit (``'0' || ...`` left a hash that starts with 0 unchanged: 1 in 16)
_OTHER_FIRST_DIGIT = "CASE WHEN starts_with(head_hash, '0') THEN '1' ELSE '0' END || substr(head_hash, 2)"


def _each(con, sql: str, params: list) -> None:
    """``sql`` on every kind table (``{t}``): ``events`` is a view over them."""
    from agentledger.schemas.warehouse import event_table_names

    for t in event_table_names():
        con.execute(sql.format(t=t), params)


def _mutate_warehouse(w: _Warehouse, kind: str, sid: str, rng: random.Random) -> int | None:
    """Apply one mutation inside the open transaction; return the first bad seq it should be named by."""
    from agentledger.schemas import merkle, signing, treelog

    con = w.con
    n = w.rows(sid)
    k = rng.randrange(n)
    if kind == "field_edit":
        col = rng.choice(["occurred_at", "turn_id"])
        expr = "occurred_at + INTERVAL 1 SECOND" if col == "occurred_at" else "coalesce(turn_id, '') || 'x'"
        _each(con, f"UPDATE {{t}} SET {col} = {expr} WHERE session_id = ? AND seq = ?", [sid, k])
        return k
    if kind == "delete_row":
        _each(con, "DELETE FROM {t} WHERE session_id = ? AND seq = ?", [sid, k])
        return k
    if kind == "tail_truncation":
        k = max(1, k)
        _each(con, "DELETE FROM {t} WHERE session_id = ? AND seq >= ?", [sid, k])
        return k
    if kind in ("session_deletion", "session_and_leaves_deletion"):
        _each(con, "DELETE FROM {t} WHERE session_id = ?", [sid])
        for t in ("chain_heads", "dead_letters") + (("tree_leaves",) if kind != "session_deletion" else ()):
            con.execute(f"DELETE FROM {t} WHERE session_id = ?", [sid])
        return 0 if kind == "session_deletion" else None
    if kind == "reorder":
        j = rng.choice([x for x in range(n) if x != k])
        _each(con, "UPDATE {t} SET seq = CASE seq WHEN ? THEN ? ELSE ? END WHERE session_id = ? AND seq IN (?, ?)",
              [k, j, k, sid, k, j])
        return min(k, j)
    if kind == "insert":
        _each(con, "INSERT INTO {t} SELECT * REPLACE (? AS seq) FROM {t} WHERE session_id = ? AND seq = ?", [n, sid, k])
        return n
    if kind == "duplicate":
        _each(con, "INSERT INTO {t} SELECT * FROM {t} WHERE session_id = ? AND seq = ?", [sid, k])
        return None
    if kind == "heads_edit":
        col, expr = rng.choice([("head_seq", "head_seq - 1"), ("event_count", "event_count + 1"),
                                ("head_hash", _OTHER_FIRST_DIGIT)])
        con.execute(f"UPDATE chain_heads SET {col} = {expr} WHERE session_id = ?", [sid])
        return None
    if kind == "heads_delete":
        con.execute("DELETE FROM chain_heads WHERE session_id = ?", [sid])
        return None
    if kind == "leaf_edit":
        idx = rng.choice([r[0] for r in con.execute("SELECT leaf_index FROM tree_leaves WHERE session_id = ?",
                                                    [sid]).fetchall()])
        col, expr = rng.choice([("head_seq", "head_seq - 1"), ("event_count", "event_count - 1"),
                                ("head_hash", _OTHER_FIRST_DIGIT)])
        con.execute(f"UPDATE tree_leaves SET {col} = {expr} WHERE leaf_index = ?", [idx])
        return None
    if kind == "rewrite_resigned_by_attacker":
        _each(con, "DELETE FROM {t} WHERE session_id = ?", [sid])
        for t in ("chain_heads", "dead_letters", "tree_leaves"):
            con.execute(f"DELETE FROM {t} WHERE session_id = ?", [sid])
        rows = con.execute("SELECT session_id, head_seq, head_hash, event_count FROM tree_leaves "
                           "ORDER BY leaf_index").fetchall()
        con.execute("DELETE FROM tree_leaves")
        con.execute("DELETE FROM tree_heads")
        con.execute("UPDATE tree_state SET tree_size = 0, root_hash = ?, frontier = []", [merkle.EMPTY_ROOT.hex()])
        treelog.append_leaves(con, rows)
        treelog.sign_head(con, signing.generate())
        return None
    raise ValueError(kind)


# --- bundles -------------------------------------------------------------------------------------

def _blocks(data: bytes):
    from agentledger.replay.bundle import parse_bundle

    b = parse_bundle(data)
    starts = [b.header.length] + [e + 16 for _, e in b.spans[:-1]]
    return b, data[: b.header.length], [data[s : e + 16] for s, (_, e) in zip(starts, b.spans)]


def _rebuild(b, values, checkpoints, provenance=None) -> bytes:
    import tempfile

    from agentledger.replay.bundle import write_bundle
    from agentledger.schemas.contract import load_store

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.avro"
        write_bundle(p, session_id=b.session_id, values=values, writer_schema=load_store().current.schema,
                     checkpoints=checkpoints, provenance=provenance)
        return p.read_bytes()


def _mutate_bundle(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, int | None]:
    from agentledger.replay.bundle import HEADER_DIGEST_KEY, Provenance, header_digest
    from agentledger.schemas import codec, merkle, signing, treelog

    b, head, blocks = _blocks(data)
    n = len(blocks)
    if kind == "byte_flip":
        pos = rng.randrange(len(data))
        out = bytearray(data)
        out[pos] ^= 1 << rng.randrange(8)
        return bytes(out), None
    if kind == "delete_block":
        k = rng.randrange(n)
        return head + b"".join(blocks[:k] + blocks[k + 1:]), k
    if kind == "reorder_blocks":
        k = rng.randrange(n - 1)
        j = rng.randrange(k + 1, n)
        blocks[k], blocks[j] = blocks[j], blocks[k]
        return head + b"".join(blocks), k
    if kind == "insert_block":
        k, j = rng.randrange(n + 1), rng.randrange(n)
        return head + b"".join(blocks[:k] + [blocks[j]] + blocks[k:]), k if k < n else None
    if kind == "duplicate_block":
        k = rng.randrange(n)
        return head + b"".join(blocks[: k + 1] + [blocks[k]] + blocks[k + 1:]), k + 1 if k + 1 < n else None
    values = b.values()
    if kind in ("tail_truncation", "resigned_by_attacker"):
        # rebuilt without any key (or with the attacker's), to end right after a signed checkpoint or anywhere
        cps = [c for c in b.checkpoints if not c["final"]]
        cut = (rng.choice(cps)["seq"] + 1) if cps and rng.random() < 0.7 else rng.randrange(1, n)
        kept = [c for c in b.checkpoints if c["seq"] < cut]
        prov = None
        if kind == "resigned_by_attacker":
            attacker = signing.generate()
            last = values[cut - 1]
            from agentledger.replay.chain import envelope_head

            leaf = treelog.session_leaf_hash(b.session_id, envelope_head(last)[2], last[-64:].decode(), cut)
            root = merkle.root([leaf]).hex()
            log_id = b.header.meta("log_id")
            th = treelog.TreeHead(log_id, 1, root, 1, attacker.key_id,
                                  attacker.sign(signing.tree_head_message(log_id, 1, root, 1)))
            prov = Provenance(attacker, th, 0, [])
        return _rebuild(b, values[:cut], kept, prov), None
    if kind == "header_field_edit":
        key = rng.choice(["head_seq", "event_count", "final_checkpoint_seq", "session_id", "first_seq"])
        meta = {k: v for k, v in b.header.metadata.items() if k not in ("avro.schema", "avro.codec")}
        old = meta[f"agentledger.{key}"].decode()
        meta[f"agentledger.{key}"] = (str(int(old) - 1) if old.isdigit() and int(old) > 0 else old + "x").encode()
        full = {"avro.schema": b.header.schema_json, "avro.codec": b"null", **meta}
        meta[HEADER_DIGEST_KEY] = header_digest(full, b.header.sync).encode()
        return codec.ocf_header(b.header.schema, b.header.sync, meta) + data[b.header.length:], None
    raise ValueError(kind)


# --- the run -------------------------------------------------------------------------------------

@scenario("tampering")
def run(args, work: Path) -> dict:
    from agentledger.replay.session import verify_bundle
    from agentledger.schemas import signing

    rng = random.Random(args.seed)
    home, ids, bundles = _setup(args, work)
    keyring = signing.Keyring.from_paths(home / "keys")
    operators = signing.Keyring.from_paths(signing.operator_key_dir(home))
    figures = Counter()
    per_kind: dict[str, Counter] = {}
    undetected_examples: list[str] = []
    w = _Warehouse(home)
    originals = [p.read_bytes() for p in bundles]
    scratch = work / "mutated.avro"
    cli_left = args.cli_runs

    def record(kind: str, detected: bool, seqs: list, expected) -> None:
        c = per_kind.setdefault(kind, Counter())
        figures["tried"] += 1
        c["tried"] += 1
        if detected:
            figures["detected"] += 1
            c["detected"] += 1
            named = [s for s in seqs if s is not None]
            if named:
                figures["detected_with_first_bad_seq"] += 1
            if expected is not None:
                figures["expected_seq_known"] += 1
                if expected in named:
                    figures["first_bad_seq_exact"] += 1
        else:
            figures["undetected"] += 1
            c["undetected"] += 1

    for i in range(args.mutations):
        on_warehouse = i % 2 == 0
        kind = rng.choice(WAREHOUSE_KINDS if on_warehouse else BUNDLE_KINDS)
        try:
            if on_warehouse:
                sid = rng.choice(ids)
                state = rng.getstate()
                w.con.execute("BEGIN TRANSACTION")
                try:
                    expected = _mutate_warehouse(w, kind, sid, rng)
                    detected, seqs = w.check([sid])
                finally:
                    w.con.execute("ROLLBACK")
                if cli_left > 0 and rng.random() < 0.1:  # the real CLI on a committed copy
                    cli_left -= 1
                    figures["cli_runs"] += 1
                    detected = _cli_warehouse(home, work, kind, sid, state) and detected
            else:
                k = rng.randrange(len(bundles))
                data, expected = _mutate_bundle(originals[k], kind, rng)
                if data == originals[k]:
                    continue
                scratch.write_bytes(data)
                res = verify_bundle(scratch, keyring, require_signature=True, operators=operators)
                detected, seqs = not res.ok, [res.first_bad_seq]
                if cli_left > 0 and rng.random() < 0.1:
                    cli_left -= 1
                    proc = _cli(home, "verify-bundle", str(scratch), "--require-signature")
                    figures["cli_runs"] += 1
                    figures["tracebacks"] += "Traceback" in proc.stderr
                    detected = detected and proc.returncode == 1
            record(kind, detected, seqs, expected)
            if not detected and len(undetected_examples) < 5:
                undetected_examples.append(f"{kind} (mutation {i})")
        except Exception:  # a traceback is a finding: counted, and the run goes on
            figures["tracebacks"] += 1
            figures["tried"] += 1
            if len(undetected_examples) < 5:
                undetected_examples.append(f"{kind}: {traceback.format_exc(limit=3)}")
    w.wh.close()
    return {"tried": figures["tried"], "detected": figures["detected"], "undetected": figures["undetected"],
            "detected_with_first_bad_seq": figures["detected_with_first_bad_seq"],
            "expected_seq_known": figures["expected_seq_known"], "first_bad_seq_exact": figures["first_bad_seq_exact"],
            "tracebacks": figures["tracebacks"], "cli_runs": figures["cli_runs"],
            "by_kind": {k: dict(v) for k, v in sorted(per_kind.items())}, "examples": undetected_examples}


def _cli_warehouse(home: Path, work: Path, kind: str, sid: str, rng_state) -> bool:
    """The same mutation (same random choices) committed to a copy of the home, then the real
    `agentledger verify --require-signatures`."""
    copy = work / "cli-home"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(home, copy, ignore=shutil.ignore_patterns("log"))
    w = _Warehouse(copy)
    try:
        rng = random.Random()
        rng.setstate(rng_state)
        _mutate_warehouse(w, kind, sid, rng)
    finally:
        w.wh.close()
    proc = _cli(copy, "verify", "--require-signatures", "--format", "json")
    return proc.returncode == 1 and "Traceback" not in proc.stderr and not json.loads(proc.stdout)["ok"]
