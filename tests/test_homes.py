"""The homes by concern hold: the planning core and the host agent import
no pyinfra, and the agent nothing of disagg outside itself (it is shipped
to the hosts as plain files)."""

import json
import subprocess
import sys

import pytest

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import disagg.{home} as home
for m in pkgutil.walk_packages(home.__path__, "disagg.{home}."):
    if m.name != "disagg.agent.__main__":
        importlib.import_module(m.name)
print(json.dumps(sorted(sys.modules)))
"""


def imported_by(home: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL.format(home=home)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize("home", ["core", "agent"])
def test_the_core_and_the_agent_import_no_pyinfra(home):
    modules = imported_by(home)
    assert f"disagg.{home}.plan" in modules or f"disagg.{home}.kv" in modules  # it did import them
    assert not [m for m in modules if m.split(".")[0] in ("pyinfra", "pyinfra_cli", "gevent")]


def test_the_agent_imports_nothing_of_disagg_outside_itself():
    ours = [m for m in imported_by("agent") if m.split(".")[0] == "disagg"]
    assert "disagg.agent.sync" in ours
    assert [m for m in ours if m != "disagg" and not m.startswith("disagg.agent")] == []
