"""`mugcp report`: every setting's table from hand-made results JSON with known means, HM from seed
averages, missing runs listed, files written."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import cli
from mugcp.core.coop_datasets import DOMAIN_TARGETS, TRANSFER_TARGETS
from mugcp.core.errors import UserError
from mugcp.core.files import write_json_atomic
from mugcp.core.protocol import harmonic_mean
from mugcp.trainer.config import load_config
from mugcp.trainer.report import BEYOND_SPREAD, PUBLISHED_TRANSFER, ablation_rows, build_table, variant_of, write_report
from mugcp.trainer.results import results_path, write_results


def record(path, *, dataset, method, split, seed, accuracy, setting, source=None, shots=16, subsample="base",
           config=None):
    write_results(path, dataset=dataset, model="ViT-B-16", pretrained="openai", task="prompt_classification",
                  metrics={"acc1": accuracy / 100}, method=method, setting=setting, source=source, split=split,
                  seed=seed, accuracy=accuracy, num_images=10, shots=shots, subsample=subsample, config=config)


def fake_run(runs, dataset, method, seed, base=None, novel=None, finished=True, overrides=(), shots=16):
    config = load_config(method, None, list(overrides)).to_dict()
    d = runs / dataset / method / f"b2n_shots{shots}" / f"seed{seed}"
    write_json_atomic(d / "run.json", {"dataset": dataset, "method": method, "seed": seed, "subsample": "base",
                                       "shots": shots, "config": config})
    if finished:
        (d / "prompt.safetensors").write_bytes(b"x")
    for split, acc in (("base", base), ("novel", novel)):
        if acc is not None:
            record(results_path(d, split), dataset=dataset, method=method, split=split, seed=seed, accuracy=acc,
                   setting="b2n", source=dataset, shots=shots, config=config)


def test_hm_is_from_seed_averages(tmp_path):
    accs = {1: (90.0, 10.0), 2: (50.0, 90.0), 3: (70.0, 50.0)}
    for seed, (b, n) in accs.items():
        fake_run(tmp_path, "dtd", "coop", seed, b, n)
    rows, problems = build_table(tmp_path)
    row = next(r for r in rows if r["dataset"] == "dtd")
    assert row["base"] == pytest.approx(70.0) and row["novel"] == pytest.approx(50.0)
    assert row["hm"] == pytest.approx(harmonic_mean(70.0, 50.0))
    mean_of_hms = np.mean([harmonic_mean(b, n) for b, n in accs.values()])
    assert abs(row["hm"] - mean_of_hms) > 1  # the two readings really differ here
    assert row["base_std"] == pytest.approx(np.std([90, 50, 70]))
    assert problems == []


def test_missing_and_incomplete_runs_are_listed(tmp_path):
    """The seeds a sweep was asked for are not known here: the papers' seeds are named as theirs, never as missing."""
    fake_run(tmp_path, "dtd", "maple", 1, 80.0, 60.0)
    fake_run(tmp_path, "dtd", "maple", 2, 81.0)  # no novel result
    fake_run(tmp_path, "eurosat", "maple", 1, finished=False)
    fake_run(tmp_path, "eurosat", "coop", 2)  # trained, never evaluated
    rows, problems = build_table(tmp_path)
    text = "\n".join(problems)
    never = tmp_path / "eurosat" / "coop" / "b2n_shots16" / "seed2"
    assert f"eurosat coop seed 2: trained, never evaluated (run `mugcp eval --run {never} --split ...`)" in text
    run = tmp_path / "dtd" / "maple" / "b2n_shots16" / "seed2"
    assert f"dtd maple seed 2: no novel result (run `mugcp eval --run {run} --split novel`)" in text
    assert "dtd maple: seeds present: 1, 2; the papers' protocol uses 1, 2, 3" in text
    assert "seed 3" not in text
    assert "eurosat maple seed 1: training not finished" in text
    dtd = next(r for r in rows if r["dataset"] == "dtd")
    assert dtd["seeds"] == 1 and dtd["base"] == 80.0
    avg = next(r for r in rows if r["dataset"].startswith("average"))
    assert avg["dataset"] == "average (1/11)"


