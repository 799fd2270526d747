"""`agentledger serve`, the web console, as a real subprocess driven by headless Chromium (selenium
with Debian's chromium + chromedriver): the session list, the suspicious session stepped through,
an alert followed to its evidence and marked, SQL with its CSV, an evidence bundle exported and
verified offline, an XSS probe rendered inert, and the token on a non-loopback address.
One server and one browser for the module."""

from __future__ import annotations

import csv
import http.cookiejar
import io
import json
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, cli_env, run_cli, stop_process as stop

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

XSS = "<script>window.__xss=1</script><img src=x onerror=\"window.__xss=2\">"
FAKE_PAT = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"  # a GitHub token shape: redacted at recording


def record_xss_session(s) -> str:
    """A session whose recorded strings are hostile HTML, plus a secret the recorder redacts."""
    from agentledger.producers.recorder import ProducerIdentity, Recorder

    rec = Recorder.from_settings(s, identity=ProducerIdentity.local("codex", "0.63.0"))
    with rec.session(agent="codex", cwd=f"/home/dev/{XSS}") as sess:
        cid = sess.command_started(["sh", "-c", f"echo {XSS}"], "/home/dev")
        sess.command_finished(cid, exit_code=0, duration_ms=3)
        cid = sess.command_started(["git", "push", f"https://x:{FAKE_PAT}@github.com/acme/r.git"], "/home/dev")
        sess.command_finished(cid, exit_code=0, duration_ms=5)
        aid = sess.network_attempted(f"evil{XSS}.example", 443, "https")
        sess.network_decided(aid, "deny", rule="default", reason=XSS)
        sid = sess.session_id
    rec.close()
    return sid


def start_server(home: Path, *args: str) -> tuple[subprocess.Popen, str]:
    env = cli_env(home)
    proc = subprocess.Popen([sys.executable, "-m", "agentledger", "serve", "--port", "0", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()[-3000:]}") from None
            continue
        m = re.search(r"(http://\S+)", line)
        if m:
            url = m.group(1)
            base = url.split("?")[0].rstrip("/")
            while time.monotonic() < deadline:  # the line is printed before uvicorn listens
                try:
                    urllib.request.urlopen(base + "/sessions?token=" + urllib.parse.parse_qs(
                        urllib.parse.urlsplit(url).query).get("token", [""])[0], timeout=5)
                    return proc, url
                except urllib.error.HTTPError:
                    return proc, url
                except OSError:
                    time.sleep(0.2)
    proc.kill()
    raise AssertionError("serve printed no URL within 60 s")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from agentledger import api

    d = tmp_path_factory.mktemp("console")
    home = d / "home"
    s = api.settings(home=home, env={}, private=True)
    sim = api.simulate(s, 4, 5, force_attack_first=True)
    xss_sid = record_xss_session(s)
    api.ingest(s, detect=True)
    (home / "policies").mkdir(exist_ok=True)
    (home / "policies" / "no-raw-ip.toml").write_text(
        'name = "no-raw-ip"\n[network]\ndefault = "allow"\n[[network.rules]]\nid = "no-raw-ip"\naction = "deny"\n'
        'raw_ip = true\n[approvals]\ndefault = "allow"\n')
    proc, url = start_server(home)
    downloads = d / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,1200", f"--user-data-dir={d / 'profile'}"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False,
                                           "safebrowsing.enabled": False})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield {"s": s, "sim": sim, "home": home, "url": url.rstrip("/"), "driver": driver, "downloads": downloads,
               "suspect": sim.suspicious[0], "xss": xss_sid, "shots": d}
    finally:
        driver.quit()
        stop(proc)


def go(case, path: str):
    case["driver"].get(case["url"] + path)
    return case["driver"]


def click(driver, element) -> None:
    """Click what loads a new page, and wait until a new document has replaced this one and loaded.

    The old page is marked with a variable in its window, which a new document does not have. This
    does not ask chromedriver about the old page's nodes once it is gone: it has reported a node of a
    replaced page as "Node with given id does not belong to the document" instead of as stale, both
    from the click and from selenium's staleness_of (each failed the suite once).
    """
    driver.execute_script("window.__agentledger_old_page = true")
    try:
        element.click()
    except WebDriverException as exc:
        # a click reported after the new page replaced the old one; a click that did not happen
        # leaves the marked page in place, and the wait below fails
        if "does not belong to the document" not in str(exc):
            raise
    WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return document.readyState === 'complete' && !window.__agentledger_old_page"))


