"""`mugcp extract`: describe the images the protocol reads, once per content, into the SCP cache.

1. **Select**: by default the images that training and evaluation can read for the settings asked
   for: the union of the few-shot draws' training shots (the very draws `mugcp train` makes, of
   every class, or of the base classes only with `--train-classes base`) over the seeds and shot
   counts, plus every test image; `--all-images` takes every image. The val shots are described
   only if asked for (`--splits`): no setting reads them.
2. **Hash**: each selected file's content hash is recorded in the images table; a file whose size
   and mtime are unchanged since it was last hashed is not read again.
3. **Describe**: each distinct content without a usable answer from this MLLM and prompt is sent
   to the backend (a pipeline of asyncio workers: read -> ask the MLLM, many requests in flight ->
   encode -> write), so the MLLM never waits on the client. An answer cut at `--max-tokens` ends
   mid-phrase: only what it finished is read (the image fails if nothing is), and the summary
   says how many were cut. A content already described costs nothing, whichever path, split or
   dataset shard it comes from (shards running at the same moment can each describe a content their
   paths share: they split the work by path); a file whose bytes changed is described again. For a
   local MLLM folder the answers table records the folder's content, for a Hugging Face id loaded in
   process the Hub commit (`pipeline/mllm_weights.py`): other weights under that name are refused,
   not answered for by the cache.
4. **Embed**: every usable answer without SCP for this CLIP is encoded (`pipeline/scp.py`): a
   second CLIP re-embeds the answers without a single MLLM call.

Sharding is by a stable hash of the path, so N machines get disjoint shards whose union is the
selection; a shard is written by one process at a time (an advisory lock says who holds it).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mugcp.core.coop_datasets import Item, Splits, load_dataset
from mugcp.core.defaults import DEFAULT_MLLM
from mugcp.core.errors import UserError
from mugcp.core.frozen_clip import FrozenClip, load_clip
from mugcp.core.locks import hold
from mugcp.core.progress import progress
from mugcp.core.protocol import draw_fewshot, subsample_classes
from mugcp.core.scp_cache import (
    ANSWERS_SCHEMA,
    IMAGES_SCHEMA,
    AnswersKey,
    ScpKey,
    TableWriter,
    after_every_row,
    answered,
    embedded,
    images_folder,
    known_images,
    mask_column,
    ok_answers,
    open_table,
    record_meta,
    refuse_schema_1,
    remove_if_unused,
    remove_stale_temporaries,
    scp_column,
    scp_schema,
)
from mugcp.pipeline.backends import Backend, backend_class, make_backend
from mugcp.pipeline.config import ExtractConfig
from mugcp.pipeline.mllm_weights import (
    answers_name,
    hub_revision,
    local_folder_revision,
    local_weights,
    record_spelling,
    served_weights,
    table_meta,
)
from mugcp.pipeline.prompts import Prompt, finished_part, get_prompt
from mugcp.pipeline.scp import encode_scp

REUSE_CHUNK = 50_000  # answers whose phrases a re-embedding holds in memory at once


@dataclass
class ExtractSummary:
    total: int = 0  # images selected in this shard
    contents: int = 0  # distinct contents among them
    done: int = 0  # contents described in this run
    skipped: int = 0  # contents described before this run
    changed: int = 0  # paths whose content hash changed since it was last recorded
    embedded: int = 0  # SCP rows written in this run
    failed: int = 0
    cut: int = 0  # answers the MLLM stopped at --max-tokens
    max_tokens: int = 0
    seconds: float = 0.0
    cache_path: str = ""
    failures: list[str] = field(default_factory=list)  # a few "path: reason" lines
    notes: list[str] = field(default_factory=list)  # what the backend had to tell (structured output refused)

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        out = [f"extract: {self.total} images in shard ({self.contents} distinct), {self.done} described, "
               f"{self.skipped} already cached, {self.failed} failed, {self.embedded} embedded, "
               f"{self.images_per_s:.1f} images/s, cache {self.cache_path}"]
        if self.changed:
            out.append(f"  {self.changed} image(s) hold other bytes than when last hashed: each is described unless "
                       f"its new content already was")
        if self.cut:
            out.append(f"  {self.cut} answer(s) were cut at --max-tokens {self.max_tokens}, their unfinished last "
                       f"phrase left out: raise --max-tokens")
        out += [f"  {note}" for note in self.notes]
        out += [f"  failed: {f}" for f in self.failures[:10]]
        if self.failed > 10:
            out.append(f"  ... and {self.failed - 10} more (status 'failed' rows in the cache)")
        return out


def shard_of(path: str, num_shards: int) -> int:
    """A stable shard for a path, the same on every machine and Python."""
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") % num_shards


def select_images(splits: Splits, config: ExtractConfig) -> list[tuple[Item, str]]:
    """(item, split) of what the protocol reads (or everything), first occurrence per path, in order."""
    chosen: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    protocol = not config.all_images and splits.train
    for split in config.splits:
        if split == "test" or not protocol:
            chosen[split] = getattr(splits, split)
            continue
        for shots in config.shots:
            for seed in config.seeds:
                drawn = getattr(draw_fewshot(splits, shots, seed), split)
                if split == "train" and config.train_classes == "base":  # the classes base-to-novel trains on
                    (base,) = subsample_classes(drawn, subsample="base")
                    kept = {item.path for item in base}
                    drawn = [item for item in drawn if item.path in kept]
                chosen[split] += drawn
    seen, out = set(), []
    for split in ("train", "val", "test"):
        for item in chosen[split]:
            if item.path not in seen:
                seen.add(item.path)
                out.append((item, split))
    return out


def _content_hashes(root: Path, chosen: list[tuple[Item, str]], known: dict, advance) -> tuple[dict, list, list]:
    """path -> sha256 for the chosen files, reading only those whose size or mtime changed; new index rows;
    unreadable files as (item, reason)."""
    sha, rows, unreadable = {}, [], []
    for item, split in chosen:
        advance()
        path = root / item.path
        try:
            st = os.stat(path)
            seen = known.get(item.path)
            if seen and seen[1] == st.st_size and seen[2] == st.st_mtime_ns:
                sha[item.path] = seen[0]
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            unreadable.append((item, f"cannot read: {e.strerror}"))
            continue
        sha[item.path] = digest
        rows.append({"path": item.path, "sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                     "split": split, "label": item.label, "classname": item.classname})
    return sha, rows, unreadable


def _resolve_device(device: str) -> torch.device:
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        ("cpu" if device == "auto" else device))


def run_extract(dataset: str, root: Path, config: ExtractConfig, log=print) -> ExtractSummary:
    """Describe and embed what `dataset`'s selection lacks; return counts (the CLI exits 1 on failures)."""
    backend_class(config.backend.kind)  # an unknown backend is refused before the images are scanned
    local_folder_revision(config.backend.mllm, config.backend.revision)  # before a folder is hashed
    refuse_schema_1(config.cache_dir, dataset)  # before its images are described again
    data = load_dataset(dataset, root)
    for note in data.notes:
        log(note)
    chosen = [(it, s) for it, s in select_images(data, config) if shard_of(it.path, config.num_shards) ==
              config.shard_index]
    everything = len({it.path for s in config.splits for it in getattr(data, s)})
    what = "every image" if config.all_images or not data.train else (
        f"the protocol's images (shots {','.join(map(str, config.shots))} of {config.train_classes} classes, seeds "
        f"{','.join(map(str, config.seeds))}, every test image; --all-images for all)")
    log(f"extract {dataset}: {len(chosen)} of {everything} images in this shard: {what}")
    frozen = load_clip(config.clip, config.pretrained, _resolve_device(config.backend.device))
    return asyncio.run(_extract(data, chosen, frozen, dataset, config, get_prompt(config.prompt), log))