def test_report_files_and_cli(tmp_path):
    for ds, b, n in (("dtd", 80.0, 50.0), ("eurosat", 90.0, 70.0)):
        for seed in (1, 2, 3):
            fake_run(tmp_path, ds, "kgcoop", seed, b + seed, n - seed)
    r = cli("report", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| dtd | kgcoop | 3 | 82.00 ± 0.82 | 48.00 ± 0.82 |" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "report_b2n.csv")))
    avg = next(x for x in rows if x["dataset"].startswith("average"))
    assert float(avg["base"]) == pytest.approx(87.0) and float(avg["novel"]) == pytest.approx(58.0)
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fewshot_table_and_curve(tmp_path):
    expected = {}
    for shots in (1, 2):
        for seed in (1, 2, 3):
            acc = 40.0 + 10 * shots + seed
            expected.setdefault(shots, []).append(acc)
            run = tmp_path / "dtd" / "coop" / f"all_shots{shots}" / f"seed{seed}"
            (run / "prompt.safetensors").parent.mkdir(parents=True, exist_ok=True)
            record(results_path(run, "all"), dataset="dtd", method="coop", split="all", seed=seed, accuracy=acc,
                   setting="fewshot", source="dtd", shots=shots, subsample="all")
    record(results_path(tmp_path / "dtd" / "zeroshot" / "seed1", "all"), dataset="dtd", method="zeroshot",
           split="all", seed=1, accuracy=33.0, setting="zeroshot", shots=0)
    md, paths = write_report(tmp_path)
    for shots, accs in expected.items():
        assert f"{np.mean(accs):.2f} ± {np.std(accs):.2f}" in md
    assert "| zeroshot | 33.00 (no training) |" in md and "## Few-shot learning" in md
    assert "seeds present" not in md  # seeds 1, 2, 3 throughout
    rows = list(csv.DictReader(open(tmp_path / "report_fewshot.csv")))
    assert {(r["method"], r["shots"]) for r in rows} == {("coop", "1"), ("coop", "2"), ("zeroshot", "0")}
    assert tmp_path / "report.png" in paths
    run = tmp_path / "dtd" / "coop" / "all_shots4" / "seed2"
    record(results_path(run, "all"), dataset="dtd", method="coop", split="all", seed=2, accuracy=80.0,
           setting="fewshot", source="dtd", shots=4, subsample="all")
    md, _ = write_report(tmp_path)
    assert "- dtd coop 4 shots: seeds present: 2; the papers' protocol uses 1, 2, 3" in md


def transfer_runs(runs, setting, targets):
    """maple trained on ImageNet (seeds 1, 2) and evaluated on `targets`; {target: accuracies}."""
    means = {}
    for seed in (1, 2):
        run = runs / "imagenet" / "maple" / "all_shots16" / f"seed{seed}"
        record(results_path(run, "all"), dataset="imagenet", method="maple", split="all", seed=seed,
               accuracy=70.0 + seed, setting="fewshot", source="imagenet", subsample="all")
        for i, target in enumerate(targets):
            acc = 50.0 + 10 * i + seed
            means.setdefault(target, []).append(acc)
            record(results_path(run, "all", target), dataset=target, method="maple", split="all", seed=seed,
                   accuracy=acc, setting=setting, source="imagenet", subsample="all")
    return means


@pytest.mark.parametrize("setting, targets", [("xd", ["dtd", "eurosat"]), ("dg", ["imagenet_a", "imagenetv2"])])
def test_transfer_tables(tmp_path, setting, targets):
    means = transfer_runs(tmp_path, setting, targets)
    md, _ = write_report(tmp_path)
    average = np.mean([np.mean(v) for v in means.values()])
    title = {"xd": "## Cross-dataset transfer", "dg": "## Domain generalisation"}[setting]
    section = md.split(title)[1].split("## ")[0].splitlines()
    header = next(line for line in section if line.startswith("| Method | imagenet (source)"))
    assert header.split(" | ")[2:-1] == sorted(targets, key=(TRANSFER_TARGETS + DOMAIN_TARGETS).index)  # papers' order
    row = next(line for line in section if line.startswith("| maple |"))
    assert row == ("| maple | 71.50 ± 0.50 | " + " | ".join(f"{np.mean(means[t]):.2f} ± 0.50"
                                                            for t in header.split(" | ")[2:-1]) +
                   f" | {average:.2f} |")
    assert list(csv.DictReader(open(tmp_path / f"report_{setting}.csv")))[0]["average"] == f"{average:.4f}"
    assert f"- {setting} from imagenet: maple: seeds present: 1, 2; the papers' protocol uses 1, 2, 3" in md


def test_runs_of_two_sources_are_never_averaged(tmp_path):
    """The same method and seed trained on ImageNet and on DTD, both tested on ImageNet-R: a table per source."""
    for source, acc in (("imagenet", 87.5), ("dtd", 83.25)):
        run = tmp_path / source / "coop" / "all_shots16" / "seed1"
        record(results_path(run, "all"), dataset=source, method="coop", split="all", seed=1, accuracy=60.0,
               setting="fewshot", source=source, subsample="all")
        record(results_path(run, "all", "imagenet_r"), dataset="imagenet_r", method="coop", split="all", seed=1,
               accuracy=acc, setting="dg", source=source, subsample="all")
    md, _ = write_report(tmp_path)
    section = md.split("## Domain generalisation")[1].splitlines()
    first, second = section.index("Trained on imagenet:"), section.index("Trained on dtd:")
    assert first < second and "| coop | 60.00 | 87.50 | 87.50 |" in section[first:second]
    assert "| coop | 60.00 | 83.25 | 83.25 |" in section[second:] and "85.38" not in md
    rows = list(csv.DictReader(open(tmp_path / "report_dg.csv")))
    assert [(r["source"], r["imagenet_r"]) for r in rows] == [("imagenet", "87.5000"), ("dtd", "83.2500")]


# Targets whose alphabetical order differs from the papers' (the published tables' and the report's), and the
# published MaPLe row in the report's order: ImageNet, the targets, the average over all targets.
@pytest.mark.parametrize("setting, targets, n, maple", [
    ("xd", ["dtd", "oxford_pets"], 10, "| MaPLe | 70.72 | 90.49 | 46.49 | 66.30 |"),
    ("dg", ["imagenet_a", "imagenetv2"], 4, "| MaPLe | 70.72 | 64.07 | 50.90 | 60.26 |")])
def test_published_transfer_rows_follow_the_report_columns(tmp_path, setting, targets, n, maple):
    transfer_runs(tmp_path, setting, targets)
    md, _ = write_report(tmp_path)
    title = {"xd": "## Cross-dataset transfer", "dg": "## Domain generalisation"}[setting]
    section = md.split(title)[1].split("## ")[0].splitlines()
    mine = section.index(next(line for line in section if line.startswith("| Method |")))
    start = next(i for i, line in enumerate(section) if line.startswith("Published (ViT-B/16, 16 shots, source: "))
    assert start > mine
    header = section[start + 2]
    assert header.split(" | ")[:-1] == section[mine].split(" | ")[:-1] == ["| Method", "imagenet (source)",
                                                                             *reversed(targets)]
    assert header.endswith(f"| Average ({n} targets) |")
    assert maple in section[start:]
    assert ("| PromptSRC | - | - | - | 65.81 |" in section) == (setting == "xd")


def test_published_transfer_rows_are_consistent():
    """Keys are dataset names; a full row's average is its targets' mean (within 0.02: the sources round loosely)."""
    for setting, rows in PUBLISHED_TRANSFER.items():
        targets = TRANSFER_TARGETS if setting == "xd" else DOMAIN_TARGETS
        for method, row in rows.items():
            assert set(row) <= {"imagenet", "average", *targets}, (setting, method)
            if len(row) > 1:
                assert set(row) == {"imagenet", "average", *targets}
                assert row["average"] == pytest.approx(np.mean([row[t] for t in targets]), abs=0.02), (setting, method)


def test_report_on_empty_folder_is_an_error(tmp_path):
    r = cli("report", tmp_path)
    assert r.returncode == 2 and "no results under" in r.stderr
    with pytest.raises(UserError, match="runs folder not found"):
        write_report(tmp_path / "none")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="a-file is a file, not a runs folder"):
        write_report(tmp_path / "a-file")


