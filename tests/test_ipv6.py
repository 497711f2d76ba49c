"""An all-IPv6 inventory, planned and rendered: every host:port and URL in
brackets (disagg/agent/net.py), every bare address where a program takes one
(vLLM's --host, NIXL's side channel, vllm-router's --host), nftables rules in
the ip6 family, and the router's own log of an IPv6 member read back as the
worker's URL."""

import pytest
import yaml

from disagg.agent import net, targets
from disagg.agent.routerview import DiscoveryLog
from disagg.core import pki
from disagg.core.plan import make_plan
from disagg.core.units import host_units
from disagg.infra.inventory import load_inventory

CONTEXT, GENERATE, ADMIN = "fd00:213::11", "fd00:213::12", "fd00:213::5"


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    inventory = tmp_path_factory.mktemp("v6") / "inventory.py"
    inventory.write_text(
        f"context = [('{CONTEXT}', {{'gpus': 8}})]\n"
        f"generate = [('{GENERATE}', {{'gpus': 8}})]\n"
        f"all = (['{CONTEXT}', '{GENERATE}'], {{'label': 'context_tp2dp4_generate_tp8dp1', 'model': 'm', "
        f"'firewall_allow': ['{ADMIN}', '10.0.0.0/24']}})\n"
    )
    return make_plan(load_inventory(str(inventory)))


def test_urls_and_host_ports_bracket_an_ipv6_address(plan):
    assert net.hostport(CONTEXT, 8100) == f"[{CONTEXT}]:8100" and net.hostport("10.0.0.1", 80) == "10.0.0.1:80"
    assert net.hostport("h100-node1", 80) == "h100-node1:80"
    assert [w.url for w in plan.workers][:2] == [f"http://[{CONTEXT}]:8100", f"http://[{CONTEXT}]:8101"]
    assert plan.workers[-1].url == f"http://[{GENERATE}]:8100"
    assert plan.router_url == f"http://[{CONTEXT}]:8000"
    assert plan.router_metrics_url == f"http://[{CONTEXT}]:29000/metrics"
    assert plan.nats_url == f"tls://[{CONTEXT}]:4222"
    assert plan.prometheus_url == f"http://[{CONTEXT}]:9090"
    # the router's ZMQ discovery stays on IPv4 loopback (vllm-router cannot bind it on IPv6)
    assert plan.discovery_address == "127.0.0.1:30001"


def test_units_give_programs_bare_addresses_and_urls_in_brackets(plan):
    head = host_units(plan, CONTEXT)
    (engine,) = [
        line
        for line in head["/etc/systemd/system/disagg-context-0.service"].split("\nExec")
        if line.startswith("Start=")
    ]
    assert f"--host {CONTEXT} " in engine and f"[{CONTEXT}]" not in engine
    assert f"VLLM_NIXL_SIDE_CHANNEL_HOST={CONTEXT}\n" in head["/etc/disagg/disagg-context-0.env"]
    agent = head["/etc/systemd/system/disagg-context-0-agent.service"]
    # quoted as systemd reads them (brackets mean something to a shell)
    for arg in (f"--nats 'tls://[{CONTEXT}]:4222'", f"--url 'http://[{CONTEXT}]:8100'", f"--zmq '[{CONTEXT}]:5600'"):
        assert arg in agent
    router = head["/etc/systemd/system/disagg-router.service"]
    assert f"--host {CONTEXT} \\\n    --port 8001 \\\n    --prometheus-host {CONTEXT} \\\n" in router
    door = head["/etc/disagg/frontdoor/haproxy.cfg"]
    assert f"  # [{CONTEXT}]:8000\n  bind fd@3\n" in door and f"  server {CONTEXT} [{CONTEXT}]:8001\n" in door
    socket = head["/etc/systemd/system/disagg-frontdoor.socket"]
    assert f"\nListenStream=[{CONTEXT}]:8000\nListenStream=[{CONTEXT}]:8404\n" in socket
    assert f'listen: "[{CONTEXT}]:4222"' in head["/etc/disagg/nats-server.conf"]
    scrape = yaml.safe_load(head["/etc/disagg/prometheus/prometheus.yml"])
    static = {
        c["job_name"]: c["static_configs"][0]["targets"] for c in scrape["scrape_configs"] if "static_configs" in c
    }
    assert static == {
        "prometheus": [f"[{CONTEXT}]:9090"],
        "router": [f"[{CONTEXT}]:29000"],
        "frontdoor": [f"[{CONTEXT}]:8404"],
        "registry": ["127.0.0.1:9091"],
    }
    prometheus = head["/etc/systemd/system/disagg-prometheus.service"]
    assert f"--web.listen-address=[{CONTEXT}]:9090" in prometheus


