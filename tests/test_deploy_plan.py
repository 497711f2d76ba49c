"""What `pyinfra inventories/h100.py deploys/*.py` would do, planned through
pyinfra's own loader with its @fake connector and facts fed from a real GPU
host's captured output. Real hosts are exercised by the end-to-end tests."""

import hashlib
import hmac
import json
import logging
import re
import shlex
import subprocess

import pytest
from cryptography import x509
from fakehosts import RESOLVED, ROOT, gpu_host_responses, plan_deploy
from hubserver import Hub
from pyinfra.api import OperationError, StringCommand
from pyinfra.api.exceptions import PyinfraError

from disagg.agent import kv
from disagg.core import pki
from disagg.core import settings as S
from disagg.core.errors import InventoryError, UsageError
from disagg.core.plan import make_plan
from disagg.core.units import firewall_files, frontdoor_files, host_units
from disagg.infra.facts import ResolvedNames
from disagg.infra.hub import HubError
from disagg.infra.hub import commit as hub_commit
from disagg.infra.inventory import load_inventory
from disagg.roles.ops import health_loop

H100 = "inventories/h100.py"
NODES = ("h100-node1", "h100-node2")


def stale_units(*units):
    return {"grep -lxF": [f"/etc/systemd/system/{u}.service" for u in units]}


@pytest.mark.parametrize(
    "deploy, label_key", [("deploys/disagg.py", "label"), ("deploys/baseline.py", "baseline_label")]
)
def test_deploy_writes_exactly_the_rendered_units(deploy, label_key):
    planned = plan_deploy(H100, deploy, responses=gpu_host_responses())
    plan = make_plan(load_inventory(H100), label_key=label_key)
    resolved = ResolvedNames().process(RESOLVED)  # the hosts' names as they resolve them
    for host in NODES:
        ours = {
            p: t
            for p, t in planned.uploads(host).items()
            if p.startswith(("/etc/systemd", "/etc/disagg")) and not p.startswith(S.TLS_DIR)
        }
        expected = host_units(plan, host)
        if S.FIREWALL_RULES in expected:
            expected.update(firewall_files(plan, host, (), resolved))
        if host in plan.cluster.routers:  # systemd listens on the address the name resolves to
            expected.update(frontdoor_files(plan, host, resolved))
            assert "\nListenStream=10.100.0.1:8000\n" in ours["/etc/systemd/system/disagg-frontdoor.socket"]
        assert ours == expected


def test_the_firewall_holds_the_addresses_each_host_resolves_never_a_name():
    planned = plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses())
    for host, peer in zip(NODES, ("10.100.0.2", "10.100.0.1")):
        rules = planned.uploads(host)[S.FIREWALL_RULES]
        assert "h100-node" not in rules and f"ip saddr {{ {peer} }} accept" in rules
    assert "ip6 saddr { fd00:100::1 }" in planned.uploads("h100-node2")[S.FIREWALL_RULES]
    # a name a host cannot resolve: the deploy stops while it plans, before any change
    unresolved = {**gpu_host_responses(), "getent ahosts": ["### h100-node1", "10.100.0.1", "### h100-node2"]}
    with pytest.raises(
        OperationError,
        match=r"^h100-node\d: cannot resolve h100-node2 \(an inventory address\) for "
        r"the firewall's rules; give the host's address as an IP",
    ):
        plan_deploy(H100, "deploys/disagg.py", responses=unresolved)


def test_nats_tls_material_comes_from_the_controllers_ca_and_the_key_is_never_shown():
    planned = plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses())
    plan = make_plan(load_inventory(H100))
    bundle = pki.ensure(plan.cluster.head, [plan.head.address])
    for host in NODES:
        assert planned.uploads(host)[S.CA_CERT] == bundle.ca_cert
        assert bundle.server_key not in "\n".join(planned.commands(host) + list(planned.uploads(host).values()))
    head = planned.uploads("h100-node1")
    assert head[S.NATS_CERT] == bundle.server_cert and S.NATS_CERT not in planned.uploads("h100-node2")
    server = x509.load_pem_x509_certificate(bundle.server_cert.encode())
    server.verify_directly_issued_by(x509.load_pem_x509_certificate(bundle.ca_cert.encode()))
    assert pki.describe(plan.cluster.head)["nats"]["names"] == [plan.head.address]
    # the key goes on the stdin of the command that writes it, never on its command line (sudo logs that)
    writes = [
        c
        for _, cmds in planned._raw_ops("h100-node1")
        for c in cmds
        if isinstance(c, StringCommand) and f'mv -f "$t" {S.NATS_KEY} ' in c.get_raw_value()
    ]
    assert [c.connector_arguments.get("_stdin") for c in writes] == [bundle.server_key]
    assert bundle.server_key not in writes[0].get_raw_value()
    names = [n for n, _ in planned._raw_ops("h100-node1")]
    assert any(n.endswith(f"{S.NATS_KEY} disagg-nats-only") for n in names)
    # the same CA and certificate on a re-run: nothing to restart
    assert pki.ensure(plan.cluster.head, [plan.head.address]) == bundle


