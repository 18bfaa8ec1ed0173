"""Stage one on Ray: a local cluster started here (2 CPUs), MLLM engines as Ray Data actors, faults included."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import ray

from conftest import answers_by_path, assert_one_line, cli, extract_config, table_rows
from mugcp.core.errors import UserError
from mugcp.pipeline.extract import run_extract
from mugcp.world.synth import write_synthetic_dtd


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-data")
    write_synthetic_dtd(root, per_class=4, size=48)
    return root


def ray_extract(data, tiny_clip, mllm, cache, **options):
    config = extract_config(tiny_clip, cache, backend="ray", mllm=str(mllm), num_engines=2, splits=("test",),
                            all_images=True, max_tokens=16, batch_size=4, retries=0, **options)
    return run_extract("dtd", data, config, log=lambda _: 0)


def test_two_engines_answer_as_one_process_does(cluster, data, tiny_clip, tiny_mllm_dir, tmp_path):
    summary = ray_extract(data, tiny_clip, tiny_mllm_dir, tmp_path / "ray")
    assert summary.done + summary.failed == 47
    single = run_extract("dtd", data, extract_config(tiny_clip, tmp_path / "hf", backend="hf", mllm=str(tiny_mllm_dir),
                                                     splits=("test",), all_images=True, max_tokens=16, batch_size=4,
                                                     retries=0), log=lambda _: 0)
    assert single.done == summary.done
    on_ray, alone = answers_by_path(tmp_path / "ray"), answers_by_path(tmp_path / "hf")
    assert len(table_rows(tmp_path / "ray", "dtd", "answers")) == 47  # one row per image, no duplicate
    assert {p: (r["status"], r["answer"]) for p, r in on_ray.items()} == \
        {p: (r["status"], r["answer"]) for p, r in alone.items()}  # greedy: the same answers


def test_an_engine_that_cannot_load_is_one_line_and_leaves_no_table(cluster, data, tiny_clip, tiny_mllm_dir,
                                                                     tmp_path):
    """A bad --mllm fails inside the Ray actors, after the run began: one line with the loader's reason, and no
    answers table recording the broken folder's weights (so the mended folder is not refused as other weights)."""
    mllm, cache = tmp_path / "mllm", tmp_path / "cache"
    mllm.mkdir()
    (mllm / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load MLLM"):
        ray_extract(data, tiny_clip, mllm, cache)
    assert not list(cache.glob("dtd/answers/*")) and not list(cache.glob("dtd/scp/*"))
    assert not list(cache.glob("dtd/.lock-*"))
    (mllm / "config.json").unlink()
    for f in tiny_mllm_dir.iterdir():  # the folder mended: its answers are made, not refused
        (mllm / f.name).write_bytes(f.read_bytes())
    summary = run_extract("dtd", data, extract_config(tiny_clip, cache, backend="hf", mllm=str(mllm), splits=("test",),
                                                      all_images=True, max_tokens=16, retries=0), log=lambda _: 0)
    assert summary.done + summary.failed == 47


def test_a_gpu_request_no_node_can_meet_is_one_line(cluster, data, tiny_clip, tmp_path):
    """Ray would wait forever for a GPU this cluster does not have."""
    r = cli("sweep", "--datasets", "dtd", "--methods", "coop", "--seeds", "1", "--shots", "1", "--root", data,
            "--clip", tiny_clip[0], "--pretrained", tiny_clip[1], "--output", tmp_path / "runs", "--set",
            "optim.epochs=1", "--ray", "local", "--gpus-per-run", "0.5")
    assert_one_line(r, "--gpus-per-run 0.5: no node of the Ray cluster has 0.5 GPU(s) (the most on one node: 0)")


def pids_running(marker: bytes) -> list[int]:
    """Processes whose command line holds `marker`: Ray titles an actor's process
    `ray::MapWorker(MapBatches(Describer))` and a task's `ray::_remote_job`."""
    pids = []
    for proc in os.listdir("/proc"):
        try:
            if proc.isdigit() and marker in open(f"/proc/{proc}/cmdline", "rb").read():
                pids.append(int(proc))
        except OSError:
            pass
    return pids


def engine_pids() -> list[int]:
    return pids_running(b"Describer")


def test_a_killed_engine_loses_and_duplicates_nothing(cluster, data, tiny_clip, tiny_mllm_dir, tmp_path):
    killed, stale = [], set(engine_pids())  # engines of the test before may still be exiting

    def kill_one_engine():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = [p for p in engine_pids() if p not in stale]
            if pids:
                time.sleep(1.5)  # let it load its model and take a batch in hand
                try:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                except ProcessLookupError:  # it ended on its own: wait for the next one
                    stale.add(pids[0])
                continue
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_engine)
    killer.start()
    summary = ray_extract(data, tiny_clip, tiny_mllm_dir, tmp_path / "cache")
    killer.join()
    assert killed, "no engine was running to kill"
    rows = table_rows(tmp_path / "cache", "dtd", "answers")
    assert len(rows) == len({r["sha256"] for r in rows}) == 47 == summary.done + summary.failed
    assert len(table_rows(tmp_path / "cache", "dtd", "scp")) == summary.done


def sweep_args(data, tiny_clip, out, *extra):
    return ["sweep", "--datasets", "dtd", "--methods", "coop,kgcoop", "--seeds", "1,2", "--shots", "2",
            "--root", data, "--output", out, "--clip", tiny_clip[0], "--pretrained", tiny_clip[1],
            "--set", "optim.epochs=4", "--set", "optim.batch_size=8", "--workers", "0", *extra]


def results_of(out) -> dict:
    """Every results file's accuracy and per-class accuracy, by its path in the runs folder."""
    return {str(p.relative_to(out)): (r["accuracy"], r["per_class_accuracy"])
            for p in sorted(out.rglob("results_*.json")) for r in [json.loads(p.read_text())]}


def task_pids() -> list[int]:
    return pids_running(b"_remote_job")


def test_sweep_on_ray_equals_serial_even_when_a_worker_dies(cluster, data, tiny_clip, tmp_path):
    """2 methods x 2 seeds as Ray tasks write the same results, file for file, as the serial sweep;
    a worker killed mid-run is retried by Ray and its run resumes from its last checkpoint."""
    serial = cli(*sweep_args(data, tiny_clip, tmp_path / "serial"))
    assert serial.returncode == 0, serial.stderr[-2000:]
    killed = []

    def kill_one_task():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            checkpoints = list((tmp_path / "ray").rglob("checkpoints/epoch-0001"))
            pids = task_pids()
            if checkpoints and pids:  # a run is under way and has something to resume from
                try:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_task)
    killer.start()
    on_ray = cli(*sweep_args(data, tiny_clip, tmp_path / "ray", "--ray", "local"))
    killer.join()
    assert on_ray.returncode == 0, on_ray.stderr[-2000:]
    assert killed, "no sweep task was running to kill"
    assert "Sweep failures" not in on_ray.stdout
    want, got = results_of(tmp_path / "serial"), results_of(tmp_path / "ray")
    assert len(want) == 2 * 2 * 2  # coop and kgcoop x 2 seeds x base and novel
    assert got == want
