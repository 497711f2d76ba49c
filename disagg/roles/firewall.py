"""nftables on every host of the layout: the rules disagg/core/nftables.py makes
from the placement, in our own table, loaded by a oneshot unit (so they
come back at boot). With data firewall=false nothing is installed, and a
unit from an earlier deploy is pruned like any other: its stop deletes our
table and no other."""

from pyinfra import host
from pyinfra.api import deploy, operation

from disagg.core import settings as S
from disagg.core import units
from disagg.core.nftables import TABLE
from disagg.core.nftables import names as address_names
from disagg.core.plan import Plan
from disagg.infra.facts import CommandSucceeds, ControllerAddress
from disagg.roles.ops import put_unit_apart, resolved, unit_running

# installed with the base packages (one apt run)
PACKAGES = ("nftables",)


@deploy("Firewall")
def firewall(plan: Plan):
    # as the login user: sudo drops SSH_CLIENT from the environment
    controller = host.get_fact(ControllerAddress, _sudo=False)
    # the rules hold addresses: a name nft resolves at load may not resolve at boot
    addresses = resolved(
        address_names(plan),
        "(an inventory address) for the firewall's rules; give the host's address as an IP, "
        "or make the name resolve here",
    )
    rendered = units.firewall_files(plan, host.name, (controller,) if controller else (), addresses)
    unit, rules = put_unit_apart(rendered, S.FIREWALL_UNIT)
    # never restarted: its stop deletes the table, and a start that then
    # failed would leave every port open; a reload swaps the rules in one
    # nft transaction, the old ones stay if the new fail to load
    unit_running(
        name=f"Run {S.FIREWALL_UNIT}", unit=S.FIREWALL_UNIT, changed_by=unit, restart=False, reloaded_by=[*unit, *rules]
    )


@operation()
def table_absent():
    """
    Our nftables table deleted where its unit left it: a unit that failed
    or was stopped by hand never ran its ExecStop. Other tables stay.

    **Example:**

    .. code:: python

        table_absent(name="Remove our nftables table")
    """
    listed = f"nft list table inet {TABLE}"
    if not host.get_fact(CommandSucceeds, command=listed):
        host.noop(f"no table inet {TABLE}")
        return
    # the units' stop, run before this, usually deleted it already
    yield f"if {listed} >/dev/null 2>&1; then nft delete table inet {TABLE}; fi"
