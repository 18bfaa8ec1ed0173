"""`mugcp extract`: describe every image the protocol can touch, label-free, into the SCP cache.

The run is a pipeline of asyncio workers, each taking a chunk of images through: read the
bytes and hash them (thread) -> ask the MLLM (many requests in flight for a server; one batch at
a time on a local engine) -> encode the phrases with the frozen CLIP (thread, one batch for the
whole chunk) -> append rows to the cache writer (atomic part files). Enough chunks are in flight
that the MLLM never waits on the client. A rerun skips paths with an "ok" row; failed images
are recorded with their reason and retried next time. Sharding is by a stable hash of the path,
so N machines get disjoint shards whose union is the dataset.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mugcp.core.coop_datasets import Item, Splits, load_dataset
from mugcp.core.frozen_clip import load_clip
from mugcp.core.progress import progress
from mugcp.core.scp_cache import CacheMeta, CacheWriter, done_paths, open_cache
from mugcp.pipeline.backends import make_backend
from mugcp.pipeline.config import ExtractConfig
from mugcp.pipeline.prompts import PROMPT_VERSION, parse_phrases
from mugcp.pipeline.scp import encode_scp


@dataclass
class ExtractSummary:
    total: int = 0  # images in this shard
    done: int = 0  # described and cached in this run
    skipped: int = 0  # already cached before this run
    failed: int = 0
    seconds: float = 0.0
    cache_path: str = ""
    failures: list[str] = field(default_factory=list)  # a few "path: reason" lines

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        out = [f"extract: {self.total} images in shard, {self.done} described, {self.skipped} already cached, "
               f"{self.failed} failed, {self.images_per_s:.1f} images/s, cache {self.cache_path}"]
        out += [f"  failed: {f}" for f in self.failures[:10]]
        if self.failed > 10:
            out.append(f"  ... and {self.failed - 10} more (status 'failed' rows in the cache)")
        return out


def shard_of(path: str, num_shards: int) -> int:
    """A stable shard for a path, the same on every machine and Python."""
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") % num_shards


def images_to_describe(splits: Splits, which: tuple[str, ...], num_shards: int,
                       shard_index: int) -> list[tuple[Item, str]]:
    """(item, split) of the chosen splits, first occurrence per path, in this shard."""
    seen, out = set(), []
    for name in which:
        for item in getattr(splits, name):
            if item.path not in seen and shard_of(item.path, num_shards) == shard_index:
                seen.add(item.path)
                out.append((item, name))
    return out


def _read(root: Path, chunk: list[tuple[Item, str]]) -> list[tuple[Item, str, Optional[bytes], str]]:
    out = []
    for item, split in chunk:
        try:
            data = (root / item.path).read_bytes()
            out.append((item, split, data, hashlib.sha256(data).hexdigest()))
        except OSError as e:
            out.append((item, split, None, f"cannot read: {e.strerror}"))
    return out


def run_extract(dataset: str, root: Path, config: ExtractConfig, log=print) -> ExtractSummary:
    """Describe the images of `dataset` not yet cached; return counts (the CLI exits non-zero on failures).

    The MLLM defaults to the model a server serves (backend server) or to DEFAULT_MLLM (vllm, hf).
    """
    data = load_dataset(dataset, root)
    todo_all = images_to_describe(data, config.splits, config.num_shards, config.shard_index)
    device = config.backend.device
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                ("cpu" if device == "auto" else device))
    frozen = load_clip(config.clip, config.pretrained, torch_device)
    engine = make_backend(config.backend, config.k)
    return asyncio.run(_extract(data, todo_all, engine, frozen, dataset, config, log))


async def _extract(data, todo_all, engine, frozen, dataset, config: ExtractConfig, log) -> ExtractSummary:
    k, batch_size, concurrency = config.k, config.backend.batch_size, config.backend.concurrency
    await engine.start()  # a server is checked before any work
    try:
        meta = CacheMeta(dataset, engine.model_id, PROMPT_VERSION, frozen.model_id, k, frozen.embed_dim)
        folder = open_cache(config.cache_dir, meta)
        done = done_paths(folder)
        todo = [(it, s) for it, s in todo_all if it.path not in done]
        summary = ExtractSummary(total=len(todo_all), skipped=len(todo_all) - len(todo), cache_path=str(folder))
        writer = CacheWriter(folder, meta, shard=f"{config.shard_index}of{config.num_shards}",
                             flush_rows=config.flush_every)
        chunk = max(1, batch_size)
        chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
        in_flight = max(2, -(-concurrency // chunk)) if engine.kind == "server" else 2
        clip_lock = asyncio.Lock()
        started = time.perf_counter()

        async def process(part, bar, task):
            read = await asyncio.to_thread(_read, data.root, part)
            ok = [r for r in read if r[2] is not None]
            answers = await engine.describe([r[2] for r in ok]) if ok else []
            phrases = [parse_phrases(a.text, k) if a.error is None else [] for a in answers]
            described = [i for i, p in enumerate(phrases) if p]
            async with clip_lock:
                scp, mask = await asyncio.to_thread(encode_scp, frozen, [phrases[i] for i in described], k)
            enc = {i: j for j, i in enumerate(described)}
            for item, split, raw, info in read:
                if raw is None:
                    _fail(writer, summary, item, split, "", info)
            for i, ((item, split, _, sha), answer) in enumerate(zip(ok, answers)):
                if i not in enc:
                    _fail(writer, summary, item, split, sha, answer.error or "no usable phrase", answer.text)
                    continue
                j = enc[i]
                writer.add(path=item.path, sha256=sha, split=split, label=item.label, classname=item.classname,
                           status="ok", answer=answer.text, phrases=phrases[i], scp=scp[j].tobytes(),
                           mask=mask[j].astype("uint8").tobytes())
                summary.done += 1
            bar.advance(task, len(part))

        queue: asyncio.Queue = asyncio.Queue()
        for c in chunks:
            queue.put_nowait(c)

        async def worker(bar, task):
            while not queue.empty():
                await process(queue.get_nowait(), bar, task)

        with progress() as bar:
            task = bar.add_task(f"describe {dataset} ({engine.kind})", total=len(todo))
            try:
                await asyncio.gather(*(worker(bar, task) for _ in range(in_flight)))
            finally:
                writer.close()  # whatever finished is kept, even on Ctrl-C or an error
        summary.seconds = time.perf_counter() - started
        for line in summary.lines():
            log(line)
        return summary
    finally:
        await engine.aclose()


def _fail(writer: CacheWriter, summary: ExtractSummary, item: Item, split: str, sha: str, reason: str,
          answer: Optional[str] = None) -> None:
    writer.add(path=item.path, sha256=sha, split=split, label=item.label, classname=item.classname, status="failed",
               error=reason, answer=answer)
    summary.failed += 1
    summary.failures.append(f"{item.path}: {reason}")
