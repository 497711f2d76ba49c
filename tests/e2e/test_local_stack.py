"""End to end on two real systemd hosts: real vLLM (CPU build) behind the
real vllm-router, real NATS; converge, re-run, diff, prune, baseline,
teardown. The tests run in order and share the hosts."""

import json
import re
import socket
import subprocess
import sys
import time

import urllib.request

import pytest

from disagg import results, smoke
from disagg.plan import load_inventory, make_plan
from disagg.testhosts import run_deploy, ssh

pytestmark = pytest.mark.e2e

INVENTORY = "inventories/local.py"
H1, H2 = 1, 2
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def plan():
    return make_plan(load_inventory(INVENTORY))


def active_since(host: int, units: list[str]) -> dict[str, str]:
    out = ssh(host, " ; ".join(f"systemctl show -p ActiveEnterTimestamp --value {u}" for u in units)).stdout
    return dict(zip(units, out.splitlines()))


def unit_files(host: int) -> list[str]:
    out = ssh(host, "ls /etc/systemd/system | grep '^disagg-' || true").stdout
    return sorted(out.split())


def listed_units(host: int) -> list[str]:
    out = ssh(host, "systemctl list-units 'disagg-*' --all --no-legend --plain").stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def test_a_converge_bare_hosts_and_serve(local_hosts, plan, timings):
    run = run_deploy(INVENTORY, "deploys/disagg.py")
    timings["bare hosts to serving (deploys/disagg.py)"] = run.seconds
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
    assert listed_units(H1) == ["disagg-context-0.service", "disagg-context-1.service",
                                "disagg-nats.service", "disagg-router.service"]  # fmt: skip
    assert listed_units(H2) == ["disagg-generate-0.service"]


def test_g_nats_jetstream_auth_and_loopback_monitoring(local_hosts, plan):
    s = plan.settings
    health = ssh(H1, f"curl -s 'http://127.0.0.1:{s.nats_monitor_port}/healthz?js-enabled-only=true'").stdout
    assert '"ok"' in health
    with pytest.raises(OSError):
        socket.create_connection((plan.head.address, s.nats_monitor_port), timeout=3)
    assert "Authorization Violation" in nats_connect(plan, {})
    password = ssh(H1, "sed -n 's/^DISAGG_NATS_PASSWORD=//p' /etc/disagg/nats.env").stdout.strip()
    assert password and nats_connect(plan, {"user": s.nats_user, "pass": password}).startswith("PONG")
    owner = ssh(H1, "stat -c '%U %a' /etc/disagg/nats.env").stdout.split()
    assert owner == ["root", "600"]


def nats_connect(plan, creds: dict) -> str:
    with socket.create_connection((plan.head.address, plan.settings.nats_port), timeout=5) as sock:
        info = sock.recv(4096).decode()
        assert '"jetstream":true' in info
        sock.sendall(f"CONNECT {json.dumps({'verbose': False, **creds})}\r\nPING\r\n".encode())
        return sock.recv(4096).decode()


def test_b_rerun_changes_nothing(local_hosts, plan, timings):
    units = plan.units_on(plan.cluster.head)
    since = active_since(H1, units)
    run = run_deploy(INVENTORY, "deploys/disagg.py")
    timings["no-op re-run (deploys/disagg.py)"] = run.seconds
    assert run.changed == {}
    assert active_since(H1, units) == since