def test_disagg_deploy_order_on_the_head():
    planned = plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses())
    names = [name for name, _ in planned.ops("h100-node1")]
    first = {
        key: next(i for i, n in enumerate(names) if key in n)
        for key in (
            "NVIDIA driver",
            "Run disagg-nats",
            "NATS JetStream healthy",
            "Run disagg-registry-sync",
            "Install vllm==",
            "Remove units of other layouts",
            "Run disagg-context-0",
            "Run disagg-context-0-agent",
            "Run disagg-prometheus",
            "Prometheus ready",
            "Run disagg-router",
            "Run disagg-frontdoor",
            # after the routers: a rolled worker waits until every router lists it again
            "Rolling restart 1/4",
            "Rolling restart 4/4",
            "disagg-context-3 healthy",
            "Every worker registered",
            "One request answered through the front door",
        )
    }
    assert list(first) == sorted(first, key=first.get)
    # all context workers start before the first health wait, so they load together (and the
    # head's Prometheus, router and sync install meanwhile)
    starts = [i for i, n in enumerate(names) if "Run disagg-context-" in n and not n.endswith("-agent")]
    assert first["disagg-context-3 healthy"] > max(starts)
    commands = planned.commands("h100-node1")
    assert any(c.startswith("systemctl start disagg-context-0.service") for c in commands)
    assert any("/healthz?js-enabled-only=true" in c for c in commands)
    # a first deploy has nothing to roll
    assert all(cmds == [] for n, cmds in planned.ops("h100-node1") if "Rolling restart" in n)


RUNNING = {"systemctl is-active": ["active enabled"]}


def _rolls(planned, host):
    return [(n.split(" | ")[-1], cmds) for n, cmds in planned.ops(host) if "Rolling restart" in n]


def test_changed_running_workers_roll_one_per_role_at_a_time(caplog):
    # every unit runs, and every file differs from what the hosts have
    planned = plan_deploy(H100, "deploys/disagg.py", responses={**gpu_host_responses(), **RUNNING})
    node1, node2 = _rolls(planned, "h100-node1"), _rolls(planned, "h100-node2")
    assert [n for n, _ in node1] == [
        f"Rolling restart {k}/4: context-{k - 1}" + (", generate-0" if k == 1 else "") for k in range(1, 5)
    ]
    for k, (_, (command,)) in enumerate(node1):
        assert f"systemctl restart disagg-context-{k}" in command and "disagg-context-" not in command.replace(
            f"disagg-context-{k}", ""
        )
        assert f"--expect context-{k}=http://h100-node1:{8100 + k}" in command and "--wait" in command
        # back only once it answers /health, then is registered and listed by the router
        assert command.index(f"http://h100-node1:{8100 + k}/health") < command.index("--expect")
    (_, (generate,)), *rest = node2
    assert "systemctl restart disagg-generate-0" in generate and all(cmds == [] for _, cmds in rest)
    # not restarted outside the waves; the single generate worker is named before it goes
    assert not any(
        re.search(r"restart disagg-context-\d\.service", c)
        for n, cmds in planned.ops("h100-node1")
        if "Rolling" not in n
        for c in cmds
    )
    assert "disagg-generate-0 is the only generate worker: restarting it stops serving" in caplog.text
    assert "disagg-context-0 is the only" not in caplog.text


def test_a_worker_added_starts_its_own_heartbeat_and_restarts_no_other_agent():
    """Its new NATS password is its heartbeat's alone: the sync and the
    other heartbeats on the host read only their own."""
    first = plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses())
    # the head ran context_tp2dp3 (every file in place, every unit running); context-3 is added
    held = first.held("h100-node1", but="context-3")
    new = {"systemctl is-active disagg-context-3": [""]}
    planned = plan_deploy(H100, "deploys/disagg.py", responses={**gpu_host_responses(), **new, **RUNNING, **held})
    runs = {name.split(" | ")[-1]: cmds for names, cmds in planned.ops("h100-node1") for name in names.split(", ")}
    assert any(
        c.startswith("systemctl start disagg-context-3-agent.service") for c in runs["Run disagg-context-3-agent"]
    )
    for unit in (S.SYNC_UNIT, "disagg-context-0-agent", "disagg-context-2-agent", "disagg-router"):
        assert not any("restart" in c for c in runs[f"Run {unit}"]), unit


def test_max_unavailable_sizes_the_waves(caplog):
    planned = plan_deploy(
        H100, "deploys/disagg.py", data={"max_unavailable": 2}, responses={**gpu_host_responses(), **RUNNING}
    )
    rolls = _rolls(planned, "h100-node1")
    assert [n for n, _ in rolls] == [
        "Rolling restart 1/2: context-0, context-1, generate-0",
        "Rolling restart 2/2: context-2, context-3",
    ]
    (command,) = rolls[0][1]
    # the two context workers of a wave restart together and both must come back
    assert command.count("systemctl restart") == 2 and "wait $p0 || rc=1; wait $p1 || rc=1; exit $rc" in command


def test_invalid_label_stops_before_any_host_is_touched():
    with pytest.raises(PyinfraError, match="generate tp16 needs 16 GPUs on one host") as e:
        plan_deploy(
            H100, "deploys/disagg.py", data={"label": "context_tp2dp4_generate_tp16dp1"}, responses=gpu_host_responses()
        )
    assert isinstance(e.value.__cause__, InventoryError)
    for host in NODES:
        assert e.value.planned.executed(host) == []
        assert e.value.planned.ops(host) == []


