"""Advisory locks for folders that one process at a time may write (a run folder, a cache shard).

`hold(path, what)` takes an exclusive `flock` on `path` without waiting. If another process holds
it, the caller gets one line naming that process (pid, host, command, since when), read from the
lock file it wrote. `hold(path, what, wait=tell)` waits for it instead, after `tell(holder)`. The lock dies with its process (kill -9 included): a stale lock file is
harmless, only the kernel lock counts.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from mugcp.core.errors import UserError


@contextmanager
def hold(path: Path, what: str, wait: Optional[Callable[[str], object]] = None):
    """Hold the exclusive lock on `path` (created if needed) for the block; refuse at once if it is taken,
    or, given `wait`, call it with the holder's description and wait for the lock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"cannot write {what} at {path.parent}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait is None:
                raise UserError(f"{what} is in use by {_holder(path)}: wait for it to finish, or stop it") from None
            wait(_holder(path))
            fcntl.flock(fd, fcntl.LOCK_EX)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(["mugcp", *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
        return f"pid {h['pid']} on {h['host']} (`{h['command']}`, since {h['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"