IN_PROCESS = ("vllm", "hf", "ray")  # engines that load --mllm here; any other backend serves a model of its own


class _Engine:
    """The MLLM backend, built and started on first use only (a re-embedding run never loads a model)."""

    def __init__(self, config: ExtractConfig, prompt: Prompt):
        self.config, self.prompt, self.backend = config, prompt, None

    async def get(self) -> Backend:
        if self.backend is None:
            backend = make_backend(self.config.backend, self.prompt, self.config.k)
            await backend.start()  # a server is checked here, before anything is written
            self.backend = backend
        return self.backend

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.aclose()


async def _extract(data: Splits, chosen, frozen: FrozenClip, dataset: str, config: ExtractConfig, prompt: Prompt,
                   log) -> ExtractSummary:
    engine = _Engine(config, prompt)
    try:
        # the in-process engines load --mllm, by default DEFAULT_MLLM; a server, or any other backend, names the
        # model it answers for once started (its `model_id`, the provenance of every answer it gives)
        mllm = config.backend.mllm or (DEFAULT_MLLM if config.backend.kind in IN_PROCESS else None)
        if mllm is None:
            mllm = (await engine.get()).model_id
            if not mllm:
                raise UserError(f"--backend {config.backend.kind} names no model it answers for (its model_id): "
                                f"give --mllm")
        name = answers_name(mllm, Path(config.cache_dir))
        answers_key = AnswersKey(dataset, name, prompt.version, config.k)
        scp_key = ScpKey(answers_key, frozen.model_id, frozen.embed_dim)
        shard = f"{config.shard_index}of{config.num_shards}"
        lock = Path(config.cache_dir) / dataset / f".lock-{answers_key.name}-{shard}"
        with hold(lock, f"the cache shard {shard} of {dataset}"):
            try:
                return await _fill(data, chosen, frozen, config, prompt, engine, answers_key, scp_key, shard, log)
            finally:
                answers = answers_key.folder(config.cache_dir)
                if not (answers / "meta.json").is_file():
                    # refused or failed before anything was written (an MLLM that does not load, a server that is
                    # down): no table or lock file named after an MLLM the cache never held is left behind
                    remove_if_unused(scp_key.folder(config.cache_dir))
                    remove_if_unused(answers)
                    lock.unlink(missing_ok=True)
                    for empty in (answers.parent, scp_key.folder(config.cache_dir).parent, lock.parent):
                        try:  # the dataset's folder too, if this run made it and nothing else is in it
                            empty.rmdir()
                        except OSError:
                            pass
    finally:
        await engine.close()