def test_variants_get_their_own_rows_and_an_ablation_table(tmp_path):
    """A control or an ablation never mixes with the default runs of its method, nor does another schedule (optim
    changes: a row of their own, but no ablation)."""
    for seed in (1, 2, 3):
        fake_run(tmp_path / "main", "dtd", "mugcp", seed, 80.0 + seed, 60.0)
        fake_run(tmp_path / "short", "dtd", "mugcp", seed, 30.0, 20.0, overrides=["optim.epochs=2"])
        fake_run(tmp_path / "ctl", "dtd", "mugcp", seed, 70.0, 50.0 + seed, overrides=["conditions.scp=shuffled"])
        fake_run(tmp_path / "abl", "dtd", "mugcp", seed, 75.0, 55.0, overrides=["method.amg=false", "method.n_vcp=2"])
    rows, problems = build_table(tmp_path)
    dtd = {(r["variant"], r["schedule"]): r for r in rows if r["dataset"] == "dtd"}
    assert set(dtd) == {("", ""), ("", "optim.epochs=2"), ("conditions.scp=shuffled", ""),
                        ("method.amg=false, method.n_vcp=2", "")} and not problems
    dtd = {r["variant"]: r for r in rows if r["dataset"] == "dtd" and not r["schedule"]}
    assert dtd[""]["base"] == pytest.approx(82.0) and dtd["conditions.scp=shuffled"]["novel"] == pytest.approx(52.0)
    ablation = {r["variant"]: r for r in ablation_rows(rows) if r["dataset"] == "dtd"}
    assert set(ablation) == {"conditions.scp=shuffled", "method.amg=false, method.n_vcp=2"}
    assert ablation["conditions.scp=shuffled"]["d_novel"] == pytest.approx(-8.0)
    assert ablation["conditions.scp=shuffled"]["d_base"] == pytest.approx(-12.0)
    md, _ = write_report(tmp_path)
    assert "| dtd | mugcp [conditions.scp=shuffled] | 3 | 70.00 ± 0.00 | 52.00 ± 0.82 |" in md
    assert "| dtd | mugcp | conditions.scp=shuffled | 3 |" in md and "| -12.00* | -8.00* |" in md
    assert "| dtd | mugcp [optim.epochs=2] | 3 | 30.00 ± 0.00 | 20.00 ± 0.00 |" in md
    assert variant_of("mugcp", None) == "" and variant_of("no-such-method", {"method": {"x": 1}}) == ""


