"""`disagg` commands: the inventory and its deploys: check, render, deploy, tls, deploy-profile."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from disagg.cli import table
from disagg.core.errors import InventoryError, UsageError
from disagg.core.plan import check_inventory, cluster_from_inventory, make_plan
from disagg.core.schema import SchemaError
from disagg.core.units import host_units
from disagg.infra.inventory import load_inventory


@click.command()
@click.option(
    "-i", "--inventory", "inventory_path", required=True, help="pyinfra inventory file, e.g. inventories/h100.py"
)
@click.option("--json", "as_json", is_flag=True, help="Print {ok, problems, layouts} as JSON.")
def check(inventory_path: str, as_json: bool) -> None:
    """Check INVENTORY's data (types, ranges, typos, shape) and place its
    `label` and `baseline_label`, without connecting to any host. Exit 0
    when all is well, 1 with one line per problem."""
    problems, layouts = [], {}
    try:
        inventory = load_inventory(inventory_path)
        problems = check_inventory(inventory)
        if not problems:
            head = inventory.get_host(cluster_from_inventory(inventory).head)
            for key in ("label", "baseline_label"):
                if head.data.get(key) is not None:
                    layouts[key] = make_plan(inventory, label_key=key).label
    except SchemaError as e:
        problems = e.problems
    except InventoryError as e:
        problems = [str(e)]
    if as_json:
        click.echo(json.dumps({"ok": not problems, "problems": problems, "layouts": layouts}, indent=2))
    else:
        for line in problems:
            click.echo(line)
        if not problems:
            click.echo(f"{inventory_path}: ok ({', '.join(f'{k} {v}' for k, v in layouts.items()) or 'no layout'})")
    sys.exit(1 if problems else 0)


@click.command()
@click.argument("label", required=False)
@click.option(
    "-i", "--inventory", "inventory_path", required=True, help="pyinfra inventory file, e.g. inventories/h100.py"
)
@click.option("--units", is_flag=True, help="Also print every rendered unit, env and config file.")
@click.option("--json", "as_json", is_flag=True, help="Print the placement as JSON.")
def render(label: str | None, inventory_path: str, units: bool, as_json: bool) -> None:
    """Show where LABEL's workers go on INVENTORY's hosts, without connecting
    to any host. LABEL defaults to the inventory's `label` data, e.g.
    context_tp2dp4_generate_tp8dp1 or baseline_tp4dp2."""
    plan = make_plan(load_inventory(inventory_path), label)
    files = {h.name: host_units(plan, h.name) for h in plan.cluster.hosts} if units else {}
    if as_json:
        out = plan.as_dict()
        if units:
            out["files"] = files
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{plan.label}: {plan.topology.gpus} GPUs, router {plan.router_url}")
    if len(plan.router_urls) > 1 and not plan.vip_address:
        # no floating address: a client that knows every front door tries the next when one fails
        click.echo(f"front doors: {' '.join(plan.router_urls)}")
    click.echo(
        table(
            ["host", "role", "index", "gpus", "http_port", "nixl_port", "unit"],
            [
                [w.host, w.role, w.index, ",".join(map(str, w.gpus)), w.http_port, w.nixl_port, w.unit]
                for w in plan.workers
            ],
        )
    )
    for host, host_files in files.items():
        for path, text in host_files.items():
            click.echo(f"\n### {host}:{path}\n{text}", nl=False)


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("label", required=False)
@click.option(
    "-i", "--inventory", "inventory_path", required=True, help="pyinfra inventory file, e.g. inventories/h100.py"
)
@click.option("--baseline", is_flag=True, help="The aggregated baseline (LABEL or data baseline_label).")
@click.option("--teardown", is_flag=True, help="Stop and remove what disagg deployed, nothing else.")
@click.option("--purge", is_flag=True, help="With --teardown: also venvs, caches, the NATS store and our users.")
@click.option("--model", "stage_model", is_flag=True, help="Only stage the model on the worker hosts.")
@click.option("--dry", is_flag=True, help="Show what would change; change nothing.")
@click.option("--limit", multiple=True, help="Only these hosts or groups (pyinfra's --limit, repeatable).")
@click.option("--data", multiple=True, metavar="KEY=VALUE", help="Override inventory data (repeatable).")
@click.argument("pyinfra_args", nargs=-1, type=click.UNPROCESSED)
def deploy(label, inventory_path, baseline, teardown, purge, stage_model, dry, limit, data, pyinfra_args):
    """Run a deploy shipped with disagg on INVENTORY's hosts, from any
    directory: the disaggregated LABEL (default: data `label`), the
    baseline, the model staging or the teardown. Other options go to
    pyinfra as they are (e.g. -y, --diff, -v, --serial)."""
    from disagg import deploys

    if label and label.startswith("-"):  # an option of pyinfra's, not a label
        label, pyinfra_args = None, (label, *pyinfra_args)
    kinds = [k for k, on in (("baseline", baseline), ("teardown", teardown), ("model", stage_model)) if on]
    if len(kinds) > 1:
        raise UsageError(f"--{kinds[0]} and --{kinds[1]} are two deploys: run one at a time")
    kind = kinds[0] if kinds else "disagg"
    if purge and kind != "teardown":
        raise UsageError("--purge goes with --teardown")
    if label and kind in ("teardown", "model"):
        raise UsageError(f"--{kind} takes no LABEL: it acts on what the inventory deploys")
    args = [inventory_path, str(deploys.path(kind))]
    if label:
        args += ["--data", f"{'baseline_label' if baseline else 'label'}={label}"]
    args += [a for d in data for a in ("--data", d)]
    args += ["--data", "purge=true"] if purge else []
    args += [a for pattern in limit for a in ("--limit", pattern)]
    args += ["--dry"] if dry else []
    # pyinfra's own CLI in this process's place: its prompts, output and exit status are the user's
    os.execv(sys.executable, [sys.executable, "-m", "disagg.infra.pyinfra_cli", *args, *pyinfra_args])


@click.group()
def tls() -> None:
    """The deployment's private CA and NATS certificate, kept on this
    controller ($DISAGG_STATE_DIR, default ~/.local/state/disagg)."""


def _deployment(inventory_path: str) -> str:
    return cluster_from_inventory(load_inventory(inventory_path)).head


@tls.command("show")
@click.option("-i", "--inventory", "inventory_path", required=True, help="pyinfra inventory file.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def tls_show(inventory_path: str, as_json: bool) -> None:
    """Where the CA is, and the fingerprints, names and expiry of the CA and
    NATS certificates (never a key)."""
    from disagg.core import pki

    info = pki.describe(_deployment(inventory_path))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"directory: {info['directory']}")
    for label in ("ca", "nats"):
        cert = info.get(label)
        if cert is None:
            click.echo(f"{label}: none yet (the next deploy makes it)")
            continue
        names = f", for {' '.join(cert['names'])}" if cert["names"] else ""
        click.echo(f"{label}: {cert['subject']}{names}, valid until {cert['not_after']}, sha256 {cert['sha256']}")


@tls.command("rotate")
@click.option("-i", "--inventory", "inventory_path", required=True, help="pyinfra inventory file.")
def tls_rotate(inventory_path: str) -> None:
    """Make a new CA (the NATS certificate follows). Nothing changes on the
    hosts until the next deploy, which pushes both and restarts NATS and
    the agents (to serving, a NATS outage)."""
    from disagg.core import pki

    deployment = _deployment(inventory_path)
    d = pki.rotate(deployment)
    click.echo(f"new CA in {d}; roll it out with: pyinfra {inventory_path} deploys/disagg.py (or baseline.py)")


@click.command("deploy-profile")
@click.argument("profile", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--top", default=10, show_default=True, help="Operations to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def deploy_profile(profile: Path, top: int, as_json: bool) -> None:
    """Where a deploy's time went, from the file a deploy run with
    DISAGG_PROFILE=FILE wrote: planning, execution, the critical path, the
    slowest operations overall and on each host."""
    from disagg.infra import profile as profiling

    try:
        summary = profiling.summary(json.loads(profile.read_text()), top)
    except (ValueError, KeyError) as e:
        raise UsageError(f"{profile}: not a deploy profile ({e})") from None
    click.echo(json.dumps(summary, indent=2) if as_json else profiling.text(summary, top))


COMMANDS = (
    check,
    render,
    deploy,
    tls,
    deploy_profile,
)
