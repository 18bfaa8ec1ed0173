"""Stage one's run and the cache contract: what is selected, described once per content, embedded per
CLIP, read back in order; reruns, changed files, shards, kill -9, locks, schema migration."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import answers_by_path, assert_one_line, cli, extract_config, table_rows
from mugcp.core.coop_datasets import load_dataset
from mugcp.core.errors import UserError
from mugcp.core.locks import hold
from mugcp.core.protocol import draw_fewshot
from mugcp.core.scp_cache import SCHEMA_VERSION, find_scp, read_scp
from mugcp.pipeline import mllm_weights
from mugcp.pipeline.extract import run_extract, shard_of
from mugcp.world.stand_in_server import FakeServer
from mugcp.world.synth import write_synthetic_dtd
from mugcp.world.tiny_clip import write_tiny_clip


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Synthetic DTD with 4 images per class: 188 images (94 train, 47 val, 47 test)."""
    root = tmp_path_factory.mktemp("small")
    write_synthetic_dtd(root, per_class=4, size=48)
    return root


@pytest.fixture(scope="module")
def roomy_root(tmp_path_factory):
    """Synthetic DTD with 10 images per class (5 train, 2 val, 3 test): room for a selection to matter."""
    root = tmp_path_factory.mktemp("roomy")
    write_synthetic_dtd(root, per_class=10, size=32)
    return root


def extract(root, cache, tiny_clip, **options):
    """`run_extract` on the synthetic DTD with the tiny CLIP; `options` are ExtractConfig/BackendConfig fields."""
    options.setdefault("all_images", True)
    options.setdefault("splits", ("train", "val", "test"))  # every image of the dataset
    return run_extract("dtd", root, extract_config(tiny_clip, cache, **options), log=lambda _: 0)


# -- the three tables --------------------------------------------------------------------------------

def test_extract_writes_three_tables_and_skips_on_rerun(small_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        first = extract(small_root, cache, tiny_clip, server_urls=[s.url])
        assert (first.total, first.done, first.failed, first.embedded) == (188, 188, 0, 188)
        again = extract(small_root, cache, tiny_clip, server_urls=[s.url])
        assert (again.done, again.skipped, again.embedded) == (0, 188, 0) and s.requests == 188
    images, answers, scp = (table_rows(cache, "dtd", t) for t in ("images", "answers", "scp"))
    assert len(images) == len({r["path"] for r in images}) == 188
    assert len(answers) == len(scp) == 188
    a = answers[0]
    assert a["mllm"] == "fake-mllm" and a["prompt_version"] == "scp-v1" and a["status"] == "ok" and a["phrases"]
    assert scp[0]["clip_model"].startswith("mugcp-tiny") and np.asarray(scp[0]["scp"]).shape == (8, 64)
    assert {r["split"] for r in images} == {"train", "val", "test"}
    meta = json.loads(next((cache / "dtd" / "answers").glob("*/meta.json")).read_text())
    assert meta["schema_version"] == 2 and meta["question"].startswith("Describe the visual facts")
    assert "mllm_weights" not in meta and "mllm_files" not in meta  # a served model's name is all there is


def test_a_server_url_in_the_openai_clients_form_is_the_same_server(small_root, tiny_clip, tmp_path):
    """`http://host:8000/v1` (how OpenAI clients and vLLM's docs write the base URL) reaches the server."""
    with FakeServer() as s:
        summary = extract(small_root, tmp_path / "cache", tiny_clip, server_urls=[s.url + "/v1/"], splits=("val",))
        assert (summary.done, summary.failed, s.requests) == (47, 0, 47)


def test_answers_are_not_mixed_with_answers_cut_at_another_length(small_root, tiny_clip, tmp_path):
    """The answers table records --max-tokens; describing more into it with another limit is refused on one line."""
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("val",), max_tokens=64)
        assert json.loads(answers_meta(cache).read_text())["max_tokens"] == 64
        with pytest.raises(UserError, match="were given with --max-tokens 64: describe with the same limit"):
            extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("val", "test"))
        assert extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("val",)).skipped == 47  # no ask
        assert extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("test",), max_tokens=64).done == 47


def test_polars_reads_scp_as_arrays(small_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("val",))
    parts = next((cache / "dtd" / "scp").glob("*/parts"))
    df = pl.read_parquet(parts)  # the parts folder opens directly: meta.json lives beside it, not in it
    assert df.schema["scp"] == pl.Array(pl.Float16, shape=(8, 64)) and df.schema["mask"] == pl.Array(pl.Boolean, 8)
    scp = df["scp"].to_numpy()
    assert scp.shape == (47, 8, 64)
    valid = df["mask"].to_numpy()
    norms = np.linalg.norm(scp.astype(np.float32), axis=-1)
    assert np.allclose(norms[valid], 1, atol=1e-2) and not norms[~valid].any()
    assert pq.ParquetDataset(parts).read().num_rows == 47


def test_a_second_clip_reuses_every_answer(small_root, tiny_clip, tmp_path, monkeypatch):
    """Re-embedding with another CLIP makes no MLLM call: with --mllm named, not even a server is needed. The
    answers' phrases are read a chunk at a time (here 10), each image's SCP from its own answer."""
    from mugcp.pipeline import extract as stage_one

    monkeypatch.setattr(stage_one, "REUSE_CHUNK", 10)
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("test",))
        described = s.requests
    other = write_tiny_clip(tmp_path / "other-clip", seed=1)
    lines = []
    config = extract_config(other, cache, server_urls=["http://127.0.0.1:9"], mllm="fake-mllm", splits=("test",),
                            all_images=True)
    summary = run_extract("dtd", small_root, config, log=lines.append)
    assert described == 47 and (summary.done, summary.skipped, summary.embedded) == (0, 47, 47)
    assert any("no MLLM call" in line for line in lines)
    clips = {r["clip_model"] for r in table_rows(cache, "dtd", "scp")}
    assert len(clips) == 2 and len(table_rows(cache, "dtd", "answers")) == 47
    paths = [i.path for i in load_dataset("dtd", small_root).test]
    again = cache.parent / "again"  # the second CLIP describing from scratch gives the same SCP
    with FakeServer() as s:
        run_extract("dtd", small_root, extract_config(other, again, server_urls=[s.url], splits=("test",),
                                                     all_images=True), log=lambda _: 0)
    clip_id = {r["clip_model"] for r in table_rows(again, "dtd", "scp")}.pop()
    assert np.array_equal(read_scp(cache, "dtd", clip_id, paths).scp, read_scp(again, "dtd", clip_id, paths).scp)


