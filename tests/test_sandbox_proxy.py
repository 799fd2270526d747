"""The egress proxy on its own (real unix socket, real HTTP servers on 127.0.0.1): per-request policy,
ask rules as approvals, CONNECT tunnels, recorded bodies, and replay mode that never goes out."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
import uuid

import pytest

from agentledger.producers.sandbox.approvals import Approver
from agentledger.producers.sandbox.cas import ContentStore
from agentledger.producers.sandbox.proxy import EgressProxy, ReplayResponses, network_digest, redact_url, request_key
from sandbox_support import NO_LOCAL, Server, policy
from agentledger.schemas.policy import Policy


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.unix_path)


def get(proxy: EgressProxy, url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    c = UnixHTTPConnection(proxy.socket_path)
    c.request(method, url, body=body, headers=headers or {})
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



def test_every_spelling_of_a_denied_address_and_a_name_resolving_into_it_are_denied(tmp_path):
    """Issue 21: ``[::ffff:127.0.0.1]`` got through a deny rule for 127.0.0.0/8, and so did
    ``localhost``: the proxy decides at the address it would connect to."""
    s = Server({"/x": b"local secret\n"})
    proxy, seen = make(tmp_path, Policy.from_toml(NO_LOCAL))
    try:
        for host in ["[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0x7f.1", "2130706433", "0177.0.0.1", "127.1",
                     "%31%32%37.0.0.1", "localhost", "LocalHost."]:
            status, headers, _ = get(proxy, f"http://{host}:{s.port}/x", headers={"Host": "app"})
            assert (status, headers.get("X-Agentledger-Rule")) == (403, "no-local"), host
            dec = [p for k, p in seen if k == "network_decided"][-1]
            assert (dec["decision"], dec["rule"], dec["addresses"]) == ("deny", "no-local", ["127.0.0.1"]), host
        assert "localhost" in dec["reason"] and "resolved to 127.0.0.1" in dec["reason"]
        for target in [f"[::ffff:127.0.0.1]:{s.port}", f"localhost:{s.port}", f"0x7f.1:{s.port}"]:
            status, headers, _ = get(proxy, target, method="CONNECT")
            assert (status, headers.get("X-Agentledger-Rule")) == (403, "no-local"), target
        assert s.hits == []
        att = [p for k, p in seen if k == "network_attempted"]
        assert att[0]["host"] == "::ffff:127.0.0.1"  # what was asked for stays recorded as asked
    finally:
        proxy.stop()
        s.stop()


def test_address_rules_allow_names_through_their_resolution_and_name_denials_resolve_nothing(tmp_path):
    s = Server({"/x": b"ok\n"})
    pol = Policy.from_toml(f"""
[network]
default = "deny"
[[network.rules]]
id = "loopback"
action = "allow"
cidrs = ["127.0.0.1/32"]
ports = [{s.port}]
[[network.rules]]
id = "no-metadata-name"
action = "deny"
hosts = ["metadata.google.internal", "*.localhost"]
""")
    proxy, seen = make(tmp_path, pol)
    try:
        status, _, body = get(proxy, f"http://localhost:{s.port}/x")
        assert (status, body) == (200, b"ok\n")
        dec = [p for k, p in seen if k == "network_decided"][-1]
        assert (dec["decision"], dec["rule"], dec["addresses"]) == ("allow", "loopback", ["127.0.0.1"])
        status, headers, _ = get(proxy, f"http://x.localhost:{s.port}/x")
        assert (status, headers["X-Agentledger-Rule"]) == (403, "no-metadata-name")
        assert [p for k, p in seen if k == "network_decided"][-1]["addresses"] == []  # never resolved
        assert proxy.exchanges[0].addresses == ("127.0.0.1",)
    finally:
        proxy.stop()
        s.stop()


REBIND = r"""
import http.client, http.server, json, socket, sys, threading, uuid
from agentledger.producers.sandbox.approvals import Answer
from agentledger.producers.sandbox.proxy import EgressProxy
from agentledger.schemas.policy import Policy

hosts_file, sock_path = sys.argv[1], sys.argv[2]

