"""The front door as a neighbour on the hosts' network sees it (a network
namespace on the bridge that is neither host nor controller): inference
and nothing else, keys and TLS when data asks for them, keys rotated under
load without a failed request."""

import json
import os
import sys
import time

import pytest

from disagg.core import pki
from disagg.core import settings as S
from disagg.infra.launch import run_deploy
from disagg.lab import smoke, testhosts
from disagg.lab.load import Load
from disagg.lab.testhosts import ssh

pytestmark = pytest.mark.e2e

INVENTORY = "inventories/local.py"
H1 = 1
MODEL = "tiny-llama"

# one request from the neighbour, its HTTP status printed (or the error's name)
CLIENT = r"""
import http.client, json, socket, ssl, sys, urllib.parse
url, method, path, key, ca, length, timeout = sys.argv[1:8]
parts = urllib.parse.urlsplit(url)
body = json.dumps({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
try:
    if length:  # a body announced as larger than the limit: the front door answers before reading it
        conn = socket.create_connection((parts.hostname, parts.port), timeout=float(timeout))
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {length}\r\n\r\n{{".encode())
        print(conn.recv(64).split()[1].decode())
        sys.exit()
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=float(timeout),
                                           context=ssl.create_default_context(cafile=ca or None))
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=float(timeout))
    conn.request(method, path, body if method == "POST" else None, headers)
    print(conn.getresponse().status)
except Exception as e:
    print(type(e).__name__)
"""


def from_neighbour(
    outside, url: str, method: str, path: str, key: str = "", ca: str = "", length: int = 0, timeout: float = 30
) -> str:
    out = outside(sys.executable, "-c", CLIENT, url, method, path, key, ca, str(length or ""), str(timeout))
    return out.stdout.strip() or out.stderr.strip()[-200:]


def test_clients_reach_inference_and_nothing_else(deployment, figures):
    plan = deployment.ensure()
    context = next(w for w in plan.workers if w.role == "context")
    admin = [
        ("POST", "/flush_cache"),
        ("POST", f"/remove_worker?url={context.url}"),
        ("GET", "/workers"),
        ("GET", "/list_workers"),
        ("POST", f"/add_worker?url=http://{testhosts.OUTSIDER}:9"),
        ("GET", "/get_loads"),
        ("GET", "/metrics"),
        ("GET", "/v1/../workers"),
    ]
    with testhosts.outsider() as outside:
        answers = {f"{m} {p}": from_neighbour(outside, plan.router_url, m, p) for m, p in admin}
        chat = from_neighbour(outside, plan.router_url, "POST", "/v1/chat/completions")
        health = from_neighbour(outside, plan.router_url, "GET", "/health")
        limit = plan.settings.client_max_request_mb << 20
        too_big = from_neighbour(outside, plan.router_url, "POST", "/v1/chat/completions", length=limit + 1)
        # the router's own port is not the neighbour's (the firewall drops it)
        internal = from_neighbour(outside, plan.router_internal_url(), "GET", "/workers", timeout=3)
    figures.append(
        f"front door from a neighbour: router paths {sorted(set(answers.values()))}, chat {chat}, "
        f"health {health}, over {limit >> 20} MiB {too_big}, the router's own port {internal}"
    )
    assert answers == dict.fromkeys(answers, "403"), answers
    assert (chat, health, too_big) == ("200", "200", "413")
    assert internal == "TimeoutError", internal
    # nothing the neighbour asked reached the router: every worker still routed
    assert smoke.chat(plan.router_url, MODEL, 3)["completion_tokens"] == 3


