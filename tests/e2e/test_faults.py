"""Faults under load on the real stack: a bounded load through the front
door (a few concurrent streaming chat requests, each ok only with HTTP 200 and
[DONE]) while a change or a fault is applied; requests sent and failed are
printed as `fault:` lines at the end of the run."""

from __future__ import annotations

import functools
import json
import os
import re
import time
import urllib.request

import as_operator
import pytest
import waiting

from disagg.agent import kv
from disagg.core import settings as S
from disagg.infra.launch import run_deploy
from disagg.lab import smoke
from disagg.lab.load import Load
from disagg.lab.testhosts import ssh
from disagg.perf import kvtransfer

pytestmark = pytest.mark.e2e


# each poll is an SSH command or an HTTP request to the hosts
until = functools.partial(waiting.until, every=0.5)

INVENTORY = "inventories/local.py"
H1, H2 = 1, 2
MODEL = "tiny-llama"
# two clients with a short pause: enough traffic to hit every worker many
# times a second, little enough that a restarting vLLM gets CPU on 2 cores
CLIENTS, PAUSE = 2, 0.05


def load(plan, timeout: float = 120) -> Load:
    return Load(plan.router_url, MODEL, concurrency=CLIENTS, pause=PAUSE, timeout=timeout)


def status(*args: str) -> tuple[int, dict]:
    return as_operator.status(INVENTORY, *args)


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
        return ssh(
            H1,
            f"journalctl -u disagg-router -o short-unix --no-pager --since @{after:.0f} "
            f"| grep -m1 -E '{needle}' || true",
        ).stdout.strip()

    until(seen, timeout, f"router dropped {url}")
    return float(seen().split()[0]) - after


def now_on_head() -> float:
    return float(ssh(H1, "date +%s.%N").stdout)


def started(host: int, units: list[str]) -> dict[str, str]:
    out = ssh(host, " ; ".join(f"systemctl show -p ActiveEnterTimestampMonotonic --value {u}" for u in units)).stdout
    return dict(zip(units, out.split()))


def test_context_args_change_rolls_under_load_and_loses_nothing(deployment, figures, timings):
    plan = deployment.ensure()
    change = 'context_args=["--max-num-seqs","64"]'
    dry = run_deploy(INVENTORY, "deploys/disagg.py", change, dry=True, diff=True)
    modified = re.findall(r"Will modify \S*?(/etc/\S+)", dry.output)
    assert sorted(modified) == [
        "/etc/systemd/system/disagg-context-0.service",
        "/etc/systemd/system/disagg-context-1.service",
    ]
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
    journal = ssh(
        H1,
        "journalctl -u disagg-context-0 -u disagg-context-1 -o short-unix --no-pager "
        "--since -15min | grep -E 'Stopping|Started'",
    ).stdout
    events = [(line.split()[0], "Stopping" in line, "context-0" in line) for line in journal.splitlines()]
    stop1 = max(float(t) for t, stopping, c0 in events if stopping and not c0)
    start0 = max(float(t) for t, stopping, c0 in events if not stopping and c0)
    assert start0 < stop1
    left = ssh(
        H1,
        "journalctl -u disagg-context-0 -u disagg-context-1 --since -15min -o cat | grep -c 'out of the router after'",
    ).stdout.strip()
    assert int(left) >= 2


def frontdoor_retries(plan) -> float:
    """Requests the front door sent the router again, by its own count."""
    return smoke.counter(f"http://{plan.frontdoor_metrics_hostport()}", "haproxy_backend_retry_warnings_total")


