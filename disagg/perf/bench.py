"""`disagg bench`: the reference study's traffic through aiperf, one run per
concurrency, raw exports kept under OUT/<label>/<run-id>/c<N>/ with the
provenance beside them."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from disagg.core.errors import HostError
from disagg.core.schema import SECRETS
from disagg.core.topology import Topology
from disagg.perf import kvtransfer, results
from disagg.perf.extras import run_logged, tool

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Traffic:
    """The reference study's traffic: streaming chat, fixed lengths."""

    isl: int = 3000
    osl: int = 150
    requests_per_concurrency: int = 10
    warmup_requests: int = 2
    seed: int = 0
    # seconds one aiperf run (one concurrency) may take before it is stopped
    run_timeout: float = 3600


@dataclass
class Target:
    url: str
    label: str
    model: str
    tokenizer: str
    # the router itself (its /workers), where the front door before it (url) passes inference only
    router_url: str | None = None
    # a client key the front door asks (never recorded in the provenance)
    api_key: str | None = field(default=None, repr=False)
    placement: list[dict] | None = None
    worker_urls: list[str] | None = None  # what the router should route to
    # what it routes to, when its own /workers cannot tell (PD service discovery)
    routed: list[str] | None = None
    engine: dict | None = None
    # the generate workers, whose KV-transfer counters each run records
    kv_urls: list[str] = field(default_factory=list)
    kv_connector: str | None = None
    # what the hosts run (disagg/infra/fingerprint.py): files' hashes, versions
    deployment: dict | None = None
    extra: dict = field(default_factory=dict)


def aiperf_binary() -> str:
    return tool("aiperf", "aiperf", "bench")


def target_for(
    inventory, plan, url: str | None = None, model: str | None = None, tokenizer: str | None = None
) -> Target:
    """What to benchmark for a deployed plan: its router, model, tokenizer,
    placement and engine settings, and the members the router has."""
    from disagg.infra import control, fingerprint

    s = plan.settings
    routed = None
    if plan.topology.disaggregated:  # vllm-router's /workers does not list members found by discovery
        routed = control.status(inventory, plan).members
        if routed is None:
            raise HostError(
                f"the router sync on {plan.cluster.head} has not reported its members; "
                f"see `disagg status -i INVENTORY` and `journalctl -u disagg-registry-sync`"
            )
    deployment = fingerprint.of_inventory(inventory, plan)
    missing = {h: d["missing"] for h, d in deployment["hosts"].items() if d["missing"]}
    if missing:
        host, paths = next(iter(missing.items()))
        raise HostError(
            f"{host} lacks {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}: the hosts do not "
            f"run {plan.label} as the inventory renders it; deploy it first"
        )
    return Target(
        url=url or plan.router_url,
        router_url=plan.router_internal_url(),
        api_key=next(iter(s.client_api_keys), None),
        label=plan.label,
        model=model or s.served_name or s.model,
        tokenizer=tokenizer or s.model_dir or s.model,
        placement=plan.as_dict()["workers"],
        worker_urls=[w.url for w in plan.workers],
        routed=routed,
        engine={k: v for k, v in dataclasses.asdict(s).items() if k not in SECRETS},
        kv_urls=[w.url for w in plan.workers if w.role == "generate"],
        kv_connector=(s.kv_transfer_config or {}).get("kv_connector") if plan.topology.disaggregated else None,
        deployment=deployment,
    )


def check_reachable(url: str, timeout: float = 5) -> None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    raise HostError(f"{url} is unreachable ({url}/health: {reason}); is the deployment up?")


def check_deployed(
    url: str, label: str, worker_urls: list[str], routed: list[str] | None = None, timeout: float = 5
) -> None:
    """The router must route to the label's workers: catches benchmarking one
    layout under another's name. `routed`: the router's members as the
    registry sync reports them; else the router's /workers (skipped when it
    has none)."""
    if routed is None:
        try:
            with urllib.request.urlopen(f"{url}/workers", timeout=timeout) as response:
                routed = [w["url"] for w in json.load(response).get("workers", [])]
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
            return
    routed = set(routed)
    if routed != set(worker_urls):
        raise HostError(
            f"the router at {url} routes to {', '.join(sorted(routed)) or 'no workers'}, not to the "
            f"workers of {label}; deploy {label} first or pick the deployed label (--label-key)"
        )


