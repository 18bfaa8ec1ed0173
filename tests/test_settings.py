"""The settings beyond base-to-novel on synthetic trees in the real layouts: a run trained on a synthetic
ImageNet evaluated on other datasets' classes, ImageNet-A/-R's class subsets mapped right, and one sweep
that produces the cross-dataset, domain-generalisation and few-shot tables and figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_one_line, cli
from mugcp.core.coop_datasets import BASE_TO_NOVEL, DOMAIN_TARGETS, TRANSFER_TARGETS, classnames_of, load_dataset
from mugcp.core.errors import UserError
from mugcp.sweep import make_plan
from mugcp.trainer.config import load_config
from mugcp.trainer.results import read_results
from mugcp.world.imagenet_layouts import (
    VARIANTS,
    subset_labels,
    wnid,
    write_synthetic_imagenet,
    write_synthetic_variant,
)
from mugcp.world.stand_in_server import FakeServer
from mugcp.world.synth import write_synthetic_dtd

CLASSES = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """$DATA with a synthetic ImageNet (12 classes), its four variants and a synthetic DTD."""
    root = tmp_path_factory.mktemp("settings")
    write_synthetic_imagenet(root, classes=CLASSES, train=4, test=2, size=32)
    for name in VARIANTS:
        write_synthetic_variant(root, name, classes=CLASSES, per_class=2, size=32)
    write_synthetic_dtd(root, per_class=4, size=32)
    return root


def common(tiny_clip, root, out):
    return ["--root", root, "--clip", tiny_clip[0], "--pretrained", tiny_clip[1], "--output", out, "--workers", "0"]


def test_subset_variants_map_labels_to_their_wnids(data):
    names = {wnid(i): n for i, n in enumerate(classnames_of(load_dataset("imagenet", data).train))}
    for name in ("imagenet_a", "imagenet_r"):
        splits = load_dataset(name, data)
        kept = subset_labels(name, CLASSES)
        assert len(classnames_of(splits.test)) == len(kept) == CLASSES // 2  # prompts for the subset only
        for item in splits.test:
            folder = item.path.split("/")[1]
            assert folder == wnid(kept[item.label]) and item.classname == names[folder]
    v2 = load_dataset("imagenetv2", data)
    assert {int(i.path.split("/")[1]) for i in v2.test} == {i.label for i in v2.test}  # folder i holds label i


def test_a_run_is_evaluated_on_other_datasets(data, tiny_clip, tmp_path):
    out = tmp_path / "runs"
    r = cli("train", "--dataset", "imagenet", "--method", "coop", "--subsample", "all", "--shots", "2",
            "--set", "optim.epochs=1", "--set", "optim.batch_size=8", *common(tiny_clip, data, out))
    assert r.returncode == 0, r.stderr[-2000:]
    run = out / "imagenet" / "coop" / "all_shots2" / "seed1"
    for target, n_classes, setting in (("dtd", 47, "xd"), ("imagenet_a", CLASSES // 2, "dg")):
        r = cli("eval", "--run", run, "--dataset", target, "--split", "all", "--root", data, "--workers", "0")
        assert r.returncode == 0, r.stderr[-2000:]
        record = read_results(run / f"results_{target}_all.json")
        assert (record["dataset"], record["source"], record["setting"]) == (target, "imagenet", setting)
        assert len(record["classnames"]) == n_classes and record["task"] == "prompt_classification"
        assert set(record["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
        assert record["metrics"]["acc5"] >= record["metrics"]["acc1"]
        assert record["metrics"]["acc1"] == pytest.approx(record["accuracy"] / 100, abs=1e-6)
    assert_one_line(cli("eval", "--run", run, "--split", "novel", "--workers", "0"), "none is novel to it")
    # class-specific context has nothing to say about other classes: refused on one line
    r = cli("train", "--dataset", "imagenet", "--method", "coop", "--subsample", "all", "--shots", "2",
            "--set", "optim.epochs=1", "--set", "method.csc=true", *common(tiny_clip, data, tmp_path / "csc"))
    assert r.returncode == 0, r.stderr[-2000:]
    csc = tmp_path / "csc" / "imagenet" / "coop" / "all_shots2" / "seed1"
    assert_one_line(cli("eval", "--run", csc, "--dataset", "dtd", "--root", data), "cannot be evaluated on other")
    # a base-to-novel run is no source run: its results on a target would join the transfer tables' rows
    r = cli("train", "--dataset", "imagenet", "--method", "coop", "--shots", "2", "--set", "optim.epochs=1",
            *common(tiny_clip, data, tmp_path / "b2n"))
    assert r.returncode == 0, r.stderr[-2000:]
    b2n = tmp_path / "b2n" / "imagenet" / "coop" / "b2n_shots2" / "seed1"
    assert_one_line(cli("eval", "--run", b2n, "--dataset", "imagenet_r", "--root", data),
                    "test a run trained on every class of its source")
    assert not list(b2n.glob("results_*"))


def test_a_target_that_cannot_be_read_leaves_the_others_tested(data, tiny_clip, tmp_path):
    """Caltech101 is missing from $DATA: the source run is still tested on DTD, after it in the papers' order,
    and the sweep says which evaluation failed (exit 1)."""
    out = tmp_path / "runs"
    r = cli("sweep", "--setting", "xd", "--datasets", "caltech101,dtd", "--methods", "coop", "--seeds", "1",
            "--shots", "2", "--set", "optim.epochs=1", *common(tiny_clip, data, out))
    assert r.returncode == 1, r.stderr[-2000:]
    run = out / "imagenet" / "coop" / "transfer_shots2" / "seed1"
    assert read_results(run / "results_dtd_all.json")["setting"] == "xd"
    assert not (run / "results_caltech101_all.json").exists()
    assert "1 evaluation(s) failed, the others are written: caltech101 all: no 'caltech-101/' folder" in r.stderr
    # with stage one in the sweep: the target it cannot describe fails on its own line, the rest goes on
    with FakeServer() as s:
        r = cli("sweep", "--setting", "xd", "--datasets", "caltech101,dtd", "--methods", "mugcp", "--seeds", "1",
                "--shots", "2", "--set", "optim.epochs=1", "--backend", "server", "--server-url", s.url,
                "--cache-dir", tmp_path / "cache", *common(tiny_clip, data, out))
    assert r.returncode == 1, r.stderr[-2000:]
    assert "caltech101 stage one: no 'caltech-101/' folder" in r.stderr
    assert read_results(out / "imagenet" / "mugcp" / "all_shots2" / "seed1" / "results_dtd_all.json")["setting"] == "xd"


def test_sweep_writes_every_setting_table(data, tiny_clip, tmp_path):
    out = tmp_path / "runs"
    args = ["sweep", "--setting", "xd,dg,fewshot", "--datasets", "dtd,imagenet_a,imagenet_r", "--methods",
            "zeroshot,coop", "--seeds", "1", "--shots", "2", "--fewshot-shots", "1,2", "--set", "optim.epochs=1",
            *common(tiny_clip, data, out)]
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "report.md").read_text()
    for title in ("## Cross-dataset transfer", "## Domain generalisation", "## Few-shot learning"):
        assert title in md
    assert "| Method | imagenet (source) | dtd | Average |" in md
    assert "| Method | imagenet (source) | imagenet_a | imagenet_r | Average |" in md
    for name in ("report_xd.csv", "report_dg.csv", "report_fewshot.csv", "report.png"):
        assert (out / name).is_file(), name
    runs = sorted(p.relative_to(out).as_posix() for p in out.rglob("prompt.safetensors"))
    # one ImageNet source run (16-shot setting here: 2 shots) shared by xd and dg, few-shot runs per dataset
    assert "imagenet/coop/transfer_shots2/seed1/prompt.safetensors" in runs
    assert {"dtd/coop/all_shots1/seed1/prompt.safetensors", "dtd/coop/all_shots2/seed1/prompt.safetensors"} <= set(runs)
    first = {p: Path(p).stat().st_mtime_ns for p in map(str, out.rglob("results_*.json"))}
    again = cli(*args)  # restart: nothing is trained or evaluated again
    assert again.returncode == 0 and {p: Path(p).stat().st_mtime_ns for p in first} == first
    assert json.loads((out / "imagenet/coop/transfer_shots2/seed1/results_imagenet_r_all.json").read_text())[
        "setting"] == "dg"


def test_a_sweep_evaluates_again_on_a_target_whose_split_changed(tiny_clip, tmp_path):
    """The source run stands (its own data did not change); its result on a target whose split changed is
    measured again, and zero-shot's old result there is refused, not reported as the new data's."""
    root, out = tmp_path / "data", tmp_path / "runs"
    write_synthetic_imagenet(root, classes=CLASSES, train=4, test=2, size=32)
    write_synthetic_dtd(root, per_class=4, size=32)
    args = ["sweep", "--setting", "xd", "--datasets", "dtd", "--methods", "zeroshot,coop", "--seeds", "1",
            "--shots", "2", "--set", "optim.epochs=1", *common(tiny_clip, root, out)]
    assert cli(*args).returncode == 0
    target = out / "imagenet/coop/transfer_shots2/seed1/results_dtd_all.json"
    before = json.loads(target.read_text())["num_images"]
    split_file = root / "dtd" / "split_zhou_DescribableTextures.json"
    split = json.loads(split_file.read_text())
    split_file.write_text(json.dumps({**split, "test": split["test"][1:]}))
    r = cli(*args)
    assert r.returncode == 1 and "trained coop" not in r.stderr, r.stderr[-2000:]
    assert json.loads(target.read_text())["num_images"] == before - 1
    assert "zeroshot dtd all" in r.stderr and "split_digest: " in r.stderr


def test_each_setting_trains_with_the_methods_reference_config(tmp_path):
    """MaPLe and PromptSRC have their own configs for the transfer source run, CoOp and PromptSRC for few-shot;
    a source run whose config differs from the few-shot run's gets its own folder (CoOp's too: its few-shot
    context is COOP.md's 16 random vectors, its source run keeps "a photo of a"), and the user's --set comes last."""
    out = tmp_path / "runs"

    def plan(overrides):
        p = make_plan(["xd", "dg", "fewshot"], ["imagenet", "dtd", "imagenet_a"], ["coop", "kgcoop", "maple", "promptsrc"], [1],
                      root=tmp_path, output=out, shots=16, fewshot_shots=[1, 16], source="imagenet", clip="c",
                      pretrained=None, cache_dir=tmp_path, mllm=None, overrides=overrides)
        return {p.relative_to(out).parent.as_posix(): job for p, job in p.jobs.items()}

    jobs = plan(["optim.batch_size=8"])
    everywhere = {(None, "all"), ("dtd", "all"), ("imagenet_a", "all")}
    assert set(jobs["imagenet/kgcoop/all_shots16"].evals) == everywhere  # one run: few-shot and source alike
    assert "imagenet/kgcoop/transfer_shots16" not in jobs
    for method in ("coop", "maple", "promptsrc"):
        assert set(jobs[f"imagenet/{method}/transfer_shots16"].evals) == everywhere
        assert jobs[f"imagenet/{method}/all_shots16"].evals == [(None, "all")]
    config = {folder: job.spec.config for folder, job in jobs.items()}
    maple = config["imagenet/maple/transfer_shots16"]
    assert (maple["optim"]["epochs"], maple["optim"]["lr"], maple["method"]["depth"]) == (2, 0.0026, 3)
    assert (config["imagenet/maple/all_shots16"]["optim"]["epochs"], config["imagenet/maple/all_shots16"]["method"]
            ["depth"]) == (5, 9)
    src = config["imagenet/promptsrc/transfer_shots16"]["method"]
    assert (src["depth_text"], src["depth_vision"], src["gpa_mean"], src["gpa_std"]) == (3, 3, 6, 10)
    for dataset, gpa in (("imagenet", (30, 30)), ("dtd", (45, 5))):
        few = config[f"{dataset}/promptsrc/all_shots16"]
        assert (few["optim"]["epochs"], few["method"]["gpa_mean"], few["method"]["gpa_std"]) == (50, *gpa)
    for folder, epochs in (("imagenet/coop/all_shots16", 50), ("dtd/coop/all_shots16", 200),
                           ("dtd/coop/all_shots1", 50), ("imagenet/coop/all_shots1", 50)):
        assert config[folder]["optim"]["epochs"] == epochs, folder  # COOP.md's schedule per shot count
        assert (config[folder]["method"]["n_ctx"], config[folder]["method"]["ctx_init"]) == (16, ""), folder
    source = config["imagenet/coop/transfer_shots16"]
    assert (source["optim"]["epochs"], source["method"]["n_ctx"], source["method"]["ctx_init"]) == (50, 4, "a photo of a")
    assert config["dtd/kgcoop/all_shots16"]["method"]["ctx_init"] == "a photo of a"  # KgCoOp's own context
    b2n = {d: load_config("coop", protocol="b2n", dataset=d).optim.epochs for d in ("imagenet", "dtd")}
    assert b2n == {"imagenet": 50, "dtd": 200}  # CoCoOp's base2new script: vit_b16_ep50_ctxv1 for CoOp on ImageNet
    assert load_config("kgcoop", protocol="b2n", dataset="imagenet").optim.epochs == 100  # KgCoOp's own
    assert config["dtd/kgcoop/all_shots1"]["optim"]["epochs"] == 100  # KgCoOp's own, not CoOp's
    assert all(c["optim"]["batch_size"] == 8 for c in config.values())
    assert plan(["optim.epochs=1"])["imagenet/maple/transfer_shots16"].spec.config["optim"]["epochs"] == 1


def test_the_datasets_a_setting_reads_when_none_or_all_are_named(tmp_path):
    """Left out, --datasets means DTD for b2n and few-shot and every target for xd and dg ('all': every dataset
    of each); named datasets that hold none of a setting's are refused on one line, never replaced."""
    def evals(settings, datasets):
        p = make_plan(settings, datasets, ["coop"], [1], root=tmp_path, output=tmp_path / "runs", shots=16,
                      fewshot_shots=[16], source="imagenet", clip="c", pretrained=None, cache_dir=tmp_path, mllm=None)
        return {job.spec.dataset: [d for d, _ in job.evals if d] for job in p.jobs.values()}

    assert evals(["xd", "dg"], None) == {"imagenet": TRANSFER_TARGETS + DOMAIN_TARGETS}
    assert evals(["b2n"], None) == {"dtd": []}
    assert set(evals(["b2n"], BASE_TO_NOVEL + DOMAIN_TARGETS)) == set(BASE_TO_NOVEL)
    assert evals(["dg"], ["imagenet_r", "dtd", "imagenetv2"]) == {"imagenet": ["imagenetv2", "imagenet_r"]}
    with pytest.raises(UserError, match="unknown dataset 'eurost'"):
        evals(["b2n"], ["dtd", "eurost"])  # before any work
    with pytest.raises(UserError, match="--setting dg tests on imagenetv2, .*; --datasets names none of them"):
        evals(["dg"], ["dtd"])
    with pytest.raises(UserError, match="--setting fewshot trains on its datasets, and imagenet_a are test-only"):
        evals(["fewshot"], ["imagenet_a"])
    plan = make_plan(["xd"], None, ["coop"], [1], root=tmp_path, output=tmp_path / "runs", shots=16, fewshot_shots=[16],
                     source="dtd", clip="c", pretrained=None, cache_dir=tmp_path, mllm=None)
    (job,) = plan.jobs.values()  # another source is not its own target: its own test is the source column
    assert [d for d, _ in job.evals if d] == [t for t in TRANSFER_TARGETS if t != "dtd"]


def test_train_transfer_uses_the_source_config_and_its_own_folder(data, tiny_clip, tmp_path):
    out = tmp_path / "runs"
    r = cli("train", "--dataset", "imagenet", "--method", "maple", "--subsample", "all", "--transfer", "--shots", "1",
            "--set", "optim.batch_size=8", *common(tiny_clip, data, out))
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((out / "imagenet" / "maple" / "transfer_shots1" / "seed1" / "run.json").read_text())
    assert (record["protocol"], record["config"]["optim"]["epochs"], record["config"]["method"]["depth"]) == (
        "transfer", 2, 3)
    r = cli("eval", "--run", out / "imagenet" / "maple" / "transfer_shots1" / "seed1", "--root", data, "--workers", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_results(out / "imagenet/maple/transfer_shots1/seed1/results_all.json")["setting"] == "transfer"
    assert_one_line(cli("train", "--dataset", "imagenet", "--method", "maple", "--transfer", *common(tiny_clip, data, out)),
                    "needs --subsample all")
