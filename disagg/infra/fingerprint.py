"""What a deployment is, read from its hosts, for a benchmark's provenance:
the sha256 of every unit, env and config file of ours that the plan puts
on each host (as the host has it), and the vLLM, NIXL, router and driver
versions there; one short hash of it all names the deployment, so that a
Pareto point is tied to exactly what ran."""

from __future__ import annotations

import hashlib
import json

from disagg.core import settings as S
from disagg.core.plan import Plan
from disagg.core.units import host_units


def read(state, plan: Plan) -> dict:
    """{"hash", "hosts": {host: {"files": {path: sha256}, "missing": [...],
    "versions": {...}}}} with pyinfra's connections in state."""
    from disagg.infra import remote
    from disagg.infra.facts import DeployedFiles

    names = plan.serving_hosts
    # the paths do not depend on who deploys (only the firewall's content does)
    paths = {name: tuple(sorted(host_units(plan, name))) for name in names}
    found = remote.facts(
        state,
        names,
        DeployedFiles,
        lambda name: {"paths": paths[name], "engine_venv": S.VLLM_VENV, "router_venv": S.ROUTER_VENV},
    )
    hosts = {}
    for name in names:
        files = found[name]["files"]
        hosts[name] = {
            "files": files,
            "missing": [p for p in paths[name] if p not in files],
            "versions": found[name]["versions"],
        }
    digest = hashlib.sha256(json.dumps(hosts, sort_keys=True).encode()).hexdigest()[:16]
    return {"hash": digest, "hosts": hosts}


def of_inventory(inventory, plan: Plan) -> dict:
    from disagg.infra import remote

    with remote.connected(inventory) as state:
        return read(state, plan)