def test_kill_9_of_a_context_worker_under_load_fails_no_request(deployment, figures, timings):
    """The router sends prefills to the dead worker until it forgets it
    (4-5 s after the sync stopped sending it); each fails at once and the
    front door sends it again, and the router picks the next context worker.
    A generate worker whose KV source died recomputes the prompt."""
    plan = deployment.ensure()
    (victim,) = [w for w in plan.workers if w.name == "context-0"]
    retried = frontdoor_retries(plan)
    with load(plan) as traffic:
        time.sleep(3)
        pid = ssh(H1, f"systemctl show -p MainPID --value {victim.unit}").stdout.strip()
        killed = traffic.at()
        # every process of the worker: its API server and its EngineCore (which holds the KV cache)
        at = float(ssh(H1, f"date +%s.%N; systemctl kill --signal=SIGKILL {victim.unit}").stdout)
        gone = router_dropped(victim.url, at, 30)
        until(
            lambda: ssh(H1, f"systemctl show -p MainPID --value {victim.unit}").stdout.strip() not in ("0", pid)
            and router_lists(victim.url),
            300,
            "killed worker serving again",
        )
        back_at = traffic.at()
        time.sleep(3)
    result, retries = traffic.result, frontdoor_retries(plan) - retried
    figures.append(
        f"kill -9 of context-0 under load: {result.summary()}; the front door sent {retries:.0f} "
        f"requests again; the router dropped it {gone:.1f} s after the kill, and listed it again "
        f"{back_at - killed:.0f} s after"
    )
    timings["kill -9 of a context worker -> routed again"] = back_at - killed
    assert result.failed == 0, result.failures[:5]
    assert retries > 0, "the front door retried nothing: the kill did not hit a request"
    # the sync stops sending it within a second (its port refuses); the router forgets it 4-5 s later
    assert gone < kv.ROUTER_FORGETS_AFTER + 2
    assert result.ok > 50


def test_kill_9_of_the_router_under_load(deployment, figures, timings):
    """The router restarts at once (RestartSec=1) and the front door tries a
    refused connection again after a second; until the sync has sent the
    new router its members (every second) the router answers 503."""
    plan = deployment.ensure()
    retried = frontdoor_retries(plan)
    with load(plan) as traffic:
        time.sleep(3)
        pid = ssh(H1, f"systemctl show -p MainPID --value {S.ROUTER_UNIT}").stdout.strip()
        killed = traffic.at()
        ssh(H1, f"kill -9 {pid}")
        serving = until(lambda: _answers(plan), 60, "the front door serving after the router's kill -9")
        time.sleep(3)
    result, retries = traffic.result, frontdoor_retries(plan) - retried
    figures.append(
        f"kill -9 of the router under load: {result.summary()}; the front door sent {retries:.0f} requests "
        f"again and served again {serving:.1f} s after the kill"
    )
    timings["kill -9 of the router -> the front door serves again"] = serving
    assert ssh(H1, f"systemctl show -p MainPID --value {S.ROUTER_UNIT}").stdout.strip() not in ("0", pid)
    assert all(killed <= ended <= killed + serving + 5 for _, ended, _ in result.failures), result.failures[:5]
    assert result.failed_between(killed + serving + 1, result.seconds) == 0
    assert serving < 15 and result.ok > 20


def _answers(plan) -> bool:
    try:
        return smoke.chat(plan.router_url, MODEL, 2, timeout=10)["completion_tokens"] == 2
    except OSError:
        return False