def test_same_content_is_described_once(tiny_clip, tmp_path):
    root = tmp_path / "data"
    write_synthetic_dtd(root, per_class=4, size=32)
    split_path = root / "dtd" / "split_zhou_DescribableTextures.json"
    split = json.loads(split_path.read_text())
    twin = root / "dtd" / "images" / split["test"][0][0].replace(".jpg", "_copy.jpg")
    twin.write_bytes((root / "dtd" / "images" / split["test"][0][0]).read_bytes())
    split["test"].append([twin.relative_to(root / "dtd" / "images").as_posix(), *split["test"][0][1:]])
    split_path.write_text(json.dumps(split))
    with FakeServer() as s:
        summary = extract(root, tmp_path / "cache", tiny_clip, server_urls=[s.url], splits=("test",))
        assert s.requests == 47 and (summary.total, summary.contents) == (48, 47)
    rows = answers_by_path(tmp_path / "cache")
    assert rows["images/" + split["test"][0][0]]["sha256"] == rows["images/" + split["test"][-1][0]]["sha256"]


def test_the_stand_in_server_can_answer_from_the_image_bytes(small_root, tiny_clip, tmp_path):
    """`FakeServer(answer=...)` (the oracle of bench/world_oracle_scp.py) gets each image's file bytes."""
    def answer(image: bytes) -> str:
        return json.dumps([f"digest {hashlib.sha256(image).hexdigest()[:8]}"])

    with FakeServer(answer=answer) as s:
        extract(small_root, tmp_path / "cache", tiny_clip, server_urls=[s.url], splits=("test",))
    rows = answers_by_path(tmp_path / "cache")
    assert len(rows) == 47
    for path, row in rows.items():
        digest = hashlib.sha256((small_root / "dtd" / path).read_bytes()).hexdigest()[:8]
        assert list(row["phrases"]) == [f"digest {digest}"], path


def test_a_changed_image_is_described_again(tiny_clip, tmp_path):
    root = tmp_path / "data"
    write_synthetic_dtd(root, per_class=4, size=32)
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(root, cache, tiny_clip, server_urls=[s.url], splits=("test",))
        path = sorted(i.path for i in load_dataset("dtd", root).test)[0]
        victim = root / "dtd" / path
        before = answers_by_path(cache)[path]["sha256"]
        victim.write_bytes(victim.read_bytes() + b"\0")  # new bytes, still a JPEG
        lines = []
        summary = run_extract("dtd", root, extract_config(tiny_clip, cache, server_urls=[s.url], splits=("test",),
                                                          all_images=True), log=lines.append)
    assert (summary.changed, summary.done) == (1, 1)
    assert any("1 image(s) hold other bytes than when last hashed" in line for line in lines)
    after = answers_by_path(cache)[path]
    assert after["sha256"] != before and after["sha256"] == hashlib.sha256(victim.read_bytes()).hexdigest()


def test_a_file_changed_while_it_is_described_gets_no_answer_under_its_old_hash(tiny_clip, tmp_path, monkeypatch):
    """Hashing comes first, describing later: a file whose bytes change in between is recorded as failed, not
    answered under the hash of bytes the MLLM never saw; the next run describes its new bytes."""
    from mugcp.pipeline import extract as stage_one

    root, cache = tmp_path / "data", tmp_path / "cache"
    write_synthetic_dtd(root, per_class=4, size=32)
    paths = sorted(i.path for i in load_dataset("dtd", root).test)
    victim, other = root / "dtd" / paths[0], root / "dtd" / paths[-1]
    hashed = stage_one._content_hashes

    def then_changed(*args):
        out = hashed(*args)
        victim.write_bytes(other.read_bytes())  # another image's bytes, after its hash was taken
        return out

    monkeypatch.setattr(stage_one, "_content_hashes", then_changed)
    with FakeServer(answer=lambda image: json.dumps([f"digest {hashlib.sha256(image).hexdigest()[:8]}"])) as s:
        summary = extract(root, cache, tiny_clip, server_urls=[s.url], splits=("test",))
        assert summary.failed == 1 and "changed while this extract ran" in summary.failures[0]
        assert paths[0] not in answers_by_path(cache) or answers_by_path(cache)[paths[0]]["status"] == "failed"
        monkeypatch.setattr(stage_one, "_content_hashes", hashed)
        again = extract(root, cache, tiny_clip, server_urls=[s.url], splits=("test",))
    digest = hashlib.sha256(victim.read_bytes()).hexdigest()
    assert (again.changed, again.failed) == (1, 0)
    row = answers_by_path(cache)[paths[0]]
    assert row["sha256"] == digest and list(row["phrases"]) == [f"digest {digest[:8]}"]


def test_no_scp_row_is_written_before_its_answer(small_root, tiny_clip, tmp_path, monkeypatch):
    """At every part written, each SCP row on disk has its answer on disk: a kill at any moment never leaves SCP
    whose answer the next run would ask the MLLM for again (and embed twice)."""
    from mugcp.core import scp_cache

    cache, seen = tmp_path / "cache", []
    flush = scp_cache.TableWriter.flush

    def on_disk(table):
        return {r["sha256"] for r in table_rows(cache, "dtd", table)}

    def watched(self):
        flush(self)
        if self.folder.parent.name == "scp":
            seen.append(on_disk("scp") - on_disk("answers"))

    monkeypatch.setattr(scp_cache.TableWriter, "flush", watched)
    with FakeServer() as s:  # answers flush a row at a time, SCP a batch at a time: 8 answers, then their SCP
        extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("test",), flush_every=5, batch_size=8)
    assert len(seen) >= 5 and all(not ahead for ahead in seen), seen


def test_a_machine_whose_clock_is_behind_still_records_a_changed_image(tiny_clip, tmp_path, monkeypatch):
    """"Latest row wins" by `created`: a path re-hashed on a machine 10 minutes behind supersedes the row another
    machine wrote before, and stage two reads the new content's SCP."""
    from datetime import timedelta

    from mugcp.core import scp_cache

    root, cache = tmp_path / "data", tmp_path / "cache"
    write_synthetic_dtd(root, per_class=4, size=32)
    with FakeServer() as s:
        extract(root, cache, tiny_clip, server_urls=[s.url], splits=("test",))
        path = sorted(i.path for i in load_dataset("dtd", root).test)[0]
        victim = root / "dtd" / path
        victim.write_bytes(victim.read_bytes() + b"\0")
        real_now = scp_cache.now
        monkeypatch.setattr(scp_cache, "now", lambda: real_now() - timedelta(minutes=10))
        assert extract(root, cache, tiny_clip, server_urls=[s.url], splits=("test",)).changed == 1
        assert extract(root, cache, tiny_clip, server_urls=[s.url], splits=("test",)).changed == 0  # recorded
    assert answers_by_path(cache)[path]["sha256"] == hashlib.sha256(victim.read_bytes()).hexdigest()


# -- a local MLLM folder: its content is part of the answers' key -----------------------------------

