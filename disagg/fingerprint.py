"""What a deployment is, read from its hosts, for a benchmark's provenance:
the sha256 of every unit, env and config file of ours that the plan puts
on each host (as the host has it), and the vLLM, NIXL, router and driver
versions there; one short hash of it all names the deployment, so that a
Pareto point is tied to exactly what ran."""

from __future__ import annotations

import hashlib
import json
import logging

from . import settings as S
from .plan import Plan
from .units import host_units


def read(state, plan: Plan) -> dict:
    """{"hash", "hosts": {host: {"files": {path: sha256}, "missing": [...],
    "versions": {...}}}} with pyinfra's connections in state."""
    import gevent
    from pyinfra.api.facts import get_fact
    from pyinfra.context import ctx_host, ctx_state

    from .facts import DeployedFiles

    names = sorted({w.host for w in plan.workers} | {plan.cluster.head})
    # the paths do not depend on who deploys (only the firewall's content does)
    paths = {name: tuple(sorted(host_units(plan, name))) for name in names}

    def one(name: str) -> dict:
        host = state.inventory.get_host(name)
        with ctx_state.use(state), ctx_host.use(host):
            return get_fact(state, host, DeployedFiles,
                            kwargs={"paths": paths[name], "engine_venv": S.VLLM_VENV, "router_venv": S.ROUTER_VENV})  # fmt: skip

    logging.getLogger("pyinfra").setLevel(logging.ERROR)
    reads = {name: gevent.spawn(one, name) for name in names}
    gevent.joinall(list(reads.values()), raise_error=True)
    hosts = {}
    for name in names:
        found = reads[name].value
        hosts[name] = {"files": found["files"], "missing": [p for p in paths[name] if p not in found["files"]],
                       "versions": found["versions"]}  # fmt: skip
    digest = hashlib.sha256(json.dumps(hosts, sort_keys=True).encode()).hexdigest()[:16]
    return {"hash": digest, "hosts": hosts}


def of_inventory(inventory, plan: Plan) -> dict:
    from pyinfra.api import Config, State

    state = State(inventory, Config())
    try:
        return read(state, plan)
    finally:
        for host in inventory:
            host.disconnect()
