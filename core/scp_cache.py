"""The stage-one cache: the only thing the two stages share. Parquet, versioned, with provenance per row.

Three tables per dataset, so that the expensive part (the MLLM's answers) is paid once per image
content, whatever CLIP embeds it later:

    cache/<dataset>/
        images/                               which content each path holds (latest row per path wins)
            path, sha256, size, mtime_ns, split, label, classname, created
        answers/<mllm>--<prompt>-k<K>/        what the MLLM said about an image content (the expensive layer)
            sha256, status, error, answer, phrases, mllm, prompt_version, created
        scp/<mllm>--<prompt>-k<K>--<clip>/    the answer's phrases through one frozen CLIP (the cheap layer)
            sha256, scp [K][D] float16, mask [K] bool, mllm, prompt_version, clip_model, created

Each table folder holds `meta.json` (schema version and what the table is keyed by; for answers,
the question asked) and `parts/`, a folder of Parquet files that `polars.scan_parquet`,
`pyarrow.dataset` or DuckDB open directly. A part is written under a hidden temporary name and
renamed into place, so readers never see a torn file and a kill -9 loses at most the rows not yet
flushed. Several shards (machines) write into one table. Failed answers are kept for the record
(status "failed") and asked again by the next run. SCP tensors are fixed-size lists whose shapes
are in the schema, so polars sees `Array(Float16, shape=(K, D))`; the reader views a batch of rows
as one (N, K, D) numpy array without a copy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow import fs

from mugcp.core.errors import UserError
from mugcp.core.files import file_sha256, write_json_new
from mugcp.core.locks import holders

LOCAL = fs.LocalFileSystem()  # paths are paths: pyarrow would read "cache:v2/..." as a URI

SCHEMA_VERSION = 2
TABLES = ("images", "answers", "scp")


def slug(text: str, readable: Optional[str] = None) -> str:
    """A folder-safe, readable and unique name for a model id or path: a folder that exists here is named by its
    last part (`readable` forces the readable part; `slugs` gives both forms)."""
    name = readable if readable is not None else (Path(text).name if ("/" in text and Path(text).exists()) else text)
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60]
    return f"{clean}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def slugs(text: str) -> list[str]:
    """Every name `slug` gives `text`, the one it gives on this machine first: a table made where a local MLLM's
    folder existed is found by its name on a machine without the folder, and the other way round."""
    return list(dict.fromkeys([slug(text), slug(text, Path(text).name if "/" in text else text), slug(text, text)]))


def now() -> datetime:
    return datetime.now(timezone.utc)


# -- what each table is keyed by -------------------------------------------------------------------

@dataclass(frozen=True)
class AnswersKey:
    """Answers of one MLLM to one versioned question (asking for at most k phrases)."""

    dataset: str
    mllm: str
    prompt_version: str
    k: int

    @property
    def name(self) -> str:
        return self._named(slug(self.mllm))

    def _named(self, mllm_slug: str) -> str:
        return f"{mllm_slug}--{self.prompt_version}-k{self.k}"

    def folder(self, cache_dir: Path) -> Path:
        """The table's folder: under the name it was made with, wherever the MLLM's folder is now."""
        tables = Path(cache_dir) / self.dataset / "answers"
        made = [tables / self._named(name) for name in slugs(self.mllm)]
        return next((f for f in made if f.is_dir()), made[0])


@dataclass(frozen=True)
class ScpKey:
    """Those answers embedded by one frozen CLIP (dim = its joint embedding width)."""

    answers: AnswersKey
    clip_model: str
    dim: int

    def folder(self, cache_dir: Path) -> Path:
        answers = self.answers.folder(cache_dir).name
        return Path(cache_dir) / self.answers.dataset / "scp" / f"{answers}--{slug(self.clip_model)}"


IMAGES_SCHEMA = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("size", pa.int64()),
                          ("mtime_ns", pa.int64()), ("split", pa.string()), ("label", pa.int32()),
                          ("classname", pa.string()), ("created", pa.timestamp("us", tz="UTC"))])
ANSWERS_SCHEMA = pa.schema([("sha256", pa.string()), ("status", pa.string()), ("error", pa.string()),
                           ("answer", pa.string()), ("phrases", pa.list_(pa.string())), ("mllm", pa.string()),
                           ("prompt_version", pa.string()), ("created", pa.timestamp("us", tz="UTC"))])


def scp_schema(k: int, dim: int) -> pa.Schema:
    return pa.schema([("sha256", pa.string()), ("scp", pa.list_(pa.list_(pa.float16(), dim), k)),
                      ("mask", pa.list_(pa.bool_(), k)), ("mllm", pa.string()), ("prompt_version", pa.string()),
                      ("clip_model", pa.string()), ("created", pa.timestamp("us", tz="UTC"))])


# -- a table: meta.json + parts/ -------------------------------------------------------------------

def open_table(folder: Path, meta: dict, described: Optional[dict] = None, record: bool = True) -> Path:
    """Create (or check) a table folder; one that exists must be keyed by the same `meta`.

    `described` (e.g. the question's text) is recorded when the folder is made, not compared. With `record`
    False the folder is made and checked but its meta.json is left to `record_meta`, called before the first
    part is written: a run that fails before it has anything to write leaves no table behind."""
    try:
        (folder / "parts").mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the cache at {folder}: {e.strerror} (choose another --cache-dir)") from None
    meta = {"schema_version": SCHEMA_VERSION, **meta}
    path = folder / "meta.json"
    if path.is_file():
        found = read_meta(folder)
        differs = {k: (found.get(k), v) for k, v in meta.items() if found.get(k) != v}
        if differs:
            raise UserError(f"cache table {folder} holds something else ({differs}): move it away or use "
                            f"another --cache-dir")
    elif record:
        record_meta(folder, meta, described)
    return folder


def record_meta(folder: Path, meta: dict, described: Optional[dict] = None, agree: tuple[str, ...] = ()) -> None:
    """Write a new table's meta.json (`open_table`'s keys, schema version first), unless it has one. One that
    another writer made meanwhile (a shard of the same table, started at the same time) must hold what this
    writer's rows were made with: `meta`'s keys and `agree`'s keys of `described`; else its rows are refused."""
    mine = {"schema_version": SCHEMA_VERSION, **meta, **(described or {})}
    path = folder / "meta.json"
    if path.is_file() or not write_json_new(path, {**mine, "created": now().isoformat()}):
        held = read_meta(folder)
        clash = [k for k in (*meta, *agree) if k in held and k in mine and held[k] != mine[k]]
        if clash:
            raise UserError(f"{folder} was started meanwhile by another extract with {clash[0]} {held[clash[0]]}, not "
                            f"{mine[clash[0]]}: this run's rows are not kept; describe with the same {clash[0]}")


