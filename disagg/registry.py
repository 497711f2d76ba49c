"""The live registry of workers: a JetStream key-value bucket on the head's
NATS, one key per worker, refreshed by a companion unit beside each worker
and read by the router sync on the head, `disagg status` and the deploy's
readiness gate.

This module runs on the hosts too, as a script in a small venv (nats-py,
pyzmq, msgpack): it imports nothing else of disagg and no pyinfra.

    python registry.py heartbeat --nats nats://10.0.0.1:4222 --role context ...
    python registry.py sync --nats nats://10.0.0.1:4222 --router http://127.0.0.1:8000 --mode pd ...
    python registry.py status --nats nats://10.0.0.1:4222 --expect context-0=http://... --wait
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

BUCKET = "disagg-workers"
# An entry lives this long after its last heartbeat (the bucket's max age):
# a worker whose host dies leaves the registry within TTL.
TTL = 10.0
HEARTBEAT = 2.0
# vllm-router drops a discovered instance ~5 s after its last message
SYNC_INTERVAL = 1.0
ROUTER_FORGETS_AFTER = 5
# a stopping worker keeps serving this long after leaving the registry, so
# that the router has forgotten it before it goes (Kubernetes' preStop sleep)
DEREGISTER_GRACE = ROUTER_FORGETS_AFTER + 2 * SYNC_INTERVAL
PASSWORD_ENV = "DISAGG_NATS_PASSWORD"
WORKER_PREFIX = "worker."
ROUTER_KEY = "router"
# what each role is to vllm-router's service discovery
DISCOVERY_TYPE = {"context": "P", "generate": "D"}


def worker_key(url: str) -> str:
    """One key per worker endpoint, so that two layouts that both have a
    `context-0` (on different hosts) never share a key."""
    return WORKER_PREFIX + re.sub(r"[^A-Za-z0-9_-]", "-", hostport(url))


def probe(url: str, timeout: float = 2.0) -> str:
    """healthy (GET /health is 200), down (nothing listens) or unhealthy."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return "healthy" if response.status == 200 else "unhealthy"
    except urllib.error.HTTPError:
        return "unhealthy"
    except (urllib.error.URLError, OSError):
        return "down"


def routable(entry: dict, now: float, ttl: float = TTL) -> bool:
    return entry.get("health") == "healthy" and now - float(entry.get("heartbeat", 0)) <= ttl


def hostport(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


# -- NATS ------------------------------------------------------------------


def password_from_env() -> str | None:
    return os.environ.get(PASSWORD_ENV) or None


async def connect(server: str, user: str | None, password: str | None, wait: bool = False,
                  reconnect: bool = True):  # fmt: skip
    """A connection that reconnects for ever; with wait, also retry the first
    connect until NATS answers (units start before NATS is up). Without
    reconnect, a refused login fails at once, naming the reason."""
    import nats

    async def quiet(_error):  # nats-py prints every reconnect attempt otherwise
        pass

    while True:
        try:
            return await nats.connect(
                server,
                user=user,
                password=password,
                connect_timeout=2,
                reconnect_time_wait=1,
                allow_reconnect=reconnect,
                max_reconnect_attempts=-1,
                error_cb=quiet,
            )
        except Exception:
            if not wait:
                raise
            await asyncio.sleep(1)


async def bucket(nc, ttl: float = TTL):
    """The registry bucket; created on first use by whoever comes first (the
    same config from every creator, so creating is idempotent)."""
    from nats.js.api import KeyValueConfig
    from nats.js.errors import BucketNotFoundError

    js = nc.jetstream()
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1, ttl=ttl))


async def read_all(kv) -> dict[str, dict]:
    """Every live key of the bucket with its decoded value."""
    watcher = await kv.watchall(ignore_deletes=True)
    out: dict[str, dict] = {}
    try:
        while True:
            entry = await watcher.updates(timeout=5)
            if entry is None:  # the end of the current values
                break
            if entry.value:
                out[entry.key] = json.loads(entry.value)
    finally:
        await watcher.stop()
    return out


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Complaint:
    """Logs a recurring error when it starts or changes, not every second."""

    def __init__(self):
        self.last: str | None = None

    def __call__(self, message: str | None) -> None:
        if message and message != self.last:
            _log(message)
        self.last = message


