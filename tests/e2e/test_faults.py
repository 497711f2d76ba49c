"""Faults under load on the real stack: a bounded load through the router
(a few concurrent streaming chat requests, each ok only with HTTP 200 and
[DONE]) while a change or a fault is applied; requests sent and failed are
printed as `fault:` lines at the end of the run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from disagg.agent import kv
from disagg.deploy import run_deploy
from disagg.load import Load
from disagg.testhosts import ssh

pytestmark = pytest.mark.e2e

INVENTORY = "inventories/local.py"
H1, H2 = 1, 2
MODEL = "tiny-llama"
# two clients with a short pause: enough traffic to hit every worker many
# times a second, little enough that a restarting vLLM gets CPU on 2 cores
CLIENTS, PAUSE = 2, 0.05


def load(plan, timeout: float = 120) -> Load:
    return Load(plan.router_url, MODEL, concurrency=CLIENTS, pause=PAUSE, timeout=timeout)


def status(*args: str) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, "-m", "disagg", "status", "-i", INVENTORY, "--json", *args],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode in (0, 1), out.stderr[-3000:]
    return out.returncode, json.loads(out.stdout)


def router_lists(url: str) -> bool | None:
    """Whether the router itself lists url (its own view, via the sync)."""
    code, current = status()
    members = current["router_members"]
    return None if members is None else url in members


def router_dropped(url: str, after: float, timeout: float) -> float:
    """Seconds from `after` (the head's clock) until the router itself logged
    that it dropped url."""
    needle = f"Remove .* \\[HTTP:{url.removeprefix('http://')},"

    def seen() -> str:
        return ssh(H1, f"journalctl -u disagg-router -o short-unix --no-pager --since @{after:.0f} "
                       f"| grep -m1 -E '{needle}' || true").stdout.strip()  # fmt: skip

    until(seen, timeout, f"router dropped {url}")
    return float(seen().split()[0]) - after


def now_on_head() -> float:
    return float(ssh(H1, "date +%s.%N").stdout)


def until(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.5)
    return time.monotonic() - start


def started(host: int, units: list[str]) -> dict[str, str]:
    out = ssh(host, " ; ".join(f"systemctl show -p ActiveEnterTimestampMonotonic --value {u}" for u in units)).stdout
    return dict(zip(units, out.split()))


def test_context_args_change_rolls_under_load_and_loses_nothing(deployment, figures, timings):
    plan = deployment.ensure(data=())
    change = 'context_args=["--max-num-seqs","64"]'
    dry = run_deploy(INVENTORY, "deploys/disagg.py", change, dry=True, diff=True)
    modified = re.findall(r"Will modify \S*?(/etc/\S+)", dry.output)
    assert sorted(modified) == ["/etc/systemd/system/disagg-context-0.service",
                                "/etc/systemd/system/disagg-context-1.service"]  # fmt: skip
    assert len(re.findall(r"^\s+\+\s+--max-num-seqs 64$", dry.output, re.M)) == 2
    # the waves, and no warning: the generate worker is not touched
    assert "Rolling restart 1/2: context-0, generate-0" in dry.output and "Rolling restart 2/2: context-1" in dry.output
    assert "is the only" not in dry.output
    before = {**started(H1, ["disagg-context-0", "disagg-context-1"]), **started(H2, ["disagg-generate-0"])}
    with load(plan) as traffic:
        time.sleep(3)
        run = run_deploy(INVENTORY, "deploys/disagg.py", change)
        time.sleep(3)
    deployment.changed("deploys/disagg.py", (change,))
    result = traffic.result
    figures.append(f"context_args change rolled under load: {result.summary()}; deploy {run.seconds:.0f} s")
    timings["rolling change of 2 context workers under load"] = run.seconds
    assert result.failed == 0, result.summary()
    assert result.ok > 50
    after = {**started(H1, ["disagg-context-0", "disagg-context-1"]), **started(H2, ["disagg-generate-0"])}
    assert after["disagg-generate-0"] == before["disagg-generate-0"]
    assert all(after[u] != before[u] for u in ("disagg-context-0", "disagg-context-1"))
    # one at a time: context-1 was stopped only after context-0 was back
    journal = ssh(H1, "journalctl -u disagg-context-0 -u disagg-context-1 -o short-unix --no-pager "
                      "--since -15min | grep -E 'Stopping|Started'").stdout  # fmt: skip
    events = [(line.split()[0], "Stopping" in line, "context-0" in line) for line in journal.splitlines()]
    stop1 = max(float(t) for t, stopping, c0 in events if stopping and not c0)
    start0 = max(float(t) for t, stopping, c0 in events if not stopping and c0)
    assert start0 < stop1
    left = ssh(H1, "journalctl -u disagg-context-0 -u disagg-context-1 --since -15min -o cat | "
                   "grep -c 'out of the router after'").stdout.strip()  # fmt: skip
    assert int(left) >= 2


def test_kill_9_of_a_context_worker_under_load(deployment, figures, timings):
    plan = deployment.ensure()
    (victim,) = [w for w in plan.workers if w.name == "context-0"]
    with load(plan) as traffic:
        time.sleep(3)
        pid = ssh(H1, f"systemctl show -p MainPID --value {victim.unit}").stdout.strip()
        killed = traffic.at()
        at = float(ssh(H1, f"date +%s.%N; kill -9 {pid}").stdout)
        gone = router_dropped(victim.url, at, 30)
        back = until(lambda: ssh(H1, f"systemctl show -p MainPID --value {victim.unit}").stdout.strip() not in
                     ("0", pid) and router_lists(victim.url), 300, "killed worker serving again")  # fmt: skip
        back_at = traffic.at()
        time.sleep(3)
    result = traffic.result
    figures.append(f"kill -9 of context-0 under load: {result.summary()}; the router dropped it {gone:.1f} s "
                   f"after the kill, and listed it again {back_at - killed:.0f} s after")  # fmt: skip
    timings["kill -9 of a context worker -> routed again"] = back_at - killed
    # vllm-router 0.1.17 does not retry a failed prefill in PD discovery mode:
    # requests in flight on the worker and those sent to it before the router
    # drops it fail (some late: a decode pulling KV from the dead worker fails
    # when NIXL gives up); none failed before the kill, none sent after the drop
    assert all(ended >= killed for _, ended, _ in result.failures), result.failures[:3]
    assert result.failed_between(killed + gone + 2, result.seconds) == 0, result.failures[-3:]
    # the sync stops sending it within a second (its port refuses); the router forgets it 4-5 s later
    assert gone < kv.ROUTER_FORGETS_AFTER + 2
    assert result.ok > 50


def test_nats_down_30_s_under_load_loses_nothing(deployment, figures, timings):
    plan = deployment.ensure()
    with load(plan) as traffic:
        time.sleep(3)
        ssh(H1, "systemctl stop disagg-nats")
        time.sleep(30)
        ssh(H1, "systemctl start disagg-nats")
        restarted = time.monotonic()
        code, current = status("--wait", "--timeout", "60")
        whole = time.monotonic() - restarted
        time.sleep(3)
    result = traffic.result
    figures.append(f"NATS stopped 30 s under load: {result.summary()}; registry whole {whole:.1f} s after restart")
    timings["NATS back -> registry whole"] = whole
    assert code == 0, current["problems"]
    assert result.failed == 0, result.summary()
    assert result.ok > 100


def test_generate_host_vanishes_and_comes_back(deployment, figures, timings):
    plan = deployment.ensure()
    (generate,) = [w for w in plan.workers if w.role == "generate"]
    link = ["ip", "-n", "disagg-h2", "link", "set", "eth0"]
    # a request in flight to a host that vanished hangs (no RST; TCP retries
    # for minutes): a client that gives up after 10 s counts it as failed
    with load(plan, timeout=10) as traffic:
        time.sleep(3)
        cut = now_on_head()
        subprocess.run([*link, "down"], check=True)
        try:
            gone = router_dropped(generate.url, cut, 60)
            # longer than UCX's keepalive: NIXL marks the context workers'
            # agents disconnected (the vLLM plugin makes vLLM handshake again)
            time.sleep(60)
            failing = traffic.result.failed
        finally:
            subprocess.run([*link, "up"], check=True)
        back = until(lambda: router_lists(generate.url), 60, "worker of the returned host routed again")
        restored = traffic.at()
        time.sleep(8)
    result = traffic.result
    after = result.failed_between(restored, result.seconds)
    figures.append(f"generate host cut off under load: {result.summary()}; router dropped its worker after "
                   f"{gone:.1f} s (TTL {kv.TTL:g} s + router expiry), routed again {back:.1f} s after the link came back; "
                   f"{after} failed after that")  # fmt: skip
    timings["host cut off -> its worker out of the router"] = gone
    timings["host back -> its worker routed again"] = back
    # the only generate worker: nothing can be served without it; requests
    # then fail (503: no decode worker) instead of hanging
    assert failing > 0 and any(r == "HTTP 503" for *_, r in result.failures)
    # its entry expires by the server's clock, then the router forgets it
    assert gone <= kv.TTL + kv.ROUTER_FORGETS_AFTER + 5
    # serving again once it is back: at most the first transfer from each
    # context worker fails (its NIXL peer disconnected), none after
    context = [w for w in plan.workers if w.role == "context"]
    assert after <= len(context), result.failures[-5:]
    assert result.failed_between(restored + 3, result.seconds) == 0, result.failures[-5:]
