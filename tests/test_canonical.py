"""One canonical JSON per digest form (schemas/canonical.py), byte-identical to what earlier versions
recorded and signed: pinned digests, and a signed bundle exported before the change still verifies."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess

from conftest import REPO, cli_env, run_cli
from agentledger.producers.sandbox.runner import env_digest
from agentledger.schemas.canonical import canonical_json, canonical_json_spaced, canonical_json_utf8

SAMPLE = {"z": [3, 2.5, True, None, "ünïcödé ✓"], "a": {"y": "quote\"back\\slash\nline", "b": -1},
          "e": "\u2028</script>", "n": 10**20}
FIXTURE = REPO / "tests" / "fixtures" / "bundle-v1"  # exported and signed by the code before schemas/canonical.py


def test_digests_are_the_ones_recorded_before():
    # sha256 of the bytes the former producers/sandbox/cas.canonical_json and replay/bundle._json
    # (identical) and replay/projection.canonical_json made of SAMPLE
    assert hashlib.sha256(canonical_json(SAMPLE)).hexdigest() == \
        "5f3f1848cb4c687e13d190140144815eba5be9b3a21ba6984395776cc49ecd95"
    assert hashlib.sha256(canonical_json_utf8(SAMPLE)).hexdigest() == \
        "292b24f5458b5b1754ff9bb2723e2f5844caa5a8adef8127c6e675ce1c20138c"
    assert env_digest({"PATH": "/usr/bin", "LANG": "C.UTF-8", "ÜSER": "ö"}) == \
        "7238371887a13d79c761442706926ebbf939fdef82090b982b01d0f43b0693c3"


# digests main recorded before schemas/canonical.py (alerts and anomaly_scores carry them)
RULE_DIGESTS = {
    "approval-fatigue": "74deff30b3b565ba", "approval-storm": "d78ff3c6e9688731",
    "credential-read-then-egress": "13a4c50a2ea20450", "crypto-mining": "3010220e16463006",
    "defense-evasion": "05ac6fb6691cc07d", "denials-then-escalation": "06e38512c8ccd32c",
    "download-chmod-execute": "c227f0fbbd26f05f", "download-execute": "b9e678dae3c13498",
    "egress-raw-ip": "ad9b6543b844e912", "env-secrets-then-egress": "ae7d9fa2d9767bb7",
    "env-secrets-then-push": "42fd1858f7c00be9", "exfiltration-command": "1aad393ebeb5e6ee",
    "mass-deletion-outside-workspace": "4bbca8fe0afa88a5", "package-install-unknown-index": "8cba0e09844ef1f6",
    "paste-site-upload": "d0adbd99e74461a8", "persistence": "68a0656ca7c9629d",
    "privileged-command": "6ced693a13d8fbec", "push-to-new-remote": "cbe6da9bca5d09f6",
}


def test_rule_and_model_digests_are_the_ones_recorded_before():
    from agentledger.consumers.detect.model import DEFAULT_MODEL, AnomalyModel
    from agentledger.consumers.detect.prepare import BUILTIN_DIR
    from agentledger.consumers.detect.rules import load_rules

    # the rules that existed then (crypto-mining re-pinned: detection v2 changed its YAML, a reverse
    # shell on port 4444 is no longer mining); rules added since have digests of their own
    digests = {r.id: r.digest for r in load_rules([BUILTIN_DIR])}
    assert {k: digests.get(k) for k in RULE_DIGESTS} == RULE_DIGESTS
    assert AnomalyModel.load(DEFAULT_MODEL).digest == "e15e8dc692e730fd"
    assert canonical_json_spaced({"b": [1, "é"], "a": None}) == b'{"a": null, "b": [1, "\\u00e9"]}'


def test_a_bundle_signed_before_still_verifies(tmp_path):
    fx = tmp_path / "fx"
    shutil.copytree(FIXTURE, fx)
    for d in ("keys", "operator"):  # trusted key directories must be private and outside a git tree
        (fx / d).chmod(0o700)
        for f in (fx / d).iterdir():
            f.chmod(0o600)
    out = run_cli("verify-bundle", str(fx / "session.avro"), "--public-key", str(fx / "keys"), "--operator-key",
                  str(fx / "operator"), "--require-signature", "--format", "json", env=cli_env(tmp_path / "home"))
    report = json.loads(out.stdout)
    assert report["ok"] and report["verification"]["signatures"] == "valid", report
    assert report["provenance"]["status"] == "valid"


def test_no_other_canonical_json():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    hand = re.compile(r"""sort_keys=True,\s*separators=\(",",\s*":"\)|separators=\(",",\s*":"\),\s*sort_keys=True""")
    offenders = [f"{f}:{i}" for f in files if not f.startswith("tests/") and f != "schemas/canonical.py"
                 and not (REPO / f).is_symlink()
                 for i, line in enumerate((REPO / f).read_text().splitlines(), 1) if hand.search(line)]
    assert not offenders, f"use agentledger.schemas.canonical: {offenders}"
