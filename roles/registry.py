"""The NATS control plane's units (disagg/registry.py is what they run): a
heartbeat companion beside every worker, the router sync on the head, and
the readiness gate that ends a deploy. They share one small venv and our
registry module, and read the NATS password from the root-only env file."""

from __future__ import annotations

import secrets
import shlex

from pyinfra import host, state
from pyinfra.api import deploy, operation
from pyinfra.api.operation import OperationMeta

from disagg import settings as S
from disagg import units
from disagg.facts import CommandSucceeds, EnvFileValue
from disagg.plan import Plan
from roles.ops import put_files, python_packages, secret_env, unit_running

DEFAULTS = {
    "agent_packages": ["nats-py==2.16.0", "pyzmq==27.3.0", "msgpack==1.2.4"],
    # None: the head's current password, else one generated for this deploy
    "nats_password": None,
    "ready_timeout": 300,
}

# one generated password per head for this process: the deploy file runs
# once per host, and every host must get the same one
_generated: dict[str, str] = {}


def nats_password(plan: Plan) -> str:
    """The inventory's nats_password, else the one the head already has,
    else a new random one."""
    given = host.data.get("nats_password")
    if given is not None:
        return str(given)
    head = state.inventory.get_host(plan.cluster.head)
    # -vv prints fact output: never this one
    printing, state.print_fact_output = state.print_fact_output, False
    try:
        current = head.get_fact(EnvFileValue, path=units.NATS_SECRET_ENV, variable=units.NATS_PASSWORD_ENV)
    finally:
        state.print_fact_output = printing
    if current:
        return current
    return _generated.setdefault(plan.cluster.head, secrets.token_hex(24))


@deploy("Registry runtime", data_defaults=DEFAULTS)
def runtime(plan: Plan) -> list[OperationMeta]:
    """NATS credentials, the venv and our registry module: what every registry unit
    on this host needs. Returns the operations whose change restarts them."""
    secret = secret_env(
        name="NATS credentials",
        path=units.NATS_SECRET_ENV,
        variable=units.NATS_PASSWORD_ENV,
        value=nats_password(plan),
    )
    python_packages(S.AGENT_VENV, host.data.get("agent_packages"))
    return [secret, *put_files(units.agent_script())]


@deploy("Registry heartbeats")
def agents(plan: Plan, changed_by: list[OperationMeta]):
    for w in plan.workers_on(host.name):
        written = put_files(units.agent_files(plan, w))
        unit_running(name=f"Run {w.agent_unit}", unit=w.agent_unit, changed_by=[*changed_by, *written])


@deploy("Router sync and readiness gate", data_defaults=DEFAULTS)
def router_sync(plan: Plan, changed_by: list[OperationMeta]):
    written = put_files(units.sync_files(plan))
    unit_running(name=f"Run {S.SYNC_UNIT}", unit=S.SYNC_UNIT, changed_by=[*changed_by, *written])
    registry_ready(
        name="Every worker registered, healthy and routed",
        check=_on_head(plan.status_command()),
        wait=_on_head(plan.status_command(timeout=int(host.data.get("ready_timeout")))),
    )


def _on_head(args: list[str]) -> str:
    # the password comes from the root-only file inside the shell, never the command line
    return f"set -a && . {units.NATS_SECRET_ENV} && set +a && {shlex.join(args)}"


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