def local_mllm(tiny_mllm_dir, tmp_path) -> Path:
    """A copy of the tiny MLLM's folder, free to change (the session's own is shared)."""
    return Path(shutil.copytree(tiny_mllm_dir, tmp_path / "mllm"))


def answers_meta(cache) -> Path:
    return next((cache / "dtd" / "answers").glob("*/meta.json"))


def tables(cache) -> dict:
    """Every file of the three tables, by path, with its bytes."""
    return {p: p.read_bytes() for t in ("images", "answers", "scp") for p in sorted((cache / "dtd" / t).rglob("*"))
            if p.is_file()}


def test_other_weights_in_the_same_mllm_folder_are_refused(small_root, tiny_clip, tiny_mllm_dir, tmp_path):
    mllm, cache = local_mllm(tiny_mllm_dir, tmp_path), tmp_path / "cache"
    with FakeServer(model=str(mllm)) as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], mllm=str(mllm), splits=("val",))
        weights = mllm / "model.safetensors"
        changed = bytearray(weights.read_bytes())
        changed[-1] ^= 1  # one byte, same size
        weights.write_bytes(bytes(changed))
        (mllm / "README.md").write_text("a model card changes no answer")
        before = tables(cache)

        def again(splits):
            return cli("extract", "--dataset", "dtd", "--root", small_root, "--server-url", s.url, "--mllm", mllm,
                       "--all-images", "--splits", splits, "--cache-dir", cache, "--clip", tiny_clip[0],
                       "--pretrained", tiny_clip[1])

        r = again("val,test")  # new images to describe: the weights are checked
        assert s.requests == 47
        folder = answers_meta(cache).parent
        assert_one_line(r, f"the MLLM at {mllm} has other weights", f"cached in {folder} (model.safetensors differ):",
                        "--cache-dir")
        assert "holds something else" not in r.stderr and tables(cache) == before
        assert again("val").returncode == 0 and s.requests == 47  # nothing to describe: no MLLM asked, no check


def meta_clip(cache) -> str:
    return json.loads(next((cache / "dtd" / "scp").glob("*/meta.json")).read_text())["clip_model"]


def test_a_local_mllm_is_one_table_however_its_folder_is_named(small_root, tiny_clip, tiny_mllm_dir, tmp_path,
                                                                  monkeypatch):
    """Shards given the folder by a relative and by an absolute path, a copy at another mount and another
    dataset's extract all use one name (the absolute path, found by spelling or by content); stage two finds the
    table by any absolute spelling an extract used, from anywhere, with or without the folder; a relative one
    names whatever folder it reaches from where it is given, so other weights reached by the same relative
    spelling get their own table."""
    from mugcp.world.imagenet_layouts import write_synthetic_imagenet

    monkeypatch.chdir(tmp_path)
    mllm, cache = local_mllm(tiny_mllm_dir, tmp_path), tmp_path / "cache"
    for given, shard in (("mllm", 0), (str(mllm), 1)):
        with FakeServer(model=given) as s:
            extract(small_root, cache, tiny_clip, server_urls=[s.url], mllm=given, splits=("val",), num_shards=2,
                    shard_index=shard)
            assert s.requests > 0
    (meta,) = [json.loads(p.read_text()) for p in (cache / "dtd" / "answers").glob("*/meta.json")]
    assert meta["mllm"] == str(mllm.resolve()) and len(table_rows(cache, "dtd", "answers")) == 47
    mount = Path(shutil.copytree(mllm, tmp_path / "mount" / "mllm", copy_function=shutil.copy))  # new mtimes
    with FakeServer(model=str(mount)) as s:
        summary = extract(small_root, cache, tiny_clip, server_urls=[s.url], mllm=str(mount), splits=("val", "test"))
        assert (summary.skipped, summary.done, s.requests) == (47, 47, 47)
    assert len(list((cache / "dtd" / "answers").glob("*/meta.json"))) == 1
    read, real = [], mllm_weights.file_sha256
    monkeypatch.setattr(mllm_weights, "file_sha256", lambda path: read.append(path) or real(path))
    write_synthetic_imagenet(tmp_path / "inet", classes=4, train=2, test=2, size=32)
    with FakeServer(model=str(mount)) as s:  # known by this spelling now: found without reading the folder
        assert extract(small_root, cache, tiny_clip, server_urls=[s.url], mllm=str(mount), splits=("val",)).done == 0
        run_extract("imagenet", tmp_path / "inet", extract_config(tiny_clip, cache, server_urls=[s.url],
                                                                  mllm=str(mount), all_images=True), log=lambda _: 0)
    assert json.loads(next((cache / "imagenet" / "answers").glob("*/meta.json")).read_text())["mllm"] == meta["mllm"]
    clip = meta_clip(cache)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a training machine: another working directory, no model folder
    shutil.rmtree(mount)
    for spelling in (str(mllm), str(mount)):
        assert find_scp(cache, "dtd", clip, mllm=spelling)[1]["mllm"] == meta["mllm"], spelling
    for spelling in ("mllm", "/some/other/mllm"):
        with pytest.raises(UserError, match=f"no cache for dtd from MLLM {spelling}"):
            find_scp(cache, "dtd", clip, mllm=spelling)
    other = Path(shutil.copytree(mllm, tmp_path / "finetuned" / "mllm"))
    weights = other / "model.safetensors"
    changed = bytearray(weights.read_bytes())
    changed[-1] ^= 1
    weights.write_bytes(bytes(changed))
    monkeypatch.chdir(tmp_path / "finetuned")  # "mllm" from here is the fine-tuned folder
    with FakeServer(model="mllm") as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], mllm="mllm", splits=("val",))
        assert s.requests == 47  # other weights: described again, into a table of their own
    assert sorted(json.loads(p.read_text())["mllm"] for p in (cache / "dtd" / "answers").glob("*/meta.json")) == \
        sorted([str(mllm.resolve()), str(other.resolve())])
    assert all("finetuned" in str(Path(p).resolve()) for p in read)  # the known copy was never read again
    from mugcp.core.scp_cache import cache_contents

    shutil.move(mllm, tmp_path / "away")  # the model's folder gone from this machine: its tables are still found
    assert not any("not here" in line for line in cache_contents(cache, "dtd"))
    assert find_scp(cache, "dtd", clip, mllm=str(mllm))[1]["mllm"] == meta["mllm"]


