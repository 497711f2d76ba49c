"""An inventory file loaded the way pyinfra's CLI loads it, with each
host's listings kept for the inventory check (disagg.core.plan)."""

from __future__ import annotations

from pathlib import Path

from disagg.core.errors import UsageError
from disagg.infra.pyinfra_cli import unpatched


def load_inventory(path: str, override_data: dict | None = None):
    """Load an inventory file the way the pyinfra CLI does."""
    from pyinfra.api import State
    from pyinfra.context import ctx_state

    unpatched()
    from pyinfra_cli.inventory import make_inventory

    if not Path(path).is_file():
        raise UsageError(f"inventory {path!r} not found; pass an inventory file such as inventories/h100.py")
    with ctx_state.use(State()):
        inventory = make_inventory(path, override_data=override_data)
        inventory.listings = _listings(path)
    return inventory


def _listings(path: str) -> dict[str, list[tuple[str, dict]]]:
    """Each host's data as each of its groups lists it: pyinfra merges them,
    the last listing winning, so a conflict is visible only here."""
    unpatched()
    from pyinfra_cli.inventory import _get_groups_from_filename

    listings: dict[str, list[tuple[str, dict]]] = {}
    for group, hosts in _get_groups_from_filename(path).items():
        for host in hosts[0] if isinstance(hosts, tuple) else hosts:
            name, data = host if isinstance(host, tuple) else (host, {})
            listings.setdefault(name, []).append((group, data))
    return listings
