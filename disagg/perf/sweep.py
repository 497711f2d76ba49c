"""`disagg sweep`: deploy each label in turn, wait until it is ready,
benchmark it, and tear down at the end; resumable (a label whose results
are complete is skipped) and closed by the report, with AIConfigurator's
predictions beside the measurements when a plan is given."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from disagg import deploys
from disagg.core.plan import Plan, make_plan
from disagg.core.topology import Topology
from disagg.infra.inventory import load_inventory
from disagg.infra.launch import run_deploy
from disagg.perf import bench, results
from disagg.perf.report import report


def label_key(label: str) -> str:
    """The inventory data key that a label is deployed under."""
    return "label" if Topology.parse(label).disaggregated else "baseline_label"


def complete_run(out_root: Path, label: str, concurrencies: list[int]) -> Path | None:
    """A run of label that measured every concurrency without an error."""
    for provenance in sorted((out_root / label).glob(f"*/{results.PROVENANCE}"), reverse=True):
        runs = json.loads(provenance.read_text()).get("runs", [])
        if set(concurrencies) <= {r["concurrency"] for r in runs if not r.get("error")}:
            return provenance.parent
    return None


def sweep(
    inventory_path: str,
    labels: list[str],
    concurrencies: list[int],
    traffic: bench.Traffic,
    out_root: Path,
    predicted: dict[str, dict] | None = None,
    teardown: bool = True,
    ready_timeout: float = 600,
    sla_per_user: float | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> dict:
    """Every label validated and placed first, so that a bad one stops the
    sweep before any host is touched; then deploy (which waits until ready),
    bench, per label."""
    bench.aiperf_binary()
    inventory = load_inventory(inventory_path)
    plans: dict[str, Plan] = {label: make_plan(inventory, label, label_key=label_key(label)) for label in labels}
    timings: dict[str, dict] = {}
    for i, (label, plan) in enumerate(plans.items(), 1):
        done = complete_run(out_root, label, concurrencies)
        if done:
            progress(f"[{i}/{len(plans)}] {label}: complete results in {done}, skipped")
            continue
        kind = "disagg" if plan.topology.disaggregated else "baseline"
        progress(f"[{i}/{len(plans)}] {label}: deploying (deploys/{kind}.py)")
        start = time.monotonic()
        # the deploy ends with its readiness gate (`disagg status --wait` on the head)
        run_deploy(
            inventory_path,
            str(deploys.path(kind)),
            f"{label_key(label)}={label}",
            f"ready_timeout={int(ready_timeout)}",
        )
        deployed = time.monotonic() - start
        progress(f"[{i}/{len(plans)}] {label}: ready after {deployed:.0f} s, benchmarking")
        run_dir = bench.sweep(bench.target_for(inventory, plan), concurrencies, traffic, out_root, progress)
        timings[label] = {
            "deploy_s": round(deployed, 1),
            "bench_s": round(time.monotonic() - start - deployed, 1),
            "run_dir": str(run_dir),
        }
    # a failure above leaves the hosts as they are, to look at
    if teardown:
        progress("teardown (deploys/teardown.py)")
        run_deploy(inventory_path, str(deploys.path("teardown")))
    summary = report([out_root / label for label in labels], out_root, sla_per_user, None, predicted)
    summary["sweep"] = timings
    return summary
