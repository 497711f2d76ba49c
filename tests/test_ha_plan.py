"""Several router hosts and a floating client address, planned and rendered
without a host (inventories/local-ha.py's shape): which host runs what, the
front doors' routers, keepalived's VRRP peers, the firewall between exactly
the hosts that need it, and the inventory's mistakes refused in one line."""

import json

import pytest
from click.testing import CliRunner

from disagg.cli import main
from disagg.core import nftables, packages
from disagg.core import settings as S
from disagg.core.errors import InventoryError
from disagg.core.plan import make_plan
from disagg.core.units import host_units
from disagg.infra.inventory import load_inventory

CONTEXT, GENERATE, HEAD = "10.1.0.11", "10.1.0.12", "10.1.0.13"


def write(tmp_path, routers: str, data: str = "'vip': '10.1.0.100/24'", head_data: str = "'vip_interface': 'eth0'"):
    inventory = tmp_path / "inventory.py"
    inventory.write_text(
        f"context = [('{CONTEXT}', {{'gpus': 2}})]\n"
        f"generate = [('{GENERATE}', {{'gpus': 1, 'vip_interface': 'eth1'}})]\n"
        f"routers = {routers}\n"
        f"head = [('{HEAD}', {{{head_data}}})]\n"
        f"all = (['{CONTEXT}', '{GENERATE}', '{HEAD}'], {{'label': 'context_tp1dp2_generate_tp1dp1', "
        f"'model': 'm', {data}}})\n"
    )
    return str(inventory)


@pytest.fixture
def plan(tmp_path):
    # listed in another order than the preference: the head comes first
    return make_plan(load_inventory(write(tmp_path, f"['{GENERATE}', '{HEAD}']")))


def test_each_router_host_runs_a_front_door_router_and_sync_the_head_nats_and_prometheus(plan):
    assert plan.cluster.routers == (HEAD, GENERATE)
    routing = [S.ROUTER_UNIT, S.FRONTDOOR_UNIT, S.SYNC_UNIT, S.KEEPALIVED_UNIT]
    assert all(u in plan.units_on(GENERATE) for u in routing) and S.NATS_UNIT not in plan.units_on(GENERATE)
    assert all(u in plan.units_on(HEAD) for u in [*routing, S.NATS_UNIT, S.PROMETHEUS_UNIT])
    assert not any(u in plan.units_on(CONTEXT) for u in routing)
    assert plan.router_url == "http://10.1.0.100:8000"
    assert plan.router_urls == [f"http://{HEAD}:8000", f"http://{GENERATE}:8000"]
    # what each installs
    keys = {n: {s.key for s in packages.host_sets(plan, n, {})} for n in plan.serving_hosts}
    assert "router_package" in keys[GENERATE] and "nats_server_package" not in keys[GENERATE]
    assert "router_package" not in keys[CONTEXT] and {"router_package", "nats_server_package"} <= keys[HEAD]


def test_each_front_door_asks_its_own_router_first_and_binds_the_floating_address(plan):
    door = host_units(plan, GENERATE)["/etc/disagg/frontdoor/haproxy.cfg"]
    servers = [line.split() for line in door.splitlines() if line.strip().startswith("server ")]
    assert [s[1:3] for s in servers] == [
        [GENERATE, f"{GENERATE}:8001"],
        [HEAD, f"{HEAD}:8001"],
        # its own again, unchecked, when every check fails: the router's answer, never HAProxy's 503
        ["last-resort", f"{GENERATE}:8001"],
    ]
    assert "backup" not in servers[0] and servers[1][-1] == "backup" and servers[2][3:] == ["backup"]
    assert "  option redispatch 1\n" in door
    units = host_units(plan, GENERATE)
    # the floating address bound while another host holds it (FreeBind): by systemd, which keeps it across a crash
    socket = units["/etc/systemd/system/disagg-frontdoor.socket"]
    assert f"\nListenStream={GENERATE}:8000\nListenStream=10.1.0.100:8000\n" in socket and "\nFreeBind=yes\n" in socket
    assert "  # the floating address 10.1.0.100:8000, wherever it is now" in door and "  bind fd@4\n" in door
    # its router and sync are its own
    assert f"--host {GENERATE} " in units["/etc/systemd/system/disagg-router.service"]
    sync = units["/etc/systemd/system/disagg-registry-sync.service"]
    assert f"--router http://{GENERATE}:8001 " in sync and "--targets-dir" not in sync
    assert "--targets-dir" in host_units(plan, HEAD)["/etc/systemd/system/disagg-registry-sync.service"]


