"""End to end on two real systemd hosts: real vLLM (CPU build) behind the
real vllm-router, real NATS; converge, re-run, status, scale out, relabel,
baseline, bench and report, teardown, sweep. Each test asks the shared
`deployment` for the layout it needs (tests/e2e/conftest.py)."""

import errno
import functools
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import as_operator
import pytest
import waiting

from disagg.agent import envfile, kv
from disagg.core import manifest, pki
from disagg.core import settings as S
from disagg.core.plan import make_plan
from disagg.infra.inventory import load_inventory
from disagg.infra.launch import DeployError, run_deploy
from disagg.lab import smoke, testhosts
from disagg.lab.load import Load
from disagg.lab.testhosts import ssh
from disagg.perf import kvtransfer, results

pytestmark = pytest.mark.e2e


# each poll is an SSH command or an HTTP request to the hosts
until = functools.partial(waiting.until, every=0.5)

INVENTORY = "inventories/local.py"
H1, H2 = 1, 2
MODEL = "tiny-llama"


def active_since(host: int, units: list[str]) -> dict[str, str]:
    out = ssh(host, " ; ".join(f"systemctl show -p ActiveEnterTimestamp --value {u}" for u in units)).stdout
    return dict(zip(units, out.splitlines()))


def unit_files(host: int) -> list[str]:
    out = ssh(host, "ls /etc/systemd/system | grep '^disagg-' || true").stdout
    return sorted(out.split())


def listed_units(host: int) -> list[str]:
    out = ssh(host, "systemctl list-units 'disagg-*' --all --no-legend --plain").stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def status(*args: str, inventory: str = INVENTORY) -> tuple[int, dict]:
    return as_operator.status(inventory, *args)


def test_converge_serves_through_the_router(deployment):
    plan = deployment.ensure()
    for w in plan.workers:
        with urllib.request.urlopen(f"{w.url}/health", timeout=10) as response:
            assert response.status == 200, w.unit
    context = [w.url for w in plan.workers if w.role == "context"]
    (generate,) = [w.url for w in plan.workers if w.role == "generate"]
    before = {u: smoke.counter(u, "vllm:request_success_total") for u in [*context, generate]}
    plain = smoke.chat(plan.router_url, MODEL, 12)
    streamed = smoke.chat(plan.router_url, MODEL, 9, stream=True)
    assert plain["completion_tokens"] == 12 and plain["text"]
    assert streamed["completion_tokens"] == 9 and streamed["chunks"] >= 2
    after = {u: smoke.counter(u, "vllm:request_success_total") for u in before}
    assert sum(after[u] - before[u] for u in context) >= 2, "no context worker served the prefill"
    assert after[generate] - before[generate] >= 2, "the generate worker did not decode"
    assert listed_units(H1) == [
        "disagg-context-0-agent.service",
        "disagg-context-0.service",
        "disagg-context-1-agent.service",
        "disagg-context-1.service",
        "disagg-firewall.service",
        "disagg-frontdoor.service",
        "disagg-frontdoor.socket",
        "disagg-nats.service",
        "disagg-prometheus.service",
        "disagg-registry-sync.service",
        "disagg-router.service",
    ]
    assert listed_units(H2) == [
        "disagg-firewall.service",
        "disagg-generate-0-agent.service",
        "disagg-generate-0.service",
    ]


def test_kv_cache_moves_from_context_to_generate_over_nixl(deployment, figures):
    """Prefill on a context worker, decode on the generate worker of the
    other host, the prompt's KV cache transferred between them by NIXL:
    what the generate worker itself counts."""
    plan = deployment.ensure()
    (generate,) = [w for w in plan.workers if w.role == "generate"]
    context = [w for w in plan.workers if w.role == "context"]
    assert {w.host for w in context} != {generate.host}  # across hosts
    block = kvtransfer.block_size(generate.url)
    before = kvtransfer.read([generate.url])
    served = {w.url: smoke.counter(w.url, "vllm:request_success_total") for w in context}
    prompt_tokens = 0
    for i in range(4):  # round robin: both context workers
        words = " ".join(f"w{i}x{j}" for j in range(60))
        answer = smoke.chat(plan.router_url, MODEL, 4, prompt=f"{i}: {words}", stream=bool(i % 2))
        assert answer["completion_tokens"] == 4
        prompt_tokens += answer["prompt_tokens"]
    moved = kvtransfer.delta(before, kvtransfer.read([generate.url]))
    figures.append(f"NIXL on CPU, 4 requests ({prompt_tokens} prompt tokens): {moved}")
    assert moved["failed_transfers"] == 0 and moved["bytes"] > 0 and moved["transfers"] >= 4
    # the prompt came over the wire (or from its own prefix cache: the chat
    # template), not from computing it again, but for at most a partial block each
    assert (
        moved["prompt_tokens_external"] + moved["prompt_tokens_local_cache"] + moved["prompt_tokens_local_compute"]
        == prompt_tokens
    )
    assert moved["prompt_tokens_local_compute"] <= 4 * block
    assert moved["prompt_tokens_external"] >= prompt_tokens - 4 * block - moved["prompt_tokens_local_cache"]
    assert moved["prompt_tokens_external"] > 0
    # each context worker prefilled
    assert all(smoke.counter(u, "vllm:request_success_total") > n for u, n in served.items())


# a NIXL agent made as vLLM 0.32.0 makes it, after vLLM's own plugin loader;
# prints its threads and the CPU it used idle for 2 s
NIXL_AGENT = """
import os, time
from vllm.plugins import load_general_plugins
load_general_plugins()
from nixl._api import nixl_agent, nixl_agent_config
agent = nixl_agent("probe", nixl_agent_config(num_threads=4, capture_telemetry=True))
cpu = time.process_time(); time.sleep(2)
print(len(os.listdir("/proc/self/task")), round(time.process_time() - cpu, 2))
"""


def test_nixl_progress_thread_is_off_where_data_says(deployment, figures):
    """inventories/local.py turns NIXL's busy-polling progress thread off
    (disagg/agent/vllm_plugin.py): every worker's engine loaded the plugin, and a
    NIXL agent made under vLLM's plugin loader has one thread fewer."""
    plan = deployment.ensure()
    assert plan.engine_plugin
    for w in plan.workers:
        host = H1 if w.host == plan.cluster.head else H2
        # this run of the unit only
        log = ssh(host, f"journalctl -o cat _SYSTEMD_INVOCATION_ID=$(systemctl show -P InvocationID {w.unit})").stdout
        # the API server and its engine core process each load it
        assert log.count("NIXL agent progress thread off") >= 2, w.unit
    plugin = plan.worker_env(plan.workers[0])
    probe = {}
    for off in (False, True):
        vars_ = "UCX_TLS=tcp,self " + (
            f"PYTHONPATH={plugin['PYTHONPATH']} DISAGG_NIXL_PROGRESS_THREAD=0" if off else ""
        )
        out = ssh(H2, f"cd /tmp && env {vars_} /opt/disagg/vllm/bin/python -c '{NIXL_AGENT}' 2>/dev/null")
        threads, cpu = out.stdout.split()[-2:]
        probe[off] = (int(threads), float(cpu))
    figures.append(f"NIXL agent idle 2 s: progress thread on {probe[False]}, off {probe[True]} (threads, CPU s)")
    assert probe[True][0] < probe[False][0] and probe[True][1] < probe[False][1]


