"""One systemd unit per vLLM worker placed on this host, from one template;
only units whose unit or env file changed are restarted."""

from pyinfra import host
from pyinfra.api import deploy

from disagg import units
from disagg.plan import Plan
from roles.ops import put_files, unit_running, wait_healthy


@deploy("disagg workers")
def workers(plan: Plan):
    mine = plan.workers_on(host.name)
    written = {w.unit: put_files(units.worker_files(plan, w)) for w in mine}
    # start them all before waiting, so that workers on one host load together
    for w in mine:
        unit_running(name=f"Run {w.unit}", unit=w.unit, changed_by=written[w.unit])
    for w in mine:
        wait_healthy(
            name=f"{w.unit} healthy",
            unit=w.unit,
            url=f"{w.url}/health",
            timeout=plan.settings.health_timeout,
        )