def remove_if_unused(folder: Path) -> None:
    """Remove a table folder made by `open_table(record=False)` that was never written to."""
    if not (folder / "meta.json").exists():
        for empty in (folder / "parts", folder):
            try:
                empty.rmdir()
            except OSError:
                return


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {folder / 'meta.json'} ({type(e).__name__}): the cache is damaged; move "
                        f"{folder} away and run `mugcp extract` again") from None
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        # <cache>/<dataset>/{answers,scp}/<name>, or <cache>/<dataset>/images and schema 1's <cache>/<dataset>/<name>
        root = folder.parents[2] if folder.parent.name in ("answers", "scp") else folder.parents[1]
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise UserError(f"cache {folder} has schema version {version}, this mugcp reads {SCHEMA_VERSION}: " + (
            "it was made by a newer mugcp; read it with that version, or use another --cache-dir" if newer else
            f"convert it with `mugcp cache migrate --cache-dir {root}`"))
    return meta


def parts(folder: Path) -> list[str]:
    """The table's part files, as absolute paths (pyarrow reads "cache:v2/..." as a URI)."""
    return sorted(os.path.abspath(p) for p in (folder / "parts").glob("part-*.parquet"))


def scan(folder: Path, schema: pa.Schema, columns: list[str], filter=None) -> pa.Table:
    """Rows of a table's parts, read through memory maps; an unreadable part is named in one line."""
    files = parts(folder)
    if not files:
        return schema.empty_table().select(columns)
    try:
        return _read(files, schema, columns, filter)
    except (pa.ArrowInvalid, OSError) as e:
        raise _damaged(folder, files, schema, columns, filter, e) from None


# Every page carries a CRC-32 (older parts have none, and are read unchecked):
# a page whose bytes changed on disk is an error here, not silently wrong SCP.
CHECKED_PARQUET = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))


def _read(files: list[str], schema: pa.Schema, columns: list[str], filter=None) -> pa.Table:
    dataset = ds.dataset(files, schema=schema, format=CHECKED_PARQUET, filesystem=fs.LocalFileSystem(use_mmap=True))
    return dataset.to_table(columns=columns, filter=filter)


def _damaged(folder: Path, files: list[str], schema: pa.Schema, columns: list[str], filter, error: Exception) -> UserError:
    """One line naming the first part that cannot be read on its own, by its full path (Arrow's message may
    name no file at all)."""
    def reason(e: Exception, file: str = "") -> str:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return first.split(f"'{file}': ", 1)[-1] if file else first

    for file in files:
        try:
            _read([file], schema, columns, filter)
        except (pa.ArrowInvalid, OSError) as e:
            return UserError(f"the cache part {file} cannot be read ({reason(e, file)}): move it away and run "
                             f"`mugcp extract` again to refill it")
    return UserError(f"the cache table {folder} cannot be read ({reason(error)}): move it away and run "
                     f"`mugcp extract` again to refill it")


