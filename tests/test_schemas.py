from __future__ import annotations

import copy
import hashlib
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


def _with_new_kind(schema):
    """The payload union gains a branch: a new event kind."""
    payload = next(f for f in schema["fields"] if f["name"] == "payload")
    payload["type"].append({"type": "record", "name": "ToolInvoked", "agentledger.family": "sandbox",
                            "agentledger.kind": "tool_invoked",
                            "fields": [{"name": "tool", "type": "string"}]})


def test_a_new_union_branch_fails_full_transitive_with_a_clear_reason():
    """Why MCP calls are an optional record on command_started / command_finished (v3), not a kind
    of their own: a released reader has no branch for a new kind, so it could not read such an
    event at all -- FORWARD breaks against every released version, and the checker says where."""
    store = load_store()
    results = check_full_transitive(_mutated(_with_new_kind), store.released)
    assert results and all(r.backward and not r.forward for r in results), results
    for r in results:
        text = " ".join(r.messages)
        assert "forward:" in text and "missing_union_branch" in text, r.messages
        assert "payload > union branch 13 (ToolInvoked)" in text, r.messages


def test_v4_is_released_and_carries_provenance_fields():
    """v4: the control surface, trust and MCP tool definitions of session_started, the definition in
    force on an MCP call, the decider chain's fields of approval_decided, coverage statements."""
    store = load_store()
    assert store.is_current_released and store.current.fingerprint == store.released[-1].fingerprint
    assert store.released[-1].version == 4
    kinds = {k.kind: k for k in store.kinds}
    payload = next(f for f in store.current.schema["fields"] if f["name"] == "payload")["type"]

    def fields(kind):
        return {f["name"]: f for f in payload[kinds[kind].index]["fields"]}

    started = fields("session_started")
    assert started["control_surface"]["default"] == [] and started["mcp_tools"]["default"] == []
    assert started["workspace_trusted"]["default"] is None
    decided = fields("approval_decided")
    assert {"hook", "grant"} <= set(decided["decided_by"]["type"]["symbols"])
    assert all(decided[f]["default"] is None for f in ("scope", "rule_source", "grant_request_id", "reported_as"))
    assert "not_observable" in fields("gap")["gap_kind"]["type"]["symbols"]
    mcp = fields("command_started")["mcp"]["type"][1]
    assert {f["name"] for f in mcp["fields"]} >= {"definition_digest"}


def test_v3_is_released_and_carries_mcp_records():
    store = load_store()
    assert [v.version for v in store.released][:3] == [1, 2, 3]
    kinds = {k.kind: k for k in store.kinds}
    for kind, record in (("command_started", "McpCall"), ("command_finished", "McpResult")):
        payload = next(f for f in store.current.schema["fields"] if f["name"] == "payload")["type"]
        fields = {f["name"]: f for f in payload[kinds[kind].index]["fields"]}
        assert fields["mcp"]["default"] is None and fields["mcp"]["type"][1]["name"] == record


def _mcp_event(store):
    from agentledger.producers.normalize import mcp_call, mcp_result
    from agentledger.producers.recorder import Recorder
    from agentledger.schemas.transport.base import MemorySink

    sink = MemorySink()
    rec = Recorder(sink, store=store)
    with rec.session(agent="claude-code", cwd="/w") as s:
        cid = s.command_started(["mcp__github__get_issue", '{"issue_number": 7}'], "/w", sandbox_profile="mcp",
                                mcp=mcp_call("github", "get_issue", {"issue_number": 7}))
        s.command_finished(cid, exit_code=1, duration_ms=5, status="failed",
                           mcp=mcp_result("github", "get_issue", "error", "404 Not Found"))
    return [v for _, _, v in sink.sent]