def assert_not_blank(driver, path: Path) -> None:
    from PIL import Image, ImageStat

    driver.save_screenshot(str(path))
    img = Image.open(path).convert("L")
    var = ImageStat.Stat(img).var[0]
    colours = img.getcolors(maxcolors=1 << 16)
    assert var > 100 and (colours is None or len(colours) > 20), (var, len(colours or []))


def wait_for_file(directory: Path, suffix: str, timeout: float = 30) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in directory.iterdir() if p.name.endswith(suffix)]
        if done and not list(directory.glob("*.crdownload")):
            return done[0]
        time.sleep(0.2)
    raise AssertionError(f"no {suffix} downloaded into {directory}: {list(directory.iterdir())}")


def test_session_list_shows_every_session_with_counts(case):
    d = go(case, "/")
    rows = d.find_elements(By.CSS_SELECTOR, "#sessions tr.session")
    assert len(rows) == 5
    text = d.find_element(By.ID, "sessions").text
    suspect_row = [r for r in rows if case["suspect"][:13] in r.text][0]
    assert "codex" in suspect_row.text or "claude" in suspect_row.text
    assert re.search(r"\b(critical|high)\b", suspect_row.text), suspect_row.text
    assert "ok" in text
    assert_not_blank(d, case["shots"] / "sessions.png")
    # the text filter finds the session whose command mentions the exfiltration host
    d.find_element(By.ID, "text").send_keys("curl")
    click(d, d.find_element(By.ID, "filter"))
    ids = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#sessions a.sid")]
    assert case["suspect"][:13] in ids and len(ids) < 5


def test_open_the_suspicious_session_and_step_through_it(case):
    d = go(case, "/")
    click(d, d.find_element(By.LINK_TEXT, case["suspect"][:13]))
    assert d.find_element(By.ID, "session-id").text == case["suspect"]
    assert "chain ok" in d.find_element(By.ID, "chain-status").text
    end = int(d.find_element(By.ID, "at-seq").text)
    end_digest = d.find_element(By.ID, "state-digest").text
    assert end > 10 and not d.find_elements(By.ID, "next")
    click(d, d.find_element(By.ID, "prev"))
    assert int(d.find_element(By.ID, "at-seq").text) == end - 1
    assert d.find_element(By.ID, "state-digest").text != end_digest
    click(d, d.find_element(By.ID, "prev"))
    click(d, d.find_element(By.ID, "next"))
    assert int(d.find_element(By.ID, "at-seq").text) == end - 1
    d = go(case, f"/sessions/{case['suspect']}?at=3")
    assert d.find_element(By.ID, "at-seq").text == "3"
    cur = d.find_elements(By.CSS_SELECTOR, "tr.ev.current")
    assert [e.get_attribute("data-seq") for e in cur] == ["3"]
    assert len(d.find_elements(By.CSS_SELECTOR, "tr.ev.future")) == end - 3
    # the state shown is the replay projection at that seq (same digest as `agentledger replay --at 3`)
    doc = json.loads(run_cli("replay", case["suspect"], "--at", "3", "--format", "json", env=cli_env(case["home"])).stdout)
    assert doc["state_digest"].startswith(d.find_element(By.ID, "state-digest").text)
    assert_not_blank(d, case["shots"] / "session.png")


