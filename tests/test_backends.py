"""Stage one's MLLM side: the prompts and their parsers, the server client and its faults, several
servers, the local engines' retry loop, and the three real backends."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import answers_by_path, assert_one_line, cli, extract_config, table_rows
from mugcp.core.errors import UserError
from mugcp.pipeline.backends.base import Answer, LocalBackend
from mugcp.pipeline.backends.server import MAX_BACKOFF, ServerBackend
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


def test_a_json_list_is_the_answer_only_if_it_holds_a_phrase():
    out = parse_phrases("Here are up to [8] phrases: red brick wall, grey mortar", 8)
    assert "8" not in out and "grey mortar" in out  # prose around a bracketed number is prose
    assert parse_phrases("[true, false]", 8) == parse_phrases("[1, 2]", 8) == []
    assert parse_phrases('[{"phrase": "red brick"}, {"phrase": "grey wall", "n": 2}]', 8) == ["red brick", "grey wall"]


def test_each_bracket_is_decoded_once_not_once_per_closing_bracket(monkeypatch):
    """Trying every closing bracket for every opening one took minutes on a few thousand nested brackets."""
    decoded, real = [], json.JSONDecoder.raw_decode

    def counted(self, s, idx=0):
        decoded.append(idx)
        return real(self, s, idx)

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", counted)
    assert parse_phrases("[" * 300 + "x" + "]" * 300, 8) == ["x"]  # no JSON in it: prose
    assert len(decoded) <= 301  # one decode per opening bracket (and one of the whole), not 300 x 300
    assert parse_phrases("[" * 3000 + "]" * 3000, 8) == []  # deeper than the decoder recurses: no error


def test_markdown_entities_and_heading_lines_are_left_out():
    assert parse_phrases("**Visual facts:**\n- **Colour:** red\n- **Texture:** rough and __bumpy__", 8) == [
        "Colour: red", "Texture: rough and bumpy"]
    assert parse_phrases("Here are the visual facts:\n## Red wall\n- grey &amp; white\n- &nbsp;", 8) == [
        "Red wall", "grey & white"]
    assert parse_phrases('["&nbsp;", "red &amp; grey"]', 8) == ["red & grey"]
    assert parse_sentences("Description:\nA red wall.", 8) == ["A red wall"]


@pytest.mark.parametrize("start", ["I'm sorry,", "I am sorry,", "Sorry,", "I can't", "I cannot", "I am unable to",
                                   "I’m unable to", "As an AI,"])
def test_a_refusal_gives_no_phrase(start):
    text = f"{start} describe this image: a red wall, grey mortar."
    assert parse_phrases(text, 8) == parse_sentences(text, 8) == parse_attributes(text, 8) == []
    assert parse_phrases("A red wall. Sorry, it is blurry", 8) == ["A red wall", "Sorry", "it is blurry"]
    airliner = "As an airliner taxis on the runway, its white fuselage gleams."
    assert parse_sentences(airliner, 8) == [airliner[:-1]] and len(parse_phrases(airliner, 8)) == 2  # no refusal


def test_markdown_marks_leave_other_hashes_and_underscores_alone():
    assert parse_phrases('["#7 jersey", "snake_case__label", "&amp;lt;tag"]', 8) == ["#7 jersey", "snake_case__label",
                                                                                     "&lt;tag"]


@pytest.mark.parametrize("text, expected", [
    ('["red brick wall", "grey mort', ["red brick wall"]),  # cut mid-phrase: that phrase is left out
    ('["red wall", "grey floor"] These describe', ["red wall", "grey floor"]),  # the list closed before the cut
    ("A red wall. Grey flo", ["A red wall"]),
    ("redbrickwallwith", [])])
def test_an_answer_cut_at_max_tokens_keeps_what_it_finished(text, expected):
    from mugcp.pipeline.prompts import finished_part

    assert parse_phrases(finished_part(text), 8) == expected


def test_an_over_long_phrase_is_cut_at_a_word():
    words = [f"word{i}" for i in range(40)]
    (out,) = parse_phrases(json.dumps([" ".join(words)]), 8)
    assert len(out) <= 120 and out.split() == words[:len(out.split())]


def test_cjk_text_is_split_at_its_own_punctuation():
    assert parse_phrases("红色的砖墙，灰色的砂浆、表面粗糙；有青苔。很旧", 8) == [
        "红色的砖墙", "灰色的砂浆", "表面粗糙", "有青苔", "很旧"]
    assert parse_sentences("这是红色的墙。表面粗糙，有青苔。", 8) == ["这是红色的墙", "表面粗糙，有青苔"]


def test_a_word_longer_than_clips_context_is_split_not_cut(frozen_tiny):
    tokenize = frozen_tiny.tokenize
    sentence = "红色砖墙" * 30  # no space to split at
    fitted = fit_phrases(tokenize, [sentence, "red wall"], 8)
    assert "".join(fitted[:-1]) == sentence and len(fitted) > 2 and fitted[-1] == "red wall"
    assert int(tokenize(fitted).argmax(-1).max()) < 76  # each keeps its EOT inside the 77 tokens


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
            return [Answer(text='["woven red fabric"]' if d == b"A" and seed is not None else "!!!") for d, _ in images]

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


class _Quiet(ThreadingHTTPServer):
    request_queue_size = 1024  # a backlog of 5 resets connections under the client's concurrency
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hangs up (a closed keep-alive connection) is no error of the server's


class ScriptedServer:
    """A loopback OpenAI-compatible server answering each chat request as the test says: `reply(n, request)`
    gives the nth request's (status, headers, body); `models` is its answer to GET /v1/models. It records
    the chat requests and the Authorization header of every request."""

    def __init__(self, reply, models=(200, {}, {"data": [{"id": "fake-mllm"}]})):
        self.requests, self.auth, lock = [], [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, headers, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.auth.append(self.headers.get("Authorization"))
                self._send(*models)

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.auth.append(self.headers.get("Authorization"))
                    server.requests.append(request)
                    n = len(server.requests)
                self._send(*reply(n, request))

        self.httpd = _Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "ScriptedServer":
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def chat(content, finish_reason="stop") -> tuple:
    """A chat completion: (status, headers, body)."""
    message = {"role": "assistant", "content": content}
    return 200, {}, {"choices": [{"message": message, "finish_reason": finish_reason}]}


def described(urls, images, **kw):
    """(answers, the backend after its run): what describe gives, and what the backend learnt on the way."""
    async def go():
        b = ServerBackend(urls, None, PROMPTS["phrases"], backoff=0.01, **kw)
        await b.start()
        try:
            return await b.describe(images), b
        finally:
            await b.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("message, why", [
    ({"content": 42}, "content is of type int"), ("a string", "message is of type str"),
    ({"content": [{"type": "text", "text": 3}]}, "content is of type list"), (None, "message is of type NoneType"),
])
def test_a_malformed_answer_fails_its_image_not_the_run(small_root, message, why):
    with ScriptedServer(lambda n, request: (200, {}, {"choices": [{"message": message}]})) as s:
        (a,) = describe(s.url, [jpeg(small_root)], retries=0)
    assert a.text is None and a.error.startswith("failed after 1 attempts: malformed response") and why in a.error


def test_content_given_as_parts_is_their_text(small_root):
    parts = [{"type": "text", "text": '["red brick",'}, {"type": "text", "text": ' "grey wall"]'}]
    with ScriptedServer(lambda n, request: chat(parts)) as s:
        (a,) = describe(s.url, [jpeg(small_root)])
    assert a.text == '["red brick", "grey wall"]'


def test_unprintable_characters_never_reach_the_cache(small_root, tiny_clip, tmp_path):
    """A lone surrogate (which Parquet cannot store), NUL and terminal escapes become spaces before parsing."""
    answer = '["red \ud83d brick", "\x1b[31mgrey\x00wall\x1b[0m"]'
    with ScriptedServer(lambda n, request: chat(answer)) as s:
        summary = run_extract("dtd", small_root, extract_config(tiny_clip, tmp_path / "cache", server_urls=[s.url],
                                                                splits=("test",)), log=lambda _: 0)
    rows = table_rows(tmp_path / "cache", "dtd", "answers")
    assert (summary.done, summary.failed) == (47, 0) and len(rows) == 47
    assert all(r["phrases"] == ["red brick", "grey wall"] and r["answer"].isprintable() for r in rows)
    assert Answer(text="a\x00b\x9b\tc\n").text == "a b \tc\n"  # the hf and vllm engines' answers too


def test_an_answer_cut_at_max_tokens_loses_its_unfinished_phrase(small_root, tiny_clip, tmp_path):
    for name, answer in (("two-whole", '["red brick wall", "grey rough surface", "wov'), ("none-whole", '["red bri')):
        lines = []
        with ScriptedServer(lambda n, request: chat(answer, finish_reason="length")) as s:
            summary = run_extract("dtd", small_root, extract_config(tiny_clip, tmp_path / name, server_urls=[s.url],
                                                                    splits=("test",), max_tokens=12), log=lines.append)
        rows = table_rows(tmp_path / name, "dtd", "answers")
        assert summary.cut == 47 and len(rows) == 47 and all(r["answer"] == answer for r in rows)
        assert sum("47 answer(s) were cut at --max-tokens 12" in line and "raise --max-tokens" in line
                   for line in lines) == 1
        if name == "two-whole":
            assert summary.done == 47 and all(r["phrases"] == ["red brick wall", "grey rough surface"] for r in rows)
        else:  # nothing whole is left: failed, saying what to do
            assert summary.failed == 47 and all(r["status"] == "failed" and "cut at --max-tokens 12" in r["error"] and
                                                "raise --max-tokens" in r["error"] for r in rows)


def test_a_400_about_the_image_keeps_structured_output(small_root):
    def reply(n, request):
        return (400, {}, {"error": "Unsupported image format: cannot decode"}) if n == 1 else chat('["red brick"]')

    with ScriptedServer(reply) as s:
        answers, backend = described(s.url, [jpeg(small_root)] * 4, concurrency=1)
    assert sum(a.error is not None and "HTTP 400" in a.error for a in answers) == 1
    assert all("response_format" in r for r in s.requests) and backend.notes == []


def test_a_server_that_refuses_structured_output_is_said_once(small_root, tiny_clip, tmp_path):
    def reply(n, request):
        if "response_format" in request:
            return 400, {}, {"error": {"message": "response_format json_schema is not supported"}}
        return chat("A red brick wall, grey mortar")

    lines = []
    with ScriptedServer(reply) as s:
        summary = run_extract("dtd", small_root, extract_config(tiny_clip, tmp_path / "cache", server_urls=[s.url],
                                                                splits=("test",), concurrency=8), log=lines.append)
    assert (summary.done, summary.failed) == (47, 0)  # the requests in flight when it refused are asked again
    told = [line for line in lines if "refused structured output" in line]
    assert len(told) == 1 and "parsed from free text" in told[0]


def test_retry_after_keeps_a_server_out_as_long_as_it_asks(small_root):
    with ScriptedServer(lambda n, request: (429, {"Retry-After": "3600"}, {"error": "slow down"})) as limited, \
            FakeServer() as steady:
        answers, backend = described([limited.url, steady.url], [jpeg(small_root)] * 10, concurrency=1)
    assert all(a.error is None for a in answers) and len(limited.requests) == 1
    out_for = backend.endpoints[0].down_until - time.monotonic()
    assert MAX_BACKOFF / 2 < out_for <= MAX_BACKOFF  # as long as asked, at most MAX_BACKOFF


def test_the_api_key_goes_with_every_request_and_nowhere_else(small_root, tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    with ScriptedServer(lambda n, request: chat('["red brick"]')) as s:
        r = cli(*extract_args(small_root, tmp_path / "cache", tiny_clip, "--server-url", s.url, "--splits", "test"))
        assert r.returncode == 0, r.stderr
        assert len(s.auth) > 47 and set(s.auth) == {"Bearer sk-secret-123"}  # /v1/models and every chat request
        r = cli(*extract_args(small_root, tmp_path / "other", tiny_clip, "--server-url", s.url, "--splits", "test",
                              "--api-key", "sk-given"))
        assert r.returncode == 0 and s.auth[-1] == "Bearer sk-given"  # the option wins over the environment
    assert "sk-" not in r.stdout + r.stderr
    assert not [f for f in tmp_path.rglob("*") if f.is_file() and b"sk-" in f.read_bytes()]


def test_a_refused_key_is_one_line_error(small_root, tiny_clip, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with ScriptedServer(lambda n, request: chat('["red brick"]'), models=(401, {}, {"error": "bad key"})) as s:
        wrong = cli(*extract_args(small_root, tmp_path / "cache", tiny_clip, "--server-url", s.url, "--all-images",
                                  "--api-key", "sk-wrong"))
        none = cli(*extract_args(small_root, tmp_path / "cache", tiny_clip, "--server-url", s.url, "--all-images"))
    assert_one_line(wrong, "refused the API key (HTTP 401)", "--api-key", "OPENAI_API_KEY")
    assert_one_line(none, "refused a request without an API key (HTTP 401)", "--api-key")
    assert "sk-wrong" not in wrong.stderr and not s.requests


def test_vllm_in_process_tells_an_answer_cut_at_max_tokens(monkeypatch):
    import types

    from mugcp.pipeline.backends.vllm_engine import VllmBackend
    from mugcp.pipeline.config import BackendConfig

    said = [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=t, finish_reason=f)])
            for t, f in (('["red bri', "length"), ('["red brick"]', "stop"))]
    engine = types.SimpleNamespace(chat=lambda conversations, params, use_tqdm: said)
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=lambda **kw: engine, SamplingParams=dict))
    vllm = VllmBackend.from_config(BackendConfig(kind="vllm", mllm="org/x", structured=False), PROMPTS["phrases"], 8)
    assert [(a.text, a.cut) for a in vllm._generate([(b"x", "image/png")] * 2)] == [('["red bri', True),
                                                                                  ('["red brick"]', False)]


def test_transformers_tells_an_answer_cut_at_max_tokens(tiny_mllm_dir, small_root):
    """Cut: it generated max_tokens tokens, none of them an end of sequence."""
    from mugcp.pipeline.backends.hf import HfBackend

    hf = HfBackend(str(tiny_mllm_dir), PROMPTS["phrases"], max_tokens=1, device="cpu")
    image = [(jpeg(small_root), "image/jpeg")]
    (cut,) = hf._generate(image)  # random weights: its one token is no end of sequence
    vocab = hf.model.get_output_embeddings().weight.shape[0]
    hf.model.generation_config.eos_token_id = list(range(vocab))  # any token ends it
    (ended,) = hf._generate(image)  # one token too, and it is an end
    assert cut.cut and not ended.cut


# -- the three real backends ----------------------------------------------------------------------

def test_hf_backend_end_to_end(small_root, tiny_clip, tiny_mllm_dir, tmp_path):
    r = cli(*extract_args(small_root, tmp_path / "cache", tiny_clip, "--backend", "hf", "--mllm", tiny_mllm_dir,
                          "--splits", "test", "--max-tokens", "16", "--batch-size", "16"))
    rows = answers_by_path(tmp_path / "cache")
    ok = [x for x in rows.values() if x["status"] == "ok"]
    assert len(rows) == 47 and all(x["answer"] for x in rows.values()), r.stderr
    # random weights never end an answer: each is cut at --max-tokens, its unfinished last phrase left out
    assert "47 answer(s) were cut at --max-tokens 16" in r.stderr
    assert all(x["status"] == "ok" or "cut at --max-tokens 16" in x["error"] for x in rows.values())
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


def test_a_new_backend_answers_under_its_own_model_and_one_lacking_the_protocol_is_refused(tiny_clip, tmp_path):
    """A backend added as documented records its answers under the model it names (its model_id), not under the
    default MLLM of the in-process engines; one that lacks part of the protocol is refused on one line."""
    from mugcp.pipeline.backends import base

    @base.register_backend("fixed-words")
    class FixedWords(base.ChunkedBackend):
        model_id = "fixed-words-v1"

        @classmethod
        def from_config(cls, config, prompt, k):
            return cls()

        async def start(self):
            pass

        async def aclose(self):
            pass

        async def describe(self, images):
            return [Answer(text='["red stripes", "white ground"]') for _ in images]

    @base.register_backend("no-stream")
    class NoStream:
        model_id = "x"

    try:
        write_synthetic_dtd(tmp_path, per_class=4, size=32)
        config = extract_config(tiny_clip, tmp_path / "cache", kind="fixed-words", splits=("test",), all_images=True)
        summary = run_extract("dtd", tmp_path, config, log=lambda _: 0)
        assert summary.failed == 0 and summary.done > 0
        (table,) = (tmp_path / "cache/dtd/answers").iterdir()
        assert table.name.startswith("fixed-words-v1-") and table.name.endswith("--scp-v1-k8")
        with pytest.raises(UserError, match="--backend no-stream .* lacks from_config, start, stream, aclose"):
            base.backend_class("no-stream")
    finally:  # the other tests see the registry as the package made it
        base._REGISTRY.pop("fixed-words", None)
        base._BROKEN.pop("no-stream", None)
