"""An exclusive ``flock`` waited for at most a given time (never a blocking wait without end).

Producers share files with other processes of the same user: the log's partition and topic locks
(`schemas.transport.local`) and the producers' session locks (`producers.importstate`). A process that
holds one and never lets go (stopped, hung, hostile) must cost a waiter a clear error, not a hook that
hangs. Standard library only (the hook imports this).
"""

from __future__ import annotations

import errno
import fcntl
import time


def flock_within(fd: int, timeout_s: float) -> bool:
    """Take the exclusive flock of ``fd``, trying until ``timeout_s`` has passed (backing off from
    0.5 ms to 20 ms between tries); False when another holder kept it that long."""
    deadline = time.monotonic() + max(0.0, timeout_s)
    delay = 0.0005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
