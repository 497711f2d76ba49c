"""The `disagg` command line: a thin layer over the library."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from . import results
from .bench import DEFAULT_CONCURRENCY
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


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: give positive integers, e.g. 1,2,4,8")
    return values


@main.command()
@click.option("-i", "--inventory", "inventory_path", help="Inventory of the deployment (label, router URL, placement).")
@click.option("--label-key", default="label", show_default=True,
              help="Inventory data naming the deployed label: label or baseline_label.")
@click.option("--url", help="Router URL, instead of an inventory (with --label).")
@click.option("--label", help="Topology label of the deployment at --url.")
@click.option("--model", help="Model name to request (default: the inventory's model).")
@click.option("--tokenizer", help="Tokenizer directory or id (default: the inventory's model_dir or model).")
@click.option("--concurrency", "concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
              show_default=True, help="Comma-separated concurrencies, one aiperf run each.")
@click.option("--isl", default=3000, show_default=True, help="Input tokens per request.")
@click.option("--osl", default=150, show_default=True, help="Output tokens per request.")
@click.option("--seed", default=0, show_default=True, help="aiperf's random seed.")
@click.option("-o", "--out", "out", default="results", show_default=True, type=click.Path(path_type=Path),
              help="Results root: runs go to OUT/<label>/<run-id>/c<N>/.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def bench(inventory_path, label_key, url, label, model, tokenizer, concurrency, isl, osl, seed, out, as_json):
    """Benchmark a deployment with the reference traffic (streaming chat,
    fixed ISL/OSL, 10 x concurrency requests) through aiperf."""
    from .bench import Target, Traffic, sweep

    try:
        concurrencies = _concurrencies(concurrency)
        if inventory_path:
            plan = make_plan(load_inventory(inventory_path), label, label_key=label_key)
            s = plan.settings
            target = Target(
                url=url or plan.router_url,
                label=plan.label,
                model=model or s.served_name or s.model,
                tokenizer=tokenizer or s.model_dir or s.model,
                placement=plan.as_dict()["workers"],
                worker_urls=[w.url for w in plan.workers],
                engine=dataclasses.asdict(s),
            )
        elif url and label and model and tokenizer:
            target = Target(url=url.rstrip("/"), label=label, model=model, tokenizer=tokenizer)
        else:
            raise TopologyError("give -i INVENTORY, or --url with --label, --model and --tokenizer")
        run_dir = sweep(target, concurrencies, Traffic(isl=isl, osl=osl, seed=seed), out,
                        progress=lambda line: click.echo(line, err=True))  # fmt: skip
    except TopologyError as e:
        _fail(e)
    rows = results.load_run(run_dir)
    if as_json:
        click.echo(json.dumps({"label": target.label, "run_dir": str(run_dir), "rows": rows}, indent=2))
    else:
        click.echo(results.markdown(rows), nl=False)
        click.echo(f"raw exports and tables: {run_dir}")


@main.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--sla-tokens-per-user", type=float, help="Pick the best tokens/s/GPU at or above this.")
@click.option("--sla-ttft-ms", type=float, help="...and a time to first token at or below this.")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Where to write the plot and tables (default: first DIR).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def report(dirs, sla_tokens_per_user, sla_ttft_ms, out, as_json):
    """Table, Pareto plot and SLA pick over recorded runs (DIRS: results
    roots, label directories or run directories)."""
    from .report import report as make_report

    try:
        summary = make_report(list(dirs), out or dirs[0], sla_tokens_per_user, sla_ttft_ms)
    except TopologyError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(results.markdown(summary["rows"]), nl=False)
    click.echo(f"plot: {summary['plot']} (series: {', '.join(summary['series'])})")
    for label, p in summary["picks"].items():
        if p is None:
            click.echo(f"SLA {sla_tokens_per_user:g} tokens/s/user: {label}: no point meets it")
        else:
            click.echo(f"SLA {sla_tokens_per_user:g} tokens/s/user: {label}: {p['per_gpu']:.2f} tokens/s/GPU "
                       f"at {p['per_user']:.2f} tokens/s/user ({p['how']})")  # fmt: skip
    if "ratio" in summary:
        d, b = summary["ratio_of"]
        click.echo(f"disaggregated / baseline at the SLA: {summary['ratio']:.2f} ({d} / {b})")
