"""Benchmark results: aiperf (or older genai-perf) exports read from a run
directory, and every table cell computed from them and the topology.

A run directory is OUT/<label>/<run-id>/ with provenance.json and one
c<N>/ directory per concurrency holding the client's raw export."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from disagg.core.errors import UsageError
from disagg.core.topology import Topology

EXPORTS = ("profile_export_aiperf.json", "profile_export_genai_perf.json")
PROVENANCE = "provenance.json"
COLUMNS = [
    "label",
    "configuration",
    "concurrency",
    "output_token_throughput_per_user",
    "output_token_throughput_per_gpu",
    "time_to_first_token",
    "inter_token_latency",
    "time_to_first_token_p90",
    "time_to_first_token_p99",
    "inter_token_latency_p90",
    "inter_token_latency_p99",
    "request_throughput",
    "requests",
    "errors",
    "status",
    "run",
    "deployment",
]


@dataclass(frozen=True)
class Point:
    """One concurrency of one run, as the table and the report see it."""

    label: str
    concurrency: int
    per_user: float | None
    per_gpu: float | None
    ttft: float | None
    itl: float | None
    row: dict


def read_export(directory: Path) -> dict | None:
    for name in EXPORTS:
        if (directory / name).is_file():
            return json.loads((directory / name).read_text())
    return None


def _stat(export: dict, metric: str, stat: str = "avg") -> float | None:
    value = (export.get(metric) or {}).get(stat)
    return None if value is None else float(value)


def error_count(export: dict) -> int:
    """Failed requests in aiperf's error_summary (a list of {count, ...})."""
    summary = export.get("error_summary") or []
    if isinstance(summary, dict):
        summary = list(summary.values())
    return int(sum(item.get("count", 1) if isinstance(item, dict) else 1 for item in summary))


def row(
    label: str, concurrency: int, export: dict | None, run: str, error: str | None = None, deployment: str | None = None
) -> dict:
    """One table row. tokens/s/GPU = output_token_throughput / the topology's
    GPUs; tokens/s/user is the client's own per-user figure (genai-perf
    called it output_token_throughput_per_request)."""
    topology = Topology.parse(label)
    out = {c: None for c in COLUMNS}
    # deployment: the hash of what the hosts ran (disagg/infra/fingerprint.py)
    out.update(
        label=label, configuration=topology.configuration, concurrency=concurrency, run=run, deployment=deployment
    )
    if export is None:
        out.update(status=f"error: {error or 'no export'}")
        return out
    per_user = _stat(export, "output_token_throughput_per_user")
    if per_user is None:
        per_user = _stat(export, "output_token_throughput_per_request")
    throughput = _stat(export, "output_token_throughput")
    errors = error_count(export)
    out.update(
        output_token_throughput_per_user=per_user,
        output_token_throughput_per_gpu=None if throughput is None else throughput / topology.gpus,
        time_to_first_token=_stat(export, "time_to_first_token"),
        inter_token_latency=_stat(export, "inter_token_latency"),
        time_to_first_token_p90=_stat(export, "time_to_first_token", "p90"),
        time_to_first_token_p99=_stat(export, "time_to_first_token", "p99"),
        inter_token_latency_p90=_stat(export, "inter_token_latency", "p90"),
        inter_token_latency_p99=_stat(export, "inter_token_latency", "p99"),
        request_throughput=_stat(export, "request_throughput"),
        requests=_stat(export, "request_count"),
        errors=errors,
        status="ok" if not errors and not error else f"error: {error or f'{errors} failed requests'}",
    )
    return out


def run_dirs(paths: list[Path]) -> list[Path]:
    """Every run directory (holding provenance.json) at or below paths."""
    found = []
    for path in paths:
        if (path / PROVENANCE).is_file():
            found.append(path)
        else:
            found.extend(sorted(p.parent for p in path.glob(f"**/{PROVENANCE}")))
    if not found:
        raise UsageError(f"no benchmark runs (with {PROVENANCE}) under {', '.join(map(str, paths))}")
    return sorted(set(found))


def load_run(directory: Path) -> list[dict]:
    """The rows of one run directory; refuses a run filed under another
    label's directory, so that labels are never mixed silently."""
    provenance = json.loads((directory / PROVENANCE).read_text())
    label = provenance["label"]
    if directory.parent.name != label and directory.parent.name.startswith(("context_", "baseline_")):
        raise UsageError(
            f"run {directory} was recorded for label {label!r} but lies under {directory.parent.name!r}; "
            "move it under its own label's directory"
        )
    rows = []
    deployment = (provenance.get("deployment") or {}).get("hash")
    for entry in provenance.get("runs", []):
        c = int(entry["concurrency"])
        rows.append(row(label, c, read_export(directory / f"c{c}"), directory.name, entry.get("error"), deployment))
    return rows


def point(r: dict) -> Point:
    ok = r["status"] == "ok"
    return Point(
        r["label"],
        r["concurrency"],
        r["output_token_throughput_per_user"] if ok else None,
        r["output_token_throughput_per_gpu"] if ok else None,
        r["time_to_first_token"] if ok else None,
        r["inter_token_latency"] if ok else None,
        r,
    )


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def markdown(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write a results file so that a reader (or a crash) never sees half of
    it: a temporary file beside it, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_tables(rows: list[dict], directory: Path, stem: str = "table", columns: list[str] = COLUMNS) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    files = {
        directory / f"{stem}.csv": buffer.getvalue(),
        directory / f"{stem}.json": json.dumps(rows, indent=2) + "\n",
        directory / f"{stem}.md": markdown(rows, columns),
    }
    for path, text in files.items():
        write_atomic(path, text)
    return list(files)
