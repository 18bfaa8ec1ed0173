"""`mugcp sweep` runs datasets x methods x seeds, skips finished work on restart, and writes the report."""

from __future__ import annotations

import pytest

from conftest import assert_one_line, cli
from mugcp.world.synth import write_synthetic_dtd


def test_sweep_is_one_restartable_command(tmp_path, tiny_clip):
    write_synthetic_dtd(tmp_path / "data", per_class=4, size=32)
    args = ["sweep", "--datasets", "dtd", "--methods", "zeroshot,coop", "--seeds", "1,2", "--shots", "2",
            "--root", tmp_path / "data", "--output", tmp_path / "runs", "--clip", tiny_clip[0], "--pretrained",
            tiny_clip[1], "--set", "optim.epochs=1", "--workers", "0"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    row = "| dtd | coop [2 shots, optim.epochs=1] | 2 |"  # the shots and schedule are not the benchmark's
    assert row in r.stdout and "| dtd | zeroshot | 1 |" in r.stdout
    assert "seeds present: 1, 2; the papers' protocol uses 1, 2, 3" in r.stdout  # seeds not asked for are said
    report = (tmp_path / "runs" / "report.md").read_text()
    assert row in report and (tmp_path / "runs" / "report.png").is_file()
    again = cli(*args)
    assert again.returncode == 0 and "trained coop" not in again.stderr and "accuracy" not in again.stderr
    # the same folder asked for another schedule: the finished runs are refused, not silently reported
    other = cli(*args[:-3], "optim.epochs=2", "--workers", "0")
    assert other.returncode == 1 and "trained coop" not in other.stderr, other.stderr[-2000:]
    assert other.stderr.count("holds a finished run trained otherwise (config.optim.epochs: 1 -> 2)") == 2
    # ... or another CLIP: zero-shot's results and the runs are refused alike
    from mugcp.world.tiny_clip import write_tiny_clip

    config, weights = write_tiny_clip(tmp_path / "other-clip", seed=1)
    swapped = [config if a == tiny_clip[0] else weights if a == tiny_clip[1] else a for a in args]
    other = cli(*swapped)
    assert other.returncode == 1 and "trained coop" not in other.stderr, other.stderr[-2000:]
    report = (tmp_path / "runs" / "report.md").read_text()
    assert report.count("holds results for another CLIP or data (clip: mugcp-tiny-clip@file:") == 2  # zero-shot, base and novel
    assert report.count("holds a finished run trained otherwise (clip: mugcp-tiny-clip@file:") == 2


def test_a_sweep_with_failed_runs_says_so_in_its_exit_code_and_report(tmp_path, tiny_clip):
    """MuGCP without SCP fails; CoOp still runs; the failure is in the report file and the exit code is 1."""
    write_synthetic_dtd(tmp_path / "data", per_class=4, size=32)
    r = cli("sweep", "--datasets", "dtd", "--methods", "coop,mugcp", "--seeds", "1", "--shots", "2", "--root",
            tmp_path / "data", "--output", tmp_path / "runs", "--clip", tiny_clip[0], "--pretrained", tiny_clip[1],
            "--set", "optim.epochs=1", "--workers", "0", "--cache-dir", tmp_path / "no-cache")
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: 1 part(s) of the sweep failed"), r.stderr[-2000:]
    report = (tmp_path / "runs" / "report.md").read_text()
    table, failures = report.split("Sweep failures")
    assert "| dtd | coop" in table and "mugcp" in failures and "mugcp" not in table.split("Missing")[0]


def test_lists_of_names_and_numbers_are_checked_before_any_work(tmp_path):
    base = ["sweep", "--datasets", "dtd", "--root", tmp_path, "--output", tmp_path / "runs"]
    for extra, needle in ((["--methods", ""], "--methods ''"), (["--methods", "coop,,gpt"], "none empty"),
                          (["--setting", "fewshot", "--fewshot-shots", "0"], "at least 1"),
                          (["--seeds", "1,,2"], "--seeds '1,,2'"),
                          (["--test-scp", "shuffled,noise"], "--test-scp 'noise'")):
        r = cli(*base, *extra)
        assert r.returncode == 2 and needle in r.stderr and not (tmp_path / "runs").exists(), (extra, r.stderr)


def test_test_time_scp_controls_are_planned_for_the_runs_that_read_scp(tmp_path):
    from mugcp.sweep import make_plan

    plan = make_plan(["b2n", "fewshot"], ["dtd"], ["zeroshot", "coop", "mugcp"], [1, 2], root=tmp_path,
                     output=tmp_path / "runs", shots=16, fewshot_shots=[2], source="imagenet", clip="ViT-B-16",
                     pretrained="openai", cache_dir=tmp_path / "cache", mllm=None, test_scp=("shuffled", "zeros"))
    controls = {(job.spec.method, job.spec.setting): job.test_scp for job in plan.jobs.values()}
    assert controls == {("coop", "b2n_shots16"): (), ("coop", "all_shots2"): (),
                        ("mugcp", "b2n_shots16"): ("shuffled", "zeros"), ("mugcp", "all_shots2"): ("shuffled", "zeros")}
    # the SCP a run trained with is its own test, not a control of it (which would be evaluated on every resume)
    for overrides, expected in (((), ("shuffled",)), (("conditions.scp=shuffled",), ("real",))):
        plan = make_plan(["b2n"], ["dtd"], ["mugcp"], [1], root=tmp_path, output=tmp_path / "runs", shots=16,
                         fewshot_shots=[2], source="imagenet", clip="ViT-B-16", pretrained="openai",
                         cache_dir=tmp_path / "cache", mllm=None, overrides=list(overrides),
                         test_scp=("real", "shuffled"))
        assert [job.test_scp for job in plan.jobs.values()] == [expected]


@pytest.mark.parametrize("option, message", [
    (["--ray", "bogus"], "--ray bogus: give local, auto, HOST:PORT"),
    (["--ray", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
    (["--ray", "local", "--gpus-per-run", "1.5"], "--gpus-per-run 1.5: give a fraction of one GPU (0.5) or whole")])
def test_a_ray_address_or_gpu_share_ray_cannot_take_is_refused_before_any_work(tmp_path, option, message):
    r = cli("sweep", "--datasets", "dtd", "--methods", "zeroshot", "--root", tmp_path, "--output", tmp_path / "runs",
            *option)
    assert_one_line(r, message)
    assert not (tmp_path / "runs").exists()