def test_the_ablation_table_marks_differences_beyond_the_seeds_spread(tmp_path):
    """A control's difference counts only beyond the seeds' spread (the mean ± std intervals apart): starred so,
    never with one seed."""
    for seed in (1, 2, 3):
        fake_run(tmp_path / "main", "dtd", "mugcp", seed, 80.0 + seed, 60.0)
        fake_run(tmp_path / "near", "dtd", "mugcp", seed, 81.0 + seed, 60.0 + seed, overrides=["conditions.scp=shuffled"])
    fake_run(tmp_path / "one", "dtd", "mugcp", 1, 50.0, 50.0, overrides=["method.amg=false"])
    rows, _ = build_table(tmp_path)
    ablation = {r["variant"]: r for r in ablation_rows(rows) if r["dataset"] == "dtd"}
    near = ablation["conditions.scp=shuffled"]
    assert near["d_base"] == pytest.approx(1.0) and near["beyond_base"] is False  # 83 ± 0.82 against 82 ± 0.82
    assert near["d_novel"] == pytest.approx(2.0) and near["beyond_novel"] is True  # 62 ± 0.82 against 60
    assert ablation["method.amg=false"]["beyond_base"] is None  # one seed: no spread to judge by
    md, _ = write_report(tmp_path)
    assert "| +1.00 | +2.00* |" in md and "| -32.00 | -10.00 |" in md and BEYOND_SPREAD in md


def test_a_transfer_source_run_of_its_own_fills_the_source_column(tmp_path):
    """MaPLe's ImageNet source run for xd (its cross-dataset config, folder transfer_shots16) is not its
    few-shot run: the xd table's source column is the transfer run's own test, the few-shot table keeps the
    few-shot runs, and neither is a variant (each config is the reference's for its setting)."""
    transfer = load_config("maple", None, protocol="transfer", dataset="imagenet").to_dict()
    fewshot = load_config("maple", None, protocol="fewshot", dataset="imagenet").to_dict()
    assert transfer != fewshot
    for seed in (1, 2):
        run = tmp_path / "imagenet" / "maple" / "transfer_shots16" / f"seed{seed}"
        record(results_path(run, "all"), dataset="imagenet", method="maple", split="all", seed=seed,
               accuracy=60.0 + seed, setting="transfer", source="imagenet", subsample="all", config=transfer)
        record(results_path(run, "all", "dtd"), dataset="dtd", method="maple", split="all", seed=seed,
               accuracy=40.0 + seed, setting="xd", source="imagenet", subsample="all", config=transfer)
        for shots in (4, 16):
            run = tmp_path / "imagenet" / "maple" / f"all_shots{shots}" / f"seed{seed}"
            record(results_path(run, "all"), dataset="imagenet", method="maple", split="all", seed=seed,
                   accuracy=shots + seed, setting="fewshot", source="imagenet", shots=shots, subsample="all",
                   config=fewshot)
    md, _ = write_report(tmp_path)
    xd = md.split("## Cross-dataset transfer")[1].split("## ")[0]
    assert "| maple | 61.50 ± 0.50 | 41.50 ± 0.50 | 41.50 |" in xd, xd
    few = md.split("## Few-shot learning")[1].split("## ")[0]
    assert "| maple | 5.50 ± 0.50 | 17.50 ± 0.50 |" in few, few
    assert "[" not in md.split("Published")[0]  # no variant rows


def test_variants_are_judged_against_the_reference_config_of_their_setting():
    src = load_config("promptsrc", None, protocol="fewshot", dataset="dtd").to_dict()
    assert variant_of("promptsrc", src, "fewshot", "dtd") == ""
    assert variant_of("promptsrc", src, "fewshot", "imagenet") == "method.gpa_mean=45.0, method.gpa_std=5.0"
    assert variant_of("promptsrc", src, "b2n", "dtd") == "method.gpa_mean=45.0, method.gpa_std=5.0"


def fewshot_run(runs, dataset, method, shots, seed, accuracies, overrides=()):
    """A few-shot run (`--subsample all`) with its reference config for `shots`, then `overrides`, evaluated on
    the splits of `accuracies` ({split: accuracy})."""
    config = load_config(method, None, list(overrides), protocol="fewshot", dataset=dataset, shots=shots).to_dict()
    run = runs / dataset / method / f"all_shots{shots}" / f"seed{seed}"
    for split, acc in accuracies.items():
        record(results_path(run, split), dataset=dataset, method=method, split=split, seed=seed, accuracy=acc,
               setting="fewshot", source=dataset, shots=shots, subsample="all", config=config)
    return run


