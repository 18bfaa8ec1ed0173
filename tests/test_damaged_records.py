"""Files damaged outside mugcp (results, run records, checkpoints, history) and datasets that are missing: one
line, or a recorded and skipped item that a later command mends, never a traceback."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line, cli
from mugcp.world.synth import write_synthetic_dtd


@pytest.fixture()
def sweep_args(tmp_path, tiny_clip):
    write_synthetic_dtd(tmp_path / "data", per_class=4, size=32)
    return ["sweep", "--datasets", "dtd", "--methods", "zeroshot,coop", "--seeds", "1", "--shots", "2",
            "--root", tmp_path / "data", "--output", tmp_path / "runs", "--clip", tiny_clip[0], "--pretrained",
            tiny_clip[1], "--set", "optim.epochs=1", "--workers", "0"]


def test_damaged_results_are_left_out_then_evaluated_again(sweep_args, tmp_path):
    assert cli(*sweep_args).returncode == 0
    runs = tmp_path / "runs"
    damaged = [runs / "dtd/coop/b2n_shots2/seed1/results_base.json", runs / "dtd/zeroshot/seed1/results_novel.json"]
    damaged[0].write_text("{not json")
    damaged[1].write_text(json.dumps({**json.loads(damaged[1].read_text()), "accuracy": "high"}))
    report = cli("report", runs)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr[-2000:]
    assert all(f"{path}: damaged results file, left out" in report.stdout for path in damaged), report.stdout
    again = cli(*sweep_args)  # the sweep evaluates them again; training is not redone
    assert again.returncode == 0 and "trained coop" not in again.stderr, again.stderr[-2000:]
    assert all(isinstance(json.loads(p.read_text())["accuracy"], float) for p in damaged)
    assert "damaged results file" not in cli("report", runs).stdout


def test_hand_edited_records_are_left_out_of_the_report(sweep_args, tmp_path):
    """Valid JSON of the wrong shape (an unfinished run's record without its method, results whose config is a
    list) is named and left out, not a traceback at the end of a report or sweep."""
    assert cli(*sweep_args).returncode == 0
    run = tmp_path / "runs/dtd/coop/b2n_shots2/seed1"
    (run / "prompt.safetensors").unlink()
    (run / "run.json").write_text(json.dumps({"dataset": "dtd", "config": []}))
    results = run / "results_novel.json"
    results.write_text(json.dumps({**json.loads(results.read_text()), "config": [], "shots": "x"}))
    r = cli("report", tmp_path / "runs")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{run / 'run.json'}: damaged, not a run record" in r.stdout
    assert f"{results}: damaged results file, left out" in r.stdout


@pytest.mark.parametrize("edit, needle", [({"classnames": 5}, "classnames is not a list"),
                                          ({"root": None}, "root: input should be a valid string"),
                                          ({"seed": "1"}, "seed: input should be a valid integer"),
                                          ({"config": []}, "config: input should be a valid dict")])
def test_hand_edited_run_records_are_refused_on_one_line(sweep_args, tmp_path, edit, needle):
    assert cli(*sweep_args).returncode == 0
    run = tmp_path / "runs/dtd/coop/b2n_shots2/seed1"
    (run / "run.json").write_text(json.dumps({**json.loads((run / "run.json").read_text()), **edit}))
    assert_one_line(cli("eval", "--run", run, "--split", "base", "--workers", "0"), needle)


@pytest.mark.parametrize("damage, needle", [
    ("cut:checkpoints/epoch-0001/prompt.safetensors", "damaged"), ("cut:checkpoints/epoch-0001/optim.safetensors", "damaged"),
    ("flipped:checkpoints/epoch-0001/prompt.safetensors", "damaged"), ("cut:history.json", "damaged"),
    ("list:checkpoints/epoch-0001/scaler.json", "damaged"), ("removed:checkpoints/epoch-0001/scaler.json", "damaged"),
    ("list:history.json", "damaged"),
    ("removed:run.json", "holds checkpoints but no run.json")])
def test_a_damaged_checkpoint_or_history_is_refused_on_resume(sweep_args, tmp_path, damage, needle):
    """A checkpoint, history or record damaged or lost after it was written: a resume would restore a run other
    than the one recorded (a fresh loss scaler, epochs missing from the history, settings no longer known)."""
    assert cli(*sweep_args).returncode == 0
    run = tmp_path / "runs/dtd/coop/b2n_shots2/seed1"
    (run / "prompt.safetensors").unlink()  # unfinished again: a resume reads the checkpoint and the history
    record = json.loads((run / "run.json").read_text())
    how, name = damage.split(":")
    path = run / name
    whole = path.read_bytes()  # cut short, one bit of a stored number flipped (the file still parses), other JSON
    if how == "removed":
        path.unlink()
    else:
        path.write_bytes({"cut": whole[:20], "flipped": whole[:-1] + bytes([whole[-1] ^ 0x10]), "list": b"[1, 2]"}[how])
    resume = ["train", "--dataset", "dtd", "--root", record["root"], "--clip", record["clip"], "--pretrained",
              record["pretrained"], "--output", tmp_path / "runs", "--shots", "2", "--workers", "0", "--method",
              "coop", "--set", "optim.epochs=1", "--resume"]
    assert_one_line(cli(*resume), needle)


def test_a_lost_history_is_said_at_resume_and_the_run_goes_on(sweep_args, tmp_path):
    """Runs of a version that wrote no history.json resume (their weights do not depend on it); the history
    written from there on is said to lack the epochs before."""
    assert cli(*sweep_args).returncode == 0
    run = tmp_path / "runs/dtd/coop/b2n_shots2/seed1"
    for name in ("prompt.safetensors", "history.json"):
        (run / name).unlink()
    record = json.loads((run / "run.json").read_text())
    r = cli("train", "--dataset", "dtd", "--root", record["root"], "--clip", record["clip"], "--pretrained",
            record["pretrained"], "--output", tmp_path / "runs", "--shots", "2", "--workers", "0", "--method", "coop",
            "--set", "optim.epochs=1", "--resume")
    assert r.returncode == 0 and "history.json is missing: the history written from here on lacks epochs 1-1" in r.stderr


def test_a_checkpoint_without_promptsrc_aggregate_is_refused_on_resume(tiny_clip, tmp_path):
    """PromptSRC's final weights are the Gaussian aggregate of every epoch's prompts, which its checkpoints carry: a
    checkpoint that lost it would end the run with the last epoch's prompts, recorded as the aggregate."""
    write_synthetic_dtd(tmp_path / "data", per_class=4, size=32)
    args = ["train", "--dataset", "dtd", "--root", tmp_path / "data", "--clip", tiny_clip[0], "--pretrained",
            tiny_clip[1], "--output", tmp_path / "runs", "--shots", "2", "--workers", "0", "--method", "promptsrc",
            "--set", "optim.epochs=1", "--resume"]
    assert cli(*args).returncode == 0
    run = tmp_path / "runs/dtd/promptsrc/b2n_shots2/seed1"
    (run / "prompt.safetensors").unlink()
    (run / "checkpoints/epoch-0001/method.safetensors").unlink()
    assert_one_line(cli(*args), "damaged", "method.safetensors")