def serve(addr, port, name, hits):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(name)
            self.send_response(200); self.send_header("Content-Length", str(len(name))); self.end_headers()
            self.wfile.write(name.encode())
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer((addr, port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv

hits = []
good = serve("127.0.0.2", 0, "good", hits)
port = good.server_address[1]
evil = serve("127.0.0.3", port, "evil", hits)
resolved_when_asked = []

class Rebinder:
    # the one answering the approval: meanwhile the name is re-pointed, as a rebinding DNS server would
    def decide(self, ask):
        if resolved_when_asked:  # asked again: no
            return Answer("denied", "user", "test", None, 0)
        with open(hosts_file, "r+") as f:
            f.write("127.0.0.3 rebind.test\n"); f.truncate()
        resolved_when_asked.append(socket.getaddrinfo("rebind.test", port, type=socket.SOCK_STREAM)[0][4][0])
        return Answer("approved", "user", "test", None, 0)

pol = Policy.from_toml('''
[network]
default = "deny"
[[network.rules]]
id = "good-server"
action = "allow"
cidrs = ["127.0.0.2/32"]
[[network.rules]]
id = "ask-rebind"
action = "ask"
hosts = ["rebind.test"]
''')
seen = []
proxy = EgressProxy(pol, sock_path, observe=lambda k, p, t: seen.append((k, p)), approver=Rebinder(),
                    new_id=lambda: uuid.uuid4().hex, command_id=None).start()

def get():
    c = http.client.HTTPConnection("localhost", timeout=30)
    c.sock = socket.socket(socket.AF_UNIX); c.sock.connect(sock_path)
    c.request("GET", f"http://rebind.test:{port}/")
    r = c.getresponse(); body = r.read(); c.close(); proxy.wait_idle(10)
    return r.status, body.decode()

first = get()
second = get()
proxy.stop()
print(json.dumps({"first": first, "second": second, "hits": hits, "resolved_when_asked": resolved_when_asked,
                  "decided": [p for k, p in seen if k == "network_decided"]}))
"""


def test_dns_rebinding_between_the_decision_and_the_connection_does_not_reach_the_new_address(tmp_path):
    """The name resolves to an allowed address when it is decided and to another one right after
    (a real resolver reading a real /etc/hosts, changed while the approval is asked, in a mount
    namespace of its own): the proxy connects to the address it decided at, never re-resolves."""
    import subprocess
    import sys

    from conftest import REPO
    from agentledger.producers.sandbox.runner import Tools

    tools = Tools.find()  # fails loudly without bwrap
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.2 rebind.test\n")
    argv = [tools.bwrap, "--unshare-user", "--dev-bind", "/", "/", "--bind", str(hosts), "/etc/hosts", "--",
            sys.executable, "-c", REBIND, str(hosts), str(tmp_path / "proxy.sock")]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["resolved_when_asked"] == ["127.0.0.3"]  # a proxy resolving again would have gone there
    assert r["first"] == [200, "good"] and r["hits"] == ["good"]
    assert (r["decided"][0]["decision"], r["decided"][0]["addresses"]) == ("ask", ["127.0.0.2"])
    # the next request is decided (and asked) at the new address
    assert r["second"][0] == 403 and r["decided"][1]["addresses"] == ["127.0.0.3"]


def raw(proxy: EgressProxy, request: bytes, *, hang_up: bool = False) -> bytes:
    """``request`` as bytes on the proxy's socket; its answer (nothing when the client hangs up
    right after sending)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(proxy.socket_path)
    s.sendall(request)
    if hang_up:
        s.close()
        return b""
    f = s.makefile("rb")
    data = f.read()
    f.close()
    s.close()
    return data


def test_a_connect_port_outside_1_to_65535_is_refused_not_wrapped_past_a_port_rule(tmp_path, servers):
    """Found by an audit: ``CONNECT 127.0.0.1:P+65536`` was decided at P+65536 (no port rule matched)
    and the resolver cut it to 16 bits, so it reached port P, which a rule denies."""
    a, _, _ = servers
    pol = Policy.from_toml(f"""
[network]
default = "deny"
[[network.rules]]
id = "local"
action = "allow"
hosts = ["127.0.0.1"]
[[network.rules]]
id = "not-this-port"
action = "deny"
ports = [{a.port}]
""")
    proxy, seen = make(tmp_path, pol)
    try:
        assert raw(proxy, f"CONNECT 127.0.0.1:{a.port} HTTP/1.1\r\n\r\n".encode()).startswith(b"HTTP/1.1 403")
        for port in (a.port + 65536, f"+{a.port}", "0", "65536", "", f"{a.port}_0", f"0{a.port}00", "٤٤٣"):
            answer = raw(proxy, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 400"), (port, answer[:80])
        answer = raw(proxy, f"GET http://127.0.0.1:{a.port + 65536}/ok.txt HTTP/1.1\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 400") and b"not a TCP port" in answer
        assert proxy.wait_idle(10) and a.hits == []
        assert [p["decision"] for k, p in seen if k == "network_decided"] == ["deny"]
    finally:
        proxy.stop()


def test_the_upstream_gets_the_host_the_policy_decided_on_not_the_clients_host_header(tmp_path, servers):
    """Found by an audit: the client's ``Host: admin.internal`` was forwarded to an allowed address,
    so a server choosing its site by name served one the policy denies by name."""
    a, _, _ = servers
    pol = Policy.from_toml(policy(allowed=a.port) + '\n[[network.rules]]\nid = "no-admin"\naction = "deny"\n'
                           'hosts = ["admin.internal"]\n')
    proxy, _ = make(tmp_path, pol)
    try:
        status, _, _ = get(proxy, a.url("/ok.txt"), headers={"Host": "admin.internal"})
        assert status == 200 and a.hosts == [f"127.0.0.1:{a.port}"]
        status, headers, _ = get(proxy, f"http://admin.internal:{a.port}/ok.txt")
        assert (status, headers["X-Agentledger-Rule"]) == (403, "no-admin") and len(a.hits) == 1
    finally:
        proxy.stop()


def test_a_name_denied_anyway_is_never_resolved_when_address_rules_only_deny(tmp_path, monkeypatch):
    """Found by an audit: one deny-only address rule (the docs' metadata example) made every name go to
    the host's resolver before its 403: a DNS channel out of the sandbox (the name carries the data)."""
    looked_up = []
    real = socket.getaddrinfo

    def spy(host, *args, **kwargs):
        looked_up.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    base = '[network]\ndefault = "deny"\n[[network.rules]]\nid = "metadata"\naction = "deny"\ncidrs = ["169.254.169.254/32"]\n'
    for text, resolved in ((base, []),
                           (base + '[[network.rules]]\nid = "lan"\naction = "allow"\ncidrs = ["10.0.0.0/8"]\n',
                            ["data-in-the-name.localhost"])):
        looked_up.clear()
        proxy, seen = make(tmp_path, Policy.from_toml(text))
        try:
            assert raw(proxy, b"CONNECT data-in-the-name.localhost:443 HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 403")
            assert proxy.wait_idle(10)
        finally:
            proxy.stop()
        assert looked_up == resolved  # an allowing address rule could lift the deny: only then resolved
        assert [p["rule"] for k, p in seen if k == "network_decided"] == ["network.default"]


def test_a_client_that_hangs_up_at_once_still_leaves_the_requests_record(tmp_path, servers):
    """Found by an audit: a request sent and the socket closed at once reached the server, but the
    reply to the gone client raised before ``network_completed`` (and the manifest entry) was written."""
    a, d, _ = servers
    proxy, seen = make(tmp_path, Policy.from_toml(policy(allowed=a.port, denied=d.port)))
    try:
        def completed_count() -> int:
            return sum(k == "network_completed" for k, _ in seen)

        for n, request in enumerate([f"GET {a.url('/ok.txt')} HTTP/1.1\r\nHost: x\r\n\r\n",
                                     f"GET {a.url('/ok.txt?again=1')} HTTP/1.1\r\n\r\n",
                                     f"GET {d.url('/no.txt')} HTTP/1.1\r\n\r\n",
                                     f"CONNECT 127.0.0.1:{a.port} HTTP/1.1\r\n\r\n"], 1):
            raw(proxy, request.encode(), hang_up=True)
            deadline = time.monotonic() + 20
            while completed_count() < n and time.monotonic() < deadline:
                time.sleep(0.02)
        assert proxy.wait_idle(10)
        attempts = [p["attempt_id"] for k, p in seen if k == "network_attempted"]
        completed = {p["attempt_id"]: p for k, p in seen if k == "network_completed"}
        assert len(attempts) == 4 and set(completed) == set(attempts)
        assert completed[attempts[2]]["outcome"] == "blocked"
        assert len(a.hits) == 2 and len(proxy.exchanges) == 4
    finally:
        proxy.stop()


def test_recorded_urls_and_the_approval_prompt_show_control_characters_instead_of_sending_them(tmp_path):
    """Found by an audit: a path with escape sequences could erase the prompt's destination line and
    draw another one in its place."""
    import os
    import select

    from agentledger.producers.sandbox.approvals import Ask

    url = redact_url("http://127.0.0.2/x\x1b[2K\x1b[1Gdestination: GET https://pypi.org/\u202e")
    assert "\x1b" not in url and "%1B%5B2K" in url and "%E2%80%AE" in url
    master, slave = os.openpty()
    try:
        os.write(master, b"n\n")
        pol = Policy.from_toml('[approvals]\ntimeout_s = 5\n')
        answer = Approver(pol, interactive=True, tty=os.ttyname(slave)).decide(
            Ask("network", "GET http://127.0.0.2/\x1b[2K\rGET https://pypi.org/", "d" * 64, "ask", "because\x07",
                details=(("attempt", "a\x9b1"),)))
        shown = b""
        while select.select([master], [], [], 1)[0]:  # everything the prompt wrote (a read may get part)
            shown += os.read(master, 65536)
    finally:
        os.close(master)
        os.close(slave)
    assert answer.decision == "denied"
    assert b"\x1b" not in shown and b"\x07" not in shown and "\x9b".encode() not in shown
    assert b"\\x1b[2K\\x0dGET https://pypi.org/" in shown and b"because\\x07" in shown