def test_follow_an_alert_to_its_evidence_and_mark_it(case):
    from agentledger import api

    d = go(case, "/alerts?severity=high")
    rows = d.find_elements(By.CSS_SELECTOR, "#alerts tr.alert-row")
    ours = [r for r in rows if case["suspect"][:13] in r.text]
    assert ours and all(re.search(r"T\d{4}", r.find_element(By.CLASS_NAME, "mitre").text) for r in ours[:1])
    alert_id = ours[0].get_attribute("id")[len("row-"):]
    alert = [a for a in api.alert_queue(case["s"]).as_dicts() if a["alert_id"] == alert_id][0]
    click(d, ours[0].find_element(By.CSS_SELECTOR, "a.evidence"))
    highlighted = {int(e.get_attribute("data-seq")) for e in d.find_elements(By.CSS_SELECTOR, "tr.ev.evidence")}
    assert highlighted == set(alert["evidence_seqs"])
    assert d.find_element(By.ID, "at-seq").text == str(alert["first_seq"])
    # mark it acknowledged with a note: stored in alert_labels, shown in the queue
    d = go(case, "/alerts")
    row = d.find_element(By.ID, f"row-{alert_id}")
    row.find_element(By.NAME, "note").send_keys("seen, ticket SEC-1")
    click(d, row.find_element(By.CSS_SELECTOR, "button.ack"))
    row = d.find_element(By.ID, f"row-{alert_id}")
    assert row.find_element(By.CLASS_NAME, "triage").text == "acknowledged" and "SEC-1" in row.text
    out = run_cli("sql", f"select triage, triage_note from alert_triage where alert_id = '{alert_id}'",
                  "--format", "json", env=cli_env(case["home"])).stdout
    assert json.loads(out) == [{"triage": "acknowledged", "triage_note": "seen, ticket SEC-1"}]
    # a false positive no longer counts towards the session's severity in the list
    d = go(case, "/alerts?triage=new")
    assert not d.find_elements(By.ID, f"row-{alert_id}")


def test_sql_query_and_csv_download(case):
    d = go(case, "/sql")
    box = d.find_element(By.ID, "q")
    box.clear()
    box.send_keys("select session_id, commands from sessions order by session_id")
    click(d, d.find_element(By.ID, "run"))
    cells = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
             for tr in d.find_elements(By.CSS_SELECTOR, "#result tr")[1:]]
    assert len(cells) == 5
    d.find_element(By.ID, "csv").click()  # a download: the page stays
    got = wait_for_file(case["downloads"], ".csv")
    rows = list(csv.reader(io.StringIO(got.read_text())))
    assert rows[0] == ["session_id", "commands"] and rows[1:] == cells
    want = run_cli("sql", "select session_id, commands from sessions order by session_id", "--format", "csv",
                   env=cli_env(case["home"])).stdout
    assert list(csv.reader(io.StringIO(want))) == rows
    got.unlink()
    # the same guard as `agentledger sql`: writes and file access are refused, nothing changes
    for bad in ("delete from events", "select * from read_csv('/etc/passwd')"):
        d = go(case, "/sql?" + urllib.parse.urlencode({"q": bad}))
        assert d.find_element(By.ID, "error").text
    assert int(run_cli("sql", "select count(*) as n from events", "--format", "csv",
                       env=cli_env(case["home"])).stdout.split()[1]) > 100


def test_export_a_bundle_and_verify_it_offline(case, tmp_path):
    d = go(case, f"/sessions/{case['suspect']}")
    click(d, d.find_element(By.ID, "verify"))
    assert d.find_element(By.ID, "verify-result").text == "verified"
    d = go(case, f"/sessions/{case['suspect']}")
    d.find_element(By.ID, "export").click()  # a download: the page stays
    bundle = wait_for_file(case["downloads"], ".avro")
    assert bundle.name == f"{case['suspect']}.avro"
    out = run_cli("verify-bundle", str(bundle), "--format", "json", env=cli_env(case["home"]))
    assert json.loads(out.stdout)["ok"] is True


def test_whatif_lists_the_sessions_a_policy_would_have_stopped(case):
    d = go(case, "/whatif")
    click(d, d.find_element(By.ID, "run-whatif"))
    report = d.find_element(By.ID, "whatif-sessions")
    assert case["suspect"][:13] in report.text and "stopped" in report.text