def bench(*args: str) -> dict:
    """`disagg bench` as a user runs it, with small ISL/OSL for CPUs."""
    out = subprocess.run(
        [sys.executable, "-m", "disagg", "bench", "-i", INVENTORY, "--concurrency", "1,2",
         "--isl", "64", "--osl", "16", "--json", *args],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[2/2]" in out.stderr  # progress
    return json.loads(out.stdout)


def test_b2_bench_the_disaggregated_layout(local_hosts, bench_out):
    summary = bench("-o", str(bench_out))
    assert summary["label"] == "context_tp1dp2_generate_tp1dp1"
    assert [r["concurrency"] for r in summary["rows"]] == [1, 2]
    for r in summary["rows"]:
        assert r["status"] == "ok" and r["output_token_throughput_per_gpu"] > 0


def test_c_engine_arg_diff_then_restart_only_affected_units(local_hosts):
    workers = {H1: ["disagg-context-0", "disagg-context-1"], H2: ["disagg-generate-0"]}
    others = ["disagg-nats", "disagg-router"]
    since = {h: active_since(h, u + (others if h == H1 else [])) for h, u in workers.items()}
    dry = run_deploy(INVENTORY, "deploys/disagg.py", "max_model_len=1024", dry=True, diff=True)
    modified = re.findall(r"Will modify \S*?(/etc/\S+)", dry.output)
    assert sorted(modified) == sorted(f"/etc/systemd/system/{u}.service" for u in sum(workers.values(), []))
    assert len(re.findall(r"^\s+-\s+--max-model-len 2048 \\$", dry.output, re.M)) == 3
    assert len(re.findall(r"^\s+\+\s+--max-model-len 1024 \\$", dry.output, re.M)) == 3
    # nothing applied
    assert ssh(H1, "grep -c 'max-model-len 2048' /etc/systemd/system/disagg-context-0.service").stdout.strip() == "1"
    assert active_since(H1, others + workers[H1]) == since[H1]

    run_deploy(INVENTORY, "deploys/disagg.py", "max_model_len=1024")
    for host, units in workers.items():
        now = active_since(host, units + (others if host == H1 else []))
        for unit in units:
            assert now[unit] != since[host][unit], f"{unit} was not restarted"
        for unit in others if host == H1 else []:
            assert now[unit] == since[host][unit], f"{unit} restarted without a change"


def test_d_relabel_prunes_the_stale_context_unit(local_hosts):
    kept = ["disagg-context-0", "disagg-generate-0"]
    since = {**active_since(H1, kept[:1]), **active_since(H2, kept[1:])}
    run_deploy(INVENTORY, "deploys/disagg.py", "max_model_len=1024", "label=context_tp1dp1_generate_tp1dp1")
    assert "disagg-context-1.service" not in unit_files(H1)
    assert listed_units(H1) == ["disagg-context-0.service", "disagg-nats.service", "disagg-router.service"]
    assert ssh(H1, "test -e /etc/disagg/disagg-context-1.env", check=False).returncode != 0
    # unchanged workers keep running through a relabel
    assert {**active_since(H1, kept[:1]), **active_since(H2, kept[1:])} == since
    relabeled = make_plan(load_inventory(INVENTORY), "context_tp1dp1_generate_tp1dp1")
    assert smoke.chat(relabeled.router_url, MODEL, 5)["completion_tokens"] == 5


def test_e_baseline_answers_through_the_router(local_hosts):
    run_deploy(INVENTORY, "deploys/baseline.py")
    baseline = make_plan(load_inventory(INVENTORY), label_key="baseline_label")
    assert listed_units(H1) == ["disagg-baseline-0.service", "disagg-baseline-1.service",
                                "disagg-nats.service", "disagg-router.service"]  # fmt: skip
    assert listed_units(H2) == []
    before = [smoke.counter(w.url, "vllm:request_success_total") for w in baseline.workers]
    for _ in range(4):
        assert smoke.chat(baseline.router_url, MODEL, 6)["completion_tokens"] == 6
    after = [smoke.counter(w.url, "vllm:request_success_total") for w in baseline.workers]
    assert sum(after) - sum(before) == 4


def test_e2_bench_the_baseline_and_report_both(local_hosts, bench_out):
    summary = bench("--label-key", "baseline_label", "-o", str(bench_out))
    assert summary["label"] == "baseline_tp1dp2" and len(summary["rows"]) == 2
    # an SLA that every label meets somewhere, so that both get a pick
    rows = [r for d in results.run_dirs([bench_out]) for r in results.load_run(d)]
    sla = min(r["output_token_throughput_per_user"] for r in rows)
    out = subprocess.run(
        [sys.executable, "-m", "disagg", "report", str(bench_out), "--sla-tokens-per-user", str(sla), "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert len(report["rows"]) == 4
    assert report["series"] == ["baseline_tp1dp2", "context_tp1dp2_generate_tp1dp1"]
    assert (bench_out / "pareto.png").is_file()
    assert all(report["picks"].values()) and report["ratio"] > 0


def test_f_teardown_removes_ours_and_nothing_else(local_hosts, plan, timings):
    # a user's own processes, started before teardown: a Python job and a
    # nats-server of their own on another port
    ssh(H1, "cp /opt/disagg/nats/bin/nats-server /usr/local/bin/nats-server")
    sentinels = ssh(
        H1,
        "setsid python3 -c 'import time; time.sleep(900)' >/dev/null 2>&1 < /dev/null & echo $!; "
        "setsid /usr/local/bin/nats-server -p 4333 >/dev/null 2>&1 < /dev/null & echo $!",
    ).stdout.split()
    time.sleep(1)
    run = run_deploy(INVENTORY, "deploys/teardown.py")
    timings["teardown (deploys/teardown.py)"] = run.seconds
    s = plan.settings
    ours = {s.router_port, s.router_metrics_port, s.nats_port, s.nats_monitor_port, 8100, 8101}
    for host in (H1, H2):
        assert listed_units(host) == [] and unit_files(host) == []
        assert ssh(host, "pgrep -u disagg,disagg-nats", check=False).stdout == ""
        listening = ssh(host, "ss -ltnH").stdout
        ports = {int(m) for m in re.findall(r":(\d+)\s", listening)}
        assert not ports & ours, listening
    for pid in sentinels:
        assert ssh(H1, f"kill -0 {pid}", check=False).returncode == 0, f"teardown killed user process {pid}"
    assert 4333 in {int(m) for m in re.findall(r":(\d+)\s", ssh(H1, "ss -ltnH").stdout)}
    ssh(H1, f"kill {' '.join(sentinels)}")