# -- the companion of each worker -------------------------------------------


async def heartbeat(server: str, user: str, password: str | None, worker: dict,
                    interval: float = HEARTBEAT) -> None:  # fmt: skip
    """Put the worker's entry with its health every interval; delete it on
    SIGTERM, which systemd sends when the worker stops (BindsTo=), so a
    stopped worker leaves the rotation before it drains."""
    stop = _stop_event()
    key = worker_key(worker["url"])
    nc = await connect(server, user, password, wait=True)
    kv = None
    complain = _Complaint()
    while not stop.is_set():
        health = await asyncio.to_thread(probe, worker["url"])
        try:
            kv = kv or await bucket(nc)
            await kv.put(key, json.dumps({**worker, "health": health, "heartbeat": time.time()}).encode())
            complain(None)
        except Exception as e:  # NATS restarting: keep beating
            complain(f"registry put failed, retrying: {e!r}")
        await _sleep(stop, interval)
    try:
        if kv is not None:
            await asyncio.wait_for(kv.delete(key), 3)
    finally:
        await nc.close()


# -- router membership on the head ------------------------------------------


def _discovery_socket(address: str):
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.connect(f"tcp://{address}")
    return sock


def discovery_message(entry: dict) -> dict:
    return {
        "type": DISCOVERY_TYPE[entry["role"]],
        "http_address": hostport(entry["url"]),
        "zmq_address": entry["zmq"],
    }


def _router_workers(router: str) -> set[str]:
    with urllib.request.urlopen(f"{router}/workers", timeout=3) as response:
        return {w["url"] for w in json.load(response).get("workers", [])}


def _router_call(router: str, path: str, url: str) -> None:
    query = urllib.parse.urlencode({"url": url})
    request = urllib.request.Request(f"{router}/{path}?{query}", method="POST")
    with urllib.request.urlopen(request, timeout=5):
        pass


async def sync(server: str, user: str, password: str | None, router: str, mode: str,
               discovery: str | None, interval: float = SYNC_INTERVAL) -> None:  # fmt: skip
    """Keep the router's membership equal to the healthy workers in the
    registry. PD mode: vllm-router's ZMQ service discovery, re-sent every
    interval (it forgets an instance ~5 s after its last message). Aggregated
    mode: its /add_worker and /remove_worker. While NATS is unreachable the
    last known members stay: a control-plane outage must not stop serving."""
    stop = _stop_event()
    nc = await connect(server, user, password, wait=True)
    sock = _discovery_socket(discovery) if mode == "pd" else None
    roles = set(DISCOVERY_TYPE) if mode == "pd" else {"baseline"}
    kv = None
    members: dict[str, dict] = {}
    read_failed, sync_failed = _Complaint(), _Complaint()
    while not stop.is_set():
        try:
            kv = kv or await bucket(nc)
            now = time.time()
            members = {
                k: e
                for k, e in (await read_all(kv)).items()
                if k.startswith(WORKER_PREFIX) and e.get("role") in roles and routable(e, now)
            }
            read_failed(None)
        except Exception as e:
            read_failed(f"registry read failed, keeping {len(members)} members: {e!r}")
        try:
            if sock is not None:
                import msgpack
                import zmq

                for entry in members.values():
                    sock.send(msgpack.packb(discovery_message(entry)), zmq.NOBLOCK)
            else:
                await asyncio.to_thread(_reconcile, router, {e["url"] for e in members.values()})
            if kv is not None:
                state = {"router": router, "mode": mode, "members": sorted(e["url"] for e in members.values()),
                         "heartbeat": time.time()}  # fmt: skip
                await kv.put(ROUTER_KEY, json.dumps(state).encode())
            sync_failed(None)
        except Exception as e:  # the router restarting
            sync_failed(f"router sync failed: {e!r}")
        await _sleep(stop, interval)
    await nc.close()