def test_keepalived_speaks_unicast_to_the_other_routers_and_prefers_the_head(plan):
    confs = {n: host_units(plan, n)[S.KEEPALIVED_CONF] for n in (HEAD, GENERATE)}

    def value(conf, key):
        return next(line.split()[1] for line in conf.splitlines() if line.strip().startswith(key + " "))

    assert int(value(confs[HEAD], "priority")) > int(value(confs[GENERATE], "priority"))
    assert value(confs[GENERATE], "unicast_src_ip") == GENERATE and value(confs[GENERATE], "interface") == "eth1"
    assert f"unicast_peer {{\n    {HEAD}\n  }}" in confs[GENERATE]
    assert "10.1.0.100/24 dev eth1" in confs[GENERATE] and "nopreempt" in confs[GENERATE]
    assert f"http://{GENERATE}:8404/metrics" in confs[GENERATE]


def test_the_firewall_admits_vrrp_and_the_routers_between_exactly_the_router_hosts(plan):
    def admitted(host):
        return {(r.protocol, p): set(r.sources) for r in nftables.rules(plan, host, ()) for p in r.ports or (0,)}

    generate = admitted(GENERATE)
    assert generate[(nftables.VRRP, 0)] == {HEAD} and admitted(HEAD)[(nftables.VRRP, 0)] == {GENERATE}
    assert generate[(None, 8001)] == {HEAD} and admitted(HEAD)[(None, 8001)] == {GENERATE}
    # Prometheus (the head) scrapes the other router's metrics; the workers answer every router
    assert generate[(None, 29000)] == {HEAD}
    assert admitted(CONTEXT)[(None, 8100)] == {GENERATE, HEAD}
    assert admitted(HEAD)[(None, 4222)] == {CONTEXT, GENERATE, HEAD}
    assert (nftables.VRRP, 0) not in admitted(CONTEXT)
    lines = nftables.ruleset(plan, GENERATE, ())
    assert lines.index(f"ip saddr {{ {HEAD} }} meta l4proto 112 accept") < lines.index("meta l4proto 112 counter drop")


def test_without_vip_no_keepalived_and_clients_get_every_front_door(tmp_path):
    inventory = write(tmp_path, f"['{GENERATE}', '{HEAD}']", data="'firewall': True")
    plan = make_plan(load_inventory(inventory))
    assert S.KEEPALIVED_UNIT not in plan.units_on(HEAD) and S.KEEPALIVED_CONF not in host_units(plan, HEAD)
    assert plan.router_url == f"http://{HEAD}:8000" and len(plan.router_urls) == 2
    shown = CliRunner().invoke(main, ["render", "-i", inventory])
    assert f"front doors: http://{HEAD}:8000 http://{GENERATE}:8000\n" in shown.output
    as_json = json.loads(CliRunner().invoke(main, ["render", "-i", inventory, "--json"]).output)
    assert as_json["front_doors"] == plan.router_urls
    assert not any(r.protocol for r in nftables.rules(plan, HEAD, ()))


