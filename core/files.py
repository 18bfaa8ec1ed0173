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

# What decoding a bad image file raises (PIL's own errors and the codecs' below it): such a file is
# reported by name, never allowed to stop a run with a traceback.
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a hidden temporary file in the same folder, fsync, then rename over `path`.

    The file is created with mode 0o666 minus the umask (not mkstemp's 0o600), so a shared cache or
    run folder stays readable by the teammates the umask allows.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:  # a read-only place, a file where a folder should be, no space left
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in chunks (a checkpoint or an MLLM's weights need not fit in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def share_files(folder: Path) -> None:
    """Give every file under `folder` the mode mugcp's own files get (0o666 minus the umask): libraries that write
    through a private temporary file (safetensors) leave 0o600, unreadable to the teammates sharing a cache."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder `new` at `target` (same file system), replacing what was there: a reader sees the
    old folder or the new one, never a half-written one."""
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
