"""The `disagg` command line: a thin layer over the library."""

from __future__ import annotations

import json
import sys

import click

from .plan import load_inventory, make_plan
from .topology import TopologyError
from .units import host_units


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(package_name="disagg")
def main() -> None:
    """Disaggregated LLM serving (context/generate workers behind vllm-router)
    as infrastructure-as-code. Deploy with pyinfra: see README.md."""


@main.command()
@click.argument("label", required=False)
@click.option("-i", "--inventory", "inventory_path", required=True,
              help="pyinfra inventory file, e.g. inventories/h100.py")
@click.option("--units", is_flag=True, help="Also print every rendered unit, env and config file.")
@click.option("--json", "as_json", is_flag=True, help="Print the placement as JSON.")
def render(label: str | None, inventory_path: str, units: bool, as_json: bool) -> None:
    """Show where LABEL's workers go on INVENTORY's hosts, without connecting
    to any host. LABEL defaults to the inventory's `label` data, e.g.
    context_tp2dp4_generate_tp8dp1 or baseline_tp4dp2."""
    try:
        plan = make_plan(load_inventory(inventory_path), label)
    except TopologyError as e:
        _fail(e)
    files = {h.name: host_units(plan, h.name) for h in plan.cluster.hosts} if units else {}
    if as_json:
        out = plan.as_dict()
        if units:
            out["files"] = files
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{plan.label}: {plan.topology.gpus} GPUs, router {plan.router_url}")
    click.echo(_table(
        ["host", "role", "index", "gpus", "http_port", "nixl_port", "unit"],
        [[w.host, w.role, w.index, ",".join(map(str, w.gpus)), w.http_port, w.nixl_port, w.unit]
         for w in plan.workers],
    ))  # fmt: skip
    for host, host_files in files.items():
        for path, text in host_files.items():
            click.echo(f"\n### {host}:{path}\n{text}", nl=False)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


@main.group()
def testhosts() -> None:
    """Local systemd test hosts (containers) that stand in for GPU nodes."""


@testhosts.command("up")
@click.option("--count", default=2, show_default=True, help="Number of hosts.")
def testhosts_up(count: int) -> None:
    """Boot the hosts of inventories/local.py and write its tiny model."""
    from . import testhosts as th
    from . import tinymodel

    try:
        addresses = th.TestHosts(count).up()
    except th.HarnessError as e:
        _fail(e)
    tinymodel.write(th.CACHE / "tiny-llama")
    click.echo(f"test hosts up: {' '.join(addresses)} (ssh key {th.KEY})")


@testhosts.command("down")
def testhosts_down() -> None:
    """Stop the hosts and remove everything `up` created."""
    from . import testhosts as th

    th.TestHosts().down()
    click.echo("test hosts down")
