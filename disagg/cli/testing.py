"""`disagg` commands: the local lab: testhosts up and down."""

from __future__ import annotations

import click


@click.group()
def testhosts() -> None:
    """Local systemd test hosts (containers) that stand in for GPU nodes."""


@testhosts.command("up")
@click.option("--count", default=2, show_default=True, help="Number of hosts.")
def testhosts_up(count: int) -> None:
    """Boot the hosts of inventories/local.py and write its tiny model."""
    from disagg.lab import testhosts as th
    from disagg.lab import tinymodel

    addresses = th.TestHosts(count).up()
    tinymodel.write(th.CACHE / "tiny-llama")
    click.echo(f"test hosts up: {' '.join(addresses)} (ssh key {th.KEY})")


@testhosts.command("down")
def testhosts_down() -> None:
    """Stop the hosts and remove everything `up` created."""
    from disagg.lab import testhosts as th

    th.TestHosts().down()
    click.echo("test hosts down")


COMMANDS = (testhosts,)