def latest(table: pa.Table, key: str) -> pl.DataFrame:
    """One row per `key`: the most recently written (by `created`)."""
    return pl.from_arrow(table).sort("created", maintain_order=True).unique(subset=[key], keep="last",
                                                                            maintain_order=True)


class TableWriter:
    """Buffers rows and writes them as atomic part files every `flush_rows` rows or `flush_seconds`.

    `before_flush` runs before each part is written: the SCP writer flushes the answers writer first, so that
    a kill never leaves an SCP row whose answer was not written (the next run would ask the MLLM again and
    write that SCP twice)."""

    def __init__(self, folder: Path, schema: pa.Schema, shard: str = "0of1", flush_rows: int = 256,
                 flush_seconds: float = 30.0, before_flush=None):
        self.folder, self.schema, self.shard = folder, schema, shard
        self.flush_rows, self.flush_seconds, self.before_flush = flush_rows, flush_seconds, before_flush
        self.pending: list[pa.Table] = []
        self.buffered = 0
        self.seq = 0
        self.last_flush = time.monotonic()
        self.written = 0

    def add(self, **row) -> None:
        """One row (plain Python values)."""
        self.add_columns({k: [v] for k, v in row.items()})

    def add_columns(self, columns: dict, created: Optional[datetime] = None) -> None:
        """Many rows at once, as columns (lists or Arrow arrays); `created` is filled in (now, unless given)."""
        n = len(next(iter(columns.values())))
        columns = {"created": pa.array([created or now()] * n, pa.timestamp("us", tz="UTC")), **columns}
        self.pending.append(pa.Table.from_pydict({f.name: columns[f.name] for f in self.schema}, schema=self.schema))
        self.buffered += n
        if self.buffered >= self.flush_rows or time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.pending:
            return
        if self.before_flush is not None:
            self.before_flush()
        name = f"part-{self.shard}-{self.seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.folder / "parts" / f".{name}.tmp"
        try:
            pq.write_table(pa.concat_tables(self.pending), os.path.abspath(tmp), compression="zstd",
                           write_page_checksum=True, filesystem=LOCAL)  # a path, not a URI ("cache:v2/...")
            tmp.rename(self.folder / "parts" / name)
        except OSError as e:  # no space left, a read-only place: the rows of this part are not kept
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write the cache part {self.folder / 'parts' / name}: {e.strerror}") from None
        self.seq += 1
        self.written += self.buffered
        self.pending, self.buffered = [], 0

    def close(self) -> None:
        self.flush()


def remove_stale_temporaries(folder: Path, shard: str) -> int:
    """Delete the hidden part files a killed writer of `shard` left behind (the caller holds the lock of every
    writer that names its parts `shard`)."""
    stale = list((folder / "parts").glob(f".part-{shard}-*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def scp_column(scp: np.ndarray) -> pa.Array:
    """(N, K, D) float16 -> a fixed-size list column [K][D]."""
    n, k, d = scp.shape
    inner = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(scp).reshape(-1), pa.float16()), d)
    return pa.FixedSizeListArray.from_arrays(inner, k)


def mask_column(mask: np.ndarray) -> pa.Array:
    n, k = mask.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1), pa.bool_()), k)


# -- the images table ------------------------------------------------------------------------------

def images_folder(cache_dir: Path, dataset: str) -> Path:
    return Path(cache_dir) / dataset / "images"


def after_every_row(folder: Path, schema: pa.Schema) -> datetime:
    """A `created` for new rows that supersede rows of this table: now, or just after its newest row if that is
    later (a machine whose clock is behind another's must not lose its updates to "latest row wins")."""
    stamp = now()
    if parts(folder):
        newest = pc.max(scan(folder, schema, ["created"]).column("created")).as_py()
        if newest is not None and newest >= stamp:
            stamp = newest + timedelta(microseconds=1)
    return stamp


def known_images(cache_dir: Path, dataset: str) -> dict[str, tuple[str, int, int]]:
    """path -> (sha256, size, mtime_ns) as last recorded."""
    folder = images_folder(cache_dir, dataset)
    if not (folder / "meta.json").is_file():
        return {}
    read_meta(folder)
    rows = latest(scan(folder, IMAGES_SCHEMA, ["path", "sha256", "size", "mtime_ns", "created"]), "path")
    return {p: (s, z, m) for p, s, z, m in zip(*(rows[c].to_list() for c in ("path", "sha256", "size", "mtime_ns")))}


# -- the answers and SCP tables ------------------------------------------------------------------

def answered(folder: Path) -> set[str]:
    """The content hashes with a usable answer in this table (one column read: a million answers' phrases are not
    loaded to learn which images need the MLLM)."""
    if not parts(folder):
        return set()
    return set(scan(folder, ANSWERS_SCHEMA, ["sha256"], ds.field("status") == "ok").column("sha256").to_pylist())


