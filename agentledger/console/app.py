"""The web console: a read-only, server-rendered Starlette app over `agentledger.api`.

A UI like the CLI: it parses requests, calls `agentledger.api` and renders Jinja templates
(autoescaped: every recorded string is attacker-written and shows as text). No JavaScript at all,
and a Content-Security-Policy that allows none, nor any resource from elsewhere.

Auth: on a loopback address none is needed, but the Host header must name a loopback host (no DNS
rebinding). Bound elsewhere, every request needs the token (``?token=`` once, which sets an
HttpOnly SameSite=Strict cookie, or ``Authorization: Bearer``). Every POST carries the per-process
CSRF token of the form and, when the browser sends one, an Origin of this server. A POST, and a GET
that runs SQL (/sql, /sql.csv), is refused when the browser says it comes from another site
(``Sec-Fetch-Site`` other than same-origin or none), and a query is interrupted after
``sql_timeout_s`` seconds (it holds the one lock every page waits for).

The warehouse is opened per request and closed before the answer (one request at a time holds it:
DuckDB connections to one file in one process must agree on their configuration).
"""

from __future__ import annotations

import csv
import datetime as dt
import hmac
import io
import ipaddress
import re
import secrets
import shutil
import threading
import time
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import jinja2
from markupsafe import Markup, escape
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from agentledger import api

COOKIE = "agentledger_console"
SQL_ROW_LIMIT = 1000
CSV_ROW_LIMIT = 1_000_000
PAGE_SIZE = 50
SQL_TIMEOUT_S = 30.0  # a query of /sql or /sql.csv is interrupted after this many seconds
SQL_PATHS = ("/sql", "/sql.csv")  # the GETs that run the user's SQL
SAME_SITE = ("same-origin", "none")  # the Sec-Fetch-Site values of a request this console's pages (or a user) made
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
_SECRET_TOKEN = re.compile(r"\[SECRET:[a-z0-9_]+:[0-9a-f]{8}\]")


NO_TOKEN_HOSTS = ("127.0.0.1", "::1", "localhost")


def needs_token(bind_host: str) -> bool:
    """Served without a token only on the loopback addresses one user's tools use (127.0.0.1, ::1,
    localhost); any other address, other 127.x addresses included, requires the token."""
    return bind_host.strip("[]") not in NO_TOKEN_HOSTS


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _redacted(value: Any) -> Markup:
    """Escaped text with each redaction token marked as such (the token's characters need no escaping)."""
    text = str(escape("" if value is None else value))
    return Markup(_SECRET_TOKEN.sub(lambda m: f'<span class="secret" title="redacted secret">{m.group(0)}</span>', text))


def _ts(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value).replace("T", " ")[:19]


def _duration(seconds: Any) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)


