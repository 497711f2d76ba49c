"""The front door on each router host: HAProxy from the distribution (bookworm 2.6,
jammy 2.4, noble 2.8: each has L7 retries and its Prometheus exporter
built in) on the clients' port, before vllm-router (its own port internal
since). It retries a request that failed before its answer started,
passes inference paths only, asks clients' keys, speaks TLS when data
asks. The package's own unit is masked before its first install; ours runs
it as its own user with our config. A config, key or certificate change
reloads it (no request cut); a unit change restarts it. Its sockets are
systemd's (disagg-frontdoor.socket): a client who connects while it
restarts, after a crash too, waits instead of being refused."""

import shlex
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files

from disagg.core import pki, units
from disagg.core import settings as S
from disagg.core.errors import InventoryError
from disagg.core.plan import Plan
from disagg.roles.ops import (
    commands_if_changed,
    directories,
    put_files,
    put_unit_apart,
    resolved,
    secret_file,
    service_user,
    socket_listening,
    unit_running,
    wait_healthy,
)

PACKAGES = ("haproxy",)
DISTRO_UNIT = ("haproxy.service", "/usr/sbin/haproxy")


def client_tls(plan: Plan) -> str | None:
    """The clients' certificate and key as one PEM: data's files (read on
    the controller), or issued by the deployment's CA for client_tls_names."""
    s = plan.settings
    if s.client_tls_cert:
        try:
            return Path(s.client_tls_cert).read_text() + Path(s.client_tls_key).read_text()
        except OSError as e:
            raise InventoryError(
                f"inventory data 'client_tls_cert'/'client_tls_key': cannot read {e.filename} "
                f"on this controller ({e.strerror}); give PEM files this controller reads"
            ) from None
    if s.client_tls_names:
        bundle = pki.ensure(plan.cluster.head, list(s.client_tls_names), server="frontdoor")
        return bundle.server_cert + bundle.server_key
    return None


@deploy("Front door")
def frontdoor(plan: Plan):
    s = plan.settings
    service_user(name=f"Service user {S.FRONTDOOR_USER}", user=S.FRONTDOOR_USER, home=S.FRONTDOOR_DIR)
    directories(name=f"Directory {S.FRONTDOOR_DIR}", wanted={S.FRONTDOOR_DIR: (S.FRONTDOOR_USER, "750")})
    secrets = []
    if s.client_api_keys:
        secrets.append(
            secret_file(
                name="Client API keys",
                path=units.FRONTDOOR_KEYS,
                owner=S.FRONTDOOR_USER,
                content="".join(f"Bearer {key}\n" for key in s.client_api_keys),
            )
        )
    else:
        files.file(name="No client API keys", path=units.FRONTDOOR_KEYS, present=False)
    pem = client_tls(plan)
    if pem:
        secrets.append(
            secret_file(
                name="Client TLS certificate and key", path=units.FRONTDOOR_TLS, owner=S.FRONTDOOR_USER, content=pem
            )
        )
    else:
        files.file(name="No client TLS", path=units.FRONTDOOR_TLS, present=False)
    # systemd binds the sockets, and takes no name: the host resolves it now
    addresses = resolved(
        units.frontdoor_names(plan, host.name),
        "(where the front door listens); give router_address or the host's address as an IP, "
        "or make the name resolve here",
    )
    rendered = units.frontdoor_files(plan, host.name, addresses)
    socket_path = units.unit_path(S.FRONTDOOR_UNIT, "socket")
    socket_text = rendered.pop(socket_path)
    socket = put_files({socket_path: socket_text})
    unit, config = put_unit_apart(rendered, S.FRONTDOOR_UNIT)
    # a config HAProxy would refuse stops the deploy before the reload (the running one keeps serving)
    sockets = socket_text.count("\nListenStream=")
    commands_if_changed(name="haproxy -c", commands=[_check(sockets)], changed_by=[*config, *secrets])
    socket_listening(name=f"Listen on {S.FRONTDOOR_UNIT}.socket", unit=S.FRONTDOOR_UNIT, changed_by=socket)
    unit_running(
        name=f"Run {S.FRONTDOOR_UNIT}", unit=S.FRONTDOOR_UNIT, changed_by=unit, reloaded_by=[*config, *secrets]
    )
    # `systemctl reload` returns once HAProxy was signalled: the deploy goes on when the
    # process answering (a new one) started after the files it reads were written
    commands_if_changed(
        name="Front door on its new files", commands=[_serving_since_written(plan)], changed_by=[*config, *secrets]
    )
    wait_healthy(
        name="Front door up",
        unit=S.FRONTDOOR_UNIT,
        url=f"http://{plan.frontdoor_metrics_hostport(host.name)}/metrics",
        timeout=60,
    )


# HAProxy checks that each `bind fd@N` is a socket: the check gets stand-ins
# on loopback at 3, 4, ... (systemd's are the running front door's)
_STAND_INS = (
    "import os, socket, sys\n"
    "n = int(sys.argv[1])\n"
    "held = [socket.socket() for _ in range(n)]\n"
    "for i, s in enumerate(held):\n"
    "    s.bind(('127.0.0.1', 0))\n"
    "    os.dup2(s.fileno(), 100 + i)\n"
    "for i in range(n):\n"
    "    os.dup2(100 + i, 3 + i)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _check(sockets: int) -> str:
    """haproxy -c of the new config, as the front door's user."""
    return (
        f"cd / && runuser -u {S.FRONTDOOR_USER} -- /usr/bin/python3 -c {shlex.quote(_STAND_INS)} {sockets} "
        f"haproxy -c -q -f {units.FRONTDOOR_CONF}"
    )


def _serving_since_written(plan: Plan, timeout: int = 60) -> str:
    paths = " ".join((units.FRONTDOOR_CONF, units.FRONTDOOR_KEYS, units.FRONTDOOR_TLS))
    started = (
        f"curl -s -m 2 http://{plan.frontdoor_metrics_hostport(host.name)}/metrics | "
        'awk \'$1 == "haproxy_process_start_time_seconds" { printf "%d", $2 }\''
    )
    return (
        f"written=$(stat -c %Y {paths} 2>/dev/null | sort -n | tail -1); deadline=$(( $(date +%s) + {timeout} )); "
        f'until [ "$({started})" -ge "$written" ] 2>/dev/null; do '
        f"if [ $(date +%s) -ge $deadline ]; then echo 'the front door did not take its new files within {timeout} s' >&2; "
        "exit 1; fi; sleep 0.2; done"
    )
