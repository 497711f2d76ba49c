"""What every host of ours needs: base packages, the service user, our directories."""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt

from disagg.core import settings as S
from disagg.roles.ops import directories, service_user

DEFAULTS = S.role_defaults("base_packages")


@deploy("disagg base", data_defaults=DEFAULTS)
def base(also: tuple[str, ...] = (), users: tuple[str, ...] = ()):
    """`also`: packages other roles need, in the same apt run; `users`: the
    service users this host's services run as besides SERVICE_USER (before
    the firewall: its rules name them)."""
    apt.packages(
        name="Install base packages",
        packages=[*host.data.get("base_packages"), *also],
        update=True,
        cache_time=3600,
        # e.g. prometheus recommends prometheus-node-exporter, a service on *:9100
        no_recommends=True,
    )
    service_user(name=f"Service user {S.SERVICE_USER}", user=S.SERVICE_USER, home=S.STATE_DIR)
    for user in users:
        service_user(name=f"Service user {user}", user=user, home="/nonexistent")
    wanted = {S.CONFIG_DIR: ("root", "755"), S.OPT_DIR: ("root", "755"), S.STATE_DIR: ("root", "755")}
    directories(name=f"Directories {', '.join(wanted)}", wanted=wanted)
