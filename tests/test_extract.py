"""Stage one: prompt parsing, the cache contract, faults, resume after kill -9, shards, and the three backends."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from conftest import cli, extract_config
from mugcp.core.coop_datasets import load_dataset
from mugcp.core.errors import UserError
from mugcp.core.scp_cache import find_cache, read_scp
from mugcp.pipeline.backends.base import LocalBackend
from mugcp.pipeline.backends.server import ServerBackend
from mugcp.pipeline.extract import run_extract, shard_of
from mugcp.pipeline.prompts import parse_phrases, question
from mugcp.world.stand_in_server import FakeServer
from mugcp.world.synth import DTD_CLASSES, write_synthetic_dtd


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Synthetic DTD with 4 images per class: 188 images (94 train, 47 val, 47 test)."""
    root = tmp_path_factory.mktemp("small")
    write_synthetic_dtd(root, per_class=4, size=48)
    return root


def extract(root, cache, tiny_clip, **options):
    """`run_extract` on the synthetic DTD with the tiny CLIP; `options` are ExtractConfig/BackendConfig fields."""
    return run_extract("dtd", root, extract_config(tiny_clip, cache, **options), log=lambda _: 0)


def cache_rows(cache_dir: Path) -> list[dict]:
    parts = sorted(cache_dir.rglob("part-*.parquet"))
    if not parts:
        return []
    return ds.dataset([str(p) for p in parts], format="parquet").to_table().to_pylist()


def ok_rows(cache_dir: Path) -> dict[str, dict]:
    return {r["path"]: r for r in cache_rows(cache_dir) if r["status"] == "ok"}


# -- prompt and parsing ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('["red brick wall", "rough texture"]', ["red brick wall", "rough texture"]),
    ('Here you go:\n```json\n["a", "blue dots", "a"]\n```', ["a", "blue dots"]),
    ("- striped fabric\n- blue and white\n3. woven", ["striped fabric", "blue and white", "woven"]),
    ("A red wall. It is rough, bumpy", ["A red wall", "It is rough", "bumpy"]),
    ("", []), (None, []), ("?? !! ...", []), ('["x"', ["x"]),
])
def test_parse_phrases(text, expected):
    assert parse_phrases(text, 8) == expected


def test_parse_phrases_caps_count_and_length():
    text = json.dumps([f"phrase {i} " + "long " * 50 for i in range(20)])
    out = parse_phrases(text, 8)
    assert len(out) == 8 and all(len(p) <= 120 for p in out)


def test_question_never_names_a_class():
    words = set(question(8).lower().replace(",", " ").replace(".", " ").split())
    assert not words & set(DTD_CLASSES)


# -- the server client and faults ---------------------------------------------------------------

def describe(url, images, **kw):
    async def go():
        b = ServerBackend(url, None, backoff=0.01, **kw)
        await b.start()
        try:
            return await b.describe(images)
        finally:
            await b.aclose()

    return asyncio.run(go())


def jpeg(small_root):
    return next((small_root / "dtd" / "images").rglob("*.jpg")).read_bytes()


def test_retries_after_5xx_then_succeeds(small_root):
    with FakeServer(fail_first=2) as s:
        (a,) = describe(s.url, [jpeg(small_root)], retries=3)
        assert a.error is None and parse_phrases(a.text) and s.requests == 3


def test_gives_up_after_retries_and_reports(small_root):
    with FakeServer(fail_first=100) as s:
        (a,) = describe(s.url, [jpeg(small_root)], retries=2)
        assert a.text is None and "after 3 attempts" in a.error and s.requests == 3


def test_garbage_answer_is_a_failure_not_a_row(small_root):
    with FakeServer(garbage=True) as s:
        (a,) = describe(s.url, [jpeg(small_root)], retries=2)
        assert "no usable phrase" in a.error
        assert s.temperatures == [0.0, 0.7, 0.7]  # greedy first; the retries sample, or they would repeat it