def test_recorded_html_is_shown_as_text_never_run(case):
    d = go(case, f"/sessions/{case['xss']}")
    assert d.execute_script("return window.__xss === undefined")
    assert not d.find_elements(By.TAG_NAME, "script") and not d.find_elements(By.CSS_SELECTOR, "img[src=x]")
    body = d.find_element(By.TAG_NAME, "body").text
    assert "<script>window.__xss=1</script>" in body
    # the recorder redacted the token; the page shows the redaction token as such
    secrets = [e.text for e in d.find_elements(By.CSS_SELECTOR, ".secret")]
    assert secrets and all(re.fullmatch(r"\[SECRET:[a-z0-9_]+:[0-9a-f]{8}\]", x) for x in secrets)
    assert FAKE_PAT not in d.page_source
    for path in ("/sessions?" + urllib.parse.urlencode({"text": "<script>"}), "/sql?" + urllib.parse.urlencode(
            {"q": "select network_attempted.host, session_started.cwd from events where session_id = "
                  f"'{case['xss']}'"})):
        d = go(case, path)
        assert d.execute_script("return window.__xss === undefined")
        assert not d.find_elements(By.TAG_NAME, "script") and "<script>" in d.find_element(By.TAG_NAME, "body").text
    assert case["xss"][:13] in go(case, "/sessions?text=%3Cscript%3E").find_element(By.ID, "sessions").text


def fetch(url: str, *, data: bytes | None = None, headers: dict | None = None, opener=None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with (opener or urllib.request.build_opener()).open(req, timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def test_posts_need_the_form_token_and_this_origin(case):
    aid = json.loads(run_cli("alerts", "--format", "json", env=cli_env(case["home"])).stdout)[0]["alert_id"]
    url = f"{case['url']}/alerts/{aid}/label"
    code, body = fetch(url, data=b"label=false_positive")
    assert code == 400 and "CSRF" in body
    page = fetch(case["url"] + "/alerts")[1]
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode({"csrf": csrf, "label": "false_positive"}).encode()
    assert fetch(url, data=form, headers={"Origin": "http://evil.example"})[0] == 403
    # a page under another host name (DNS rebinding to 127.0.0.1) is refused
    assert fetch(case["url"] + "/sessions", headers={"Host": "evil.example"})[0] == 421
    n = lambda: run_cli("sql", f"select count(*) from alert_labels where alert_id = '{aid}' and label = "
                        "'false_positive'", "--format", "csv", env=cli_env(case["home"])).stdout.split()[1]
    assert n() == "0"


def test_a_non_loopback_address_needs_the_token_on_every_request(case):
    proc, url = start_server(case["home"], "--host", "127.0.0.2")
    try:
        token = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["token"][0]
        base = url.split("?")[0].rstrip("/")
        assert base.startswith("http://127.0.0.2:") and len(token) >= 24
        for path in ("/", "/sessions", f"/sessions/{case['suspect']}", "/alerts", "/whatif", "/sql?q=select+1",
                     "/sql.csv?q=select+1"):
            assert fetch(base + path)[0] == 401, path
            assert fetch(base + path + ("&" if "?" in path else "?") + "token=wrong")[0] == 401, path
        assert fetch(base + f"/sessions/{case['suspect']}/export", data=b"")[0] == 401
        assert fetch(base + "/sql?q=select+42", headers={"Authorization": f"Bearer {token}"})[0] == 200
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        code, body = fetch(f"{base}/sessions?token={token}", opener=opener)  # sets the cookie, then redirects
        assert code == 200 and case["suspect"][:13] in body
        assert [c.name for c in jar] == ["agentledger_console"]
        assert fetch(base + "/alerts", opener=opener)[0] == 200
    finally:
        stop(proc)


def test_the_server_imports_what_a_first_session_page_needs_before_it_listens(tmp_path):
    # the first session page anyone opened paid ~190 ms of imports and the Avro extension's load
    code = ("import sys; from agentledger import api; from agentledger.console import make_app; "
            "before = 'agentledger.replay.session' in sys.modules; "
            f"make_app(api.settings(home={str(tmp_path / 'home')!r}, env={{}})); "
            "print(before, all(m in sys.modules for m in ('agentledger.replay.session', "
            "'agentledger.replay.projection', 'agentledger.replay.sources')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env=cli_env(tmp_path / "home"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
