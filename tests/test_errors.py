"""Bad input and damaged state, case by case: one line and exit 2 (never a traceback), nothing written that a
later command would misread, and a resumed run that can only be the run it continues."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import assert_one_line, cli, described_dtd, extract_config, table_rows
from mugcp.core.coop_datasets import load_dataset
from mugcp.core.errors import UserError
from mugcp.pipeline.extract import run_extract
from mugcp.world.stand_in_server import FakeServer
from mugcp.world.synth import write_synthetic_dtd

RUN = Path("dtd/mugcp/b2n_shots2/seed1")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip):
    """Synthetic DTD (4 images per class) with its SCP cache, and one finished 2-epoch MuGCP run."""
    root = described_dtd(tmp_path_factory.mktemp("errors"), tiny_clip)
    assert cli(*train_args(root, tiny_clip, root / "runs", "--set", "optim.epochs=2")).returncode == 0
    return root


def train_args(root, tiny_clip, out, *extra):
    return ["train", "--dataset", "dtd", "--root", root, "--cache-dir", root / "cache", "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--output", out, "--shots", "2", "--workers", "0", *extra]


def extract_args(root, tiny_clip, cache, *extra):
    return ["extract", "--dataset", "dtd", "--root", root, "--cache-dir", cache, "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--all-images", *extra]


@pytest.fixture
def data_copy(world, tmp_path):
    shutil.copytree(world / "dtd", tmp_path / "dtd")
    return tmp_path


# -- options checked before anything is written ------------------------------------------------------

@pytest.mark.parametrize("extra, needles", [
    (["--seed", "-1"], ["Invalid value for '--seed'"]),  # typer's words for the range differ across versions
    (["--set", "optim.epochs=abc"], ["optim.epochs", "valid integer"]),
    (["--set", "optim.epochs=0"], ["optim.epochs", "greater than or equal to 1"]),
    (["--set", "optim.epochs=-2"], ["optim.epochs", "greater than or equal to 1"]),
    (["--workers", "-1"], ["--workers"]),
    (["--shots", "0"], ["--shots"]),
    (["--method", "zeroshot"], ["nothing to train"]),
    (["--method", "coop", "--set", "method.n_ctx=16"], ["method.ctx_init 'a photo of a' has 4 words", "16"]),
    (["--method", "coop", "--set", "method.ctx_init=a zigzagged photo of"], ["are 6 tokens", "not 4"]),
    (["--method", "coop", "--set", "method.n_ctx=80", "--set", "method.ctx_init=''"],
     ["after 80 context tokens (method.n_ctx) is a prompt of", "more than CLIP's 77"]),
    (["--method", "cocoop", "--set", "method.meta_ratio=100"], ["leaves the meta-net no hidden unit"]),
])
def test_train_options(world, tiny_clip, tmp_path, extra, needles):
    assert_one_line(cli(*train_args(world, tiny_clip, tmp_path / "runs", *extra)), *needles)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


@pytest.mark.parametrize("extra, needles", [
    (["--k", "0"], ["k: Input should be greater than or equal to 1"]),
    (["--batch-size", "0"], ["batch_size"]),
    (["--num-shards", "0"], ["num_shards: Input should be greater than or equal to 1"]),
    (["--num-shards", "2", "--shard-index", "2"], ["shard_index 2 must be below num_shards 2"]),
    (["--device", "bogus"], ["unknown --device 'bogus'"]),
    (["--prompt", "poem"], ["prompt 'poem' is not one of"]),
    (["--splits", "train,bogus"], ["splits.1"]),
    (["--shots", "a,b"], ["--shots 'a,b' must be comma-separated whole numbers"]),
])
def test_extract_options(world, tiny_clip, tmp_path, extra, needles):
    assert_one_line(cli(*extract_args(world, tiny_clip, tmp_path / "cache", *extra)), *needles)
    assert not (tmp_path / "cache").exists()


def test_a_rejected_k_does_not_poison_the_cache(world, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    assert_one_line(cli(*extract_args(world, tiny_clip, cache, "--k", "0")), "k")
    with FakeServer() as s:
        assert cli(*extract_args(world, tiny_clip, cache, "--server-url", s.url, "--splits", "val")).returncode == 0


@pytest.mark.parametrize("args, needles", [
    (["eval", "--batch-size", "0"], ["--batch-size"]),
    (["sweep", "--seeds", "a,b"], ["--seeds 'a,b'"]),
    (["data", "synth", "--out", "unused", "--dataset", "imagenet", "--classes", "48"], ["--classes", "47"]),
    (["data", "synth", "--out", "unused", "--classes", "10"], ["--classes", "DTD has its 47"]),
    (["sweep", "--revision", "v1"], ["--revision chooses the weights stage one describes with", "--backend"]),
    (["sweep", "--backend", "server", "--revision", "v1"], ["--revision is for the in-process backends"]),
    (["eval", "--split", "bogus"], ["--split"]),
])
def test_other_options(args, needles):
    assert_one_line(cli(*args), *needles)


# -- resume, finished runs, run folders ------------------------------------------------------------

def test_ctrl_c_says_what_is_kept(world, tiny_clip, tmp_path, monkeypatch):
    """Ctrl-C during a command: exit 130 and one line saying how to go on, no traceback."""
    import mugcp.trainer.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mugcp.trainer.train, "run_train", interrupted)
    r = cli(*train_args(world, tiny_clip, tmp_path / "runs"))
    assert r.returncode == 130 and "Traceback" not in r.stderr, r
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--resume" in r.stderr, r.stderr


def test_resume_refuses_a_changed_run(world, tiny_clip):
    out = world / "runs"
    r = cli(*train_args(world, tiny_clip, out, "--set", "optim.epochs=3", "--set", "optim.lr=0.05", "--resume"))
    assert_one_line(r, "holds a run with other settings", "optim.epochs: 2 -> 3", "optim.lr: 0.0035 -> 0.05")
    r = cli(*train_args(world, tiny_clip, out, "--set", "optim.epochs=3"))  # without --resume: no advice to add it
    assert_one_line(r, "holds a run with other settings", "optim.epochs: 2 -> 3", "another --output")
    assert json.loads((out / RUN / "run.json").read_text())["config"]["optim"]["epochs"] == 2  # untouched
    assert cli(*train_args(world, tiny_clip, out, "--set", "optim.epochs=2", "--resume")).returncode == 0


def test_eval_accepts_only_weights_written_for_the_recorded_run(world, tiny_clip, tmp_path):
    shutil.copytree(world / "runs", tmp_path / "runs")
    run = tmp_path / "runs" / RUN
    record = json.loads((run / "run.json").read_text())
    assert cli("eval", "--run", run, "--split", "base", "--workers", "0").returncode == 0
    record["config"]["optim"]["epochs"] = 60  # as if a resume with more epochs had begun and been killed
    (run / "run.json").write_text(json.dumps(record))
    assert_one_line(cli("eval", "--run", run, "--split", "base", "--workers", "0"), "has not finished training")
    (run / "run.json").write_text("{not json")
    assert_one_line(cli("eval", "--run", run, "--split", "base"), "cannot read", "run.json")
    (run / "run.json").write_text(json.dumps({"dataset": "dtd"}))
    assert_one_line(cli("eval", "--run", run, "--split", "base"), "lacks", "not a run folder")


def test_damaged_weights_are_one_line(world, tmp_path):
    shutil.copytree(world / "runs", tmp_path / "runs")
    weights = tmp_path / "runs" / RUN / "prompt.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:100])
    assert_one_line(cli("eval", "--run", weights.parent, "--split", "novel"), "cannot read", "prompt.safetensors")
    weights.write_bytes(whole[:-1] + bytes([whole[-1] ^ 0x10]))  # one bit of a weight flipped: the file still parses
    assert_one_line(cli("eval", "--run", weights.parent, "--split", "novel"), "do not match the checksum")


def test_a_failed_run_is_not_marked_latest(world, tiny_clip, data_copy, tmp_path):
    out = tmp_path / "runs"
    victim = sorted(i.path for i in load_dataset("dtd", data_copy).train)[0]
    (data_copy / "dtd" / victim).write_bytes(b"not a jpeg")
    (data_copy / "cache").symlink_to(world / "cache")
    r = cli(*train_args(data_copy, tiny_clip, out, "--set", "optim.epochs=1", "--method", "coop"))  # 2 shots: all
    assert_one_line(r, "cannot read image", victim.split("/")[-1])
    assert not (out / "latest-run.txt").exists()
    r = cli(*train_args(data_copy, tiny_clip, out, "--set", "optim.epochs=1"))  # MuGCP reads its SCP first
    assert_one_line(r, "changed since stage one described them", victim.split("/")[-1])
    assert not (out / "latest-run.txt").exists()
    assert_one_line(cli("eval", "--split", "base", "--output", out), "no latest run")


def test_a_damaged_cache_part_is_one_line_in_train_and_eval(world, tiny_clip, tmp_path):
    shutil.copytree(world / "cache", tmp_path / "cache")
    part = next((tmp_path / "cache" / "dtd" / "scp").rglob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:300])
    r = cli("train", "--dataset", "dtd", "--root", world, "--cache-dir", tmp_path / "cache", "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--output", tmp_path / "runs", "--shots", "2", "--workers", "0")
    assert_one_line(r, "cannot be read", part.name, "move it away")  # the part named in full
    shutil.copytree(world / "runs", tmp_path / "runs2")
    record = json.loads((tmp_path / "runs2" / RUN / "run.json").read_text())
    record["cache_dir"] = str(tmp_path / "cache")
    (tmp_path / "runs2" / RUN / "run.json").write_text(json.dumps(record))
    # the run reads its SCP from the damaged copy now: eval refuses on one line too
    r = cli("eval", "--run", tmp_path / "runs2" / RUN, "--split", "novel", "--workers", "0")
    assert_one_line(r, "cannot be read")


def test_unwritable_output(world, tiny_clip):
    assert_one_line(cli(*train_args(world, tiny_clip, Path("/proc/mugcp-runs"))), "cannot write", "/proc/mugcp-runs")


# -- damaged or odd datasets ------------------------------------------------------------------------

def split_of(root: Path) -> tuple[Path, dict]:
    path = root / "dtd" / "split_zhou_DescribableTextures.json"
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("label, needle", [(-1, "label -1"), (1.7, "label 1.7"), ("3", "label '3'")])
def test_labels_must_be_whole_numbers(data_copy, tiny_clip, label, needle):
    path, split = split_of(data_copy)
    split["train"][0][1] = label
    path.write_text(json.dumps(split))
    r = cli("eval", "--method", "zeroshot", "--dataset", "dtd", "--root", data_copy, "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--workers", "0")
    assert_one_line(r, needle, "whole numbers from 0")


def shifted(split: dict, part: str, by: int) -> dict:
    """Every label of `part` moved by `by` (class names kept)."""
    return {**split, part: [[path, label + by, name] for path, label, name in split[part]]}


@pytest.mark.parametrize("edit, needle", [
    (lambda s: {k: shifted(s, k, 100)[k] for k in s}, "no class with label 0"),  # labels that start at 100
    (lambda s: {**s, "train": [r for r in s["train"] if r[1] != 5]}, "no training image of class"),
    (lambda s: {**s, "test": [[s["test"][0][0], s["test"][0][1], "renamed"], *s["test"][1:]]}, "two class names"),
])
def test_labels_must_run_from_zero_and_every_tested_class_must_have_shots(data_copy, tiny_clip, edit, needle):
    """A gap in the labels or a tested class without training images would shift or drop classes: refused."""
    path, split = split_of(data_copy)
    path.write_text(json.dumps(edit(split)))
    r = cli("eval", "--method", "zeroshot", "--dataset", "dtd", "--root", data_copy, "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--workers", "0")
    assert_one_line(r, needle)


def test_empty_splits_are_refused(data_copy, tiny_clip):
    path, split = split_of(data_copy)
    path.write_text(json.dumps({"train": [], "val": [], "test": []}))
    assert_one_line(cli(*extract_args(data_copy, tiny_clip, data_copy / "cache")), "lists no training images")
    path.write_text(json.dumps({**split, "test": []}))
    assert_one_line(cli("eval", "--method", "zeroshot", "--dataset", "dtd", "--root", data_copy, "--clip",
                        tiny_clip[0], "--pretrained", tiny_clip[1]), "lists no test images")


def test_non_utf8_files_are_one_line(data_copy, tiny_clip, tmp_path):
    path, _ = split_of(data_copy)
    path.write_bytes(b"\xff\xfe{\x00")
    assert_one_line(cli("eval", "--method", "zeroshot", "--dataset", "dtd", "--root", data_copy, "--clip",
                        tiny_clip[0], "--pretrained", tiny_clip[1]), "not UTF-8")
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"optim:\n  lr: \xff\xfe\n")
    assert_one_line(cli("config", "show", "coop", "--config", config), "not valid YAML")


def test_generated_splits_hold_images_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MUGCP_HOME", str(tmp_path / "home"))
    write_synthetic_dtd(tmp_path / "data", per_class=10, size=16)
    (tmp_path / "data" / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    for folder in list((tmp_path / "data" / "dtd" / "images").iterdir())[:3]:
        (folder / "README.txt").write_text("notes")
    splits = load_dataset("dtd", tmp_path / "data")
    paths = [i.path for part in (splits.train, splits.val, splits.test) for i in part]
    assert len(paths) == 470 and not any(p.endswith(".txt") for p in paths)


def test_links_inside_the_dataset_folder_are_followed(data_copy, tiny_clip, tmp_path):
    """The rule: a split names places inside the dataset folder; the file system may link them anywhere."""
    images = data_copy / "dtd" / "images"
    elsewhere = tmp_path / "elsewhere"
    shutil.move(images, elsewhere)
    images.symlink_to(elsewhere)
    r = cli("eval", "--method", "zeroshot", "--dataset", "dtd", "--root", data_copy, "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--workers", "0", "--output", tmp_path / "runs")
    assert r.returncode == 0, r.stderr


# -- SCP bytes do not depend on how images were batched ----------------------------------------------

def test_scp_bytes_do_not_depend_on_batching(world, tiny_clip, tmp_path):
    with FakeServer() as s:
        for name, batch in (("b8", 8), ("b3", 3)):
            run_extract("dtd", world, extract_config(tiny_clip, tmp_path / name, server_urls=[s.url], all_images=True,
                                                     batch_size=batch, splits=("train", "val", "test")), log=lambda _: 0)

    def scp(cache):
        return sorted((r["sha256"], str(r["scp"]), str(r["mask"])) for r in table_rows(cache, "dtd", "scp"))

    assert scp(tmp_path / "b8") == scp(tmp_path / "b3")
    assert len(scp(tmp_path / "b8")) == 188
    assert pq.read_metadata(next((tmp_path / "b8").rglob("scp/*/parts/*.parquet"))).num_rows > 0


def test_results_are_combined_only_with_the_weights_they_measured(world, tiny_clip, tmp_path):
    """A run evaluated, then trained again into its folder (its weights deleted, another schedule): eval's
    Base / Novel / HM never combines the new Base with the old Novel, and the report leaves the old one out."""
    out = tmp_path / "runs"
    shutil.copytree(world / "runs", out)
    run = out / RUN
    for split in ("base", "novel"):
        r = cli("eval", "--run", run, "--split", split, "--workers", "0")
        assert r.returncode == 0, r.stderr[-2000:]
    assert "HM" in r.stdout
    for name in ("prompt.safetensors", "checkpoints", "history.json"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    r = cli(*train_args(world, tiny_clip, out, "--set", "optim.epochs=1"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("eval", "--output", out, "--split", "base", "--workers", "0")
    assert r.returncode == 0 and "accuracy" in r.stdout and "HM" not in r.stdout, r.stdout
    md = cli("report", out).stdout
    assert f"{run / 'results_novel.json'}: measured on weights {run} no longer holds (config.optim.epochs: 2 -> 1" \
           in md, md
    r = cli("eval", "--output", out, "--split", "novel", "--workers", "0")
    assert "HM" in r.stdout and "no longer holds" not in cli("report", out).stdout


def test_the_latest_run_of_a_copied_tree_is_its_own(world, tmp_path):
    """`mugcp eval` without --run evaluates the latest run of --output: in a copy of the tree, the copy's run,
    never the original's; a pointer that leaves --output (an earlier version's absolute path) is refused."""
    copy = tmp_path / "copy"
    shutil.copytree(world / "runs", copy)
    r = cli("eval", "--output", copy, "--split", "base", "--workers", "0")
    assert r.returncode == 0 and f"-> {copy / RUN / 'results_base.json'}" in r.stdout, r.stdout
    assert not (world / "runs" / RUN / "results_base.json").exists()
    (copy / "latest-run.txt").write_text(f"{(world / 'runs' / RUN).resolve()}\n")
    assert_one_line(cli("eval", "--output", copy, "--split", "base"), "latest-run.txt names", "pass --run DIR")
    (copy / "latest-run.txt").write_text("\n")
    assert_one_line(cli("eval", "--output", copy, "--split", "base"), "names no run")


def test_a_run_folder_under_a_linked_dataset_folder_is_the_latest_run(tmp_path):
    """runs/dtd may be a link to a bigger disk: the latest run written through it is found through it."""
    from mugcp.trainer.runs import mark_latest, resolve_run

    out, elsewhere = tmp_path / "runs", tmp_path / "bigdisk" / "dtd"
    run = elsewhere / "coop" / "b2n_shots2" / "seed1"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "prompt.safetensors").write_bytes(b"x")
    out.mkdir()
    (out / "dtd").symlink_to(elsewhere)
    mark_latest(out, out / "dtd" / "coop" / "b2n_shots2" / "seed1")
    assert (out / "latest-run.txt").read_text() == "dtd/coop/b2n_shots2/seed1\n"
    assert resolve_run(None, out).resolve() == run.resolve()


def test_a_path_that_is_not_utf8_is_one_line(tmp_path):
    bad = str(tmp_path) + "/bad" + b"\xff".decode("utf-8", "surrogateescape") + "name"
    assert_one_line(cli("report", bad), "is not valid UTF-8", "rename it")


def test_a_full_disk_anywhere_is_one_line(tmp_path, monkeypatch, capsys):
    """The last net: a write that no command turned into its own line (a full disk, a read-only mount) is one
    line and exit 2, never a traceback; any other OSError is mugcp's fault and keeps its traceback."""
    import errno

    import mugcp.trainer.report as report
    from mugcp.cli import main

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report.md"))

    monkeypatch.setattr(report, "write_report", full)
    with pytest.raises(SystemExit) as stop:
        main(["report", str(tmp_path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: No space left on device: {tmp_path / 'report.md'} (what finished is kept)\n"

    def fault(*_a, **_k):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(report, "write_report", fault)
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["report", str(tmp_path)])


def test_a_lock_that_cannot_record_its_holder_is_one_line(tmp_path, monkeypatch):
    import errno
    import os

    import mugcp.core.locks as locks
    from mugcp.core.errors import UserError

    def full(*_a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(locks.os, "pwrite", full)
    with pytest.raises(UserError, match=f"cannot write the run folder \\({tmp_path / '.lock'}\\): No space left"):
        with locks.hold(tmp_path / ".lock", "the run folder"):
            pass


def test_evaluations_share_a_run_folder_that_no_train_writes_meanwhile(world, tmp_path):
    """An evaluation holds the run folder's lock as a reader: evaluations at once are fine, a train (a writer,
    which could swap the weights under it or remove its temporary results file) is refused while one runs, and
    an evaluation while a train runs is refused naming it."""
    from mugcp.core.locks import hold

    out = tmp_path / "runs"
    shutil.copytree(world / "runs", out)
    run = out / RUN
    with hold(run / ".lock", "an evaluation", shared=True):  # another evaluation of the run
        r = cli("eval", "--run", run, "--split", "base", "--workers", "0")
        assert r.returncode == 0, r.stderr[-2000:]
        with pytest.raises(UserError, match="is in use by"):
            with hold(run / ".lock", "the run folder"):  # what `mugcp train` takes
                pass
    with hold(run / ".lock", "the run folder"):
        assert_one_line(cli("eval", "--run", run, "--split", "novel", "--workers", "0"), "is in use by pid")


def test_a_finished_run_resumed_is_kept_as_it_is(world, tiny_clip, tmp_path):
    """`--resume` of a finished run (a sweep that waited for another sweep to train it) trains nothing and keeps
    its weights' file untouched."""
    out = tmp_path / "runs"
    shutil.copytree(world / "runs", out)
    weights = out / RUN / "prompt.safetensors"
    before = (weights.read_bytes(), weights.stat().st_mtime_ns)
    r = cli(*train_args(world, tiny_clip, out, "--set", "optim.epochs=2", "--resume"))
    assert r.returncode == 0 and "holds this run, finished" in r.stdout + r.stderr, r.stderr[-2000:]
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == before
    assert (out / "latest-run.txt").read_text().strip() == str(RUN)


def test_a_lock_file_removed_by_its_holder_as_it_lets_go_is_not_held(tmp_path, monkeypatch):
    """A process that opened the lock file just before its holder removed it must not hold the removed file (a
    newcomer would lock the new one, and both would write): it takes the file now at the path."""
    import fcntl

    import mugcp.core.locks as locks

    path = tmp_path / ".lock-x"
    path.write_text("")
    real, calls = fcntl.flock, []

    def flock(fd, op):
        calls.append(op)
        if len(calls) == 1:  # the holder lets go and removes the file while this process takes the lock
            path.unlink()
            path.write_text("")
        return real(fd, op)

    monkeypatch.setattr(locks.fcntl, "flock", flock)
    with locks.hold(path, "the cache shard"):
        monkeypatch.setattr(locks.fcntl, "flock", real)
        assert len(calls) == 2 and locks.holders(tmp_path, ".lock-*") != []
    assert locks.holders(tmp_path, ".lock-*") == []


def test_a_finished_run_of_an_earlier_version_resumed_is_kept(world, tiny_clip, tmp_path):
    """An earlier version's record lacks the keys added since (`draw`), and its weights carry the hash of that
    record: `--resume` still knows the run as finished, and neither trains it again nor rewrites it."""
    from mugcp.trainer.checkpoints import load_tensors, save_tensors
    from mugcp.trainer.runs import identity_hash

    out = tmp_path / "runs"
    shutil.copytree(world / "runs", out)
    run = out / RUN
    record = json.loads((run / "run.json").read_text())
    del record["draw"]
    (run / "run.json").write_text(json.dumps(record))
    tensors, _ = load_tensors(run / "prompt.safetensors")
    save_tensors(run / "prompt.safetensors", tensors, {"run": identity_hash(record)})
    shutil.rmtree(run / "checkpoints")
    before = (run / "prompt.safetensors").stat().st_mtime_ns
    r = cli(*train_args(world, tiny_clip, out, "--set", "optim.epochs=2", "--resume"))
    assert r.returncode == 0 and "holds this run, finished" in r.stdout + r.stderr, r.stderr[-2000:]
    assert (run / "prompt.safetensors").stat().st_mtime_ns == before and "draw" not in json.loads(
        (run / "run.json").read_text())
