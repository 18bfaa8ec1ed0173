"""The stage-one cache: the only thing the two stages share. Parquet, versioned, with provenance per row.

Layout: `<cache_dir>/<dataset>/<mllm>--<prompt version>--<clip model>/` holds `meta.json` (schema
version and the triple) and part files `part-<shard>-<seq>-<uuid>.parquet`. A part is written
under a hidden temporary name and renamed into place, so readers never see a torn file and a
kill -9 loses at most the rows not yet flushed. Several shards (machines) write into one folder
and read as one dataset. One row per image attempt; failed attempts are kept for the record
(status "failed") and retried by the next run; the latest "ok" row of a path wins.

SCP tensors are fixed-size binary columns (K x D float16, K mask bytes), so a batch
of rows is one contiguous buffer that numpy views without copying.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow import fs

from mugcp.core.errors import UserError
from mugcp.core.files import write_json_atomic

SCHEMA_VERSION = 1


def _slug(text: str) -> str:
    """A folder-safe, readable and unique name for a model id or path."""
    name = Path(text).name if ("/" in text and Path(text).exists()) else text
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60]
    return f"{clean}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class CacheMeta:
    dataset: str
    mllm: str
    prompt_version: str
    clip_model: str
    k: int
    dim: int
    schema_version: int = SCHEMA_VERSION

    def folder(self, cache_dir: str | Path) -> Path:
        return Path(cache_dir) / self.dataset / f"{_slug(self.mllm)}--{self.prompt_version}--{_slug(self.clip_model)}"


def schema(k: int, dim: int) -> pa.Schema:
    return pa.schema([
        ("path", pa.string()), ("sha256", pa.string()), ("split", pa.string()), ("label", pa.int32()),
        ("classname", pa.string()), ("status", pa.string()), ("error", pa.string()),
        ("mllm", pa.string()), ("prompt_version", pa.string()), ("clip_model", pa.string()),
        ("schema_version", pa.int16()), ("answer", pa.string()), ("phrases", pa.list_(pa.string())),
        ("scp", pa.binary(k * dim * 2)), ("mask", pa.binary(k)),
        ("created", pa.timestamp("ms", tz="UTC")),
    ])


def open_cache(cache_dir: str | Path, meta: CacheMeta) -> Path:
    """Create (or check) the cache folder for `meta`; a folder that exists must describe the same thing."""
    folder = meta.folder(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the cache under {cache_dir}: {e.strerror} (choose another --cache-dir)") from None
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        found = read_meta(folder)
        if found != meta:
            raise UserError(f"cache folder {folder} holds {found}, not {meta}: move it away or use another --cache-dir")
    else:
        write_json_atomic(meta_path, {**meta.__dict__, "created": datetime.now(timezone.utc).isoformat()})
    return folder


def read_meta(folder: Path) -> CacheMeta:
    data = json.loads((folder / "meta.json").read_text())
    if data.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"cache {folder} has schema version {data.get('schema_version')}, this mugcp reads "
                        f"{SCHEMA_VERSION}: re-run `mugcp extract` into a new --cache-dir")
    return CacheMeta(**{k: data[k] for k in CacheMeta.__dataclass_fields__})


class CacheWriter:
    """Buffers rows and writes them as atomic part files every `flush_rows` rows or `flush_seconds`."""

    def __init__(self, folder: Path, meta: CacheMeta, shard: str = "0", flush_rows: int = 256,
                 flush_seconds: float = 30.0):
        self.folder, self.meta, self.shard = folder, meta, shard
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.rows: list[dict] = []
        self.seq = 0
        self.last_flush = time.monotonic()
        self.written = 0

    def add(self, **row) -> None:
        base = {"mllm": self.meta.mllm, "prompt_version": self.meta.prompt_version,
                "clip_model": self.meta.clip_model, "schema_version": SCHEMA_VERSION,
                "created": datetime.now(timezone.utc), "error": None, "answer": None, "phrases": [],
                "scp": None, "mask": None}
        self.rows.append({**base, **row})
        if len(self.rows) >= self.flush_rows or time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=schema(self.meta.k, self.meta.dim))
        name = f"part-{self.shard}-{self.seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.folder / f".{name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        tmp.rename(self.folder / name)
        self.seq += 1
        self.written += len(self.rows)
        self.rows = []

    def close(self) -> None:
        self.flush()


def _parts(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("part-*.parquet"))


def _scan(parts: list[str]):
    """A pyarrow dataset over the part files, read through memory maps."""
    return ds.dataset(parts, format="parquet", filesystem=fs.LocalFileSystem(use_mmap=True))


def done_paths(folder: Path) -> set[str]:
    """Paths that already have an "ok" row (what a rerun skips)."""
    parts = _parts(folder)
    if not parts:
        return set()
    table = _scan(parts).to_table(columns=["path"], filter=ds.field("status") == "ok")
    return set(table.column("path").to_pylist())


@dataclass
class ScpArrays:
    """SCP of a list of images, row i for path i: scp (N, K, D) float16 and mask (N, K) bool."""

    scp: "np.ndarray"
    mask: "np.ndarray"
    meta: CacheMeta


def find_cache(cache_dir: str | Path, dataset: str, clip_model: str, mllm: str | None = None,
               prompt_version: str | None = None, hint: str = "") -> tuple[Path, CacheMeta]:
    """The one cache folder of `dataset` made for this CLIP (and MLLM / prompt version, if given)."""
    root = Path(cache_dir) / dataset
    folders = [f for f in sorted(root.glob("*")) if (f / "meta.json").is_file()] if root.is_dir() else []
    extract = f"mugcp extract --dataset {dataset}{hint}"
    if not folders:
        raise UserError(f"no stage-one cache for {dataset} under {cache_dir}: run `{extract}` first")
    metas = [(f, read_meta(f)) for f in folders]
    same_clip = [(f, m) for f, m in metas if m.clip_model == clip_model]
    if not same_clip:
        others = ", ".join(sorted({m.clip_model for _, m in metas}))
        raise UserError(f"the cache for {dataset} was made for CLIP {others}, not {clip_model}: "
                        f"run `{extract}` with this CLIP")
    if prompt_version is not None:
        same = [(f, m) for f, m in same_clip if m.prompt_version == prompt_version]
        if not same:
            others = ", ".join(sorted({m.prompt_version for _, m in same_clip}))
            raise UserError(f"the cache for {dataset} holds prompt version {others}, not {prompt_version}: "
                            f"run `{extract}` again")
        same_clip = same
    if mllm is not None:
        same_clip = [(f, m) for f, m in same_clip if m.mllm == mllm or _slug(m.mllm) == _slug(mllm)]
        if not same_clip:
            raise UserError(f"no cache for {dataset} from MLLM {mllm} with CLIP {clip_model}: run `{extract} --mllm {mllm}`")
    if len(same_clip) > 1:
        choices = ", ".join(f"{m.mllm} ({m.prompt_version})" for _, m in same_clip)
        raise UserError(f"several caches for {dataset} and CLIP {clip_model} ({choices}): choose one with --mllm")
    return same_clip[0]


def read_scp(cache_dir: str | Path, dataset: str, clip_model: str, paths: list[str], mllm: str | None = None,
             prompt_version: str | None = None, hint: str = "") -> ScpArrays:
    """Load the SCP of `paths` only (filtered scan of memory-mapped parts), in the order given."""
    folder, meta = find_cache(cache_dir, dataset, clip_model, mllm, prompt_version, hint)
    wanted = pa.array(sorted(set(paths)), pa.string())
    parts = _parts(folder)
    columns = ["path", "scp", "mask"]
    if parts:
        table = _scan(parts).to_table(columns=columns, filter=(ds.field("status") == "ok") & ds.field("path").isin(wanted))
    else:
        table = schema(meta.k, meta.dim).empty_table().select(columns)
    # the last ok row of a path wins (rows are in part order, parts in name order)
    found = table.column("path").to_pylist()
    row_of = {p: i for i, p in enumerate(found)}
    missing = [p for p in paths if p not in row_of]
    if missing:
        raise UserError(f"{len(set(missing))} image(s) of {dataset} have no SCP in the cache {folder} "
                        f"(e.g. {missing[0]}): run `mugcp extract --dataset {dataset}{hint}` to fill them")
    take = pa.array([row_of[p] for p in paths], pa.int64())
    table = table.take(take)

    def view(col: str, dtype, shape):
        arr = pc.cast(table.column(col).combine_chunks(), table.schema.field(col).type)
        return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(paths) * int(np.prod(shape)),
                             offset=arr.offset * int(np.prod(shape)) * np.dtype(dtype).itemsize).reshape(len(paths), *shape)

    return ScpArrays(view("scp", np.float16, (meta.k, meta.dim)), view("mask", np.uint8, (meta.k,)).astype(bool), meta)
