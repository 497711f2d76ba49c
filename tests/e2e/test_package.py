"""disagg as a user installs it: a wheel built from the checkout, installed
with pip into a fresh venv outside it, deploying the test hosts from a
directory of its own with an inventory written there, logged in as root
(the one e2e test that keeps a root login: every other one deploys as
inventories/local.py's sudo login)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from disagg.infra.inventory import load_inventory
from disagg.lab import testhosts

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _inventory_text(source: str) -> str:
    """A standalone inventory with the data of `source` (the test hosts'),
    logged in as root instead of through sudo: plain values, no import of
    the checkout."""
    inventory = load_inventory(source)
    groups = {}
    for group in ("context", "generate"):
        groups[group] = [
            (h.name, {k: v for k, v in h.data.dict().items() if k in ("gpus", "ucx_net_devices")})
            for h in inventory.get_group(group)
        ]
    login = {
        "ssh_user": "root",
        "ssh_key": str(testhosts.KEY),
        "ssh_known_hosts_file": "/dev/null",
        "ssh_strict_host_key_checking": "no",
    }
    layout = {
        k: v
        for k, v in inventory.get_host(groups["context"][0][0]).data.dict().items()
        if k not in (*login, "_sudo", "gpus", "ucx_net_devices") and not k.startswith("_")
    }
    return (
        "".join(f"{g} = {[(name, {**data, **login}) for name, data in hosts]!r}\n" for g, hosts in groups.items())
        + f"all = ({[name for hosts in groups.values() for name, _ in hosts]!r}, {layout!r})\n"
    )


def test_a_wheel_installed_outside_the_checkout_deploys_the_test_hosts(deployment, tmp_path, timings):
    deployment.ensure()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("disagg-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([venv / "bin" / "pip", "install", "-q", str(wheel)], check=True, capture_output=True, timeout=600)
    work = tmp_path / "ops"
    work.mkdir()
    (work / "cluster.py").write_text(_inventory_text("inventories/local.py"))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([venv / "bin" / "disagg", *args], cwd=work, capture_output=True, text=True, timeout=900)

    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import disagg; print(disagg.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(venv)) and "roles" not in {
        p.name for p in (venv / "lib").glob("python3*/site-packages/*")
    }
    assert run("check", "-i", "cluster.py").returncode == 0
    # the hosts run what the checkout deployed: the wheel's templates, roles, agent files and
    # pins render the very same files, so its deploy (as root, not through sudo) changes nothing
    start = time.monotonic()
    deploy = run("deploy", "-i", "cluster.py", "-y", "--json", *(a for d in deployment.data for a in ("--data", d)))
    timings["deploy from an installed wheel, root login (no change)"] = time.monotonic() - start
    assert deploy.returncode == 0, deploy.stderr[-4000:]
    results = json.loads(deploy.stdout)["results"]["operations"]
    assert len(results) > 40 and [op["name"] for op in results if op["success"]] == []
    assert "Every worker registered, healthy and routed" in deploy.stderr
    dry = run("deploy", "-i", "cluster.py", "context_tp1dp1_generate_tp1dp1", "--dry")
    assert dry.returncode == 0 and "Remove units of other layouts" in dry.stderr, dry.stderr[-4000:]