def ok_answers(folder: Path, shas: Optional[list[str]] = None) -> dict[str, list[str]]:
    """content hash -> phrases of its latest usable answer (of `shas` only, if given)."""
    if not parts(folder):
        return {}
    wanted = ds.field("status") == "ok"
    if shas is not None:
        wanted = wanted & ds.field("sha256").isin(pa.array(sorted(set(shas)), pa.string()))
    rows = latest(scan(folder, ANSWERS_SCHEMA, ["sha256", "phrases", "created"], wanted), "sha256")
    return dict(zip(rows["sha256"].to_list(), rows["phrases"].to_list()))


def answered_phrases(cache_dir: Path, dataset: str) -> dict[str, list[str]]:
    """path -> phrases of the latest usable answer to the content the path last held, read from every
    answers table of `dataset` (a cache of one MLLM and question has one; with several, the table whose
    folder name sorts last wins for a content both answered)."""
    content = {path: sha for path, (sha, _, _) in known_images(cache_dir, dataset).items()}
    phrases = {}
    for folder in sorted((Path(cache_dir) / dataset / "answers").iterdir()):
        phrases.update(ok_answers(folder))
    return {path: phrases[sha] for path, sha in content.items() if sha in phrases}


def embedded(folder: Path) -> set[str]:
    """Content hashes that already have SCP rows in this table."""
    if not parts(folder):
        return set()
    meta = read_meta(folder)
    return set(scan(folder, scp_schema(meta["k"], meta["dim"]), ["sha256"]).column("sha256").to_pylist())


# -- finding the SCP table a run reads --------------------------------------------------------------

def _hint_meta(path: Path) -> dict:
    """A meta.json read for a hint only: {} where it is missing, damaged or not an object."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _recorded_backend(cache_dir: Path, key: AnswersKey) -> Optional[str]:
    """The backend that gave this table's answers, as its meta.json records it (caches before it: none)."""
    return _hint_meta(key.folder(cache_dir) / "meta.json").get("backend")


def _backend_elsewhere(cache_dir: Path, mllm: str) -> Optional[str]:
    """The backend any answers table of this MLLM (any dataset, prompt or k) records, or None."""
    for path in sorted(Path(cache_dir).glob("*/answers/*/meta.json")):
        meta = _hint_meta(path)
        if mllm in known_names(meta) and meta.get("backend"):
            return meta["backend"]
    return None


def extract_command(cache_dir: Path, dataset: str, hint: str = "", metas: tuple[dict, ...] = (),
                    mllm: Optional[str] = None, asked: Optional[dict] = None) -> str:
    """The `mugcp extract` command that fills a gap: the run's own options (`hint`), then what names the table
    to fill when `metas` (the candidate tables) agree on it (MLLM, prompt, k) or else the MLLM asked for, the
    backend its answers came from (or that any dataset's answers of that MLLM came from; none where the cache
    does not say: extract's default), and `asked`: what the run asks for
    that no table holds (`{"--prompt": ..., "--k": ...}`); each option once."""
    options: dict[str, object] = {}
    if len({m["mllm"] for m in metas}) == 1:
        def agreed(key: str):
            values = {m.get(key) for m in metas}
            return values.pop() if len(values) == 1 else None

        backend = next((b for m in metas if (b := _recorded_backend(
            cache_dir, AnswersKey(dataset, m["mllm"], m["prompt_version"], m["k"])))), None)
        options = {"--mllm": metas[0]["mllm"], "--prompt": agreed("prompt"), "--k": agreed("k"),
                   "--backend": backend or _backend_elsewhere(cache_dir, metas[0]["mllm"])}
    elif mllm:
        options = {"--mllm": mllm, "--backend": _backend_elsewhere(cache_dir, mllm)}
    options.update({flag: value for flag, value in (asked or {}).items() if value is not None})
    given = hint.split()
    extra = "".join(f" {flag} {shlex.quote(str(value))}" for flag, value in options.items()
                    if value is not None and flag not in given)
    return f"mugcp extract --dataset {dataset}{hint}{extra}"


MLLM_NAMES = "mllm_names"  # the answers meta's other spellings of a local MLLM folder (pipeline/mllm_weights.py)


def known_names(answers_meta: dict) -> set[str]:
    """Every name an answers table knows its MLLM by: the one it is keyed by, and the other spellings of a local
    folder (a relative path, another machine's mount of the same files) that extracts found it under."""
    names = answers_meta.get(MLLM_NAMES)
    return {answers_meta.get("mllm"), *(names if isinstance(names, list) else [])}


def answers_of(cache_dir: Path, dataset: str, scp_meta: dict) -> Path:
    """The answers table an SCP table embeds (its meta names the MLLM, prompt version and k)."""
    return AnswersKey(dataset, scp_meta["mllm"], scp_meta["prompt_version"], scp_meta["k"]).folder(cache_dir)