def test_unchanged_mllm_files_are_not_read_again(small_root, tiny_clip, tiny_mllm_dir, tmp_path, monkeypatch):
    """Size and mtime as this machine recorded them: the recorded hash is reused; a new mtime alone reads that file
    once (same weights, the new mtime recorded). Hidden files and prose are not the weights."""
    import socket

    read, real = [], mllm_weights.file_sha256
    monkeypatch.setattr(mllm_weights, "file_sha256", lambda path: read.append(Path(path).name) or real(path))
    mllm, cache = local_mllm(tiny_mllm_dir, tmp_path), tmp_path / "cache"
    (mllm / ".cache").mkdir()
    (mllm / ".cache" / "note").write_text("a download's bookkeeping")
    files = sorted(p.name for p in mllm.iterdir() if p.is_file())
    (mllm / "LICENSE").write_text("terms")

    def describe(*splits):
        summary = extract(small_root, cache, tiny_clip, server_urls=[s.url], mllm=str(mllm), splits=splits)
        assert summary.done > 0  # new images each time: the MLLM is asked, so its weights are checked
        return json.loads(answers_meta(cache).read_text())

    host = socket.gethostname()
    with FakeServer(model=str(mllm)) as s:
        meta = describe("val")
        assert sorted(read) == sorted(meta["mllm_files"][host]) == files and len(meta["mllm_weights"]) == 16
        read.clear()
        (mllm / ".cache" / "note").write_text("hidden: not the weights")
        describe("val", "test")
        assert read == []
        st = os.stat(mllm / "config.json")
        os.utime(mllm / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        again = describe("val", "test", "train")
        assert read == ["config.json"] and again["mllm_weights"] == meta["mllm_weights"]
        assert again["mllm_files"][host]["config.json"][1] == st.st_mtime_ns + 10**9  # the next run reads nothing


def test_an_answers_table_made_before_weights_were_recorded_is_kept(small_root, tiny_clip, tiny_mllm_dir, tmp_path):
    mllm, cache = local_mllm(tiny_mllm_dir, tmp_path), tmp_path / "cache"
    with FakeServer(model=str(mllm)) as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], mllm=str(mllm), splits=("val",))
        path = answers_meta(cache)
        meta = json.loads(path.read_text())
        del meta["mllm_weights"], meta["mllm_files"]
        path.write_text(json.dumps(meta))
        (mllm / "config.json").write_text((mllm / "config.json").read_text() + " ")  # nothing to compare it with
        again = extract(small_root, cache, tiny_clip, server_urls=[s.url], mllm=str(mllm), splits=("val", "test"))
    assert again.done > 0 and again.skipped == 47 and json.loads(path.read_text()) == meta


# -- a Hugging Face id loaded in process: the Hub commit is part of the answers' key -----------------

COMMIT_A, COMMIT_B = hashlib.sha1(b"A").hexdigest(), hashlib.sha1(b"B").hexdigest()


