"""What the front door adds to a request: the same non-streaming chat
request (one output token) sent alternately to vllm-router itself and
through the front door, each over a kept-alive connection, from this
controller (an admin: the firewall admits it to the router's own port).
Prints p50 and p99 of each and of the paired difference; the raw times go
to --out as JSON.

    .venv/bin/python scripts/frontdoor_latency.py -i inventories/local.py [--requests 400]
"""

import argparse
import http.client
import json
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

from disagg.core.plan import make_plan
from disagg.infra.inventory import load_inventory


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def timed(conn: http.client.HTTPConnection, body: str, headers: dict) -> float:
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, headers)
    response = conn.getresponse()
    response.read()
    elapsed = time.perf_counter() - start
    if response.status != 200:
        raise SystemExit(f"HTTP {response.status} from {conn.host}:{conn.port}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--inventory", default="inventories/local.py")
    parser.add_argument("--requests", type=int, default=400, help="pairs of requests (after 20 of warm-up)")
    parser.add_argument("--out", type=Path, default=Path("results/frontdoor-latency.json"))
    args = parser.parse_args()
    plan = make_plan(load_inventory(args.inventory))
    if plan.client_tls:
        print("the front door speaks TLS here: measure on a layout without client_tls_*", file=sys.stderr)
        return 2
    s = plan.settings
    body = json.dumps(
        {"model": s.served_name or s.model, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 1}
    )
    key = next(iter(s.client_api_keys), None)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conns = {
        name: http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        for name, u in (
            ("router", urllib.parse.urlsplit(plan.router_internal_url)),
            ("front door", urllib.parse.urlsplit(plan.router_url)),
        )
    }
    times: dict[str, list[float]] = {name: [] for name in conns}
    for i in range(args.requests + 20):
        # alternate which goes first, so that neither always meets a warmer engine
        for name in list(conns) if i % 2 else list(reversed(conns)):
            t = timed(conns[name], body, headers)
            if i >= 20:
                times[name].append(t)
    added = [d - r for d, r in zip(times["front door"], times["router"])]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"label": plan.label, "requests": args.requests, "seconds": times}, indent=1))
    for name, values in (*times.items(), ("added by the front door (paired)", added)):
        print(
            f"{name:34s} p50 {percentile(values, 50) * 1000:7.2f} ms   p99 {percentile(values, 99) * 1000:7.2f} ms"
            f"   mean {statistics.fmean(values) * 1000:7.2f} ms"
        )
    print(f"raw times: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
