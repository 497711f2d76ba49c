"""The NATS control plane's runtime (the host agent, disagg/agent, is what
its units run): credentials and the agent's venv and files on every host of
the layout; the router sync and the readiness gate on the head. The
heartbeat companions are started with their workers (roles/workers.py)."""

from __future__ import annotations

import json
import shlex
import urllib.parse

from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files

from disagg.agent import net
from disagg.core import settings as S
from disagg.core import units
from disagg.core.plan import Plan
from disagg.infra.facts import CommandSucceeds
from disagg.roles.credentials import DEFAULTS as CREDENTIALS
from disagg.roles.credentials import ca_files, nats_password, sync_password
from disagg.roles.ops import directories, put_files, python_packages, unit_running

DEFAULTS = S.role_defaults("agent_packages", "ready_timeout")


@deploy("Registry runtime", data_defaults={**DEFAULTS, **CREDENTIALS})
def runtime(plan: Plan) -> list[OperationMeta]:
    """The NATS admin password on the head alone (status, the readiness
    gate: no unit reads it), the CA, the venv and the host agent's files.
    Returns the operations whose change restarts every agent unit on this
    host; each heartbeat's own password restarts it alone (workers())."""
    if host.name == plan.cluster.head:
        nats_password(plan)
    else:  # a worker host's agents use their own users: no admin password there (releases before left one)
        files.file(name="No NATS admin password", path=units.NATS_SECRET_ENV, present=False)
    python_packages(S.AGENT_VENV, host.data.get("agent_packages"))
    return put_files(_shared(plan))


def runtime_files(plan: Plan) -> list[str]:
    """What runtime() writes that every agent unit reads."""
    return list(_shared(plan))


def _shared(plan: Plan) -> dict[str, str]:
    return {**ca_files(plan), **units.agent_code()}


@deploy("Router sync and readiness gate", data_defaults=DEFAULTS)
def router_sync(plan: Plan, changed_by: list[OperationMeta]):
    # the sync's own: its state, and what it writes and Prometheus reads (file_sd)
    wanted = {S.SYNC_DIR: (S.SYNC_USER, "750")}
    if plan.feeds_prometheus(host.name):
        wanted[S.SCRAPE_TARGETS_DIR] = (S.SYNC_USER, "755")
    # a directory made anew (one replaced a planted link) is not the one the
    # running sync's namespace has mounted writable: it restarts
    made = directories(name=f"Directories {', '.join(wanted)}", wanted=wanted)
    # before the workers start: the sync routes none that it does not name
    put_files(units.layout_file(plan))
    password = sync_password(plan)
    rendered = units.sync_files(plan, host.name)
    unit_running(
        name=f"Run {S.SYNC_UNIT}",
        unit=S.SYNC_UNIT,
        changed_by=[*changed_by, made, password, *put_files(rendered)],
        files=[*rendered, units.SYNC_ENV, *runtime_files(plan)],
    )


@deploy("Router sync and readiness gate", data_defaults=DEFAULTS)
def readiness(plan: Plan):
    timeout = int(host.data.get("ready_timeout"))
    registry_ready(
        name="Every worker registered, healthy and routed",
        # the agent reads the root-only password file itself: never a command line
        check=shlex.join(plan.status_command()),
        wait=shlex.join(plan.status_command(timeout=timeout)),
    )
    # what status cannot see: keys that do not match along the way (a 401 at a worker)
    _answered(plan, plan.router_url, "One request answered through the front door")


@deploy("Router sync and readiness gate", data_defaults=DEFAULTS)
def front_door_ready(plan: Plan):
    """On a router host other than the head: its own router has members
    (its /health answers 200) and its front door answers a request."""
    url = f"{plan.router_internal_url(host.name)}/health"
    _passes(
        "This host's router given its members by its sync",
        f"curl -s -o /dev/null -w '%{{http_code}}' -m 5 {url} | grep -qx 200",
        f"no 200 from {url}: is {S.SYNC_UNIT} running?",
    )
    _answered(plan, plan.frontdoor_url(host.name), "One request answered through this host's front door")


def _answered(plan: Plan, url: str, name: str):
    _passes(name, front_door_request(plan, url), f"no 200 from {url} (an authenticated chat completion)")


def _passes(name: str, check: str, failure: str):
    """Wait up to ready_timeout until the shell `check` passes, else fail saying `failure`."""
    timeout = int(host.data.get("ready_timeout"))
    registry_ready(
        name=name,
        check=check,
        wait=(
            f"deadline=$(( $(date +%s) + {timeout} )); until {check}; do if [ $(date +%s) -ge $deadline ]; then "
            f"echo {shlex.quote(f'{failure} within {timeout} s')} >&2; exit 1; fi; sleep 1; done"
        ),
    )


def front_door_request(plan: Plan, base: str) -> str:
    """Shell: one chat completion through the clients' port, as a client
    sends it (its key, if the front door asks one, read from the key file
    into curl's stdin: never a command line), true on a 200."""
    s = plan.settings
    body = json.dumps(
        {"model": s.served_name or s.model, "max_tokens": 1, "messages": [{"role": "user", "content": "Ready?"}]}
    )
    key = f"sed -n '1s/^/Authorization: /p' {units.FRONTDOOR_KEYS} | " if s.client_api_keys else ""
    url, tls = f"{base}/v1/chat/completions", ""
    if s.client_tls_names:  # the CA's certificate, checked as a client does, under its first name
        name, port = s.client_tls_names[0], s.router_port
        address = urllib.parse.urlsplit(base).hostname
        url = net.url("https", name, port, "/v1/chat/completions")
        tls = f"--cacert {S.CA_CERT} --connect-to {shlex.quote(f'{net.hostport(name, port)}:{net.hostport(address, port)}')} "
    elif plan.client_tls:  # data's own certificate: its CA is its clients' business
        tls = "-k "
    return (
        f"{{ {key}curl -s -o /dev/null -w '%{{http_code}}' -m 30 {tls}{'-H @- ' if key else ''}"
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)} {shlex.quote(url)} | grep -qx 200; }}"
    )


@operation()
def registry_ready(check: str, wait: str):
    """
    Wait until a check passes on the head (`disagg status`: the deployed
    topology all registered, healthy and in the router; a request through
    the front door); `wait` fails saying what is missing. Nothing to do (no
    change) when `check` already passes.

    **Example:**

    .. code:: python

        registry_ready(check=status_cmd, wait=status_cmd + " --wait --timeout 300")
    """
    if host.get_fact(CommandSucceeds, command=check):
        return
    yield f"{wait} 1>&2"