def _csv_cell(value: Any) -> str:
    """A CSV cell: a text starting with = + - @ tab or CR gets a leading ' (OWASP's CSV injection
    advice), so a spreadsheet shows it as text rather than run it as a formula; numbers stay numbers."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return _cell(value)


def _url_part(value: Any) -> str:
    """A value (a session id, an alert id: recorded, attacker-chosen) as one URL path segment or query
    value: every character but letters, digits and _.-~ percent-encoded, so '/', '..', '?', '#' or
    '&' in it cannot make its link go elsewhere."""
    return quote(str(value), safe="")


class Console:
    """The app and its per-process secrets."""

    def __init__(self, settings, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 sql_timeout_s: float = SQL_TIMEOUT_S):
        self.settings = settings
        self.sql_timeout_s = sql_timeout_s
        self.host, self.port = host, port
        self.token = token if token is not None else (secrets.token_urlsafe(24) if needs_token(host) else None)
        self.csrf = secrets.token_urlsafe(24)
        self.lock = threading.Lock()
        self.views = api.SessionViews()
        self.views.warm()  # the first session page a user opens would otherwise pay ~190 ms of imports
        self.env = jinja2.Environment(loader=jinja2.PackageLoader("agentledger.console", "templates"),
                                      autoescape=True)
        self.env.filters.update(redacted=_redacted, ts=_ts, duration=_duration, cell=_cell, urlpart=_url_part)
        self.env.globals.update(csrf=self.csrf, severities=api.SEVERITIES)
        routes = [
            Route("/", self.sessions), Route("/sessions", self.sessions),
            # {sid:path}: an id may hold '/' (its links percent-encode it; the server gets it decoded)
            Route("/sessions/{sid:path}/verify", self.verify, methods=["POST"]),
            Route("/sessions/{sid:path}/export", self.export, methods=["POST"]),
            Route("/sessions/{sid:path}", self.session),
            Route("/alerts", self.alerts), Route("/alerts/{alert_id}/label", self.label, methods=["POST"]),
            Route("/whatif", self.whatif, methods=["GET", "POST"]),
            Route("/sql", self.sql), Route("/sql.csv", self.sql_csv),
        ]
        self.app = Starlette(routes=routes, exception_handlers={api.AgentLedgerError: self.failed})

    # --- plumbing ------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        refusal = self.refuse(request)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if self.token and request.query_params.get("token"):
            # the token in the URL once: set the cookie and go on without it (it stays out of links and logs)
            rest = [(k, v) for k, v in parse_qsl(request.url.query, keep_blank_values=True) if k != "token"]
            resp = RedirectResponse(request.url.path + ("?" + urlencode(rest) if rest else ""), status_code=303)
            resp.set_cookie(COOKIE, self.token, httponly=True, samesite="strict", path="/")
            return await self._secure(resp)(scope, receive, send)

        async def send_secured(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
                            (b"cache-control", b"no-store")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_secured)

    def _secure(self, resp: Response) -> Response:
        resp.headers["content-security-policy"] = CSP
        resp.headers["cache-control"] = "no-store"
        return resp

    def refuse(self, request: Request) -> Response | None:
        """Why this request may not be served, as the response to send, or None."""
        host = (request.headers.get("host") or "").rsplit(":", 1)[0] if not (request.headers.get("host") or "").startswith("[") \
            else (request.headers.get("host") or "").split("]")[0] + "]"
        if self.token is None and not is_loopback(host):
            # served without a token on loopback: a page under another name (DNS rebinding) is refused
            return self._secure(PlainTextResponse("refused: this console answers only to a loopback host name\n",
                                                  status_code=421))
        if self.token is not None:
            given = request.query_params.get("token") or request.cookies.get(COOKIE) or ""
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return self._secure(PlainTextResponse(
                    "401: this console needs its token: open the URL `agentledger serve` printed (…?token=…)\n",
                    status_code=401))
        if request.method == "POST" or request.url.path in SQL_PATHS:
            # what another site's page can make a browser send (a form, an <img>) must not change or run anything
            fetch_site = request.headers.get("sec-fetch-site")
            if fetch_site is not None and fetch_site.strip().lower() not in SAME_SITE:
                return self._secure(PlainTextResponse(f"refused: a {request.method} from another site "
                                                      f"(Sec-Fetch-Site: {fetch_site[:20]})\n", status_code=403))
        if request.method == "POST":
            origin = request.headers.get("origin")
            if origin and origin != "null":
                if re.sub(r"^https?://", "", origin) != request.headers.get("host"):
                    return self._secure(PlainTextResponse("refused: cross-origin POST\n", status_code=403))
        return None

    async def _form(self, request: Request) -> dict:
        form = await request.form()
        if not hmac.compare_digest(str(form.get("csrf", "")).encode(), self.csrf.encode()):
            raise api.AgentLedgerError("refused: this form is not from this console (CSRF token missing or stale); "
                                       "reload the page")
        return {k: str(v) for k, v in form.items()}

    def render(self, template: str, status_code: int = 200, **context) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(template).render(**context), status_code=status_code)

    def call(self, fn, *args, **kwargs):
        with self.lock:
            return fn(*args, **kwargs)

    async def failed(self, request: Request, exc: Exception) -> Response:
        return self.render("error.html", status_code=400, error=str(exc), page="")

    # --- pages ---------------------------------------------------------------------------------

    def sessions(self, request: Request) -> Response:
        q = request.query_params
        filters = {k: q.get(k) or None for k in ("agent", "severity", "since", "until", "text")}
        t0 = time.perf_counter()
        page = self.call(api.sessions_page, self.settings, limit=PAGE_SIZE, cursor=q.get("after") or None, **filters)
        keep = {k: v for k, v in filters.items() if v}
        next_url = "/sessions?" + urlencode({**keep, "after": page.next_cursor}) if page.next_cursor else None
        return self.render("sessions.html", page="sessions", rows=page.rows, agents=page.agents, filters=filters,
                           next_url=next_url, first_url="/sessions?" + urlencode(keep) if q.get("after") else None,
                           elapsed_ms=(time.perf_counter() - t0) * 1000)

    def session(self, request: Request) -> Response:
        q = request.query_params
        at = q.get("at")
        try:
            at_seq = int(at) if at not in (None, "") else None
        except ValueError:
            raise api.AgentLedgerError(f"at must be a seq (a number), not {at[:40]!r}") from None
        v = self.call(self.views.view, self.settings, request.path_params["sid"], at_seq)
        focus = q.get("alert")
        evidence: set[int] = set()
        for a in v.alerts:
            if focus is None or a["alert_id"] == focus:
                evidence.update(a["evidence_seqs"] or [])
        current = v.seqs[v.position] if v.seqs else None
        return self.render("session.html", page="sessions", v=v, turns=group_timeline(v.timeline), current=current,
                           evidence=evidence, focus=focus, alert_by_id={a["alert_id"]: a for a in v.alerts})

    async def verify(self, request: Request) -> Response:
        await self._form(request)
        sid = request.path_params["sid"]
        res = self.call(api.verify, self.settings, [sid])
        return self.render("verify.html", page="sessions", sid=sid, result=res.as_dict())

    async def export(self, request: Request) -> Response:
        await self._form(request)
        # (export_to_temp writes a fixed file name in a directory of its own, and checks it did)
        directory, path, doc = self.call(api.export_to_temp, self.settings, request.path_params["sid"])
        return FileResponse(path, media_type="application/octet-stream", filename=download_name(doc["session_id"]),
                            headers={"x-bundle-sha256": doc["sha256"]},
                            background=BackgroundTask(shutil.rmtree, directory, ignore_errors=True))

    def alerts(self, request: Request) -> Response:
        q = request.query_params
        severity, triage = q.get("severity") or None, q.get("triage") or None
        rows = self.call(api.alert_queue, self.settings, severity=severity, triage=triage, limit=500).as_dicts()
        return self.render("alerts.html", page="alerts", rows=rows, severity=severity, triage=triage)

    async def label(self, request: Request) -> Response:
        form = await self._form(request)
        alert_id = request.path_params["alert_id"]
        self.call(api.label_alert, self.settings, alert_id, form.get("label", ""), note=form.get("note"),
                  by=form.get("by") or "console")
        back = form.get("back") or "/alerts"
        if not back.startswith("/") or back.startswith("//"):
            back = "/alerts"
        return RedirectResponse(back, status_code=303)

    async def whatif(self, request: Request) -> Response:
        files = self.call(api.policy_files, self.settings)
        report, chosen, pasted, sessions_sql = None, "", "", ""
        if request.method == "POST":
            form = await self._form(request)
            chosen, pasted = form.get("policy", ""), form.get("toml", "")
            sessions_sql = form.get("sessions", "").strip()
            if pasted.strip():
                report = self.call(api.whatif_text, self.settings, pasted, sessions_sql or None)
            else:
                match = [p for p in files if p.name == chosen]
                if not match:
                    raise api.AgentLedgerError("pick a policy file of the home, or paste a policy (TOML)")
                report = self.call(api.whatif, self.settings, match[0], sessions_sql or None)
        summary = api.whatif_summary(report["summary"]) if report else []
        return self.render("whatif.html", page="whatif", files=[p.name for p in files], report=report, chosen=chosen,
                           pasted=pasted, sessions_sql=sessions_sql, summary=summary)

    def sql(self, request: Request) -> Response:
        query = request.query_params.get("q", "")
        rows, cut, error = None, False, None
        if query.strip():
            try:
                rows, cut = self.call(api.sql_limited, self.settings, query, limit=SQL_ROW_LIMIT,
                                      timeout_s=self.sql_timeout_s)
            except api.AgentLedgerError as exc:
                error = str(exc)
        return self.render("sql.html", page="sql", query=query, rows=rows, cut=cut, error=error,
                           limit=SQL_ROW_LIMIT, csv_url="/sql.csv?" + urlencode({"q": query}) if rows else None)

    def sql_csv(self, request: Request) -> Response:
        query = request.query_params.get("q", "")
        rows, cut = self.call(api.sql_limited, self.settings, query, limit=CSV_ROW_LIMIT, timeout_s=self.sql_timeout_s)
        buf = io.StringIO()
        w = csv.writer(buf)
        if rows is not None:
            w.writerow([_csv_cell(c) for c in rows.columns])
            w.writerows([[_csv_cell(v) for v in r] for r in rows.rows])
        return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": 'attachment; filename="query.csv"',
                                 **({"x-rows-cut": str(CSV_ROW_LIMIT)} if cut else {})})


def download_name(session_id: str, suffix: str = ".avro") -> str:
    """A file name for a session's download: only [A-Za-z0-9._-] of its id (the recorded agent chose
    it), other characters as '_', no leading dot."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", session_id)[:100].lstrip(".")
    return (name or "session") + suffix