async def _fill(data, chosen, frozen, config, prompt, engine, answers_key, scp_key, shard, log) -> ExtractSummary:
    """Read what the cache holds, start the MLLM only if something needs describing, then write."""
    cache, k, dataset = Path(config.cache_dir), config.k, data.spec.name
    summary = ExtractSummary(total=len(chosen), cache_path=str(scp_key.folder(cache)),
                             max_tokens=config.backend.max_tokens)
    started = time.perf_counter()
    known = known_images(cache, dataset)
    with progress() as bar:
        task = bar.add_task(f"hash {dataset}", total=len(chosen))
        sha, index_rows, unreadable = await asyncio.to_thread(_content_hashes, data.root, chosen, known,
                                                              lambda: bar.advance(task))
    summary.changed = sum(1 for r in index_rows if r["path"] in known and known[r["path"]][0] != r["sha256"])
    for item, reason in unreadable:
        summary.failed += 1
        summary.failures.append(f"{item.path}: {reason}")
    first_path: dict[str, str] = {}
    for item, _ in chosen:
        if item.path in sha:
            first_path.setdefault(sha[item.path], item.path)
    summary.contents = len(first_path)
    done = answered(answers_key.folder(cache))
    have_scp = embedded(scp_key.folder(cache))
    todo = [s for s in first_path if s not in done]
    reuse = [s for s in first_path if s in done and s not in have_scp]
    summary.skipped = summary.contents - len(todo)

    # which weights answer: checked only where the MLLM is asked (re-embedding answers asks none)
    answers_folder, served = answers_key.folder(cache), config.backend.kind not in IN_PROCESS
    given = config.backend.mllm or answers_key.mllm  # what this machine loads (the key may name another's path)
    weights, weight_files = await asyncio.to_thread(local_weights, given, answers_folder) if todo else ({}, {})
    if todo and served and not weights:
        served_weights(given, answers_folder)
    limit = table_meta(answers_folder).get("max_tokens") if todo else None
    if limit not in (None, config.backend.max_tokens):  # answers cut at another length would mix unrecorded
        raise UserError(f"the answers cached in {answers_folder} were given with --max-tokens {limit}: describe "
                        f"with the same limit, or use another --cache-dir")

    def hub() -> tuple[dict, Optional[str]]:  # a server chose its weights: only an in-process load reads the Hub's
        return ({}, None) if served or not todo else hub_revision(given, config.backend.revision, answers_folder)

    revision, commit = hub()  # refused before a model is loaded
    if commit is not None:  # every engine loads exactly this commit, wherever it runs
        engine.config = config.model_copy(update={"backend": config.backend.model_copy(update={"revision": commit})})
    backend = await engine.get() if todo else None  # started (and checked) before anything is written
    if backend is not None and commit is None:
        revision, _ = hub()  # the load fetched what the Hub and the cache did not know before

    images_dir = open_table(images_folder(cache, dataset), {"table": "images", "dataset": dataset})
    # checked now, recorded with the first rows: an engine that fails once the run is under way (a Ray actor
    # loading a bad --mllm) leaves no table recording weights that never answered
    answers_meta = ({"table": "answers", "dataset": dataset, "mllm": answers_key.mllm, "k": k,
                     "prompt_version": prompt.version, **weights, **revision},
                    {"prompt": prompt.name, "question": prompt.question(k), "backend": config.backend.kind,
                     "max_tokens": config.backend.max_tokens, **weight_files})
    scp_meta = ({"table": "scp", "dataset": dataset, "mllm": answers_key.mllm, "prompt_version": prompt.version,
                 "k": k, "clip_model": scp_key.clip_model, "dim": scp_key.dim}, {"prompt": prompt.name})
    answers_dir = open_table(answers_key.folder(cache), *answers_meta, record=False)
    scp_dir = open_table(scp_key.folder(cache), *scp_meta, record=False)
    # the images table is shared by the extracts of every MLLM, prompt and k, each locked on its own answers key:
    # its parts carry that key too, so that one extract never removes another's temporary part
    index_writer = f"{shard}-{hashlib.sha256(answers_key.name.encode()).hexdigest()[:8]}"
    legacy = f"{shard}-{'[0-9]' * 6}"  # the images table's parts of earlier versions: named by the shard alone
    for folder, writer in ((images_dir, index_writer), (images_dir, legacy), (answers_dir, shard), (scp_dir, shard)):
        remove_stale_temporaries(folder, writer)
    if index_rows:  # a path's new content supersedes what it held, whatever this machine's clock says
        TableWriter(images_dir, IMAGES_SCHEMA, index_writer, flush_rows=len(index_rows)).add_columns(
            {f.name: [r[f.name] for r in index_rows] for f in IMAGES_SCHEMA if f.name != "created"},
            created=after_every_row(images_dir, IMAGES_SCHEMA))
    answers = TableWriter(answers_dir, ANSWERS_SCHEMA, shard, flush_rows=config.flush_every,
                          before_flush=lambda: record_meta(answers_dir, *answers_meta, agree=("max_tokens",)))

    def before_scp() -> None:  # an SCP row is never on disk before its answer
        answers.flush()
        record_meta(scp_dir, *scp_meta)

    scps = TableWriter(scp_dir, scp_schema(k, frozen.embed_dim), shard, flush_rows=config.flush_every,
                       before_flush=before_scp)
    clip_lock = asyncio.Lock()

    async def embed(shas: list[str], phrase_lists: list[list[str]]) -> None:
        async with clip_lock:
            scp, mask = await asyncio.to_thread(encode_scp, frozen, phrase_lists, k)
        scps.add_columns({"sha256": shas, "scp": scp_column(scp), "mask": mask_column(mask),
                          "mllm": [answers_key.mllm] * len(shas), "prompt_version": [prompt.version] * len(shas),
                          "clip_model": [scp_key.clip_model] * len(shas)})
        summary.embedded += len(shas)

    try:
        if reuse:
            log(f"embedding {len(reuse)} answer(s) already given by {answers_key.mllm} ({prompt.version}) with CLIP "
                f"{scp_key.clip_model}: no MLLM call for them")
            batch = max(1, config.backend.batch_size)
            with progress() as bar:
                task = bar.add_task(f"embed {dataset}", total=len(reuse))
                for start in range(0, len(reuse), REUSE_CHUNK):  # phrases read a chunk at a time: bounded memory
                    chunk = reuse[start:start + REUSE_CHUNK]
                    phrases = await asyncio.to_thread(ok_answers, answers_dir, chunk)
                    for i in range(0, len(chunk), batch):
                        part = chunk[i:i + batch]
                        await embed(part, [phrases[s] for s in part])
                        bar.advance(task, len(part))
        if todo:
            await _describe(data.root, todo, first_path, backend, prompt, k, answers, embed, answers_key, summary,
                            config, dataset)
    finally:
        answers.close()  # whatever finished is kept, even on Ctrl-C or an error
        scps.close()
        record_spelling(given, answers_dir)  # stage two given this spelling finds the table, with or without it
    summary.seconds = time.perf_counter() - started
    for line in summary.lines():
        log(line)
    return summary


