"""Stage two through the CLI: train, eval base/novel with HM, exact resume after kill -9, clear errors."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line, cli, described_dtd, extract_config
from mugcp.core.errors import UserError
from mugcp.pipeline.extract import run_extract
from mugcp.trainer.methods import available_methods, method_class
from mugcp.trainer.runs import FINAL_WEIGHTS
from mugcp.world.stand_in_server import FakeServer
from mugcp.world.synth import write_synthetic_dtd

TRAINED = [m for m in available_methods() if method_class(m).trains]  # a new method file is tested here as it lands


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory, tiny_clip):
    """Synthetic DTD (4 images per class) with its SCP cache from a deterministic stand-in server."""
    root = tmp_path_factory.mktemp("train-data")
    write_synthetic_dtd(root, per_class=4, size=32)
    cache = root / "cache"
    with FakeServer() as s:
        run_extract("dtd", root, extract_config(tiny_clip, cache, server_urls=[s.url], all_images=True), log=lambda _: 0)
    return root, cache


def train_args(stage_one, tiny_clip, out, *extra):
    root, cache = stage_one
    return ["train", "--dataset", "dtd", "--root", root, "--cache-dir", cache, "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--output", out, "--shots", "2", "--workers", "0", *extra]


def test_train_then_eval_base_and_novel(stage_one, tiny_clip, tmp_path):
    out = tmp_path / "runs"
    r = cli(*train_args(stage_one, tiny_clip, out, "--set", "optim.epochs=2"))
    assert r.returncode == 0, r.stderr
    run = out / "dtd" / "mugcp" / "b2n_shots2" / "seed1"
    assert (run / "prompt.safetensors").is_file() and (run / "fewshot.json").is_file()
    draw = json.loads((run / "fewshot.json").read_text())
    assert len(draw["train"]) == 47 * 2 and draw["seed"] == 1
    r = cli("eval", "--split", "base", "--output", out, "--workers", "0")
    assert r.returncode == 0 and "Base" not in r.stdout, r.stderr
    r = cli("eval", "--split", "novel", "--output", out, "--workers", "0")
    assert r.returncode == 0, r.stderr
    base = json.loads((run / "results_base.json").read_text())
    novel = json.loads((run / "results_novel.json").read_text())
    assert (base["num_images"], novel["num_images"]) == (24, 23)
    assert base["method"] == "mugcp" and base["shots"] == 2 and base["config"]["optim"]["epochs"] == 2
    assert base["eval_precision"] == "fp32"  # amp's autocast runs on GPU only
    hm = 2 * base["accuracy"] * novel["accuracy"] / (base["accuracy"] + novel["accuracy"] or 1)
    assert f"HM {hm:.2f}" in r.stdout
    r = cli("eval", "--split", "novel", "--output", out, "--workers", "0", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["accuracy"] == novel["accuracy"], r.stdout  # JSON alone
    assert_one_line(cli("eval", "--run", run, "--clip", "ViT-B-32"), "evaluated with the CLIP it was trained with")
    assert_one_line(cli("eval", "--run", run, "--method", "zeroshot", "--dataset", "dtd"), "give one of them")


def test_shots_beyond_a_class_take_all_its_images(stage_one, tiny_clip, tmp_path):
    """--shots 5 where every class has 2 train and 1 val image: the reference's draw (all of them), said on one line."""
    out = tmp_path / "runs"
    r = cli(*train_args(stage_one, tiny_clip, out, "--shots", "5", "--method", "coop", "--set", "optim.epochs=1"))
    assert r.returncode == 0, r.stderr
    assert ("few-shot draw of dtd: 47 class(es) have fewer than 5 train images (2-2), all taken; "
            "47 class(es) have fewer than 4 val images (1-1), all taken") in r.stderr
    draw = json.loads((out / "dtd" / "coop" / "b2n_shots5" / "seed1" / "fewshot.json").read_text())
    assert len(draw["train"]) == 47 * 2 and len(draw["val"]) == 47
    assert draw["fewer_than_shots"]["train"][:2] == [[0, 2], [1, 2]] and len(draw["fewer_than_shots"]["val"]) == 47


@pytest.mark.parametrize("method", ["coop", "gpt"])
def test_baselines_train_and_eval_through_the_cli(stage_one, tiny_clip, tmp_path, method):
    out = tmp_path / "runs"
    r = cli(*train_args(stage_one, tiny_clip, out, "--method", method, "--set", "optim.epochs=2",
                        "--set", "optim.batch_size=16"))
    assert r.returncode == 0, r.stderr
    r = cli("eval", "--split", "novel", "--output", out, "--workers", "0")
    assert r.returncode == 0 and f"dtd {method} seed 1 novel" in r.stdout, r.stderr


