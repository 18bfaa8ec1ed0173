"""Stage one on Ray: a local cluster started here (2 CPUs), MLLM engines as Ray Data actors, faults included."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray

from conftest import answers_by_path, extract_config, table_rows
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


def engine_pids() -> list[int]:
    """Processes of the engines: Ray titles its actor processes `ray::MapWorker(MapBatches(Describer))`."""
    pids = []
    for proc in os.listdir("/proc"):
        try:
            if proc.isdigit() and b"Describer" in open(f"/proc/{proc}/cmdline", "rb").read():
                pids.append(int(proc))
        except OSError:
            pass
    return pids


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
