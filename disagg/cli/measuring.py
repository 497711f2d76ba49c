"""`disagg` commands: benchmarks and layouts: bench, plan, sweep, report."""

from __future__ import annotations

import json
from pathlib import Path

import click

from disagg.cli import table
from disagg.core.errors import UsageError
from disagg.core.plan import make_plan
from disagg.infra.inventory import load_inventory
from disagg.perf import results
from disagg.perf.bench import DEFAULT_CONCURRENCY


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: give positive integers, e.g. 1,2,4,8")
    return values


@click.command()
@click.option("-i", "--inventory", "inventory_path", help="Inventory of the deployment (label, router URL, placement).")
@click.option(
    "--label-key",
    default="label",
    show_default=True,
    help="Inventory data naming the deployed label: label or baseline_label.",
)
@click.option("--url", help="Router URL, instead of an inventory (with --label).")
@click.option("--label", help="Topology label of the deployment at --url.")
@click.option("--model", help="Model name to request (default: the inventory's model).")
@click.option("--tokenizer", help="Tokenizer directory or id (default: the inventory's model_dir or model).")
@click.option(
    "--concurrency",
    "concurrency",
    default=",".join(map(str, DEFAULT_CONCURRENCY)),
    show_default=True,
    help="Comma-separated concurrencies, one aiperf run each.",
)
@click.option("--isl", default=3000, show_default=True, help="Input tokens per request.")
@click.option("--osl", default=150, show_default=True, help="Output tokens per request.")
@click.option("--seed", default=0, show_default=True, help="aiperf's random seed.")
@click.option(
    "-o",
    "--out",
    "out",
    default="results",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Results root: runs go to OUT/<label>/<run-id>/c<N>/.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def bench(inventory_path, label_key, url, label, model, tokenizer, concurrency, isl, osl, seed, out, as_json):
    """Benchmark a deployment with the reference traffic (streaming chat,
    fixed ISL/OSL, 10 x concurrency requests) through aiperf."""
    from disagg.perf.bench import Target, Traffic, sweep, target_for

    concurrencies = _concurrencies(concurrency)
    if inventory_path:
        inventory = load_inventory(inventory_path)
        target = target_for(inventory, make_plan(inventory, label, label_key=label_key), url, model, tokenizer)
    elif url and label and model and tokenizer:
        target = Target(url=url.rstrip("/"), label=label, model=model, tokenizer=tokenizer)
    else:
        raise UsageError("give -i INVENTORY, or --url with --label, --model and --tokenizer")
    run_dir = sweep(
        target,
        concurrencies,
        Traffic(isl=isl, osl=osl, seed=seed),
        out,
        progress=lambda line: click.echo(line, err=True),
    )
    rows = results.load_run(run_dir)
    if as_json:
        click.echo(json.dumps({"label": target.label, "run_dir": str(run_dir), "rows": rows}, indent=2))
    else:
        click.echo(results.markdown(rows), nl=False)
        click.echo(f"raw exports and tables: {run_dir}")


@click.command()
@click.option("--model", required=True, help="Model id AIConfigurator knows (e.g. meta-llama/Meta-Llama-3.1-70B).")
@click.option("--system", required=True, help="AIConfigurator system, e.g. h100_sxm.")
@click.option("-i", "--inventory", "inventory_path", help="Place the layouts on this inventory's hosts.")
@click.option("--gpus", type=int, help="GPUs in all (default: the inventory's).")
@click.option("--gpus-per-host", type=int, default=8, show_default=True, help="Without -i: GPUs per host.")
@click.option("--isl", default=3000, show_default=True, help="Input tokens per request.")
@click.option("--osl", default=150, show_default=True, help="Output tokens per request.")
@click.option("--sla-tokens-per-user", default=50.0, show_default=True, help="Tokens/s each user must see.")
@click.option("--sla-ttft-ms", type=float, help="Time to first token limit (AIConfigurator's default: 2000).")
@click.option("--backend", default="vllm", show_default=True, help="AIConfigurator backend.")
@click.option("--top-n", default=5, show_default=True, help="Configurations per mode.")
@click.option(
    "-o",
    "--out",
    default="plan",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Writes plan.json here, and AIConfigurator's own files under aiconfigurator/.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(
    model,
    system,
    inventory_path,
    gpus,
    gpus_per_host,
    isl,
    osl,
    sla_tokens_per_user,
    sla_ttft_ms,
    backend,
    top_n,
    out,
    as_json,
):
    """Predict the best layouts for an SLA with AIConfigurator (`pip install
    'disagg[plan]'`), as labels placed on the hosts; writes the pick's
    inventory data (label, baseline_label) to OUT/plan.json."""
    from disagg.core.plan import cluster_from_inventory
    from disagg.perf import sizing

    if inventory_path:
        cluster = cluster_from_inventory(load_inventory(inventory_path))
        gpus = gpus or sum(h.gpus for h in cluster.hosts)
    elif gpus:
        cluster = sizing.synthetic_cluster(gpus, gpus_per_host)
    else:
        raise UsageError("give -i INVENTORY or --gpus N (with --gpus-per-host)")
    request = sizing.Request(model, system, gpus, isl, osl, sla_tokens_per_user, sla_ttft_ms, backend, top_n)
    click.echo(
        f"AIConfigurator: {model} on {gpus} x {system}, ISL {isl} / OSL {osl}, "
        f"{sla_tokens_per_user:g} tokens/s/user ...",
        err=True,
    )
    candidates, seconds = sizing.run(request, out / "aiconfigurator")
    sizing.place_all(candidates, cluster)
    result = sizing.as_dict(request, candidates, seconds, out / "aiconfigurator")
    out.mkdir(parents=True, exist_ok=True)
    results.write_atomic(out / "plan.json", json.dumps(result, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    rows = [
        [
            i,
            c.label,
            f"{c.tokens_per_gpu:.1f}",
            f"{c.tokens_per_user:.1f}",
            f"{c.ttft_ms:.0f}",
            c.concurrency,
            "yes" if c.meets_sla else "no",
            sizing.placement_text(c),
        ]
        for i, c in enumerate(sizing.ranked(candidates), 1)
    ]
    click.echo(
        table(["#", "label", "tokens/s/GPU", "tokens/s/user", "TTFT ms", "concurrency", "meets SLA", "placeable"], rows)
    )
    pick = result["pick"]
    if not any(c.meets_sla for c in candidates):
        click.echo(
            f"no configuration meets {sla_tokens_per_user:g} tokens/s/user"
            f"{f' and TTFT {sla_ttft_ms:g} ms' if sla_ttft_ms else ''}: the list is AIConfigurator's "
            "best effort; relax the SLA or add GPUs"
        )
    click.echo(
        f"pick: label={pick['label']} baseline_label={pick['baseline_label']} "
        f"(AIConfigurator {result['aiconfigurator']['version']}, {seconds:.0f} s; {out / 'plan.json'})"
    )
    if inventory_path and pick["label"]:
        click.echo(f"deploy: pyinfra {inventory_path} deploys/disagg.py --data label={pick['label']}")


@click.command()
@click.option("-i", "--inventory", "inventory_path", required=True, help="Inventory of the cluster to sweep on.")
@click.option("--labels", required=True, help="Comma-separated labels, deployed and benchmarked in this order.")
@click.option(
    "--concurrency",
    "concurrency",
    default=",".join(map(str, DEFAULT_CONCURRENCY)),
    show_default=True,
    help="Comma-separated concurrencies per label.",
)
@click.option("--isl", default=3000, show_default=True, help="Input tokens per request.")
@click.option("--osl", default=150, show_default=True, help="Output tokens per request.")
@click.option(
    "--from-plan",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="plan.json of `disagg plan`: predicted against measured in the report.",
)
@click.option("--sla-tokens-per-user", type=float, help="Pick each label's best point at this SLA.")
@click.option("--ready-timeout", default=600.0, show_default=True, help="Seconds to wait for each layout.")
@click.option("--keep", is_flag=True, help="Leave the last layout deployed (no teardown).")
@click.option(
    "-o",
    "--out",
    "out",
    default="results",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Results root; labels with complete results there are skipped.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def sweep(
    inventory_path, labels, concurrency, isl, osl, from_plan, sla_tokens_per_user, ready_timeout, keep, out, as_json
):
    """Deploy each label, wait until ready, benchmark it, tear down at the
    end, and report them together (resumable: finished labels are skipped)."""
    from disagg.perf.bench import Traffic
    from disagg.perf.sizing import predictions
    from disagg.perf.sweep import sweep as run_sweep

    summary = run_sweep(
        inventory_path,
        [label.strip() for label in labels.split(",") if label.strip()],
        _concurrencies(concurrency),
        Traffic(isl=isl, osl=osl),
        out,
        predicted=predictions(from_plan) if from_plan else None,
        teardown=not keep,
        ready_timeout=ready_timeout,
        sla_per_user=sla_tokens_per_user,
        progress=lambda line: click.echo(line, err=True),
    )
    _print_report(summary, sla_tokens_per_user, as_json)


@click.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--sla-tokens-per-user", type=float, help="Pick the best tokens/s/GPU at or above this.")
@click.option("--sla-ttft-ms", type=float, help="...and a time to first token at or below this.")
@click.option(
    "-o",
    "--out",
    default="report",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where to write the plot and tables (never into the runs read).",
)
@click.option(
    "--from-plan",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="plan.json of `disagg plan`: predicted against measured, in a table and on the plot.",
)
@click.option(
    "--split-deployments",
    is_flag=True,
    help="Draw a label measured on several deployments as one series per deployment (else refused).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def report(dirs, sla_tokens_per_user, sla_ttft_ms, out, from_plan, split_deployments, as_json):
    """Table, Pareto plot and SLA pick over recorded runs (DIRS: results
    roots, label directories or run directories). Each run names the
    deployment it measured (a hash of the hosts' units and versions)."""
    from disagg.perf.report import report as make_report
    from disagg.perf.sizing import predictions

    predicted = predictions(from_plan) if from_plan else None
    summary = make_report(list(dirs), out, sla_tokens_per_user, sla_ttft_ms, predicted, split_deployments)
    _print_report(summary, sla_tokens_per_user, as_json)


def _print_report(summary: dict, sla_tokens_per_user: float | None, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(results.markdown(summary["rows"]), nl=False)
    click.echo(f"plot: {summary['plot']} (series: {', '.join(summary['series'])})")
    for label, hashes in sorted(summary.get("deployments", {}).items()):
        click.echo(f"{label}: deployment {', '.join(hashes)}")
    for label, p in summary["picks"].items():
        if p is None:
            click.echo(f"SLA {sla_tokens_per_user:g} tokens/s/user: {label}: no point meets it")
        else:
            click.echo(
                f"SLA {sla_tokens_per_user:g} tokens/s/user: {label}: {p['per_gpu']:.2f} tokens/s/GPU "
                f"at {p['per_user']:.2f} tokens/s/user ({p['how']})"
            )
    if "ratio" in summary:
        d, b = summary["ratio_of"]
        click.echo(f"disaggregated / baseline at the SLA: {summary['ratio']:.2f} ({d} / {b})")
    if "predicted" in summary:
        from disagg.perf.report import COMPARE_COLUMNS

        click.echo("predicted (AIConfigurator) against measured:")
        click.echo(results.markdown(summary["predicted"], COMPARE_COLUMNS), nl=False)


COMMANDS = (
    bench,
    plan,
    sweep,
    report,
)
