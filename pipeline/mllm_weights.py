"""Which weights an MLLM name stands for, recorded in its answers table's meta.json.

The answers table is keyed by the MLLM's name, which stays when the weights behind it change: for a
local folder the table records the folder's content (a file whose size and mtime are those recorded
is not read again); for a Hugging Face id loaded in process, the Hub commit (the Hub's main moves).
That commit is resolved once, before any engine loads, and every engine loads exactly it: engines
on other machines of a cluster read the same weights, and the first run records them too. Answers
cached for other weights are refused rather than reused.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi, try_to_load_from_cache

from mugcp.core.errors import UserError
from mugcp.core.files import file_sha256, write_json_atomic
from mugcp.core.scp_cache import MLLM_NAMES, known_names, read_meta

WEIGHTS_KEY, FILES_KEY, REVISION_KEY = "mllm_weights", "mllm_files", "mllm_revision"
COMMIT = re.compile(r"[0-9a-f]{40}")
# a model card, its pictures and its licence do not change what a model answers
PROSE = re.compile(r"(?i)(readme|license|licence|notice|copying|use_policy)([._-].*)?|.*\.(md|png|jpe?g|gif|pdf)")


def table_meta(answers: Path) -> dict:
    """What the answers table `answers` records (its meta.json), or {} for a table not made yet."""
    return read_meta(answers) if (answers / "meta.json").is_file() else {}


def weight_files(mllm: str) -> Optional[dict[str, tuple[Path, os.stat_result]]]:
    """{relative path: (file, its stat)} of the regular files of `mllm` if it names a local folder, hidden ones
    (`.cache`, `.git`) and prose (`PROSE`) left out; None for a Hub id or a served model. Nothing is read."""
    root = Path(mllm)
    if not root.is_dir():
        return None
    files = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in (n for n in names if not n.startswith(".") and not PROSE.fullmatch(n)):
            path = Path(folder) / name
            try:
                st = os.stat(path)  # follows links: a Hub snapshot's files are links to its blobs
            except OSError:
                continue  # a dangling link holds nothing
            if stat.S_ISREG(st.st_mode):
                files[path.relative_to(root).as_posix()] = (path, st)
    return files


def folder_listing(mllm: str, recorded: Optional[dict] = None) -> Optional[dict[str, list]]:
    """{relative path: [size, mtime_ns, sha256]} of `weight_files(mllm)`; None for a Hub id or a served model. A
    file whose size and mtime_ns are `recorded`'s keeps its recorded sha256 unread (a 15 GB model is not read on
    every run)."""
    files = weight_files(mllm)
    if files is None:
        return None
    recorded = recorded if isinstance(recorded, dict) else {}
    listing = {}
    for rel, (path, st) in files.items():
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
    with). Other weights than those its answers came from are refused in one line, naming the files that differ.

    The hashes are memoised per machine (`mllm_files`: {host: listing}), each machine's copy of the model having
    its own mtimes; a listing that changed (a copy, a touch) is written back, so its files are read once."""
    found = table_meta(answers)
    if found and WEIGHTS_KEY not in found:
        return {}, {}
    listings = found.get(FILES_KEY) if isinstance(found.get(FILES_KEY), dict) else {}
    host = socket.gethostname()
    listing = folder_listing(mllm, listings.get(host) or memo_elsewhere(answers, host))
    if listing is None:
        return {}, {}
    weights = fingerprint(listing)
    if found and found[WEIGHTS_KEY] != weights:
        scp = answers.parents[1] / "scp" / f"{answers.name}--*"
        recorded = next((v for v in (listings.get(host), *listings.values()) if isinstance(v, dict)), {})
        differ = sorted(rel for rel in set(recorded) | set(listing)
                        if (recorded.get(rel) or [None] * 3)[2] != (listing.get(rel) or [None] * 3)[2])
        named = f" ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''} differ)" if differ else ""
        raise UserError(f"the MLLM at {mllm} has other weights than the one whose answers are cached in {answers}"
                        f"{named}: move {answers} and {scp} away, or use another --cache-dir")
    listings = {**listings, host: listing}
    if found and found.get(FILES_KEY) != listings:  # the same weights with new mtimes: recorded, not read again
        write_json_atomic(answers / "meta.json", {**found, FILES_KEY: listings})
    return {WEIGHTS_KEY: weights}, {FILES_KEY: listings}