def test_relabel_prunes_the_old_layout_only():
    old = stale_units(
        "disagg-context-0",
        "disagg-context-1",
        "disagg-context-2",
        "disagg-context-3",
        "disagg-nats",
        "disagg-router",
        "disagg-generate-0",
    )
    planned = plan_deploy(H100, "deploys/baseline.py", responses={**old, **gpu_host_responses()})
    (prune,) = [c for n, c in planned.ops("h100-node1") if n == "Remove units of other layouts"]
    stopped = [c for c in prune if c.startswith("systemctl disable --now")]
    assert stopped == [
        "systemctl disable --now "
        + " ".join([f"disagg-context-{i}.service" for i in range(4)] + ["disagg-generate-0.service"])
    ]
    assert (
        "rm -rf /etc/systemd/system/disagg-context-0.service /etc/systemd/system/disagg-context-0.service.wants "
        "/etc/disagg/disagg-context-0.env"
    ) in prune
    assert "systemctl daemon-reload" in prune


def test_nothing_to_prune_is_no_change():
    planned = plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses())
    for host in NODES:
        (prune,) = [c for n, c in planned.ops(host) if n == "Remove units of other layouts"]
        assert prune == []


def test_firewall_false_installs_no_rules_and_prunes_an_earlier_firewall():
    responses = {**stale_units("disagg-firewall"), **gpu_host_responses()}
    planned = plan_deploy(H100, "deploys/disagg.py", data={"firewall": False}, responses=responses)
    for host in NODES:
        assert not any(n.startswith("Firewall |") for n, _ in planned.ops(host))
        (prune,) = [c for n, c in planned.ops(host) if n == "Remove units of other layouts"]
        # stopping the unit runs its ExecStop: our table goes, no other
        assert prune[0] == "systemctl disable --now disagg-firewall.service"
    on = plan_deploy(H100, "deploys/disagg.py", responses=responses)
    for host in NODES:
        (prune,) = [c for n, c in on.ops(host) if n == "Remove units of other layouts"]
        assert prune == []
        assert any(n == "Firewall | Run disagg-firewall" for n, _ in on.ops(host))


def _account(user: str, comment: str, shell: str = "/usr/sbin/nologin", home: str = "/nonexistent") -> dict:
    return {re.compile(rf"getent passwd {user} \|\|"): [f"{user}:x:990:990:{comment}:{home}:{shell}"]}


def test_service_accounts_are_made_ours_adopted_from_earlier_releases_and_never_taken_over():
    marked = f"--comment {shlex.quote(S.ACCOUNT_COMMENT)}"
    earlier = _account(S.SYNC_USER, "")  # what releases before the GECOS made
    commands = plan_deploy(H100, "deploys/disagg.py", responses={**earlier, **gpu_host_responses()}).commands(
        "h100-node1"
    )
    assert f"usermod --home /nonexistent --shell /usr/sbin/nologin {marked} {S.SYNC_USER}" in commands
    assert (
        f"useradd --system --user-group --home-dir /nonexistent --shell /usr/sbin/nologin {marked} {S.ROUTER_USER}"
    ) in commands
    ours = _account(S.SYNC_USER, S.ACCOUNT_COMMENT)
    commands = plan_deploy(H100, "deploys/disagg.py", responses={**ours, **gpu_host_responses()}).commands("h100-node1")
    assert not any(S.SYNC_USER in c for c in commands if c.startswith(("useradd", "usermod")))
    # where preflight is off: the deploy stops while it plans, before any change
    someone = _account(S.ROUTER_USER, "Jane Doe", "/bin/bash", "/home/jane")
    with pytest.raises(
        OperationError,
        match=rf"^h100-node1: user {S.ROUTER_USER}: exists and is not disagg's "
        r"\(GECOS 'Jane Doe', shell /bin/bash\); disagg never takes over an "
        r"account: rename or remove it$",
    ):
        plan_deploy(H100, "deploys/disagg.py", data={"preflight": False}, responses={**someone, **gpu_host_responses()})


@pytest.mark.parametrize("purge", [False, True])
def test_teardown_removes_our_units_and_nothing_else(purge):
    units = ("disagg-context-1", "disagg-generate-0", "disagg-router")
    data = {"purge": "true"} if purge else {}
    # our table is there (also when its unit failed and never runs its ExecStop)
    listed = "nft list table inet disagg"
    # ours; made by a release before the GECOS; someone's
    accounts = {
        **_account(S.SERVICE_USER, S.ACCOUNT_COMMENT),
        **_account(S.NATS_USER, ""),
        **_account(S.ROUTER_USER, "Jane Doe", "/bin/bash"),
    }
    # Prometheus's unit masked by us, HAProxy's by someone else
    masks = {f"test -e {S.MASKED_DIR}/prometheus.service": ["yes"]}
    planned = plan_deploy(
        H100, "deploys/teardown.py", data=data, responses={**stale_units(*units), listed: ["yes"], **accounts, **masks}
    )
    commands = planned.commands("h100-node1")
    assert f"systemctl disable --now {' '.join(u + '.service' for u in units)}" in commands
    assert commands.index(f"if {listed} >/dev/null 2>&1; then nft delete table inet disagg; fi") > 0
    assert not any("kill" in c for c in commands)
    names = [n for n, _ in planned.ops("h100-node1")]
    for path in (
        "/etc/disagg/nats.env",
        "/etc/disagg/hf-token.env",
        "/etc/disagg/nats-server.conf",
        S.API_KEY_ENV,
        S.FIREWALL_RULES,
        S.TLS_DIR,
        S.PROMETHEUS_CONFIG_DIR,
        S.SCRAPE_TARGETS_DIR,
    ):
        assert f"disagg teardown | Remove {path}" in names
    # Prometheus's history outlives a teardown; purge takes it with /var/lib/disagg
    assert f"disagg teardown | Remove {S.PROMETHEUS_DATA}" not in names
    purged = [
        f"disagg teardown | Remove {what}"
        for what in (
            "/opt/disagg",
            "/var/lib/disagg",
            "/etc/disagg",
            "user disagg",
            "user disagg-nats",
            "user disagg-prometheus",
        )
    ]
    assert [n for n in purged if n in names] == (purged if purge else [])
    # purge unmasks (and leaves disabled) only a distro unit we masked; the package stays
    unmasked = [c for c in commands if c.startswith("rm -f /etc/systemd/system/")]
    assert unmasked == (
        [
            f"rm -f /etc/systemd/system/prometheus.service {S.MASKED_DIR}/prometheus.service && "
            "systemctl daemon-reload && { systemctl disable prometheus.service 2>/dev/null || true; }"
        ]
        if purge
        else []
    )
    # only accounts disagg made are removed; one absent is nothing to do
    deleted = [c for c in commands if c.startswith("userdel")]
    assert deleted == (
        [f"userdel {u} && if getent group {u} >/dev/null; then groupdel {u}; fi" for u in (S.SERVICE_USER, S.NATS_USER)]
        if purge
        else []
    )