def mllm_names(cache_dir: Path, dataset: str, scp_meta: dict) -> set[str]:
    """Every name the MLLM of an SCP table is known by (`known_names` of its answers table)."""
    answers = answers_of(cache_dir, dataset, scp_meta)
    try:
        answers_meta = json.loads((answers / "meta.json").read_text())
    except (OSError, ValueError):
        answers_meta = {}
    return {scp_meta["mllm"], *known_names(answers_meta if isinstance(answers_meta, dict) else {})} - {None}


def refuse_schema_1(cache_dir: Path, dataset: str) -> None:
    """A schema-1 folder of `dataset` is refused with the command that converts it: read as schema 2, its answers
    would be invisible, and every image would be described again."""
    root = Path(cache_dir) / dataset
    old = [f for f in sorted(root.glob("*/meta.json")) if f.parent.name not in TABLES] if root.is_dir() else []
    if old:
        read_meta(old[0].parent)


def being_written(cache_dir: Path, dataset: str) -> str:
    """", while an extract of `dataset` runs now (which may be filling the gap a reader meets)", or ""."""
    now = holders(Path(cache_dir) / dataset, ".lock-*")
    return f" (an extract is writing it now: {now[0]}; wait for it to finish)" if now else ""


def find_scp(cache_dir: Path, dataset: str, clip_model: str, mllm: Optional[str] = None,
             prompt_version: Optional[str] = None, hint: str = "", k: Optional[int] = None) -> tuple[Path, dict]:
    """The one SCP table of `dataset` made for this CLIP (and MLLM / prompt version, or prompt name, / k, if
    given).

    `hint` holds the run's options for `mugcp extract` (root, CLIP, cache, shots, ...), which the errors'
    commands complete with what the cache knows (the MLLM and the backend that made its answers)."""
    root = Path(cache_dir) / dataset
    refuse_schema_1(cache_dir, dataset)
    folders = sorted(p.parent for p in (root / "scp").glob("*/meta.json")) if root.is_dir() else []
    if not folders:
        raise UserError(f"no stage-one cache for {dataset} under {cache_dir}{being_written(cache_dir, dataset)}: run "
                        f"`{extract_command(cache_dir, dataset, hint, mllm=mllm)}` first")
    metas = [(f, read_meta(f)) for f in folders]

    asked = {mllm, str(Path(mllm).resolve())} if mllm and Path(mllm).is_dir() else {mllm}  # a folder: its path too

    def mine(m: dict) -> bool:
        return mllm is None or slug(m["mllm"]) == slug(mllm) or bool(asked & {
            n for n in mllm_names(cache_dir, dataset, m) if Path(n).is_absolute()})  # (a relative one is ambiguous)

    same = [(f, m) for f, m in metas if m["clip_model"] == clip_model]
    if not same:
        others = ", ".join(sorted({m["clip_model"] for _, m in metas}))
        command = extract_command(cache_dir, dataset, hint, tuple(m for _, m in metas if mine(m)), mllm)
        raise UserError(f"the cache for {dataset} was made for CLIP {others}, not {clip_model}: "
                        f"run `{command}` with this CLIP (the MLLM's answers are reused, no MLLM call)")
    if prompt_version is not None:
        chosen = [(f, m) for f, m in same if prompt_version in (m["prompt_version"], m.get("prompt"))]
        if not chosen:
            others = ", ".join(sorted({m["prompt_version"] for _, m in same}))
            name = next((m.get("prompt") for _, m in metas if m["prompt_version"] == prompt_version and
                         m.get("prompt")), prompt_version)  # --prompt takes a name; the key may give a version
            command = extract_command(cache_dir, dataset, hint, tuple(m for _, m in same if mine(m)), mllm,
                                      {"--prompt": name, "--k": k})
            raise UserError(f"the cache for {dataset} holds prompt version {others}, not {prompt_version}: "
                            f"run `{command}`")
        same = chosen
    same = [(f, m) for f, m in same if mine(m)]
    if not same:
        raise UserError(f"no cache for {dataset} from MLLM {mllm} with CLIP {clip_model}: "
                        f"run `{extract_command(cache_dir, dataset, hint, mllm=mllm)}`")
    if k is not None:
        chosen = [(f, m) for f, m in same if m["k"] == k]
        if not chosen:
            others = ", ".join(sorted({str(m["k"]) for _, m in same}))
            raise UserError(f"the cache for {dataset} holds SCP of k {others}, not {k}: run "
                            f"`{extract_command(cache_dir, dataset, hint, tuple(m for _, m in same), mllm, {'--k': k})}`")
        same = chosen
    if len(same) > 1:
        choices = ", ".join(f"{m['mllm']} ({m['prompt_version']}, k {m['k']})" for _, m in same)
        ways = [how for key, how in (("mllm", "--mllm"), ("prompt_version", "--set conditions.prompt=VERSION"),
                                     ("k", "--set conditions.k=K")) if len({m[key] for _, m in same}) > 1]
        raise UserError(f"several caches for {dataset} and CLIP {clip_model} ({choices}): choose one with "
                        f"{' and '.join(ways)}")
    return same[0]


