"""A loopback stand-in for an OpenAI-compatible MLLM server: instant, deterministic, with faults on demand.

The answer is derived from the image bytes, so two runs give identical caches. Faults: the
first `fail_first` chat requests get HTTP 500; after `die_after` requests every request gets
HTTP 503; `delay` seconds per request; `garbage` answers with no usable phrase.
Used by the tests (resume, retries, faults) and by bench/extract.py (client overhead).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ["striped", "red", "woven", "dotted", "rough", "blue", "grid", "smooth", "wavy", "metal", "fabric", "pale"]


def answer_for(image_url: str) -> str:
    digest = hashlib.sha256(image_url.encode()).digest()
    phrases = [f"{WORDS[digest[i] % len(WORDS)]} {WORDS[digest[i + 1] % len(WORDS)]} texture" for i in range(0, 8, 2)]
    return json.dumps(phrases)


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the default backlog of 5 resets connections under a client's full concurrency


class FakeServer:
    def __init__(self, model: str = "fake-mllm", fail_first: int = 0, die_after: int | None = None,
                 delay: float = 0.0, garbage: bool = False):
        self.model, self.fail_first, self.die_after = model, fail_first, die_after
        self.delay, self.garbage = delay, garbage
        self.requests = 0
        self.temperatures: list = []  # of the chat requests, in order
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path in ("/health", "/v1/models"):
                    self._send(200, {"data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with server.lock:
                    server.requests += 1
                    server.temperatures.append(body.get("temperature"))
                    n = server.requests
                if server.delay:
                    time.sleep(server.delay)
                if n <= server.fail_first:
                    return self._send(500, {"error": "injected failure"})
                if server.die_after is not None and n > server.die_after:
                    return self._send(503, {"error": "server going down"})
                url = body["messages"][0]["content"][0]["image_url"]["url"]
                text = "!!! ???" if server.garbage else answer_for(url)
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


if __name__ == "__main__":  # `python tests/fake_openai_server.py [delay]`: serve until killed, print the URL
    import sys

    with FakeServer(delay=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0) as s:
        print(s.url, flush=True)
        threading.Event().wait()
