"""The control plane seen from the controller: the registry's status for a
deployment given by its inventory, with the NATS password read from the
head over SSH (root-only there) unless DISAGG_NATS_PASSWORD is set."""

from __future__ import annotations

import asyncio

from disagg.agent import kv
from disagg.agent import status as agent_status
from disagg.core import pki
from disagg.core import settings as S
from disagg.core.errors import HostError
from disagg.core.plan import Plan


class Unreachable(HostError):
    """The head could not be asked (SSH failed): the status is unknown."""


def head_password(inventory, plan: Plan) -> str:
    """DISAGG_NATS_PASSWORD, else the head's password file, read with the
    inventory's own SSH settings; held in memory only, never printed."""
    from pyinfra.api.exceptions import PyinfraError

    from disagg.core.units import NATS_PASSWORD_ENV, NATS_SECRET_ENV
    from disagg.infra import remote
    from disagg.infra.facts import EnvFileValue

    given = kv.read_password()
    if given:
        return given
    with remote.connected(inventory) as state:
        try:
            value = remote.fact(
                state, plan.cluster.head, EnvFileValue, path=NATS_SECRET_ENV, variable=NATS_PASSWORD_ENV
            )
        except PyinfraError as e:
            raise Unreachable(f"cannot read the NATS password on the head {plan.cluster.head} over SSH: {e}") from None
    if not value:
        raise HostError(
            f"no NATS password on the head {plan.cluster.head} ({NATS_SECRET_ENV}); "
            f"deploy first, or set {NATS_PASSWORD_ENV}"
        )
    return value


def nats_server(inventory, plan: Plan) -> kv.Server:
    """The head's NATS as this controller reaches it: TLS, verified with
    the CA this controller made (disagg/core/pki.py)."""
    ca = pki.ca_file(plan.cluster.head)
    if ca is None:
        raise HostError(
            f"no CA for the deployment on {plan.cluster.head} in {pki.directory(plan.cluster.head)}: deploy from "
            f"this controller, or copy the head's {S.CA_CERT} and use --nats {plan.nats_url} --ca FILE"
        )
    return kv.Server(plan.nats_url, plan.settings.nats_user, head_password(inventory, plan), str(ca))


def expected(plan: Plan) -> list[agent_status.Expected]:
    return agent_status.parse_expected(plan.expected())


def status(inventory, plan: Plan, wait: float | None = None) -> agent_status.Status:
    """The registry, router and NATS health of plan's deployment; with
    wait, block up to that many seconds until it is ready."""
    args = (nats_server(inventory, plan), plan.router_internal_url(), expected(plan))
    kw = {"router_metrics": plan.router_metrics_url, "layout": {w.url for w in plan.workers}}
    if wait is not None:
        return asyncio.run(agent_status.wait_ready(*args, timeout=wait, **kw))
    return asyncio.run(agent_status.status(*args, **kw))