@dataclass
class ScpArrays:
    """SCP of a list of images, row i for path i: scp (N, K, D) float16 and mask (N, K) bool."""

    scp: np.ndarray
    mask: np.ndarray
    meta: dict
    folder: Path  # the SCP table they were read from


def changed_since_described(data_folder: Path, paths: list[str], index: dict[str, tuple[str, int, int]]) -> list[str]:
    """The paths whose file no longer holds the content the images table records for it. A file of the size and
    modification time recorded is taken as unchanged (stage one's own rule); any other (a copied dataset, a
    schema-1 row without them) is hashed and compared."""
    changed = []
    for path in paths:
        if path not in index:
            continue  # never described: the caller names it as missing
        sha, size, mtime_ns = index[path]
        file = Path(data_folder) / path
        try:
            st = file.stat()
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns) and _hash(str(file), st.st_size, st.st_mtime_ns) != sha:
                changed.append(path)
        except OSError:
            continue  # unreadable: the loader names the file when it reads it
    return changed


@functools.lru_cache(maxsize=1 << 18)  # ImageNet-sized test sets, a few times over
def _hash(file: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, once per process for a given size and mtime (a sweep tests one copy many times)."""
    return file_sha256(file)


def read_scp(cache_dir: Path, dataset: str, clip_model: str, paths: list[str], mllm: Optional[str] = None,
             prompt_version: Optional[str] = None, hint: str = "", data_folder: Optional[Path] = None,
             k: Optional[int] = None) -> ScpArrays:
    """Load the SCP of `paths` only (path -> content hash -> SCP row), in the order given. With `data_folder`
    (where the paths are), an image whose bytes changed since stage one described it is refused: its SCP
    describes what the file used to hold."""
    folder, meta = find_scp(cache_dir, dataset, clip_model, mllm, prompt_version, hint, k)
    k, dim = meta["k"], meta["dim"]
    index = known_images(cache_dir, dataset)
    if data_folder is not None:
        changed = changed_since_described(data_folder, list(dict.fromkeys(paths)), index)
        if changed:
            raise UserError(f"{len(changed)} image(s) of {dataset} changed since stage one described them (e.g. "
                            f"{changed[0]}), so their SCP describes other bytes: run "
                            f"`{extract_command(cache_dir, dataset, hint, (meta,))}` to describe them again")
    shas = [index.get(p, (None,))[0] for p in paths]
    wanted = pa.array(sorted({s for s in shas if s}), pa.string())
    table = scan(folder, scp_schema(k, dim), ["sha256", "scp", "mask", "created"], ds.field("sha256").isin(wanted))
    rows = latest(table.select(["sha256", "created"]).append_column("row", pa.array(range(table.num_rows))),
                  "sha256")
    row_of = dict(zip(rows["sha256"].to_list(), rows["row"].to_list()))
    missing = [p for p, s in zip(paths, shas) if s not in row_of]
    if missing:
        command = extract_command(cache_dir, dataset, hint, (meta,))
        failed = _failed_answers(cache_dir, dataset, meta, {s for s in shas if s and s not in row_of})
        shown = next(((p, failed[s]) for p, s in zip(paths, shas) if s in failed), None)
        if shown is not None and shown[1].startswith(("unreadable image", "cannot read ")):
            # asking stage one again would fail again: the file is what needs mending
            raise UserError(f"{len(set(missing))} image(s) of {dataset} have no SCP; stage one could not describe "
                            f"{shown[0]} ({shown[1]}): replace or remove such files, then run `{command}`")
        if shown is not None:  # the MLLM's answer failed (no usable phrase, cut, a server error), or the file
            # changed mid-run: the file is fine, and the next extract asks again
            raise UserError(f"{len(set(missing))} image(s) of {dataset} have no SCP; stage one could not describe "
                            f"{shown[0]} ({shown[1]}): `mugcp extract` asks failed images again, run `{command}`")
        raise UserError(f"{len(set(missing))} image(s) of {dataset} have no SCP in the cache {folder} "
                        f"(e.g. {missing[0]}){being_written(cache_dir, dataset)}: run `{command}` to fill them")
    taken = table.take(pa.array([row_of[s] for s in shas], pa.int64()))
    scp = taken.column("scp").combine_chunks()
    values = scp.flatten().flatten().to_numpy(zero_copy_only=False)
    mask = taken.column("mask").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return ScpArrays(values.reshape(len(paths), k, dim), mask.reshape(len(paths), k).astype(bool), meta, folder)


def _failed_answers(cache_dir: Path, dataset: str, scp_meta: dict, shas: set) -> dict[str, str]:
    """content hash -> why stage one could not describe it, for those of `shas` whose latest answer failed."""
    folder = answers_of(cache_dir, dataset, scp_meta)
    if not shas or not parts(folder):
        return {}
    rows = latest(scan(folder, ANSWERS_SCHEMA, ["sha256", "status", "error", "created"],
                       ds.field("sha256").isin(pa.array(sorted(shas), pa.string()))), "sha256")
    return {sha: error or "no usable answer" for sha, status, error in
            zip(rows["sha256"].to_list(), rows["status"].to_list(), rows["error"].to_list()) if status == "failed"}


# -- what a cache holds ------------------------------------------------------------------------------

def cache_contents(cache_dir: Path, dataset: Optional[str] = None) -> list[str]:
    """Lines telling what the cache holds, per dataset: the images indexed; each answers table (MLLM, prompt and
    version, k, backend, --max-tokens; contents described and failed, by their latest answer) and each SCP
    table made from it (CLIP, width; contents embedded), then SCP tables whose answers table is gone (still
    readable by stage two). Only the columns counted are read; a table that cannot be read is named on its
    line, the others are listed."""
    root = Path(cache_dir)
    if not root.is_dir():
        raise UserError(f"no cache at {root}: `mugcp extract` makes one (--cache-dir)")
    names = [dataset] if dataset else sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    lines = []
    for name in names:
        if not (root / name).is_dir():
            raise UserError(f"the cache at {root} holds nothing for {name}")
        try:
            refuse_schema_1(root, name)
            images = images_folder(root, name)
            lines.append(f"{name}: {_distinct(images, IMAGES_SCHEMA, 'path')} image path(s) indexed")
        except UserError as e:
            lines.append(f"{name}: {e}")
            continue
        scps = {}
        for meta_file in sorted((root / name / "scp").glob("*/meta.json")):
            try:
                scps[meta_file.parent] = read_meta(meta_file.parent)
            except UserError as e:
                lines.append(f"  {e}")
        listed = set()
        for meta_file in sorted((root / name / "answers").glob("*/meta.json")):
            try:
                folder, meta = meta_file.parent, read_meta(meta_file.parent)
                latest_status = (latest(scan(folder, ANSWERS_SCHEMA, ["sha256", "status", "created"]), "sha256")
                                 if parts(folder) else None)
            except UserError as e:
                lines.append(f"  {e}")
                continue
            count = dict(latest_status["status"].value_counts().iter_rows()) if latest_status is not None else {}
            limit = f", --max-tokens {meta['max_tokens']}" if meta.get("max_tokens") else ""
            lines.append(f"  answers of {meta.get('mllm')} ({meta.get('backend') or 'backend not recorded'}), prompt "
                         f"{meta.get('prompt') or '?'} ({meta.get('prompt_version')}), k {meta.get('k')}{limit}: "
                         f"{count.get('ok', 0)} described, {count.get('failed', 0)} failed ({folder})")
            for scp_folder, scp in scps.items():
                if answers_of(root, name, scp) == folder:
                    listed.add(scp_folder)
                    lines.append(f"    {_scp_line(scp_folder, scp)}")
        for scp_folder, scp in scps.items():
            if scp_folder not in listed:
                lines.append(f"  {_scp_line(scp_folder, scp)}, from {scp.get('mllm')} ({scp.get('prompt_version')}, "
                             f"k {scp.get('k')}) whose answers table is not here ({scp_folder})")
    return lines


def _distinct(folder: Path, schema: pa.Schema, column: str) -> int:
    """Distinct values of one column of a table (counted in Arrow: a million paths make no Python strings)."""
    return pc.count_distinct(scan(folder, schema, [column]).column(column)).as_py() if parts(folder) else 0


def _scp_line(folder: Path, scp: dict) -> str:
    try:
        rows = _distinct(folder, scp_schema(scp["k"], scp["dim"]), "sha256")
    except (KeyError, UserError) as e:
        return f"SCP table {folder}: cannot be counted ({e})"
    return f"SCP for CLIP {scp.get('clip_model')} (width {scp['dim']}): {rows} embedded"


# -- schema 1 -> 2 ---------------------------------------------------------------------------------

def migrate_v1(cache_dir: Path) -> list[str]:
    """Convert every schema-1 folder under `cache_dir` (one per dataset, MLLM, prompt and CLIP, holding rows
    with path, answer and SCP bytes together) into the three tables; the old folder is renamed `<name>.v1`."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        problem = "is not a folder" if cache_dir.exists() else "not found"
        raise UserError(f"cache folder {cache_dir}: {problem} (give the --cache-dir that holds the cache)")
    done = []
    # images per dataset, answers per answers key, SCP per SCP key: folders of one MLLM and two CLIPs share the
    # first two; each row is written once (by this run, or by an earlier one that was interrupted)
    written: dict[object, set[str]] = {}
    for meta_path in sorted(cache_dir.glob("*/*/meta.json")):
        folder = meta_path.parent
        if folder.name in TABLES:
            continue
        old = _v1_meta(meta_path)
        if old is None:
            continue
        dataset, k, dim = old["dataset"], old["k"], old["dim"]
        rows = [row for f in sorted(folder.glob("part-*.parquet")) for row in _v1_rows(f)]
        answers_key = AnswersKey(dataset, old["mllm"], old["prompt_version"], k)
        scp_key = ScpKey(answers_key, old["clip_model"], dim)
        images = open_table(images_folder(cache_dir, dataset), {"table": "images", "dataset": dataset})
        answers = open_table(answers_key.folder(cache_dir), {"table": "answers", "dataset": dataset,
                                                             "mllm": old["mllm"], "k": k,
                                                             "prompt_version": old["prompt_version"]})
        scp = open_table(scp_key.folder(cache_dir), {"table": "scp", "dataset": dataset, "mllm": old["mllm"],
                                                     "prompt_version": old["prompt_version"], "k": k,
                                                     "clip_model": old["clip_model"], "dim": dim})
        with_sha = [r for r in rows if r["sha256"]]
        new_images = _unwritten(with_sha, _held(written, dataset, images, IMAGES_SCHEMA, "path"), "path")
        if new_images:  # size and mtime unknown: the next extract hashes these files again
            TableWriter(images, IMAGES_SCHEMA, "v1", len(new_images)).add_columns(
                {"path": [r["path"] for r in new_images], "sha256": [r["sha256"] for r in new_images],
                 "size": [-1] * len(new_images), "mtime_ns": [-1] * len(new_images),
                 "split": [r["split"] for r in new_images], "label": [r["label"] for r in new_images],
                 "classname": [r["classname"] for r in new_images]})
        new_answers = _unwritten(with_sha, _held(written, answers_key, answers, ANSWERS_SCHEMA, "sha256"), "sha256")
        if new_answers:
            TableWriter(answers, ANSWERS_SCHEMA, "v1", len(new_answers)).add_columns(
                {c: [r[c] for r in new_answers] for c in ("sha256", "status", "error", "answer", "phrases", "mllm",
                                                         "prompt_version")})
        ok = _unwritten([r for r in with_sha if r["status"] == "ok"],
                        _held(written, scp_key, scp, scp_schema(k, dim), "sha256"), "sha256")
        if ok:
            vectors = np.frombuffer(b"".join(r["scp"] for r in ok), np.float16).reshape(len(ok), k, dim)
            masks = np.frombuffer(b"".join(r["mask"] for r in ok), np.uint8).reshape(len(ok), k).astype(bool)
            TableWriter(scp, scp_schema(k, dim), "v1", len(ok)).add_columns(
                {"sha256": [r["sha256"] for r in ok], "scp": scp_column(vectors), "mask": mask_column(masks),
                 "mllm": [r["mllm"] for r in ok], "prompt_version": [r["prompt_version"] for r in ok],
                 "clip_model": [r["clip_model"] for r in ok]})
        meta_path.rename(folder / "meta.v1.json")
        folder.rename(folder.with_name(folder.name + ".v1"))
        done.append(f"migrated {folder}: {len(rows)} row(s), {len(ok)} with SCP -> {scp}")
    return done or [f"nothing to migrate under {cache_dir}"]


V1_KEYS = ("dataset", "mllm", "prompt_version", "clip_model", "k", "dim")


def _held(written: dict, key, table: Path, schema: pa.Schema, column: str) -> set[str]:
    """The `column` values a table holds, read once per migration (an earlier, interrupted one wrote some)."""
    if key not in written:
        written[key] = set(scan(table, schema, [column]).column(column).to_pylist())
    return written[key]


def _unwritten(rows: list[dict], seen: set[str], key: str) -> list[dict]:
    """The rows whose `key` this migration has not written yet (and marks them written)."""
    fresh = [r for r in rows if r[key] not in seen]
    seen.update(r[key] for r in fresh)
    return fresh


def _v1_meta(path: Path) -> Optional[dict]:
    """A folder's meta.json if it is schema 1 (None for any other version), or one line naming the file."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): fix it or move its folder away, then migrate "
                        f"again") from None
    if not isinstance(meta, dict) or (meta.get("schema_version") == 1 and not all(k in meta for k in V1_KEYS)):
        raise UserError(f"{path} is not a cache's meta.json (a schema-1 one names {', '.join(V1_KEYS)}): fix it "
                        f"or move its folder away, then migrate again")
    return meta if meta.get("schema_version") == 1 else None


def _v1_rows(path: Path) -> list[dict]:
    try:
        return pq.read_table(os.path.abspath(path), page_checksum_verification=True, filesystem=LOCAL).to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"the schema-1 cache part {path} cannot be read ({str(e).strip().splitlines()[0]}): move "
                        f"it away (its images are described again by the next extract), then migrate again") from None
