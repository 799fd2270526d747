"""The HTML timeline renders offline in headless Chromium with its events visible (screenshot test)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from conftest import cli_env, run_cli
from test_replay import simulate_and_ingest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,1600"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("chromium is required (scripts/test installs the Debian package `chromium`)", pytrace=False)
    return exe


@pytest.fixture(scope="module")
def html_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("html")
    s, res = simulate_and_ingest(d / "home", sessions=3, seed=5)
    sid = res.labels[0]["session_id"]  # the credential-exfiltration session
    from agentledger.schemas.warehouse import open_warehouse

    with open_warehouse(s.warehouse) as wh:
        seqs = [r[0] for r in wh.con.execute(
            "SELECT seq FROM events WHERE session_id = ? AND (file_accessed.path LIKE '%/.aws/%' OR "
            "network_attempted.host = '203.0.113.50') ORDER BY seq", [sid]).fetchall()]
        # the detection stage's alerts, raised by the real detector (consumers/detect)
        from agentledger.consumers.detect import Detector

        Detector(wh).detect()
        alerted = {q for (ev,) in wh.con.execute("SELECT evidence_seqs FROM alerts WHERE session_id = ?", [sid]).fetchall()
                   for q in ev}
        assert set(seqs) <= alerted, (seqs, alerted)
    (d / "policy.toml").write_text('name = "no-raw-ip"\n[network]\ndefault = "allow"\n'
                                   '[[network.rules]]\nid = "no-raw-ip"\naction = "deny"\nraw_ip = true\n'
                                   '[approvals]\ndefault = "allow"\n')
    out = d / "timeline.html"
    env = cli_env(s.home)
    doc = json.loads(run_cli("replay", sid, "--html", str(out), "--policy", str(d / "policy.toml"), "--format", "json",
                             env=env).stdout)
    return out, doc, seqs, d


def test_html_is_self_contained(html_case):
    out, doc, seqs, _ = html_case
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.I)
    assert "@import" not in text and "url(" not in text.replace("url\":", "")
    assert "<link" not in text and "<img" not in text and "<iframe" not in text
    assert f"id='seq-{len(doc['timeline']) - 1}'" in text
    assert doc["state_digest"] in text and "chain ok" in text


def test_html_timeline_renders_in_headless_chromium(html_case, tmp_path):
    out, doc, seqs, d = html_case
    exe = chromium()
    profile = tmp_path / "profile"
    dom = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=3000",
                          "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    n = len(doc["timeline"])
    assert n > 10
    # the script ran (it fills in the count) and every event row is in the rendered DOM
    assert re.search(rf"<span id=\"shown\">{n}</span>", html), html[:2000]
    assert len(re.findall(r'<tr class="ev chain-ok', html)) == n
    # alerts are pinned to their evidence rows; the what-if divergence (POST to the raw IP) is listed
    for s in seqs:
        row = re.search(rf'<tr class="([^"]*)" id="seq-{s}"', html)
        assert row and "alerted" in row.group(1)
    assert "cred-read-then-egress" in html or "credentials read" in html
    assert "no-raw-ip" in html and 'id="whatif"' in html
    # approvals are paired with their decisions
    assert 'id="approvals"' in html
    png = tmp_path / "shot.png"
    shot = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                           "--virtual-time-budget=3000", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    from PIL import Image

    img = Image.open(png).convert("RGB")
    assert img.size == (1400, 1600)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, badges and coloured family chips, not a blank page
    # the family chips' colours are on screen
    pixels = {c for _, c in colours}
    assert (37, 99, 235) in pixels or (5, 150, 105) in pixels  # sandbox blue / network green
    shutil.copy(png, d / "screenshot.png")
