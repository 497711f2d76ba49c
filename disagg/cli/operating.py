"""`disagg` commands: a deployment running: status, preflight, top, dashboards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from disagg.agent import kv
from disagg.core.errors import HostError, InventoryError, UsageError
from disagg.core.plan import make_plan
from disagg.infra.inventory import load_inventory


@click.command()
@click.option(
    "-i", "--inventory", "inventory_path", help="Inventory of the deployment (NATS, router, expected workers)."
)
@click.option(
    "--label-key",
    default="label",
    show_default=True,
    help="Inventory data key of the deployed label (baseline_label for the baseline).",
)
@click.option("--label", help="The deployed label, instead of the inventory's.")
@click.option("--nats", "nats_url", help="tls://HOST:PORT (with --ca), instead of an inventory.")
@click.option(
    "--ca",
    type=click.Path(exists=True, dir_okay=False),
    help="CA certificate of the deployment's NATS (with --nats; `disagg tls` says where it is).",
)
@click.option("--user", default="disagg", show_default=True, help="NATS user (with --nats).")
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False),
    help=f"File holding the NATS password (with --nats; default: ${kv.PASSWORD_ENV}).",
)
@click.option("--router", "router_url", help="Router URL (with --nats).")
@click.option("--router-metrics", help="Router's Prometheus URL, e.g. http://HEAD:29000/metrics (with --nats).")
@click.option("--wait", is_flag=True, help="Block until every deployed worker is healthy and routed.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to --wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(
    inventory_path,
    label_key,
    label,
    nats_url,
    ca,
    user,
    password_file,
    router_url,
    router_metrics,
    wait,
    timeout,
    as_json,
):
    """Workers in the registry (role, host, GPUs, URL, health, heartbeat age,
    whether the router itself lists it, requests the router sent each,
    requests running on each), NATS and router health. Exit 0 when ready, 1
    when not (naming what is missing), 3 when it cannot tell (NATS or the
    head unreachable)."""
    import asyncio

    from disagg.agent import status as agent_status
    from disagg.infra import control

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
            current = asyncio.run(
                agent_status.wait_ready(*args, timeout=timeout, **kw) if wait else agent_status.status(*args, **kw)
            )
        else:
            raise UsageError("give -i INVENTORY, or --nats tls://HOST:PORT --ca FILE")
    except OSError as e:
        raise HostError(str(e)) from None
    click.echo(json.dumps(current.as_dict(), indent=2) if as_json else agent_status.table(current))
    sys.exit(current.exit_code)


@click.command()
@click.argument("label", required=False)
@click.option("-i", "--inventory", "inventory_path", required=True, help="Inventory of the hosts to check.")
@click.option(
    "--label-key", default="label", show_default=True, help="Inventory data naming the label: label or baseline_label."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def preflight(label, inventory_path, label_key, as_json):
    """Check the hosts before deploying LABEL (default: the inventory's):
    ports free or ours, GPUs as the inventory says, the NIXL side channels
    reachable from the generate hosts, the model's heads against each
    role's TP, engine versions, free disk. Changes nothing; exit 0 when
    nothing is wrong, 1 listing every problem (one line each)."""
    from disagg.infra import preflight as checks
    from disagg.infra import remote

    inventory = load_inventory(inventory_path)
    plan = make_plan(inventory, label, label_key=label_key)
    # pyinfra's warnings as before: this command talks to the hosts for the user
    with remote.connected(inventory, quiet=False) as state:
        report = checks.run(state, plan)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for reason in report.skipped:
            click.echo(f"skipped: {reason}")
        for p in report.problems:
            click.echo(p.line())
        click.echo(
            f"{plan.label}: {'ok' if report.ok else f'{len(report.problems)} problem(s)'} ({report.seconds:.1f} s)"
        )
    sys.exit(0 if report.ok else 1)


@click.command()
@click.option(
    "-i", "--inventory", "inventory_path", help="Inventory of the deployment (Prometheus address, label, SLA)."
)
@click.option(
    "--label-key", default="label", show_default=True, help="Inventory data naming the label: label or baseline_label."
)
@click.option("--prometheus", "prometheus_url", help="Prometheus URL, e.g. http://HEAD:9090, instead of an inventory.")
@click.option("--layout", help="The layout's label (default: the inventory's).")
@click.option(
    "--sla-tokens-per-user", type=float, help="Tokens/s each user must see (default: data sla_tokens_per_user)."
)
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

    from disagg.perf import top as live

    try:
        sla = live.Sla(sla_tokens_per_user or 50.0, sla_ttft_ms)
        if inventory_path:
            plan = make_plan(load_inventory(inventory_path), layout, label_key=label_key)
            s = plan.settings
            if not s.prometheus:
                raise InventoryError("prometheus is False in the inventory: nothing to read; deploy with it on")
            if s.prometheus_listen == "loopback" and not prometheus_url:
                raise UsageError(
                    f"Prometheus listens on the head's loopback (prometheus_listen=loopback): run "
                    f"ssh -L {s.prometheus_port}:127.0.0.1:{s.prometheus_port} {plan.cluster.head} and "
                    f"give --prometheus http://127.0.0.1:{s.prometheus_port}"
                )
            prometheus_url = prometheus_url or plan.prometheus_url
            layout = plan.label
            sla = live.Sla(sla_tokens_per_user or s.sla_tokens_per_user, sla_ttft_ms or s.sla_ttft_ms)
        elif not (prometheus_url and layout):
            raise UsageError("give -i INVENTORY, or --prometheus URL --layout LABEL")
        if as_json and not once:
            raise UsageError("--json goes with --once")
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
    except KeyboardInterrupt:
        pass


@click.command()
@click.option(
    "-o",
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the dashboards' JSON into.",
)
def dashboards(out: Path) -> None:
    """Write the Grafana dashboards (layout, worker) built on disagg's
    recording rules; import them in Grafana (Dashboards > New > Import)
    with a Prometheus data source pointing at the head's Prometheus."""
    from disagg.core import dashboards as boards

    out.mkdir(parents=True, exist_ok=True)
    for name, board in boards.dashboards().items():
        (out / name).write_text(boards.text(board))
        click.echo(out / name)


COMMANDS = (
    status,
    preflight,
    top,
    dashboards,
)
