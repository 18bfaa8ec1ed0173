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
    owner = os.getpid()
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
                  "command": command_line()[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        _HELD.add(fd)
        yield
    finally:
        if fd in _HELD or owner == os.getpid():  # a forked child has closed its copy already (`_forget`)
            _HELD.discard(fd)
            os.close(fd)  # closing drops the lock


_HELD: set[int] = set()  # descriptors of the locks this process holds
_COMMAND: list[str] = []  # what a lock names as its holder's command, where sys.argv is not it (a Ray task)


def _forget() -> None:
    """In a forked child (a data loader's worker): close the copies of the held locks' descriptors. A flock
    belongs to the open file, which a fork shares: a child outliving its killed parent would keep the lock."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_forget)


def name_command(command: str) -> None:
    """The command the locks of this process name (a Ray task runs a command it did not parse)."""
    _COMMAND[:] = [command]


def command_line() -> str:
    return _COMMAND[0] if _COMMAND else " ".join(["mugcp", *sys.argv[1:]])


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
        return f"pid {h['pid']} on {h['host']} (`{h['command']}`, since {h['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"
