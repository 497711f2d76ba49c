"""End to end on two real systemd hosts: real vLLM (CPU build) behind the
real vllm-router, real NATS; converge, re-run, diff, prune, baseline,
teardown. The tests run in order and share the hosts."""

import itertools
import json
import re
import socket
import subprocess
import sys
import time

import urllib.request

import pytest

from disagg import registry, results, smoke
from disagg.plan import load_inventory, make_plan
from disagg.deploy import run_deploy
from disagg.testhosts import ssh

pytestmark = pytest.mark.e2e

INVENTORY = "inventories/local.py"
H1, H2 = 1, 2
MODEL = "tiny-llama"
TTL_PLUS_5 = registry.TTL + 5


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
    assert listed_units(H1) == ["disagg-context-0-agent.service", "disagg-context-0.service",
                                "disagg-context-1-agent.service", "disagg-context-1.service",
                                "disagg-nats.service", "disagg-registry-sync.service",
                                "disagg-router.service"]  # fmt: skip
    assert listed_units(H2) == ["disagg-generate-0-agent.service", "disagg-generate-0.service"]


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


def status(*args: str, inventory: str = INVENTORY) -> tuple[int, dict]:
    """`disagg status -i INVENTORY --json` as an operator runs it."""
    out = subprocess.run([sys.executable, "-m", "disagg", "status", "-i", inventory, "--json", *args],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode in (0, 1), out.stderr[-3000:]
    return out.returncode, json.loads(out.stdout)


def until(predicate, timeout: float, what: str) -> float:
    """Poll predicate until true; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.5)
    return time.monotonic() - start


def test_h_registry_matches_the_deployed_topology(local_hosts, plan):
    code, current = status()
    assert code == 0 and current["ready"] and current["nats"] == "healthy" and current["router"] == "healthy"
    registered = {(w["role"], w["index"], w["host"], tuple(w["gpus"]), w["url"], w["label"], w["health"])
                  for w in current["workers"]}  # fmt: skip
    assert registered == {(w.role, w.index, w.host, w.gpus, w.url, plan.label, "healthy") for w in plan.workers}
    assert sorted(current["router_members"]) == sorted(w.url for w in plan.workers)
    assert all(w["in_router"] and w["heartbeat_age_s"] < 5 for w in current["workers"])
    # the benchmark above went through the router to every worker (its own count)
    assert all(w["routed"] and w["routed"] > 0 for w in current["workers"])
    # the password reaches the registry units through the root-only file only
    password = ssh(H1, "sed -n 's/^DISAGG_NATS_PASSWORD=//p' /etc/disagg/nats.env").stdout.strip()
    for host in (H1, H2):
        assert ssh(host, "stat -c '%U %a' /etc/disagg/nats.env").stdout.split() == ["root", "600"]
        seen = ssh(host, "cat /etc/systemd/system/disagg-*.service; ps -eo args").stdout
        assert "registry.py heartbeat" in seen
        assert password not in seen
    # not even pyinfra's debug output, which prints every fact's output
    debug = subprocess.run([sys.executable, "-m", "pyinfra", INVENTORY, "deploys/disagg.py", "--dry", "-vvv"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert debug.returncode == 0 and "Loading: deploys/disagg.py" in debug.stderr + debug.stdout
    assert password not in debug.stdout + debug.stderr


def test_i_stopped_worker_leaves_rotation_while_requests_succeed(local_hosts, plan, timings):
    (stopped,) = [w for w in plan.workers if w.name == "context-1"]
    served = []
    stop = time.monotonic()
    ssh(H1, f"systemctl stop --no-block {stopped.unit}")

    def gone() -> bool:
        served.append(smoke.chat(plan.router_url, MODEL, 4)["completion_tokens"])
        current = status()[1]
        return stopped.url not in current["router_members"] and all(
            w["url"] != stopped.url for w in current["workers"])  # fmt: skip

    until(gone, TTL_PLUS_5, "stopped worker out of registry and router")
    timings["worker stop -> out of registry and router"] = time.monotonic() - stop
    # requests through the router kept succeeding, also while it drained and after
    for _ in range(4):
        served.append(smoke.chat(plan.router_url, MODEL, 4)["completion_tokens"])
    assert served and set(served) == {4}

    code, current = status("--wait", "--timeout", "3")
    assert code == 1 and f"context-1 ({stopped.url}) is not registered" in current["problems"]
    human = subprocess.run([sys.executable, "-m", "disagg", "status", "-i", INVENTORY],
                           capture_output=True, text=True)  # fmt: skip
    assert human.returncode == 1 and "not ready: context-1" in human.stdout

    start = time.monotonic()
    ssh(H1, f"systemctl start {stopped.unit}")
    code, current = status("--wait", "--timeout", "180")
    assert code == 0, current["problems"]
    timings["worker start -> back in registry and router"] = time.monotonic() - start


def test_j_nats_restart_registry_whole_again(local_hosts, plan, timings):
    start = time.monotonic()
    ssh(H1, "systemctl restart disagg-nats")
    code, current = status("--wait", "--timeout", "15")
    assert code == 0, current["problems"]
    timings["NATS restart -> registry whole"] = time.monotonic() - start
    assert smoke.chat(plan.router_url, MODEL, 3)["completion_tokens"] == 3


def test_k_add_a_context_worker_with_limit_no_router_restart(local_hosts, plan, tmp_path, timings):
    # host 2 joins group context: room for a third context worker there
    scaled = tmp_path / "scaled.py"
    scaled.write_text(open(INVENTORY).read() + (
        '\ncontext = [(_h1, {"gpus": 2, **_ssh}), (_h2, {"gpus": 2, **_ssh})]'
        '\ngenerate = [(_h2, {"gpus": 2, **_ssh})]\n'))  # fmt: skip
    label = "context_tp1dp3_generate_tp1dp1"
    grown = make_plan(load_inventory(str(scaled)), label)
    (added,) = [w for w in grown.workers if w.name == "context-2"]
    assert added.host == plan.workers[-1].host  # the generate host
    router_since = active_since(H1, ["disagg-router", "disagg-registry-sync"])
    start = time.monotonic()
    run_deploy(str(scaled), "deploys/disagg.py", f"label={label}", limit=added.host)
    code, current = status("--label", label, "--wait", "--timeout", "120", inventory=str(scaled))
    timings["deploy --limit of a context worker -> routed"] = time.monotonic() - start
    assert code == 0, current["problems"]
    before = smoke.counter(added.url, "vllm:request_success_total")
    prompts = (f"Request {i}: say something." for i in itertools.count())
    until(lambda: smoke.chat(grown.router_url, MODEL, 3, prompt=next(prompts)) and
          smoke.counter(added.url, "vllm:request_success_total") > before, 120, "added worker serving")  # fmt: skip
    assert active_since(H1, ["disagg-router", "disagg-registry-sync"]) == router_since
    # back to the inventory's layout: the added worker is pruned and leaves the router
    run_deploy(INVENTORY, "deploys/disagg.py")
    assert status()[0] == 0


def test_c_engine_arg_diff_then_restart_only_affected_units(local_hosts):
    workers = {H1: ["disagg-context-0", "disagg-context-1"], H2: ["disagg-generate-0"]}
    others = ["disagg-nats", "disagg-router", "disagg-registry-sync"]
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
    assert listed_units(H1) == ["disagg-context-0-agent.service", "disagg-context-0.service", "disagg-nats.service",
                                "disagg-registry-sync.service", "disagg-router.service"]  # fmt: skip
    assert ssh(H1, "test -e /etc/disagg/disagg-context-1.env", check=False).returncode != 0
    # unchanged workers keep running through a relabel
    assert {**active_since(H1, kept[:1]), **active_since(H2, kept[1:])} == since
    relabeled = make_plan(load_inventory(INVENTORY), "context_tp1dp1_generate_tp1dp1")
    assert smoke.chat(relabeled.router_url, MODEL, 5)["completion_tokens"] == 5


def test_e_baseline_answers_through_the_router(local_hosts):
    run_deploy(INVENTORY, "deploys/baseline.py")
    baseline = make_plan(load_inventory(INVENTORY), label_key="baseline_label")
    assert listed_units(H1) == ["disagg-baseline-0-agent.service", "disagg-baseline-0.service",
                                "disagg-baseline-1-agent.service", "disagg-baseline-1.service", "disagg-nats.service",
                                "disagg-registry-sync.service", "disagg-router.service"]  # fmt: skip
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



def sweep(out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "disagg", "sweep", "-i", INVENTORY, "--labels", ",".join(SWEPT), "--concurrency", "1",
         "--isl", "64", "--osl", "16", "-o", str(out), "--json", *args],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip


SWEPT = ["context_tp1dp1_generate_tp1dp1", "baseline_tp1dp2"]


def test_l_sweep_two_labels_then_resume(local_hosts, tmp_path, timings):
    start = time.monotonic()
    first = sweep(tmp_path)
    timings["sweep of two labels (c1, from torn-down hosts)"] = time.monotonic() - start
    assert first.returncode == 0, first.stderr[-4000:]
    report = json.loads(first.stdout)
    assert sorted({r["label"] for r in report["rows"]}) == sorted(SWEPT)
    assert all(r["status"] == "ok" for r in report["rows"])
    assert (tmp_path / "pareto.png").is_file() and (tmp_path / "report.md").is_file()
    for label in SWEPT:
        assert f"{label}: deploying" in first.stderr and f"{label}: ready after" in first.stderr
    # torn down at the end
    assert listed_units(H1) == [] and listed_units(H2) == []
    runs = sorted(p.parent for p in tmp_path.glob("*/*/provenance.json"))
    assert len(runs) == 2

    second = sweep(tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    for label in SWEPT:
        assert f"{label}: complete results in" in second.stderr and f"{label}: deploying" not in second.stderr
    assert sorted(p.parent for p in tmp_path.glob("*/*/provenance.json")) == runs
    assert json.loads(second.stdout)["rows"] == report["rows"]