def test_secrets_never_appear_in_commands_or_files():
    secrets = {"hf_token": "hf_TOPSECRET123", "nats_password": "n4ts-PASSWORD"}
    planned = plan_deploy(H100, "deploys/disagg.py", data=secrets, responses=gpu_host_responses())
    for host in NODES:
        text = "\n".join(planned.commands(host) + list(planned.uploads(host).values()))
        for secret in secrets.values():
            assert secret not in text
    for host in NODES:  # nor on a command line pyinfra runs (sudo logs each one): on stdin
        assert not any(
            secret in c.get_raw_value()
            for _, cmds in planned._raw_ops(host)
            for c in cmds
            if isinstance(c, StringCommand)
            for secret in secrets.values()
        )
    assert _secret_writes(planned, "h100-node1", "HF token") == ["HF_TOKEN=hf_TOPSECRET123\n"]


def _secret_writes(planned, host, name: str) -> list[str]:
    """What the operation `name` sends on stdin (a secret's content)."""
    # an operation called on several hosts from one line has all their names
    return [
        c.connector_arguments["_stdin"]
        for n, cmds in planned._raw_ops(host)
        if any(part.endswith(name) for part in n.split(", "))
        for c in cmds
        if "_stdin" in c.connector_arguments
    ]


def test_the_api_key_is_generated_once_and_shared_by_every_host():
    planned = plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses())
    (head,) = _secret_writes(planned, "h100-node1", "API key")
    (other,) = _secret_writes(planned, "h100-node2", "API key")
    value = re.search(r"VLLM_API_KEY=(\w+)", head).group(1)
    assert len(value) >= 32 and head == other
    for host in NODES:  # masked wherever pyinfra prints it
        assert not any(value in c for c in planned.commands(host))


def _derived(admin: str, user: str) -> str:
    return hmac.new(admin.encode(), user.encode(), hashlib.sha256).hexdigest()


@pytest.mark.parametrize("kept", [None, "k33p-me"])
def test_the_nats_password_is_on_the_head_alone_and_every_users_derives_from_it(kept):
    """Generated once (or the head's kept); a worker host holds only its
    heartbeats' own passwords (an admin one from a release before is removed)."""
    responses = {**gpu_host_responses(), **({"s/^DISAGG_NATS_PASSWORD=//p": [kept]} if kept else {})}
    planned = plan_deploy(H100, "deploys/disagg.py", responses=responses)
    (head,) = _secret_writes(planned, "h100-node1", "NATS password")
    admin = re.search(r"DISAGG_NATS_PASSWORD=(\S+)", head).group(1)
    assert admin == kept if kept else len(admin) >= 32
    assert _secret_writes(planned, "h100-node2", "NATS password") == []
    assert f"rm -f {S.NATS_SECRET_ENV}" in planned.commands("h100-node2") or any(
        n.endswith("No NATS admin password") for n, _ in planned.ops("h100-node2")
    )
    plan = make_plan(load_inventory(H100))
    for host in NODES:
        for w in plan.workers_on(host):
            user = kv.heartbeat_user(w.url)
            assert _secret_writes(planned, host, f"NATS password of {user}") == [
                f"DISAGG_NATS_PASSWORD={_derived(admin, user)}\n"
            ]
    assert _secret_writes(planned, "h100-node1", f"NATS password of {kv.SYNC_USER}") == [
        f"DISAGG_NATS_PASSWORD={_derived(admin, kv.SYNC_USER)}\n"
    ]
    for host in NODES:  # masked wherever pyinfra prints it
        assert not any(admin in c for c in planned.commands(host))


@pytest.mark.parametrize("name, variable", [("API key", "VLLM_API_KEY")])
def test_the_heads_secret_is_kept(name, variable):
    responses = {**gpu_host_responses(), f"s/^{variable}=//p": ["k33p-me"]}
    planned = plan_deploy(H100, "deploys/disagg.py", responses=responses)
    for host in NODES:
        (content,) = _secret_writes(planned, host, name)
        assert f"{variable}=k33p-me" in content