def test_nats_speaks_only_tls_with_our_ca_asks_a_password_and_monitors_on_loopback(deployment):
    plan = deployment.ensure()
    s = plan.settings
    health = ssh(H1, f"curl -s 'http://127.0.0.1:{s.nats_monitor_port}/healthz?js-enabled-only=true'").stdout
    assert '"ok"' in health
    with pytest.raises(OSError):
        socket.create_connection((plan.head.address, s.nats_monitor_port), timeout=3)
    password = envfile.value(ssh(H1, f"cat {S.NATS_SECRET_ENV}").stdout.splitlines(), kv.PASSWORD_ENV)
    creds = {"user": s.nats_user, "pass": password}
    ca = pki.ca_file(plan.cluster.head)
    # the right password in plaintext: the server wanted a TLS handshake and hangs up
    assert "PONG" not in nats_connect(plan, creds, ca=None)
    assert "Authorization Violation" in nats_connect(plan, {}, ca=ca)
    assert password and nats_connect(plan, creds, ca=ca).startswith("PONG")
    other = Path(pki.directory("not-this-deployment")) / "ca.crt"
    pki.ensure("not-this-deployment", [plan.head.address])
    with pytest.raises(ssl.SSLCertVerificationError):
        nats_connect(plan, creds, ca=other)
    for path, mode in (
        ("/etc/disagg/nats.env", "root 600"),
        ("/etc/disagg/nats-auth.conf", "disagg-nats 600"),
        ("/etc/disagg/tls/nats.key", "disagg-nats 600"),
    ):
        assert ssh(H1, f"stat -c '%U %a' {path}").stdout.strip() == mode


def nats_connect(plan, creds: dict, ca: Path | None) -> str:
    """NATS's own protocol: INFO in the clear, then (with ca) TLS verified
    against ca, CONNECT and PING; what the server answers."""
    with socket.create_connection((plan.head.address, plan.settings.nats_port), timeout=5) as sock:
        info = json.loads(sock.recv(4096).decode().removeprefix("INFO "))
        assert info["jetstream"] and info["tls_required"]
        conn = (
            ssl.create_default_context(cafile=str(ca)).wrap_socket(sock, server_hostname=plan.head.address)
            if ca
            else sock
        )
        conn.sendall(f"CONNECT {json.dumps({'verbose': False, **creds})}\r\nPING\r\n".encode())
        return conn.recv(4096).decode()


