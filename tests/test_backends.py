"""Stage one's MLLM side: the prompts and their parsers, the server client and its faults, several
servers, the local engines' retry loop, and the three real backends."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import answers_by_path, assert_one_line, cli, extract_config, table_rows
from mugcp.core.errors import UserError
from mugcp.pipeline.backends.base import LocalBackend
from mugcp.pipeline.backends.server import ServerBackend
from mugcp.pipeline.extract import run_extract
from mugcp.pipeline.prompts import PROMPTS, parse_attributes, parse_phrases, parse_sentences, question
from mugcp.pipeline.scp import fit_phrases
from mugcp.world.stand_in_server import FakeServer
from mugcp.world.synth import DTD_CLASSES, write_synthetic_dtd


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Synthetic DTD with 4 images per class: 188 images (94 train, 47 val, 47 test)."""
    root = tmp_path_factory.mktemp("small")
    write_synthetic_dtd(root, per_class=4, size=48)
    return root


# -- prompts and parsing ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('["red brick wall", "rough texture"]', ["red brick wall", "rough texture"]),
    ('Here you go:\n```json\n["a", "blue dots", "a"]\n```', ["a", "blue dots"]),
    ("- striped fabric\n- blue and white\n3. woven", ["striped fabric", "blue and white", "woven"]),
    ("A red wall. It is rough, bumpy", ["A red wall", "It is rough", "bumpy"]),
    ("", []), (None, []), ("?? !! ...", []), ('["x"', ["x"]),
])
def test_parse_phrases(text, expected):
    assert parse_phrases(text, 8) == expected


def test_parse_phrases_caps_count_and_length():
    text = json.dumps([f"phrase {i} " + "long " * 50 for i in range(20)])
    out = parse_phrases(text, 8)
    assert len(out) == 8 and all(len(p) <= 120 for p in out)


def test_caption_sentences_are_split_to_fit_clip(frozen_tiny):
    long = "A " + " ".join(f"word{i}" for i in range(100)) + " at the end"
    out = parse_sentences(f"A striped red fabric. {long}.\nIt lies on a table.", 8)
    assert out == ["A striped red fabric", long, "It lies on a table"]
    assert parse_sentences("one. two. three. four.", 2) == ["one", "two"]
    fitted = fit_phrases(frozen_tiny.tokenize, out, 8)
    assert fitted[0] == out[0] and fitted[-1] == out[-1] and len(fitted) > 3
    assert " ".join(fitted[1:-1]) == long  # split into runs of words, nothing lost
    assert int(frozen_tiny.tokenize(fitted).argmax(-1).max()) < 76  # each keeps its EOT inside the 77 tokens
    assert len(fit_phrases(frozen_tiny.tokenize, out, 2)) == 2


def test_attribute_answers_become_named_phrases():
    text = 'Sure: {"colours": ["red", "white"], "texture": "woven", "scene": "", "parts": 3}'
    assert parse_attributes(text, 8) == ["colours: red and white", "texture: woven", "parts: 3"]
    assert parse_attributes("red fabric, woven", 8) == ["red fabric", "woven"]  # no JSON object: phrases


def test_prompts_are_versioned_and_never_name_a_class():
    assert len({p.version for p in PROMPTS.values()}) == len(PROMPTS)
    for prompt in PROMPTS.values():
        words = set(prompt.question(8).lower().replace(",", " ").replace(".", " ").split())
        assert not words & set(DTD_CLASSES), prompt.name
        assert "8" in prompt.question(8)
    assert question(5) == PROMPTS["phrases"].question(5)


# -- the server client and its faults --------------------------------------------------------------

def describe(urls, images, prompt="phrases", **kw):
    async def go():
        b = ServerBackend(urls, None, PROMPTS[prompt], backoff=0.01, **kw)
        await b.start()
        try:
            return await b.describe(images)
        finally:
            await b.aclose()

    return asyncio.run(go())


def jpeg(small_root):
    return next((small_root / "dtd" / "images").rglob("*.jpg")).read_bytes()


def test_retries_after_5xx_then_succeeds(small_root):
    with FakeServer(fail_first=2) as s:
        (a,) = describe(s.url, [jpeg(small_root)], retries=3)
        assert a.error is None and parse_phrases(a.text) and s.requests == 3