def test_a_missing_dataset_is_a_recorded_failure_not_the_end_of_the_sweep(sweep_args, tmp_path):
    args = [a if a != "dtd" else "dtd,eurosat" for a in sweep_args]  # no eurosat under the root
    r = cli(*args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    report = (tmp_path / "runs/report.md").read_text()
    assert "| dtd | coop [2 shots, optim.epochs=1] | 1 |" in report and "| dtd | zeroshot | 1 |" in report
    failures = report.split("Sweep failures")[1]
    assert "zeroshot eurosat base" in failures and "eurosat coop" in failures


def test_a_checkpoint_holding_prompts_in_another_precision_is_refused_on_resume(tiny_clip, tmp_path):
    """MaPLe under optim.precision=fp16 keeps its deeper prompts in fp32, as its reference does; a checkpoint holding
    them in half (an earlier version halved every part) would mix the two in one run: refused on one line."""
    import torch

    from mugcp.trainer.checkpoints import load_tensors, save_tensors

    write_synthetic_dtd(tmp_path / "data", per_class=4, size=32)
    args = ["train", "--dataset", "dtd", "--root", tmp_path / "data", "--clip", tiny_clip[0], "--pretrained",
            tiny_clip[1], "--output", tmp_path / "runs", "--shots", "2", "--workers", "0", "--method", "maple",
            "--set", "optim.epochs=1", "--set", "optim.precision=fp16", "--resume"]
    assert cli(*args).returncode == 0
    run = tmp_path / "runs/dtd/maple/b2n_shots2/seed1"
    (run / "prompt.safetensors").unlink()
    prompts = run / "checkpoints/epoch-0001/prompt.safetensors"
    tensors = load_tensors(prompts)[0]
    assert tensors["deep_text.0"].dtype == torch.float32 and tensors["ctx"].dtype == torch.float16
    save_tensors(prompts, {k: v.half() for k, v in tensors.items()})
    assert_one_line(cli(*args), "damaged", "deep_text.0 in torch.float16, which this run trains in torch.float32")
