from __future__ import annotations

import copy
import json

import pytest

from conftest import run_cli, cli_env
from agentledger.schemas import codec
from agentledger.schemas.compat import check_full_transitive
from agentledger.schemas.contract import SCHEMA_DIR, SchemaStore, load_store


def walk_types(t, seen=None):
    """Every named/complex type in a schema, depth first."""
    if isinstance(t, list):
        for m in t:
            yield from walk_types(m)
    elif isinstance(t, dict):
        yield t
        if t.get("type") == "record":
            for f in t["fields"]:
                yield from walk_types(f["type"])
        elif t.get("type") == "array":
            yield from walk_types(t["items"])
        elif t.get("type") == "map":
            yield from walk_types(t["values"])


def test_store_has_every_released_version_and_current():
    store = load_store()
    assert store.released, "at least v1 is released"
    assert store.by_fingerprint(store.current.fingerprint) is not None
    for v in store.released:
        assert store.by_fingerprint(v.fingerprint) is v


def test_fingerprint_is_crc64_of_canonical_form():
    store = load_store()
    from fastavro.schema import fingerprint  # the test may use the library directly

    assert store.current.fingerprint.hex() == fingerprint(codec.canonical_form(store.current.schema), "CRC-64-AVRO")


def test_every_enum_has_a_default_so_new_symbols_never_break_old_readers():
    schema = load_store().current.schema
    enums = [t for t in walk_types(schema) if t.get("type") == "enum"]
    assert len(enums) >= 10
    for e in enums:
        assert e.get("default") in e["symbols"], f"enum {e['name']} needs a default"


def test_hash_chain_fields_are_last():
    names = [f["name"] for f in load_store().current.schema["fields"]]
    assert names[-2:] == ["prev_hash", "hash"]


def test_payload_covers_the_four_families_and_required_kinds():
    store = load_store()
    kinds = {(k.family, k.kind) for k in store.kinds}
    for fk in [("session", "session_started"), ("session", "session_ended"), ("sandbox", "command_started"),
               ("sandbox", "command_finished"), ("sandbox", "file_accessed"), ("sandbox", "sandbox_denied"),
               ("approval", "approval_requested"), ("approval", "approval_decided"),
               ("network", "network_attempted"), ("network", "network_decided"), ("network", "network_completed")]:
        assert fk in kinds
    assert len({k.kind for k in store.kinds}) == len(store.kinds), "kind names are globally unique"


def test_current_schema_is_full_transitive_compatible():
    store = load_store()
    results = check_full_transitive(store.current.schema, store.released)
    assert results and all(r.ok for r in results), results


def _mutated(mutate):
    schema = copy.deepcopy(load_store().current.schema)
    mutate(schema)
    return schema


@pytest.mark.parametrize("name,mutate,compatible", [
    ("type change", lambda s: s["fields"][2].__setitem__("type", "string"), False),
    ("new field without default", lambda s: s["fields"].insert(5, {"name": "x", "type": "string"}), False),
    ("removed enum default", lambda s: s["fields"][4]["type"]["fields"][4]["type"].pop("default"), True),
    ("new optional field", lambda s: s["fields"].insert(5, {"name": "x", "type": ["null", "string"], "default": None}), True),
])
def test_checker_verdicts(name, mutate, compatible):
    store = load_store()
    results = check_full_transitive(_mutated(mutate), store.released)
    assert all(r.ok for r in results) is compatible, (name, results)


def test_schemas_check_cli_passes_and_fails_on_a_changed_type(tmp_path, home):
    env = cli_env(home)
    ok = run_cli("schemas", "check", env=env)
    assert "compatible" in ok.stdout + ok.stderr
    bad = tmp_path / "event.avsc"
    bad.write_text(json.dumps(_mutated(lambda s: s["fields"][2].__setitem__("type", "string"))))
    proc = run_cli("schemas", "check", "--schema", str(bad), env=env, check=False)
    assert proc.returncode == 1
    assert "INCOMPATIBLE" in proc.stdout + proc.stderr
    assert "type_mismatch" in proc.stdout
    # the candidate may also be given as an argument; a missing file is a usage error, not "compatible"
    assert run_cli("schemas", "check", str(bad), env=env, check=False).returncode == 1
    missing = run_cli("schemas", "check", str(tmp_path / "nope.avsc"), env=env, check=False)
    assert missing.returncode == 2 and "no such schema file" in missing.stderr


RELEASED_SUBJECTS = ("event", "alert")


def test_released_files_are_never_edited():
    """Released schemas are immutable history: their fingerprints are pinned here, per subject
    (keys ``<subject>.v<N>``), and every released file is pinned."""
    pinned = json.loads((SCHEMA_DIR / "released" / "FINGERPRINTS.json").read_text())
    found = {f"{subject}.v{v.version}": v.fingerprint_hex
             for subject in RELEASED_SUBJECTS for v in SchemaStore(subject).released}
    assert found == pinned
    files = {p.name.removesuffix(".avsc") for p in (SCHEMA_DIR / "released").glob("*.avsc")}
    assert files == set(pinned), "a released schema file is not pinned (or a pinned one is missing)"


def test_alert_schema_is_released_and_compatible():
    store = SchemaStore("alert")
    assert store.is_current_released
    results = check_full_transitive(store.current.schema, store.released)
    assert results and all(r.ok for r in results)
    enums = [t for t in walk_types(store.current.schema) if t.get("type") == "enum"]
    assert enums and all(e.get("default") in e["symbols"] for e in enums)


def test_schemas_check_cli_passes_for_the_alert_subject(home):
    ok = run_cli("schemas", "check", "--subject", "alert", env=cli_env(home))
    assert "compatible" in ok.stdout + ok.stderr
