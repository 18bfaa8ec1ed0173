"""Small file helpers: every file mugcp writes appears whole or not at all, readable by the user's group."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zlib
from pathlib import Path

from PIL import Image

from mugcp.core.errors import UserError
from mugcp.core.locks import hold

# What decoding a bad image file raises (PIL's own errors and the codecs' below it): such a file is
# reported by name, never allowed to stop a run with a traceback.
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a hidden temporary file in the same folder, fsync, then rename over `path`.

    The file is created with mode 0o666 minus the umask (not mkstemp's 0o600), so a shared cache or
    run folder stays readable by the teammates the umask allows.
    """
    write_files_atomic({Path(path): data})


def _written_beside(path: Path, data: bytes) -> Path:
    """`data` in a new hidden temporary file beside `path`, on disk (fsync); removed again if that fails."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_files_atomic(files: dict[Path, bytes]) -> None:
    """Several files that belong together (a report's table, CSVs and figure): every one is written to its
    temporary file first, and only when all are whole are they renamed into place; a refusal (a full disk) leaves
    every old file as it was."""
    written: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            written[Path(path)] = _written_beside(Path(path), data)
        for path, tmp in written.items():
            os.replace(tmp, path)
    except OSError as e:  # a read-only place, a file where a folder should be, no space left
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    except BaseException:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
        raise


def write_json_new(path: str | Path, obj) -> bool:
    """Write `path` whole, only if it does not exist yet, even with other processes doing the same at once (the
    first one's stays); True if this call wrote it."""
    path, data = Path(path), (json.dumps(obj, indent=2) + "\n").encode()
    try:
        tmp = _written_beside(path, data)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        os.link(tmp, path)  # unlike a rename, fails where the name exists
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links (SMB, some FUSE): create the name exclusively instead
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:  # one small write right after the create (a reader between finds it empty)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # a full disk, a kill of this thread: no empty or partial file stays in its place
            path.unlink(missing_ok=True)
            raise
        return True
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in chunks (a checkpoint or an MLLM's weights need not fit in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def walk_files(root: Path):
    """(folder, file names) under `root`, links to folders followed (a tree of run folders or checkpoints may be
    assembled from links), each real folder once: a link that loops back ends there."""
    seen = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield Path(folder), names


def share_files(folder: Path) -> None:
    """Give every file under `folder` the mode mugcp's own files get (0o666 minus the umask): libraries that write
    through a private temporary file (safetensors) leave 0o600, unreadable to the teammates sharing a cache."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def refuse_link(target: Path) -> None:
    """A folder mugcp replaces whole must not be a link: replaced, it would become a folder on this disk while
    the disk it names kept the old one."""
    if target.is_symlink():
        raise UserError(f"{target} is a link: write into the folder that holds what it links to "
                        f"({os.path.realpath(target)}) instead")


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder `new` at `target` (same file system), replacing what was there: a reader sees the
    old folder or the new one, never a half-written one."""
    refuse_link(target)
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    lock = target.with_name(f".{target.name}.lock")
    with hold(lock, str(target), wait=lambda _: None):  # one swap at a time
        if target.exists():
            os.replace(target, old)
        os.replace(new, target)
        lock.unlink()  # no file left behind: a process waiting on it sees it gone and takes the path anew (`hold`)
    shutil.rmtree(old, ignore_errors=True)