def test_local_backends_regenerate_unusable_answers_sampled(monkeypatch):
    """hf and vllm share this loop: greedy first, then only the failed images again, sampled with new seeds."""
    class Scripted(LocalBackend):
        kind = "scripted"

        def __init__(self, retries):
            super().__init__(k=8, retries=retries)
            self.calls = []

        def _generate(self, images, seed=None):
            self.calls.append((len(images), seed))
            # image b"A" answers well only when sampled; b"B" never does
            return ['["woven red fabric"]' if d == b"A" and seed is not None else "!!!" for d, _ in images]

    monkeypatch.setattr("mugcp.pipeline.backends.base.check_image", lambda d: ("image/png", None))
    backend = Scripted(retries=2)
    ok, never = asyncio.run(backend.describe([b"A", b"B"]))
    assert ok.text == '["woven red fabric"]'
    assert never.error.startswith("failed after 3 attempts: no usable phrase")
    assert backend.calls == [(2, None), (2, 1), (1, 2)]


def test_server_errors_are_retried_greedy(small_root):
    with FakeServer(fail_first=1) as s:
        (a,) = describe(s.url, [jpeg(small_root)], retries=1)
        assert a.error is None and s.temperatures == [0.0, 0.0]


def test_timeout_is_retried_then_failed(small_root):
    with FakeServer(delay=1.0) as s:
        (a,) = describe(s.url, [jpeg(small_root)], retries=1, timeout=0.2)
        assert a.error and "Timeout" in a.error


def test_corrupt_image_fails_alone(small_root):
    with FakeServer() as s:
        good, bad = describe(s.url, [jpeg(small_root), b"\x00not an image"])
        assert good.error is None and "unreadable image" in bad.error


def test_server_down_is_one_line_error(small_root, tiny_clip):
    r = cli("extract", "--dataset", "dtd", "--root", small_root, "--server-url", "http://127.0.0.1:9",
                "--clip", tiny_clip[0], "--pretrained", tiny_clip[1])
    assert r.returncode == 2 and "cannot reach" in r.stderr and "Traceback" not in r.stderr
    with FakeServer(model="served-model") as s:
        r = cli("extract", "--dataset", "dtd", "--root", small_root, "--server-url", s.url, "--mllm", "other",
                    "--clip", tiny_clip[0], "--pretrained", tiny_clip[1])
        assert r.returncode == 2 and "serves served-model, not --mllm other" in r.stderr


def test_unwritable_cache_dir(small_root, tiny_clip, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with FakeServer() as s:
        r = cli("extract", "--dataset", "dtd", "--root", small_root, "--server-url", s.url,
                    "--cache-dir", blocker / "cache", "--clip", tiny_clip[0], "--pretrained", tiny_clip[1])
    assert r.returncode == 2 and "cannot write the cache" in r.stderr


# -- the cache contract --------------------------------------------------------------------------

def test_extract_writes_schema_and_skips_on_rerun(small_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        first = extract(small_root, cache, tiny_clip, server_url=s.url)
        assert (first.total, first.done, first.failed) == (188, 188, 0)
        again = extract(small_root, cache, tiny_clip, server_url=s.url)
        assert (again.done, again.skipped) == (0, 188)
    rows = cache_rows(cache)
    assert len(rows) == 188 and len({r["path"] for r in rows}) == 188
    r = rows[0]
    for key in ("path", "sha256", "split", "label", "classname", "mllm", "prompt_version", "clip_model", "answer",
                "phrases", "scp", "mask", "schema_version"):
        assert key in r
    assert r["mllm"] == "fake-mllm" and r["prompt_version"] == "scp-v1" and r["clip_model"].startswith("mugcp-tiny")
    assert len(r["scp"]) == 8 * 64 * 2 and len(r["mask"]) == 8
    assert {x["split"] for x in rows} == {"train", "val", "test"}


def test_reader_returns_requested_rows_in_order(small_root, tiny_clip, tmp_path, frozen_tiny):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_url=s.url, splits=("test",))
    rows = ok_rows(cache)
    paths = sorted(rows)[::-1][:5]
    got = read_scp(cache, "dtd", frozen_tiny.model_id, paths)
    assert got.scp.shape == (5, 8, 64) and got.mask.shape == (5, 8)
    for i, p in enumerate(paths):
        assert got.scp[i].tobytes() == rows[p]["scp"]
        n = len(rows[p]["phrases"])
        assert got.mask[i].sum() == n and np.allclose(np.linalg.norm(got.scp[i][:n].astype(np.float32), axis=-1), 1, atol=1e-2)
        assert not got.scp[i][n:].any()


def test_reader_refuses_another_clip_and_names_both(small_root, tiny_clip, tmp_path, frozen_tiny):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_url=s.url, splits=("val",))
    with pytest.raises(UserError) as e:
        read_scp(cache, "dtd", "ViT-B-16@openai", ["images/banded/banded_0001.jpg"])
    assert frozen_tiny.model_id in str(e.value) and "ViT-B-16@openai" in str(e.value)
    with pytest.raises(UserError, match="prompt version scp-v1, not scp-v0"):
        find_cache(cache, "dtd", frozen_tiny.model_id, prompt_version="scp-v0")