def test_the_router_sends_the_key_the_workers_demand_and_only_in_disaggregated_layouts():
    planned = plan_deploy(H100, "deploys/disagg.py", data={"api_key": "k3y-from-data"}, responses=gpu_host_responses())
    assert _secret_writes(planned, "h100-node1", "API key") == [
        "VLLM_API_KEY=k3y-from-data\nOPENAI_API_KEY=k3y-from-data\n"
    ]
    plan = make_plan(load_inventory(H100))
    for host in NODES:
        for path, text in host_units(plan, host).items():
            if path.endswith(".service") and ("vllm.entrypoints" in text or "vllm-router" in text):
                assert f"EnvironmentFile={S.API_KEY_ENV}\n" in text, path
    baseline = plan_deploy(H100, "deploys/baseline.py", responses=gpu_host_responses())
    names = [n for n, _ in baseline.ops("h100-node1")]
    assert f"Worker API key | No {S.API_KEY_ENV}" in names
    assert not any(
        S.API_KEY_ENV in t
        for t in host_units(make_plan(load_inventory(H100), label_key="baseline_label"), "h100-node1").values()
    )


def test_every_secret_file_is_made_root_only_on_every_run():
    planned = plan_deploy(H100, "deploys/disagg.py", data={"hf_token": "t"}, responses=gpu_host_responses())
    names = [n for n, _ in planned._raw_ops("h100-node1")]
    for path in ("/etc/disagg/nats.env", "/etc/disagg/hf-token.env", S.API_KEY_ENV):
        assert any(n.endswith(f"{path} root-only") for n in names), names


def _driver_commands(planned, host):
    return [c for n, cmds in planned.ops(host) if n.startswith("NVIDIA driver") for c in map(str, cmds)]


def test_driver_on_an_hgx_node_gets_fabric_manager():
    planned = plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses())
    commands = " ".join(_driver_commands(planned, "h100-node1"))
    assert "nvidia-driver-580-server-open" in commands and "nvidia-fabricmanager-580" in commands
    assert "systemctl enable nvidia-persistenced.service" in commands
    assert "/etc/modprobe.d/disagg-blacklist-nouveau.conf" in commands
    # the driver is not loaded yet and the inventory does not allow a reboot
    assert "reboot" not in commands


def test_driver_without_nvswitch_and_skips():
    planned = plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses(nvswitches=0))
    commands = " ".join(_driver_commands(planned, "h100-node1"))
    assert "nvidia-driver-580-server-open" in commands and "fabricmanager" not in commands
    for data, responses in (
        ({"install_nvidia_driver": False}, gpu_host_responses()),
        ({}, gpu_host_responses(gpus=0, nvswitches=0)),
    ):
        planned = plan_deploy(H100, "deploys/disagg.py", data=data, responses=responses)
        assert _driver_commands(planned, "h100-node1") == []


def test_prometheus_runs_on_the_head_only_its_package_unit_masked_before_the_first_install():
    planned = plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses())
    names = [n for n, _ in planned.ops("h100-node1")]
    commands = planned.commands("h100-node1")
    mask = "ln -s /dev/null /etc/systemd/system/prometheus.service"
    install = next(c for c in commands if "apt-get" in c and "prometheus" in c.split())
    # the package recommends prometheus-node-exporter, a service on *:9100
    assert "--no-install-recommends" in install and "prometheus-node-exporter" not in install
    assert commands.index(mask) < commands.index(install)
    # marked ours: purge unmasks it, and no mask of someone else's
    assert commands[commands.index(mask) + 1] == f"mkdir -p {S.MASKED_DIR} && touch {S.MASKED_DIR}/prometheus.service"
    assert f"promtool check config {S.PROMETHEUS_CONFIG_DIR}/prometheus.yml" in commands
    assert any(c.startswith("systemctl start disagg-prometheus.service") for c in commands)
    sync = "Router sync and readiness gate | "
    assert names.index(f"{sync}Directories {S.SYNC_DIR}, {S.SCRAPE_TARGETS_DIR}") < names.index(
        f"{sync}Run disagg-registry-sync"
    )
    other = planned.commands("h100-node2")
    assert mask not in other and not any("prometheus" in c.split() for c in other if "apt-get" in c)
    # a Prometheus already on the host (the package's binary there): its unit is not ours to mask
    present = plan_deploy(
        H100, "deploys/disagg.py", responses={**gpu_host_responses(), "test -e /usr/bin/prometheus": ["yes"]}
    )
    assert mask not in present.commands("h100-node1")
    off = plan_deploy(H100, "deploys/disagg.py", data={"prometheus": False}, responses=gpu_host_responses())
    assert not any("prometheus" in c.replace("prometheus-client", "") for c in off.commands("h100-node1"))


def _dcgm_commands(planned, host):
    return [c for n, cmds in planned.ops(host) if n.startswith("NVIDIA DCGM exporter") for c in map(str, cmds)]