def group_timeline(timeline: list[dict]) -> list[dict]:
    """Timeline entries as turns (consecutive events of one turn_id) of tool calls (consecutive
    events of one tool_call_id; events of no tool call are their own group)."""
    turns: list[dict] = []
    for e in timeline:
        if not turns or turns[-1]["turn_id"] != e["turn_id"]:
            turns.append({"turn_id": e["turn_id"], "calls": []})
        calls = turns[-1]["calls"]
        if not calls or calls[-1]["tool_call_id"] != e["tool_call_id"] or e["tool_call_id"] is None:
            calls.append({"tool_call_id": e["tool_call_id"], "events": []})
        calls[-1]["events"].append(e)
    return turns


def make_app(settings, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
             sql_timeout_s: float = SQL_TIMEOUT_S) -> Console:
    return Console(settings, host=host, port=port, token=token, sql_timeout_s=sql_timeout_s)


def serve(console: Console, *, log_level: str = "warning") -> None:
    """Run the console with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(console, host=console.host, port=console.port, log_level=log_level, access_log=False,
                proxy_headers=False, server_header=False)


def url(console: Console) -> str:
    host = f"[{console.host}]" if ":" in console.host else console.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "[::]") else host
    return f"http://{shown}:{console.port}/" + (f"?token={console.token}" if console.token else "")


__all__ = ["Console", "make_app", "serve", "url", "group_timeline", "is_loopback"]
