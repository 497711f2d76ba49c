"""Grafana dashboards for a deployment, built on the recording rules of
templates/prometheus-rules.yml.j2: one for the layout, one for a worker.
`disagg dashboards -o DIR` writes them; dashboards/ in the repository holds
the same files for importing by hand (Dashboards > New > Import), and a test
keeps the two equal. Every panel's query is evaluated against the test
stack's Prometheus (tests/e2e); panels in GPU_ONLY read DCGM, which only
GPU hosts have."""

from __future__ import annotations

import json
from dataclasses import dataclass

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
L = 'layout="$layout"'
W = 'layout="$layout", worker="$worker"'


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    # (PromQL, legend)
    targets: tuple[tuple[str, str], ...]


def _quantiles(metric: str, match: str, legend: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{metric.format(q=q)}{{{match}}}", f"{legend} p{q}") for q in (50, 90, 99))


LAYOUT = (
    Panel("Output tokens/s", "short", ((f"layout:vllm_output_tokens:rate1m{{{L}}}", "layout"),)),
    Panel(
        "Output tokens/s per GPU",
        "short",
        (
            (f"layout:vllm_output_tokens_per_gpu:rate1m{{{L}}}", "layout"),
            (f"role:vllm_output_tokens_per_gpu:rate1m{{{L}}}", "{{role}}"),
        ),
    ),
    Panel("Tokens/s per user", "short", ((f"layout:vllm_output_tokens_per_user:rate1m{{{L}}}", "layout"),)),
    Panel("Time to first token", "s", _quantiles("role:vllm_ttft_seconds:p{q}_1m", L, "{{role}}")),
    Panel("Inter-token latency", "s", _quantiles("role:vllm_itl_seconds:p{q}_1m", f'{L}, role!="context"', "{{role}}")),
    Panel(
        "Requests running / waiting",
        "short",
        (
            (f"role:vllm_requests_running:sum{{{L}}}", "{{role}} running"),
            (f"role:vllm_requests_waiting:sum{{{L}}}", "{{role}} waiting"),
        ),
    ),
    Panel("KV cache usage", "percentunit", ((f"role:vllm_kv_cache_usage:avg{{{L}}}", "{{role}}"),)),
    Panel("Prefix cache hit rate", "percentunit", ((f"role:vllm_prefix_cache_hit:ratio_1m{{{L}}}", "{{role}}"),)),
    Panel("KV transfer bytes/s", "Bps", ((f"role:vllm_nixl_bytes:rate1m{{{L}}}", "{{role}}"),)),
    Panel(
        "KV transfer time",
        "s",
        (
            (f'role:vllm_nixl_xfer_seconds:mean_1m{{{L}, role="generate"}}', "mean"),
            (f'role:vllm_nixl_xfer_seconds:p90_1m{{{L}, role="generate"}}', "p90"),
        ),
    ),
    Panel("Failed KV transfers/s", "short", ((f"role:vllm_nixl_failed_transfers:rate1m{{{L}}}", "{{role}}"),)),
    Panel("Router requests/s per worker", "reqps", ((f"router:requests:rate1m{{{L}}}", "{{worker}}"),)),
    Panel("Router errors/s", "reqps", ((f"router:errors:rate1m{{{L}}}", "errors"),)),
    Panel("Router request duration p90", "s", ((f"router:request_duration_seconds:p90_1m{{{L}}}", "p90"),)),
    Panel("Workers in the router", "short", ((f"sum by (role) (disagg_worker_routed{{{L}}})", "{{role}}"),)),
    Panel(
        "Front door: retries and errors/s",
        "reqps",
        (
            (f"frontdoor:retries:rate1m{{{L}}}", "retries"),
            (f'frontdoor:responses:rate1m{{{L}, code=~"4xx|5xx"}}', "{{code}}"),
        ),
    ),
    Panel("Front door queue time", "s", ((f"frontdoor:queue_time_seconds:avg{{{L}}}", "average"),)),
    Panel("NATS connections", "short", (("gnatsd_varz_connections", "connections"),)),
    Panel("GPU utilization", "percent", (("avg by (host) (DCGM_FI_DEV_GPU_UTIL)", "{{host}}"),)),
    Panel("GPU memory used", "decmbytes", (("sum by (host) (DCGM_FI_DEV_FB_USED)", "{{host}}"),)),
)

WORKER = (
    Panel(
        "Output tokens/s",
        "short",
        (
            (f"worker:vllm_output_tokens:rate1m{{{W}}}", "output"),
            (f"worker:vllm_prompt_tokens:rate1m{{{W}}}", "prompt"),
        ),
    ),
    Panel("Output tokens/s per GPU", "short", ((f"worker:vllm_output_tokens_per_gpu:rate1m{{{W}}}", "{{worker}}"),)),
    Panel("Requests/s", "reqps", ((f"worker:vllm_requests:rate1m{{{W}}}", "finished"),)),
    Panel(
        "Requests running / waiting",
        "short",
        (
            (f"worker:vllm_requests_running:sum{{{W}}}", "running"),
            (f"worker:vllm_requests_waiting:sum{{{W}}}", "waiting"),
        ),
    ),
    Panel(
        "Latency p90",
        "s",
        ((f"worker:vllm_ttft_seconds:p90_1m{{{W}}}", "TTFT"), (f"worker:vllm_itl_seconds:p90_1m{{{W}}}", "ITL")),
    ),
    Panel("KV cache usage", "percentunit", ((f"worker:vllm_kv_cache_usage:ratio{{{W}}}", "{{worker}}"),)),
    Panel("KV transfer bytes/s", "Bps", ((f"worker:vllm_nixl_bytes:rate1m{{{W}}}", "{{worker}}"),)),
    Panel("GPUs placed", "short", ((f"worker:gpus:sum{{{W}}}", "{{worker}}"),)),
    Panel("GPU utilization", "percent", (('DCGM_FI_DEV_GPU_UTIL{host="$host"}', "GPU {{gpu}}"),)),
)

# panels that read DCGM: data only where NVIDIA GPUs are
GPU_ONLY = {"GPU utilization", "GPU memory used"}


def _variable(name: str, query: str) -> dict:
    return {
        "name": name,
        "type": "query",
        "datasource": DATASOURCE,
        "refresh": 2,
        "sort": 1,
        "query": {"query": query, "refId": name},
        "definition": query,
    }


def _dashboard(uid: str, title: str, panels: tuple[Panel, ...], variables: list[dict]) -> dict:
    out = []
    for i, p in enumerate(panels):
        out.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": p.title,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 8, "x": 8 * (i % 3), "y": 8 * (i // 3)},
                "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend, "datasource": DATASOURCE}
                    for j, (expr, legend) in enumerate(p.targets)
                ],
            }
        )
    datasource = {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}
    return {
        "uid": uid,
        "title": title,
        "tags": ["disagg"],
        "schemaVersion": 39,
        "editable": True,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "templating": {"list": [datasource, *variables]},
        "panels": out,
    }


def dashboards() -> dict[str, dict]:
    """{file name: dashboard JSON}."""
    layout = _variable("layout", "label_values(layout:gpus:sum, layout)")
    return {
        "disagg-layout.json": _dashboard("disagg-layout", "disagg: layout", LAYOUT, [layout]),
        "disagg-worker.json": _dashboard(
            "disagg-worker",
            "disagg: worker",
            WORKER,
            [
                layout,
                _variable("worker", 'label_values(worker:gpus:sum{layout="$layout"}, worker)'),
                _variable("host", 'label_values(worker:gpus:sum{layout="$layout", worker="$worker"}, host)'),
            ],
        ),
    }


def text(dashboard: dict) -> str:
    return json.dumps(dashboard, indent=2) + "\n"


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in a dashboard's JSON."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