@pytest.fixture
def hub_cache(tiny_mllm_dir, tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache holding `org/tiny` (the tiny MLLM, its config tagged A or B) at two commits, main at A,
    read offline."""
    import huggingface_hub.constants

    hub = tmp_path / "hf-hub"
    repo = hub / "models--org--tiny"
    for commit, tag in ((COMMIT_A, "A"), (COMMIT_B, "B")):
        snapshot = Path(shutil.copytree(tiny_mllm_dir, repo / "snapshots" / commit))
        config = json.loads((snapshot / "config.json").read_text())
        (snapshot / "config.json").write_text(json.dumps({**config, "snapshot": tag}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_A)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return repo


@pytest.fixture
def loaded(monkeypatch) -> list[str]:
    """The tag (A or B) of each snapshot the hf backend loads, in order."""
    from mugcp.pipeline.backends.hf import HfBackend

    tags, real = [], HfBackend.__init__

    def init(self, *args, **kw):
        real(self, *args, **kw)
        tags.append(self.model.config.snapshot)

    monkeypatch.setattr(HfBackend, "__init__", init)
    return tags


def hub_args(root, cache, tiny_clip, shard, *extra):
    """`mugcp extract` of one eighth of the test images with the hf backend and `org/tiny` (a few images: cheap)."""
    return ["extract", "--dataset", "dtd", "--root", root, "--cache-dir", cache, "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--backend", "hf", "--mllm", "org/tiny", "--device", "cpu", "--splits", "test",
            "--all-images", "--num-shards", "8", "--shard-index", shard, "--max-tokens", "8", *extra]


def described(r, cache, shards: int) -> None:
    """The run finished (answers that the tiny MLLM got wrong are failed rows, exit 1) and `shards` shards are in."""
    assert r.returncode in (0, 1), r.stderr
    assert len({p.name.split("-")[1] for p in (cache / "dtd" / "answers").rglob("part-*.parquet")}) == shards


def test_a_hub_id_records_its_commit_and_refuses_a_moved_main(small_root, tiny_clip, hub_cache, loaded, tmp_path):
    cache = tmp_path / "cache"
    described(cli(*hub_args(small_root, cache, tiny_clip, 0)), cache, 1)
    meta = json.loads(answers_meta(cache).read_text())
    assert loaded == ["A"] and meta["mllm_revision"] == COMMIT_A and "mllm_weights" not in meta
    (hub_cache / "refs" / "main").write_text(COMMIT_B)  # the Hub's main moved, and was downloaded
    before = tables(cache)
    r = cli(*hub_args(small_root, cache, tiny_clip, 1))
    assert_one_line(r, f"org/tiny now resolves to revision {COMMIT_B}", f"cached in {answers_meta(cache).parent}",
                    f"came from {COMMIT_A}", f"--revision {COMMIT_A}", "--cache-dir")
    assert_one_line(cli(*hub_args(small_root, cache, tiny_clip, 1, "--revision", "main")), "at --revision main")
    assert tables(cache) == before and loaded == ["A"]  # refused before a model was loaded, nothing written
    described(cli(*hub_args(small_root, cache, tiny_clip, 1, "--revision", COMMIT_A)), cache, 2)
    assert loaded == ["A", "A"] and json.loads(answers_meta(cache).read_text()) == meta


def test_every_engine_loads_the_commit_resolved_before_it(small_root, tiny_clip, hub_cache, loaded, tmp_path,
                                                          monkeypatch):
    """The Hub's main is resolved once, before a model loads (the Hub's answer, else the local cache's), and the
    engines load that very commit: a first run online records the Hub's main, not the stale cache's, and a main
    that moves while the model loads changes nothing."""
    from mugcp.pipeline.backends.hf import HfBackend

    monkeypatch.setattr(mllm_weights, "online_commit", lambda mllm, revision=None: COMMIT_B)  # the Hub moved on
    cache = tmp_path / "cache"
    described(cli(*hub_args(small_root, cache, tiny_clip, 0)), cache, 1)
    assert loaded == ["B"] and json.loads(answers_meta(cache).read_text())["mllm_revision"] == COMMIT_B
    monkeypatch.setattr(mllm_weights, "online_commit", lambda mllm, revision=None: None)  # offline: the cache's A
    before = tables(cache)
    assert_one_line(cli(*hub_args(small_root, cache, tiny_clip, 1)), f"now resolves to revision {COMMIT_A}")
    assert tables(cache) == before and loaded == ["B"]  # refused before a model loaded
    real = HfBackend.__init__

    def load_then_main_moves(self, *args, **kw):
        real(self, *args, **kw)
        (hub_cache / "refs" / "main").write_text(COMMIT_A)

    monkeypatch.setattr(HfBackend, "__init__", load_then_main_moves)
    (hub_cache / "refs" / "main").write_text(COMMIT_B)
    described(cli(*hub_args(small_root, cache, tiny_clip, 1)), cache, 2)
    assert loaded == ["B", "B"]


def test_a_commit_known_only_after_the_load_is_checked_before_writing(small_root, tiny_clip, hub_cache, loaded,
                                                                     tmp_path, monkeypatch):
    """Offline with nothing cached that names main, the load is what fetches it: the commit is read after the load,
    and compared before anything is written."""
    from mugcp.pipeline.backends.hf import HfBackend

    cache = tmp_path / "cache"
    described(cli(*hub_args(small_root, cache, tiny_clip, 0)), cache, 1)
    (hub_cache / "refs" / "main").unlink()
    real = HfBackend.__init__

    def fetch_then_load(self, *args, **kw):
        (hub_cache / "refs" / "main").write_text(COMMIT_B)
        real(self, *args, **kw)

    monkeypatch.setattr(HfBackend, "__init__", fetch_then_load)
    before = tables(cache)
    assert_one_line(cli(*hub_args(small_root, cache, tiny_clip, 1)), f"now resolves to revision {COMMIT_B}")
    assert tables(cache) == before and loaded == ["A", "B"]


def test_an_answers_table_made_before_revisions_were_recorded_is_kept(small_root, tiny_clip, hub_cache, loaded,
                                                                      tmp_path):
    cache = tmp_path / "cache"
    described(cli(*hub_args(small_root, cache, tiny_clip, 0)), cache, 1)
    path = answers_meta(cache)
    meta = json.loads(path.read_text())
    del meta["mllm_revision"]
    path.write_text(json.dumps(meta))
    (hub_cache / "refs" / "main").write_text(COMMIT_B)  # nothing to compare it with
    described(cli(*hub_args(small_root, cache, tiny_clip, 1)), cache, 2)
    assert loaded == ["A", "B"] and json.loads(path.read_text()) == meta


def test_a_commit_not_in_the_cache_is_neither_recorded_nor_refused(hub_cache, tiny_mllm_dir, tmp_path):
    assert mllm_weights.hub_commit("org/tiny") == COMMIT_A
    assert mllm_weights.hub_commit("org/tiny", COMMIT_B) == COMMIT_B
    (hub_cache / "refs" / "v2").write_text(COMMIT_B)
    assert mllm_weights.hub_commit("org/tiny", "v2") == COMMIT_B
    for name, revision in (("org/absent", None), ("org/tiny", "v3"), (str(tiny_mllm_dir), COMMIT_A),
                           (str(tmp_path / "none"), None)):
        assert mllm_weights.hub_commit(name, revision) is None, (name, revision)
    answers = tmp_path / "cache" / "dtd" / "answers" / "x"
    assert mllm_weights.hub_revision("org/tiny", None, answers) == ({"mllm_revision": COMMIT_A}, COMMIT_A)  # new
    answers.mkdir(parents=True)
    (answers / "meta.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "mllm_revision": COMMIT_B}))
    assert mllm_weights.hub_revision("org/absent", None, answers) == ({}, None)
    with pytest.raises(UserError, match="now resolves to revision"):
        mllm_weights.hub_revision("org/tiny", None, answers)
    with pytest.raises(UserError, match=f"--revision {COMMIT_A} names a Hub revision, but --mllm .* is a local folder"):
        mllm_weights.hub_revision(str(tiny_mllm_dir), COMMIT_A, answers)


def test_the_hubs_answer_is_asked_only_online(monkeypatch):
    """Offline the Hub is not asked; online its answer is the commit, and a Hub that cannot answer leaves it to the
    local cache."""
    from types import SimpleNamespace

    asked = []

    def model_info(self, repo, revision=None, timeout=None):
        asked.append((repo, revision))
        if repo == "org/gated":
            raise ConnectionError("no network")
        return SimpleNamespace(sha=COMMIT_B)

    monkeypatch.setattr(mllm_weights.HfApi, "model_info", model_info)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert mllm_weights.online_commit("org/tiny") is None and asked == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert mllm_weights.online_commit("org/tiny", "v2") == COMMIT_B and asked == [("org/tiny", "v2")]
    assert mllm_weights.online_commit("org/gated") is None


def test_a_server_does_not_add_answers_to_a_table_of_a_known_commit(small_root, tiny_clip, hub_cache, loaded,
                                                                    tmp_path, monkeypatch):
    """A server cannot say which commit it serves: its answers would join answers of a recorded commit unrecorded.
    With nothing to describe it asks no MLLM, and nothing is refused."""
    from mugcp.pipeline.backends.base import Answer
    from mugcp.pipeline.backends.hf import HfBackend

    generate = HfBackend._generate  # random weights never end an answer: taken whole, so that every image is described
    monkeypatch.setattr(HfBackend, "_generate", lambda self, *a: [Answer(text=x.text) for x in generate(self, *a)])
    cache = tmp_path / "cache"
    described(cli(*hub_args(small_root, cache, tiny_clip, 0)), cache, 1)
    before = tables(cache)
    with FakeServer(model="org/tiny") as s:
        served = [a for a in hub_args(small_root, cache, tiny_clip, 1) if a not in ("hf", "--backend")]
        assert_one_line(cli(*served, "--server-url", s.url), f"came from org/tiny at revision {COMMIT_A}",
                        "a server cannot say which weights it serves", f"--revision {COMMIT_A}")
        assert s.requests == 0 and tables(cache) == before
        r = cli(*[a for a in hub_args(small_root, cache, tiny_clip, 0) if a not in ("hf", "--backend")],
                "--server-url", s.url)
        assert r.returncode in (0, 1) and s.requests == 0, r.stderr


def test_revision_with_a_server_is_refused(small_root, tiny_clip, tmp_path):
    """A server serves the weights it was started with: a revision asked here would change nothing."""
    r = cli("extract", "--dataset", "dtd", "--root", small_root, "--cache-dir", tmp_path / "cache", "--clip",
            tiny_clip[0], "--pretrained", tiny_clip[1], "--revision", COMMIT_A)
    assert_one_line(r, "--revision is for the in-process backends")
    assert not (tmp_path / "cache").exists()


def test_revision_of_a_local_folder_is_refused_before_it_is_hashed(small_root, tiny_clip, tiny_mllm_dir, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setattr(mllm_weights, "file_sha256", lambda path: pytest.fail(f"{path} was read"))
    r = cli("extract", "--dataset", "dtd", "--root", small_root, "--cache-dir", tmp_path / "cache", "--clip",
            tiny_clip[0], "--pretrained", tiny_clip[1], "--backend", "hf", "--mllm", tiny_mllm_dir,
            "--revision", COMMIT_A)
    assert_one_line(r, f"--revision {COMMIT_A} names a Hub revision, but --mllm {tiny_mllm_dir} is a local folder")
    assert not (tmp_path / "cache").exists()


# -- the selection: what the protocol reads ----------------------------------------------------------

def test_selection_is_the_union_of_the_draws_plus_every_test_image(roomy_root, tiny_clip, tmp_path):
    """The training shots of every draw asked for and every test image; not the val shots, which no setting reads."""
    splits = load_dataset("dtd", roomy_root)
    expected = {i.path for i in splits.test}
    for shots in (1, 2):
        for seed in (1, 2, 3):
            draw = draw_fewshot(splits, shots, seed)
            expected |= {i.path for i in draw.train}
    total = len(splits.train) + len(splits.test)
    lines = []
    with FakeServer() as s:
        config = extract_config(tiny_clip, tmp_path / "cache", server_urls=[s.url], shots=(1, 2), seeds=(1, 2, 3))
        summary = run_extract("dtd", roomy_root, config, log=lines.append)
        assert s.requests == len(expected) < total
    assert {r["path"] for r in table_rows(tmp_path / "cache", "dtd", "images")} == expected
    assert summary.total == len(expected) and any(f"{len(expected)} of {total} images" in line for line in lines)


def test_base_to_novel_selection_describes_only_the_base_classes_shots(roomy_root, tiny_clip, tmp_path):
    """`train_classes: base`: base-to-novel trains on the base classes' shots only; novel classes are read
    at test time alone, so their shots are not described (on DTD: 24 of 47 classes' shots)."""
    splits = load_dataset("dtd", roomy_root)
    base = set(sorted({i.label for i in splits.train})[:24])
    draw = draw_fewshot(splits, 2, 1)
    expected = {i.path for i in splits.test} | {i.path for i in draw.train if i.label in base}
    with FakeServer() as s:
        config = extract_config(tiny_clip, tmp_path / "cache", server_urls=[s.url], shots=(2,), seeds=(1,),
                                train_classes="base")
        run_extract("dtd", roomy_root, config, log=lambda _: 0)
        assert s.requests == len(expected) == len(splits.test) + 24 * 2
    assert {r["path"] for r in table_rows(tmp_path / "cache", "dtd", "images")} == expected


def test_training_on_a_setting_the_cache_lacks_names_the_command(roomy_root, tiny_clip, tmp_path):
    with FakeServer() as s:
        extract(roomy_root, tmp_path / "cache", tiny_clip, server_urls=[s.url], shots=(1,), seeds=(1,),
                all_images=False)
    r = cli("train", "--dataset", "dtd", "--root", roomy_root, "--cache-dir", tmp_path / "cache", "--clip",
            tiny_clip[0], "--pretrained", tiny_clip[1], "--output", tmp_path / "runs", "--shots", "2", "--seed", "3",
            "--workers", "0")
    assert_one_line(r, "have no SCP", "mugcp extract --dataset dtd", "--shots 2 --seeds 3")


# -- reading it back ------------------------------------------------------------------------------

def test_reader_returns_requested_rows_in_order(small_root, tiny_clip, tmp_path, frozen_tiny):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("test",))
    rows = answers_by_path(cache)
    scp_of = {r["sha256"]: r for r in table_rows(cache, "dtd", "scp")}
    paths = sorted(rows)[::-1][:5]
    got = read_scp(cache, "dtd", frozen_tiny.model_id, paths)
    assert got.scp.shape == (5, 8, 64) and got.mask.shape == (5, 8)
    for i, p in enumerate(paths):
        stored = scp_of[rows[p]["sha256"]]
        assert np.array_equal(got.scp[i], np.asarray(stored["scp"], np.float16))
        n = len(rows[p]["phrases"])
        assert got.mask[i].sum() == n and not got.scp[i][n:].any()


def test_reader_refuses_another_clip_and_names_both(small_root, tiny_clip, tmp_path, frozen_tiny):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("val",))
    with pytest.raises(UserError) as e:
        read_scp(cache, "dtd", "ViT-B-16@openai", ["images/banded/banded_0001.jpg"])
    assert frozen_tiny.model_id in str(e.value) and "ViT-B-16@openai" in str(e.value)
    with pytest.raises(UserError, match="prompt version scp-v1, not scp-v0"):
        find_scp(cache, "dtd", frozen_tiny.model_id, prompt_version="scp-v0")


