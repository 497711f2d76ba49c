"""The deployment's secrets on its hosts: the NATS password, the workers'
API key, and TLS for NATS (the CA certificate everywhere, the server's
certificate and key on the head); the certificates are written by the
roles with the files beside them, in the same operation. Each secret is
the inventory's, else the one the head already has, else a new one; its
file is rewritten only when its content differs, and its owner and mode
are enforced on every run."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from pyinfra import host, state
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files

from disagg.agent import envfile, kv
from disagg.core import pki, units
from disagg.core import settings as S
from disagg.core.plan import Plan
from disagg.infra.facts import EnvFileValue
from disagg.roles.ops import secret_file

DEFAULTS = S.role_defaults("nats_password", "api_key")
API_KEY_VARIABLES = ("VLLM_API_KEY", "OPENAI_API_KEY")

# one generated value per head and secret for this process: the deploy file
# runs once per host, and every host must get the same one
_generated: dict[tuple[str, str], str] = {}


def shared_secret(plan: Plan, data_key: str, path: str, variable: str) -> str:
    """Data `data_key`, else the head's current value in path, else new."""
    given = host.data.get(data_key)
    if given is not None:
        return str(given)
    head = state.inventory.get_host(plan.cluster.head)
    # -vv prints fact output: never this one
    printing, state.print_fact_output = state.print_fact_output, False
    try:
        current = head.get_fact(EnvFileValue, path=path, variable=variable)
    finally:
        state.print_fact_output = printing
    if current:
        return current
    return _generated.setdefault((plan.cluster.head, data_key), secrets.token_hex(24))


def tls_bundle(plan: Plan) -> pki.Bundle:
    """The CA and NATS's certificate for every NATS host's address (one
    certificate: each server presents it to clients and to its cluster
    peers), from the controller's state directory (made there on first use)."""
    return pki.ensure(plan.cluster.head, [plan.cluster.host(n).address for n in plan.cluster.nats])


def _nats_password(plan: Plan) -> str:
    return shared_secret(plan, "nats_password", units.NATS_SECRET_ENV, units.NATS_PASSWORD_ENV)


def nats_password(plan: Plan) -> OperationMeta:
    """The admin password, on the head (status, the readiness gate): the
    other users' passwords derive from it."""
    password = _nats_password(plan)
    return secret_file(
        name="NATS password", path=units.NATS_SECRET_ENV, content=envfile.text({units.NATS_PASSWORD_ENV: password})
    )


def restricted_users(plan: Plan) -> list[tuple[str, str, dict]]:
    """(user, password, permissions) of the NATS users that may not do
    everything: the sync and each worker's heartbeat. Passwords derived
    from the NATS password: a new one rotates them all, and the deploy
    keeps no more secrets."""
    secret = _nats_password(plan).encode()
    users = [
        (kv.SYNC_USER, kv.sync_permissions()),
        *((kv.heartbeat_user(w.url), kv.heartbeat_permissions(w.url)) for w in plan.workers),
    ]
    return [
        (user, hmac.new(secret, user.encode(), hashlib.sha256).hexdigest(), permissions) for user, permissions in users
    ]


def _password_files(plan: Plan, files: dict[str, str]) -> list[OperationMeta]:
    """{env file: NATS user}: each file with that user's password."""
    passwords = {user: password for user, password, _ in restricted_users(plan)}
    return [
        secret_file(
            name=f"NATS password of {user}", path=path, content=envfile.text({units.NATS_PASSWORD_ENV: passwords[user]})
        )
        for path, user in files.items()
    ]


def heartbeat_passwords(plan: Plan, on: str) -> list[OperationMeta]:
    """The own password of each heartbeat on host `on`."""
    return _password_files(plan, {plan.heartbeat_env(w): kv.heartbeat_user(w.url) for w in plan.workers_on(on)})


def sync_password(plan: Plan) -> OperationMeta:
    """The sync's own password (the head)."""
    return _password_files(plan, {units.SYNC_ENV: kv.SYNC_USER})[0]


def ca_files(plan: Plan) -> dict[str, str]:
    """The CA certificate, which every NATS client verifies the server with."""
    return {S.CA_CERT: tls_bundle(plan).ca_cert}


def nats_certificate_files(plan: Plan) -> dict[str, str]:
    return {S.NATS_CERT: tls_bundle(plan).server_cert}


def nats_server_auth(plan: Plan) -> OperationMeta:
    """The server's user and password (the head), readable by the NATS user alone."""
    return secret_file(
        name="NATS server password",
        path=units.NATS_AUTH_CONF,
        owner=S.NATS_USER,
        content=units.nats_auth_text(plan.settings.nats_user, _nats_password(plan), restricted_users(plan)),
    )


def nats_key(plan: Plan) -> OperationMeta:
    """The server's key, readable by the NATS user alone (the head)."""
    return secret_file(name="NATS server key", path=S.NATS_KEY, content=tls_bundle(plan).server_key, owner=S.NATS_USER)


@deploy("Worker API key", data_defaults=DEFAULTS)
def api_key(plan: Plan) -> list[OperationMeta]:
    """The key the workers demand (VLLM_API_KEY) and the router sends
    (OPENAI_API_KEY), on the hosts of a disaggregated layout; removed
    elsewhere. Returns the operations whose change restarts workers and router."""
    if not plan.topology.disaggregated:
        files.file(name=f"No {S.API_KEY_ENV}", path=S.API_KEY_ENV, present=False)
        return []
    key = shared_secret(plan, "api_key", S.API_KEY_ENV, API_KEY_VARIABLES[0])
    return [
        secret_file(name="API key", path=S.API_KEY_ENV, content=envfile.text(dict.fromkeys(API_KEY_VARIABLES, key)))
    ]