def test_a_fewshot_cell_takes_one_all_classes_value_per_seed(tmp_path):
    """A few-shot run also evaluated on its base and novel classes: those are not few-shot results."""
    fewshot_run(tmp_path, "dtd", "coop", 16, 1, {"all": 70.0, "base": 80.0, "novel": 81.2})
    fewshot_run(tmp_path, "dtd", "coop", 16, 2, {"all": 72.0, "base": 82.0})
    md, _ = write_report(tmp_path)
    few = md.split("## Few-shot learning")[1]
    assert "| coop | 71.00 ± 1.00 |" in few, few
    assert "## Base-to-novel" not in md
    assert list(csv.DictReader(open(tmp_path / "report_fewshot.csv")))[0]["seeds"] == "2"


def test_other_shots_or_settings_are_never_averaged(tmp_path):
    """Each configuration (shots, any changed config key) is a row of its own, named by what it changes; the
    shots are said where the published rows are 16-shot ones."""
    fake_run(tmp_path, "dtd", "coop", 1, 50.0, 40.0, overrides=["optim.epochs=2"], shots=2)
    fake_run(tmp_path, "dtd", "coop", 1, 80.0, 60.0)
    fake_run(tmp_path, "dtd", "coop", 2, 82.0, 62.0)
    fewshot_run(tmp_path, "dtd", "coop", 2, 1, {"all": 60.0})
    fewshot_run(tmp_path, "dtd", "coop", 2, 2, {"all": 40.0}, overrides=["optim.lr=0.1"])
    transfer_runs(tmp_path, "xd", ["eurosat"])
    transfer = load_config("maple", None, protocol="transfer", dataset="imagenet", shots=4).to_dict()
    for seed in (1, 2):  # a 4-shot source run (`sweep --setting xd --shots 4`), on the same target
        run = tmp_path / "imagenet" / "maple" / "transfer_shots4" / f"seed{seed}"
        for dataset, setting, acc in (("imagenet", "transfer", 60.0), ("eurosat", "xd", 30.0)):
            record(results_path(run, "all", None if dataset == "imagenet" else dataset), dataset=dataset,
                   method="maple", split="all", seed=seed, accuracy=acc, setting=setting, source="imagenet", shots=4,
                   subsample="all", config=transfer)
    md, _ = write_report(tmp_path)
    b2n, few, xd = (md.split(title)[1].split("## ")[0] for title in ("## Base", "## Few-shot", "## Cross"))
    assert "| dtd | coop | 2 | 81.00 ± 1.00 | 61.00 ± 1.00 |" in b2n, b2n
    assert "| dtd | coop [2 shots, optim.epochs=2] | 1 | 50.00 | 40.00 |" in b2n, b2n
    assert "| coop | 60.00 |" in few and "| coop [optim.lr=0.1] | 40.00 |" in few, few
    assert "| maple | 71.50 ± 0.50 | 51.50 ± 0.50 | 51.50 |" in xd and "| maple [4 shots] | 60.00 ± 0.00 | 30.00 ± 0.00 |" \
        in xd, xd


def test_results_claiming_one_cell_are_listed_and_left_out(tmp_path):
    """Two runs folders under one: two results of one configuration and seed; the report cannot tell which is right."""
    for seed in (1, 2):
        fake_run(tmp_path / "a", "dtd", "coop", seed, 80.0 + seed, 60.0)
    fake_run(tmp_path / "b", "dtd", "coop", 1, 50.0, 60.0)
    rows, problems = build_table(tmp_path)
    dtd = next(r for r in rows if r["dataset"] == "dtd")
    assert dtd["seeds"] == 1 and dtd["base"] == 82.0
    lines = [p for p in problems if "2 results of one configuration" in p]
    assert len(lines) == 2 and all(str(tmp_path / "a") in p and str(tmp_path / "b") in p for p in lines), problems
    assert "dtd coop seed 1 base (b2n): 2 results of one configuration, none used: " in lines[0]


def test_one_seed_shows_no_spread(tmp_path):
    fake_run(tmp_path, "dtd", "kgcoop", 1, 80.0, 60.0)
    fewshot_run(tmp_path, "dtd", "kgcoop", 4, 1, {"all": 70.0})
    md, _ = write_report(tmp_path)
    assert "| dtd | kgcoop | 1 | 80.00 | 60.00 | 68.57 |" in md and "| kgcoop | 70.00 |" in md
    assert "±" not in md.split("\n", 1)[1], md  # the legend's alone


