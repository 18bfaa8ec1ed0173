"""What a local MLLM folder holds, as a short fingerprint in its answers table's meta.json.

The answers table is keyed by the MLLM's name; for a local folder the name stays when new weights
are put there, so the table also records the folder's content, and answers cached for other weights
are refused rather than reused. A file whose size and mtime are those recorded is not read again.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Optional

from mugcp.core.errors import UserError
from mugcp.core.scp_cache import read_meta

WEIGHTS_KEY, FILES_KEY = "mllm_weights", "mllm_files"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_listing(mllm: str, recorded: Optional[dict] = None) -> Optional[dict[str, list]]:
    """{relative path: [size, mtime_ns, sha256]} of the regular files of `mllm` if it names a local folder, hidden
    ones (`.cache`, `.git`) left out; None for a Hub id or a served model. A file whose size and mtime_ns are
    `recorded`'s keeps its recorded sha256 unread (a 15 GB model is not read on every run)."""
    root = Path(mllm)
    if not root.is_dir():
        return None
    recorded = recorded if isinstance(recorded, dict) else {}
    listing = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in (n for n in files if not n.startswith(".")):
            path = Path(folder) / name
            try:
                st = os.stat(path)  # follows links: a Hub snapshot's files are links to its blobs
            except OSError:
                continue  # a dangling link holds nothing
            if not stat.S_ISREG(st.st_mode):
                continue
            rel = path.relative_to(root).as_posix()
            seen = recorded.get(rel)
            if isinstance(seen, list) and len(seen) == 3 and seen[:2] == [st.st_size, st.st_mtime_ns]:
                listing[rel] = seen
                continue
            try:
                listing[rel] = [st.st_size, st.st_mtime_ns, file_sha256(path)]
            except OSError as e:
                raise UserError(f"cannot read {path} of the MLLM folder {mllm}: {e.strerror}") from None
    return listing


def fingerprint(listing: dict[str, list]) -> str:
    """sha256 over the sorted (relative path, file sha256): equal exactly when the folders hold the same files."""
    text = "".join(f"{rel}\0{entry[2]}\n" for rel, entry in sorted(listing.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def local_weights(mllm: str, answers: Path) -> tuple[dict, dict]:
    """(meta to compare, meta to record only) naming a local MLLM folder's content for its answers table `answers`;
    both empty for a Hub id, a served model or a table made before weights were recorded (kept: nothing to compare
    with). Other weights than those its answers came from are refused in one line, before anything is written."""
    found = read_meta(answers) if (answers / "meta.json").is_file() else {}
    if found and WEIGHTS_KEY not in found:
        return {}, {}
    listing = folder_listing(mllm, found.get(FILES_KEY))
    if listing is None:
        return {}, {}
    weights = fingerprint(listing)
    if found and found[WEIGHTS_KEY] != weights:
        scp = answers.parents[1] / "scp" / f"{answers.name}--*"
        raise UserError(f"the MLLM at {mllm} has other weights than the one whose answers are cached in {answers}: "
                        f"move {answers} and {scp} away, or use another --cache-dir")
    return {WEIGHTS_KEY: weights}, {FILES_KEY: listing}
