"""The strace parser: real traces (strace -f over bwrap and our launcher) and the awkward corners of
strace's output format (escapes, decorations, unfinished/resumed pairs, PID namespaces)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from agentledger.producers.sandbox import strace as st
from agentledger.producers.sandbox.runner import LAUNCHER, Tools, runtime_dirs
from sandbox_support import PY


def test_unescape_round_trips_what_strace_prints():
    assert st.unescape(r'we\"ird,\nn\303\244\76me') == 'we"ird,\nnä>me'
    assert st.unescape(r"\x41\101\\") == "AA\\"
    assert st.unescape(r"\377") == os.fsdecode(b"\xff")  # not UTF-8: surrogate-escaped like os.fsdecode


def test_split_args_respects_strings_lists_and_decorations():
    args, rest = st.split_args('AT_FDCWD</tmp/a\\76b>, "x,y\\"z", [1, 2], {a=1, b=[3]}, 3<TCP:[1.2.3.4:5->6.7.8.9:80]>) = 0')
    assert args == ['AT_FDCWD</tmp/a\\76b>', '"x,y\\"z"', "[1, 2]", "{a=1, b=[3]}", "3<TCP:[1.2.3.4:5->6.7.8.9:80]>"]
    assert rest == " = 0"
    assert st.decoration("AT_FDCWD</tmp/a\\76b>") == "/tmp/a>b"
    assert st.decoration("3</dev/null<char 1:3>>") == "/dev/null"
    assert st.decoration("3<TCP:[1]>") is None
    assert st.list_strings('["sh", "-c", "echo \\"hi\\""]') == (["sh", "-c", 'echo "hi"'], False)
    assert st.list_strings('["a", ...]') == (["a"], True)


def test_unfinished_and_resumed_calls_are_joined_in_start_order():
    lines = [
        '10 1.000000 vfork( <unfinished ...>',
        '11 1.000100 execve("/bin/true", ["true"], 0x1 /* 3 vars */) = 0',
        '10 1.000200 <... vfork resumed>) = 2 /* 11 in strace\'s PID NS */',
        '11 1.000300 openat(AT_FDCWD</w>, "f", O_WRONLY|O_CREAT, 0644 <unfinished ...>',
        '10 1.000400 +++ exited with 0 +++',
        '11 1.000500 <... openat resumed>) = -1 EROFS (Read-only file system)',
        '11 1.000600 +++ killed by SIGKILL +++',
    ]
    items = list(st.parse(lines))
    assert [type(i).__name__ for i in items] == ["Call", "Call", "Call", "Exit", "Exit"]
    vfork, execve, openat, exit10, exit11 = items
    assert vfork.name == "vfork" and vfork.child == 11 and vfork.ts == 1.0
    assert openat.errno == "EROFS" and openat.args[1] == '"f"'
    assert exit10.code == 0 and exit11.signal == "SIGKILL"


def test_attribution_ignores_infrastructure_until_the_marker(tmp_path):
    marker = "/.agentledger-exec-abc"
    lines = [
        '1 1.0 execve("/usr/bin/bwrap", ["bwrap"], 0x1 /* 1 vars */) = 0',
        '1 1.1 openat(AT_FDCWD</>, "/etc/passwd", O_RDONLY) = 3</etc/passwd>',
        '1 1.2 clone(child_stack=NULL, flags=SIGCHLD) = 2 /* 2 in strace\'s PID NS */',
        '2 1.3 execve("/usr/bin/python3", ["python3", "launcher.py"], 0x1 /* 1 vars */) = 0',
        '2 1.4 clone(child_stack=NULL, flags=SIGCHLD) = 3 /* 3 in strace\'s PID NS */',
        '3 1.45 openat(AT_FDCWD</w>, "/tmp/forwarder", O_WRONLY|O_CREAT, 0600) = 4</tmp/forwarder>',
        f'2 1.5 openat(AT_FDCWD</w>, "{marker}", O_RDONLY) = -1 ENOENT (No such file or directory)',
        '2 1.6 execve("/usr/local/bin/sh", ["sh", "-c", "x"], 0x1 /* 1 vars */) = -1 ENOENT (No such file or directory)',
        '2 1.7 execve("/bin/sh", ["sh", "-c", "x"], 0x1 /* 1 vars */) = 0',
        '2 1.8 openat(AT_FDCWD</w>, "out", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 3</w/out>',
        '2 1.9 clone(child_stack=NULL, flags=CLONE_CHILD_SETTID|SIGCHLD) = 4 /* 4 in strace\'s PID NS */',
        '4 2.0 chdir("sub") = 0',
        '4 2.1 execve("/bin/ls", ["ls"], 0x1 /* 1 vars */) = 0',
        '4 2.2 unlink("gone") = 0',
        '4 2.3 connect(3<TCP:[9]>, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("10.1.2.3")}, 16) = -1 ENETUNREACH (Network is unreachable)',
        '4 2.4 +++ exited with 2 +++',
        '2 2.5 +++ exited with 7 +++',
    ]
    a = st.analyse(lines, marker)
    assert a.top is not None and a.top.argv == ["sh", "-c", "x"] and a.top.cwd == "/w"
    assert a.top_exit_code == 7
    assert [(i.argv, i.exit_code, i.parent) for i in a.images] == [(["sh", "-c", "x"], 7, None), (["ls"], 2, 0)]
    ops = [(o.op, o.path, o.write) for o in a.file_ops]
    assert ops == [("open", "/w/out", True), ("unlink", "/w/sub/gone", True)], "bwrap/launcher/forwarder ops leaked in"
    assert [(c.host, c.port, c.sock, c.errno) for c in a.network] == [("10.1.2.3", 80, "TCP", "ENETUNREACH")]


def test_datagrams_to_an_address_and_raw_sockets_are_network_attempts_and_sent_data_never_poses_as_one():
    """Lines as strace 6 prints them (sendmmsg as glibc's resolver and ctypes make it); the data sent
    spells a sockaddr, which must not be read as a destination."""
    marker = "/.agentledger-exec-n"
    fake = r'"sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr(\"9.9.9.9\")"'
    iov = f"msg_iov=[{{iov_base={fake}, iov_len=68}}], msg_iovlen=1, msg_controllen=0, msg_flags=0"
    lines = [
        f'2 1.0 openat(AT_FDCWD</w>, "{marker}", O_RDONLY) = -1 ENOENT (No such file or directory)',
        '2 1.1 execve("/usr/bin/python3", ["python3", "u.py"], 0x1 /* 1 vars */) = 0',
        '2 1.2 socket(AF_INET, SOCK_DGRAM|SOCK_CLOEXEC, IPPROTO_IP) = 3<socket:[63007]>',  # -y: kind from socket()
        '2 1.3 sendto(3<socket:[63007]>, "\\x12\\x34", 2, 0, {sa_family=AF_INET, sin_port=htons(53), '
        'sin_addr=inet_addr("192.0.2.1")}, 16) = -1 ENETUNREACH (Network is unreachable)',
        f'2 1.4 sendto(4<TCP:[127.0.0.1:1->127.0.0.1:3128]>, {fake}, 68, 0, NULL, 0) = 68',
        '2 1.5 sendto(6<UDPv6:[63024]>, "x", 1, 0, {sa_family=AF_INET6, sin6_port=htons(53), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "::1", &sin6_addr), sin6_scope_id=0}, 28) = 1',
        '2 1.6 sendmsg(3<UDP:[0.0.0.0:32808]>, {msg_name={sa_family=AF_INET, sin_port=htons(5353), '
        f'sin_addr=inet_addr("192.0.2.3")}}, msg_namelen=16, {iov}}}, 0) = -1 ENETUNREACH (Network is unreachable)',
        f'2 1.7 sendmsg(3<UDP:[0.0.0.0:32808]>, {{msg_name=NULL, msg_namelen=0, {iov}}}, 0) = -1 EDESTADDRREQ (x)',
        '2 1.8 sendmmsg(3<UDP:[214354]>, [{msg_hdr={msg_name={sa_family=AF_INET, sin_port=htons(53), '
        f'sin_addr=inet_addr("127.0.0.1")}}, msg_namelen=16, {iov}}}, msg_len=68}}, '
        '{msg_hdr={msg_name={sa_family=AF_INET, sin_port=htons(5353), sin_addr=inet_addr("127.0.0.2")}, '
        f'msg_namelen=16, {iov}}}, msg_len=68}}, {{msg_hdr={{msg_name=NULL, msg_namelen=0, {iov}}}}}], 3, 0) = 2',
        '2 1.9 socket(AF_INET, SOCK_RAW|SOCK_CLOEXEC, IPPROTO_ICMP) = -1 EPERM (Operation not permitted)',
        '2 2.0 socket(AF_PACKET, SOCK_RAW|SOCK_CLOEXEC, htons(ETH_P_ALL)) = -1 EPERM (Operation not permitted)',
        '2 2.1 socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP) = -1 EACCES (Permission denied)',
        '2 2.2 socket(AF_INET6, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_IP) = 5<TCPv6:[1]>',
        '2 2.3 +++ exited with 0 +++',
    ]
    a = st.analyse(lines, marker)
    got = [(n.call, n.host, n.port, n.sock, n.errno, n.detail) for n in a.network]
    assert got == [
        ("sendto", "192.0.2.1", 53, "UDP", "ENETUNREACH", None),
        ("sendto", "::1", 53, "UDPv6", None, None),
        ("sendmsg", "192.0.2.3", 5353, "UDP", "ENETUNREACH", None),
        ("sendmmsg", "127.0.0.1", 53, "UDP", None, None),
        ("sendmmsg", "127.0.0.2", 5353, "UDP", None, None),
        ("socket", "*", 0, "SOCK_RAW", "EPERM", "socket(AF_INET, SOCK_RAW|SOCK_CLOEXEC, IPPROTO_ICMP)"),
        ("socket", "*", 0, "SOCK_RAW", "EPERM", "socket(AF_PACKET, SOCK_RAW|SOCK_CLOEXEC, htons(ETH_P_ALL))"),
        ("socket", "*", 0, "SOCK_DGRAM", "EACCES", "socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)"),
    ]
    assert "9.9.9.9" not in {n.host for n in a.network}
    assert {n.image for n in a.network} == {a.top.index}


@pytest.mark.parametrize("seccomp", [True, False], ids=["seccomp-bpf", "ptrace-all"])
def test_a_real_trace_through_bwrap_and_the_launcher(tmp_path, seccomp):
    """strace -f over bwrap over our launcher over python: the parser sees exactly the command."""
    tools = Tools.find()
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "in.txt").write_text("x")
    trace = tmp_path / "trace"
    marker = f"/.agentledger-exec-{uuid.uuid4().hex}"
    code = ("import os, socket, subprocess\n"
            "open('in.txt').read()\n"
            "os.mkdir('d'); open('d/a b,\"c\"', 'w').write('1'); os.rename('d/a b,\"c\"', 'd/e')\n"
            "os.chmod('d/e', 0o600)\n"
            "try: open('/etc/nope', 'w')\nexcept OSError: pass\n"
            "socket.socket().connect_ex(('10.9.9.9', 443))\n"
            "subprocess.run(['sh', '-c', 'exit 5'])\n"
            "os.unlink('d/e')\n")
    argv = st.strace_argv(tools.strace, str(trace), seccomp_bpf=seccomp) + [
        tools.bwrap, "--unshare-user", "--unshare-net", "--unshare-pid", "--die-with-parent", "--ro-bind", "/", "/",
        "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
        *[x for d in runtime_dirs(PY) for x in ("--ro-bind", d, d)],  # an install under /tmp stays visible
        "--bind", str(ws), str(ws), "--chdir", str(ws), "--",
        PY, "-I", "-S", LAUNCHER, json.dumps({"marker": marker}), "--", PY, "-c", code]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    with open(trace) as f:
        a = st.analyse(f, marker)
    assert a.top.argv[:2] == [PY, "-c"] and a.top_exit_code == 0
    assert any(i.argv == ["sh", "-c", "exit 5"] and i.exit_code == 5 and i.parent == a.top.index for i in a.images)
    w = str(ws)
    ops = {(o.op, o.path, o.new_path, o.errno) for o in a.file_ops if o.path.startswith((w, "/etc/nope"))}
    assert ("open", f"{w}/in.txt", None, None) in ops
    assert ("mkdir", f"{w}/d", None, None) in ops
    assert ("rename", f'{w}/d/a b,"c"', f"{w}/d/e", None) in ops
    assert ("chmod", f"{w}/d/e", None, None) in ops
    assert ("unlink", f"{w}/d/e", None, None) in ops
    assert ("open", "/etc/nope", None, "EROFS") in ops
    assert next(o for o in a.file_ops if o.op == "chmod").mode == 0o600
    assert ("10.9.9.9", 443, "TCP", "ENETUNREACH") in {(c.host, c.port, c.sock, c.errno) for c in a.network}
    assert not any("python3" in o.path and o.write for o in a.file_ops)


def test_an_interpreter_installed_under_tmp_stays_visible_in_the_sandbox(tmp_path):
    """The sandbox mounts a private /tmp: a virtualenv (or a clone) living there is bound back read-only."""
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    dirs = runtime_dirs(str(venv / "bin" / "python"))
    assert str(venv) in dirs
    assert all(d.startswith(("/tmp/", "/var/tmp/", "/run/")) for d in dirs)
    ws = tmp_path / "ws"
    ws.mkdir()
    tools = Tools.find()
    argv = [tools.bwrap, "--unshare-user", "--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev",
            "--proc", "/proc", "--tmpfs", "/tmp", *[x for d in dirs for x in ("--ro-bind", d, d)],
            "--bind", str(ws), str(ws), "--chdir", str(ws), "--",
            str(venv / "bin" / "python"), "-I", "-S", "-c", "print('inside')"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "inside", p.stderr