def test_gives_up_after_retries_and_reports(small_root):
    with FakeServer(fail_first=100) as s:
        (a,) = describe(s.url, [jpeg(small_root)], retries=2)
        assert a.text is None and "after 3 attempts" in a.error and s.requests == 3


def test_garbage_answer_is_a_failure_not_a_row(small_root):
    with FakeServer(garbage=True) as s:
        (a,) = describe(s.url, [jpeg(small_root)], retries=2)
        assert "no usable phrase" in a.error
        assert s.temperatures == [0.0, 0.7, 0.7]  # greedy first; the retries sample, or they would repeat it


def test_server_errors_are_retried_greedy(small_root):
    with FakeServer(fail_first=1) as s:
        (a,) = describe(s.url, [jpeg(small_root)], retries=1)
        assert a.error is None and s.temperatures == [0.0, 0.0]


def test_timeout_is_retried_then_failed(small_root):
    with FakeServer(delay=1.0) as s:
        (a,) = describe(s.url, [jpeg(small_root)], retries=1, timeout=0.2)
        assert a.error and "Timeout" in a.error


def test_corrupt_image_fails_alone(small_root):
    with FakeServer() as s:
        good, bad = describe(s.url, [jpeg(small_root), b"\x00not an image"])
        assert good.error is None and "unreadable image" in bad.error
        assert "BytesIO" not in bad.error  # the reason names the problem, not a Python object


def test_requests_go_to_the_least_busy_server(small_root):
    images = [jpeg(small_root)] * 40
    with FakeServer(delay=0.05) as slow, FakeServer() as fast:
        answers = describe([slow.url, fast.url], images, concurrency=4)
    assert all(a.error is None for a in answers)
    assert fast.requests > slow.requests > 0  # both used; the one that answers sooner gets more


def test_a_server_killed_mid_run_loses_nothing(small_root, tiny_clip, tmp_path):
    """One of two servers hangs up mid-request and stops listening: its images go to the other, none is lost."""
    with FakeServer(crash_after=15) as dying, FakeServer() as steady:
        summary = run_extract("dtd", small_root, extract_config(
            tiny_clip, tmp_path / "cache", server_urls=[dying.url, steady.url], all_images=True, concurrency=4,
            splits=("train", "val", "test"),
            batch_size=8), log=lambda _: 0)
    assert dying.stopped.is_set() and dying.answered == 15
    assert (summary.done, summary.failed) == (188, 0)
    rows = answers_by_path(tmp_path / "cache")
    assert len(rows) == 188 and all(r["status"] == "ok" for r in rows.values())
    assert len(table_rows(tmp_path / "cache", "dtd", "scp")) == 188


def test_servers_must_serve_the_same_model(small_root):
    with FakeServer(model="a") as one, FakeServer(model="b") as other:
        with pytest.raises(UserError, match="serve different models"):
            describe([one.url, other.url], [jpeg(small_root)])


def test_local_backends_regenerate_unusable_answers_sampled(monkeypatch):
    """hf and vllm share this loop: greedy first, then only the failed images again, sampled with new seeds."""
    class Scripted(LocalBackend):
        kind = "scripted"

        def __init__(self, retries):
            super().__init__(PROMPTS["phrases"], k=8, retries=retries)
            self.calls = []

        def _generate(self, images, seed=None):
            self.calls.append((len(images), seed))
            # image b"A" answers well only when sampled; b"B" never does
            return ['["woven red fabric"]' if d == b"A" and seed is not None else "!!!" for d, _ in images]

    monkeypatch.setattr("mugcp.pipeline.backends.base.check_image", lambda d: ("image/png", None))
    backend = Scripted(retries=2)
    ok, never = asyncio.run(backend.describe([b"A", b"B"]))
    assert ok.text == '["woven red fabric"]'
    assert never.error.startswith("failed after 3 attempts: no usable phrase")
    assert backend.calls == [(2, None), (2, 1), (1, 2)]


