"""keepalived on the router hosts (data vip): VRRP keeps the clients'
floating address on one router host whose front door answers, and moves
it to another within seconds when that host, its front door or its link
fails. keepalived from the distribution (bookworm 2.2.7); the package's own
unit is masked before its first install, ours runs our config. A config
change reloads it (the address stays where it is)."""

from pyinfra import host
from pyinfra.api import deploy

from disagg.core import settings as S
from disagg.core import units
from disagg.core.plan import Plan
from disagg.roles.ops import commands_if_changed, put_unit_apart, unit_running

PACKAGES = ("keepalived",)
DISTRO_UNIT = ("keepalived.service", "/usr/sbin/keepalived")


@deploy("Floating client address")
def keepalived(plan: Plan):
    rendered = units.keepalived_files(plan, host.name)
    unit, config = put_unit_apart(rendered, S.KEEPALIVED_UNIT)
    # a config keepalived would refuse stops the deploy before the reload; 2.2.7 ends a
    # passed test killed by its own SIGTERM (143), a failed one with 5
    test = f"keepalived --config-test --use-file {S.KEEPALIVED_CONF}; rc=$?; [ $rc = 0 ] || [ $rc = 143 ]"
    commands_if_changed(name="keepalived --config-test", commands=[test], changed_by=config)
    unit_running(
        name=f"Run {S.KEEPALIVED_UNIT}",
        unit=S.KEEPALIVED_UNIT,
        changed_by=unit,
        reloaded_by=config,
        files=list(rendered),
    )