def test_runs_of_other_clips_or_mllms_are_rows_of_their_own(tmp_path):
    """Two backbones, or SCP from two MLLMs, in one report: rows named by what differs, never averaged (one CLIP and
    one MLLM: no such names)."""
    def result(folder, seed, split, accuracy, clip, mllm):
        write_results(results_path(tmp_path / folder / f"seed{seed}", split), dataset="dtd", model=clip,
                      pretrained="openai", task="prompt_classification", metrics={}, method="mugcp", setting="b2n",
                      source="dtd", split=split, seed=seed, accuracy=accuracy, num_images=10, shots=16,
                      subsample="base", clip=clip, config=load_config("mugcp").to_dict(),
                      conditions={"scp": {"mllm": mllm, "prompt_version": "scp-v1"}})

    for seed in (1, 2):
        for split in ("base", "novel"):
            result("b16-qwen", seed, split, 80.0, "ViT-B-16", "Qwen2-VL-7B")
            result("b16-llava", seed, split, 70.0, "ViT-B-16", "llava-1.5-7b")
    rows, problems = build_table(tmp_path)
    named = {r["models"]: r["base"] for r in rows if r["dataset"] == "dtd"}
    assert named == {"SCP Qwen2-VL-7B/scp-v1": 80.0, "SCP llava-1.5-7b/scp-v1": 70.0}
    assert not any("none used" in p for p in problems), problems
    for seed in (1, 2):
        for split in ("base", "novel"):
            result("l14-qwen", seed, split, 90.0, "ViT-L-14", "Qwen2-VL-7B")
    rows, _ = build_table(tmp_path)
    assert {r["models"]: r["base"] for r in rows if r["dataset"] == "dtd"} == {
        "ViT-B-16, SCP Qwen2-VL-7B/scp-v1": 80.0, "ViT-B-16, SCP llava-1.5-7b/scp-v1": 70.0,
        "ViT-L-14, SCP Qwen2-VL-7B/scp-v1": 90.0}
    md, _ = write_report(tmp_path)
    assert "| dtd | mugcp [ViT-L-14, SCP Qwen2-VL-7B/scp-v1] | 2 | 90.00 ± 0.00 |" in md
    for folder in ("b16-llava", "l14-qwen"):
        for path in (tmp_path / folder).rglob("*.json"):
            path.unlink()
    rows, _ = build_table(tmp_path)
    assert [r["models"] for r in rows if r["dataset"] == "dtd"] == [""]


def test_results_that_belong_to_no_table_are_named(tmp_path):
    """A base-to-novel run tested on all classes, or a transfer source run with no target tested, fills no cell:
    the report names those results instead of dropping them unsaid."""
    fake_run(tmp_path, "dtd", "coop", 1, 70.0, 60.0)
    run = tmp_path / "dtd" / "coop" / "b2n_shots16" / "seed1"
    record(results_path(run, "all"), dataset="dtd", method="coop", split="all", seed=1, accuracy=65.0,
           setting="b2n", source="dtd")
    md, _ = write_report(tmp_path)
    assert f"In no table (1 result(s) of no setting shown here):\n\n- {results_path(run, 'all')}" in md
    assert "no table" not in md.split("In no table")[0]  # not among the missing runs
    source = tmp_path / "imagenet" / "maple" / "transfer_shots16" / "seed1"
    config = load_config("maple", None, protocol="transfer", dataset="imagenet").to_dict()
    record(results_path(source, "all"), dataset="imagenet", method="maple", split="all", seed=1, accuracy=70.0,
           setting="transfer", source="imagenet", subsample="all", config=config)
    assert "In no table (2 result(s)" in write_report(tmp_path)[0]
    record(results_path(source, "all", "dtd"), dataset="dtd", method="maple", split="all", seed=1, accuracy=40.0,
           setting="xd", source="imagenet", subsample="all", config=config)
    assert "In no table (1 result(s)" in write_report(tmp_path)[0]  # the source now fills its column


@pytest.mark.parametrize("edit", [{"accuracy": 1e9}, {"accuracy": -5.0}, {"accuracy": 12.0}])
def test_an_accuracy_that_is_no_percentage_or_not_its_count_is_left_out(tmp_path, edit):
    """A results file whose accuracy is outside 0-100, or disagrees with its own metrics.acc1 (both are written from
    one count), was not written by an evaluation: it is named as damaged, never averaged."""
    import json

    for seed in (1, 2, 3):
        fake_run(tmp_path, "dtd", "coop", seed, 70.0 + seed, 60.0)
    path = results_path(tmp_path / "dtd" / "coop" / "b2n_shots16" / "seed1", "base")
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    md, _ = write_report(tmp_path)
    assert f"{path}: damaged results file, left out" in md
    assert "| 72.50 ± 0.50 | 60.00 ± 0.00 |" in md  # seeds 2 and 3 alone


