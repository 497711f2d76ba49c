"""Test hosts and one shared deployment for the end-to-end tests, booted
once per session and removed afterwards, also when a test fails or the run
is interrupted.

No test depends on another having run: each asks `deployment.ensure(...)`
for the layout it needs (by default the inventory as it is), which deploys
it only when the hosts do not already run it (a test that changes the
layout says so with `changed()`). DISAGG_E2E_ORDER=reverse runs the tests
in reverse order, to show it.

DISAGG_KEEP_HOSTS=1 leaves them up after the run (to look around);
DISAGG_REUSE_HOSTS=1 uses hosts that are already up instead of new ones."""

from __future__ import annotations

import os

import pytest
from pyinfra_cli.util import parse_cli_arg

from disagg.core.plan import make_plan
from disagg.infra.inventory import load_inventory
from disagg.infra.launch import run_deploy
from disagg.lab import testhosts, tinymodel

INVENTORY = "inventories/local.py"
# three hosts: the single-head layout uses the first two, the HA layout all
HOSTS = 3
_TIMINGS: dict[str, float] = {}
_FIGURES: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def controller_state(tmp_path_factory):
    """The controller's state (the deployments' CAs, disagg/core/pki.py) for
    the session's one deployment, not the user's (unless DISAGG_STATE_DIR
    says where: to keep it across runs on hosts kept up)."""
    if os.environ.get("DISAGG_STATE_DIR"):
        yield os.environ["DISAGG_STATE_DIR"]
        return
    os.environ["DISAGG_STATE_DIR"] = str(tmp_path_factory.mktemp("controller-state"))
    yield os.environ["DISAGG_STATE_DIR"]
    del os.environ["DISAGG_STATE_DIR"]


@pytest.fixture(scope="session")
def test_hosts() -> testhosts.TestHosts:
    return testhosts.TestHosts(HOSTS)


@pytest.fixture(scope="session")
def local_hosts(test_hosts):
    hosts = test_hosts
    if not (os.environ.get("DISAGG_REUSE_HOSTS") and testhosts.STATE.exists()):
        hosts.up()
    tinymodel.write(testhosts.CACHE / "tiny-llama")
    try:
        yield [testhosts.address(i) for i in range(1, HOSTS + 1)]
    finally:
        if not os.environ.get("DISAGG_KEEP_HOSTS"):
            hosts.down()


class Deployment:
    """What the hosts run now, as far as this session knows: the
    inventory, deploy file and --data of the last deploy, or None when
    unknown (a test changed it some other way)."""

    def __init__(self):
        self.current: tuple[str, str, tuple[str, ...]] | None = None
        self.deployed_once = False

    def ensure(self, deploy: str = "deploys/disagg.py", data: tuple[str, ...] = (), inventory: str = INVENTORY):
        """Deploy unless the hosts already run `deploy` of `inventory` with
        exactly `data` (--data overrides; none: the inventory as it is), so
        that a test sees the same layout alone, after any other or in any
        order; returns the plan of what runs."""
        if self.current != (inventory, deploy, tuple(data)):
            run = run_deploy(inventory, deploy, *data)
            if not self.deployed_once:
                _TIMINGS.setdefault("bare hosts to serving (first deploy of the session)", run.seconds)
            else:
                _TIMINGS[f"{self.current and self.current[0]} -> {inventory} (one layout to another)"] = run.seconds
            self.deployed_once = True
            self.current = (inventory, deploy, tuple(data))
        return self.plan()

    @property
    def data(self) -> tuple[str, ...]:
        """The --data of the last deploy."""
        return self.current[2]

    def plan(self):
        inventory, deploy, data = self.current
        # values as pyinfra's --data reads them
        overrides = {k: parse_cli_arg(v) for k, v in (d.split("=", 1) for d in data)}
        label_key = "baseline_label" if deploy.endswith("baseline.py") else "label"
        return make_plan(load_inventory(inventory, override_data=overrides), label_key=label_key)

    def changed(self, deploy: str | None = None, data: tuple[str, ...] = ()):
        """A test deployed something else of the default inventory (or None: left it unknown)."""
        self.current = None if deploy is None else (INVENTORY, deploy, data)
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


def pytest_collection_modifyitems(items):
    # the HA layout's tests together, last: one change of layout, not one per test
    items.sort(key=lambda item: item.path.name == "test_ha.py")
    if os.environ.get("DISAGG_E2E_ORDER") == "reverse":
        items.reverse()


def pytest_terminal_summary(terminalreporter):
    for name, seconds in _TIMINGS.items():
        terminalreporter.write_line(f"timing: {name}: {seconds:.1f} s")
    for line in _FIGURES:
        terminalreporter.write_line(f"fault: {line}")
