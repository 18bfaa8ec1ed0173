"""A loopback stand-in for an OpenAI-compatible MLLM server: instant, deterministic, with faults on demand.

The answer is derived from the image bytes, so two runs give identical caches. Faults: the
first `fail_first` chat requests get HTTP 500; after `die_after` requests every request gets
HTTP 503; after `crash_after` requests it hangs up mid-request and stops listening (a killed
server); `delay` seconds per request; `garbage` answers with no usable phrase. `answer` replaces
the default answer: a function of the image's bytes (bench/world_oracle_scp.py answers with an
image's true attributes).
Used by the tests (resume, retries, faults) and by bench/extract.py (client overhead).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

WORDS = ["striped", "red", "woven", "dotted", "rough", "blue", "grid", "smooth", "wavy", "metal", "fabric", "pale"]


def answer_for(image_url: str) -> str:
    digest = hashlib.sha256(image_url.encode()).digest()
    phrases = [f"{WORDS[digest[i] % len(WORDS)]} {WORDS[digest[i + 1] % len(WORDS)]} texture" for i in range(0, 8, 2)]
    return json.dumps(phrases)


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the default backlog of 5 resets connections under a client's full concurrency


class FakeServer:
    def __init__(self, model: str = "fake-mllm", fail_first: int = 0, die_after: int | None = None,
                 delay: float = 0.0, garbage: bool = False, crash_after: int | None = None,
                 answer: Callable[[bytes], str] | None = None):
        self.model, self.fail_first, self.die_after, self.crash_after = model, fail_first, die_after, crash_after
        self.answered = 0  # chat requests answered with a description
        self.delay, self.garbage, self.answer = delay, garbage, answer
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
                if server.crash_after is not None and n > server.crash_after:  # gone, mid-request, like a kill -9
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.wfile = io.BytesIO()  # nothing more reaches the client
                    threading.Thread(target=server.stop, daemon=True).start()
                    return None
                url = body["messages"][0]["content"][0]["image_url"]["url"]
                if server.garbage:
                    text = "!!! ???"
                elif server.answer is not None:
                    text = server.answer(base64.b64decode(url.split(",", 1)[1]))
                else:
                    text = answer_for(url)
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})
                with server.lock:
                    server.answered += 1

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.stopped = threading.Event()

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: new connections are refused from now on."""
        if not self.stopped.is_set():
            self.stopped.set()
            self.httpd.shutdown()
            self.httpd.server_close()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # `python stand_in_server.py [delay]`: serve until killed, print the URL
    import sys

    with FakeServer(delay=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0) as s:
        print(s.url, flush=True)
        threading.Event().wait()
