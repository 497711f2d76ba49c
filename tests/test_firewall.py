"""The firewall's rules from the placement (disagg/core/nftables.py): each port of
ours admitted from exactly the peers that need it, on the reference layout
of inventories/h100.py. The e2e tests load them on real hosts."""

from disagg.core import nftables
from disagg.core.plan import make_plan
from disagg.core.units import firewall_files, host_units
from disagg.infra.inventory import load_inventory

H100 = "inventories/h100.py"


def admitted(plan, host, admins=()):
    return {port: set(r.sources) for r in nftables.rules(plan, host, admins) for port in r.ports}


def test_each_port_is_admitted_from_its_peers_only():
    plan = make_plan(load_inventory(H100))
    s = plan.settings
    head, other = "h100-node1", "h100-node2"
    on_head = admitted(plan, head, ("10.0.0.5",))
    assert on_head[s.nats_port] == {head, other, "10.0.0.5"}
    assert on_head[s.router_metrics_port] == on_head[s.prometheus_port] == {"10.0.0.5"}
    # the router itself and the front door's metrics: admins; the front door's port: anyone
    assert on_head[s.router_internal_port] == on_head[s.frontdoor_metrics_port] == {"10.0.0.5"}
    assert s.router_port not in on_head
    # Prometheus (on the head) scrapes each worker host's DCGM exporter
    assert on_head[s.dcgm_exporter_port] == {head, "10.0.0.5"}
    for w in plan.workers_on(head):  # context workers: HTTP from the router, NIXL from the generate host
        assert on_head[w.http_port] == {head, "10.0.0.5"}
        assert all(on_head[p] == {other} for p in w.nixl_ports)
    (g,) = plan.workers_on(other)
    on_other = admitted(plan, other)
    assert on_other[g.http_port] == {head} and on_other[g.nixl_port] == {head}
    assert on_other[s.dcgm_exporter_port] == {head}
    assert s.nats_port not in on_other and s.prometheus_port not in on_other
    # UCX's listeners (the KV cache), bound within the range the workers' env names: the other role's hosts
    assert on_head[s.ports.ucx] == {other} and on_other[s.ports.ucx] == {head} and s.ports.ucx == range(20000, 21000)
    assert all(plan.worker_env(w)["UCX_TCP_PORT_RANGE"] == "20000-20999" for w in plan.workers)
    # no UCX in an aggregated layout
    baseline = make_plan(load_inventory(H100), label_key="baseline_label")
    assert s.ports.ucx not in admitted(baseline, head)
    assert "UCX_TCP_PORT_RANGE" not in baseline.worker_env(baseline.workers[0])
    # on loopback, or without Prometheus, there is nothing of it to admit
    loopback = make_plan(load_inventory(H100, override_data={"prometheus_listen": "loopback"}))
    assert s.prometheus_port not in admitted(loopback, head)
    off = make_plan(load_inventory(H100, override_data={"prometheus": False}))
    assert s.prometheus_port not in admitted(off, head) and s.dcgm_exporter_port not in admitted(off, other)


def test_the_chain_drops_only_our_ports_and_keeps_families_apart():
    plan = make_plan(load_inventory(H100, override_data={"firewall_allow": ["fd00::/64", "10.9.0.0/16"]}))
    lines = nftables.ruleset(plan, "h100-node1", ("10.0.0.5",))
    assert lines[0] == 'iif "lo" accept'
    s = plan.settings
    ours = sorted(
        {
            s.nats_port,
            s.router_internal_port,
            s.router_metrics_port,
            s.frontdoor_metrics_port,
            s.prometheus_port,
            s.dcgm_exporter_port,
        }
        | {p for w in plan.workers_on("h100-node1") for p in (w.http_port, *w.nixl_ports)}
    )
    listed = [str(p) for p in ours if p < 20000] + ["20000-20999"] + [str(p) for p in ours if p >= 20000]
    assert lines[-1] == f"tcp dport {{ {', '.join(listed)} }} counter drop"
    # one router host, the head: its router and the metrics are the admins' alone
    for admin_only in (f"{s.router_internal_port}", f"{s.router_metrics_port}, {s.frontdoor_metrics_port}"):
        assert f"tcp dport {{ {admin_only} }} ip6 saddr {{ fd00::/64 }} accept" in lines
        assert f"tcp dport {{ {admin_only} }} ip saddr {{ 10.9.0.0/16, 10.0.0.5 }} accept" in lines
    assert not any(str(s.router_port) in line for line in lines if "dport" in line)


def test_firewall_false_renders_no_rules_and_no_unit():
    plan = make_plan(load_inventory(H100, override_data={"firewall": False}))
    for host in ("h100-node1", "h100-node2"):
        files = host_units(plan, host)
        assert not any("firewall" in path for path in files)
        assert "disagg-firewall" not in plan.units_on(host)
    on = make_plan(load_inventory(H100))
    assert set(firewall_files(on, "h100-node1")) <= set(host_units(on, "h100-node1"))


def test_the_discovery_socket_takes_registrations_from_the_sync_user_only():
    plan = make_plan(load_inventory(H100))
    port = plan.settings.router_discovery_port
    assert (
        nftables.local_ruleset(plan, "h100-node1")[-1]
        == f'oif "lo" tcp dport {port} meta skuid != "disagg-sync" counter reject with tcp reset'
    )
    assert nftables.local_ruleset(plan, "h100-node2") == []
    baseline = make_plan(load_inventory(H100), label_key="baseline_label")
    assert nftables.local_ruleset(baseline, "h100-node1") == []  # no discovery socket
    assert "chain output" in firewall_files(plan, "h100-node1")["/etc/disagg/firewall.nft"]
    assert "chain output" not in firewall_files(plan, "h100-node2")["/etc/disagg/firewall.nft"]
