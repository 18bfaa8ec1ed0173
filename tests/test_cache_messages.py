"""What stage one and the cache tell the user: the `mugcp extract` commands that errors suggest fill the gap as
printed, counts say what happened, and bad input is one line that leaves nothing behind."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from conftest import assert_one_line, cli, extract_config
from mugcp.core.coop_datasets import load_dataset
from mugcp.core.errors import UserError
from mugcp.core.scp_cache import read_scp
from mugcp.pipeline.extract import run_extract
from mugcp.world.stand_in_server import FakeServer
from mugcp.world.synth import write_synthetic_dtd


@pytest.fixture(scope="module")
def roomy_root(tmp_path_factory):
    """Synthetic DTD with 10 images per class (5 train, 2 val, 3 test): room for a selection to matter."""
    root = tmp_path_factory.mktemp("roomy")
    write_synthetic_dtd(root, per_class=10, size=32)
    return root


def extract_args(root, cache, tiny_clip, *extra):
    return ["extract", "--dataset", "dtd", "--root", root, "--cache-dir", cache, "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], *extra]


def train_args(root, cache, tiny_clip, out, *extra):
    return ["train", "--dataset", "dtd", "--root", root, "--cache-dir", cache, "--clip", tiny_clip[0], "--pretrained",
            tiny_clip[1], "--output", out, "--workers", "0", "--set", "optim.epochs=1", *extra]


def suggested(stderr: str) -> list[str]:
    """The arguments of the `mugcp extract ...` command an error line suggests."""
    command = re.search(r"`(mugcp extract [^`]*)`", stderr).group(1)
    return shlex.split(command)[1:]


def partial_cache(root, tiny_clip, cache):
    """The cache of 1 shot, seed 1, from the stand-in server (MLLM fake-mllm)."""
    with FakeServer() as s:
        run_extract("dtd", root, extract_config(tiny_clip, cache, server_urls=[s.url], shots=(1,), seeds=(1,)),
                    log=lambda _: 0)


# -- the commands that errors suggest ------------------------------------------------------------------

def test_the_suggested_command_names_the_mllm_and_backend_and_fills_the_gap(roomy_root, tiny_clip, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "runs"
    partial_cache(roomy_root, tiny_clip, cache)
    r = cli(*train_args(roomy_root, cache, tiny_clip, out, "--shots", "2", "--seed", "3", "--subsample", "all"))
    assert_one_line(r, "have no SCP", "--shots 2 --seeds 3", "--mllm fake-mllm", "--backend server")
    args = suggested(r.stderr)
    assert args.count("--mllm") == 1 and args.count("--backend") == 1
    with FakeServer() as s:  # the server's address is the one thing a cache cannot know
        filled = cli(*args, "--server-url", s.url)
        assert filled.returncode == 0, filled.stderr
        assert s.requests > 0
    r = cli(*train_args(roomy_root, cache, tiny_clip, out, "--shots", "2", "--seed", "3", "--subsample", "all"))
    assert r.returncode == 0, r.stderr


def test_an_unknown_mllm_is_named_once(roomy_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    partial_cache(roomy_root, tiny_clip, cache)
    r = cli(*train_args(roomy_root, cache, tiny_clip, tmp_path / "runs", "--shots", "1", "--seed", "1", "--mllm",
                        "nope"))
    assert_one_line(r, "no cache for dtd from MLLM nope", "--mllm nope")
    args = suggested(r.stderr)
    # no table says how "nope" answers: no placeholder a pasted command would fail on; extract's default backend
    assert args.count("--mllm") == 1 and "--backend" not in args and "BACKEND" not in r.stderr


def test_the_answers_table_records_its_backend(roomy_root, tiny_clip, tmp_path):
    partial_cache(roomy_root, tiny_clip, tmp_path / "cache")
    meta = json.loads(next((tmp_path / "cache" / "dtd" / "answers").glob("*/meta.json")).read_text())
    assert meta["backend"] == "server"


def test_a_base_to_novel_hint_names_the_class_subset(roomy_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    partial_cache(roomy_root, tiny_clip, cache)
    r = cli(*train_args(roomy_root, cache, tiny_clip, tmp_path / "runs", "--shots", "2", "--seed", "3"))
    assert_one_line(r, "have no SCP", "--train-classes base", "--mllm fake-mllm")
    with FakeServer() as s:
        assert cli(*suggested(r.stderr), "--server-url", s.url).returncode == 0
    assert cli(*train_args(roomy_root, cache, tiny_clip, tmp_path / "runs", "--shots", "2", "--seed", "3")).returncode == 0


# -- what extract says --------------------------------------------------------------------------------

def test_rewriting_identical_bytes_is_not_a_change(tiny_clip, tmp_path):
    root = tmp_path / "data"
    write_synthetic_dtd(root, per_class=4, size=32)
    cache = tmp_path / "cache"
    with FakeServer() as s:
        config = extract_config(tiny_clip, cache, server_urls=[s.url], splits=("test",), all_images=True)
        run_extract("dtd", root, config, log=lambda _: 0)
        for item in load_dataset("dtd", root).test:  # new mtime, same bytes
            path = root / "dtd" / item.path
            path.write_bytes(path.read_bytes())
        lines = []
        summary = run_extract("dtd", root, config, log=lines.append)
    assert (summary.changed, summary.done, summary.skipped) == (0, 0, 47)
    assert not any("changed" in line for line in lines), lines


def test_a_damaged_part_is_named_by_its_full_path(roomy_root, tiny_clip, tmp_path, frozen_tiny):
    cache = tmp_path / "cache"
    partial_cache(roomy_root, tiny_clip, cache)
    part = next((cache / "dtd" / "scp").rglob("part-*.parquet"))
    data = bytearray(part.read_bytes())
    middle = len(data) // 2  # inside the SCP column, the bulk of the file
    data[middle - 200:middle + 200] = b"x" * 400  # a damaged page: Arrow's own message names no file
    part.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        read_scp(cache, "dtd", frozen_tiny.model_id, [i.path for i in load_dataset("dtd", roomy_root).test])
    assert str(part) in str(e.value) and "\n" not in str(e.value)
    part.write_bytes(part.read_bytes()[:200])  # a truncated file: Arrow's message names it
    with pytest.raises(UserError) as e:
        read_scp(cache, "dtd", frozen_tiny.model_id, [i.path for i in load_dataset("dtd", roomy_root).test])
    assert f"{part} cannot be read" in str(e.value) and "\n" not in str(e.value)


def test_a_changed_byte_inside_a_page_is_an_error_not_wrong_scp(roomy_root, tiny_clip, tmp_path, frozen_tiny):
    """Pages carry checksums: one byte changed in the SCP column's compressed data, which can still decompress to
    other numbers, is named as damage."""
    import pyarrow.parquet as pq

    cache = tmp_path / "cache"
    partial_cache(roomy_root, tiny_clip, cache)
    part = next((cache / "dtd" / "scp").rglob("part-*.parquet"))
    meta = pq.ParquetFile(part).metadata.row_group(0)
    column = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema.startswith("scp"))
    data = bytearray(part.read_bytes())
    spot = column.data_page_offset + column.total_compressed_size // 2  # inside the page's payload
    data[spot] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        read_scp(cache, "dtd", frozen_tiny.model_id, [i.path for i in load_dataset("dtd", roomy_root).test])
    assert f"{part} cannot be read" in str(e.value) and "\n" not in str(e.value)


def test_a_refused_extract_leaves_no_lock_named_after_its_input(roomy_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    with FakeServer() as s:
        r = cli(*extract_args(roomy_root, cache, tiny_clip, "--server-url", s.url, "--mllm", "/nonexistent"))
        assert_one_line(r, "not --mllm /nonexistent")
        assert not list(cache.rglob(".lock-*"))
        assert cli(*extract_args(roomy_root, cache, tiny_clip, "--server-url", s.url, "--splits", "test",
                                 "--all-images")).returncode == 0
    assert len(list(cache.rglob(".lock-*"))) == 1  # a shard that holds answers keeps its lock file


# -- options checked before anything is read or written ---------------------------------------------------

@pytest.mark.parametrize("url", ["notaurl", "ftp://x", "http://"])
def test_a_server_url_must_be_http(roomy_root, tiny_clip, tmp_path, url):
    r = cli(*extract_args(roomy_root, tmp_path / "cache", tiny_clip, "--server-url", url))
    assert_one_line(r, f"--server-url '{url}' is not an http(s) URL")
    assert not (tmp_path / "cache").exists()


def test_an_unknown_backend_is_refused_before_the_scan(roomy_root, tiny_clip, tmp_path):
    lines = []
    with pytest.raises(UserError, match="unknown --backend 'nope'"):
        run_extract("dtd", roomy_root, extract_config(tiny_clip, tmp_path / "cache", backend="nope"),
                    log=lines.append)
    assert lines == [] and not (tmp_path / "cache").exists()


def test_an_empty_shot_count_is_refused(roomy_root, tiny_clip, tmp_path):
    assert_one_line(cli(*extract_args(roomy_root, tmp_path / "cache", tiny_clip, "--shots", "2,,4")), "--shots '2,,4'")


# -- cache migrate ----------------------------------------------------------------------------------

def test_migrate_refuses_a_missing_or_non_folder_cache(tmp_path):
    assert_one_line(cli("cache", "migrate", "--cache-dir", tmp_path / "nonexistent"), "nonexistent", "not found")
    (tmp_path / "file").write_text("x")
    assert_one_line(cli("cache", "migrate", "--cache-dir", tmp_path / "file"), "is not a folder")
    r = cli("cache", "migrate", "--cache-dir", tmp_path)
    assert r.returncode == 0 and "nothing to migrate" in r.stdout


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"schema_version": 1, "dataset": "dtd"})])
def test_migrate_names_a_damaged_meta_file(tmp_path, content):
    meta = tmp_path / "junkcache" / "dtd" / "foo" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(content)
    assert_one_line(cli("cache", "migrate", "--cache-dir", tmp_path / "junkcache"), str(meta))


def test_cache_list_tells_what_each_table_holds(roomy_root, tiny_clip, tmp_path):
    """`mugcp cache list`: per dataset, each MLLM's answers (prompt, k, described and failed, by their latest
    answer) and the SCP each CLIP embedded from them, counted from the tables themselves."""
    cache = tmp_path / "cache"
    partial_cache(roomy_root, tiny_clip, cache)
    with FakeServer(garbage=True) as s:  # a second prompt, whose answers are all unusable
        run_extract("dtd", roomy_root, extract_config(tiny_clip, cache, server_urls=[s.url], shots=(1,), seeds=(1,),
                                                      prompt="caption"), log=lambda _: 0)
    draw = load_dataset("dtd", roomy_root)
    described = len({i.path for i in draw.test}) + 47  # every test image, and one shot per class
    r = cli("cache", "list", "--cache-dir", cache)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"dtd: {described} image path(s) indexed"
    phrases = next(i for i, line in enumerate(lines) if "prompt phrases (scp-v1)" in line)
    assert "k 8, --max-tokens" in lines[phrases] and f": {described} described, 0 failed" in lines[phrases]
    assert lines[phrases + 1].startswith("    SCP for CLIP mugcp-tiny-clip@") and lines[phrases + 1].endswith(
        f": {described} embedded")
    caption = next(line for line in lines if "prompt caption" in line)
    ok, failed = map(int, re.search(r": (\d+) described, (\d+) failed", caption).groups())
    assert ok + failed == described and failed > 0
    assert_one_line(cli("cache", "list", "--cache-dir", cache, "--dataset", "eurosat"), "holds nothing for eurosat")
    # an answers table moved away (what a damaged one's message asks): its SCP, still readable, is still listed
    answers = next(p for p in (cache / "dtd" / "answers").iterdir() if "scp-v1" in p.name)
    answers.rename(tmp_path / "moved")
    lines = cli("cache", "list", "--cache-dir", cache).stdout.splitlines()
    orphan = next(line for line in lines if "whose answers table is not here" in line)
    assert orphan.startswith("  SCP for CLIP mugcp-tiny-clip@") and f": {described} embedded, from fake-mllm" in orphan
