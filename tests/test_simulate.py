"""The simulator: byte-for-byte reproducible, labels apart from the events, every scenario realistic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli_env, run_cli
from agentledger.producers.simulate import ATTACK_SCENARIOS, ATTACKS, simulate, simulation_keys, simulation_recorder
from agentledger.producers.sinks import open_producer_sink
from agentledger.schemas import signing
from agentledger.schemas.codec import decode, soe_split
from agentledger.schemas.config import from_env
from agentledger.schemas.contract import load_store
from agentledger.schemas.transport.local import LocalLog


def _log_files(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted((home / "log").rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_simulate_1000_sessions_seed_11_is_byte_for_byte_reproducible(tmp_path):
    outs = []
    for run in ("a", "b"):
        home = tmp_path / run
        labels = tmp_path / f"labels-{run}.jsonl"
        out = run_cli("simulate", "--sessions", "1000", "--seed", "11", "--labels", str(labels), "--format", "json",
                      env=cli_env(home))
        outs.append((home, labels, json.loads(out.stdout)))
    (ha, la, ra), (hb, lb, rb) = outs
    assert ra == rb and ra["sessions"] == 1000
    fa, fb = _log_files(ha), _log_files(hb)
    assert fa.keys() == fb.keys()
    segments = [k for k in fa if k.endswith(".avro")]
    assert segments and any(k.endswith(".idx") for k in fa)
    assert fa == fb, "the whole log -- segments, index files, topic metadata -- is identical byte for byte"
    assert la.read_bytes() == lb.read_bytes(), "labels are identical"

    # labels name every attack session and its scenario; the events carry no label
    labels = [json.loads(line) for line in la.read_text().splitlines()]
    assert len(labels) == 1000 and len({l["session_id"] for l in labels}) == 1000
    attacks = [l for l in labels if l["attack"]]
    assert {l["scenario"] for l in attacks} == set(ATTACK_SCENARIOS)
    assert all(l["scenario"] == "benign" for l in labels if not l["attack"])
    assert 60 <= len(attacks) <= 160  # attack rate 0.1
    blob = b"".join(fa[k] for k in segments)
    for name in ATTACK_SCENARIOS:
        assert name.encode() not in blob, f"label {name} leaked into the events"
    store = load_store()
    log = LocalLog(ha / "log")
    topic = "agentledger.events"
    by_session: dict[str, dict[int, tuple]] = {}
    for p in range(log.partition_count(topic)):
        off = 0
        while msgs := log.read(topic, p, off, 5000):
            for m in msgs:
                fp, body = soe_split(m.value)
                r = decode(body, store.by_fingerprint(fp).parsed)
                by_session.setdefault(r["session_id"], {})[r["seq"]] = r["payload"]
            off = msgs[-1].offset + 1
    assert set(by_session) == {l["session_id"] for l in labels}
    for l in attacks:
        ev = l["evidence_seqs"]
        assert ev and all(s in by_session[l["session_id"]] for s in ev), l
    # the checkpoint key of the simulation is in the simulator keyring, not among the trusted keys
    _, signer = simulation_keys(11)
    assert (ha / "keys" / "simulator" / f"{signer.key_id}.pub").exists()  # recognised, never trusted
    assert not list((ha / "keys").glob("*.pub"))


def _scenario_events(tmp_path, scenario: str, sessions: int = 12):
    settings = from_env({"AGENTLEDGER_HOME": str(tmp_path / scenario)})
    sink = open_producer_sink(settings)
    res = simulate(lambda clock, rng: simulation_recorder(sink, settings.topic, 5, clock, rng), sessions, 5,
                   attack_rate=1.0, attacks=[scenario])
    sink.close()
    store = load_store()
    log = LocalLog(settings.log_dir)
    events = {}
    for p in range(log.partition_count(settings.topic)):
        for m in log.read(settings.topic, p, 0, 100_000):
            fp, body = soe_split(m.value)
            r = decode(body, store.by_fingerprint(fp).parsed)
            events[(r["session_id"], r["seq"])] = r
    return res, events


def _evidence(res, events):
    for l in res.labels:
        yield l, [events[(l["session_id"], s)] for s in l["evidence_seqs"]]


def _text(evs) -> str:
    return json.dumps([e["payload"] for e in evs], default=str)


@pytest.mark.parametrize("scenario,must", [
    ("credential_exfiltration", [r"/\.(aws|ssh|kube|netrc|docker|config/gcloud)", r"NetworkAttempted"]),
    ("download_execute", [r"\d+\.\d+\.\d+\.\d+", r"\| sh|chmod"]),
    ("approval_fatigue", [r"ApprovalRequested"]),
    ("persistence", [r"\.git/hooks|\.bashrc|\.zshrc|\.profile|crontab|systemd/user|LaunchAgents"]),
    ("crypto_mining", [r"stratum\+tcp://", r"xmrig"]),
    ("dependency_confusion", [r"--extra-index-url|--registry"]),
    ("mass_deletion", [r"rm", r"FileAccessed"]),
    ("token_harvesting", [r"\"env\"|printenv|environ", r"NetworkAttempted"]),
])
def test_each_attack_scenario_shows_its_technique_in_the_evidence(tmp_path, scenario, must):
    import re

    res, events = _scenario_events(tmp_path, scenario)
    assert len(res.labels) == 12 and all(l["scenario"] == scenario and l["attack"] for l in res.labels)
    for _label, evs in _evidence(res, events):
        names = json.dumps([e["payload"][0] for e in evs])
        text = _text(evs) + names
        for pattern in must:
            assert re.search(pattern, text), (scenario, pattern, text[:400])
    if scenario == "approval_fatigue":
        for _label, evs in _evidence(res, events):
            decisions = [e["payload"][1]["decision"] for e in evs if e["payload"][0].endswith("ApprovalDecided")]
            assert len(decisions) >= 5 and decisions[-1] == "approved" and "approved" not in decisions[:-1]
    if scenario == "mass_deletion":
        for _label, evs in _evidence(res, events):
            deletes = [e for e in evs if e["payload"][0].endswith("FileAccessed") and e["payload"][1]["operation"] == "delete"]
            assert len(deletes) >= 15 and not any(e["payload"][1]["inside_workspace"] for e in deletes)


def test_benign_sessions_contain_near_misses_but_no_attack_labels(tmp_path):
    settings = from_env({"AGENTLEDGER_HOME": str(tmp_path)})
    sink = open_producer_sink(settings)
    res = simulate(lambda clock, rng: simulation_recorder(sink, settings.topic, 9, clock, rng), 300, 9, attack_rate=0.0)
    sink.close()
    assert not any(l["attack"] for l in res.labels)
    seen = {n for l in res.labels for n in l["near_misses"]}
    assert {"env_example", "localhost_server", "registry_install", "build_cleanup", "allowlisted_download",
            "credentials_in_flags", "git_push_origin", "repo_hooks"} <= seen


def test_mix_and_scenario_names_are_stable():
    assert tuple(ATTACKS) == ATTACK_SCENARIOS == (
        "credential_exfiltration", "download_execute", "approval_fatigue", "persistence", "crypto_mining",
        "dependency_confusion", "mass_deletion", "token_harvesting")


def test_simulation_checkpoints_verify_with_the_published_key(tmp_path):
    from agentledger.schemas.checkpoints import verify_checkpoint
    from agentledger.schemas.envelope import ChainVerifier

    res, events = _scenario_events(tmp_path, "persistence", sessions=3)
    _, signer = simulation_keys(5)
    keyring = signing.Keyring([signer.public_key])
    load_store()
    for l in res.labels:
        v = ChainVerifier(l["session_id"])
        seqs = sorted(s for (sid, s) in events if sid == l["session_id"])
        finals = 0
        for s in seqs:
            r = events[(l["session_id"], s)]
            if r["payload"][0].endswith("Checkpoint"):
                assert verify_checkpoint(r, keyring, v.head_seq, v.head_hash).ok
                finals += r["payload"][1]["final"]
            v.head_seq, v.head_hash = s, r["hash"]
        assert finals == 1
        assert events[(l["session_id"], 0)]["payload"][1]["checkpoint_key_id"] == signer.key_id