def test_dcgm_exporter_on_gpu_hosts_from_nvidias_packages_and_skipped_without_gpus(caplog):
    caplog.set_level(logging.INFO, logger="pyinfra")
    planned = plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses())
    commands = " ".join(_dcgm_commands(planned, "h100-node2"))
    # Ubuntu 24.04 (the captured host): NVIDIA's repository for it, then DCGM 4 and its exporter's package
    assert "repos/ubuntu2404/x86_64/cuda-keyring_1.1-1_all.deb" in commands
    assert "datacenter-gpu-manager-4-cuda12" in commands and "datacenter-gpu-manager-exporter" in commands
    # the driver is not loaded yet: enabled now, started at boot
    assert "systemctl enable nvidia-dcgm-exporter.service" in commands
    assert "systemctl start nvidia-dcgm-exporter.service" not in commands
    for data, responses, reason in (
        ({"dcgm": False}, gpu_host_responses(), "dcgm is False"),
        ({}, gpu_host_responses(gpus=0, nvswitches=0), "no NVIDIA GPU"),
    ):
        caplog.clear()
        planned = plan_deploy(H100, "deploys/disagg.py", data=data, responses=responses)
        assert _dcgm_commands(planned, "h100-node2") == []
        assert f"skip DCGM exporter: {reason}" in caplog.text


def test_venvs_are_made_and_filled_by_uv_and_read_from_their_dist_info():
    planned = plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses())
    commands = planned.commands("h100-node2")
    uv = "UV_CACHE_DIR=/opt/disagg/uv/cache /opt/disagg/uv/bin/uv"
    assert "test -x /opt/disagg/uv/bin/pip || python3 -m venv /opt/disagg/uv" in commands
    assert "/opt/disagg/uv/bin/pip install -q uv==0.13.9" in commands
    assert f"{uv} venv --python /usr/bin/python3 /opt/disagg/vllm" in commands
    # the engine's bytecode is the workers' own cache (PYTHONPYCACHEPREFIX), the agent's compiled at install
    assert f"{uv} pip install --python /opt/disagg/vllm/bin/python vllm==0.32.0" in commands
    assert f"{uv} pip install --python /opt/disagg/vllm/bin/python --no-deps nixl==1.5.1 nixl-cu12==1.5.1" in commands
    assert any(
        c.startswith(f"{uv} pip install --compile-bytecode --python /opt/disagg/agent/bin/python") for c in commands
    )
    # ...filled once after an install by importing what the workers run, as their user
    prewarm = (
        "runuser -u disagg -- env HOME=/var/lib/disagg/home PYTHONPYCACHEPREFIX=/var/lib/disagg/pycache "
        "/opt/disagg/vllm/bin/python "
        "-c 'import vllm.entrypoints.openai.api_server'"
    )
    assert commands.index(prewarm) > commands.index(
        f"{uv} pip install --python /opt/disagg/vllm/bin/python vllm==0.32.0"
    )
    assert not any(
        " pip freeze" in c or "/bin/pip install" in c.replace("/opt/disagg/uv/bin/pip", "") for c in commands
    )
    # a venv that has its pins (as its dist-info directories say) is left alone, and uv is not even asked
    installed = {
        "/opt/disagg/vllm/lib/python3*": ["vllm 0.32.0", "nixl 1.5.1", "nixl_cu12 1.5.1"],
        "/opt/disagg/agent/lib/python3*": [
            "nats_py 2.16.0",
            "pyzmq 26.4.0",
            "msgpack 1.2.4",
            "prometheus_client 0.23.1",
        ],
    }
    planned = plan_deploy(H100, "deploys/disagg.py", responses={**gpu_host_responses(), **installed})
    commands = planned.commands("h100-node2")
    assert not any("/opt/disagg/vllm" in c or "/opt/disagg/agent" in c for c in commands if "uv" in c), commands
    assert prewarm not in commands
    assert not any("/opt/disagg/uv/bin/pip" in c for c in commands)


HUB_MODEL = "neuralmagic/Meta-Llama-3.1-70B-Instruct-FP8"
HUB_DEST = f"/var/lib/disagg/models/hub/{HUB_MODEL.replace('/', '--')}/main"


@pytest.fixture
def hub(tmp_path):
    """A gated repository at a local server in the hub's layout (HF_ENDPOINT)."""
    (tmp_path / "config.json").write_text("{}")
    with Hub(HUB_MODEL, tmp_path, token="hf_TOPSECRET123") as served:
        yield served


def _staged(commit: str, sizes=(("config.json", 100), ("model.safetensors", 5)), **sections) -> dict:
    """A host's StagedTree answer for HUB_DEST: stamped (with commit), every size as stamped."""
    stamp = json.dumps({name: [size, "a" * 64] for name, size in sizes})
    lines = [
        "### stamp",
        stamp,
        "### commit",
        commit,
        "### files",
        *(f"{n}\t{size}" for n, size in sizes),
        "### rehashed",
    ]
    for name, value in sections.items():
        lines += [f"### {name}", *value]
    return {re.compile(rf"^s={HUB_DEST}.manifest.json"): lines}