def _post(url: str, body: dict, key: str) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def test_a_generate_worker_recomputes_the_prompt_its_dead_kv_source_held(deployment, figures):
    """The router's two halves by hand: the prefill answers on context-0,
    context-0 is killed, then the generate worker is sent the request with
    the KV cache's address on the dead worker (kv_load_failure_policy:
    recompute, disagg's default)."""
    plan = deployment.ensure()
    (victim,) = [w for w in plan.workers if w.name == "context-0"]
    (generate,) = [w for w in plan.workers if w.role == "generate"]
    key = ssh(H1, f"sed -n 's/^VLLM_API_KEY=//p' {S.API_KEY_ENV}").stdout.strip()
    words = " ".join(f"r{os.getpid()}x{j}" for j in range(80))
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": words}],
        "max_tokens": 4,
        "min_tokens": 4,
        "ignore_eos": True,
    }
    prefill = _post(
        f"{victim.url}/v1/chat/completions",
        {
            **request,
            "max_tokens": 1,
            "min_tokens": 1,
            "kv_transfer_params": {
                "do_remote_decode": True,
                "do_remote_prefill": False,
                "remote_engine_id": None,
                "remote_block_ids": None,
                "remote_host": None,
                "remote_port": None,
            },
        },
        key,
    )
    params = prefill["kv_transfer_params"]
    assert params["remote_port"] == victim.nixl_port
    pid = ssh(H1, f"systemctl show -p MainPID --value {victim.unit}").stdout.strip()
    before = kvtransfer.read([generate.url])
    # every process of the worker: the EngineCore holds the KV cache, not the API server (MainPID)
    ssh(H1, f"systemctl kill --signal=SIGKILL {victim.unit}")
    try:
        answer = _post(f"{generate.url}/v1/chat/completions", {**request, "kv_transfer_params": params}, key)
        moved = kvtransfer.delta(before, kvtransfer.read([generate.url]))
        figures.append(
            f"KV source killed after its prefill: the generate worker answered "
            f"{answer['usage']['completion_tokens']} tokens; {moved}"
        )
        assert answer["usage"]["completion_tokens"] == 4
        prompt = answer["usage"]["prompt_tokens"]
        assert moved["prompt_tokens_external"] == 0 and moved["prompt_tokens_local_compute"] > 0
        assert moved["prompt_tokens_local_compute"] + moved["prompt_tokens_local_cache"] == prompt
    finally:  # the layout whole again for the tests after this one
        until(
            lambda: ssh(H1, f"systemctl show -p MainPID --value {victim.unit}").stdout.strip() not in ("0", pid)
            and router_lists(victim.url),
            300,
            "killed worker serving again",
        )


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


def test_generate_host_vanishes_and_comes_back(deployment, test_hosts, figures, timings):
    plan = deployment.ensure()
    (generate,) = [w for w in plan.workers if w.role == "generate"]
    # a request in flight to a host that vanished hangs (no RST; TCP retries
    # for minutes): a client that gives up after 10 s counts it as failed
    with load(plan, timeout=10) as traffic:
        time.sleep(3)
        cut = now_on_head()
        test_hosts.cut(H2)
        try:
            gone = router_dropped(generate.url, cut, 60)
            # longer than UCX's keepalive: NIXL marks the context workers'
            # agents disconnected (the vLLM plugin makes vLLM handshake again)
            time.sleep(60)
            failing = traffic.result.failed
        finally:
            test_hosts.reconnect(H2)
        back = until(lambda: router_lists(generate.url), 60, "worker of the returned host routed again")
        restored = traffic.at()
        time.sleep(8)
    result = traffic.result
    after = result.failed_between(restored, result.seconds)
    figures.append(
        f"generate host cut off under load: {result.summary()}; router dropped its worker after "
        f"{gone:.1f} s (TTL {kv.TTL:g} s + router expiry), routed again {back:.1f} s after the link came back; "
        f"{after} failed after that"
    )
    timings["host cut off -> its worker out of the router"] = gone
    timings["host back -> its worker routed again"] = back
    # the only generate worker: nothing can be served without it; requests
    # then fail (503: no decode worker) instead of hanging
    assert failing > 0 and any(r.startswith("HTTP 503") for *_, r in result.failures)
    # its entry expires by the server's clock, then the router forgets it
    assert gone <= kv.TTL + kv.ROUTER_FORGETS_AFTER + 5
    # serving again once it is back: at most the first transfer from each
    # context worker fails (its NIXL peer disconnected), none after
    context = [w for w in plan.workers if w.role == "context"]
    assert after <= len(context), result.failures[-5:]
    assert result.failed_between(restored + 3, result.seconds) == 0, result.failures[-5:]
