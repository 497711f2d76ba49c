import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from disagg.cli import main
from disagg.core.errors import HostError
from disagg.perf import bench, extras
from disagg.perf.bench import Target, Traffic, aiperf_command


def pairs(cmd: list[str]) -> list[tuple[str, str]]:
    return list(zip(cmd, cmd[1:]))


def test_aiperf_command_sends_the_reference_traffic(tmp_path):
    target = Target("http://head:8000", "context_tp2dp4_generate_tp8dp1", "llama", "/tok")
    cmd = aiperf_command("aiperf", target, Traffic(), 16, tmp_path / "c16")
    p = pairs(cmd)
    for flag, value in [
        ("--isl", "3000"),
        ("--isl-stddev", "0"),
        ("--osl", "150"),
        ("--osl-stddev", "0"),
        ("--concurrency", "16"),
        ("--request-count", "160"),
        ("--endpoint-type", "chat"),
        ("--tokenizer", "/tok"),
        ("--url", "http://head:8000"),
        ("--model", "llama"),
        ("--random-seed", "0"),
        ("--artifact-dir", str(tmp_path / "c16")),
        ("--ui", "none"),
    ]:
        assert (flag, value) in p, flag
    extra = [v for f, v in p if f == "--extra-inputs"]
    assert extra == ["max_tokens:150", "min_tokens:150", "ignore_eos:true"]
    assert "--streaming" in cmd and "--no-gpu-telemetry" in cmd
    assert ("--warmup-request-count", "2") in p


def test_unreachable_url_fails_in_one_line_before_aiperf(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "aiperf_binary", lambda: "/bin/false")
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--url",
            "http://127.0.0.1:9",
            "--label",
            "baseline_tp1dp1",
            "--model",
            "m",
            "--tokenizer",
            "t",
            "-o",
            str(tmp_path),
        ],
    )
    assert result.exit_code != 0
    assert result.output.count("\n") == 1 and "http://127.0.0.1:9 is unreachable" in result.output
    assert list(tmp_path.iterdir()) == []


def test_missing_aiperf_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(extras.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(extras.shutil, "which", lambda name: None)
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--url",
            "http://127.0.0.1:9",
            "--label",
            "baseline_tp1dp1",
            "--model",
            "m",
            "--tokenizer",
            "t",
            "-o",
            str(tmp_path),
        ],
    )
    assert result.exit_code != 0 and "pip install 'disagg[bench]'" in result.output


def test_bench_needs_a_target_and_valid_concurrencies():
    runner = CliRunner()
    assert "give -i INVENTORY" in runner.invoke(main, ["bench", "--url", "http://x"]).output
    bad = runner.invoke(main, ["bench", "--url", "http://x", "--concurrency", "1,zero"])
    assert bad.exit_code != 0


def test_configuration_in_words():
    from disagg.core.topology import Topology

    assert Topology.parse("context_tp2dp4_generate_tp8dp1").configuration == "4 x TP2 context + 1 x TP8 generate"
    assert Topology.parse("baseline_tp4dp2").configuration == "2 x TP4 aggregated"


def test_bench_refuses_a_router_that_serves_another_layout():
    """A real HTTP server on loopback answering like vllm-router."""
    routed = ["http://10.0.0.1:8100", "http://10.0.0.1:8101"]

    class Router(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"workers": [{"url": u, "worker_type": "regular"} for u in routed]}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body if self.path == "/workers" else b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Router)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        bench.check_deployed(url, "baseline_tp1dp2", routed)  # matches: no error
        with pytest.raises(HostError, match="routes to http://10.0.0.1:8100, http://10.0.0.1:8101, not to"):
            bench.check_deployed(
                url, "context_tp1dp2_generate_tp1dp1", ["http://10.0.0.1:8100", "http://10.0.0.2:8100"]
            )
        # a router without /workers is not second-guessed
        bench.check_deployed("http://127.0.0.1:9", "baseline_tp1dp2", routed)
    finally:
        server.shutdown()