def test_a_hub_model_is_staged_before_the_workers_start_and_a_stamped_copy_is_left_alone(hub):
    model, dest = HUB_MODEL, HUB_DEST
    data = {"hf_token": "hf_TOPSECRET123", "hf_endpoint": hub.url}
    planned = plan_deploy(H100, "deploys/disagg.py", data=data, responses=gpu_host_responses())
    names = [n for n, _ in planned._raw_ops("h100-node2")]
    stage = next(i for i, n in enumerate(names) if n.startswith(f"Model | Stage {model}@main ({hub.commit[:12]})"))
    assert stage < next(i for i, n in enumerate(names) if "| Run disagg-generate-0" in n)
    (command,) = [c for c in planned.commands("h100-node2") if "disagg.agent.stage" in c]
    # the token from its root-only file, never on the command line; the mirror as HF_ENDPOINT
    # (read by the agent as data: an env file is never sourced by a shell); the commit the controller resolved
    assert command.startswith(f"HF_ENDPOINT={hub.url} ") and ". /etc" not in command
    assert command.endswith(f"--repo {model} --revision {hub.commit} --dest {dest} --token-file {S.HF_TOKEN_ENV}")
    assert "hf_TOPSECRET" not in command
    # the tree is root's, read-only to the workers; so is every directory above it
    commands = planned.commands("h100-node2")
    assert commands.index(command) < commands.index(f"chown -hR root:root {dest} && chmod -R u=rwX,go=rX {dest}")
    assert "chown -h root:root /var/lib/disagg/models/hub/neuralmagic--Meta-Llama-3.1-70B-Instruct-FP8" in commands
    # the workers load the staged copy, served under the hub id
    assert f"--model {dest}" in planned.uploads("h100-node2")["/etc/systemd/system/disagg-generate-0.service"]
    # stamped with that commit, every size as stamped, nothing written since: no command
    planned = plan_deploy(
        H100, "deploys/disagg.py", data=data, responses={**gpu_host_responses(), **_staged(hub.commit)}
    )
    assert not any("disagg.agent.stage" in c for c in planned.commands("h100-node2"))
    # a shard shorter than stamped (an interrupted copy): staged again
    short = _staged(hub.commit)
    (lines,) = short.values()
    lines[lines.index("model.safetensors\t5")] = "model.safetensors\t2"
    planned = plan_deploy(H100, "deploys/disagg.py", data=data, responses={**gpu_host_responses(), **short})
    assert any("disagg.agent.stage" in c for c in planned.commands("h100-node2"))
    # the tree's path a link (a service user planted it; the fact lists nothing behind it): removed, never followed
    linked = {key: ["### stamp", lines[1], "### kind", "l"] for key in short}
    planned = plan_deploy(H100, "deploys/disagg.py", data=data, responses={**gpu_host_responses(), **linked})
    commands = planned.commands("h100-node2")
    stage = next(i for i, c in enumerate(commands) if "disagg.agent.stage" in c)
    assert commands.index(f"rm -f -- {dest}") < stage
    # as stamped, but a file not root's (as releases before this one left it): made root's, not fetched again
    loose = _staged(hub.commit, kind=["d"], loose=["./config.json"])
    planned = plan_deploy(H100, "deploys/disagg.py", data=data, responses={**gpu_host_responses(), **loose})
    commands = planned.commands("h100-node2")
    assert not any("disagg.agent.stage" in c for c in commands)
    assert f"chown -hR root:root {dest} && chmod -R u=rwX,go=rX {dest}" in commands


def test_every_host_stages_the_commit_its_peers_hold_the_hub_asked_once_at_most(hub):
    data = {"hf_token": "hf_TOPSECRET123", "hf_endpoint": hub.url}

    def staging(planned) -> dict[str, str]:
        return {
            h: re.search(r"--revision (\S+)", c).group(1)
            for h in NODES
            for c in planned.commands(h)
            if "disagg.agent.stage" in c
        }

    def asked() -> int:
        return sum(path.startswith("/api/models/") for _, path in hub.requests)

    # none staged: the controller asks the hub once for both hosts
    assert staging(plan_deploy(H100, "deploys/disagg.py", data=data, responses=gpu_host_responses())) == {
        h: hub.commit for h in NODES
    }
    assert asked() == 1
    # a host holds an older commit (main has moved since): the one added later stages that, the hub is not asked
    older = "0123456789abcdef0123456789abcdef01234567"
    held = {"h100-node1": {**_staged(older), **gpu_host_responses()}}
    planned = plan_deploy(H100, "deploys/disagg.py", data=data, responses=gpu_host_responses(), host_responses=held)
    assert staging(planned) == {"h100-node2": older} and asked() == 1
    # hosts that disagree: which is meant is the operator's call
    held["h100-node2"] = {**_staged("f" * 40), **gpu_host_responses()}
    with pytest.raises(
        OperationError,
        match=rf"^the hosts hold different commits of {HUB_MODEL}@main \(h100-node1: "
        rf"{older[:12]}, h100-node2: ffffffffffff\); set model_revision",
    ):
        plan_deploy(H100, "deploys/disagg.py", data=data, responses=gpu_host_responses(), host_responses=held)
    # a commit pinned in model_revision is staged as is, the hub never asked
    pinned = plan_deploy(
        H100, "deploys/disagg.py", data={**data, "model_revision": older}, responses=gpu_host_responses()
    )
    assert set(staging(pinned).values()) == {older} and asked() == 1


def test_a_revision_the_controller_cannot_resolve_stops_the_deploy_in_one_line(hub):
    with pytest.raises(
        OperationError,
        match=r"^model_revision 'main' of .*: http://127.0.0.1:\d+ answered HTTP 401; "
        r"give data hf_token",
    ):
        plan_deploy(H100, "deploys/disagg.py", data={"hf_endpoint": hub.url}, responses=gpu_host_responses())
    with pytest.raises(
        HubError,
        match=r"^model_revision 'v1' of a/b: cannot ask http://127.0.0.1:9 from the "
        r"controller \(.*\); set hf_endpoint to a hub it reaches, or model_revision",
    ):
        hub_commit("a/b", "v1", "http://127.0.0.1:9")


