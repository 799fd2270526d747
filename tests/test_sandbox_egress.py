"""Egress from a real sandbox (bwrap, strace, the egress proxy): an address rule holds for every
spelling of the address and for names resolving into it, and every other way out -- datagrams sent
to an address (DNS included), raw and packet sockets -- is recorded with the process and the
command that tried it (issue 21, items 1 and 3)."""

from __future__ import annotations

import pytest

from sandbox_support import NO_LOCAL, PY, Server, events, of_kind, sandbox, sandbox_env


@pytest.fixture
def box(tmp_path):
    home, ws = tmp_path / "home", tmp_path / "ws"
    home.mkdir()
    ws.mkdir()
    pol = tmp_path / "policy.toml"
    pol.write_text(NO_LOCAL)
    return home, ws, pol, sandbox_env(home)


def network(evs):
    """attempt_id -> (attempted, decided, completed) payloads."""
    out = {e.payload["attempt_id"]: [e.payload, None, None] for e in of_kind(evs, "network_attempted")}
    for i, kind in ((1, "network_decided"), (2, "network_completed")):
        for e in of_kind(evs, kind):
            out[e.payload["attempt_id"]][i] = e.payload
    return out


def test_a_mapped_ipv6_literal_and_a_name_resolving_into_a_denied_range_are_denied(box):
    home, ws, pol, env = box
    s = Server({"/": b"local service\n"})
    try:
        p = sandbox("run", "--session", "s", "--policy", str(pol), "--", "sh", "-c",
                    f"curl -s -o /dev/null -w '%{{http_code}}\\n' 'http://[::ffff:127.0.0.1]:{s.port}/'; "
                    f"curl -s -o /dev/null -w '%{{http_code}}\\n' 'http://localhost:{s.port}/'",
                    env=env, cwd=ws, check=False)
    finally:
        s.stop()
    assert p.stdout.split() == ["403", "403"], (p.stdout, p.stderr)
    assert s.hits == []
    by_host = {a["host"]: (d, c) for a, d, c in network(events(home, "s")).values() if a["port"] == s.port}
    for host in ("::ffff:127.0.0.1", "localhost"):
        d, c = by_host[host]
        assert (d["decision"], d["rule"], d["addresses"], c["outcome"]) == ("deny", "no-local", ["127.0.0.1"], "blocked")


UDP_AND_RAW = r"""
import socket, sys
query = bytes.fromhex("123401000001000000000000076578616d706c6503636f6d0000010001")  # example.com A
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(query, ("127.0.0.1", 53))                      # DNS to the sandbox's own loopback
for dest in (("192.0.2.1", 53), ("192.0.2.2", 9999)):   # DNS and plain UDP out: no route
    try:
        u.sendto(b"x", dest)
    except OSError as e:
        print("sendto", e.errno)
try:
    u.sendmsg([b"x"], [], 0, ("192.0.2.3", 123))
except OSError as e:
    print("sendmsg", e.errno)
for args in ((socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
             (socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))):
    try:
        socket.socket(*args).close()
        print("socket opened", args)
    except OSError as e:
        print("socket", e.errno)
"""


def test_datagrams_and_raw_sockets_are_recorded_with_the_process_and_command(box):
    home, ws, pol, env = box
    (ws / "udp.py").write_text(UDP_AND_RAW)
    p = sandbox("run", "--session", "u", "--policy", str(pol), "--", "sh", "-c", f"{PY} udp.py",
                env=env, cwd=ws, check=False)
    assert p.returncode == 0, p.stderr
    evs = events(home, "u")
    started = {e.payload["command_id"]: e.payload for e in of_kind(evs, "command_started")}
    net = network(evs)
    got = {}
    for a, d, c in net.values():
        cmd = started[a["command_id"]]
        assert cmd["argv"] == [PY, "udp.py"] and cmd["pid"] and cmd["parent_command_id"], cmd  # the python process
        got[(a["host"], a["port"], a["protocol"], a["method"])] = (d["decision"], d["rule"], c["outcome"],
                                                                    (c["error"] or "").split(" ")[0])
    assert got[("127.0.0.1", 53, "dns", "sendto")] == ("allow", "sandbox.loopback", "ok", "")
    assert got[("192.0.2.1", 53, "dns", "sendto")] == ("deny", "sandbox.network", "blocked", "ENETUNREACH")
    assert got[("192.0.2.2", 9999, "udp", "sendto")] == ("deny", "sandbox.network", "blocked", "ENETUNREACH")
    assert got[("192.0.2.3", 123, "udp", "sendmsg")] == ("deny", "sandbox.network", "blocked", "ENETUNREACH")
    raw = {k[3]: v for k, v in got.items() if k[0] == "*"}
    assert set(raw) == {"socket(AF_INET, SOCK_RAW|SOCK_CLOEXEC, IPPROTO_ICMP)",
                        "socket(AF_PACKET, SOCK_RAW|SOCK_CLOEXEC, htons(ETH_P_ALL))"}, raw
    assert {v[:3] for v in raw.values()} == {("deny", "sandbox.network", "blocked")}
    assert len(got) == 6
