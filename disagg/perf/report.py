"""`disagg report`: the Pareto plot (tokens/s/GPU against tokens/s/user) and
the best layout per label at an SLA, from recorded runs only."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from disagg.core.errors import UsageError
from disagg.core.topology import Topology
from disagg.perf import results
from disagg.perf.extras import module
from disagg.perf.results import Point


@dataclass(frozen=True)
class Pick:
    label: str
    per_gpu: float
    per_user: float
    how: str  # "measured at c8" or "interpolated between c8 and c16"


def frontier(points: list[Point]) -> list[Point]:
    """Points no other point beats on both axes, by falling tokens/s/user."""
    best: list[Point] = []
    for p in sorted(points, key=lambda p: (-p.per_user, -p.per_gpu)):
        if not best or p.per_gpu > best[-1].per_gpu:
            best.append(p)
    return best


def pick(points: list[Point], sla_per_user: float, sla_ttft_ms: float | None = None) -> Pick | None:
    """Best tokens/s/GPU with tokens/s/user >= the SLA (and TTFT within it):
    a measured point, or the SLA crossing between two neighbouring
    concurrencies, interpolated linearly, when that is higher."""

    def meets_ttft(ttft: float) -> bool:
        return sla_ttft_ms is None or ttft <= sla_ttft_ms

    candidates = [
        Pick(p.label, p.per_gpu, p.per_user, f"measured at c{p.concurrency}")
        for p in points
        if p.per_user >= sla_per_user and meets_ttft(p.ttft)
    ]
    ordered = sorted(points, key=lambda p: p.concurrency)
    for a, b in zip(ordered, ordered[1:]):
        if a.per_user > sla_per_user > b.per_user:
            f = (a.per_user - sla_per_user) / (a.per_user - b.per_user)
            if meets_ttft(a.ttft + f * (b.ttft - a.ttft)):
                candidates.append(
                    Pick(
                        a.label,
                        a.per_gpu + f * (b.per_gpu - a.per_gpu),
                        sla_per_user,
                        f"interpolated between c{a.concurrency} and c{b.concurrency}",
                    )
                )
    return max(candidates, key=lambda c: c.per_gpu, default=None)


COMPARE_COLUMNS = [
    "label",
    "concurrency",
    "predicted_per_gpu",
    "measured_per_gpu",
    "predicted_per_user",
    "measured_per_user",
    "predicted_ttft_ms",
    "measured_ttft_ms",
]


def compare(by_label: dict[str, list[Point]], predicted: dict[str, dict]) -> list[dict]:
    """Predicted against measured, per label and concurrency: every measured
    point of a predicted label, and each prediction (on the measured row of
    the same concurrency when there is one)."""
    rows: dict[tuple[str, int], dict] = {}

    def row(label: str, concurrency: int) -> dict:
        return rows.setdefault(
            (label, concurrency), {c: None for c in COMPARE_COLUMNS} | {"label": label, "concurrency": concurrency}
        )

    for label in predicted:
        for p in by_label.get(label, []):
            row(label, p.concurrency).update(
                measured_per_gpu=p.per_gpu, measured_per_user=p.per_user, measured_ttft_ms=p.ttft
            )
    for label, p in predicted.items():
        row(label, p["concurrency"]).update(
            predicted_per_gpu=p["tokens_per_gpu"],
            predicted_per_user=p["tokens_per_user"],
            predicted_ttft_ms=p["ttft_ms"],
        )
    return [rows[k] for k in sorted(rows)]


def plot(
    by_label: dict[str, list[Point]], sla_per_user: float | None, path: Path, predicted: dict[str, dict] | None = None
) -> dict:
    """Draw the PNG and return what it shows (kept beside it as JSON);
    predictions as open diamonds in their label's colour."""
    matplotlib = module("matplotlib", "bench")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown: dict = {"x": "tokens/s/user", "y": "tokens/s/GPU", "sla_per_user": sla_per_user, "series": {}}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {}
    for label, points in sorted(by_label.items()):
        line = ax.plot([p.per_user for p in points], [p.per_gpu for p in points], "o", label=label)[0]
        colors[label] = line.get_color()
        front = frontier(points)
        ax.plot([p.per_user for p in front], [p.per_gpu for p in front], "-", color=line.get_color())
        for p in points:
            ax.annotate(
                f"c{p.concurrency}", (p.per_user, p.per_gpu), fontsize=7, textcoords="offset points", xytext=(3, 3)
            )
        shown["series"][label] = {
            "points": [[p.concurrency, p.per_user, p.per_gpu] for p in points],
            "frontier": [p.concurrency for p in front],
        }
    if predicted:
        shown["predicted"] = {}
        for label, p in sorted(predicted.items()):
            ax.plot(
                [p["tokens_per_user"]],
                [p["tokens_per_gpu"]],
                "D",
                mfc="none",
                color=colors.get(label, "black"),
                label=f"{label} predicted (c{p['concurrency']})",
            )
            shown["predicted"][label] = [p["concurrency"], p["tokens_per_user"], p["tokens_per_gpu"]]
    if sla_per_user is not None:
        ax.axvline(sla_per_user, linestyle="--", color="grey", label=f"SLA {sla_per_user:g} tokens/s/user")
    ax.set_xlabel("tokens/s/user")
    ax.set_ylabel("tokens/s/GPU")
    ax.set_title("Throughput per GPU against interactivity (frontier as lines)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    results.write_atomic(path.with_suffix(".json"), json.dumps(shown, indent=2) + "\n")
    return shown


def deployments(rows: list[dict]) -> dict[str, list[str]]:
    """Each label's deployments (the hashes of what the hosts ran, from the
    runs' provenance; "unknown" for a run without one)."""
    seen: dict[str, set[str]] = {}
    for r in rows:
        seen.setdefault(r["label"], set()).add(r.get("deployment") or "unknown")
    return {label: sorted(h) for label, h in seen.items()}


def report(
    dirs: list[Path],
    out: Path,
    sla_per_user: float | None,
    sla_ttft_ms: float | None,
    predicted: dict[str, dict] | None = None,
    split_deployments: bool = False,
) -> dict:
    """Tables, plot and picks over recorded runs; with predictions (label ->
    AIConfigurator's point, from `disagg plan`), also predicted.{csv,json,md}
    and the predicted points on the plot."""
    rows = [r for d in results.run_dirs(dirs) for r in results.load_run(d)]
    hashes = deployments(rows)
    mixed = {label: h for label, h in hashes.items() if len(h) > 1}
    if mixed and not split_deployments:
        raise UsageError(
            "; ".join(
                f"{label} was measured on {len(h)} different deployments ({', '.join(h)})"
                for label, h in sorted(mixed.items())
            )
            + ": their points are not one series; give --split-deployments to draw each apart, "
            "or report the runs of one deployment"
        )
    results.write_tables(rows, out, "report")
    by_label: dict[str, list[Point]] = {}
    for r in rows:
        p = results.point(r)
        if p.per_user is not None and p.per_gpu is not None:
            series = f"{p.label} @{r['deployment']}" if p.label in mixed else p.label
            by_label.setdefault(series, []).append(p)
    shown = plot(by_label, sla_per_user, out / "pareto.png", predicted)
    summary = {
        "rows": rows,
        "plot": str(out / "pareto.png"),
        "series": sorted(shown["series"]),
        "picks": {},
        "deployments": hashes,
    }
    if predicted:
        summary["predicted"] = compare(by_label, predicted)
        results.write_tables(summary["predicted"], out, "predicted", COMPARE_COLUMNS)
    if sla_per_user is not None:
        picks = {label: pick(points, sla_per_user, sla_ttft_ms) for label, points in by_label.items()}
        summary["picks"] = {k: (v.__dict__ if v else None) for k, v in picks.items()}
        best = {}
        for p in picks.values():
            kind = "disaggregated" if p and Topology.parse(p.label).disaggregated else "baseline"
            if p and (kind not in best or p.per_gpu > best[kind].per_gpu):
                best[kind] = p
        if "disaggregated" in best and "baseline" in best:
            summary["ratio"] = best["disaggregated"].per_gpu / best["baseline"].per_gpu
            summary["ratio_of"] = [best["disaggregated"].label, best["baseline"].label]
    return summary
