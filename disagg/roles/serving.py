"""The order in which a serving layout converges on its hosts; the deploys
for the disaggregated and the baseline layout both follow it."""

from pyinfra import host

from disagg.core import settings as S
from disagg.core.plan import Plan
from disagg.infra.facts import NvidiaPciDevices
from disagg.roles import frontdoor as door
from disagg.roles import prometheus as prom
from disagg.roles import registry
from disagg.roles.base import base
from disagg.roles.credentials import api_key
from disagg.roles.dcgm import dcgm
from disagg.roles.firewall import PACKAGES as FIREWALL_PACKAGES
from disagg.roles.firewall import firewall
from disagg.roles.keepalived import DISTRO_UNIT as KEEPALIVED_UNIT
from disagg.roles.keepalived import PACKAGES as KEEPALIVED_PACKAGES
from disagg.roles.keepalived import keepalived
from disagg.roles.model import model
from disagg.roles.nats import nats
from disagg.roles.nvidia_driver import nvidia_driver
from disagg.roles.ops import distro_unit_masked, prune_units
from disagg.roles.router import router
from disagg.roles.vllm import vllm
from disagg.roles.workers import rolled, workers, workers_healthy


def converge(plan: Plan) -> None:
    on_head = host.name == plan.cluster.head
    on_router = host.name in plan.cluster.routers
    runs_workers = bool(plan.workers_on(host.name))
    floating = on_router and bool(plan.settings.vip)
    pci = host.get_fact(NvidiaPciDevices)
    nvidia_driver(pci)
    fenced = plan.settings.firewall and plan.serves(host.name)
    # one apt run for every role's system packages
    system = list(FIREWALL_PACKAGES) if fenced else []
    if runs_workers:
        system += host.data.get("vllm_system_packages") or []
    watched = on_head and plan.settings.prometheus
    if watched:
        unit, binary = prom.DISTRO_UNIT
        distro_unit_masked(name="Keep the package's own Prometheus from starting", unit=unit, binary=binary)
        system += prom.PACKAGES
    if on_router:
        unit, binary = door.DISTRO_UNIT
        distro_unit_masked(name="Keep the package's own HAProxy from starting", unit=unit, binary=binary)
        system += door.PACKAGES
    if floating:
        unit, binary = KEEPALIVED_UNIT
        distro_unit_masked(name="Keep the package's own keepalived from starting", unit=unit, binary=binary)
        system += KEEPALIVED_PACKAGES
    users = [S.HEARTBEAT_USER] if runs_workers else []
    users += [S.SYNC_USER, S.ROUTER_USER] if on_router else []
    base(also=tuple(system), users=tuple(users))
    if fenced:
        firewall(plan)
    if runs_workers and plan.settings.prometheus:
        dcgm(plan, pci)
    runtime = registry.runtime(plan) if plan.serves(host.name) else []
    if host.name in plan.cluster.nats:
        nats(plan)
    if on_router:
        # with NATS: a new password or CA must not leave the sync outside it
        # while the workers roll (each roll waits for the sync's report)
        registry.router_sync(plan, changed_by=runtime)
    key = api_key(plan) if plan.serves(host.name) else []
    engine = vllm(plan) if runs_workers else []
    if runs_workers:
        model(plan)
    # before starting anything, so that the old layout frees its GPUs and ports
    prune_units(name="Remove units of other layouts", keep=plan.units_on(host.name))
    waves = workers(plan, runtime, [*engine, *key]) if runs_workers else []
    if watched:
        prom.prometheus(plan)
    if on_router:
        router(plan, changed_by=key)
        door.frontdoor(plan)
    if floating:
        keepalived(plan)
    if runs_workers:
        rolled(plan, waves)
    # after the head's services: they install while the engines load
    if runs_workers:
        workers_healthy(plan)
    if on_head:
        registry.readiness(plan)
    elif on_router:
        registry.front_door_ready(plan)