@pytest.mark.parametrize(
    "routers, data, head_data, message",
    [
        (
            f"['{GENERATE}', '{HEAD}']",
            "'vip': '10.1.0.100/24'",
            "",
            f"{HEAD}: inventory data 'vip_interface' = None: missing: this router host may hold the floating address",
        ),
        (
            f"['{GENERATE}', '{HEAD}']",
            f"'vip': '{HEAD}/24'",
            "'vip_interface': 'eth0'",
            f"{HEAD}: inventory data 'vip' = '{HEAD}/24': is this host's own address",
        ),
        (
            f"['{GENERATE}', '{HEAD}']",
            "'vip': '10.1.0.100'",
            "'vip_interface': 'eth0'",
            "inventory data 'vip' = '10.1.0.100': has no prefix length; give the clients' floating address",
        ),
        (
            f"['{GENERATE}']",
            "'firewall': True",
            "",
            f"the head is not in group 'routers' ({GENERATE})",
        ),
    ],
)
def test_router_and_vip_mistakes_are_one_line_each_before_any_host(tmp_path, routers, data, head_data, message):
    with pytest.raises(InventoryError) as e:
        make_plan(load_inventory(write(tmp_path, routers, data, head_data)))
    assert message in str(e.value)


def test_three_nats_hosts_are_a_cluster_with_routes_between_them_alone(tmp_path):
    inventory = write(tmp_path, f"['{GENERATE}', '{HEAD}']")
    with open(inventory, "a") as f:
        f.write(f"nats = [('{CONTEXT}', {{'gpus': 2}}), ('{GENERATE}', {{'gpus': 1}}), ('{HEAD}', {{}})]\n")
    plan = make_plan(load_inventory(inventory))
    assert plan.nats_clustered and plan.cluster.nats == (HEAD, CONTEXT, GENERATE)
    # every agent is given every server, the head's first
    assert plan.nats_url == f"tls://{HEAD}:4222,tls://{CONTEXT}:4222,tls://{GENERATE}:4222"
    assert f"--nats {plan.nats_url} " in host_units(plan, CONTEXT)["/etc/systemd/system/disagg-context-0-agent.service"]
    conf = host_units(plan, CONTEXT)["/etc/disagg/nats-server.conf"]
    assert f'listen: "{CONTEXT}:6222"' in conf and "verify: true" in conf
    assert f'"nats-route://{HEAD}:6222"' in conf and f'"nats-route://{GENERATE}:6222"' in conf
    assert f"nats-route://{CONTEXT}" not in conf and "server_name: disagg-10.1.0.11" in conf
    assert all(S.NATS_UNIT in plan.units_on(n) for n in (HEAD, CONTEXT, GENERATE))
    routes = {n: {r.sources for r in nftables.rules(plan, n, ()) if 6222 in r.ports} for n in plan.cluster.nats}
    assert routes[CONTEXT] == {(GENERATE, HEAD)} and routes[HEAD] == {(CONTEXT, GENERATE)}


def test_two_nats_hosts_are_refused_one_stays_as_it_was(tmp_path):
    inventory = write(tmp_path, f"['{GENERATE}', '{HEAD}']")
    with open(inventory, "a") as f:
        f.write(f"nats = [('{GENERATE}', {{'gpus': 1}}), ('{HEAD}', {{}})]\n")
    with pytest.raises(InventoryError, match="group 'nats' has two hosts: JetStream needs a majority"):
        make_plan(load_inventory(inventory))
    # another file: pyinfra keeps an inventory file's code by its name
    (tmp_path / "single").mkdir()
    single = make_plan(load_inventory(write(tmp_path / "single", f"['{GENERATE}', '{HEAD}']")))
    assert not single.nats_clustered and single.nats_url == f"tls://{HEAD}:4222"
    assert "cluster {" not in host_units(single, HEAD)["/etc/disagg/nats-server.conf"]


def test_a_worker_is_routed_when_every_router_lists_it_and_out_when_none_does():
    from disagg.agent import kv
    from disagg.agent.status import routed_by_all as routed

    a, b = "http://10.1.0.13:8001", "http://10.1.0.12:8001"
    values = {
        kv.router_key(a): {"router": a, "members": ["w1", "w2"]},
        kv.router_key(b): {"router": b, "members": ["w1"]},
        "worker.x": {"url": "w1"},
    }
    views = kv.router_views(values)
    assert set(views) == {a, b} and kv.router_key(a) != kv.router_key(b)
    # w2 is not routed yet (b lacks it): a rolled worker waits for every router
    assert routed(views) == ["w1"]
    assert routed({**views, b: {"router": b, "members": None}}) is None and routed({}) is None
