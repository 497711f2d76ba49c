"""The `disagg` command line: a thin layer over the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import results
from .agent import kv
from .bench import DEFAULT_CONCURRENCY
from .plan import check_inventory, cluster_from_inventory, load_inventory, make_plan
from .schema import SchemaError
from .topology import TopologyError
from .units import host_units


def _fail(e: Exception) -> None:
    for line in str(e).splitlines():
        click.echo(f"error: {line}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(package_name="disagg")
def main() -> None:
    """Disaggregated LLM serving (context/generate workers behind vllm-router)
    as infrastructure-as-code. Deploy with pyinfra: see README.md."""


@main.command()
@click.option("-i", "--inventory", "inventory_path", required=True,
              help="pyinfra inventory file, e.g. inventories/h100.py")
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
    except TopologyError as e:
        problems = [str(e)]
    if as_json:
        click.echo(json.dumps({"ok": not problems, "problems": problems, "layouts": layouts}, indent=2))
    else:
        for line in problems:
            click.echo(line)
        if not problems:
            click.echo(f"{inventory_path}: ok ({', '.join(f'{k} {v}' for k, v in layouts.items()) or 'no layout'})")
    sys.exit(1 if problems else 0)


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


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("label", required=False)
@click.option("-i", "--inventory", "inventory_path", required=True,
              help="pyinfra inventory file, e.g. inventories/h100.py")
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
    from . import deploys

    if label and label.startswith("-"):  # an option of pyinfra's, not a label
        label, pyinfra_args = None, (label, *pyinfra_args)
    kinds = [k for k, on in (("baseline", baseline), ("teardown", teardown), ("model", stage_model)) if on]
    if len(kinds) > 1:
        _fail(TopologyError(f"--{kinds[0]} and --{kinds[1]} are two deploys: run one at a time"))
    kind = kinds[0] if kinds else "disagg"
    if purge and kind != "teardown":
        _fail(TopologyError("--purge goes with --teardown"))
    if label and kind in ("teardown", "model"):
        _fail(TopologyError(f"--{kind} takes no LABEL: it acts on what the inventory deploys"))
    args = [inventory_path, str(deploys.path(kind))]
    if label:
        args += ["--data", f"{'baseline_label' if baseline else 'label'}={label}"]
    args += [a for d in data for a in ("--data", d)]
    args += ["--data", "purge=true"] if purge else []
    args += [a for pattern in limit for a in ("--limit", pattern)]
    args += ["--dry"] if dry else []
    # pyinfra's own CLI in this process's place: its prompts, output and exit status are the user's
    os.execv(sys.executable, [sys.executable, "-m", "disagg.pyinfra_cli", *args, *pyinfra_args])


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

    try:
        th.TestHosts().down()
    except th.HarnessError as e:
        _fail(e)
    click.echo("test hosts down")


@main.group()
def tls() -> None:
    """The deployment's private CA and NATS certificate, kept on this
    controller ($DISAGG_STATE_DIR, default ~/.local/state/disagg)."""


def _deployment(inventory_path: str) -> str:
    try:
        return cluster_from_inventory(load_inventory(inventory_path)).head
    except (SchemaError, TopologyError) as e:
        _fail(e)


@tls.command("show")
@click.option("-i", "--inventory", "inventory_path", required=True, help="pyinfra inventory file.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def tls_show(inventory_path: str, as_json: bool) -> None:
    """Where the CA is, and the fingerprints, names and expiry of the CA and
    NATS certificates (never a key)."""
    from . import pki

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
    from . import pki

    deployment = _deployment(inventory_path)
    d = pki.rotate(deployment)
    click.echo(f"new CA in {d}; roll it out with: pyinfra {inventory_path} deploys/disagg.py (or baseline.py)")


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
    from .bench import Target, Traffic, sweep, target_for

    try:
        concurrencies = _concurrencies(concurrency)
        if inventory_path:
            inventory = load_inventory(inventory_path)
            target = target_for(inventory, make_plan(inventory, label, label_key=label_key), url, model, tokenizer)
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
@click.option("-i", "--inventory", "inventory_path", help="Inventory of the deployment (NATS, router, expected workers).")
@click.option("--label-key", default="label", show_default=True,
              help="Inventory data key of the deployed label (baseline_label for the baseline).")  # fmt: skip
@click.option("--label", help="The deployed label, instead of the inventory's.")
@click.option("--nats", "nats_url", help="tls://HOST:PORT (with --ca), instead of an inventory.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), help="CA certificate of the deployment's NATS "
              "(with --nats; `disagg tls` says where it is).")
@click.option("--user", default="disagg", show_default=True, help="NATS user (with --nats).")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False), help=f"File holding the NATS password (with --nats; "
              f"default: ${kv.PASSWORD_ENV}).")  # fmt: skip
@click.option("--router", "router_url", help="Router URL (with --nats).")
@click.option("--router-metrics", help="Router's Prometheus URL, e.g. http://HEAD:29000/metrics (with --nats).")
@click.option("--wait", is_flag=True, help="Block until every deployed worker is healthy and routed.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to --wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(inventory_path, label_key, label, nats_url, ca, user, password_file, router_url, router_metrics, wait, timeout,
           as_json):  # fmt: skip
    """Workers in the registry (role, host, GPUs, URL, health, heartbeat age,
    whether the router itself lists it, requests the router sent each,
    requests running on each), NATS and router health. Exit 0 when ready, 1
    when not (naming what is missing), 3 when it cannot tell (NATS or the
    head unreachable)."""
    import asyncio

    from . import control
    from .agent import status as agent_status

    try:
        if inventory_path:
            inventory = load_inventory(inventory_path)
            plan = make_plan(inventory, label, label_key=label_key)
            current = control.status(inventory, plan, wait=timeout if wait else None)
        elif nats_url:
            # the file holds the password, or the head's VARIABLE=password line
            password = kv.read_password(password_file)
            args = (kv.Server(nats_url, user, password, ca), router_url and router_url.rstrip("/"), [])
            kw = {"router_metrics": router_metrics}
            current = asyncio.run(agent_status.wait_ready(*args, timeout=timeout, **kw) if wait
                                  else agent_status.status(*args, **kw))  # fmt: skip
        else:
            raise TopologyError("give -i INVENTORY, or --nats tls://HOST:PORT --ca FILE")
    except control.Unreachable as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(agent_status.UNKNOWN)
    except (TopologyError, OSError) as e:
        _fail(e)
    click.echo(json.dumps(current.as_dict(), indent=2) if as_json else agent_status.table(current))
    sys.exit(current.exit_code)


@main.command()
@click.argument("label", required=False)
@click.option("-i", "--inventory", "inventory_path", required=True, help="Inventory of the hosts to check.")
@click.option("--label-key", default="label", show_default=True,
              help="Inventory data naming the label: label or baseline_label.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def preflight(label, inventory_path, label_key, as_json):
    """Check the hosts before deploying LABEL (default: the inventory's):
    ports free or ours, GPUs as the inventory says, the NIXL side channels
    reachable from the generate hosts, the model's heads against each
    role's TP, engine versions, free disk. Changes nothing; exit 0 when
    nothing is wrong, 1 listing every problem (one line each)."""
    from pyinfra.api import Config, State

    from . import preflight as checks

    try:
        inventory = load_inventory(inventory_path)
        plan = make_plan(inventory, label, label_key=label_key)
        state = State(inventory, Config())
        try:
            report = checks.run(state, plan)
        finally:
            for host in inventory:
                host.disconnect()
    except TopologyError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for reason in report.skipped:
            click.echo(f"skipped: {reason}")
        for p in report.problems:
            click.echo(p.line())
        click.echo(f"{plan.label}: {'ok' if report.ok else f'{len(report.problems)} problem(s)'} "
                   f"({report.seconds:.1f} s)")  # fmt: skip
    sys.exit(0 if report.ok else 1)


@main.command()
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
@click.option("-o", "--out", default="plan", show_default=True, type=click.Path(path_type=Path),
              help="Writes plan.json here, and AIConfigurator's own files under aiconfigurator/.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model, system, inventory_path, gpus, gpus_per_host, isl, osl, sla_tokens_per_user, sla_ttft_ms,
         backend, top_n, out, as_json):  # fmt: skip
    """Predict the best layouts for an SLA with AIConfigurator (`pip install
    'disagg[plan]'`), as labels placed on the hosts; writes the pick's
    inventory data (label, baseline_label) to OUT/plan.json."""
    from . import planner
    from .plan import cluster_from_inventory

    try:
        if inventory_path:
            cluster = cluster_from_inventory(load_inventory(inventory_path))
            gpus = gpus or sum(h.gpus for h in cluster.hosts)
        elif gpus:
            cluster = planner.synthetic_cluster(gpus, gpus_per_host)
        else:
            raise TopologyError("give -i INVENTORY or --gpus N (with --gpus-per-host)")
        request = planner.Request(model, system, gpus, isl, osl, sla_tokens_per_user, sla_ttft_ms, backend, top_n)
        click.echo(f"AIConfigurator: {model} on {gpus} x {system}, ISL {isl} / OSL {osl}, "
                   f"{sla_tokens_per_user:g} tokens/s/user ...", err=True)  # fmt: skip
        candidates, seconds = planner.run(request, out / "aiconfigurator")
        planner.place_all(candidates, cluster)
    except TopologyError as e:
        _fail(e)
    result = planner.as_dict(request, candidates, seconds, out / "aiconfigurator")
    out.mkdir(parents=True, exist_ok=True)
    results.write_atomic(out / "plan.json", json.dumps(result, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    rows = [[i, c.label, f"{c.tokens_per_gpu:.1f}", f"{c.tokens_per_user:.1f}", f"{c.ttft_ms:.0f}", c.concurrency,
             "yes" if c.meets_sla else "no", planner.placement_text(c)]
            for i, c in enumerate(planner.ranked(candidates), 1)]  # fmt: skip
    click.echo(_table(["#", "label", "tokens/s/GPU", "tokens/s/user", "TTFT ms", "concurrency", "meets SLA",
                       "placeable"], rows))  # fmt: skip
    pick = result["pick"]
    if not any(c.meets_sla for c in candidates):
        click.echo(f"no configuration meets {sla_tokens_per_user:g} tokens/s/user"
                   f"{f' and TTFT {sla_ttft_ms:g} ms' if sla_ttft_ms else ''}: the list is AIConfigurator's "
                   "best effort; relax the SLA or add GPUs")  # fmt: skip
    click.echo(f"pick: label={pick['label']} baseline_label={pick['baseline_label']} "
               f"(AIConfigurator {result['aiconfigurator']['version']}, {seconds:.0f} s; {out / 'plan.json'})")  # fmt: skip
    if inventory_path and pick["label"]:
        click.echo(f"deploy: pyinfra {inventory_path} deploys/disagg.py --data label={pick['label']}")


@main.command()
@click.option("-i", "--inventory", "inventory_path", required=True, help="Inventory of the cluster to sweep on.")
@click.option("--labels", required=True, help="Comma-separated labels, deployed and benchmarked in this order.")
@click.option("--concurrency", "concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
              show_default=True, help="Comma-separated concurrencies per label.")  # fmt: skip
@click.option("--isl", default=3000, show_default=True, help="Input tokens per request.")
@click.option("--osl", default=150, show_default=True, help="Output tokens per request.")
@click.option("--from-plan", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="plan.json of `disagg plan`: predicted against measured in the report.")  # fmt: skip
@click.option("--sla-tokens-per-user", type=float, help="Pick each label's best point at this SLA.")
@click.option("--ready-timeout", default=600.0, show_default=True, help="Seconds to wait for each layout.")
@click.option("--keep", is_flag=True, help="Leave the last layout deployed (no teardown).")
@click.option("-o", "--out", "out", default="results", show_default=True, type=click.Path(path_type=Path),
              help="Results root; labels with complete results there are skipped.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def sweep(inventory_path, labels, concurrency, isl, osl, from_plan, sla_tokens_per_user, ready_timeout, keep,
          out, as_json):  # fmt: skip
    """Deploy each label, wait until ready, benchmark it, tear down at the
    end, and report them together (resumable: finished labels are skipped)."""
    from .bench import Traffic
    from .deploy import DeployError
    from .planner import predictions
    from .sweep import sweep as run_sweep

    try:
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
    except (TopologyError, DeployError) as e:
        _fail(e)
    _print_report(summary, sla_tokens_per_user, as_json)


@main.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--sla-tokens-per-user", type=float, help="Pick the best tokens/s/GPU at or above this.")
@click.option("--sla-ttft-ms", type=float, help="...and a time to first token at or below this.")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Where to write the plot and tables (default: first DIR).")
@click.option("--from-plan", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="plan.json of `disagg plan`: predicted against measured, in a table and on the plot.")  # fmt: skip
@click.option("--split-deployments", is_flag=True,
              help="Draw a label measured on several deployments as one series per deployment (else refused).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def report(dirs, sla_tokens_per_user, sla_ttft_ms, out, from_plan, split_deployments, as_json):
    """Table, Pareto plot and SLA pick over recorded runs (DIRS: results
    roots, label directories or run directories). Each run names the
    deployment it measured (a hash of the hosts' units and versions)."""
    from .planner import predictions
    from .report import report as make_report

    try:
        predicted = predictions(from_plan) if from_plan else None
        summary = make_report(list(dirs), out or dirs[0], sla_tokens_per_user, sla_ttft_ms, predicted,
                              split_deployments)  # fmt: skip
    except TopologyError as e:
        _fail(e)
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
            click.echo(f"SLA {sla_tokens_per_user:g} tokens/s/user: {label}: {p['per_gpu']:.2f} tokens/s/GPU "
                       f"at {p['per_user']:.2f} tokens/s/user ({p['how']})")  # fmt: skip
    if "ratio" in summary:
        d, b = summary["ratio_of"]
        click.echo(f"disaggregated / baseline at the SLA: {summary['ratio']:.2f} ({d} / {b})")
    if "predicted" in summary:
        from .report import COMPARE_COLUMNS

        click.echo("predicted (AIConfigurator) against measured:")
        click.echo(results.markdown(summary["predicted"], COMPARE_COLUMNS), nl=False)


@main.command()
@click.option("-i", "--inventory", "inventory_path", help="Inventory of the deployment (Prometheus address, label, SLA).")
@click.option("--label-key", default="label", show_default=True,
              help="Inventory data naming the label: label or baseline_label.")  # fmt: skip
@click.option("--prometheus", "prometheus_url", help="Prometheus URL, e.g. http://HEAD:9090, instead of an inventory.")
@click.option("--layout", help="The layout's label (default: the inventory's).")
@click.option("--sla-tokens-per-user", type=float, help="Tokens/s each user must see (default: data sla_tokens_per_user).")
@click.option("--sla-ttft-ms", type=float, help="Time to first token p90 limit (default: data sla_ttft_ms).")
@click.option("--interval", default=5.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --once: print the snapshot as JSON.")
def top(inventory_path, label_key, prometheus_url, layout, sla_tokens_per_user, sla_ttft_ms, interval, once, as_json):
    """The layout live from Prometheus on the head: per worker its role,
    host, GPUs, requests running and waiting, tokens/s, TTFT and ITL p90
    over the last minute, KV cache use and KV transfer rate; the layout's
    tokens/s per GPU and per user against the SLA. Reads Prometheus only
    (never the NATS password)."""
    import time

    from . import top as live

    try:
        sla = live.Sla(sla_tokens_per_user or 50.0, sla_ttft_ms)
        if inventory_path:
            plan = make_plan(load_inventory(inventory_path), layout, label_key=label_key)
            s = plan.settings
            if not s.prometheus:
                raise TopologyError("prometheus is False in the inventory: nothing to read; deploy with it on")
            if s.prometheus_listen == "loopback" and not prometheus_url:
                raise TopologyError(f"Prometheus listens on the head's loopback (prometheus_listen=loopback): run "
                                    f"ssh -L {s.prometheus_port}:127.0.0.1:{s.prometheus_port} {plan.cluster.head} and "
                                    f"give --prometheus http://127.0.0.1:{s.prometheus_port}")  # fmt: skip
            prometheus_url = prometheus_url or plan.prometheus_url
            layout = plan.label
            sla = live.Sla(sla_tokens_per_user or s.sla_tokens_per_user, sla_ttft_ms or s.sla_ttft_ms)
        elif not (prometheus_url and layout):
            raise TopologyError("give -i INVENTORY, or --prometheus URL --layout LABEL")
        if as_json and not once:
            raise TopologyError("--json goes with --once")
        if once:
            snap = live.snapshot(prometheus_url, layout, sla)
            if as_json:
                click.echo(json.dumps(snap.as_dict(), indent=2))
            else:
                from rich.console import Console

                console = Console()
                # piped: as wide as the table needs, not 80 columns
                (console if console.is_terminal else Console(width=160)).print(live.render(snap, prometheus_url))
            return
        from rich.live import Live

        with Live(live.render(live.snapshot(prometheus_url, layout, sla), prometheus_url), auto_refresh=False) as view:
            while True:
                time.sleep(interval)
                view.update(live.render(live.snapshot(prometheus_url, layout, sla), prometheus_url), refresh=True)
    except (TopologyError, live.PrometheusError) as e:
        _fail(e)
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the dashboards' JSON into.")  # fmt: skip
def dashboards(out: Path) -> None:
    """Write the Grafana dashboards (layout, worker) built on disagg's
    recording rules; import them in Grafana (Dashboards > New > Import)
    with a Prometheus data source pointing at the head's Prometheus."""
    from . import dashboards as boards

    out.mkdir(parents=True, exist_ok=True)
    for name, board in boards.dashboards().items():
        (out / name).write_text(boards.text(board))
        click.echo(out / name)


@main.command("deploy-profile")
@click.argument("profile", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--top", default=10, show_default=True, help="Operations to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def deploy_profile(profile: Path, top: int, as_json: bool) -> None:
    """Where a deploy's time went, from the file a deploy run with
    DISAGG_PROFILE=FILE wrote: planning, execution, the critical path, the
    slowest operations overall and on each host."""
    from . import profile as profiling

    try:
        summary = profiling.summary(json.loads(profile.read_text()), top)
    except (ValueError, KeyError) as e:
        _fail(TopologyError(f"{profile}: not a deploy profile ({e})"))
    click.echo(json.dumps(summary, indent=2) if as_json else profiling.text(summary, top))
