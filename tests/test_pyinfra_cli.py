"""disagg/pyinfra_cli.py plans exactly what pyinfra's own CLI plans: the same
operations in the same order (their hashes come from the deploy code's line
numbers, which the launcher reads without source context)."""

import json
import subprocess
import sys
import textwrap

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
    out = subprocess.run([sys.executable, "-m", module, "@local", str(deploy), "--dry", "--json"], cwd=cwd,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return [(op["op_hash"], op["name"]) for op in json.loads(out)["plan"]]


def test_the_launcher_plans_the_same_operations_in_the_same_order(tmp_path):
    deploy = tmp_path / "deploy.py"
    deploy.write_text(DEPLOY)
    ours = _plan("disagg.pyinfra_cli", deploy, tmp_path)
    assert ours == _plan("pyinfra", deploy, tmp_path)
    assert [name for _, name in ours] == ["first", "in a loop 0", "in a loop 1", "after the loop", "nested block",
                                          "in a loop 0", "after the loop"]  # fmt: skip
