"""Test hosts and one shared deployment for the end-to-end tests, booted
once per session and removed afterwards, also when a test fails or the run
is interrupted.

No test depends on another having run: each asks `deployment.ensure(...)`
for the layout it needs, which deploys it only when the hosts do not
already run it (a test that changes the layout says so with `changed()`).

DISAGG_KEEP_HOSTS=1 leaves them up after the run (to look around);
DISAGG_REUSE_HOSTS=1 uses hosts that are already up instead of new ones."""

from __future__ import annotations

import os

import pytest
from pyinfra_cli.util import parse_cli_arg

from disagg.lab import testhosts, tinymodel
from disagg.infra.launch import run_deploy
from disagg.core.plan import make_plan
from disagg.infra.inventory import load_inventory

INVENTORY = "inventories/local.py"
_TIMINGS: dict[str, float] = {}
_FIGURES: list[str] = []


@pytest.fixture(scope="session")
def local_hosts():
    hosts = testhosts.TestHosts(2)
    if not (os.environ.get("DISAGG_REUSE_HOSTS") and testhosts.STATE.exists()):
        hosts.up()
    tinymodel.write(testhosts.CACHE / "tiny-llama")
    try:
        yield [testhosts.address(1), testhosts.address(2)]
    finally:
        if not os.environ.get("DISAGG_KEEP_HOSTS"):
            hosts.down()


class Deployment:
    """What the hosts run now, as far as this session knows: the deploy
    file and --data of the last deploy, or None when unknown (a test
    changed it some other way)."""

    def __init__(self):
        self.current: tuple[str, tuple[str, ...]] | None = None
        self.deployed_once = False

    def ensure(self, deploy: str = "deploys/disagg.py", data: tuple[str, ...] | None = None):
        """Deploy unless the hosts already run `deploy` with `data` (None:
        whatever engine data they run, with the inventory's own label);
        returns the plan of what runs."""
        current = self.current
        relabeled = current is not None and any(d.startswith(("label=", "baseline_label=")) for d in current[1])
        if (current is None or current[0] != deploy or (data is None and relabeled)
                or (data is not None and current[1] != data)):  # fmt: skip
            run = run_deploy(INVENTORY, deploy, *(data or ()))
            if not self.deployed_once:
                _TIMINGS.setdefault("bare hosts to serving (first deploy of the session)", run.seconds)
            self.deployed_once = True
            self.current = (deploy, tuple(data or ()))
        return self.plan()

    def plan(self):
        deploy, data = self.current
        # values as pyinfra's --data reads them
        overrides = {k: parse_cli_arg(v) for k, v in (d.split("=", 1) for d in data)}
        label_key = "baseline_label" if deploy.endswith("baseline.py") else "label"
        return make_plan(load_inventory(INVENTORY, override_data=overrides), label_key=label_key)

    def changed(self, deploy: str | None = None, data: tuple[str, ...] = ()):
        """A test deployed something else (or None: left it unknown)."""
        self.current = None if deploy is None else (deploy, data)
        self.deployed_once = True


@pytest.fixture(scope="session")
def deployment(local_hosts) -> Deployment:
    return Deployment()


@pytest.fixture(scope="session")
def timings() -> dict[str, float]:
    """Figures, not assertions: printed at the end of the run."""
    return _TIMINGS


@pytest.fixture(scope="session")
def figures() -> list[str]:
    """Lines such as a fault's requests sent/failed, printed at the end."""
    return _FIGURES


def pytest_terminal_summary(terminalreporter):
    for name, seconds in _TIMINGS.items():
        terminalreporter.write_line(f"timing: {name}: {seconds:.1f} s")
    for line in _FIGURES:
        terminalreporter.write_line(f"fault: {line}")