async def _describe(root, todo, first_path, engine, prompt, k, answers, embed, answers_key, summary, config,
                    dataset) -> None:
    """Ask the MLLM about every content in `todo`; write each batch of answers (and its SCP) as it comes."""
    with progress() as bar:
        task = bar.add_task(f"describe {dataset} ({engine.kind})", total=len(todo))
        async for batch in engine.stream([(sha, root / first_path[sha]) for sha in todo]):
            good, good_phrases = [], []
            for sha, reply in batch:
                cut = reply.error is None and reply.cut  # it stops mid-phrase: only what it finished is read
                phrases = prompt.parse(finished_part(reply.text) if cut else reply.text, k) if reply.error is None else []
                summary.cut += cut
                if phrases:
                    answers.add(sha256=sha, status="ok", error=None, answer=reply.text, phrases=phrases,
                                mllm=answers_key.mllm, prompt_version=prompt.version)
                    good.append(sha)
                    good_phrases.append(phrases)
                    summary.done += 1
                else:
                    reason = reply.error or "no usable phrase"
                    if cut:
                        reason = (f"the answer was cut at --max-tokens {config.backend.max_tokens} before a phrase "
                                  f"was finished: raise --max-tokens")
                    answers.add(sha256=sha, status="failed", error=reason, answer=reply.text, phrases=[],
                                mllm=answers_key.mllm, prompt_version=prompt.version)
                    summary.failed += 1
                    summary.failures.append(f"{first_path[sha]}: {reason}")
            if good:
                await embed(good, good_phrases)
            bar.advance(task, len(batch))
    summary.notes += getattr(engine, "notes", [])