def test_workers_refuse_a_request_without_the_key_and_the_router_sends_it(deployment):
    plan = deployment.ensure()
    key = ssh(H1, f"sed -n 's/^VLLM_API_KEY=//p' {S.API_KEY_ENV}").stdout.strip()
    assert len(key) >= 32
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()

    def direct(url: str, headers: dict) -> int:
        request = urllib.request.Request(
            f"{url}/v1/chat/completions", body, {"Content-Type": "application/json", **headers}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    for w in plan.workers:
        assert direct(w.url, {}) == 401, w.name
        assert direct(w.url, {"Authorization": "Bearer not-the-key"}) == 401, w.name
    # a context worker with the key: the prefill half of a request, served
    context = next(w for w in plan.workers if w.role == "context")
    assert direct(context.url, {"Authorization": f"Bearer {key}"}) == 200
    # the client sends no key: the router adds it for both halves
    assert smoke.chat(plan.router_url, MODEL, 4)["completion_tokens"] == 4
    for host in (H1, H2):
        assert ssh(host, f"stat -c '%U %a' {S.API_KEY_ENV}").stdout.split() == ["root", "600"]
        seen = ssh(host, "cat /etc/systemd/system/disagg-*.service /etc/disagg/disagg-*.env; ps -eo args").stdout
        assert key not in seen


def test_no_secret_reaches_the_hosts_logs_after_a_deploy_and_a_key_rotation_as_the_sudo_login(deployment, timings):
    """inventories/local.py logs in as a user with passwordless sudo, and
    sudo logs every command line it runs (`COMMAND=...`) to the journal and
    to /var/log/auth.log: the NATS password, the rotated API key and the HF
    token must reach neither. The password is one nats-server and systemd
    would have taken apart: the registry, status and serving still work."""
    plan = deployment.ensure()
    assert load_inventory(INVENTORY).get_host(plan.cluster.head).data.get("ssh_user") == testhosts.LOGIN
    old = ssh(H1, f"sed -n 's/^VLLM_API_KEY=//p' {S.API_KEY_ENV}").stdout.strip()
    key, token = "rotated-" + os.urandom(16).hex(), "hf_e2e_" + os.urandom(16).hex()
    # and a NATS password of what a config parser or a shell would take apart
    password = f'pw 12 34;x "$HOME" `id` \\ #{os.urandom(8).hex()}'
    data = (
        *(d for d in deployment.data if not d.startswith("nats_password=")),
        f"api_key={key}",
        f"nats_password={password}",
    )
    run = run_deploy(INVENTORY, "deploys/disagg.py", *data)
    deployment.changed("deploys/disagg.py", data)
    timings["API key rotated, workers rolled (as the sudo login)"] = run.seconds
    # the rotation took: workers demand the new key and the router sends it
    assert smoke.chat(plan.router_url, MODEL, 4)["completion_tokens"] == 4
    try:
        # the HF token as the model's staging writes it (no worker restarts for it)
        staged = run_deploy(INVENTORY, "deploys/model.py", f"hf_token={token}")
        for host in (H1, H2):
            assert ssh(
                host, f"sed -n 's/^VLLM_API_KEY=//p' {S.API_KEY_ENV}; sed -n 's/^HF_TOKEN=//p' {S.HF_TOKEN_ENV}"
            ).stdout.split() == [key, token]
    finally:  # the layout's data has no token: its file goes, as the hub test's does
        for i in (H1, H2):
            ssh(i, f"rm -f {S.HF_TOKEN_ENV}", check=False)
    secrets = {"NATS password": password, "old API key": old, "API key": key, "HF token": token}
    assert all(len(v) >= 32 for v in secrets.values())
    assert not any(v in run.output + staged.output for v in secrets.values())
    for host in (H1, H2):
        # sudo's own lines are there (the logs are live), the secrets are not
        assert int(ssh(host, f"grep -c 'sudo: *{testhosts.LOGIN} : .*COMMAND=' /var/log/auth.log").stdout) > 50
        assert (
            int(ssh(host, f"journalctl --no-pager -o cat -t sudo | grep -c '{testhosts.LOGIN} : .*COMMAND='").stdout)
            > 50
        )
        for what, value in secrets.items():
            found = ssh(
                host,
                f"journalctl --no-pager -o cat | grep -cF -- {shlex.quote(value)}; "
                f"grep -cF -- {shlex.quote(value)} /var/log/auth.log",
                check=False,
            ).stdout.split()
            assert found == ["0", "0"], f"{what} in the logs of host {host} (journal, auth.log): {found}"


def test_a_rerun_after_a_key_rotation_that_failed_half_way_serves_through_the_front_door(deployment):
    """A rotation that wrote the new key and failed before any restart:
    nothing on the hosts differs from the re-run's files, yet every service
    runs on the old key. The re-run restarts what is older than its files."""
    deployment.ensure()
    key = "half-" + os.urandom(16).hex()
    data = (*(d for d in deployment.data if not d.startswith("api_key=")), f"api_key={key}")
    deployment.changed()
    for host in (H1, H2):
        ssh(
            host,
            f"umask 077; printf %s {shlex.quote(envfile.text(dict.fromkeys(('VLLM_API_KEY', 'OPENAI_API_KEY'), key)))}"
            f" > {S.API_KEY_ENV}",
        )
    run_deploy(INVENTORY, "deploys/disagg.py", *data)
    deployment.changed("deploys/disagg.py", data)
    assert smoke.chat(deployment.plan().router_url, MODEL, 2)["completion_tokens"] == 2


def test_head_services_listen_only_where_they_must(deployment):
    plan = deployment.ensure()
    s = plan.settings
    listening = ssh(H1, "ss -ltnH").stdout.split("\n")
    where = {
        int(local.rsplit(":", 1)[1]): local.rsplit(":", 1)[0]
        for local in (line.split()[3] for line in listening if line.strip())
    }
    head = plan.head.address
    assert (
        where[s.router_port] == where[s.router_metrics_port] == where[s.nats_port] == where[s.prometheus_port] == head
    )
    assert where[s.router_internal_port] == where[s.frontdoor_metrics_port] == head
    assert where[s.router_discovery_port] == where[s.nats_monitor_port] == where[s.registry_metrics_port] == "127.0.0.1"
    # the distro package's own Prometheus never started, nor what it recommends (node exporter on :9100)
    assert 9100 not in where, where
    assert (
        ssh(H1, "systemctl is-enabled prometheus.service haproxy.service", check=False).stdout.split() == ["masked"] * 2
    )


# connect_ex's errno: 0 when something answered; a dropped SYN times out (3 s)
PROBE = "import socket, sys; s = socket.socket(); s.settimeout(3); print(s.connect_ex((sys.argv[1], int(sys.argv[2]))))"


def test_firewall_admits_each_port_of_ours_only_from_its_peers(deployment, figures):
    plan = deployment.ensure()
    s = plan.settings
    context = next(w for w in plan.workers if w.role == "context")
    ours = {
        "NATS": (plan.head.address, s.nats_port),
        "router metrics": (plan.head.address, s.router_metrics_port),
        "the router itself": (plan.head.address, s.router_internal_port),
        "front door metrics": (plan.head.address, s.frontdoor_metrics_port),
        "Prometheus": (plan.head.address, s.prometheus_port),
        "context worker HTTP": (context.address, context.http_port),
        "context NIXL side channel": (context.address, context.nixl_port),
    }
    with testhosts.outsider() as outside:

        def reaches(address: str, port: int) -> bool:
            return outside(sys.executable, "-c", PROBE, address, str(port)).stdout.strip() == "0"

        assert reaches(plan.head.address, s.router_port), "clients reach the front door"
        assert reaches(plan.head.address, 22), "ssh is not ours to filter"
        blocked = [what for what, (address, port) in ours.items() if not reaches(address, port)]
    assert blocked == list(ours), blocked
    # the controller that deployed is admitted (disagg status reads NATS and the metrics)
    for what, (address, port) in ours.items():
        if "NIXL" not in what:
            socket.create_connection((address, port), timeout=3).close()
    # peers by role: the generate host reaches the context worker's NIXL side channel, not its HTTP port
    probe = f"python3 -c {shlex.quote(PROBE)} {context.address}"
    assert ssh(H2, f"{probe} {context.nixl_port}").stdout.strip() == "0"
    assert ssh(H2, f"{probe} {context.http_port}").stdout.strip() != "0"
    # the router's discovery socket: the sync's user registers workers; root, the workers' user
    # (a compromised engine) and any other user cannot
    discovery = f"python3 -c {shlex.quote(PROBE)} 127.0.0.1 {s.router_discovery_port}"
    assert ssh(H1, f"runuser -u {S.SYNC_USER} -- {discovery}").stdout.strip() == "0"
    for user in ("root", S.SERVICE_USER, S.HEARTBEAT_USER):
        assert ssh(H1, f"runuser -u {user} -- {discovery}").stdout.strip() == str(errno.ECONNREFUSED), user
    table = ssh(H1, "nft list table inet disagg").stdout
    dropped = int(re.search(r"counter packets (\d+) bytes \d+ drop", table).group(1))
    assert dropped > 0
    figures.append(
        f"firewall: from an outside namespace {', '.join(blocked)} blocked, router and ssh open; "
        f"{dropped} packets dropped on the head"
    )


# as a compromised host could: with a heartbeat's own credentials a foreign
# entry (refused: that user may put its worker's key alone), then with the
# head's admin credentials, every second: a healthy generate worker the
# layout does not name (an HTTP server that says 200 to all) and garbage
IMPOSTOR = r"""
import asyncio, json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from disagg.agent import envfile, kv
nats, user, ca, address, heartbeat_user, heartbeat_env = sys.argv[1:7]

class Yes(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    do_POST = do_GET

server = ThreadingHTTPServer((address, 0), Yes)
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://{address}:{server.server_port}"
print(url, flush=True)
def password(path):
    return envfile.value(open(path).read().splitlines(), kv.PASSWORD_ENV)
entry = {"role": "generate", "index": 7, "host": "impostor", "url": url, "gpus": [0], "label": "x", "model": "m",
         "zmq": f"{address}:{server.server_port}", "health": "healthy"}

async def put_all(server, times):
    nc = await kv.connect(server, reconnect=False)
    try:
        store = await kv.bucket(nc)
        for _ in range(times):
            await kv.put(store, kv.worker_key(url), entry)
            await kv.put(store, "worker.garbage", "not json {")
            await asyncio.sleep(1)
    finally:
        await nc.close()

try:
    asyncio.run(put_all(kv.Server(nats, heartbeat_user, password(heartbeat_env), ca), 1))
    print("accepted", flush=True)
except Exception as e:
    print("refused:", kv.describe(e), flush=True)
asyncio.run(put_all(kv.Server(nats, user, password("/etc/disagg/nats.env"), ca), 20))
"""


def test_a_foreign_entry_is_refused_to_a_heartbeats_credentials_and_never_routed(deployment, figures):
    plan = deployment.ensure()
    beat = next(w for w in plan.workers if w.host == plan.cluster.head)
    agent = f"PYTHONPATH={S.AGENT_SRC} {S.AGENT_VENV}/bin/python -c {shlex.quote(IMPOSTOR)}"
    args = (
        f"{plan.nats_url} {shlex.quote(plan.settings.nats_user)} {S.CA_CERT} {plan.head.address} "
        f"{kv.heartbeat_user(beat.url)} {plan.heartbeat_env(beat)}"
    )
    since = time.time()
    with Load(plan.router_url, MODEL, concurrency=2, pause=0.05) as load:
        writer = subprocess.Popen([*testhosts.ssh_command(H1), f"{agent} {args}"], stdout=subprocess.PIPE, text=True)
        url, refused = writer.stdout.readline().strip(), writer.stdout.readline().strip()
        until(lambda: any(w["url"] == url and w["foreign"] for w in status()[1]["workers"]), 20, "the foreign entry")
        time.sleep(kv.ROUTER_FORGETS_AFTER + 2)
        code, current = status()
    writer.wait(30)
    assert refused.startswith("refused:"), refused
    assert load.result.ok > 10 and load.result.failed == 0, load.result.summary()
    assert code == 0 and url not in current["router_members"], current
    router_log = ssh(H1, f"journalctl -u {S.ROUTER_UNIT} -o cat --no-pager --since @{since:.0f}").stdout
    assert url.removeprefix("http://") not in router_log
    sync_log = ssh(H1, f"journalctl -u {S.SYNC_UNIT} -o cat --no-pager --since @{since:.0f}").stdout
    assert "not a worker of the deployed layout: foreign" in sync_log and "is not a JSON object" in sync_log
    figures.append(
        f"foreign registry entry: a heartbeat's credentials {refused}; with the admin's, 20 s under "
        f"load: {load.result.ok} requests, {load.result.failed} failed, never in the router"
    )


# a TCP connect scan of every port: a closed one answers RST at once, one of
# ours the firewall drops never answers; only a completed connect is open
SCAN = r"""
import json, resource, select, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))
batch = min(8192, hard) - 64
found = []
for address in sys.argv[1:]:
    for start in range(1, 65536, batch):
        socks, poller = {}, select.epoll()
        for port in range(start, min(start + batch, 65536)):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((address, port))
            socks[s.fileno()] = (s, port)
            poller.register(s.fileno(), select.EPOLLOUT)
        deadline = time.monotonic() + 1.5
        while socks and time.monotonic() < deadline:
            for fd, _ in poller.poll(0.1):
                s, port = socks.pop(fd)
                poller.unregister(fd)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    found.append([address, port])
                s.close()
        for s, _ in socks.values():
            s.close()
        poller.close()
print(json.dumps(found))
"""


def test_a_scan_of_every_tcp_port_from_a_neighbour_finds_ssh_and_the_front_door_only(deployment, figures):
    plan = deployment.ensure()
    s = plan.settings
    with testhosts.outsider() as outside:
        scan = outside(sys.executable, "-c", SCAN, plan.head.address, testhosts.address(H2), timeout=300)
    assert scan.returncode == 0, scan.stderr
    found = sorted(tuple(x) for x in json.loads(scan.stdout))
    figures.append(f"TCP connect scan of all ports from a neighbour: open {found}")
    assert found == sorted([(plan.head.address, 22), (plan.head.address, s.router_port), (testhosts.address(H2), 22)])
    # what it could not reach is there: UCX's listeners, within the range the firewall names
    for host in (H1, H2):
        engines = ssh(host, f"ss -ltnpH src {testhosts.address(host)} | grep EngineCor").stdout
        ports = {int(p) for p in re.findall(r":(\d+)\s", engines)}
        ucx = ports - {p for w in plan.workers_on(testhosts.address(host)) for p in w.nixl_ports}
        assert len(ucx) >= 5 and ucx <= set(s.ports.ucx), engines


def test_rules_that_fail_to_load_leave_the_old_ones_and_a_rerun_mends_them(deployment):
    deployment.ensure()
    data = deployment.data
    rules = "nft -s list table inet disagg"  # -s: without counters
    before = ssh(H2, rules).stdout
    assert "drop" in before
    ssh(H2, f"echo 'table inet disagg {{ chain input {{ no such rule; }} }}' >> {S.FIREWALL_RULES}")
    deployment.changed()
    assert ssh(H2, f"systemctl reload {S.FIREWALL_UNIT}", check=False).returncode != 0
    assert ssh(H2, rules).stdout == before and ssh(H2, f"systemctl is-active {S.FIREWALL_UNIT}").stdout == "active\n"
    run_deploy(INVENTORY, "deploys/disagg.py", *data)
    deployment.changed("deploys/disagg.py", data)
    assert "no such rule" not in ssh(H2, f"cat {S.FIREWALL_RULES}").stdout
    assert ssh(H2, f"systemctl reload {S.FIREWALL_UNIT} && {rules}").stdout == before


def test_rerun_changes_nothing(deployment, timings, figures, tmp_path):
    from disagg.infra import profile

    plan = deployment.ensure()
    units = plan.units_on(plan.cluster.head)
    since = active_since(H1, units)
    run = run_deploy(INVENTORY, "deploys/disagg.py", *deployment.data, profile=tmp_path / "profile.json")
    timings["no-op re-run (deploys/disagg.py)"] = run.seconds
    assert run.changed == {}
    assert active_since(H1, units) == since
    # where its time went, per operation and host, from pyinfra's own callbacks
    summary = profile.summary(json.loads((tmp_path / "profile.json").read_text()))
    assert set(summary["per_host"]) == {h.name for h in plan.cluster.hosts}
    assert summary["planning_s"] + summary["execution_s"] < run.seconds
    assert summary["critical_path_s"] <= summary["execution_s"] + 0.5
    assert any(e["name"].endswith("Every worker registered, healthy and routed") for e in summary["order"])
    figures.append(f"no-op re-run profile: {run.seconds:.1f} s in all, " + profile.text(summary, top=5))


def test_a_hub_model_is_staged_verified_and_damage_fetched_again(deployment, tmp_path, timings):
    """deploys/model.py against a local server in the hub's layout (HF_ENDPOINT),
    which asks for the token as a gated repo does."""
    from hubserver import Hub

    deployment.ensure()
    repo = tmp_path / "repo"
    shutil.copytree(testhosts.CACHE / "tiny-llama", repo)
    (repo / "model.safetensors").write_bytes(os.urandom(3 << 20))  # an LFS file, checked by sha256
    token = "hf_e2e_" + os.urandom(8).hex()
    dest = "/var/lib/disagg/models/hub/disagg-e2e--tiny/main"
    try:
        with Hub("disagg-e2e/tiny", repo, address=testhosts.GATEWAY, token=token) as hub:
            data = ("model=disagg-e2e/tiny", "model_dir=null", f"hf_endpoint={hub.url}", f"hf_token={token}")
            run = run_deploy(INVENTORY, "deploys/model.py", *data)
            timings["hub model staged on both worker hosts"] = run.seconds
            assert token not in run.output
            assert sorted(hub.downloads()) == sorted([*hub.files] * 2)  # each file once per host
            for i in (1, 2):
                sums = ssh(i, f"cd {dest} && sha256sum {' '.join(hub.files)} && stat -c %U .").stdout.split()
                assert dict(zip(sums[1::2], sums[0::2])) == {n: manifest.sha256(p) for n, p in hub.files.items()}
                assert sums[-1] == "root"  # read-only to the workers
            # a re-run reads the stamp and sizes: nothing runs, the hub is not asked
            asked = len(hub.requests)
            assert run_deploy(INVENTORY, "deploys/model.py", *data).changed == {}
            assert len(hub.requests) == asked
            # a corrupted shard (same size, bytes changed) and a partial file: found and fetched again
            ssh(
                2,
                f"cd {dest} && printf 'XXXX' | dd of=model.safetensors bs=1 seek=4096 conv=notrunc 2>/dev/null "
                f"&& truncate -s 100 tokenizer.json",
            )
            fetched = len(hub.downloads())
            again = run_deploy(INVENTORY, "deploys/model.py", *data)
            assert {h for hosts in again.changed.values() for h in hosts} == {testhosts.address(H2)}
            assert sorted(hub.downloads()[fetched:]) == ["model.safetensors", "tokenizer.json"]
            sums = ssh(2, f"cd {dest} && sha256sum model.safetensors tokenizer.json").stdout.split()
            assert sums[0::2] == [manifest.sha256(repo / "model.safetensors"), manifest.sha256(repo / "tokenizer.json")]
            # main moves on; host 2 staged from scratch (a host added later): its peer's commit and weights
            first, moved = hub.commit, tmp_path / "moved"
            shutil.copytree(repo, moved)
            (moved / "model.safetensors").write_bytes(os.urandom(3 << 20))
            hub.publish(moved)
            ssh(2, f"rm -rf {dest} {dest}.manifest.json {dest}.commit")
            since = len(hub.requests)
            run_deploy(INVENTORY, "deploys/model.py", *data)
            assert not [
                p for _, p in hub.requests[since:] if p.endswith(("/tiny", "/revision/main"))
            ]  # main never asked
            for i in (1, 2):
                assert ssh(i, f"cat {dest}.commit").stdout.strip() == first
                assert ssh(i, f"sha256sum {dest}/model.safetensors").stdout.split()[0] == manifest.sha256(
                    repo / "model.safetensors"
                )
    finally:
        for i in (1, 2):
            ssh(i, f"rm -rf /var/lib/disagg/models/hub {S.HF_TOKEN_ENV}", check=False)


def test_units_pass_systemd_verify_and_a_loosened_secret_is_made_root_only_again(deployment):
    plan = deployment.ensure()
    for host in (H1, H2):
        ours = "ls -d /etc/systemd/system/disagg-*.service /etc/systemd/system/disagg-*.socket 2>/dev/null"
        verify = ssh(host, f"systemd-analyze verify $({ours})", check=False)
        assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    secrets = {"/etc/disagg/nats.env": "root", S.API_KEY_ENV: "root", S.NATS_KEY: "disagg-nats"}
    ssh(H1, " && ".join(f"chmod 644 {path} && chown disagg {path}" for path in secrets))
    units = plan.units_on(plan.cluster.head)
    since = active_since(H1, units)
    run = run_deploy(INVENTORY, "deploys/disagg.py", *deployment.data)
    for path, owner in secrets.items():
        assert ssh(H1, f"stat -c '%U %a' {path}").stdout.split() == [owner, "600"]
    assert sorted(run.changed) == sorted(
        [
            "Registry runtime | /etc/disagg/nats.env root-only",
            f"Worker API key | {S.API_KEY_ENV} root-only",
            f"NATS server | {S.NATS_KEY} disagg-nats-only",
        ]
    ), run.changed
    assert active_since(H1, units) == since  # nothing restarted for a mode


def test_running_services_are_sandboxed(deployment, figures):
    deployment.ensure()
    exposure, units = {}, set()
    for host in (H1, H2):
        names = [u for u in listed_units(host) if u.endswith(".service")]
        units |= {u.removesuffix(".service") for u in names}
        report = ssh(host, f"systemd-analyze security --no-pager {' '.join(names)}").stdout
        # its summary table: UNIT EXPOSURE PREDICATE HAPPY
        exposure.update(re.findall(r"^(disagg-\S+)\.service\s+([\d.]+)", report, re.M))
    figures.append("systemd-analyze security exposure: " + ", ".join(f"{u} {e}" for u, e in sorted(exposure.items())))
    assert set(exposure) == units
    assert all(float(e) <= 4 for e in exposure.values()), exposure  # 9.2 (UNSAFE) before
    # as each main process sees the host: only its own state is writable
    for unit, writable in (
        ("disagg-context-0", S.SERVICE_HOME),
        ("disagg-nats", "/var/lib/disagg/nats"),
        ("disagg-router", None),
        ("disagg-frontdoor", None),
    ):
        pid = ssh(H1, f"systemctl show -p MainPID --value {unit}").stdout.strip()
        inside = f"nsenter -t {pid} -m --"
        refused = ssh(H1, f"{inside} touch /opt/disagg/probe /etc/disagg/probe {S.MODELS_DIR}/probe", check=False)
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr, (unit, refused.stderr)
        if writable:
            ssh(H1, f"{inside} sh -c 'touch {writable}/probe && rm {writable}/probe'")


def test_links_a_service_user_plants_never_lead_root_elsewhere(deployment):
    """As user disagg (what a compromised worker runs as): what root pushes
    into or prunes cannot be renamed or written; on a host as an older
    release left it (the state tree the service user's), links planted in
    place of the model tree, its stamp, the bytecode cache and the targets
    directory are replaced by the next deploy, which says so, and a canary
    directory they point to is untouched."""
    plan = deployment.ensure()
    model, canary = plan.settings.model_path, "/srv/disagg-canary"
    planted = [model, S.PYCACHE_DIR, S.SCRAPE_TARGETS_DIR]
    aside = [f"{p}.aside" for p in planted]

    def as_disagg(command: str, check: bool = False):
        return ssh(H1, f"runuser -u {S.SERVICE_USER} -- sh -c {shlex.quote(command)}", check=check)

    def canary_state() -> str:
        return ssh(H1, f"cd {canary} && find . -printf '%p %u %g %m %s\\n' | sort && cat keep").stdout

    ssh(H1, f"mkdir -p {canary} && echo keep > {canary}/keep && chmod 755 {canary} && chmod 644 {canary}/keep")
    before = canary_state()
    try:
        for command in (
            f"mv {model} {model}.x",
            f"ln -s {canary} {model}/evil",
            f"rm -f {model}.manifest.json",
            f"mv {S.PYCACHE_DIR} {S.STATE_DIR}/x",
            f"ln -s {canary} {S.MODELS_DIR}/evil",
        ):
            refused = as_disagg(command)
            assert refused.returncode != 0 and "Permission denied" in refused.stderr, (command, refused.stderr)
        # nor can it read the environment of the services that hold the NATS password (each its own user)
        for unit in ("disagg-context-0-agent", S.SYNC_UNIT):
            pid = ssh(H1, f"systemctl show -p MainPID --value {unit}").stdout.strip()
            read = as_disagg(f"cat /proc/{pid}/environ")
            assert read.returncode != 0 and kv.PASSWORD_ENV not in read.stdout, (unit, read.stderr)
        # where it may write (its caches), a link is its own business: root never goes there
        as_disagg(f"ln -s {canary} {S.PYCACHE_DIR}/evil && ln -s {canary}/keep {S.SERVICE_HOME}/evil", check=True)

        # the state tree as releases before this one left it, then the links
        ssh(H1, f"chown {S.SERVICE_USER}: {S.STATE_DIR} {S.MODELS_DIR} && chown -R {S.SERVICE_USER}: {model}")
        as_disagg(
            " && ".join(
                [f"rm -f {model}.manifest.json", *(f"mv {p} {p}.aside && ln -s {canary} {p}" for p in planted)]
            ),
            check=True,
        )
        run = run_deploy(INVENTORY, "deploys/disagg.py", *deployment.data)
        for path in planted:
            assert f"{path} is not a directory (find type l): replaced" in run.output, (path, run.output[-3000:])
        assert canary_state() == before
        owners = ssh(
            H1,
            f"stat -c '%F %U %a %n' {S.STATE_DIR} {S.MODELS_DIR} {model} {model}/config.json "
            f"{S.PYCACHE_DIR} {S.SCRAPE_TARGETS_DIR}",
        ).stdout.splitlines()
        assert owners == [
            f"directory root 755 {S.STATE_DIR}",
            f"directory root 755 {S.MODELS_DIR}",
            f"directory root 755 {model}",
            f"regular file root 644 {model}/config.json",
            f"directory {S.SERVICE_USER} 755 {S.PYCACHE_DIR}",
            f"directory {S.SYNC_USER} 755 {S.SCRAPE_TARGETS_DIR}",
        ]
        assert smoke.chat(plan.router_url, MODEL, 2)["completion_tokens"] == 2
        # and what it replaced is in place: the next run changes nothing
        assert run_deploy(INVENTORY, "deploys/disagg.py", *deployment.data).changed == {}
    finally:
        ssh(H1, f"rm -rf {canary} {' '.join(aside)} {S.SERVICE_HOME}/evil", check=False)


def prometheus(plan, path: str, **params) -> dict:
    url = f"{plan.prometheus_url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def scraped(plan, job: str = "workers") -> dict[str, dict]:
    """Prometheus's active targets of a job, by instance (HOST:PORT)."""
    return {
        t["labels"]["instance"]: t
        for t in prometheus(plan, "targets", state="active")["activeTargets"]
        if t["labels"]["job"] == job
    }


def series(plan, promql: str) -> list[tuple[dict, float]]:
    return [(r["metric"], float(r["value"][1])) for r in prometheus(plan, "query", query=promql)["result"]]


def test_prometheus_scrapes_every_worker_the_router_and_nats(deployment):
    plan = deployment.ensure()
    until(
        lambda: len(scraped(plan)) == len(plan.workers) and all(t["health"] == "up" for t in scraped(plan).values()),
        60,
        "every worker scraped",
    )
    for w in plan.workers:
        labels = scraped(plan)[w.url.removeprefix("http://")]["labels"]
        assert labels == {
            "instance": w.url.removeprefix("http://"),
            "job": "workers",
            "layout": plan.label,
            "role": w.role,
            "index": str(w.index),
            "host": w.host,
            "worker": w.name,
            "gpus": str(len(w.gpus)),
        }
    assert [t["health"] for t in scraped(plan, "router").values()] == ["up"]
    assert [t["health"] for t in scraped(plan, "registry").values()] == ["up"]
    assert scraped(plan, "dcgm") == {}  # CPU hosts: no exporter answers, none is listed
    # NATS's own count of connections: every worker's heartbeat and the sync
    ((_, connections),) = series(plan, "gnatsd_varz_connections")
    assert connections >= len(plan.workers) + 1
    gpus = {labels["worker"]: value for labels, value in series(plan, f'disagg_worker_gpus{{layout="{plan.label}"}}')}
    assert gpus == {w.name: float(len(w.gpus)) for w in plan.workers}
    # the rules loaded are the ones promtool accepts on the head
    assert ssh(H1, f"promtool check rules {S.PROMETHEUS_CONFIG_DIR}/rules.yml").returncode == 0
    assert all(r["health"] == "ok" for g in prometheus(plan, "rules")["groups"] for r in g["rules"])


def test_alerting_rules_fire_as_promtool_tests_say_and_read_what_the_sync_exports(deployment):
    """tests/alerts/alerts.test.yml against the rules as deployed, with the
    head's own promtool; the series the alerts read come from the sync."""
    plan = deployment.ensure()
    cases = (Path(__file__).parents[1] / "alerts" / "alerts.test.yml").read_text()
    cases = cases.replace("rule_files: [RULES]", f"rule_files: [{S.PROMETHEUS_CONFIG_DIR}/rules.yml]")
    ssh(H1, f"mkdir -p /tmp/disagg-alerts && cat > /tmp/disagg-alerts/alerts.test.yml <<'EOF'\n{cases}EOF")
    out = ssh(H1, "promtool test rules /tmp/disagg-alerts/alerts.test.yml", check=False)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    alerts = [r for g in prometheus(plan, "rules")["groups"] for r in g["rules"] if r["type"] == "alerting"]
    assert len(alerts) == 5 and all(r["health"] == "ok" for r in alerts), alerts
    until(lambda: series(plan, "disagg_layout_workers"), 30, "the layout's workers exported")
    roles = {labels["role"]: value for labels, value in series(plan, "disagg_layout_workers")}
    assert roles == {r: float(sum(w.role == r for w in plan.workers)) for r in ("context", "generate")}
    expiry = {labels["path"]: value for labels, value in series(plan, "disagg_certificate_not_after_seconds")}
    assert set(expiry) == {S.CA_CERT, S.NATS_CERT} and min(expiry.values()) > time.time() + 30 * 86400, expiry


def test_every_dashboard_panel_and_top_show_the_layout_under_load(deployment, figures):
    from disagg.core import dashboards

    plan = deployment.ensure()
    empty, skipped, seen = [], [], {}

    def top_shows_every_worker_busy() -> bool:
        out = subprocess.run(
            [sys.executable, "-m", "disagg", "top", "-i", INVENTORY, "--once", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        seen["top"] = json.loads(out.stdout)
        return all((w["output_tokens_per_s"] or 0) > 0 for w in seen["top"]["workers"])

    with Load(plan.router_url, MODEL, concurrency=3, max_tokens=16) as load:
        # one-minute rates need two scrapes of each worker's traffic (5 s apart) and a rule evaluation
        until(lambda: any(v > 0 for _, v in series(plan, "role:vllm_nixl_bytes:rate1m")), 90, "rules with traffic")
        until(top_shows_every_worker_busy, 60, "disagg top: every worker with output tokens/s")
        values = {"$layout": plan.label, "$worker": "generate-0", "$host": plan.workers[-1].host}
        for board in dashboards.dashboards().values():
            for title, expr in dashboards.queries(board):
                if title in dashboards.GPU_ONLY:
                    skipped.append(title)
                    continue
                for name, value in values.items():
                    expr = expr.replace(name, value)
                if not series(plan, expr):
                    empty.append(f"{board['uid']}: {title}: {expr}")
    assert load.result.failed == 0, load.result.summary()
    assert empty == [], empty
    top = seen["top"]
    assert [w["worker"] for w in top["workers"]] == [w.name for w in plan.workers]
    assert all(w["gpus"] == 1 for w in top["workers"]), top["workers"]
    assert top["workers"][-1]["kv_transfer_bytes_per_s"] > 0  # the generate worker pulls the prompts' KV
    assert top["totals"]["tokens_per_s_per_gpu"] > 0 and top["totals"]["gpus"] == 3
    assert top["sla"]["tokens_per_user"] == plan.settings.sla_tokens_per_user
    figures.append(
        f"dashboards: every panel returned data under load ({load.result.summary()}) but the GPU-only "
        f"{sorted(set(skipped))}; top: {top['totals']['tokens_per_s_per_gpu']:.1f} tokens/s/GPU, "
        f"{top['totals']['tokens_per_s_per_user']:.1f} tokens/s/user"
    )


def test_status_is_what_the_router_reports(deployment):
    plan = deployment.ensure()
    # its own traffic, so that the router has routed to every worker
    prompts = (f"Request {i}: say something." for i in itertools.count())
    for _ in range(6):
        smoke.chat(plan.router_url, MODEL, 3, prompt=next(prompts))
    code, current = status()
    assert code == 0 and current["ready"] and current["nats"] == "healthy" and current["router"] == "healthy"
    registered = {
        (w["role"], w["index"], w["host"], tuple(w["gpus"]), w["url"], w["label"], w["health"])
        for w in current["workers"]
    }
    assert registered == {(w.role, w.index, w.host, w.gpus, w.url, plan.label, "healthy") for w in plan.workers}
    # the router's own account (its log), not what the sync sent it
    assert sorted(current["router_members"]) == sorted(w.url for w in plan.workers)
    router_log = ssh(H1, "journalctl -u disagg-router -b -o cat --no-pager").stdout
    for w in plan.workers:
        assert f"HTTP:{w.url.removeprefix('http://')}" in router_log
    assert all(w["in_router"] and w["heartbeat_age_s"] < kv.TTL for w in current["workers"])
    assert all(w["routed"] and w["routed"] > 0 for w in current["workers"])
    # the password reaches the agent units through the root-only file only
    password = ssh(H1, "sed -n 's/^DISAGG_NATS_PASSWORD=//p' /etc/disagg/nats.env").stdout.strip()
    for host in (H1, H2):
        # the admin password on the head alone: a worker host's agents use their own users
        mode = ssh(host, "stat -c '%U %a' /etc/disagg/nats.env", check=False).stdout.split()
        assert mode == (["root", "600"] if host == H1 else [])
        seen = ssh(host, "cat /etc/systemd/system/disagg-*.service; ps -eo args").stdout
        assert "disagg.agent heartbeat" in seen
        assert password not in seen
    # not even pyinfra's debug output, which prints every fact's output
    debug = subprocess.run(
        [sys.executable, "-m", "pyinfra", INVENTORY, "deploys/disagg.py", "--dry", "-vvv"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert debug.returncode == 0 and "Loading: deploys/disagg.py" in debug.stderr + debug.stdout
    assert password not in debug.stdout + debug.stderr


def test_stopped_worker_leaves_rotation_under_load_without_a_failed_request(deployment, timings, figures):
    plan = deployment.ensure()
    (stopped,) = [w for w in plan.workers if w.name == "context-1"]
    with Load(plan.router_url, MODEL, concurrency=2, pause=0.05) as traffic:
        time.sleep(2)
        start = time.monotonic()
        ssh(H1, f"systemctl stop --no-block {stopped.unit}")
        until(lambda: stopped.url not in status()[1]["router_members"], kv.TTL + 5, "stopped worker out of the router")
        timings["worker stop -> out of the router"] = time.monotonic() - start
        until(
            lambda: ssh(H1, f"systemctl is-active {stopped.unit}", check=False).stdout.strip() == "inactive",
            120,
            "stopped worker stopped",
        )
        time.sleep(2)
    figures.append(f"context-1 stopped (systemctl stop) under load: {traffic.result.summary()}")
    assert traffic.result.failed == 0, traffic.result.summary()
    code, current = status("--wait", "--timeout", "3")
    assert code == 1 and f"context-1 ({stopped.url}) is not registered" in current["problems"]
    human = subprocess.run([sys.executable, "-m", "disagg", "status", "-i", INVENTORY], capture_output=True, text=True)
    assert human.returncode == 1 and "not ready: context-1" in human.stdout

    start = time.monotonic()
    ssh(H1, f"systemctl start {stopped.unit}")
    code, current = status("--wait", "--timeout", "180")
    assert code == 0, current["problems"]
    timings["worker start -> back in registry and router"] = time.monotonic() - start


def test_add_a_context_worker_with_limit_no_router_restart(deployment, tmp_path, timings):
    plan = deployment.ensure()
    # host 2 joins group context: room for a third context worker there
    scaled = tmp_path / "scaled.py"
    scaled.write_text(
        open(INVENTORY).read()
        + (
            '\ncontext = [(_h1, {"gpus": 2, **_ssh}), (_h2, {"gpus": 2, **_ssh})]'
            '\ngenerate = [(_h2, {"gpus": 2, **_ssh})]\n'
        )
    )
    label = "context_tp1dp3_generate_tp1dp1"
    grown = make_plan(load_inventory(str(scaled)), label)
    (added,) = [w for w in grown.workers if w.name == "context-2"]
    assert added.host == plan.workers[-1].host  # the generate host
    router_since = active_since(H1, ["disagg-router", "disagg-registry-sync"])
    start = time.monotonic()
    data = deployment.data
    deployment.changed()
    # with the head: its sync routes only the workers its layout file names (it reads the new one, no restart)
    run_deploy(str(scaled), "deploys/disagg.py", f"label={label}", *data, limit=f"{added.host},{plan.cluster.head}")
    code, current = status("--label", label, "--wait", "--timeout", "120", inventory=str(scaled))
    timings["deploy --limit of a context worker -> routed"] = time.monotonic() - start
    assert code == 0, current["problems"]
    # Prometheus scrapes it with no reload: the sync's target file changed
    prometheus_since = active_since(H1, ["disagg-prometheus"])
    timings["routed -> scraped by Prometheus (file_sd)"] = until(
        lambda: scraped(plan).get(added.url.removeprefix("http://"), {}).get("health") == "up",
        30,
        "the added worker scraped",
    )
    assert active_since(H1, ["disagg-prometheus"]) == prometheus_since
    before = smoke.counter(added.url, "vllm:request_success_total")
    prompts = (f"Request {i}: say something." for i in itertools.count())
    until(
        lambda: smoke.chat(grown.router_url, MODEL, 3, prompt=next(prompts))
        and smoke.counter(added.url, "vllm:request_success_total") > before,
        120,
        "added worker serving",
    )
    assert active_since(H1, ["disagg-router", "disagg-registry-sync"]) == router_since
    # back to the inventory's layout: the added worker is pruned and leaves the router
    deployment.ensure(data=data)
    assert status()[0] == 0
    # (its port may be another worker's now: placement fills a host's ports in order)
    until(
        lambda: added.name not in {t["labels"]["worker"] for t in scraped(plan).values()},
        30,
        "the removed worker's target gone",
    )


def test_relabel_prunes_the_stale_context_unit(deployment):
    deployment.ensure()
    kept = ["disagg-context-0", "disagg-generate-0"]
    since = {**active_since(H1, kept[:1]), **active_since(H2, kept[1:])}
    relabel = (*deployment.data, "label=context_tp1dp1_generate_tp1dp1")
    deployment.changed()
    run_deploy(INVENTORY, "deploys/disagg.py", *relabel)
    deployment.changed("deploys/disagg.py", relabel)
    assert "disagg-context-1.service" not in unit_files(H1)
    assert listed_units(H1) == [
        "disagg-context-0-agent.service",
        "disagg-context-0.service",
        "disagg-firewall.service",
        "disagg-frontdoor.service",
        "disagg-frontdoor.socket",
        "disagg-nats.service",
        "disagg-prometheus.service",
        "disagg-registry-sync.service",
        "disagg-router.service",
    ]
    assert ssh(H1, "test -e /etc/disagg/disagg-context-1.env", check=False).returncode != 0
    # unchanged workers keep running through a relabel
    assert {**active_since(H1, kept[:1]), **active_since(H2, kept[1:])} == since
    relabeled = make_plan(load_inventory(INVENTORY), "context_tp1dp1_generate_tp1dp1")
    assert smoke.chat(relabeled.router_url, MODEL, 5)["completion_tokens"] == 5


def test_baseline_answers_and_survives_a_killed_worker(deployment, figures):
    baseline = deployment.ensure("deploys/baseline.py")
    assert listed_units(H1) == [
        "disagg-baseline-0-agent.service",
        "disagg-baseline-0.service",
        "disagg-baseline-1-agent.service",
        "disagg-baseline-1.service",
        "disagg-firewall.service",
        "disagg-frontdoor.service",
        "disagg-frontdoor.socket",
        "disagg-nats.service",
        "disagg-prometheus.service",
        "disagg-registry-sync.service",
        "disagg-router.service",
    ]
    # a host the layout no longer uses keeps nothing of ours, the firewall's table neither
    assert listed_units(H2) == []
    assert "table inet disagg" not in ssh(H2, "nft list tables").stdout
    before = [smoke.counter(w.url, "vllm:request_success_total") for w in baseline.workers]
    for _ in range(4):
        assert smoke.chat(baseline.router_url, MODEL, 6)["completion_tokens"] == 6
    after = [smoke.counter(w.url, "vllm:request_success_total") for w in baseline.workers]
    assert sum(after) - sum(before) == 4
    # in regular mode vllm-router retries a request that a dead worker refuses on
    # another one; a request the victim was already answering is lost with it
    victim = baseline.workers[1]
    with Load(baseline.router_url, MODEL, concurrency=2, pause=0.05) as traffic:
        time.sleep(2)
        pid = ssh(H1, f"systemctl show -p MainPID --value {victim.unit}").stdout.strip()
        ssh(H1, f"kill -9 {pid}")
        killed = traffic.at()
        time.sleep(15)
    result = traffic.result
    figures.append(
        f"kill -9 of baseline-1 under load (router retries on): {result.summary()}; "
        f"{result.failed_between(killed + 2, result.seconds)} failed from 2 s after the kill"
    )
    assert result.failed <= traffic.concurrency and result.failed_between(killed + 2, result.seconds) == 0, result
    assert result.ok > 100, result
    code, current = status("--label-key", "baseline_label", "--wait", "--timeout", "240")
    assert code == 0, current["problems"]


def bench(*args: str) -> dict:
    """`disagg bench` as a user runs it, with small ISL/OSL for CPUs."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "disagg",
            "bench",
            "-i",
            INVENTORY,
            "--concurrency",
            "1,2",
            "--isl",
            "64",
            "--osl",
            "16",
            "--json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[2/2]" in out.stderr  # progress
    return json.loads(out.stdout)


def test_bench_both_layouts_and_report(deployment, tmp_path):
    deployment.ensure()
    summary = bench("-o", str(tmp_path))
    assert summary["label"] == "context_tp1dp2_generate_tp1dp1"
    assert [r["concurrency"] for r in summary["rows"]] == [1, 2]
    assert all(r["status"] == "ok" and r["output_token_throughput_per_gpu"] > 0 for r in summary["rows"])
    # every run records what the generate worker received over NIXL
    provenance = json.loads((Path(summary["run_dir"]) / "provenance.json").read_text())
    assert provenance["kv_connector"] == "NixlConnector"
    # tied to what the hosts ran: every unit and config file of ours hashed, versions read there
    deployed = provenance["deployment"]
    assert re.fullmatch(r"[0-9a-f]{16}", deployed["hash"])
    assert all(not h["missing"] and h["versions"]["vllm"] == "0.32.0" for h in deployed["hosts"].values())
    assert "/etc/systemd/system/disagg-generate-0.service" in deployed["hosts"][testhosts.address(2)]["files"]
    for run in provenance["runs"]:
        moved = run["kv_transfer"]
        assert moved["bytes"] > 0 and moved["failed_transfers"] == 0 and moved["prompt_tokens_external"] > 0
    deployment.ensure("deploys/baseline.py")
    summary = bench("--label-key", "baseline_label", "-o", str(tmp_path))
    assert summary["label"] == "baseline_tp1dp2" and len(summary["rows"]) == 2
    # an SLA that every label meets somewhere, so that both get a pick
    rows = [r for d in results.run_dirs([tmp_path]) for r in results.load_run(d)]
    sla = min(r["output_token_throughput_per_user"] for r in rows)
    out = subprocess.run(
        [sys.executable, "-m", "disagg", "report", str(tmp_path), "--sla-tokens-per-user", str(sla), "--json"]
        + ["-o", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert len(report["rows"]) == 4
    assert report["series"] == ["baseline_tp1dp2", "context_tp1dp2_generate_tp1dp1"]
    assert (tmp_path / "report" / "pareto.png").is_file()
    assert all(report["picks"].values()) and report["ratio"] > 0
    assert all(len(hashes) == 1 and hashes != ["unknown"] for hashes in report["deployments"].values())


def test_teardown_under_load_removes_ours_and_nothing_else(deployment, timings, figures):
    plan = deployment.ensure()
    # a user's own processes, started before teardown: a Python job and a
    # nats-server of their own on another port
    ssh(H1, "cp /opt/disagg/nats/bin/nats-server /usr/local/bin/nats-server")
    sentinels = ssh(
        H1,
        "setsid python3 -c 'import time; time.sleep(900)' >/dev/null 2>&1 < /dev/null & echo $!; "
        "setsid /usr/local/bin/nats-server -p 4333 >/dev/null 2>&1 < /dev/null & echo $!",
    ).stdout.split()
    # and a firewall table of theirs
    ssh(
        H1,
        "nft add table inet theirs && nft add chain inet theirs input "
        "'{ type filter hook input priority 0; policy accept; }'",
    )
    time.sleep(1)
    firewalls = {
        host: ssh(host, f"systemctl is-active {S.FIREWALL_UNIT}", check=False).stdout.strip() for host in (H1, H2)
    }
    deployment.changed()
    with Load(plan.router_url, MODEL, concurrency=2, pause=0.05, timeout=30) as traffic:
        time.sleep(2)
        run = run_deploy(INVENTORY, "deploys/teardown.py", timeout=300)
    deployment.changed("deploys/teardown.py")
    timings["teardown under load (deploys/teardown.py)"] = run.seconds
    figures.append(
        f"teardown under load: {traffic.result.summary()} (the layout ends: failures expected); "
        f"the firewall units before: {firewalls}"
    )
    s = plan.settings
    ours = {
        s.router_port,
        s.router_internal_port,
        s.router_metrics_port,
        s.frontdoor_metrics_port,
        s.nats_port,
        s.nats_monitor_port,
        s.prometheus_port,
        s.registry_metrics_port,
        8100,
        8101,
    }
    head_users = [
        S.SERVICE_USER,
        S.HEARTBEAT_USER,
        S.SYNC_USER,
        S.ROUTER_USER,
        S.NATS_USER,
        S.PROMETHEUS_USER,
        S.FRONTDOOR_USER,
    ]
    for host, users in ((H1, ",".join(head_users)), (H2, f"{S.SERVICE_USER},{S.HEARTBEAT_USER}")):
        assert listed_units(host) == [] and unit_files(host) == []
        # (pgrep refuses a user that does not exist: each host's own)
        assert ssh(host, f"pgrep -u {users}", check=False).returncode == 1
        assert ssh(host, f"test -e {S.FIREWALL_RULES}", check=False).returncode == 1
        listening = ssh(host, "ss -ltnH").stdout
        ports = {int(m) for m in re.findall(r":(\d+)\s", listening)}
        assert not ports & ours, listening
    # Prometheus's history is kept (purge removes it), its config and targets are not
    assert (
        ssh(
            H1,
            f"test -d {S.PROMETHEUS_DATA}/wal && ! test -e {S.PROMETHEUS_CONFIG_DIR} && "
            f"! test -e {S.SCRAPE_TARGETS_DIR} && ! test -e {S.SYNC_DIR} && ! test -e {S.LAYOUT_FILE}",
            check=False,
        ).returncode
        == 0
    )
    for pid in sentinels:
        assert ssh(H1, f"kill -0 {pid}", check=False).returncode == 0, f"teardown killed user process {pid}"
    assert 4333 in {int(m) for m in re.findall(r":(\d+)\s", ssh(H1, "ss -ltnH").stdout)}
    ssh(H1, f"kill {' '.join(sentinels)}")
    tables = ssh(H1, "nft list tables").stdout
    ssh(H1, "nft delete table inet theirs")
    assert "table inet theirs" in tables and "table inet disagg" not in tables, tables
    assert "table inet disagg" not in ssh(H2, "nft list tables").stdout


def preflight(*args: str) -> tuple[int, dict, float]:
    start = time.monotonic()
    code, report = as_operator.run_json("preflight", INVENTORY, *args)
    return code, report, time.monotonic() - start


def test_preflight_names_each_injected_problem_and_nothing_changes(deployment, timings):
    # a deploy made our accounts (teardown keeps them): one is then made someone else's
    deployment.ensure()
    plan = deployment.ensure("deploys/teardown.py")
    code, report, seconds = preflight()
    timings["preflight on clean hosts"] = seconds
    assert code == 0, report["problems"]
    assert any("no NVIDIA GPU on the PCI bus" in s for s in report["skipped"])  # CPU hosts: gpus not checkable
    (generate,) = [w for w in plan.workers if w.role == "generate"]
    blocked = next(w for w in plan.workers if w.role == "context")
    # a foreign process on the generate worker's port, the side channel of a
    # context worker firewalled in its host's network namespace, and an
    # account of our heartbeats' name that is someone's (a person's login)
    squatter = None
    rule = ["-p", "tcp", "--dport", str(blocked.nixl_port), "-j", "REJECT"]
    try:
        squatter = ssh(
            H2,
            f"setsid python3 -m http.server {generate.http_port} --bind {generate.address} "
            ">/dev/null 2>&1 < /dev/null & echo $!",
        ).stdout.strip()
        subprocess.run(["ip", "netns", "exec", "disagg-h1", "iptables", "-I", "INPUT", *rule], check=True)
        ssh(H2, f"usermod --comment 'Jane Doe' --shell /bin/bash {S.HEARTBEAT_USER}")
        time.sleep(1)
        code, report, _ = preflight()
        lines = [p["line"] for p in report["problems"]]
        assert code == 1 and len(lines) == 3, lines
        assert lines[0].startswith(f"{generate.host}: port {generate.http_port}: python3 (pid {squatter}")
        assert lines[1] == (
            f"{generate.host}: user {S.HEARTBEAT_USER}: exists and is not disagg's (GECOS 'Jane Doe', shell "
            "/bin/bash); disagg never takes over an account: rename or remove it"
        )
        assert lines[2] == (
            f"{generate.host}: fabric: cannot open TCP to {blocked.name}'s NIXL side channel "
            f"{blocked.address}:{blocked.nixl_port} on {blocked.host}; check the address (the host's "
            "routable one), firewalls and routes between the hosts"
        )
        # the deploy runs the same checks first, and changes nothing
        with pytest.raises(DeployError) as failed:
            run_deploy(INVENTORY, "deploys/disagg.py", timeout=300)
        assert "preflight found 3 problem(s); nothing was changed" in str(failed.value)
        for host in (H1, H2):
            assert listed_units(host) == [] and unit_files(host) == []
        assert ":Jane Doe:" in ssh(H2, f"getent passwd {S.HEARTBEAT_USER}").stdout  # not taken over
    finally:
        subprocess.run(["ip", "netns", "exec", "disagg-h1", "iptables", "-D", "INPUT", *rule], check=False)
        if squatter:
            ssh(H2, f"kill {squatter}", check=False)
        ssh(
            H2,
            f"usermod --comment {shlex.quote(S.ACCOUNT_COMMENT)} --shell /usr/sbin/nologin {S.HEARTBEAT_USER}",
            check=False,
        )


def sweep(out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "disagg",
            "sweep",
            "-i",
            INVENTORY,
            "--labels",
            ",".join(SWEPT),
            "--concurrency",
            "1",
            "--isl",
            "64",
            "--osl",
            "16",
            "-o",
            str(out),
            "--json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )


SWEPT = ["context_tp1dp1_generate_tp1dp1", "baseline_tp1dp2"]


def test_sweep_two_labels_then_resume(deployment, tmp_path, timings):
    deployment.changed()  # the sweep deploys and tears down as it goes
    start = time.monotonic()
    first = sweep(tmp_path)
    timings["sweep of two labels (c1)"] = time.monotonic() - start
    assert first.returncode == 0, first.stderr[-4000:]
    report = json.loads(first.stdout)
    assert sorted({r["label"] for r in report["rows"]}) == sorted(SWEPT)
    assert all(r["status"] == "ok" for r in report["rows"])
    assert (tmp_path / "pareto.png").is_file() and (tmp_path / "report.md").is_file()
    for label in SWEPT:
        assert f"{label}: deploying" in first.stderr and f"{label}: ready after" in first.stderr
    # torn down at the end
    assert listed_units(H1) == [] and listed_units(H2) == []
    deployment.changed("deploys/teardown.py")
    runs = sorted(p.parent for p in tmp_path.glob("*/*/provenance.json"))
    assert len(runs) == 2

    second = sweep(tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    for label in SWEPT:
        assert f"{label}: complete results in" in second.stderr and f"{label}: deploying" not in second.stderr
    assert sorted(p.parent for p in tmp_path.glob("*/*/provenance.json")) == runs
    assert json.loads(second.stdout)["rows"] == report["rows"]