def test_client_keys_and_tls_rotate_under_load_without_a_failed_request(deployment, figures, timings):
    """Keys and TLS come by a reload of the front door alone (no restart:
    its main process stays, the router and workers too); a client of a
    key kept across a rotation never fails."""
    plan = deployment.ensure()
    base = deployment.data
    head = plan.cluster.head
    k1, k2, k3 = (f"client-{i}-" + os.urandom(12).hex() for i in (1, 2, 3))
    units = [S.FRONTDOOR_UNIT, S.ROUTER_UNIT, *(w.unit for w in plan.workers_on(head))]
    pids = ssh(H1, " ; ".join(f"systemctl show -p MainPID --value {u}" for u in units)).stdout.split()
    first = (*base, f"client_api_keys={json.dumps([k1, k2])}", f"client_tls_names={json.dumps([plan.head.address])}")
    try:
        run = run_deploy(INVENTORY, "deploys/disagg.py", *first)
        deployment.changed("deploys/disagg.py", first)
        timings["client keys and TLS on (front door reloaded)"] = run.seconds
        assert run.changed and all(name.startswith("Front door | ") for name in run.changed), sorted(run.changed)
        assert ssh(H1, " ; ".join(f"systemctl show -p MainPID --value {u}" for u in units)).stdout.split() == pids
        https = deployment.plan().router_url
        ca = str(pki.ca_file(head))
        assert https == f"https://{plan.head.address}:{plan.settings.router_port}"
        with testhosts.outsider() as outside:
            seen = {
                what: from_neighbour(outside, url, "POST", "/v1/chat/completions", key, ca)
                for what, url, key in (
                    ("no key", https, ""),
                    ("another key", https, "not-a-key"),
                    ("k1", https, k1),
                    ("k2", https, k2),
                    ("plaintext", plan.router_url, k1),
                )
            }
        figures.append(f"front door with keys and TLS, from a neighbour: {seen}")
        assert seen["no key"] == seen["another key"] == "401" and seen["k1"] == seen["k2"] == "200"
        assert seen["plaintext"] in ("RemoteDisconnected", "ConnectionResetError", "BadStatusLine"), seen
        # rotate: k1 out, k3 in, while a client of k2 streams
        second = (
            *base,
            f"client_api_keys={json.dumps([k2, k3])}",
            f"client_tls_names={json.dumps([plan.head.address])}",
        )
        with Load(https, MODEL, concurrency=2, pause=0.05, api_key=k2, ca=ca) as traffic:
            time.sleep(3)
            rotated = run_deploy(INVENTORY, "deploys/disagg.py", *second)
            deployment.changed("deploys/disagg.py", second)
            time.sleep(3)
        figures.append(f"client keys rotated under load (reload {rotated.seconds:.1f} s): {traffic.result.summary()}")
        assert traffic.result.failed == 0 and traffic.result.ok > 20, traffic.result.failures[:3]
        assert ssh(H1, " ; ".join(f"systemctl show -p MainPID --value {u}" for u in units)).stdout.split() == pids
        with testhosts.outsider() as outside:
            assert from_neighbour(outside, https, "POST", "/v1/chat/completions", k1, ca) == "401"
            assert from_neighbour(outside, https, "POST", "/v1/chat/completions", k3, ca) == "200"
        # never in the deploy's output, the front door's journal or any log of the head
        for key in (k1, k2, k3):
            assert key not in run.output + rotated.output
            assert ssh(H1, f"journalctl --no-pager -o cat | grep -cF -- {key}", check=False).stdout.strip() == "0"
    finally:
        run_deploy(INVENTORY, "deploys/disagg.py", *base)
        deployment.changed("deploys/disagg.py", base)
    assert smoke.chat(plan.router_url, MODEL, 2)["completion_tokens"] == 2


# from the neighbour: a burst of requests on one connection, then connections held open at once
LIMITS = r"""
import http.client, json, socket, sys, time, urllib.parse
url, n = sys.argv[1], int(sys.argv[2])
parts = urllib.parse.urlsplit(url)
conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
codes = []
for _ in range(n):
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        codes.append(response.status)
    except (OSError, http.client.HTTPException) as e:
        codes.append(type(e).__name__)
        conn.close()
conn.close()
time.sleep(3)  # the burst out of the rate's window (the current second and the one before)
held = []
for _ in range(8):
    try:
        held.append(socket.create_connection((parts.hostname, parts.port), timeout=5))
    except OSError:  # a connection over the limit may be reset as it is made
        pass
answered = 0
for s in held:
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answered += s.recv(12).startswith(b"HTTP/1.1 ")
    except OSError:
        pass
print(json.dumps({"codes": codes, "answered": answered}))
"""


def test_client_rate_and_connection_limits(deployment, figures):
    plan = deployment.ensure()
    base = deployment.data
    limited = (*base, "client_rate_limit=20", "client_max_connections=4")
    try:
        run_deploy(INVENTORY, "deploys/disagg.py", *limited)
        deployment.changed("deploys/disagg.py", limited)
        with testhosts.outsider() as outside:
            probe = outside(sys.executable, "-c", LIMITS, plan.router_url, "60")
        assert probe.returncode == 0, probe.stderr
        seen = json.loads(probe.stdout)
    finally:
        run_deploy(INVENTORY, "deploys/disagg.py", *base)
        deployment.changed("deploys/disagg.py", base)
    codes = seen["codes"]
    figures.append(
        f"client limits (20 requests/s, 4 connections) from a neighbour: a burst of 60 requests got "
        f"{codes.count(200)} x 200 and {codes.count(429)} x 429; 8 connections held, {seen['answered']} "
        "answered"
    )
    assert set(codes) == {200, 429} and codes[:15] == [200] * 15
    assert seen["answered"] == 4