def extract_args(root, cache, tiny_clip, *extra):
    return ["extract", "--dataset", "dtd", "--root", root, "--cache-dir", cache, "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], *extra]


def test_server_down_is_one_line_error(small_root, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    assert_one_line(cli(*extract_args(small_root, cache, tiny_clip, "--server-url", "http://127.0.0.1:9",
                                      "--all-images")), "cannot reach")
    with FakeServer(model="served-model") as s:
        r = cli(*extract_args(small_root, cache, tiny_clip, "--server-url", s.url, "--mllm", "other", "--all-images"))
        assert_one_line(r, "serves served-model, not --mllm other")
    assert not list(cache.rglob("*"))  # nothing was written for a server that could not work, not even a folder


def test_unwritable_cache_dir(small_root, tiny_clip, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with FakeServer() as s:
        r = cli(*extract_args(small_root, blocker / "cache", tiny_clip, "--server-url", s.url, "--all-images"))
    assert_one_line(r, "cannot write the cache")


# -- the three real backends ----------------------------------------------------------------------

def test_hf_backend_end_to_end(small_root, tiny_clip, tiny_mllm_dir, tmp_path):
    r = cli(*extract_args(small_root, tmp_path / "cache", tiny_clip, "--backend", "hf", "--mllm", tiny_mllm_dir,
                          "--splits", "test", "--max-tokens", "16", "--batch-size", "16"))
    rows = answers_by_path(tmp_path / "cache")
    ok = [x for x in rows.values() if x["status"] == "ok"]
    assert len(rows) == 47 and ok, r.stderr
    assert r.returncode == (0 if len(ok) == 47 else 1)
    assert all(x["mllm"] == str(tiny_mllm_dir) for x in rows.values())


def test_unknown_mllm_is_one_line_error(small_root, tiny_clip, tmp_path):
    r = cli(*extract_args(small_root, tmp_path / "cache", tiny_clip, "--backend", "hf", "--mllm", tmp_path / "none",
                          "--all-images"))
    assert_one_line(r, "cannot load MLLM")


def test_vllm_backend_loads_the_revision_asked_for(monkeypatch):
    """The model and its tokenizer at the same Hub revision (vLLM's own argument names), none by default."""
    import types

    from mugcp.pipeline.backends.vllm_engine import VllmBackend
    from mugcp.pipeline.config import BackendConfig

    built = []
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=lambda **kw: built.append(kw)))
    for revision in ("v2", None):
        VllmBackend.from_config(BackendConfig(kind="vllm", mllm="org/x", revision=revision, structured=False),
                                PROMPTS["phrases"], 8)
        assert (built[-1]["model"], built[-1]["revision"], built[-1]["tokenizer_revision"]) == ("org/x", revision,
                                                                                              revision)


def test_real_vllm_server_backend(vllm_server, small_root, tiny_clip, tmp_path):
    r = cli(*extract_args(small_root, tmp_path / "cache", tiny_clip, "--server-url", vllm_server, "--splits", "test",
                          "--max-tokens", "24"))
    rows = answers_by_path(tmp_path / "cache")
    assert len(rows) == 47, r.stderr
    ok = [x for x in rows.values() if x["status"] == "ok"]
    assert ok and all(x["answer"] for x in ok)
    assert r.returncode == (0 if len(ok) == 47 else 1)


def test_real_vllm_in_process_backend(vllm_env, installed, tiny_mllm_dir, small_root, tiny_clip, tmp_path):
    from mugcp.world.vllm_cpu import vllm_environ

    cmd = [str(vllm_env / "bin" / "python"), "-m", "mugcp", *map(str, extract_args(
        small_root, tmp_path / "cache", tiny_clip, "--backend", "vllm", "--mllm", tiny_mllm_dir, "--splits", "test",
        "--max-tokens", "24", "--device", "cpu"))]
    r = subprocess.run(cmd, capture_output=True, text=True, env=vllm_environ(PYTHONPATH=str(installed)), timeout=600,
                       cwd=tmp_path)  # not the checkout: there `mugcp` is only the top floor
    rows = answers_by_path(tmp_path / "cache")
    assert len(rows) == 47, r.stderr[-3000:]
    assert any(x["status"] == "ok" for x in rows.values())
    assert {x["mllm"] for x in rows.values()} == {str(Path(tiny_mllm_dir))}