def test_reader_names_missing_rows_and_the_command(small_root, tiny_clip, tmp_path, frozen_tiny):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        extract(small_root, cache, tiny_clip, server_url=s.url, splits=("val",))
    test_paths = [i.path for i in load_dataset("dtd", small_root).test]
    with pytest.raises(UserError, match=r"47 image\(s\) of dtd have no SCP.*mugcp extract --dataset dtd"):
        read_scp(cache, "dtd", frozen_tiny.model_id, test_paths)
    with pytest.raises(UserError, match="no stage-one cache for eurosat"):
        read_scp(cache, "eurosat", frozen_tiny.model_id, test_paths)


def test_corrupt_image_is_recorded_and_the_run_goes_on(tmp_path, tiny_clip):
    import shutil

    write_synthetic_dtd(tmp_path / "data", per_class=4, size=32)
    victim = next((tmp_path / "data" / "dtd" / "images").rglob("*.jpg"))
    victim.write_bytes(b"broken")
    with FakeServer() as s:
        r = cli("extract", "--dataset", "dtd", "--root", tmp_path / "data", "--server-url", s.url, "--splits",
                    "train,val,test", "--cache-dir", tmp_path / "cache", "--clip", tiny_clip[0], "--pretrained",
                    tiny_clip[1])
    assert r.returncode == 1, r.stderr
    assert "187 described" in r.stderr and "1 failed" in r.stderr and victim.name in r.stderr
    rows = cache_rows(tmp_path / "cache")
    failed = [x for x in rows if x["status"] == "failed"]
    assert len(failed) == 1 and "unreadable image" in failed[0]["error"]
    shutil.rmtree(tmp_path / "data")


