"""vllm-router on each router host: PD mode with its members found through
service discovery (fed from the registry by roles/registry.py), or
--worker-urls for the baseline; Prometheus metrics on."""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta

from disagg.core import settings as S
from disagg.core import units
from disagg.core.plan import Plan
from disagg.roles.ops import put_files, python_packages, unit_running, wait_healthy

DEFAULTS = S.role_defaults("router_package")


@deploy("vllm-router", data_defaults=DEFAULTS)
def router(plan: Plan, changed_by: list[OperationMeta]):
    """`changed_by`: the API key's write, which restarts it."""
    python_packages(S.ROUTER_VENV, [host.data.get("router_package")])
    rendered = units.router_files(plan, host.name)
    unit_running(
        name=f"Run {S.ROUTER_UNIT}",
        unit=S.ROUTER_UNIT,
        changed_by=[*changed_by, *put_files(rendered)],
        files=[*rendered, *units.api_key_env(plan)],
    )
    wait_healthy(
        name="Router up",
        unit=S.ROUTER_UNIT,
        url=f"{plan.router_internal_url(host.name)}/health",
        timeout=120,
        # in PD mode it says 503 "Waiting for discovered workers" until the
        # registry sync has sent it some; the readiness gate waits for 200
        answers=(200, 503) if plan.topology.disaggregated else (200,),
    )