def test_a_report_that_cannot_be_written_whole_writes_nothing(tmp_path):
    for seed in (1, 2, 3):
        fake_run(tmp_path, "dtd", "coop", seed, 70.0, 60.0)
    out = tmp_path / "out"
    (out / "report.png").mkdir(parents=True)
    with pytest.raises(UserError, match="cannot write .*report.png: it is a folder"):
        write_report(tmp_path, out)
    assert sorted(p.name for p in out.iterdir()) == ["report.png"]


def test_a_test_time_control_keeps_to_its_own_row_in_the_transfer_tables(tmp_path):
    """A source run tested on its source and a target, each with real SCP and with the shuffled control: the
    source column of each row holds that row's own tests only, never the mean of the run's and its control's."""
    config = load_config("mugcp", None, protocol="transfer", dataset="imagenet").to_dict()
    for seed in (1, 2):
        run = tmp_path / "imagenet" / "mugcp" / "transfer_shots16" / f"seed{seed}"
        for control, source_acc, target_acc in ((None, 70.0, 50.0), ("shuffled", 10.0, 20.0)):
            extra = {"test_conditions": {"scp": control}} if control else {}
            for dataset, acc, setting in (("imagenet", source_acc, "transfer"), ("dtd", target_acc, "xd")):
                write_results(results_path(run, "all", None if dataset == "imagenet" else dataset, control),
                              dataset=dataset, model="ViT-B-16", pretrained="openai", task="prompt_classification",
                              metrics={}, method="mugcp", setting=setting, source="imagenet", split="all",
                              seed=seed, accuracy=acc + seed, num_images=10, shots=16, subsample="all",
                              config=config, **extra)
    xd = write_report(tmp_path)[0].split("## Cross-dataset transfer")[1].split("Published")[0]
    assert "| mugcp | 71.50 ± 0.50 | 51.50 ± 0.50 | 51.50 |" in xd, xd
    assert "| mugcp [test conditions.scp=shuffled] | 11.50 ± 0.50 | 21.50 ± 0.50 | 21.50 |" in xd, xd


def test_results_of_weights_the_run_folder_no_longer_holds_are_left_out(tmp_path):
    """A run trained again (another config, or the same config to other weights) after it was evaluated: its old
    results describe weights that are gone, so they are listed with the command that measures the new ones."""
    import torch

    from mugcp.trainer.checkpoints import save_tensors
    from mugcp.trainer.results import weights_digest

    for seed in (1, 2):
        fake_run(tmp_path, "dtd", "coop", seed, 70.0, 60.0)
    retrained = tmp_path / "dtd" / "coop" / "b2n_shots16" / "seed2"
    write_json_atomic(retrained / "run.json", {"dataset": "dtd", "method": "coop", "seed": 2, "subsample": "base",
                                               "shots": 16, "config": load_config("coop", None, [
                                                   "optim.epochs=3"]).to_dict()})
    epochs = load_config("coop").optim.epochs
    md, _ = write_report(tmp_path)
    assert f"{results_path(retrained, 'novel')}: measured on weights {retrained} no longer holds " \
           f"(config.optim.epochs: {epochs} -> 3), left out (run `mugcp eval --run {retrained} --split novel` " \
           f"again)" in md, md
    assert "| dtd | coop | 1 | 70.00 | 60.00 |" in md and "never evaluated" not in md

    import json

    weighed = tmp_path / "dtd" / "coop" / "b2n_shots16" / "seed1"
    save_tensors(weighed / "prompt.safetensors", {"ctx": torch.zeros(2)})
    path = results_path(weighed, "base")
    path.write_text(json.dumps({**json.loads(path.read_text()), "weights_sha256": weights_digest(weighed)}))
    assert "| dtd | coop | 1 | 70.00 | 60.00 |" in write_report(tmp_path)[0]  # measured on the weights it holds
    save_tensors(weighed / "prompt.safetensors", {"ctx": torch.ones(2)})  # trained again, to other weights
    md, _ = write_report(tmp_path)
    assert f"{path}: measured on weights {weighed} no longer holds (weights: {weights_digest(weighed)[:12]}" not in md
    assert f"{path}: measured on weights {weighed} no longer holds (weights: " in md and "| dtd | coop |" not in md


def test_results_on_another_split_of_a_dataset_are_left_out(tmp_path):
    """Results measured on another split of one dataset (images added to a generated split, another copy of the
    data) measure other images: the split most results here used is kept, the others listed; a tie keeps none."""
    import json

    for seed in (1, 2, 3):
        fake_run(tmp_path, "dtd", "coop", seed, 70.0 + seed, 60.0)
    def on_split(seed, split, digest):
        path = results_path(tmp_path / "dtd" / "coop" / "b2n_shots16" / f"seed{seed}", split)
        path.write_text(json.dumps({**json.loads(path.read_text()), "split_digest": digest}))
        return path
    for seed in (1, 2, 3):
        for split in ("base", "novel"):
            on_split(seed, split, "a" * 16)
    odd = on_split(3, "base", "b" * 16)
    md, _ = write_report(tmp_path)
    assert f"{odd}: tested on split bbbbbbbbbbbb of dtd, while results here were tested on the splits " \
           f"aaaaaaaaaaaa (5 results), bbbbbbbbbbbb (1 result): left out" in md, md
    assert "| dtd | coop | 2 | 71.50 ± 0.50 | 60.00 ± 0.00 |" in md  # seed 3's base is not averaged in
    for seed, split in ((2, "base"), (2, "novel")):
        on_split(seed, split, "b" * 16)
    md, _ = write_report(tmp_path)  # three results on each split: none is used
    assert "## Base-to-novel" not in md and md.count("left out; evaluate every run on one copy") == 6