def test_server_dying_mid_run_keeps_finished_work(small_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    with FakeServer(die_after=60) as s:
        summary = extract(small_root, cache, tiny_clip, server_url=s.url, retries=1, batch_size=8, concurrency=8,
                          flush_every=16)
    assert summary.failed > 0 and summary.done >= 50 and summary.done + summary.failed == 188
    assert len(ok_rows(cache)) == summary.done
    with FakeServer() as s:  # the server is back: the rerun does only what failed
        again = extract(small_root, cache, tiny_clip, server_url=s.url)
    assert again.done == summary.failed and again.skipped == summary.done and len(ok_rows(cache)) == 188


def test_shards_are_disjoint_and_cover_everything(small_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        totals = [extract(small_root, cache, tiny_clip, server_url=s.url, num_shards=3, shard_index=i).total
                  for i in range(3)]
    rows_by_part = {p.name: ds.dataset(str(p)).to_table(columns=["path"]).column("path").to_pylist()
                    for p in sorted(cache.rglob("part-*.parquet"))}
    rows = [path for paths in rows_by_part.values() for path in paths]
    assert sum(totals) == 188 == len(rows) == len(set(rows))
    assert min(totals) > 0  # every shard has work: the hash spreads the paths
    for part, paths in rows_by_part.items():  # each shard wrote exactly the paths that hash to it
        shard = int(part.split("-")[1].split("of")[0])
        assert {shard_of(p, 3) for p in paths} == {shard}, part
    # stable across processes and machines: the documented rule (sha256 of the path), not Python's salted hash()
    for i in range(20):
        path = f"images/x/{i}.jpg"
        assert shard_of(path, 7) == int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") % 7


def test_kill_9_then_rerun_equals_uninterrupted(small_root, tiny_clip, tmp_path):
    """A run killed mid-way and resumed leaves exactly the rows of an uninterrupted run."""
    common = ["extract", "--dataset", "dtd", "--root", str(small_root), "--clip", str(tiny_clip[0]),
              "--pretrained", str(tiny_clip[1]), "--flush-every", "8", "--batch-size", "4", "--concurrency", "4"]
    with FakeServer(delay=0.02) as s:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        killed = tmp_path / "killed"
        proc = subprocess.Popen([sys.executable, "-m", "mugcp", *common, "--server-url", s.url, "--cache-dir",
                                 str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(list(killed.rglob("part-*.parquet"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = len(ok_rows(killed))
        assert 0 < partial < 188, partial
        assert cli(*common, "--server-url", s.url, "--cache-dir", killed).returncode == 0
        whole = tmp_path / "whole"
        assert cli(*common, "--server-url", s.url, "--cache-dir", whole).returncode == 0
    a, b = cache_rows(killed), cache_rows(whole)
    assert len(a) == len(b) == 188
    def key(r):
        return r["path"], r["sha256"], r["answer"], r["scp"], r["mask"], tuple(r["phrases"])

    assert sorted(map(key, a)) == sorted(map(key, b))


# -- the three real backends ---------------------------------------------------------------------

def test_hf_backend_end_to_end(small_root, tiny_clip, tiny_mllm_dir, tmp_path):
    r = cli("extract", "--dataset", "dtd", "--root", small_root, "--backend", "hf", "--mllm", tiny_mllm_dir,
                "--splits", "test", "--max-tokens", "16", "--batch-size", "16", "--cache-dir", tmp_path / "cache",
                "--clip", tiny_clip[0], "--pretrained", tiny_clip[1])
    rows = ok_rows(tmp_path / "cache")
    failed = [x for x in cache_rows(tmp_path / "cache") if x["status"] != "ok"]
    assert len(rows) + len(failed) == 47 and len(rows) > 0, r.stderr
    assert r.returncode == (1 if failed else 0)
    assert all(x["mllm"] == str(tiny_mllm_dir) for x in rows.values())


def test_unknown_mllm_is_one_line_error(small_root, tiny_clip, tmp_path):
    r = cli("extract", "--dataset", "dtd", "--root", small_root, "--backend", "hf", "--mllm", tmp_path / "none",
                "--clip", tiny_clip[0], "--pretrained", tiny_clip[1])
    assert r.returncode == 2 and "cannot load MLLM" in r.stderr and "Traceback" not in r.stderr


def test_real_vllm_server_backend(vllm_server, small_root, tiny_clip, tmp_path):
    r = cli("extract", "--dataset", "dtd", "--root", small_root, "--server-url", vllm_server, "--splits", "test",
                "--max-tokens", "24", "--cache-dir", tmp_path / "cache", "--clip", tiny_clip[0], "--pretrained",
                tiny_clip[1])
    rows = cache_rows(tmp_path / "cache")
    assert len(rows) == 47, r.stderr
    ok = [x for x in rows if x["status"] == "ok"]
    assert ok and all(x["answer"] for x in ok)
    assert r.returncode == (0 if len(ok) == 47 else 1)


def test_real_vllm_in_process_backend(vllm_env, installed, tiny_mllm_dir, small_root, tiny_clip, tmp_path):
    from mugcp.world.vllm_cpu import vllm_environ

    cmd = [str(vllm_env / "bin" / "python"), "-m", "mugcp", "extract", "--dataset", "dtd", "--root",
           str(small_root), "--backend", "vllm", "--mllm", str(tiny_mllm_dir), "--splits", "test", "--max-tokens",
           "24", "--cache-dir", str(tmp_path / "cache"), "--clip", str(tiny_clip[0]), "--pretrained",
           str(tiny_clip[1]), "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=vllm_environ(PYTHONPATH=str(installed)), timeout=600,
                       cwd=tmp_path)  # not the checkout: there `mugcp` is only the top floor
    rows = cache_rows(tmp_path / "cache")
    assert len(rows) == 47, r.stderr[-3000:]
    assert any(x["status"] == "ok" for x in rows)
    assert {x["mllm"] for x in rows} == {str(tiny_mllm_dir)}