def test_a_running_firewall_is_reloaded_never_restarted():
    # every file differs, the unit runs: a restart would delete the table (ExecStop) before loading the new one
    planned = plan_deploy(H100, "deploys/disagg.py", responses={**gpu_host_responses(), **RUNNING})
    for host in NODES:
        (cmds,) = [c for n, c in planned.ops(host) if n.endswith(f"Run {S.FIREWALL_UNIT}")]
        assert [c.split(" || ")[0] for c in cmds] == [
            "systemctl daemon-reload",
            f"systemctl reload {S.FIREWALL_UNIT}.service",
        ]
        # a reload that fails says why (nft's error), not only systemd's "see journalctl"
        assert f"|| {{ journalctl -u {S.FIREWALL_UNIT}.service -n 10" in cmds[1]


def test_a_limit_that_leaves_out_the_head_is_refused_before_any_change():
    """The head's registry sync routes only the workers its layout file
    names: a worker deployed with --limit and no head would never be routed."""
    # raised as pyinfra's own error, which its CLI prints as one line
    with pytest.raises(
        PyinfraError,
        match=r"^--limit leaves out h100-node1 \(the head and the router hosts\): .*; add --limit h100-node1$",
    ) as e:
        plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses(), limit=("h100-node2",))
    assert isinstance(e.value.__cause__, UsageError)
    assert e.value.planned.commands("h100-node2") == []
    both = plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses(), limit=("h100-node2", "h100-node1"))
    assert any(S.LAYOUT_FILE == path for path in both.uploads("h100-node1"))


def test_a_limit_may_leave_out_a_nats_host_but_not_the_head_or_a_router_host(tmp_path, caplog):
    """A NATS server may be down while workers are added: the scale-out
    goes on with the other servers, and says that the one left out admits
    the new heartbeats only once deployed."""
    context, generate, head = "10.1.0.11", "10.1.0.12", "10.1.0.13"
    inventory = tmp_path / "three.py"
    inventory.write_text(
        f"import runpy\n_h100 = runpy.run_path({str(ROOT / H100)!r})\n"
        f"context = [('{context}', {{'gpus': 8}})]\ngenerate = [('{generate}', {{'gpus': 8}})]\n"
        f"routers = ['{generate}', '{head}']\nhead = ['{head}']\nnats = ['{context}', '{generate}', '{head}']\n"
        f"all = (['{context}', '{generate}', '{head}'], _h100['all'][1])\n"
    )
    planned = plan_deploy(str(inventory), "deploys/disagg.py", responses=gpu_host_responses(), limit=(generate, head))
    assert f"--limit leaves out NATS host(s) {context}: their servers admit a new worker's heartbeat" in caplog.text
    assert planned.commands(context) == [] and any(S.LAYOUT_FILE == p for p in planned.uploads(generate))
    with pytest.raises(PyinfraError, match=rf"^--limit leaves out {generate} \(the head and the router hosts\)"):
        plan_deploy(str(inventory), "deploys/disagg.py", responses=gpu_host_responses(), limit=(context, head))


def test_pins_of_releases_the_vllm_plugin_was_not_written_for_are_said_before_the_deploy(caplog):
    plan_deploy(H100, "deploys/disagg.py", responses=gpu_host_responses())
    assert "disagg's vLLM plugin is written for" not in caplog.text
    caplog.clear()
    plan_deploy(
        H100,
        "deploys/disagg.py",
        data={"vllm_package": "vllm==0.33.1", "nixl_packages": ["nixl==1.5.1"]},
        responses=gpu_host_responses(),
    )
    assert (
        "--> preflight: h100-node1: vllm 0.33.1 pinned; disagg's vLLM plugin is written for vllm 0.32.0 and "
        "nixl 1.5.1: it will patch nothing"
    ) in caplog.text


def test_the_last_gate_is_a_request_through_the_front_door_with_a_clients_key_never_on_a_command_line():
    data = {"client_api_keys": ["sk-TOPSECRET-1"], "client_tls_names": ["llm.example.com"]}
    planned = plan_deploy(H100, "deploys/disagg.py", data=data, responses=gpu_host_responses())
    ((name, (command,)),) = [(n, c) for n, c in planned.ops("h100-node1") if n.endswith("through the front door")]
    assert name == planned.ops("h100-node1")[-1][0]  # after every other step
    assert "sk-TOPSECRET" not in command and all(
        "sk-TOPSECRET" not in c for c in planned.commands("h100-node1") if "client-keys" not in c
    )
    # the key from its root-only file into curl's stdin; the CA's certificate checked under its name
    assert "sed -n '1s/^/Authorization: /p' /etc/disagg/frontdoor/client-keys | curl " in command
    head = make_plan(load_inventory(H100, override_data=data)).head.address
    assert f"--cacert {S.CA_CERT} --connect-to llm.example.com:8000:{head}:8000 -H @- " in command
    assert "https://llm.example.com:8000/v1/chat/completions | grep -qx 200" in command


def test_the_health_gate_runs_its_unit_and_url_as_data_never_as_shell(tmp_path):
    canary = tmp_path / "ran"
    url = f"http://127.0.0.1:9/$(touch {canary})`touch {canary}`"
    loop = health_loop(f"u;touch {canary}", url, timeout=0)
    out = subprocess.run(["bash", "-c", loop], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and not canary.exists()
    assert f"u;touch {canary} is not healthy: {url} did not answer 200 (timeout 0 s)" in out.stderr
