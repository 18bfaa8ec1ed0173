"""Fault injection: kill -9 at random points of `mugcp train` and `mugcp extract` (inside checkpoint and
part writes included), resume, and end with exactly the results of an uninterrupted run; two
processes on one folder. The points are drawn from a seeded generator, so a failure can be replayed.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from pathlib import Path

import fault_child
import pytest
from safetensors.torch import load_file

from conftest import assert_one_line, cli, described_dtd, table_rows
from mugcp.world.stand_in_server import FakeServer

# 20 kill cycles per suite run (a train cycle costs ~4x an extract one); `MUGCP_FAULT_SCALE=10 pytest
# tests/test_faults.py` runs a campaign ten times longer.
SCALE = int(os.environ.get("MUGCP_FAULT_SCALE", "1"))
TRAIN_CYCLES, EXTRACT_CYCLES = 4 * SCALE, 16 * SCALE


@pytest.fixture(scope="module")
def forkserver():
    """A multiprocessing context whose children start with mugcp, torch and open_clip already imported."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(fault_child.PRELOAD)
    return ctx


def child(ctx, argv, fault, log: Path, kill_after: float | None = None, timeout: float = 300) -> int:
    """Run `mugcp ARGV` in a child; returns its exit code (-9 when killed)."""
    p = ctx.Process(target=fault_child.run, args=([str(a) for a in argv], fault, str(log)))
    p.start()
    p.join(kill_after if kill_after is not None else timeout)
    if p.is_alive():
        p.kill()
        p.join()
    return p.exitcode


def draw_fault(rng: random.Random, attempt: int, most: int) -> tuple[str, tuple | None]:
    """The first attempt of a cycle dies at one of the first 3 writes (every run makes more), so every
    cycle is killed at least once; later ones at any write up to `most`, or at a random moment."""
    if attempt == 0:
        return (kind := rng.choice(["fsync", "rename"])), (kind, rng.randint(1, 3))
    kind = rng.choice(["fsync", "rename", "time"])
    return kind, (kind, rng.randint(1, most)) if kind != "time" else None


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip):
    """Synthetic DTD (4 images per class) and its SCP cache."""
    return described_dtd(tmp_path_factory.mktemp("faults"), tiny_clip)


def train_argv(world, tiny_clip, out, method="coop"):
    return ["train", "--dataset", "dtd", "--root", world, "--cache-dir", world / "cache", "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--output", out, "--shots", "2", "--workers", "0", "--method", method,
            "--set", "optim.epochs=3", "--set", "optim.batch_size=16"]


def test_train_survives_kill_9_anywhere(forkserver, world, tiny_clip, tmp_path):
    """Each cycle: kill at a random write (or a random moment), resume (itself killed sometimes) until it
    finishes; the final weights equal an uninterrupted run's, bit for bit."""
    rng = random.Random(2024)
    kills = 0
    expected = {}
    for cycle in range(TRAIN_CYCLES):
        method = "mugcp" if cycle % 4 == 0 else "coop"  # the loop is the same for all: CoOp is the cheapest
        run = Path(f"dtd/{method}/b2n_shots2/seed1")
        if method not in expected:
            reference = tmp_path / f"reference-{method}"
            assert cli(*train_argv(world, tiny_clip, reference, method)).returncode == 0
            expected[method] = load_file(str(reference / run / "prompt.safetensors"))
        out = tmp_path / f"cycle{cycle}"
        argv = train_argv(world, tiny_clip, out, method)
        for attempt in range(4):
            kind, fault = draw_fault(rng, attempt, 10)
            code = child(forkserver, argv + (["--resume"] if attempt else []), fault, tmp_path / "log.txt",
                         kill_after=rng.uniform(0.3, 2.0) if kind == "time" else None)
            kills += code == -9
            if code == 0:
                break
            assert code == -9, (cycle, attempt, (tmp_path / "log.txt").read_text()[-2000:])
        else:
            assert cli(*argv, "--resume").returncode == 0
        got, want = load_file(str(out / run / "prompt.safetensors")), expected[method]
        assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got), cycle
        assert not list((out / run / "checkpoints").glob("*.tmp")) and not list((out / run).glob(".*.tmp"))
    assert kills >= TRAIN_CYCLES  # every cycle was killed at least once


def test_extract_survives_kill_9_anywhere(forkserver, world, tiny_clip, tmp_path):
    argv = ["extract", "--dataset", "dtd", "--root", world, "--clip", tiny_clip[0], "--pretrained", tiny_clip[1],
            "--flush-every", "8", "--batch-size", "4", "--concurrency", "4", "--all-images"]
    rng = random.Random(7)
    with FakeServer(delay=0.005) as s:
        reference = tmp_path / "reference"
        assert cli(*argv, "--server-url", s.url, "--cache-dir", reference).returncode == 0

        def content(cache, table):
            drop = {"created", "size", "mtime_ns"}
            return sorted(str(sorted((k, str(v)) for k, v in r.items() if k not in drop))
                          for r in table_rows(cache, "dtd", table))

        kills = 0
        for cycle in range(EXTRACT_CYCLES):
            cache = tmp_path / f"cycle{cycle}"
            for attempt in range(4):
                kind, fault = draw_fault(rng, attempt, 12)
                code = child(forkserver, argv + ["--server-url", s.url, "--cache-dir", cache], fault,
                             tmp_path / "log.txt", kill_after=rng.uniform(0.3, 2.0) if kind == "time" else None)
                kills += code == -9
                if code == 0:
                    break
            assert cli(*argv, "--server-url", s.url, "--cache-dir", cache).returncode == 0
            for table in ("images", "answers", "scp"):
                assert content(cache, table) == content(reference, table), (cycle, table)
            assert not list(cache.rglob(".part-*.tmp"))
    assert kills >= EXTRACT_CYCLES


def test_two_trains_on_one_run_folder(forkserver, world, tiny_clip, tmp_path):
    """While one `mugcp train` writes a run folder, a second one is refused on one line naming the first."""
    argv = train_argv(world, tiny_clip, tmp_path, "coop")[:-4] + ["--set", "optim.epochs=20", "--set",
                                                                  "optim.batch_size=8"]
    first = forkserver.Process(target=fault_child.run, args=([str(a) for a in argv], None, str(tmp_path / "log.txt")))
    first.start()
    run_json = tmp_path / "dtd" / "coop" / "b2n_shots2" / "seed1" / "run.json"
    deadline = time.monotonic() + 120
    while not run_json.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        second = cli(*argv)
        assert_one_line(second, "is in use by pid", str(first.pid), "mugcp train --dataset dtd --root")
    finally:
        first.kill()
        first.join()
    resumed = cli(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]  # the lock died with its holder


def test_a_lock_is_not_kept_by_a_forked_child_after_its_holder_lets_go(tmp_path):
    """A data loader's workers are forked while the run's lock is held; a flock belongs to the open file, which a
    fork shares, so a worker outliving its killed parent kept the run locked. Forked children drop their copy."""
    from mugcp.core.locks import hold

    lock, fork = tmp_path / ".lock", multiprocessing.get_context("fork")
    running = fork.Event()
    with hold(lock, "the run"):
        child = fork.Process(target=lambda: running.set() or time.sleep(5))
        child.start()
        assert running.wait(10)  # the child is past its fork (a killed parent's workers are, long before a rerun)
    try:
        with hold(lock, "the run"):  # the holder let go: the sleeping child must not hold it
            pass
    finally:
        child.terminate()
        child.join()
