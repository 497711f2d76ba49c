"""Preflight as the first step of a deploy: every check of disagg/preflight
against every host of the layout, once per run and before any operation on
any host; a problem stops the deploy with all problems listed."""

from pyinfra import logger
from pyinfra.context import ctx_state

from disagg.core import packages
from disagg.core.errors import HostError, UsageError
from disagg.core.plan import Plan
from disagg.infra import preflight

# pyinfra runs the deploy file once per host: check once per run
_checked: set[int] = set()


def gate(plan: Plan) -> None:
    state = ctx_state.get()  # the State itself, not pyinfra's proxy of it
    if id(state) in _checked:
        return
    _checked.add(id(state))
    limited = {h.name for h in state.limit_hosts or ()}
    placing = limited and any(plan.workers_on(h) for h in limited)
    needed = list(dict.fromkeys([plan.cluster.head, *plan.cluster.routers]))
    if placing and (left_out := [n for n in needed if n not in limited]):
        raise UsageError(
            f"--limit leaves out {', '.join(left_out)} (the head and the router hosts): their registry syncs route "
            f"only the workers of the layout they were given last; add --limit {','.join(left_out)}"
        )
    if placing and (servers := [n for n in plan.cluster.nats if n not in limited]):
        # a NATS server may be down: a scale-out goes on with the others (the head's is among them)
        logger.warning(
            f"--> --limit leaves out NATS host(s) {', '.join(servers)}: their servers admit a new worker's "
            "heartbeat only once deployed; it uses the other servers until then"
        )
    if plan.engine_plugin:
        for name in sorted({w.host for w in plan.workers}):
            mismatch = packages.plugin_mismatch(state.inventory.get_host(name).data)
            if mismatch:
                # not fatal: the plugin disables itself on the hosts, loudly
                logger.warning(
                    f"--> preflight: {name}: {mismatch}: it will patch nothing (no re-handshake of a "
                    "disconnected NIXL peer, nixl_progress_thread=false has no effect)"
                )
    if not plan.settings.preflight:
        logger.warning("--> preflight skipped: inventory data preflight=false")
        return
    report = preflight.run(state, plan)
    for reason in report.skipped:
        logger.info(f"--> preflight: skipped {reason}")
    if not report.ok:
        lines = "\n".join(p.line() for p in report.problems)
        raise HostError(f"preflight found {len(report.problems)} problem(s); nothing was changed:\n{lines}")
    logger.info(f"--> preflight: {plan.label} fits its hosts ({report.seconds:.1f} s)")