def test_reader_names_missing_rows_and_the_command(small_root, tiny_clip, tmp_path, frozen_tiny):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("val",))
    test_paths = [i.path for i in load_dataset("dtd", small_root).test]
    with pytest.raises(UserError, match=r"47 image\(s\) of dtd have no SCP.*mugcp extract --dataset dtd"):
        read_scp(cache, "dtd", frozen_tiny.model_id, test_paths)
    with pytest.raises(UserError, match="no stage-one cache for eurosat"):
        read_scp(cache, "eurosat", frozen_tiny.model_id, test_paths)


def test_a_damaged_part_is_one_line(small_root, tiny_clip, tmp_path, frozen_tiny):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("test",))
    part = next((cache / "dtd" / "scp").rglob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:200])
    with pytest.raises(UserError, match="cannot be read"):
        read_scp(cache, "dtd", frozen_tiny.model_id, [i.path for i in load_dataset("dtd", small_root).test])


# -- faults -----------------------------------------------------------------------------------------

def test_corrupt_image_is_recorded_and_the_run_goes_on(tmp_path, tiny_clip):
    write_synthetic_dtd(tmp_path / "data", per_class=4, size=32)
    victim = next((tmp_path / "data" / "dtd" / "images").rglob("*.jpg"))
    victim.write_bytes(b"broken")
    with FakeServer() as s:
        r = cli("extract", "--dataset", "dtd", "--root", tmp_path / "data", "--server-url", s.url, "--all-images",
                "--splits", "train,val,test", "--cache-dir", tmp_path / "cache", "--clip", tiny_clip[0], "--pretrained", tiny_clip[1])
    assert r.returncode == 1, r.stderr
    assert "187 described" in r.stderr and "1 failed" in r.stderr and victim.name in r.stderr
    failed = [x for x in table_rows(tmp_path / "cache", "dtd", "answers") if x["status"] == "failed"]
    assert len(failed) == 1 and "unreadable image" in failed[0]["error"]
    splits = load_dataset("dtd", tmp_path / "data")
    paths = [i.path for i in (*splits.train, *splits.val, *splits.test)]
    clip = json.loads(next((tmp_path / "cache" / "dtd" / "scp").glob("*/meta.json")).read_text())["clip_model"]
    # stage two names the file and why, rather than an extract command that would fail on it again
    with pytest.raises(UserError, match=f"stage one could not describe {victim.relative_to(tmp_path / 'data' / 'dtd')}"
                                        r" \(unreadable image.*\): replace or remove such files"):
        read_scp(tmp_path / "cache", "dtd", clip, paths)