@pytest.mark.parametrize("method", TRAINED)
def test_every_method_trains_in_the_references_half_precision(stage_one, tiny_clip, tmp_path, method, monkeypatch):
    """`optim.precision=fp16` is the references' PREC "fp16": CLIP in half precision, and each learnt part in the
    precision its reference holds it in, SGD on those weights; every method trains so, keeps its learnt weights so,
    and evaluates in half precision. MaPLe's reference halves its context and first projection only (its deeper
    prompts and their projections are fp32 Parameters and Linears), PromptSRC's its text context only."""
    from mugcp.trainer import evaluation

    seen = []  # the dtype of the images evaluation passes through the model
    plain = evaluation.evaluate

    def spy(logits_fn, *args, **kwargs):
        def watched(images, index):
            seen.append(images.dtype)
            return logits_fn(images, index)
        return plain(watched, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", spy)
    out = tmp_path / "runs"
    r = cli(*train_args(stage_one, tiny_clip, out, "--method", method, "--set", "optim.epochs=2",
                        "--set", "optim.batch_size=16", "--set", "optim.precision=fp16", "--set", "optim.lr=0.05"))
    assert r.returncode == 0, r.stderr[-2000:]
    run = out / "dtd" / method / "b2n_shots2" / "seed1"
    weights = {k: v for k, v in load_file(run / FINAL_WEIGHTS).items() if v.is_floating_point()}
    learnt = [k for k in weights if k != "prototypes"]  # GPT's prototypes are frozen features, kept in fp32
    half = {"maple": ("ctx", "to_visual.0."), "promptsrc": ("ctx",)}.get(method, ("",))
    expected = {k: torch.float16 if k.startswith(half) else torch.float32 for k in learnt}
    assert learnt and {k: weights[k].dtype for k in learnt} == expected
    assert (torch.float32 in expected.values()) == (method in ("maple", "promptsrc"))
    assert all(math.isfinite(h["loss"]) for h in json.loads((run / "history.json").read_text()))
    record = json.loads((run / "run.json").read_text())  # the tiny CLIP's 3 layers cap the deep methods' 9
    capped = {"maple": {"method.depth": 3}, "mugcp": {"method.depth": 3},
              "promptsrc": {"method.depth_text": 3, "method.depth_vision": 3}}.get(method)
    assert record.get("as_built") == capped and (f"{next(iter(capped))}=9 does not fit" in r.stdout + r.stderr if capped else True)
    assert record["learnable_parameters"] == sum(v.numel() for k, v in weights.items() if k in learnt)
    r = cli("eval", "--split", "novel", "--output", out, "--workers", "0")
    assert r.returncode == 0 and f"dtd {method} seed 1 novel" in r.stdout, r.stderr[-2000:]
    assert seen and set(seen) == {torch.float16}
    assert json.loads((run / "results_novel.json").read_text())["eval_precision"] == "fp16"


def test_a_run_is_not_evaluated_or_resumed_on_a_split_that_changed(tiny_clip, tmp_path):
    """The run records its data's split (paths, labels, classes): once that changes (here one test image
    fewer; a regenerated split after images were added is the same case), eval and resume refuse it."""
    root, out = tmp_path / "data", tmp_path / "runs"
    write_synthetic_dtd(root, per_class=4, size=32)
    args = ["train", "--dataset", "dtd", "--root", root, "--clip", tiny_clip[0], "--pretrained", tiny_clip[1],
            "--output", out, "--shots", "2", "--workers", "0", "--method", "coop", "--set", "optim.epochs=1"]
    assert cli(*args).returncode == 0
    run = out / "dtd" / "coop" / "b2n_shots2" / "seed1"
    assert cli("eval", "--run", run, "--split", "base", "--workers", "0").returncode == 0
    split_file = root / "dtd" / "split_zhou_DescribableTextures.json"
    split = json.loads(split_file.read_text())
    split_file.write_text(json.dumps({**split, "test": split["test"][1:]}))
    assert_one_line(cli("eval", "--run", run, "--split", "base", "--workers", "0"), "does not hold the split")
    assert_one_line(cli(*args, "--resume"), "split: ")


def killed_then_resumed(stage_one, tiny_clip, out, method, *args) -> Path:
    """Train in a child process, kill -9 it once epoch 1 is checkpointed, then finish with --resume; the run folder."""
    cmd = [sys.executable, "-m", "mugcp", *map(str, train_args(stage_one, tiny_clip, out, *args))]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = out / "dtd" / method / "b2n_shots2" / "seed1"
    deadline = time.monotonic() + 300
    while not list((run / "checkpoints").glob("epoch-0001")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "prompt.safetensors").exists(), "the run finished before it could be killed"
    r = cli(*train_args(stage_one, tiny_clip, out, *args))
    assert r.returncode == 2 and "--resume" in r.stderr
    r = cli(*train_args(stage_one, tiny_clip, out, *args, "--resume"))
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr
    return run


def test_resume_after_kill_gives_the_same_weights(stage_one, tiny_clip, tmp_path):
    args = ["--set", "optim.epochs=4", "--set", "optim.batch_size=8"]
    whole = tmp_path / "whole"
    assert cli(*train_args(stage_one, tiny_clip, whole, *args)).returncode == 0
    run = killed_then_resumed(stage_one, tiny_clip, tmp_path / "killed", "mugcp", *args)
    a = load_file(str(run / "prompt.safetensors"))
    b = load_file(str(whole / "dtd" / "mugcp" / "b2n_shots2" / "seed1" / "prompt.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    history = json.loads((run / "history.json").read_text())  # the killed epochs are not counted twice
    assert history == json.loads((whole / "dtd" / "mugcp" / "b2n_shots2" / "seed1" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_the_seed_fixes_the_result_whatever_the_worker_count(stage_one, tiny_clip, tmp_path):
    """Augmentation draws come from (seed, epoch, image index), not from whichever loader worker reads an image.

    With no workers the shots are also decoded once and kept for every epoch (`DecodedImages`): the
    same weights show that the kept pixels give the very batches a fresh read gives."""
    weights = []
    for workers in ("0", "2"):
        out = tmp_path / f"workers{workers}"
        args = train_args(stage_one, tiny_clip, out, "--set", "optim.epochs=2", "--set", "optim.batch_size=8")
        args[args.index("--workers") + 1] = workers
        assert cli(*args).returncode == 0
        weights.append(load_file(str(out / "dtd" / "mugcp" / "b2n_shots2" / "seed1" / "prompt.safetensors")))
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_decoded_images_are_kept_within_their_budget(tmp_path):
    import numpy as np
    from PIL import Image

    from mugcp.trainer.loaders import DecodedImages

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((4, 5, 3), 40 * i, dtype=np.uint8)).save(paths[-1])
    decoded = DecodedImages(budget=2 * 4 * 5 * 3)
    first = [decoded.get(i, p) for i, p in enumerate(paths)]
    assert sorted(decoded.images) == [0, 1]  # the third would pass the budget: read again each time
    assert decoded.get(0, paths[0]) is first[0] and decoded.get(2, paths[2]) is not first[2]
    for i, p in enumerate(paths):
        assert np.array_equal(np.asarray(first[i]), np.asarray(Image.open(p).convert("RGB")))


def test_batches_equal_the_per_image_transform_bit_for_bit(tiny_clip, tmp_path):
    """ToTensor + Normalize run on whole batches where the model runs (`split_transform`, `iterate`); the pixels are
    exactly those of the full transform applied image by image, with the same seeded random crops."""
    from mugcp.core.coop_datasets import load_dataset
    from mugcp.core.frozen_clip import load_clip
    from mugcp.trainer.loaders import ImageList, iterate, make_loader

    write_synthetic_dtd(tmp_path, per_class=4, size=48)
    splits = load_dataset("dtd", tmp_path)
    frozen = load_clip(str(tiny_clip[0]), str(tiny_clip[1]))
    items = splits.train[:20]
    for transform in (frozen.train_transform, frozen.test_transform):
        batched = torch.cat([x for x, _, _ in iterate(make_loader(items, splits.root, transform, frozen.image_size,
                                                                  8, workers=0, seed=3), torch.device("cpu"))])
        single = torch.stack([ImageList(items, splits.root, transform, frozen.image_size, 3)[i][0]
                              for i in range(len(items))])
        assert batched.dtype == torch.float32 and torch.equal(batched, single)


def test_scp_controls_shuffle_or_zero_what_the_method_reads(stage_one, tiny_clip, tmp_path):
    from mugcp.core.coop_datasets import load_dataset
    from mugcp.core.frozen_clip import load_clip
    from mugcp.trainer.conditions import ConditionContext, Conditions

    root, cache = stage_one
    items = load_dataset("dtd", root).test
    frozen = load_clip(str(tiny_clip[0]), str(tiny_clip[1]))

    def read(control, seed=1, items=items):
        ctx = ConditionContext("dtd", frozen.model_id, str(cache), None, None, torch.device("cpu"), "", control, seed)
        return Conditions(("scp",), ctx, items)(torch.arange(len(items)))

    real, shuffled = read("real"), read("shuffled")
    assert not torch.equal(real["scp"], shuffled["scp"])
    # every image gets the description of another image of the list, and each description is used once
    same = (shuffled["scp"][:, None] == real["scp"][None]).flatten(2).all(-1)  # (N, N): row i holds image j's SCP
    assert same.any(1).all() and not same.diagonal().any() and same.float().sum(0).ge(1).all()
    assert torch.equal(shuffled["scp_mask"].sum(), real["scp_mask"].sum())
    assert torch.equal(read("shuffled", seed=1)["scp"], shuffled["scp"])  # fixed by the run's seed
    assert not torch.equal(read("shuffled", seed=2)["scp"], shuffled["scp"])
    with pytest.raises(UserError, match="another image's SCP, but the dtd images read here are 1"):
        read("shuffled", items=items[:1])  # one image has no other image's SCP to take
    zeros = read("zeros")
    assert not zeros["scp"].any() and torch.equal(zeros["scp_mask"], real["scp_mask"])
    # from the command line: the control is a config key, recorded with the run
    out = tmp_path / "runs"
    r = cli(*train_args(stage_one, tiny_clip, out, "--set", "optim.epochs=1", "--set", "conditions.scp=shuffled"))
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "dtd" / "mugcp" / "b2n_shots2" / "seed1" / "run.json").read_text())
    assert run["config"]["conditions"] == {"scp": "shuffled", "prompt": None, "k": None}


def test_a_cache_of_two_prompts_of_one_mllm_is_read_as_chosen(tiny_clip, tmp_path):
    """Two stage-one prompts of the same MLLM in one cache: training names the one to read with a config key (the
    refusal says which), records it, and evaluation reads the same one."""
    root = described_dtd(tmp_path / "data", tiny_clip)
    with FakeServer() as s:
        run_extract("dtd", root, extract_config(tiny_clip, root / "cache", server_urls=[s.url], all_images=True,
                                                prompt="caption"), log=lambda _: 0)
    out = tmp_path / "runs"
    args = ["train", "--dataset", "dtd", "--root", root, "--cache-dir", root / "cache", "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--output", out, "--shots", "2", "--workers", "0", "--set", "optim.epochs=1"]
    assert_one_line(cli(*args), "several caches for dtd", "choose one with --set conditions.prompt=VERSION")
    r = cli(*args, "--set", "conditions.prompt=caption")
    assert r.returncode == 0, r.stderr[-2000:]
    run = out / "dtd" / "mugcp" / "b2n_shots2" / "seed1"
    record = json.loads((run / "run.json").read_text())
    assert record["conditions"]["scp"]["prompt_version"] == "caption-v1"
    assert cli("eval", "--run", run, "--split", "novel", "--workers", "0").returncode == 0
    assert json.loads((run / "results_novel.json").read_text())["conditions"]["scp"]["prompt_version"] == "caption-v1"
    # a prompt or k no table holds: the refusal gives the extract that fills it, with the MLLM and backend the
    # cache's answers came from
    meta = json.loads(next((root / "cache" / "dtd" / "answers").glob("*/meta.json")).read_text())
    for key, option in (("conditions.prompt=attributes", "--prompt attributes"), ("conditions.k=3", "--k 3")):
        r = cli(*args, "--output", tmp_path / "other", "--set", key)
        assert_one_line(r, option, f"--mllm {meta['mllm']}", f"--backend {meta['backend']}")


def test_eval_with_a_test_time_scp_control(stage_one, tiny_clip, tmp_path, monkeypatch):
    """`mugcp eval --scp`: the trained weights meet another SCP at test time; its results are a file and a report row
    of their own, and the run's own results stay as they were."""
    import mugcp.trainer.evaluation as evaluation
    from mugcp.trainer.report import build_table

    out = tmp_path / "runs"
    assert cli(*train_args(stage_one, tiny_clip, out, "--set", "optim.epochs=1")).returncode == 0
    run = out / "dtd" / "mugcp" / "b2n_shots2" / "seed1"
    for split in ("base", "novel"):
        assert cli("eval", "--run", run, "--split", split, "--workers", "0").returncode == 0
    own = (run / "results_base.json").read_bytes()
    seen, real_conditions = [], evaluation.Conditions
    monkeypatch.setattr(evaluation, "Conditions", lambda reads, ctx, items: seen.append(ctx.scp) or
                        real_conditions(reads, ctx, items))
    for split in ("base", "novel"):
        r = cli("eval", "--run", run, "--split", split, "--scp", "shuffled", "--workers", "0")
        assert r.returncode == 0 and "with test SCP shuffled" in r.stdout, r.stderr
    assert seen == ["shuffled", "shuffled"] and "Base" in r.stdout  # both halves of the control: its own summary
    record = json.loads((run / "results_base_scp-shuffled.json").read_text())
    assert record["test_conditions"] == {"scp": "shuffled"} and record["conditions"]["scp"]["mllm"]
    assert (run / "results_base.json").read_bytes() == own
    rows, _ = build_table(out)
    assert sorted(r["variant"] for r in rows if r["dataset"] == "dtd") == ["", "test conditions.scp=shuffled"]
    # what it trained with is its own evaluation, not a control
    assert cli("eval", "--run", run, "--split", "base", "--scp", "real", "--workers", "0").returncode == 0
    assert seen[-1] == "real" and not (run / "results_base_scp-real.json").exists()
    # nothing to control
    assert cli(*train_args(stage_one, tiny_clip, out, "--method", "coop", "--set", "optim.epochs=1")).returncode == 0
    assert_one_line(cli("eval", "--run", out / "dtd" / "coop" / "b2n_shots2" / "seed1", "--scp", "zeros",
                        "--workers", "0"), "--scp zeros", "coop reads no SCP")
    assert_one_line(cli("eval", "--method", "zeroshot", "--dataset", "dtd", "--scp", "zeros"), "reads none")

    # a sweep evaluates each run that reads SCP with every control asked for, and reports a row each
    root, cache = stage_one
    r = cli("sweep", "--datasets", "dtd", "--methods", "mugcp", "--seeds", "1", "--shots", "2", "--root", root,
            "--cache-dir", cache, "--output", tmp_path / "sweep", "--clip", tiny_clip[0], "--pretrained", tiny_clip[1],
            "--set", "optim.epochs=1", "--workers", "0", "--test-scp", "zeros")
    assert r.returncode == 0 and "mugcp [2 shots, test conditions.scp=zeros, optim.epochs=1]" in r.stdout, r.stdout
    assert (tmp_path / "sweep" / "dtd" / "mugcp" / "b2n_shots2" / "seed1" / "results_novel_scp-zeros.json").is_file()


def test_promptsrc_keeps_the_gaussian_average_of_its_epochs(stage_one, tiny_clip, tmp_path, monkeypatch):
    """A 3-epoch run keeps sum_e w_e x (weights after epoch e), w_e = N(e; 2, 1) normalised; eval and report
    read it; a run killed after epoch 1 and resumed keeps bit-identical weights (the aggregate is checkpointed)."""
    from mugcp.trainer.methods.promptsrc import PromptSRC

    after_epoch = []
    on_epoch_end = PromptSRC.on_epoch_end

    def record(self, epoch, epochs):
        after_epoch.append({k: v.clone() for k, v in self.learnable_state_dict().items()})
        on_epoch_end(self, epoch, epochs)

    monkeypatch.setattr(PromptSRC, "on_epoch_end", record)
    args = ["--method", "promptsrc", "--set", "optim.epochs=3", "--set", "optim.batch_size=8",
            "--set", "method.gpa_mean=2", "--set", "optim.lr=0.05", "--set", "optim.warmup_epochs=0"]
    out = tmp_path / "runs"
    r = cli(*train_args(stage_one, tiny_clip, out, *args))
    assert r.returncode == 0, r.stderr
    run = out / "dtd" / "promptsrc" / "b2n_shots2" / "seed1"
    kept = load_file(str(run / "prompt.safetensors"))
    gauss = [math.exp(-0.5 * (e - 2) ** 2) for e in (1, 2, 3)]
    weights = [g / sum(gauss) for g in gauss]
    assert len(after_epoch) == 3 and kept.keys() == after_epoch[-1].keys()
    for k, v in kept.items():
        expected = sum(w * snap[k].double() for w, snap in zip(weights, after_epoch))
        assert torch.allclose(v.double(), expected, rtol=1e-6, atol=1e-8), k  # float32 rounding
    assert max((kept[k] - after_epoch[-1][k]).abs().max() for k in kept) > 1e-4  # not just the last epoch's
    for split in ("base", "novel"):
        assert cli("eval", "--split", split, "--run", run, "--workers", "0").returncode == 0
    r = cli("report", out)
    assert r.returncode == 0 and "| PromptSRC | 84.26 | 76.10 | 79.97 |" in r.stdout
    assert re.search(r"\| dtd \| promptsrc \[[^]]*method.gpa_mean=2[^]]*\] \| 1 \|", r.stdout)  # a variant: its own row

    resumed = load_file(str(killed_then_resumed(stage_one, tiny_clip, tmp_path / "killed", "promptsrc", *args)
                            / "prompt.safetensors"))
    assert resumed.keys() == kept.keys() and all((resumed[k] == kept[k]).all() for k in kept)


def test_training_errors(stage_one, tiny_clip, tmp_path):
    root, _ = stage_one
    out = tmp_path / "runs"
    assert_one_line(cli(*train_args(stage_one, tiny_clip, out, "--set", "optim.lrr=1")),
                    "unknown config key 'optim.lrr'")
    assert_one_line(cli(*train_args(stage_one, tiny_clip, out, "--method", "vpt")), "unknown method 'vpt'")
    empty = tmp_path / "empty-cache"
    assert_one_line(cli(*train_args(stage_one, tiny_clip, out, "--cache-dir", empty)),
                    "no stage-one cache for dtd", "mugcp extract --dataset dtd")
    assert_one_line(cli("eval", "--split", "novel", "--output", tmp_path / "nothing"), "no run given")


def test_settings_that_are_not_numbers_and_runs_that_diverge_are_refused(stage_one, tiny_clip, tmp_path):
    out = tmp_path / "runs"
    for key in ("optim.lr=inf", "optim.lr=nan", "optim.lr=1e308", "method.gate_init=nan"):
        assert_one_line(cli(*train_args(stage_one, tiny_clip, out, "--set", key)), key.split("=")[0])
    assert not out.exists() or not any(out.rglob("run.json"))  # refused before anything was written
    r = cli(*train_args(stage_one, tiny_clip, out, "--method", "coop", "--set", "optim.epochs=2",
                        "--set", "optim.warmup_epochs=0", "--set", "optim.lr=1e30"))
    assert_one_line(r, "training diverged in epoch", "lower optim.lr")
    epoch = int(r.stderr.split("diverged in epoch ")[1].split()[0])
    run = next(out.rglob("run.json")).parent
    assert not (run / FINAL_WEIGHTS).exists() and len(list(run.glob("checkpoints/epoch-*"))) == epoch - 1
    assert_one_line(cli("eval", "--run", run, "--split", "base"), "not finished")


def test_missing_scp_rows_name_the_count_and_command(tiny_clip, tmp_path):
    write_synthetic_dtd(tmp_path, per_class=4, size=32)
    with FakeServer() as s:
        run_extract("dtd", tmp_path, extract_config(tiny_clip, tmp_path / "cache", server_urls=[s.url], splits=("val",), all_images=True),
                    log=lambda _: 0)
    r = cli(*train_args((tmp_path, tmp_path / "cache"), tiny_clip, tmp_path / "runs"))
    assert_one_line(r, "48 image(s) of dtd have no SCP", "mugcp extract --dataset dtd")


def test_cache_for_another_clip_is_refused(stage_one, tmp_path):
    from mugcp.world.tiny_clip import write_tiny_clip

    other = write_tiny_clip(tmp_path / "other-clip", seed=1)
    r = cli(*train_args(stage_one, other, tmp_path / "runs"))
    assert_one_line(r, "was made for CLIP mugcp-tiny-clip@file:", "not mugcp-tiny-clip@file:")


def test_checkpoint_keeps_the_loss_scale(tmp_path):
    """A resumed mixed-precision run continues from the loss scale it had reached, not from 65536."""
    from mugcp.trainer.checkpoints import load_checkpoint, save_checkpoint

    class Prompt(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ctx = torch.nn.Parameter(torch.randn(4, 8))

        def learnable_state_dict(self):
            return {"ctx": self.ctx}

        def load_learnable_state_dict(self, state):
            self.ctx.data.copy_(state["ctx"])

        def training_state(self):
            return {}

        def load_training_state(self, state):
            assert state == {}

    def fresh():
        m = Prompt()
        return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), torch.amp.GradScaler("cpu", init_scale=1024.0)

    model, optim, scaler = fresh()
    scaler.scale((model.ctx ** 2).sum()).backward()
    model.ctx.grad[0, 0] = float("inf")  # an overflow halves the scale
    scaler.step(optim)
    scaler.update()
    assert scaler.get_scale() == 512.0
    save_checkpoint(tmp_path, 0, model, optim, scaler)

    model2, optim2, scaler2 = fresh()
    epoch = load_checkpoint(tmp_path / "checkpoints" / "epoch-0001", model2, optim2, scaler2)
    assert epoch == 1 and scaler2.get_scale() == 512.0
    assert torch.equal(model2.ctx, model.ctx)


@pytest.mark.parametrize("method", TRAINED)
def test_every_method_trains_and_evaluates_under_amp_autocast(stage_one, tiny_clip, tmp_path, method, monkeypatch):
    """The default precision's GPU path (fp16 autocast around fp32 weights, a loss scaler) run on this CPU: every
    method's forward, backward and evaluation take fp16 activations beside its fp32 prompts and conditions."""
    from mugcp.trainer import evaluation, precision

    monkeypatch.setattr(precision, "AMP_DEVICES", ("cuda", "cpu"))
    seen = []  # whether evaluation's forward ran under autocast, and what it computed in
    plain = evaluation.evaluate

    def spy(logits_fn, *args, **kwargs):
        def watched(images, index):
            logits = logits_fn(images, index)
            seen.append((torch.is_autocast_enabled("cpu"), images.dtype))
            return logits
        return plain(watched, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", spy)
    out = tmp_path / "runs"
    r = cli(*train_args(stage_one, tiny_clip, out, "--method", method, "--set", "optim.epochs=2",
                        "--set", "optim.batch_size=16"))
    assert r.returncode == 0, r.stderr[-2000:]
    run = out / "dtd" / method / "b2n_shots2" / "seed1"
    weights = {k: v for k, v in load_file(run / FINAL_WEIGHTS).items() if v.is_floating_point()}
    assert weights and all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in weights.values())
    assert all(math.isfinite(h["loss"]) for h in json.loads((run / "history.json").read_text()))
    scaler = json.loads(max((run / "checkpoints").glob("epoch-*/scaler.json")).read_text())
    assert scaler["scale"] >= 1 and scaler["_growth_tracker"] >= 1  # the loss scaler ran, and its last steps applied
    r = cli("eval", "--split", "novel", "--output", out, "--workers", "0")
    assert r.returncode == 0 and f"dtd {method} seed 1 novel" in r.stdout, r.stderr[-2000:]
    assert seen and set(seen) == {(True, torch.float32)}
    assert json.loads((run / "results_novel.json").read_text())["eval_precision"] == "amp"


def test_an_image_whose_bytes_changed_since_stage_one_is_not_given_its_old_scp(tiny_clip, tmp_path):
    """Test images that swapped bytes after stage one described them: eval refuses their SCP (it describes what
    the files used to hold) and names the extract that describes them again; a copy of the same bytes with new
    modification times is no change."""
    from mugcp.core.coop_datasets import load_dataset

    root = described_dtd(tmp_path / "data", tiny_clip)
    out = tmp_path / "runs"
    r = cli("train", "--dataset", "dtd", "--root", root, "--cache-dir", root / "cache", "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--output", out, "--shots", "2", "--workers", "0", "--set", "optim.epochs=1")
    assert r.returncode == 0, r.stderr[-2000:]
    test = [root / "dtd" / i.path for i in load_dataset("dtd", root).test if i.label >= 24]  # the novel classes
    for file in test:  # the same bytes, written again: new modification times
        file.write_bytes(file.read_bytes())
    r = cli("eval", "--split", "novel", "--output", out, "--workers", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = test[0].read_bytes(), test[1].read_bytes()
    test[0].write_bytes(b)
    test[1].write_bytes(a)
    r = cli("eval", "--split", "novel", "--output", out, "--workers", "0")
    assert_one_line(r, "2 image(s) of dtd changed since stage one described them",
                    "so their SCP describes other bytes: run `mugcp extract --dataset dtd --root")
    with FakeServer() as s:
        run_extract("dtd", root, extract_config(tiny_clip, root / "cache", server_urls=[s.url], all_images=True),
                    log=lambda _: 0)
        assert s.requests == 0  # two known contents at new paths: nothing to describe
    r = cli("eval", "--split", "novel", "--output", out, "--workers", "0")
    assert r.returncode == 0, r.stderr[-2000:]


def test_an_imagenet_run_keeps_the_draw_it_trained_on(tiny_clip, tmp_path):
    """A run records the reference draw it trained on by its sha256 (or none: drawn here). A `--resume` that would
    train on another draw (a run of an earlier version, which drew here, after the reference's draw appeared in
    the data folder; or the reference's draw gone) is refused, listing the difference."""
    from test_protocol import _dassl_pickle

    from mugcp.core.coop_datasets import load_dataset
    from mugcp.world.imagenet_layouts import write_synthetic_imagenet

    write_synthetic_imagenet(tmp_path / "data", classes=4, train=6, test=2, size=8)
    out = tmp_path / "runs"
    args = ["train", "--dataset", "imagenet", "--root", tmp_path / "data", "--clip", tiny_clip[0], "--pretrained",
            tiny_clip[1], "--output", out, "--shots", "2", "--workers", "0", "--method", "coop", "--set",
            "optim.epochs=1"]
    assert cli(*args).returncode == 0
    run = out / "imagenet" / "coop" / "b2n_shots2" / "seed1"
    record = json.loads((run / "run.json").read_text())
    assert record["draw"] is None and "draw_file" not in record
    del record["draw"]  # a record of an earlier version, unfinished
    (run / "run.json").write_text(json.dumps(record))
    (run / "prompt.safetensors").unlink()
    splits = load_dataset("imagenet", tmp_path / "data")
    cached = splits.root / "split_fewshot" / "shot_2-seed_1.pkl"
    _dassl_pickle(cached, [(f"/x/imagenet/{it.path}", it.label, -1, it.classname) for it in splits.train[::3]])
    assert_one_line(cli(*args, "--resume"), "holds a run with other settings (draw: None -> ")
    fresh = cli(*args, "--output", tmp_path / "fresh")
    assert fresh.returncode == 0 and "the reference's own draw, read from" in fresh.stdout + fresh.stderr
    record = json.loads((tmp_path / "fresh" / "imagenet" / "coop" / "b2n_shots2" / "seed1" / "run.json").read_text())
    assert len(record["draw"]) == 64 and record["draw_file"] == str(cached)
    cached.unlink()
    assert_one_line(cli(*args, "--output", tmp_path / "fresh", "--resume"), f"(draw: {record['draw']} -> None")


def test_damaged_final_weights_are_written_again_by_resume(stage_one, tiny_clip, tmp_path):
    """`--resume` of a finished run keeps it; one whose final weights lost a bit writes them again from its
    last checkpoint, which an evaluation then reads."""
    out = tmp_path / "runs"
    args = train_args(stage_one, tiny_clip, out, "--set", "optim.epochs=1", "--method", "coop")
    assert cli(*args).returncode == 0
    weights = out / "dtd" / "coop" / "b2n_shots2" / "seed1" / "prompt.safetensors"
    from mugcp.trainer.checkpoints import load_tensors
    from mugcp.trainer.results import weights_digest

    digest, whole = weights_digest(weights.parent), weights.read_bytes()
    weights.write_bytes(whole[:-1] + bytes([whole[-1] ^ 0x10]))
    assert_one_line(cli("eval", "--run", weights.parent, "--split", "base", "--workers", "0"), "do not match the checksum")
    r = cli(*args, "--resume")
    assert r.returncode == 0 and "holds this run, finished" not in r.stdout + r.stderr, r.stderr[-2000:]
    assert weights_digest(weights.parent) == digest and load_tensors(weights)  # the same tensors, whole again
    assert cli("eval", "--run", weights.parent, "--split", "base", "--workers", "0").returncode == 0


def test_a_resumed_run_reads_the_scp_it_began_with_in_a_cache_that_gained_more(stage_one, tiny_clip, tmp_path):
    """A killed run, then a teammate's extract of another k into the shared cache: `--resume` reads the table the
    run began with (its run.json names it), not a "several caches" refusal no option could answer; and the report
    names a row by the SCP its runs read, so `conditions.k=8` asked outright is the same row as the default that
    read k 8."""
    import shutil

    from mugcp.trainer.report import build_table

    root, _ = stage_one
    cache = tmp_path / "cache"
    shutil.copytree(stage_one[1], cache)
    args = train_args((root, cache), tiny_clip, tmp_path / "runs", "--set", "optim.epochs=2")
    assert cli(*args).returncode == 0
    run = tmp_path / "runs" / "dtd" / "mugcp" / "b2n_shots2" / "seed1"
    (run / "prompt.safetensors").unlink()  # killed before its final weights
    with FakeServer() as s:
        run_extract("dtd", root, extract_config(tiny_clip, cache, server_urls=[s.url], all_images=True, k=4),
                    log=lambda _: 0)
    assert_one_line(cli(*args, "--output", tmp_path / "other"), "several caches for dtd", "conditions.k=K")
    r = cli(*args, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["conditions"]["scp"]["k"] == 8
    second = train_args((root, cache), tiny_clip, tmp_path / "runs", "--set", "optim.epochs=2", "--seed", "2",
                        "--set", "conditions.k=8")
    assert cli(*second).returncode == 0
    for seed in (1, 2):
        for split in ("base", "novel"):
            folder = tmp_path / "runs" / "dtd" / "mugcp" / "b2n_shots2" / f"seed{seed}"
            assert cli("eval", "--run", folder, "--split", split, "--workers", "0").returncode == 0
    rows, _ = build_table(tmp_path / "runs")
    assert [(r["method"], r["variant"], r["seeds"]) for r in rows if r["dataset"] == "dtd"] == [("mugcp", "", 2)]


def test_a_run_that_diverges_under_amp_is_stopped(stage_one, tiny_clip, tmp_path, monkeypatch):
    """Under amp the loss scaler skips every step whose gradients overflow: a run whose loss is no number in any
    step of an epoch keeps finite, useless weights, and is stopped as diverged instead of finishing with exit 0."""
    from mugcp.trainer import precision

    monkeypatch.setattr(precision, "AMP_DEVICES", ("cuda", "cpu"))
    out = tmp_path / "runs"
    r = cli(*train_args(stage_one, tiny_clip, out, "--method", "maple", "--set", "optim.epochs=3",
                        "--set", "optim.warmup_epochs=0", "--set", "optim.lr=1e4"))
    assert_one_line(r, "training diverged in epoch", "its loss was not finite in any step", "lower optim.lr")
    run = next(out.rglob("run.json")).parent
    assert not (run / FINAL_WEIGHTS).exists()


@pytest.mark.parametrize("n, batch_size, drop_last", [(23, 4, True), (23, 4, False), (3, 8, False)])
def test_one_loader_for_all_epochs_gives_each_epoch_the_batches_of_its_seed(n, batch_size, drop_last):
    """Training's one loader for every epoch yields, epoch by epoch, the order a shuffling DataLoader of that
    epoch's seed yields (its short last batch dropped or kept), each index with the epoch's augmentation seed."""
    from torch.utils.data import DataLoader

    from mugcp.trainer.loaders import EpochBatches

    seeds = [100_003 + e for e in range(3)]
    batches = EpochBatches(n, batch_size, drop_last, seeds)
    got = list(batches)
    assert len(got) == len(batches) == 3 * batches.per_epoch
    for e, seed in enumerate(seeds):
        plain = DataLoader(range(n), batch_size=batch_size, shuffle=True, drop_last=drop_last,
                           generator=torch.Generator().manual_seed(seed))
        epoch = got[e * batches.per_epoch:(e + 1) * batches.per_epoch]
        assert [[i for i, _ in b] for b in epoch] == [b.tolist() for b in plain]
        assert {s for b in epoch for _, s in b} == {seed}
