"""The bounded load client counts what a client sees: only HTTP 200 with
[DONE] is ok; everything else is counted with its reason and time."""

import itertools
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from disagg.lab.load import Load


def test_ok_only_with_done_every_failure_counted_with_its_reason():
    answers = itertools.cycle(["done", "503", "cut"])
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                answer = next(answers)
            if answer == "503":
                page = b"<html><body><h1>503 Service Unavailable</h1>\nNo server is available</body></html>"
                self.send_response(503)
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
                return
            body = b'data: {"choices":[]}\n\n' + (b"data: [DONE]\n\n" if answer == "done" else b"")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Load(f"http://127.0.0.1:{server.server_port}", "m", concurrency=2) as load:
            time.sleep(1)
    finally:
        server.shutdown()
    r = load.result
    assert r.sent == r.ok + r.failed and r.sent >= 6
    assert set(r.reasons()) == {
        # who answered a refusal, in its words without markup
        "HTTP 503: 503 Service Unavailable No server is available",
        "stream ended without [DONE]",
    }
    assert 0.2 <= r.ok / r.sent <= 0.45  # one ok in three
    assert all(0 <= sent <= ended <= r.seconds for sent, ended, _ in r.failures)
    assert r.failed_between(0, r.seconds) == r.failed
    assert f"{r.sent} sent, {r.failed} failed" in r.summary()