def test_a_run_evaluated_only_under_a_control_is_listed_as_not_evaluated(tmp_path):
    fake_run(tmp_path, "dtd", "mugcp", 1)
    run = tmp_path / "dtd" / "mugcp" / "b2n_shots16" / "seed1"
    for split in ("base", "novel"):
        write_results(results_path(run, split, None, "shuffled"), dataset="dtd", model="ViT-B-16", pretrained=None,
                      task="prompt_classification", metrics={}, method="mugcp", setting="b2n", source="dtd",
                      split=split, seed=1, accuracy=50.0, num_images=10, shots=16, subsample="base",
                      config=load_config("mugcp").to_dict(), test_conditions={"scp": "shuffled"})
    md, _ = write_report(tmp_path)
    assert f"dtd mugcp seed 1: trained, never evaluated (run `mugcp eval --run {run} --split ...`)" in md


def test_a_report_removes_the_tables_and_figure_an_earlier_report_wrote_that_it_no_longer_has(tmp_path):
    transfer_runs(tmp_path, "dg", ["imagenetv2"])
    write_report(tmp_path)
    assert (tmp_path / "report_dg.csv").is_file() and (tmp_path / "report.png").is_file()
    for path in (tmp_path / "imagenet").rglob("results_imagenetv2_all.json"):
        path.unlink()
    md, paths = write_report(tmp_path)
    assert not (tmp_path / "report_dg.csv").exists() and "## Domain" not in md
    assert (tmp_path / "report_fewshot.csv").is_file() and tmp_path / "report_fewshot.csv" in paths


def test_zero_shot_rows_of_two_clips_join_the_fewshot_and_transfer_tables(tmp_path):
    transfer_runs(tmp_path, "xd", ["dtd"])
    for folder, clip, acc in (("a", "ViT-B-16", 30.0), ("b", "ViT-L-14", 40.0)):
        for dataset in ("imagenet", "dtd"):
            write_results(results_path(tmp_path / folder / dataset / "zeroshot" / "seed1", "all"), dataset=dataset,
                          model=clip, pretrained="openai", task="zeroshot_classification", metrics={},
                          method="zeroshot", setting="zeroshot", source=None, split="all", seed=1, accuracy=acc,
                          num_images=10, clip=clip)
    md, _ = write_report(tmp_path)
    few = md.split("## Few-shot learning")[1].split("## ")[0]
    assert "| zeroshot [ViT-B-16] | 30.00 (no training) |" in few and "| zeroshot [ViT-L-14] | 40.00" in few, few
    xd = md.split("## Cross-dataset transfer")[1]
    assert "| zeroshot [ViT-L-14] | 40.00 | 40.00 | 40.00 |" in xd, xd
    assert "In no table" not in md


def test_run_folders_behind_links_are_read_once(tmp_path):
    runs, tree = tmp_path / "runs", tmp_path / "tree"
    for seed in (1, 2):
        fake_run(runs, "dtd", "coop", seed, 70.0 + seed, 60.0)
    tree.mkdir()
    (tree / "dtd").symlink_to(runs / "dtd")
    (runs / "dtd" / "loop").symlink_to(runs / "dtd")  # a link back up: read once, not forever
    rows, problems = build_table(tree)
    dtd = next(r for r in rows if r["dataset"] == "dtd")
    assert dtd["seeds"] == 2 and dtd["base"] == 71.5 and not any("none used" in p for p in problems), problems


def test_a_report_refused_half_way_leaves_every_earlier_file_as_it_was(tmp_path, monkeypatch):
    """report.md, its CSVs and its figure belong together: a disk that fills while they are written leaves the
    earlier report whole, never a new table beside an old figure."""
    import errno
    import os

    import mugcp.core.files as files

    transfer_runs(tmp_path, "dg", ["imagenetv2"])
    write_report(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("report*")}
    fake_run(tmp_path, "dtd", "coop", 1, 70.0, 60.0)  # a new table
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    with pytest.raises(UserError, match="No space left on device"):
        write_report(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("report*")} == before
    assert not list(tmp_path.glob(".report*"))  # no temporary file left
