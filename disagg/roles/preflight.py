"""Preflight as the first step of a deploy: every check of disagg/preflight
against every host of the layout, once per run and before any operation on
any host; a problem stops the deploy with all problems listed."""

from pyinfra import logger
from pyinfra.context import ctx_state

from disagg import preflight
from disagg.plan import Plan
from disagg.topology import TopologyError

# pyinfra runs the deploy file once per host: check once per run
_checked: set[int] = set()


def gate(plan: Plan) -> None:
    state = ctx_state.get()  # the State itself, not pyinfra's proxy of it
    if id(state) in _checked:
        return
    _checked.add(id(state))
    if not plan.settings.preflight:
        logger.warning("--> preflight skipped: inventory data preflight=false")
        return
    report = preflight.run(state, plan)
    for reason in report.skipped:
        logger.info(f"--> preflight: skipped {reason}")
    if not report.ok:
        lines = "\n".join(p.line() for p in report.problems)
        raise TopologyError(f"preflight found {len(report.problems)} problem(s); nothing was changed:\n{lines}")
    logger.info(f"--> preflight: {plan.label} fits its hosts ({report.seconds:.1f} s)")
