"""The NATS control plane's runtime (the host agent, disagg/agent, is what
its units run): credentials and the agent's venv and files on every host of
the layout; the router sync and the readiness gate on the head. The
heartbeat companions are started with their workers (roles/workers.py)."""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.api.operation import OperationMeta

from disagg import packages
from disagg import settings as S
from disagg import units
from disagg.facts import CommandSucceeds
from disagg.plan import Plan
from disagg.roles.credentials import DEFAULTS as CREDENTIALS, ca_files, nats_password
from disagg.roles.ops import directories, put_files, python_packages, unit_running

DEFAULTS = {
    "agent_packages": packages.DEFAULTS["agent_packages"],
    "ready_timeout": 300,
}


@deploy("Registry runtime", data_defaults={**DEFAULTS, **CREDENTIALS})
def runtime(plan: Plan) -> list[OperationMeta]:
    """NATS credentials (password, CA), the venv and the host agent's
    files: what every agent unit on this host needs. Returns the operations
    whose change restarts them."""
    password = nats_password(plan)
    python_packages(S.AGENT_VENV, host.data.get("agent_packages"))
    return [password, *put_files({**ca_files(plan), **units.agent_code()})]


def runtime_files(plan: Plan) -> list[str]:
    """What runtime() writes: the agents' units read it."""
    return [units.NATS_SECRET_ENV, *ca_files(plan), *units.agent_code()]


@deploy("Router sync and readiness gate", data_defaults=DEFAULTS)
def router_sync(plan: Plan, changed_by: list[OperationMeta]):
    # the sync's own: its state, and what it writes and Prometheus reads (file_sd)
    wanted = {S.SYNC_DIR: (S.SYNC_USER, "750")}
    if plan.settings.prometheus:
        wanted[S.SCRAPE_TARGETS_DIR] = (S.SYNC_USER, "755")
    # a directory made anew (one replaced a planted link) is not the one the
    # running sync's namespace has mounted writable: it restarts
    made = directories(name=f"Directories {', '.join(wanted)}", wanted=wanted)
    # before the workers start: the sync routes none that it does not name
    put_files(units.layout_file(plan))
    rendered = units.sync_files(plan)
    unit_running(name=f"Run {S.SYNC_UNIT}", unit=S.SYNC_UNIT, changed_by=[*changed_by, made, *put_files(rendered)],
                 files=[*rendered, *runtime_files(plan)])  # fmt: skip


@deploy("Router sync and readiness gate", data_defaults=DEFAULTS)
def readiness(plan: Plan):
    registry_ready(
        name="Every worker registered, healthy and routed",
        # the agent reads the root-only password file itself: never a command line
        check=shlex.join(plan.status_command()),
        wait=shlex.join(plan.status_command(timeout=int(host.data.get("ready_timeout")))),
    )


@operation()
def registry_ready(check: str, wait: str):
    """
    Wait until `disagg status` on the head says the deployed topology is all
    registered, healthy and in the router; fail with its table naming what
    is missing. Nothing to do (no change) when it already is.

    **Example:**

    .. code:: python

        registry_ready(check=status_cmd, wait=status_cmd + " --wait --timeout 300")
    """
    if host.get_fact(CommandSucceeds, command=check):
        return
    yield f"{wait} 1>&2"