def _v4_events(store):
    """Events using every v4 addition: a control surface and MCP tool definitions at the start, an MCP
    call naming its definition, a decision by a session grant, a coverage statement."""
    from agentledger.producers.recorder import Recorder
    from agentledger.schemas.transport.base import MemorySink

    sink = MemorySink()
    rec = Recorder(sink, store=store)
    surface = [{"path": "/w/.claude/settings.json", "role": "permissions", "digest": "sha256:" + "ab" * 32,
                "size": 40, "content": '{"permissions": {"allow": ["Bash(ls:*)"]}}', "truncated": False}]
    tools = [{"server": "github", "tool": "get_issue", "definition_digest": "sha256:" + "01" * 32,
              "description_digest": "sha256:" + "02" * 32, "input_schema_digest": "sha256:" + "03" * 32,
              "description": "Get an issue", "listed_at": None}]
    with rec.session(agent="claude-code", cwd="/w", control_surface=surface, workspace_trusted=True,
                     observed_by="hook", mcp_tools=tools) as s:
        s.command_started(["mcp__github__get_issue", "{}"], "/w", sandbox_profile="mcp",
                          mcp={"server": "github", "tool": "get_issue", "arguments_digest": "sha256:" + "04" * 32,
                               "arguments_size": 2, "definition_digest": "sha256:" + "01" * 32})
        s.approval_requested("exec", "ls", "sha256:" + "05" * 32, request_id="r1")
        s.approval_decided("r1", "approved", "grant", grant_request_id="r0", scope="session",
                           rule="Bash(ls:*)", rule_source="/w/.claude/settings.json", reported_as="config")
        s.gap("not_observable", "a transcript never holds a manual approval", field="approval_decided:user")
    return [v for _, _, v in sink.sent]


V4_ONLY = {"control_surface", "workspace_trusted", "observed_by", "mcp_tools", "scope", "rule_source",
           "grant_request_id", "reported_as"}


@pytest.mark.parametrize("old_version", [1, 2, 3])
def test_older_readers_decode_v4_events(old_version):
    """A reader of v1, v2 or v3 decodes events written with v4: the new fields are skipped, the new
    enum symbols read as `unknown`, everything else is read as written, and the hash still verifies."""
    store = load_store()
    old = next(v for v in store.released if v.version == old_version)
    kinds = set()
    for value in _v4_events(store):
        fp, body = codec.soe_split(value)
        writer = store.by_fingerprint(fp)
        assert writer is not None and writer.version == 4
        new = codec.decode(body, writer.parsed)
        got = codec.decode(body, writer.parsed, old.parsed)
        kind, p_new = new["payload"] if isinstance(new["payload"], tuple) else (None, new["payload"])
        p_old = got["payload"][1] if isinstance(got["payload"], tuple) else got["payload"]
        kinds.add(kind)
        for k, v in p_new.items():
            if k in V4_ONLY:
                assert k not in p_old
            elif k == "mcp" and v is not None:
                m = v[1] if isinstance(v, tuple) else v
                o = p_old.get("mcp")
                o = o[1] if isinstance(o, tuple) else o
                assert o is None if old_version < 3 else o == {a: b for a, b in m.items() if a != "definition_digest"}
            elif v in ("grant", "not_observable"):
                assert p_old[k] == "unknown"
            else:
                assert p_old[k] == v, k
        assert hashlib.sha256(value[:-66]).hexdigest() == got["hash"] == new["hash"]
    assert len(kinds) >= 5


@pytest.mark.parametrize("old_version", [1, 2])
def test_older_readers_decode_v3_events(old_version):
    """A reader of v1 or v2 (an older agentledger given v3 through AGENTLEDGER_SCHEMA_PATH) decodes
    events written with v3: the mcp records are skipped, every other field is read, and the hash
    (over the writer's bytes) still verifies."""

    store = load_store()
    values = _mcp_event(store)
    old = next(v for v in store.released if v.version == old_version)
    v3 = store.by_fingerprint(codec.soe_split(values[0])[0])
    assert v3 is not None and v3.version >= 3  # the current writer
    seen = []
    for value in values:
        fp, body = codec.soe_split(value)
        new = codec.decode(body, v3.parsed)
        got = codec.decode(body, v3.parsed, old.parsed)
        payload_new, payload_old = new["payload"], got["payload"]
        kind = payload_new[0] if isinstance(payload_new, tuple) else None
        p_new = payload_new[1] if kind else payload_new
        p_old = payload_old[1] if isinstance(payload_old, tuple) else payload_old
        assert "mcp" not in p_old
        assert {k: v for k, v in p_new.items() if k != "mcp" and k not in V4_ONLY} == p_old
        assert {k: v for k, v in new.items() if k != "payload"} == {k: v for k, v in got.items() if k != "payload"}
        mcp = p_new.get("mcp")
        seen.append(mcp[1] if isinstance(mcp, tuple) else mcp)
        # the chain hash covers the writer's bytes: an old reader checks it as a new one does
        assert hashlib.sha256(value[:-66]).hexdigest() == got["hash"] == new["hash"]
    assert {"server": "github", "tool": "get_issue", "outcome": "error", "error": "404 Not Found"} in seen
    assert any(m and m.get("arguments_digest", "").startswith("sha256:") for m in seen)
