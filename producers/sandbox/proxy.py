"""The egress proxy: the sandbox's only way out, enforcing the policy's network rules per request.

It listens on a unix socket on the host; the launcher inside the sandbox relays 127.0.0.1:PORT to
it, and the command's environment names it as HTTP_PROXY / HTTPS_PROXY / ALL_PROXY. For every
request (absolute-form HTTP, or CONNECT for HTTPS and other TCP) it records
``network_attempted`` → ``network_decided`` (the matching rule) → optionally an approval pair
(``ask`` rules; bound to the digest of the destination) → ``network_completed``.

Record mode forwards allowed requests and keeps plain-HTTP response bodies (up to the store's
blob bound) in the recording store, so ``network_completed.response_digest`` names the exact
bytes the command received. Replay mode never touches the network: it answers allowed requests
with the recorded response for the same request (method, full URL, body digest; in order), and
says so when there is none. CONNECT tunnels are end-to-end encrypted, so their contents are
neither recorded nor replayable: the record shows destination, decision and byte counts.

Destinations are resolved and connected from the host's point of view: a rule allowing
``127.0.0.1`` allows the host's loopback, which is why the default is to deny. A host name is
resolved once, every address it resolved to is decided (address rules match them; the most
restrictive decision wins), the addresses are recorded in ``network_decided.addresses``, and the
proxy connects only to those addresses: a second resolution (DNS rebinding) never reaches the
connection. An address literal in any spelling (``0x7f.1``, ``[::ffff:127.0.0.1]``) is decided and
connected as its canonical address (`schemas.netaddr`). A name a name rule denies is not resolved.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import socket
import socketserver
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Callable
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from agentledger.producers.recorder import action_digest
from agentledger.schemas.netaddr import HostError, canonical, parse_host
from agentledger.schemas.policy import Policy

from .approvals import Ask
from .cas import ContentStore, sha256_hex

HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "proxy-authenticate", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade"}
Observe = Callable[[str, dict, int], None]


def now_us() -> int:
    return time.time_ns() // 1000


def tcp_port(text: str) -> int | None:
    """A port as a request spells it: 1-5 ASCII digits naming 1..65535, else None."""
    if not (text.isascii() and text.isdigit() and len(text) <= 5):
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


# a path as recorded and shown: control characters (which could rewrite an approval prompt on a
# terminal), spaces and non-ASCII percent-encoded; what is already percent-encoded is kept
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


def redact_url(url: str) -> str:
    """The URL as recorded: no user info, query values replaced, no fragment, no control characters."""
    p = urlsplit(url)
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{p.port}" if p.port else "")
    query = urlencode([(k, "REDACTED") for k, _ in parse_qsl(p.query, keep_blank_values=True)], quote_via=quote,
                      safe="REDACTED")
    return urlunsplit((p.scheme, netloc, quote(p.path or "/", safe=_PATH_SAFE), query, ""))


def request_key(method: str, url: str, body: bytes) -> str:
    return hashlib.sha256(f"{method.upper()}\x00{url}\x00{sha256_hex(body)}".encode()).hexdigest()


def network_digest(protocol: str, host: str, port: int) -> str:
    """What a network approval is bound to: the destination, not one request."""
    return action_digest("network", protocol, host.lower(), port)


@dataclass
class Exchange:
    """One request as the manifest remembers it (for re-execution)."""
    attempt_id: str
    request_key: str | None
    response: str | None  # digest of the response record blob (status, headers, body digest)
    body_digest: str | None
    body_stored: bool
    addresses: tuple[str, ...] = ()  # what the host was decided at (re-execution decides at them again)


@dataclass(frozen=True)
class Target:
    """One address a destination was decided at, and how to connect to exactly it."""
    address: str  # canonical (what the policy decided on and the event records)
    family: int
    sockaddr: tuple


def targets(host: str, port: int) -> tuple[list[Target], str | None]:
    """The addresses to decide and connect at: an address literal's canonical address, or what a
    host name resolves to *now*, once (each address once, in the resolver's order). Returns
    (targets, why there are none)."""
    try:
        h = parse_host(host)
    except HostError as exc:
        return [], str(exc)
    if h.address is not None:
        name, flags = str(h.address) + (f"%{h.zone}" if h.zone else ""), socket.AI_NUMERICHOST
    else:
        name, flags = h.text, 0
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=flags)
    except (OSError, UnicodeError) as exc:
        return [], f"cannot resolve {host}: {exc}"
    out: dict[str, Target] = {}
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = str(canonical(ipaddress.ip_address(sockaddr[0].split("%", 1)[0])))
        out.setdefault(address, Target(address, family, sockaddr))
    return list(out.values()), None if out else f"{host} has no IPv4 or IPv6 address"


def connect_to(checked: list[Target], timeout: float, why_none: str | None = None) -> socket.socket:
    """A TCP connection to the first of the ``checked`` addresses that accepts (never anything else:
    no name is resolved here)."""
    last: OSError | None = None
    for t in checked:
        sock = socket.socket(t.family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(t.sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last or OSError(why_none or "no address to connect to")


class ReplayResponses:
    """Recorded responses by request key, served in recorded order."""

    def __init__(self, store: ContentStore, exchanges: list[dict], overrides: dict[str, bytes] | None = None):
        self.store = store
        self.queues: dict[str, deque] = defaultdict(deque)
        for ex in exchanges:
            if ex.get("request_key"):
                self.queues[ex["request_key"]].append(ex)
        self.overrides = overrides or {}
        self._lock = threading.Lock()

    def addresses(self, key: str) -> list[str]:
        """The addresses the next recorded exchange with this key was decided at."""
        with self._lock:
            q = self.queues.get(key)
            return list(q[0].get("addresses") or []) if q else []

    def take(self, key: str) -> tuple[dict, bytes] | None:
        """(response record, body) for the next recorded exchange with this key, or None."""
        with self._lock:
            q = self.queues.get(key)
            if not q:
                return None
            ex = q.popleft()
        if not ex.get("response"):
            return None
        record = self.store.get_json(ex["response"])
        if ex["attempt_id"] in self.overrides:
            body = self.overrides[ex["attempt_id"]]
        else:
            body = self.store.get_or_none(record.get("body")) if record.get("body_stored") else None
            if body is None:
                return None
        return record, body


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    proxy: "EgressProxy"


class EgressProxy:
    def __init__(self, policy: Policy, socket_path: str, *, observe: Observe, approver, new_id: Callable[[], str],
                 command_id: str | None, store: ContentStore | None = None, replay: ReplayResponses | None = None,
                 max_body_bytes: int | None = None, connect_timeout: float = 30.0):
        self.policy = policy
        self.socket_path = socket_path
        self.observe = observe
        self.approver = approver
        self.new_id = new_id
        self.command_id = command_id
        self.store = store
        self.replay = replay
        self.max_body_bytes = max_body_bytes if max_body_bytes is not None else (
            store.max_blob_bytes if store else 0)
        self.connect_timeout = connect_timeout
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active: dict[int, list[socket.socket]] = {}  # handler id -> its sockets
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "EgressProxy":
        old = os.umask(0o177)
        try:
            self._server = _Server(self.socket_path, _Handler)
        finally:
            os.umask(old)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="agentledger-egress-proxy", daemon=True)
        self._thread.start()
        return self

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every request being handled has been recorded; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._active, timeout)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let requests in flight finish and be recorded (a command that exits right
        after reading its response must not lose the ``network_completed``), then cut what is left."""
        if self._server is not None:
            self._server.shutdown()
            if not self.wait_idle(grace_s):
                with self._lock:
                    stuck = [s for socks in self._active.values() for s in socks]
                for sock in stuck:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                self.wait_idle(grace_s)
            self._server.server_close()
            self._server = None
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "EgressProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- policy ---------------------------------------------------------------------------------
    @property
    def policy_source(self) -> str:
        return self.policy.source or self.policy.name

    def attempt(self, host: str, port: int, protocol: str, method: str, url: str | None) -> str:
        attempt_id = self.new_id()
        self.observe("network_attempted", {"attempt_id": attempt_id, "host": host, "port": int(port),
                                           "protocol": protocol, "method": method, "url": url,
                                           "command_id": self.command_id}, now_us())
        return attempt_id

    def destination(self, host: str, port: int, protocol: str, method: str,
                    replay_key: str | None = None) -> tuple[list[Target], str | None]:
        """Where a request may go, before it is decided: nothing for a name a name rule denies (it is
        not even resolved) or, when re-executing, the addresses the recording decided at (nothing
        is resolved then); else `targets`."""
        try:
            if parse_host(host).is_address:
                return targets(host, port)  # no resolver involved
        except HostError as exc:
            return [], str(exc)
        if self.replay is not None:
            recorded = self.replay.addresses(replay_key) if replay_key else []
            return [Target(a, 0, ()) for a in recorded], "re-execution does not resolve names"
        d = self.policy.evaluate_network(host, port, protocol, method)
        if d.action == "deny" and (d.rule is not None or not self.policy.resolves_names()):
            return [], f"denied by {d.rule or 'network.default'} before resolving"
        return targets(host, port)

    def gate(self, attempt_id: str, host: str, port: int, protocol: str, method: str, subject: str,
             at: list[Target]) -> tuple[bool, str | None]:
        """Decide at the addresses ``at`` (and record the decision, asking when the rule says so).
        Returns (allowed, rule)."""
        addresses = [t.address for t in at]
        d = self.policy.evaluate_network(host, port, protocol, method, addresses=addresses)
        d = type(d)(d.action, d.rule or "network.default", d.reason)
        self.observe("network_decided", {"attempt_id": attempt_id, "decision": d.action, "rule": d.rule,
                                         "reason": d.reason, "policy_source": self.policy_source,
                                         "addresses": addresses}, now_us())
        if d.action == "allow":
            return True, d.rule
        if d.action == "deny":
            return False, d.rule
        ask = Ask("network", subject, network_digest(protocol, host, port), d.rule, d.reason,
                  details=(("attempt", attempt_id),))
        request_id = self.new_id()
        self.observe("approval_requested", {"request_id": request_id, "action_kind": "network", "subject": subject,
                                            "action_digest": ask.action_digest, "risk": "medium",
                                            "justification": None, "command_id": self.command_id}, now_us())
        ans = self.approver.decide(ask)
        self.observe("approval_decided", {"request_id": request_id, "decision": ans.decision,
                                          "decided_by": ans.decided_by, "decider": ans.decider, "rule": ans.rule,
                                          "latency_ms": ans.latency_ms, "action_digest": ask.action_digest}, now_us())
        return ans.approved, d.rule

    def completed(self, attempt_id: str, outcome: str, *, status: int | None = None, bytes_in: int = 0,
                  bytes_out: int = 0, started: float, response_digest: str | None = None,
                  error: str | None = None, at_us: int | None = None) -> None:
        """``at_us``: when the last byte was handed to the client (taken *before* writing it, so the
        event is ordered before anything the command does with the response)."""
        self.observe("network_completed", {"attempt_id": attempt_id, "outcome": outcome, "status": status,
                                           "bytes_in": int(bytes_in), "bytes_out": int(bytes_out),
                                           "duration_ms": int((time.monotonic() - started) * 1000),
                                           "response_digest": response_digest, "error": error},
                     at_us if at_us is not None else now_us())

    def _begin(self, key: int, sock: socket.socket) -> None:
        with self._lock:
            self._active[key] = [sock]

    def _track(self, key: int, sock: socket.socket) -> None:
        with self._lock:
            self._active.setdefault(key, []).append(sock)

    def _end(self, key: int) -> None:
        with self._idle:
            self._active.pop(key, None)
            self._idle.notify_all()

    def remember(self, ex: Exchange) -> None:
        with self._lock:
            self.exchanges.append(ex)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - the proxy's record is the event stream
        pass

    @property
    def proxy(self) -> EgressProxy:
        return self.server.proxy

    def setup(self):
        super().setup()
        self.server.proxy._begin(id(self), self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.proxy._end(id(self))

    def _reply(self, status: int, text: str, extra: dict | None = None) -> int:
        """Answer with a short text (a client that has hung up is no error here: what the proxy
        decided and did is recorded after this either way)."""
        body = (text + "\n").encode()
        self.close_connection = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass
        return len(body)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    # -- CONNECT --------------------------------------------------------------------------------
    def do_CONNECT(self):
        px = self.proxy
        started = time.monotonic()
        host, _, port_s = self.path.rpartition(":")
        host = host.strip("[]")
        port = tcp_port(port_s)
        if not host or port is None:
            # (int() would take "+443", "4_43" and 108081, which the resolver wraps to 42545)
            self._reply(400, f"agentledger egress proxy: bad CONNECT target {self.path!r}")
            return
        attempt_id = px.attempt(host, port, "https", "CONNECT", None)
        at, why_none = px.destination(host, port, "https", "CONNECT")
        allowed, rule = px.gate(attempt_id, host, port, "https", "CONNECT", f"CONNECT {host}:{port}", at)
        addresses = tuple(t.address for t in at)
        if not allowed:
            handed = now_us()
            self._reply(403, f"agentledger egress proxy: {host}:{port} blocked by policy (rule {rule})",
                        {"X-Agentledger-Rule": str(rule)})
            px.completed(attempt_id, "blocked", started=started, error=f"denied by {rule}", at_us=handed)
            px.remember(Exchange(attempt_id, None, None, None, False, addresses))
            return
        if px.replay is not None:
            handed = now_us()
            self._reply(502, "agentledger egress proxy: HTTPS tunnels cannot be served from a recording")
            px.completed(attempt_id, "error", started=started, error="tunnel not replayable", at_us=handed)
            return
        try:
            upstream = connect_to(at, px.connect_timeout, why_none)
        except OSError as exc:
            outcome = "timeout" if isinstance(exc, TimeoutError) else "refused" if isinstance(exc, ConnectionRefusedError) else "error"
            handed = now_us()
            self._reply(502, f"agentledger egress proxy: cannot reach {host}:{port}: {exc}")
            px.completed(attempt_id, outcome, started=started, error=str(exc)[:300], at_us=handed)
            return
        upstream.settimeout(None)
        px._track(id(self), upstream)
        try:
            self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.wfile.flush()
        except OSError as exc:
            upstream.close()
            self.close_connection = True
            px.completed(attempt_id, "error", started=started, error=f"client closed: {exc}"[:300])
            px.remember(Exchange(attempt_id, None, None, None, False, addresses))
            return
        counts = {"in": 0, "out": 0}

        def up_to_client():
            try:
                while data := upstream.recv(65536):
                    self.connection.sendall(data)
                    counts["in"] += len(data)
            except OSError:
                pass
            try:
                self.connection.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        t = threading.Thread(target=up_to_client, daemon=True)
        t.start()
        try:
            while data := self.rfile.read1(65536):
                upstream.sendall(data)
                counts["out"] += len(data)
        except OSError:
            pass
        try:
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        t.join()
        upstream.close()
        self.close_connection = True
        px.completed(attempt_id, "ok", bytes_in=counts["in"], bytes_out=counts["out"], started=started)
        px.remember(Exchange(attempt_id, None, None, None, False, addresses))

    # -- plain HTTP -----------------------------------------------------------------------------
    def _http(self):
        px = self.proxy
        started = time.monotonic()
        url = self.path
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self._reply(400, "agentledger egress proxy: send absolute-form requests (this is an HTTP proxy)")
            return
        host = parts.hostname
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            self._reply(400, "agentledger egress proxy: the request's port is not a TCP port (1-65535)")
            return
        method = self.command.upper()
        body = self._read_body()
        attempt_id = px.attempt(host, port, parts.scheme, method, redact_url(url))
        key = request_key(method, url, body)
        at, why_none = px.destination(host, port, parts.scheme, method, key)
        allowed, rule = px.gate(attempt_id, host, port, parts.scheme, method, f"{method} {redact_url(url)}", at)
        addresses = tuple(t.address for t in at)
        if not allowed:
            handed = now_us()
            self._reply(403, f"agentledger egress proxy: {host}:{port} blocked by policy (rule {rule})",
                        {"X-Agentledger-Rule": str(rule)})
            px.completed(attempt_id, "blocked", bytes_out=len(body), started=started,
                         error=f"denied by {rule}", at_us=handed)
            px.remember(Exchange(attempt_id, key, None, None, False, addresses))
            return
        if px.replay is not None:
            self._serve_recorded(attempt_id, key, body, started)
        else:
            self._forward(attempt_id, key, parts, host, port, method, body, started, at, why_none)

    def _serve_recorded(self, attempt_id: str, key: str, body: bytes, started: float) -> None:
        px = self.proxy
        got = px.replay.take(key)
        if got is None:
            handed = now_us()
            self._reply(502, "agentledger egress proxy: this request is not in the recording")
            px.completed(attempt_id, "error", bytes_out=len(body), started=started, error="not in the recording", at_us=handed)
            return
        record, payload = got
        self.send_response_only(int(record["status"]), record.get("reason") or None)
        for k, v in record.get("headers", []):
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        handed = now_us()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.close_connection = True
        px.completed(attempt_id, "ok", status=int(record["status"]), bytes_in=len(payload), bytes_out=len(body),
                     started=started, response_digest=sha256_hex(payload), at_us=handed)

    def _forward(self, attempt_id, key, parts, host, port, method, body, started, at, why_none) -> None:
        px = self.proxy
        addresses = tuple(t.address for t in at)
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(host, port, timeout=px.connect_timeout)
        # connect to an address that was decided on, never to a fresh resolution of the name (TLS
        # still verifies the name)
        conn._create_connection = lambda _address, timeout, _source=None: connect_to(at, timeout, why_none)
        drop = HOP_BY_HOP | {h.strip().lower() for h in self.headers.get("Connection", "").split(",") if h.strip()}
        try:
            target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in drop and k.lower() not in ("content-length", "host"):
                    conn.putheader(k, v)
            # the Host the policy decided on: a client's own Host header would pick another site
            # on the same server (a name the policy denies, behind an address or name it allows)
            conn.putheader("Host", parts.netloc.rsplit("@", 1)[-1])
            if body or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.putheader("Connection", "close")
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
        except OSError as exc:
            conn.close()
            outcome = "timeout" if isinstance(exc, TimeoutError) else "refused" if isinstance(exc, ConnectionRefusedError) else "error"
            handed = now_us()
            self._reply(502, f"agentledger egress proxy: cannot reach {host}:{port}: {exc}")
            px.completed(attempt_id, outcome, bytes_out=len(body), started=started, error=str(exc)[:300], at_us=handed)
            px.remember(Exchange(attempt_id, key, None, None, False, addresses))
            return
        headers = [(k, v) for k, v in resp.getheaders()]
        length = resp.getheader("Content-Length")
        h = hashlib.sha256()
        kept = bytearray()
        keep = True
        n = 0
        error = None
        handed = now_us()
        try:
            # the request went out: from here on, a client that hangs up still leaves its record
            self.send_response_only(resp.status, resp.reason)
            for k, v in headers:
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            if length is not None and method != "HEAD":
                self.send_header("Content-Length", length)
            self.send_header("Connection", "close")
            handed = now_us()
            self.end_headers()
            if method != "HEAD":
                while chunk := resp.read(65536):
                    handed = now_us()
                    self.wfile.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    if keep and len(kept) + len(chunk) <= px.max_body_bytes:
                        kept += chunk
                    else:
                        keep = False
                        kept = bytearray()
        except OSError as exc:
            error = str(exc)[:300]
        finally:
            conn.close()
        self.close_connection = True
        digest = h.hexdigest()
        stored = False
        record_digest = None
        if px.store is not None and error is None:
            if keep:
                stored = px.store.put(bytes(kept)).stored
            record = {"status": resp.status, "reason": resp.reason, "headers": headers, "body": digest,
                      "body_size": n, "body_stored": stored}
            record_digest = px.store.put(json.dumps(record, sort_keys=True).encode()).digest
        px.completed(attempt_id, "ok" if error is None else "error", status=resp.status, bytes_in=n,
                     bytes_out=len(body), started=started, response_digest=digest, error=error, at_us=handed)
        px.remember(Exchange(attempt_id, key, record_digest, digest, stored, addresses))

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _http
