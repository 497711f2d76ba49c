"""One systemd unit per vLLM worker placed on this host, from one template,
with its registry heartbeat companion. New workers start together; running
workers whose unit or env file changed are restarted in rolling waves, never
more than max_unavailable of a role out of the router at a time. New
workers' health is gated apart (workers_healthy), so that the head's
services install while the engines load."""

import shlex

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta

from disagg.core import settings as S
from disagg.core import units
from disagg.core.plan import Plan
from disagg.core.topology import Worker
from disagg.roles.credentials import heartbeat_passwords
from disagg.roles.ops import Rolling, put_files, roll, unit_running, wait_healthy
from disagg.roles.registry import runtime_files

# after /health, a restarted worker is registered and routed within seconds
REJOIN_TIMEOUT = 120


@deploy("disagg workers")
def workers(plan: Plan, runtime: list[OperationMeta], engine: list[OperationMeta]) -> list[list[Rolling]]:
    """`runtime`: the operations whose change restarts every companion
    (the CA, the agent's files); `engine`: those that roll the
    workers (the vLLM plugin's files, the API key). New workers start here;
    returns the waves of the running ones to roll (rolled())."""
    mine = plan.workers_on(host.name)
    written = {w.unit: put_files(units.worker_files(plan, w)) for w in mine}
    companions = {w.unit: units.agent_files(plan, w) for w in mine}
    companion = {unit: put_files(rendered) for unit, rendered in companions.items()}
    # a new worker's password restarts its companion alone, not its neighbours'
    passwords = dict(zip((w.unit for w in mine), heartbeat_passwords(plan, host.name)))
    shared = runtime_files(plan)
    for w in mine:
        unit_running(name=f"Run {w.unit}", unit=w.unit, changed_by=written[w.unit], restart=False)
    for w in mine:
        # a companion alone restarting leaves its worker in the router
        unit_running(
            name=f"Run {w.agent_unit}",
            unit=w.agent_unit,
            changed_by=[*runtime, passwords[w.unit], *companion[w.unit]],
            files=[*companions[w.unit], plan.heartbeat_env(w), *shared],
        )
    return [
        [_rolling(plan, w, [*written[w.unit], *engine]) for w in wave if w.host == host.name] for wave in plan.waves()
    ]


@deploy("disagg workers")
def rolled(plan: Plan, waves: list[list[Rolling]]):
    """The rolling restarts, after the routers are set up (a rolled worker
    waits until every router lists it again: a new layout's routers must
    exist by then) and before the health gates (a running worker whose
    port moved, a relabel, answers at its new URL only once it is rolled)."""
    names = [", ".join(w.name for w in wave) for wave in plan.waves()]
    for k, (wave, name) in enumerate(zip(waves, names), 1):
        roll(name=f"Rolling restart {k}/{len(waves)}: {name}", wave=wave)


@deploy("disagg workers")
def workers_healthy(plan: Plan):
    """The health gate of every worker on this host, after the head's
    services were set up while the engines loaded."""
    for w in plan.workers_on(host.name):
        wait_healthy(name=f"{w.unit} healthy", unit=w.unit, url=f"{w.url}/health", timeout=plan.settings.health_timeout)


def _rolling(plan: Plan, w: Worker, changed_by: list[OperationMeta]) -> Rolling:
    dp = plan.topology.stage(w.role).dp
    warning = None
    if dp == 1:
        warning = (
            f"{w.unit} is the only {w.role} worker: restarting it stops serving until it is back; "
            f"add {w.role} workers (dp >= 2) to roll without loss"
        )
    elif plan.settings.max_unavailable >= dp:
        warning = (
            f"{w.unit}: max_unavailable={plan.settings.max_unavailable} restarts all {dp} {w.role} workers "
            "at once: serving stops until they are back; lower max_unavailable"
        )
    rejoin = plan.rejoin_command(w, timeout=REJOIN_TIMEOUT)
    paths = (units.unit_path(w.unit), S.env_path(w.unit))
    if plan.engine_plugin:  # code the worker loads: changed after it started = outdated
        paths += tuple(units.vllm_plugin_files())
    paths += tuple(units.api_key_env(plan))
    return Rolling(w.unit, w.url, changed_by, paths, plan.settings.health_timeout, shlex.join(rejoin), warning)
