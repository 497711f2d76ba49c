"""disagg/infra/pyinfra_cli.py plans exactly what pyinfra's own CLI plans: the same
operations in the same order (their hashes come from the deploy code's line
numbers, which the launcher reads without source context)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEPLOY = textwrap.dedent("""
    from pyinfra.operations import server


    def role(n):
        for i in range(n):
            server.shell(name=f"in a loop {i}", commands=[f"echo {i}"])
        server.shell(name="after the loop", commands=["echo after"])


    server.shell(name="first", commands=["echo first"])
    role(2)
    if True:
        server.shell(name="nested block", commands=["echo nested"])
    role(1)
""")


def _plan(module, deploy, cwd):
    out = subprocess.run(
        [sys.executable, "-m", module, "@local", str(deploy), "--dry", "--json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [(op["op_hash"], op["name"]) for op in json.loads(out)["plan"]]


def test_the_launcher_plans_the_same_operations_in_the_same_order(tmp_path):
    deploy = tmp_path / "deploy.py"
    deploy.write_text(DEPLOY)
    ours = _plan("disagg.infra.pyinfra_cli", deploy, tmp_path)
    assert ours == _plan("pyinfra", deploy, tmp_path)
    assert [name for _, name in ours] == [
        "first",
        "in a loop 0",
        "in a loop 1",
        "after the loop",
        "nested block",
        "in a loop 0",
        "after the loop",
    ]


def test_loading_an_inventory_or_planning_leaves_the_stdlib_unpatched():
    # the controller's CLI and the tests run asyncio, threads and child processes: gevent's late patching aborts them
    check = textwrap.dedent("""
        import gevent.monkey
        from disagg.core.plan import make_plan
        from disagg.infra.inventory import load_inventory
        from fakehosts import gpu_host_responses, plan_deploy
        make_plan(load_inventory("inventories/h100.py"), "context_tp2dp4_generate_tp8dp1")
        assert plan_deploy("inventories/h100.py", "deploys/disagg.py", responses=gpu_host_responses()).commands("h100-node1")
        print([m for m in ("socket", "threading", "subprocess", "select") if gevent.monkey.is_module_patched(m)])
    """)
    out = subprocess.run(
        [sys.executable, "-c", check],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"


def test_a_failed_deploy_names_every_failed_operation_with_its_hosts_lines():
    from disagg.infra.launch import _failures

    log = [
        "--> Starting operation: NATS server | NATS JetStream healthy \n",
        "    [h2] nats did not answer within 60 s\n",
        "    [h2] Error: executed 0 commands\n",
        "--> Starting operation: Router sync and readiness gate | Every worker registered \n",
        "    [h3] not ready: generate-1 is not registered\n",
        "    [h3] Error: executed 0 commands\n",
    ]
    text = _failures(log)
    assert text.startswith("failed operations:\n--> Starting operation: NATS server | NATS JetStream healthy")
    assert "[h2] nats did not answer" in text and "[h3] not ready: generate-1" in text
    assert _failures(log[:2]) == ""
