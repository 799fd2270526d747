"""The egress proxy on its own (real unix socket, real HTTP servers on 127.0.0.1): per-request policy,
ask rules as approvals, CONNECT tunnels, recorded bodies, and replay mode that never goes out."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import uuid

import pytest

from producers.sandbox.approvals import Approver
from producers.sandbox.cas import ContentStore
from producers.sandbox.proxy import EgressProxy, ReplayResponses, network_digest, redact_url, request_key
from sandbox_support import Server, policy
from schemas.policy import Policy


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.unix_path)


def get(proxy: EgressProxy, url: str, method: str = "GET", body: bytes | None = None):
    c = UnixHTTPConnection(proxy.socket_path)
    c.request(method, url, body=body)
    r = c.getresponse()
    data = r.read()
    c.close()
    assert proxy.wait_idle(10)
    return r.status, dict(r.getheaders()), data


@pytest.fixture
def servers():
    a = Server({"/ok.txt": b"fine\n" * 100})
    d = Server({"/no.txt": b"never\n"})
    q = Server({"/ask.txt": b"asked\n"})
    yield a, d, q
    for s in (a, d, q):
        s.stop()


def make(tmp_path, pol: Policy, *, store=None, replay=None, noninteractive="deny", max_body=None):
    seen = []
    p = EgressProxy(pol, str(tmp_path / f"p-{uuid.uuid4().hex[:6]}.sock"),
                    observe=lambda k, pl, t: seen.append((k, pl)), approver=Approver(pol, interactive=False),
                    new_id=lambda: uuid.uuid4().hex, command_id="cmd-1", store=store, replay=replay,
                    max_body_bytes=max_body)
    return p.start(), seen


def kinds(seen):
    return [k for k, _ in seen]


def test_allowed_denied_and_asked_requests(tmp_path, servers):
    a, d, q = servers
    pol = Policy.from_toml(policy(allowed=a.port, denied=d.port, asked=q.port, noninteractive="allow"))
    store = ContentStore.open(tmp_path / "home", {})
    proxy, seen = make(tmp_path, pol, store=store)
    try:
        status, _, body = get(proxy, a.url("/ok.txt?key=s3cret#frag"))
        assert (status, body) == (200, b"fine\n" * 100)
        assert kinds(seen) == ["network_attempted", "network_decided", "network_completed"]
        att, dec, com = (p for _, p in seen)
        assert att["url"] == a.url("/ok.txt?key=REDACTED") and att["method"] == "GET" and att["command_id"] == "cmd-1"
        assert (dec["decision"], dec["rule"]) == ("allow", "allowed-server")
        assert (com["outcome"], com["status"], com["bytes_in"]) == ("ok", 200, 500)
        assert com["response_digest"] == hashlib.sha256(b"fine\n" * 100).hexdigest()
        ex = proxy.exchanges[0]
        assert ex.body_stored and store.get(ex.body_digest) == body
        record = store.get_json(ex.response)
        assert record["status"] == 200 and any(k.lower() == "content-length" for k, _ in record["headers"])

        seen.clear()
        status, headers, body = get(proxy, d.url("/no.txt"))
        assert status == 403 and headers["X-Agentledger-Rule"] == "blocked-server" and d.hits == []
        assert [p.get("decision") or p.get("outcome") for _, p in seen[1:]] == ["deny", "blocked"]

        seen.clear()
        status, _, body = get(proxy, q.url("/ask.txt"))
        assert (status, body) == (200, b"asked\n")
        assert kinds(seen)[:4] == ["network_attempted", "network_decided", "approval_requested", "approval_decided"]
        req, decided = seen[2][1], seen[3][1]
        assert req["action_kind"] == "network" and req["action_digest"] == network_digest("http", "127.0.0.1", q.port)
        assert (decided["decision"], decided["decided_by"], decided["rule"]) == ("approved", "policy",
                                                                                  "approvals.noninteractive")
        assert decided["action_digest"] == req["action_digest"] and q.hits == ["/ask.txt"]

        seen.clear()
        status, _, _ = get(proxy, "http://example.invalid/")  # no rule: the default denies, nothing resolves
        assert status == 403 and seen[1][1]["rule"] == "network.default"
    finally:
        proxy.stop()


def test_ask_denied_without_a_terminal_and_default_deny(tmp_path, servers):
    _, _, q = servers
    pol = Policy.from_toml(policy(asked=q.port, noninteractive="deny"))
    proxy, seen = make(tmp_path, pol)
    try:
        status, headers, _ = get(proxy, q.url("/ask.txt"))
        assert status == 403 and q.hits == []
        assert seen[3][1]["decision"] == "denied" and seen[-1][1]["outcome"] == "blocked"
    finally:
        proxy.stop()


def test_connect_tunnels_are_enforced_and_counted(tmp_path, servers):
    a, d, _ = servers
    pol = Policy.from_toml(policy(allowed=a.port, denied=d.port))
    proxy, seen = make(tmp_path, pol)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(proxy.socket_path)
        s.sendall(f"CONNECT 127.0.0.1:{a.port} HTTP/1.1\r\nHost: 127.0.0.1:{a.port}\r\n\r\n".encode())
        f = s.makefile("rb")
        assert f.readline().startswith(b"HTTP/1.1 200")
        assert f.readline() == b"\r\n"
        s.sendall(b"GET /ok.txt HTTP/1.0\r\nHost: x\r\n\r\n")  # plain HTTP inside the tunnel
        data = f.read()
        f.close()
        s.close()
        assert proxy.wait_idle(10)
        assert data.startswith(b"HTTP/1.0 200") and data.endswith(b"fine\n")
        com = seen[-1][1]
        assert seen[0][1]["protocol"] == "https" and seen[0][1]["method"] == "CONNECT"
        assert com["outcome"] == "ok" and com["bytes_in"] == len(data) and com["bytes_out"] > 0
        assert com["response_digest"] is None  # encrypted in real life: never recorded

        status, headers, _ = get(proxy, f"127.0.0.1:{d.port}", method="CONNECT")
        assert status == 403 and headers["X-Agentledger-Rule"] == "blocked-server"
    finally:
        proxy.stop()


def test_unreachable_upstream_is_an_outcome_not_a_crash(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pol = Policy.from_toml(policy(allowed=port))
    proxy, seen = make(tmp_path, pol)
    try:
        status, _, body = get(proxy, f"http://127.0.0.1:{port}/x")
        assert status == 502 and b"cannot reach" in body
        assert seen[-1][1]["outcome"] == "refused"
    finally:
        proxy.stop()


def test_body_bound_keeps_the_digest_but_not_the_body(tmp_path, servers):
    a, _, _ = servers
    store = ContentStore.open(tmp_path / "home", {})
    proxy, seen = make(tmp_path, Policy.from_toml(policy(allowed=a.port)), store=store, max_body=100)
    try:
        status, _, body = get(proxy, a.url("/ok.txt"))
        assert status == 200 and len(body) == 500
        ex = proxy.exchanges[0]
        assert not ex.body_stored and ex.body_digest == hashlib.sha256(body).hexdigest() and not store.has(ex.body_digest)
        assert seen[-1][1]["response_digest"] == ex.body_digest
    finally:
        proxy.stop()


def test_replay_mode_serves_the_recording_and_never_goes_out(tmp_path, servers):
    a, _, _ = servers
    pol = Policy.from_toml(policy(allowed=a.port))
    store = ContentStore.open(tmp_path / "home", {})
    rec, _ = make(tmp_path, pol, store=store)
    try:
        get(rec, a.url("/ok.txt"))
    finally:
        rec.stop()
    exchanges = [{"attempt_id": e.attempt_id, "request_key": e.request_key, "response": e.response}
                 for e in rec.exchanges]
    assert exchanges[0]["request_key"] == request_key("GET", a.url("/ok.txt"), b"")
    a.stop()  # nothing to reach any more
    hits_before = list(a.hits)
    replay, seen = make(tmp_path, pol, replay=ReplayResponses(store, exchanges))
    try:
        status, headers, body = get(replay, a.url("/ok.txt"))
        assert (status, body) == (200, b"fine\n" * 100) and headers["Content-Length"] == "500"
        assert seen[-1][1]["response_digest"] == hashlib.sha256(body).hexdigest()
        status, _, body = get(replay, a.url("/ok.txt"))  # recorded once: a second request was never answered
        assert status == 502 and b"not in the recording" in body and seen[-1][1]["outcome"] == "error"
        status, _, _ = get(replay, f"127.0.0.1:{a.port}", method="CONNECT")
        assert status == 502
    finally:
        replay.stop()
    assert a.hits == hits_before
    over, seen = make(tmp_path, pol, replay=ReplayResponses(store, exchanges, {exchanges[0]["attempt_id"]: b"other"}))
    try:
        assert get(over, a.url("/ok.txt"))[2] == b"other"
    finally:
        over.stop()


def test_recorded_urls_carry_no_credentials_or_query_values():
    assert redact_url("http://user:pw@Host.example:8080/p/a?token=abc&x=&y=1#frag") == \
        "http://host.example:8080/p/a?token=REDACTED&x=REDACTED&y=REDACTED"
    assert redact_url("https://h/") == "https://h/"
    assert json.dumps(redact_url("http://h/?a=%20b")).count("%20") == 0
