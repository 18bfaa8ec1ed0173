"""`mugcp demo`: README's "run the main job" command, end to end on built-in data and tiny models."""

from __future__ import annotations

import json

from conftest import cli, run_cli


def test_demo_runs_the_whole_job(tmp_path):
    r = run_cli("demo", "--out", tmp_path, "--epochs", "2", "--backend", "hf")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Base" in r.stdout and "Novel" in r.stdout and "HM" in r.stdout and "zero-shot" in r.stdout
    run = tmp_path / "runs" / "dtd" / "mugcp" / "b2n_shots4" / "seed1"
    for split, n in (("base", 72), ("novel", 69)):
        assert json.loads((run / f"results_{split}.json").read_text())["num_images"] == n
    assert list((tmp_path / "cache" / "dtd").glob("scp/*/parts/part-*.parquet"))
    # the demo's protocol reads 4 train + 2 val shots per class and every test image: 423 of 470 images
    assert "423 images in shard (423 distinct), 423 described" in r.stderr, r.stderr[-2000:]
    # a second run reuses everything: nothing is described again, the finished run is kept
    again = cli("demo", "--out", tmp_path, "--epochs", "2", "--backend", "hf")
    assert again.returncode == 0 and "0 described, 423 already cached" in again.stderr, again.stderr[-2000:]


def test_models_tiny_writes_both_models(tmp_path):
    r = cli("models", "tiny", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "clip" / "mugcp-tiny-clip.safetensors").is_file()
    assert (tmp_path / "mllm" / "config.json").is_file() and (tmp_path / "mllm" / "tokenizer.json").is_file()