def _reconcile(router: str, wanted: set[str]) -> None:
    have = _router_workers(router)
    for url in sorted(wanted - have):
        _router_call(router, "add_worker", url)
        _log(f"added {url}")
    for url in sorted(have - wanted):
        _router_call(router, "remove_worker", url)
        _log(f"removed {url}")


# -- status and the readiness gate -------------------------------------------


@dataclass
class Expected:
    name: str  # context-0
    url: str


@dataclass
class Status:
    nats: str
    router: str
    workers: list[dict] = field(default_factory=list)
    members: list[str] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {
            "ready": self.ready,
            "nats": self.nats,
            "router": self.router,
            "router_members": self.members,
            "workers": self.workers,
            "problems": self.problems,
        }


def assess(expected: list[Expected], entries: dict[str, dict], members: list[str] | None,
           now: float, ttl: float = TTL) -> list[str]:  # fmt: skip
    """What keeps the deployed topology from being ready, one phrase each."""
    by_url = {e.get("url"): e for k, e in entries.items() if k.startswith(WORKER_PREFIX)}
    problems = []
    for w in expected:
        entry = by_url.get(w.url)
        if entry is None:
            problems.append(f"{w.name} ({w.url}) is not registered")
        elif entry.get("health") != "healthy":
            problems.append(f"{w.name} ({w.url}) is {entry.get('health')}")
        elif now - float(entry.get("heartbeat", 0)) > ttl:
            problems.append(f"{w.name} ({w.url}) last heartbeat {now - float(entry['heartbeat']):.0f} s ago")
        elif members is not None and w.url not in members:
            problems.append(f"{w.name} ({w.url}) is not in the router's membership yet")
    return problems


def metric_samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of one metric in Prometheus text."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{([^}}]*)}})? ([0-9.eE+-]+)$", re.M)
    return [(labels, float(value)) for labels, value in pattern.findall(text)]


def _scrape(metrics_url: str) -> str | None:
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError):
        return None


def _running(url: str) -> float | None:
    """vllm:num_requests_running from the worker's /metrics."""
    samples = metric_samples(_scrape(f"{url}/metrics") or "", "vllm:num_requests_running")
    return sum(value for _, value in samples) if samples else None


def _routed(metrics_url: str) -> dict[str, float]:
    """Requests the router has sent each worker (its Prometheus counter
    vllm_router_processed_requests_total{worker=URL})."""
    samples = metric_samples(_scrape(metrics_url) or "", "vllm_router_processed_requests_total")
    return {m.group(1): value for labels, value in samples if (m := re.search(r'worker="([^"]+)"', labels))}


async def status(server: str, user: str, password: str | None, router: str | None,
                 expected: list[Expected], router_metrics: str | None = None) -> Status:  # fmt: skip
    """One look at NATS, the registry, the router (and its metrics) and each worker."""
    router_health = "unknown"
    if router:
        router_health = await asyncio.to_thread(probe, router)
    try:
        nc = await asyncio.wait_for(connect(server, user, password, reconnect=False), 5)
    except Exception as e:
        problem = f"NATS at {server} refused or unreachable: {e.__class__.__name__} {e}".strip()
        return Status(nats=problem, router=router_health, problems=[problem])
    try:
        entries = await read_all(await bucket(nc))
    finally:
        await nc.close()
    now = time.time()
    router_state = entries.get(ROUTER_KEY)
    members = None
    if router_state is not None and now - float(router_state.get("heartbeat", 0)) <= TTL:
        members = router_state["members"]
    names = {w.url: w.name for w in expected}
    routed = await asyncio.to_thread(_routed, router_metrics) if router_metrics else {}
    workers = []
    for key, e in sorted(entries.items(), key=lambda kv: (kv[1].get("role", ""), kv[1].get("index", 0))):
        if not key.startswith(WORKER_PREFIX):
            continue
        running = await asyncio.to_thread(_running, e["url"]) if e.get("health") == "healthy" else None
        workers.append({
            **e,
            "name": names.get(e["url"], f"{e.get('role')}-{e.get('index')}"),
            "heartbeat_age_s": round(now - float(e.get("heartbeat", 0)), 1),
            "in_router": None if members is None else e["url"] in members,
            "routed": routed.get(e["url"]),
            "running": running,
        })  # fmt: skip
    problems = assess(expected, entries, members, now)
    if router and router_health != "healthy":
        problems.insert(0, f"router at {router} is {router_health}")
    if router and expected and members is None:
        problems.append("the router sync has not reported (disagg-registry-sync on the head)")
    return Status(nats="healthy", router=router_health, workers=workers, members=members, problems=problems)


