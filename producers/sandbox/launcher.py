"""Runs INSIDE the sandbox (``python -I -S launcher.py CONFIG -- CMD...``); standard library only.

1. If CONFIG names a proxy socket: listen on 127.0.0.1:PORT *before* anything else, so a client
   of the command can never race the forwarder, then double-fork a forwarder that relays each TCP
   connection to the host-side egress proxy's unix socket (bind-mounted into the sandbox; the
   sandbox's network namespace has no other way out). Double-forking re-parents the forwarder to
   bubblewrap's init, so the command never sees it as a child (a shell's ``wait`` would hang).
2. Open the per-run marker path (it does not exist): the tracer attributes everything this
   process does after its next successful execve, and all its descendants, to the command.
3. exec the command (PATH search as the shell does). Exit 127 when not found, 126 when not
   executable, as shells do.

The forwarder dies with the sandbox: when the command exits, bubblewrap's init exits and the
kernel kills every process left in the PID namespace.
"""

import json
import os
import socket
import sys
import threading


def _pump(src, dst):
    # write(2), not send(2): the tracer stops on sendto (and prints its data) to see datagrams sent
    # to an address; relayed bytes need neither
    fd = dst.fileno()
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _relay(client, unix_path):
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(unix_path)
    except OSError:
        client.close()
        upstream.close()
        return
    t = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    t.start()
    _pump(client, upstream)
    t.join()
    client.close()
    upstream.close()


def _serve(listener, unix_path):
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_relay, args=(client, unix_path), daemon=True).start()


def _start_forwarder(port, unix_path):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    pid = os.fork()
    if pid == 0:
        if os.fork() == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            _serve(listener, unix_path)
            os._exit(0)
        os._exit(0)
    os.waitpid(pid, 0)
    listener.close()


def main(argv):
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: launcher.py CONFIG -- CMD...\n")
        return 2
    config = json.loads(argv[0])
    cmd = argv[2:]
    if config.get("proxy_socket"):
        _start_forwarder(int(config["proxy_port"]), config["proxy_socket"])
    try:
        os.close(os.open(config["marker"], os.O_RDONLY))
    except OSError:
        pass
    try:
        os.execvp(cmd[0], cmd)
    except FileNotFoundError:
        sys.stderr.write(f"agentledger sandbox: {cmd[0]}: command not found\n")
        return 127
    except PermissionError:
        sys.stderr.write(f"agentledger sandbox: {cmd[0]}: permission denied\n")
        return 126
    except OSError as exc:
        sys.stderr.write(f"agentledger sandbox: {cmd[0]}: {exc.strerror}\n")
        return 126
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