def test_the_firewall_admits_ipv6_peers_in_the_ip6_family(plan):
    rules = host_units(plan, CONTEXT, admins=(ADMIN,))["/etc/disagg/firewall.nft"]
    # the controller (ADMIN, as the host sees it) is also listed in firewall_allow: once
    assert f"tcp dport {{ 4222 }} ip6 saddr {{ {CONTEXT}, {GENERATE}, {ADMIN}/128 }} accept" in rules
    assert "tcp dport { 4222 } ip saddr { 10.0.0.0/24 } accept" in rules
    assert not any("ip saddr" in line and "fd00:" in line for line in rules.splitlines())


def test_the_routers_log_of_an_ipv6_member_is_the_workers_url(plan):
    """vllm-router 0.1.17's own lines for an instance sent as `[addr]:port` (seen in its log here)."""
    log = DiscoveryLog("unused")
    for w in plan.workers:
        kind = "Prefill" if w.role == "context" else "Decode"
        log.feed(
            f" INFO vllm_router_rs::routers::http::vllm_service_discovery: 🔵Add {kind} "
            f"[HTTP:{net.hostport(w.address, w.http_port)}, ZMQ:{net.hostport(w.address, w.nixl_port)}]"
        )
    assert log.members == {w.url: "Prefill" if w.role == "context" else "Decode" for w in plan.workers}
    gone = plan.workers[0]
    log.feed(f"Remove Prefill [HTTP:{net.hostport(gone.address, gone.http_port)}, ZMQ:x, expired]")
    assert gone.url not in log.members and len(log.members) == len(plan.workers) - 1


def test_scrape_targets_and_the_nats_certificate_for_ipv6(plan, tmp_path, monkeypatch):
    entries = [
        {"url": w.url, "label": plan.label, "role": w.role, "index": w.index, "host": w.host, "gpus": w.gpus}
        for w in plan.workers
    ]
    assert targets.worker_groups(entries)[0]["targets"] == [f"[{CONTEXT}]:8100"]
    assert targets.hosts(entries) == {CONTEXT: CONTEXT, GENERATE: GENERATE}
    assert targets.dcgm_groups({GENERATE: GENERATE}, 9400)[0]["targets"] == [f"[{GENERATE}]:9400"]
    monkeypatch.setenv("DISAGG_STATE_DIR", str(tmp_path))
    pki.ensure(plan.cluster.head, [plan.head.address])
    assert pki.describe(plan.cluster.head)["nats"]["names"] == [CONTEXT]


def test_disagg_top_shows_an_ipv6_prometheus_url_whole():
    from rich.console import Console

    from disagg.perf import top

    totals = dict.fromkeys((*top.LAYOUT_RULES, "ttft_p90_s", "frontdoor_4xx_per_s", "frontdoor_5xx_per_s"))
    snap = top.Snapshot(
        "context_tp1dp2_generate_tp1dp1", [], totals, {"met": None, "ttft_ms": None, "tokens_per_user": 50}
    )
    console = Console(record=True, width=200)
    console.print(top.render(snap, f"http://[{CONTEXT}]:9090"))
    assert f"(http://[{CONTEXT}]:9090; last minute" in console.export_text()