def answers_name(mllm: str, cache_dir: Path) -> str:
    """The name a local MLLM folder's answers are kept under: the one the cache already knows it by (in any
    dataset's table, so that one model has one name across a benchmark), found by its absolute path (never a
    relative spelling: "mllm" names another folder from another working directory) or its content (a copy at
    another mount: only tables whose recorded files have the same names and sizes are hashed against); else its
    absolute path, the same from any working directory. A Hub id or a served name is its own name."""
    files = weight_files(mllm)
    if files is None:
        return mllm
    spellings = {os.path.abspath(mllm), str(Path(mllm).resolve())}  # a relative spelling names other folders
    metas = [table_meta(p.parent) for p in sorted(Path(cache_dir).glob("*/answers/*/meta.json"))]  # elsewhere
    for meta in metas:
        if spellings & known_names(meta):
            return meta["mllm"]
    shape = {rel: st.st_size for rel, (_, st) in files.items()}
    alike = [(meta, listing) for meta in metas if WEIGHTS_KEY in meta and isinstance(meta.get(FILES_KEY), dict)
             for listing in meta[FILES_KEY].values()
             if isinstance(listing, dict) and {rel: (v or [None])[0] for rel, v in listing.items()} == shape]
    if alike:  # hashed once, against the first such listing (its hashes reused where size and mtime agree)
        weights = fingerprint(folder_listing(mllm, alike[0][1]))
        for meta, _ in alike:
            if meta[WEIGHTS_KEY] == weights:
                return meta["mllm"]
    return str(Path(mllm).resolve())


def record_spelling(mllm: str, answers: Path) -> None:
    """Add the spellings of a local folder under which an extract found this answers table (`known_names`), so that
    stage two given either finds it without reading the folder (it may not be on the training machine)."""
    found = table_meta(answers)
    if not found or weight_files(mllm) is None:
        return
    new = [s for s in dict.fromkeys((os.path.abspath(mllm), str(Path(mllm).resolve()))) if s not in known_names(found)]
    if new:
        others = sorted(known_names(found) - {found["mllm"]})
        write_json_atomic(answers / "meta.json", {**found, MLLM_NAMES: others + new})


def memo_elsewhere(answers: Path, host: str) -> Optional[dict]:
    """This host's listing of the same MLLM recorded by another of the cache's answers tables (another dataset,
    prompt or k): a new table's first extract does not read a model folder the cache has already hashed."""
    model = answers.name.split("--")[0]  # the MLLM part of the table's name
    for meta_path in sorted(answers.parents[2].glob(f"*/answers/{model}--*/meta.json")):
        listings = table_meta(meta_path.parent).get(FILES_KEY)
        if meta_path.parent != answers and isinstance(listings, dict) and isinstance(listings.get(host), dict):
            return listings[host]
    return None


def served_weights(mllm: str, answers: Path) -> None:
    """A server cannot say which weights it serves: answers it gives are refused for a table that records which
    weights its answers came from (a Hub commit), where they would join answers of known weights unrecorded."""
    found = table_meta(answers)
    if REVISION_KEY in found:
        raise UserError(f"the answers cached in {answers} came from {mllm} at revision {found[REVISION_KEY]}, and a "
                        f"server cannot say which weights it serves: describe with --backend vllm or hf (--revision "
                        f"{found[REVISION_KEY]}), or use another --cache-dir")


def online_commit(mllm: str, revision: Optional[str] = None) -> Optional[str]:
    """The commit the Hub names for `revision` (default: main) now; None offline (HF_HUB_OFFLINE) or when the Hub
    cannot say (no network, a gated or unknown repository): the local cache answers then."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return None
    try:
        return HfApi().model_info(mllm, revision=revision, timeout=10).sha
    except Exception:  # whatever the Hub or the network answer, the cache is asked next
        return None


def hub_commit(mllm: str, revision: Optional[str] = None) -> Optional[str]:
    """The commit a load of the Hugging Face id `mllm` at `revision` (default: main) reads: the Hub's answer, else
    the local Hugging Face cache's; None for a local folder, a name that is no Hub id, or a revision neither knows."""
    if Path(mllm).is_dir():
        return None
    if revision and COMMIT.fullmatch(revision):
        return revision
    if (commit := online_commit(mllm, revision)) is not None:
        return commit
    try:
        found = try_to_load_from_cache(mllm, "config.json", revision=revision)
    except ValueError:  # not a Hub id (a path that is not there, say)
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def local_folder_revision(mllm: Optional[str], revision: Optional[str]) -> None:
    """A revision asked of a local folder would change nothing (a folder holds one set of weights): refused."""
    if revision and mllm and Path(mllm).is_dir():
        raise UserError(f"--revision {revision} names a Hub revision, but --mllm {mllm} is a local folder: leave it "
                        f"out, or give the Hub id")


def hub_revision(mllm: str, revision: Optional[str], answers: Path) -> tuple[dict, Optional[str]]:
    """(meta to compare, the commit to load) for the Hugging Face id `mllm` whose answers table is `answers`; the
    meta is empty when the commit is not known or for a table made before revisions were recorded (kept: nothing
    to compare with). Answers from another commit are refused in one line, before anything is written."""
    local_folder_revision(mllm, revision)
    commit = hub_commit(mllm, revision)
    found = table_meta(answers)
    if commit is None or (found and REVISION_KEY not in found):
        return {}, commit
    if found and found[REVISION_KEY] != commit:
        asked = f"at --revision {revision}" if revision else "now"
        raise UserError(f"{mllm} {asked} resolves to revision {commit}, but the answers cached in {answers} came "
                        f"from {found[REVISION_KEY]}: pass --revision {found[REVISION_KEY]} to describe with the "
                        f"same weights, or use another --cache-dir")
    return {REVISION_KEY: commit}, commit
