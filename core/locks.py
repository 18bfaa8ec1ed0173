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
def hold(path: Path, what: str, wait: Optional[Callable[[str], object]] = None, shared: bool = False):
    """Hold the exclusive lock on `path` (created if needed) for the block; refuse at once if it is taken,
    or, given `wait`, call it with the holder's description and wait for the lock. `shared`: a reader's lock,
    held by any number of readers at once and by none while a writer holds it exclusively (evaluations of a run
    while nothing trains it)."""
    owner = os.getpid()
    fd = _open(path, what, shared)
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait is None:
                    raise UserError(f"{what} is in use by {_holder(path)}: wait for it to finish, or stop it") from None
                wait(_holder(path))
                fcntl.flock(fd, mode)
            if _same_file(fd, path):
                break
            renewed = _open(path, what, shared)  # the holder removed the file as it let go: this lock guards
            os.close(fd)  # nothing; take the file now there
            fd = renewed
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": command_line()[:300]}  # (readers at once: one of them; torn, "another process")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        except OSError as e:  # a full disk: the lock is held, but its holder cannot be written down
            if not shared:  # (a reader on a read-only lock file goes unnamed)
                raise UserError(f"cannot write {what} ({path}): {e.strerror}") from None
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


def _open(path: Path, what: str, shared: bool) -> int:
    """The lock file, created if needed; a reader's read-only where it cannot write it (a teammate's folder, a
    read-only mount: flock takes a shared lock through it)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        try:
            if shared:
                return os.open(path, os.O_RDONLY)
        except OSError:
            pass
        raise UserError(f"cannot write {what} ({path}): {e.strerror}") from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def holders(folder: Path, pattern: str) -> list[str]:
    """Who holds the locks named `pattern` in `folder` now (a lock file its process left behind holds none)."""
    found = []
    for path in sorted(Path(folder).glob(pattern)) if Path(folder).is_dir() else []:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a reader's probe: refused only while a writer holds it
        except BlockingIOError:
            found.append(_holder(path))
        finally:
            os.close(fd)
    return found


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
        return f"pid {h['pid']} on {h['host']} (`{h['command']}`, since {h['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"