def aiperf_command(binary: str, target: Target, traffic: Traffic, concurrency: int, out: Path) -> list[str]:
    osl = str(traffic.osl)
    return [
        binary,
        "profile",
        "--model",
        target.model,
        "--url",
        target.url,
        "--endpoint-type",
        "chat",
        "--streaming",
        "--tokenizer",
        target.tokenizer,
        "--isl",
        str(traffic.isl),
        "--isl-stddev",
        "0",
        "--osl",
        osl,
        "--osl-stddev",
        "0",
        "--extra-inputs",
        f"max_tokens:{osl}",
        "--extra-inputs",
        f"min_tokens:{osl}",
        "--extra-inputs",
        "ignore_eos:true",
        "--concurrency",
        str(concurrency),
        "--request-count",
        str(traffic.requests_per_concurrency * concurrency),
        "--warmup-request-count",
        str(traffic.warmup_requests),
        "--random-seed",
        str(traffic.seed),
        "--artifact-dir",
        str(out),
        "--ui",
        "none",
        "--no-gpu-telemetry",
        *(["--api-key", target.api_key] if target.api_key else []),
    ]


def _versions() -> dict[str, str | None]:
    out = {}
    for name in ("disagg", "aiperf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def sweep(
    target: Target,
    concurrencies: list[int],
    traffic: Traffic,
    out_root: Path,
    progress: Callable[[str], None] = lambda line: None,
) -> Path:
    """Run aiperf once per concurrency; a failed run is recorded with its
    error and the sweep goes on. Returns the run directory."""
    binary = aiperf_binary()
    topology = Topology.parse(target.label)
    check_reachable(target.url)
    if target.worker_urls:
        check_deployed(target.router_url or target.url, topology.label, target.worker_urls, target.routed)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = out_root / topology.label / run_id
    run_dir.mkdir(parents=True, exist_ok=False)  # never overwrite a run
    provenance = {
        "label": topology.label,
        "configuration": topology.configuration,
        "gpus": topology.gpus,
        "gpus_per_role": {s.role: s.gpus for s in topology.stages},
        "url": target.url,
        "model": target.model,
        "tokenizer": target.tokenizer,
        "traffic": traffic.__dict__,
        "placement": target.placement,
        "engine": target.engine,
        "kv_connector": target.kv_connector,
        "deployment": target.deployment,
        "versions": _versions(),
        "started": datetime.now(timezone.utc).isoformat(),
        "runs": [],
        **target.extra,
    }
    if target.deployment:
        progress(
            f"{topology.label}: deployment {target.deployment['hash']} (file hashes and versions in {results.PROVENANCE})"
        )
    for i, concurrency in enumerate(concurrencies, 1):
        out = run_dir / f"c{concurrency}"
        requests = traffic.requests_per_concurrency * concurrency
        progress(f"[{i}/{len(concurrencies)}] {topology.label} concurrency {concurrency}: {requests} requests")
        start = time.monotonic()
        out.mkdir()
        kv_before = kvtransfer.read(target.kv_urls) if target.kv_urls else None
        code = run_logged(
            aiperf_command(binary, target, traffic, concurrency, out), out / "aiperf.log", traffic.run_timeout
        )
        entry = {"concurrency": concurrency, "seconds": round(time.monotonic() - start, 1)}
        if target.kv_urls:
            # read at the generate workers: bytes moved, and where their prompt tokens came from
            entry["kv_transfer"] = kvtransfer.delta(kv_before, kvtransfer.read(target.kv_urls))
        export = results.read_export(out)
        if code is None:
            entry["error"] = f"aiperf timed out after {traffic.run_timeout:.0f} s (see {out / 'aiperf.log'})"
        elif code or export is None:
            tail = (out / "aiperf.log").read_text().strip().splitlines()[-1:] or ["no output"]
            entry["error"] = f"aiperf exited {code}: {tail[0][:300]}"
        elif results.error_count(export):
            entry["error"] = (
                f"{results.error_count(export)} failed requests: {json.dumps(export.get('error_summary'))[:300]}"
            )
        provenance["runs"].append(entry)
        provenance["finished"] = datetime.now(timezone.utc).isoformat()
        results.write_atomic(run_dir / results.PROVENANCE, json.dumps(provenance, indent=2) + "\n")
        r = results.row(topology.label, concurrency, export, run_id, entry.get("error"))
        progress(
            f"    {entry['seconds']:.0f} s, {r['status']}: "
            f"{results.fmt(r['output_token_throughput_per_user'])} tokens/s/user, "
            f"{results.fmt(r['output_token_throughput_per_gpu'])} tokens/s/GPU"
        )
    rows = results.load_run(run_dir)
    results.write_tables(rows, run_dir)
    return run_dir
