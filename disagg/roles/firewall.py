"""nftables on every host of the layout: the rules disagg/firewall.py makes
from the placement, in our own table, loaded by a oneshot unit (so they
come back at boot). With data firewall=false nothing is installed, and a
unit from an earlier deploy is pruned like any other: its stop deletes our
table and no other."""

from pyinfra import host
from pyinfra.api import deploy

from disagg import settings as S
from disagg import units
from disagg.facts import ControllerAddress
from disagg.plan import Plan
from disagg.roles.ops import put_files, unit_running

# installed with the base packages (one apt run)
PACKAGES = ("nftables",)


@deploy("Firewall")
def firewall(plan: Plan):
    # as the login user: sudo drops SSH_CLIENT from the environment
    controller = host.get_fact(ControllerAddress, _sudo=False)
    written = put_files(units.firewall_files(plan, host.name, (controller,) if controller else ()))
    unit_running(name=f"Run {S.FIREWALL_UNIT}", unit=S.FIREWALL_UNIT, changed_by=written)
