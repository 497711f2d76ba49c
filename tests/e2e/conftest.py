"""Test hosts for the end-to-end tests: booted once per session and removed
afterwards, also when a test fails or the run is interrupted.

DISAGG_KEEP_HOSTS=1 leaves them up after the run (to look around);
DISAGG_REUSE_HOSTS=1 uses hosts that are already up instead of new ones."""

import os

import pytest

from disagg import testhosts, tinymodel

_TIMINGS: dict[str, float] = {}


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


@pytest.fixture(scope="session")
def bench_out(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="session")
def timings() -> dict[str, float]:
    """Figures, not assertions: printed at the end of the run."""
    return _TIMINGS


def pytest_terminal_summary(terminalreporter):
    for name, seconds in _TIMINGS.items():
        terminalreporter.write_line(f"timing: {name}: {seconds:.1f} s")