def test_an_image_the_mllm_gave_no_usable_answer_is_asked_again_not_blamed(small_root, tiny_clip, tmp_path,
                                                                           frozen_tiny):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("val",))
    with FakeServer(garbage=True) as s:
        assert extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("test",), retries=0).failed == 47
    told = r"stage one could not describe \S+ \(.*no usable phrase.*\): `mugcp extract` asks failed " \
           r"images again, run `mugcp extract --dataset dtd"
    with pytest.raises(UserError, match=told) as e:
        read_scp(cache, "dtd", frozen_tiny.model_id, [i.path for i in load_dataset("dtd", small_root).test])
    assert "replace or remove" not in str(e.value)  # the file is fine: only the answer failed


def test_server_dying_mid_run_keeps_finished_work(small_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    with FakeServer(die_after=60) as s:
        summary = extract(small_root, cache, tiny_clip, server_urls=[s.url], retries=1, batch_size=8, concurrency=8,
                          flush_every=16)
    assert summary.failed > 0 and summary.done >= 50 and summary.done + summary.failed == 188
    ok = {p for p, r in answers_by_path(cache).items() if r["status"] == "ok"}
    assert len(ok) == summary.done
    with FakeServer() as s:  # the server is back: the rerun does only what failed
        again = extract(small_root, cache, tiny_clip, server_urls=[s.url])
    assert again.done == summary.failed and again.skipped == summary.done
    assert all(r["status"] == "ok" for r in answers_by_path(cache).values())


def test_shards_are_disjoint_and_cover_everything(small_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        totals = [extract(small_root, cache, tiny_clip, server_urls=[s.url], num_shards=3, shard_index=i).total
                  for i in range(3)]
    by_part = {p.name: pq.read_table(p).column("path").to_pylist()
               for p in sorted((cache / "dtd" / "images" / "parts").glob("part-*.parquet"))}
    rows = [path for paths in by_part.values() for path in paths]
    assert sum(totals) == 188 == len(rows) == len(set(rows))
    assert min(totals) > 0  # every shard has work: the hash spreads the paths
    for part, paths in by_part.items():  # each shard wrote exactly the paths that hash to it
        shard = int(part.split("-")[1].split("of")[0])
        assert {shard_of(p, 3) for p in paths} == {shard}, part
    # stable across processes and machines: the documented rule (sha256 of the path), not Python's salted hash()
    for i in range(20):
        path = f"images/x/{i}.jpg"
        assert shard_of(path, 7) == int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") % 7


def test_kill_9_then_rerun_equals_uninterrupted_byte_for_byte(small_root, tiny_clip, tmp_path):
    """A run killed mid-way and resumed leaves exactly the tables of an uninterrupted run (SCP bytes included)."""
    common = ["extract", "--dataset", "dtd", "--root", str(small_root), "--clip", str(tiny_clip[0]),
              "--pretrained", str(tiny_clip[1]), "--flush-every", "8", "--batch-size", "4", "--concurrency", "4",
              "--all-images", "--splits", "train,val,test"]
    with FakeServer(delay=0.02) as s:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        killed = tmp_path / "killed"
        proc = subprocess.Popen([sys.executable, "-m", "mugcp", *common, "--server-url", s.url, "--cache-dir",
                                 str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(list(killed.rglob("scp/*/parts/part-*.parquet"))) < 3 and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = len(table_rows(killed, "dtd", "scp"))
        assert 0 < partial < 188, partial
        assert cli(*common, "--server-url", s.url, "--cache-dir", killed).returncode == 0
        whole = tmp_path / "whole"
        assert cli(*common, "--server-url", s.url, "--cache-dir", whole).returncode == 0

    def content(cache, table, key):
        drop = {"created", "size", "mtime_ns"}
        return sorted((tuple((k, str(v)) for k, v in sorted(r.items()) if k not in drop)
                       for r in table_rows(cache, "dtd", table)), key=lambda t: dict(t)[key])

    for table, key in (("images", "path"), ("answers", "sha256"), ("scp", "sha256")):
        assert content(killed, table, key) == content(whole, table, key), table


def test_two_extracts_on_one_shard_do_not_both_run(small_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("val",))
        lock = next((cache / "dtd").glob(".lock-*-0of1"))
        with hold(lock, "a test"):  # as if another `mugcp extract` were writing this shard
            r = cli("extract", "--dataset", "dtd", "--root", small_root, "--server-url", s.url, "--all-images",
                    "--cache-dir", cache, "--clip", tiny_clip[0], "--pretrained", tiny_clip[1])
        assert_one_line(r, "the cache shard 0of1 of dtd is in use by pid", str(os.getpid()))
        assert s.requests == 47  # the refused run asked nothing


def test_stray_temporaries_are_cleaned(small_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("val",))
        parts = next((cache / "dtd" / "answers").glob("*/parts"))
        (parts / ".part-0of1-000003-deadbeef.parquet.tmp").write_bytes(b"half a part")
        (parts / ".part-1of2-000000-deadbeef.parquet.tmp").write_bytes(b"another shard's")
        index = cache / "dtd" / "images" / "parts"
        mine = next(index.glob("part-0of1-*.parquet")).name.split("-")[2]  # this MLLM and prompt's writer
        (index / f".part-0of1-{mine}-000009-deadbeef.parquet.tmp").write_bytes(b"half a part")
        (index / ".part-0of1-0123abcd-000000-deadbeef.parquet.tmp").write_bytes(b"another prompt's, being written")
        (index / ".part-0of1-000004-deadbeef.parquet.tmp").write_bytes(b"a killed earlier version's")
        extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("val",))
    assert sorted(p.name for p in parts.glob(".*.tmp")) == [".part-1of2-000000-deadbeef.parquet.tmp"]
    assert sorted(p.name for p in index.glob(".*.tmp")) == [".part-0of1-0123abcd-000000-deadbeef.parquet.tmp"]


def test_cache_files_are_readable_by_the_group(small_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    old = os.umask(0o002)
    try:
        with FakeServer() as s:
            extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("val",))
    finally:
        os.umask(old)
    for f in [*cache.rglob("meta.json"), *cache.rglob("part-*.parquet")]:
        assert f.stat().st_mode & 0o664 == 0o664, (f, oct(f.stat().st_mode))


# -- schema 1 ---------------------------------------------------------------------------------------

def test_a_schema_1_cache_is_refused_then_migrated(small_root, tiny_clip, tmp_path, frozen_tiny):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_urls=[s.url], splits=("test",))
    new = read_scp(cache, "dtd", frozen_tiny.model_id, [i.path for i in load_dataset("dtd", small_root).test])
    # the same content as schema 1 wrote it: one folder, path + answer + SCP bytes in each row
    images = {r["path"]: r for r in table_rows(cache, "dtd", "images")}
    answers = {r["sha256"]: r for r in table_rows(cache, "dtd", "answers")}
    scp = {r["sha256"]: r for r in table_rows(cache, "dtd", "scp")}
    old_cache = tmp_path / "old"
    folder = old_cache / "dtd" / "fake-mllm-x--scp-v1--clip-y"
    folder.mkdir(parents=True)
    rows = [{"path": p, "sha256": r["sha256"], "split": r["split"], "label": r["label"], "classname": r["classname"],
             "status": "ok", "error": None, "mllm": "fake-mllm", "prompt_version": "scp-v1",
             "clip_model": frozen_tiny.model_id, "schema_version": 1, "answer": answers[r["sha256"]]["answer"],
             "phrases": answers[r["sha256"]]["phrases"],
             "scp": np.asarray(scp[r["sha256"]]["scp"], np.float16).tobytes(),
             "mask": np.asarray(scp[r["sha256"]]["mask"], np.uint8).tobytes()} for p, r in images.items()]
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-0-000000-abc.parquet")
    (folder / "meta.json").write_text(json.dumps({"dataset": "dtd", "mllm": "fake-mllm", "prompt_version": "scp-v1",
                                                  "clip_model": frozen_tiny.model_id, "k": 8, "dim": 64,
                                                  "schema_version": 1}))
    second = old_cache / "dtd" / "fake-mllm-x--scp-v1--clip-z"  # the same answers embedded by a second CLIP
    second.mkdir()
    pq.write_table(pa.Table.from_pylist([{**r, "clip_model": "other-clip@z"} for r in rows]),
                   second / "part-0-000000-abc.parquet")
    (second / "meta.json").write_text(json.dumps({**json.loads((folder / "meta.json").read_text()),
                                                  "clip_model": "other-clip@z"}))
    paths = [i.path for i in load_dataset("dtd", small_root).test]
    with pytest.raises(UserError, match=f"schema version 1.*`mugcp cache migrate --cache-dir {old_cache}`"):
        read_scp(old_cache, "dtd", frozen_tiny.model_id, paths)  # the command names the cache, not its parent
    with FakeServer() as s, pytest.raises(UserError, match="schema version 1.*`mugcp cache migrate --cache-dir"):
        extract(small_root, old_cache, tiny_clip, server_urls=[s.url], splits=("test",))  # not described again
    assert s.requests == 0 and not (old_cache / "dtd" / "answers").exists()
    second.rename(tmp_path / "aside")  # migrated in two runs: an interrupted migration, or a folder found later
    r = cli("cache", "migrate", "--cache-dir", old_cache)
    assert r.returncode == 0 and r.stdout.count("migrated") == 1, r.stderr
    (tmp_path / "aside").rename(second)
    r = cli("cache", "migrate", "--cache-dir", old_cache)
    assert r.returncode == 0 and r.stdout.count("migrated") == 1, r.stderr
    folder.with_name(folder.name + ".v1").rename(folder)  # killed after writing its rows, before its rename
    (folder / "meta.v1.json").rename(folder / "meta.json")
    r = cli("cache", "migrate", "--cache-dir", old_cache)
    assert r.returncode == 0 and r.stdout.count("migrated") == 1, r.stderr
    for scp_table in (old_cache / "dtd" / "scp").iterdir():  # SCP rows once per CLIP too
        keys = [row["sha256"] for f in sorted(scp_table.glob("parts/*.parquet")) for row in pq.read_table(f).to_pylist()]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == len(images), scp_table
    for table, key in (("images", "path"), ("answers", "sha256")):  # written once, not once per CLIP
        keys = [row[key] for row in table_rows(old_cache, "dtd", table)]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == len(images), table
    migrated = read_scp(old_cache, "dtd", frozen_tiny.model_id, paths)
    assert np.array_equal(migrated.scp, new.scp) and np.array_equal(migrated.mask, new.mask)
    with FakeServer() as s:  # an extract after migration hashes the files again but describes nothing
        summary = extract(small_root, old_cache, tiny_clip, server_urls=[s.url], splits=("test",))
        assert s.requests == 0 and summary.skipped == 47
    meta = old_cache / "dtd" / "images" / "meta.json"  # a cache of a newer schema: migrate cannot help
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "schema_version": 99}))
    with FakeServer() as s, pytest.raises(UserError, match="schema version 99, this mugcp reads .*made by a newer"):
        extract(small_root, old_cache, tiny_clip, server_urls=[s.url], splits=("test",))