async def wait_ready(server: str, user: str, password: str | None, router: str | None,
                     expected: list[Expected], timeout: float, interval: float = 2.0, **kw) -> Status:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        current = await status(server, user, password, router, expected, **kw)
        if current.ready or time.monotonic() >= deadline:
            return current
        await asyncio.sleep(interval)


def table(current: Status) -> str:
    """The status as an operator reads it."""
    head = ("worker", "host", "GPUs", "url", "health", "heartbeat", "in router", "routed", "running")
    rows = [head]
    for w in current.workers:
        rows.append((
            w["name"],
            w.get("host", ""),
            ",".join(map(str, w.get("gpus", []))),
            w["url"],
            w.get("health", ""),
            f"{w['heartbeat_age_s']:.0f} s ago",
            {None: "?", True: "yes", False: "no"}[w["in_router"]],
            "" if w["routed"] is None else f"{w['routed']:g}",
            "" if w["running"] is None else f"{w['running']:g}",
        ))  # fmt: skip
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = [f"NATS: {current.nats}    router: {current.router}"]
    lines += ["  ".join(str(c).ljust(n) for c, n in zip(r, widths)).rstrip() for r in rows]
    if not current.workers:
        lines.append("(no worker registered)")
    lines.append("ready" if current.ready else "not ready: " + "; ".join(current.problems))
    return "\n".join(lines)


def parse_expected(values: list[str]) -> list[Expected]:
    return [Expected(*v.split("=", 1)) for v in values]


# -- the command line on the hosts --------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="registry.py", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--nats", required=True, help="nats://HOST:PORT")
    common.add_argument("--user", default="disagg")
    sub = parser.add_subparsers(dest="command", required=True)
    hb = sub.add_parser("heartbeat", parents=[common], help="register one worker while it runs")
    for name in ("role", "host", "url", "label", "model", "zmq"):
        hb.add_argument(f"--{name}", required=True)
    hb.add_argument("--index", type=int, required=True)
    hb.add_argument("--gpus", required=True, help="comma-separated GPU indices")
    sy = sub.add_parser("sync", parents=[common], help="keep the router's membership equal to the registry")
    sy.add_argument("--router", required=True)
    sy.add_argument("--mode", choices=("pd", "aggregated"), required=True)
    sy.add_argument("--discovery", help="vllm-router's --vllm-discovery-address (pd mode)")
    st = sub.add_parser("status", parents=[common], help="registry, router and NATS health")
    st.add_argument("--router")
    st.add_argument("--expect", action="append", default=[], metavar="NAME=URL")
    st.add_argument("--wait", action="store_true")
    st.add_argument("--timeout", type=float, default=300)
    st.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    password = password_from_env()
    if args.command == "heartbeat":
        worker = {
            "role": args.role, "index": args.index, "host": args.host, "url": args.url,
            "gpus": [int(g) for g in args.gpus.split(",") if g], "label": args.label,
            "model": args.model, "zmq": args.zmq,
        }  # fmt: skip
        asyncio.run(heartbeat(args.nats, args.user, password, worker))
        return 0
    if args.command == "sync":
        if args.mode == "pd" and not args.discovery:
            parser.error("--discovery is required in pd mode")
        asyncio.run(sync(args.nats, args.user, password, args.router, args.mode, args.discovery))
        return 0
    expected = parse_expected(args.expect)
    if args.wait:
        current = asyncio.run(wait_ready(args.nats, args.user, password, args.router, expected, args.timeout))
    else:
        current = asyncio.run(status(args.nats, args.user, password, args.router, expected))
    print(json.dumps(current.as_dict(), indent=2) if args.json else table(current))
    return 0 if current.ready else 1


if __name__ == "__main__":
    sys.exit(main())
