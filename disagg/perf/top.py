"""`disagg top`: the layout live, from Prometheus's recording rules
(templates/prometheus-rules.yml.j2): every worker's load, throughput and
latency, and the layout's tokens/s per GPU and per user against the SLA.
It reads Prometheus only: no NATS password, nothing on the hosts."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field

from disagg.core.errors import HostError

# column: recording rule (per worker, by layout, role, worker, host)
WORKER_RULES = {
    "gpus": "worker:gpus:sum",
    "running": "worker:vllm_requests_running:sum",
    "waiting": "worker:vllm_requests_waiting:sum",
    "output_tokens_per_s": "worker:vllm_output_tokens:rate1m",
    "prompt_tokens_per_s": "worker:vllm_prompt_tokens:rate1m",
    "ttft_p90_s": "worker:vllm_ttft_seconds:p90_1m",
    "itl_p90_s": "worker:vllm_itl_seconds:p90_1m",
    "kv_cache_usage": "worker:vllm_kv_cache_usage:ratio",
    "kv_transfer_bytes_per_s": "worker:vllm_nixl_bytes:rate1m",
}
LAYOUT_RULES = {
    "gpus": "layout:gpus:sum",
    "output_tokens_per_s": "layout:vllm_output_tokens:rate1m",
    "tokens_per_s_per_gpu": "layout:vllm_output_tokens_per_gpu:rate1m",
    "tokens_per_s_per_user": "layout:vllm_output_tokens_per_user:rate1m",
    "router_errors_per_s": "router:errors:rate1m",
    "frontdoor_retries_per_s": "frontdoor:retries:rate1m",
    "frontdoor_queue_time_s": "frontdoor:queue_time_seconds:avg",
}


class PrometheusError(HostError):
    pass


@dataclass
class Sla:
    tokens_per_user: float
    ttft_ms: float | None = None


@dataclass
class Snapshot:
    layout: str
    workers: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    sla: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def query(prometheus: str, promql: str, timeout: float = 5.0) -> list[tuple[dict, float | None]]:
    """(labels, value) of an instant query; NaN (no data in the window) -> None."""
    url = f"{prometheus.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise PrometheusError(
            f"Prometheus at {prometheus} does not answer ({getattr(e, 'reason', e)}); "
            "check the address, or that the firewall admits this machine (firewall_allow)"
        ) from None
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus refused {promql!r}: {body.get('error')}")
    out = []
    for r in body["data"]["result"]:
        value = float(r["value"][1])
        out.append((r["metric"], None if math.isnan(value) or math.isinf(value) else value))
    return out


def snapshot(prometheus: str, layout: str, sla: Sla) -> Snapshot:
    match = f'{{layout="{layout}"}}'
    rows: dict[str, dict] = {}
    for column, rule in WORKER_RULES.items():
        for labels, value in query(prometheus, rule + match):
            row = rows.setdefault(
                labels["worker"],
                {
                    "worker": labels["worker"],
                    "role": labels.get("role"),
                    "host": labels.get("host"),
                    **dict.fromkeys(WORKER_RULES),
                },
            )
            row[column] = value
    totals = {
        column: next((v for _, v in query(prometheus, rule + match)), None) for column, rule in LAYOUT_RULES.items()
    }
    ttft = query(prometheus, f'role:vllm_ttft_seconds:p90_1m{{layout="{layout}", role=~"context|baseline"}}')
    totals["ttft_p90_s"] = ttft[0][1] if ttft else None
    by_class = {labels.get("code"): value for labels, value in query(prometheus, "frontdoor:responses:rate1m" + match)}
    totals["frontdoor_4xx_per_s"], totals["frontdoor_5xx_per_s"] = by_class.get("4xx"), by_class.get("5xx")
    per_user = totals["tokens_per_s_per_user"]
    met = None if per_user is None else per_user >= sla.tokens_per_user
    if met is not None and sla.ttft_ms is not None:
        met = met and totals["ttft_p90_s"] is not None and totals["ttft_p90_s"] * 1000 <= sla.ttft_ms
    order = {"context": 0, "generate": 1, "baseline": 2}
    workers = sorted(rows.values(), key=lambda r: (order.get(r["role"], 9), r["worker"]))
    return Snapshot(layout, workers, totals, {**asdict(sla), "met": met})


def _num(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:,.{digits}f}"


def render(snap: Snapshot, prometheus: str):
    """A rich renderable of the snapshot."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    # escaped: rich reads an IPv6 URL's [address] as markup and drops it
    table = Table(title=f"{snap.layout}  ({escape(prometheus)}; last minute; times in ms)", title_justify="left")
    for name in (
        "worker",
        "host",
        "GPUs",
        "run",
        "wait",
        "out tok/s",
        "in tok/s",
        "TTFT p90",
        "ITL p90",
        "KV use %",
        "KV in MB/s",
    ):
        table.add_column(name, justify="left" if name in ("worker", "host") else "right", no_wrap=True)
    for w in snap.workers:
        table.add_row(
            w["worker"],
            w["host"],
            _num(w["gpus"], digits=0),
            _num(w["running"], digits=0),
            _num(w["waiting"], digits=0),
            _num(w["output_tokens_per_s"]),
            _num(w["prompt_tokens_per_s"]),
            _num(w["ttft_p90_s"], 1000),
            _num(w["itl_p90_s"], 1000),
            _num(w["kv_cache_usage"], 100),
            _num(w["kv_transfer_bytes_per_s"], 1e-6, 2),
        )
    t, sla = snap.totals, snap.sla
    verdict = {True: "[green]met[/]", False: "[red]not met[/]", None: "no traffic"}[sla["met"]]
    ttft_sla = f", TTFT p90 <= {sla['ttft_ms']:g} ms" if sla["ttft_ms"] else ""
    summary = (
        f"layout: {_num(t['output_tokens_per_s'])} output tokens/s on {_num(t['gpus'], digits=0)} GPUs = "
        f"[bold]{_num(t['tokens_per_s_per_gpu'])} tokens/s/GPU[/], [bold]{_num(t['tokens_per_s_per_user'])} "
        f"tokens/s/user[/], TTFT p90 {_num(t['ttft_p90_s'], 1000, 0)} ms, router errors "
        f"{_num(t['router_errors_per_s'], digits=2)}/s\n"
        f"front door: {_num(t['frontdoor_retries_per_s'], digits=2)} retries/s, 4xx "
        f"{_num(t['frontdoor_4xx_per_s'], digits=2)}/s, 5xx {_num(t['frontdoor_5xx_per_s'], digits=2)}/s, "
        f"queued {_num(t['frontdoor_queue_time_s'], 1000, 1)} ms on average\n"
        f"SLA {sla['tokens_per_user']:g} tokens/s/user{ttft_sla}: {verdict}"
    )
    return Group(table, summary)