def test_a_cache_folder_named_like_a_uri_is_a_folder(tiny_clip, tmp_path, monkeypatch):
    """pyarrow reads "cache:v2/..." as a URI of a file system named "cache": the cache writes and reads plain paths."""
    from conftest import described_dtd

    root = described_dtd(tmp_path / "data", tiny_clip)
    monkeypatch.chdir(tmp_path)
    with FakeServer() as s:
        for _ in range(2):  # the second reads what the first wrote
            run_extract("dtd", root, extract_config(tiny_clip, Path("cache:v2"), server_urls=[s.url]), log=lambda _: 0)
    assert table_rows(tmp_path / "cache:v2", "dtd", "scp")


def test_two_shards_starting_a_table_at_once_must_agree_on_what_its_meta_records(tmp_path):
    """Two shards of a new answers table, started at once with other --max-tokens: the first to write its rows
    makes the table's meta; the other's rows are refused, not mixed in under a meta that does not describe them."""
    from mugcp.core.scp_cache import read_meta, record_meta

    folder = tmp_path / "answers" / "t"
    folder.mkdir(parents=True)
    meta = {"table": "answers", "dataset": "dtd", "mllm": "m", "k": 8, "prompt_version": "scp-v1"}
    record_meta(folder, meta, {"max_tokens": 128}, agree=("max_tokens",))
    record_meta(folder, meta, {"max_tokens": 128, "backend": "hf"}, agree=("max_tokens",))  # the same: kept
    with pytest.raises(UserError, match="started meanwhile by another extract with max_tokens 128, not 12"):
        record_meta(folder, meta, {"max_tokens": 12}, agree=("max_tokens",))
    assert read_meta(folder)["max_tokens"] == 128 and list(folder.glob(".*.tmp")) == []


def test_a_reader_is_told_when_an_extract_is_filling_the_cache(tmp_path):
    from mugcp.core.scp_cache import being_written

    (tmp_path / "dtd").mkdir()
    assert being_written(tmp_path, "dtd") == ""
    with hold(tmp_path / "dtd" / ".lock-m-0of1", "the cache shard 0of1 of dtd"):
        assert being_written(tmp_path, "dtd").startswith(" (an extract is writing it now: pid ")
    assert being_written(tmp_path, "dtd") == ""
