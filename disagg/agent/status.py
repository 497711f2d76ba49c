"""One look at the deployment: NATS, the registry, the router's own view of
its members, and each worker's load. Used by `disagg status` on the
controller and by the deploy's readiness gate on the head.

Exit codes (`status` here and `disagg status`): 0 ready, 1 not ready,
3 cannot tell (NATS unreachable, refused, or its JetStream failing)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field

from . import kv, metrics

READY, NOT_READY, UNKNOWN = 0, 1, 3


@dataclass
class Expected:
    name: str  # context-0
    url: str


def parse_expected(values: list[str]) -> list[Expected]:
    return [Expected(*v.split("=", 1)) for v in values]


@dataclass
class Status:
    nats: str
    router: str
    workers: list[dict] = field(default_factory=list)
    # what the router itself reports routing to (None: unknown, see problems)
    members: list[str] | None = None
    problems: list[str] = field(default_factory=list)
    # {router URL: the members it reports}, one per router host's sync
    routers: dict[str, list[str] | None] = field(default_factory=dict)
    # the registry could not be read: readiness is unknown, not false
    error: str | None = None
    # {URL: "up" or "down: why"} of each server of a NATS cluster: one down
    # is no problem for readiness (the others keep the registry), but shown
    nats_servers: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return not self.problems and not self.error

    @property
    def exit_code(self) -> int:
        return UNKNOWN if self.error else READY if self.ready else NOT_READY

    def as_dict(self) -> dict:
        return {
            "ready": self.ready,
            "error": self.error,
            "nats": self.nats,
            "router": self.router,
            "router_members": self.members,
            "routers": self.routers,
            "nats_servers": self.nats_servers,
            "workers": self.workers,
            "problems": self.problems,
        }


def routed_by_all(views: dict[str, dict]) -> list[str] | None:
    """The workers every router lists (each router host's sync reports its
    own view); None while no router reported or one's view is unknown."""
    if not views or any(v.get("members") is None for v in views.values()):
        return None
    return sorted(set.intersection(*(set(v["members"]) for v in views.values())))


def assess(expected: list[Expected], entries: dict[str, dict], members: list[str] | None) -> list[str]:
    """What keeps the deployed topology from being ready, one phrase each.
    `entries`: the live registry (an entry past its TTL is already gone)."""
    by_url = {
        e["url"]: e for k, e in entries.items() if k.startswith(kv.WORKER_PREFIX) and isinstance(e.get("url"), str)
    }
    problems = []
    for w in expected:
        entry = by_url.get(w.url)
        if entry is None:
            problems.append(f"{w.name} ({w.url}) is not registered")
        elif entry.get("health") != "healthy":
            problems.append(f"{w.name} ({w.url}) is {entry.get('health')}")
        elif members is not None and w.url not in members:
            problems.append(f"{w.name} ({w.url}) is not in the router (the router does not list it)")
    return problems


async def status(
    server: kv.Server,
    router: str | None,
    expected: list[Expected],
    router_metrics: str | None = None,
    layout: set[str] | None = None,
) -> Status:
    """layout: the URLs of every worker of the deployed layout, when known
    (expected may name only some: a rolled worker's rejoin); an entry of
    none is foreign, and one in the router a problem."""
    router_health = "unknown"
    if router:
        router_health = await asyncio.to_thread(kv.probe, router)
    urls = server.urls if len(server.urls) > 1 else []
    servers = dict(zip(urls, await asyncio.gather(*(_server_state(server, u) for u in urls))))
    try:
        nc = await asyncio.wait_for(kv.connect(server, reconnect=False), 5)
    except Exception as e:
        error = f"NATS at {server} refused or unreachable: {kv.describe(e)}"
        return Status(nats=error, router=router_health, error=error, nats_servers=servers)
    try:
        entries = await kv.read_all(await kv.bucket(nc))
    except Exception as e:
        error = f"NATS at {server}: registry unreadable: {kv.describe(e)}"
        return Status(nats=error, router=router_health, error=error, nats_servers=servers)
    finally:
        await asyncio.wait_for(nc.close(), kv.NATS_TIMEOUT)
    age = kv.ages(entries)
    values = {k: e.value for k, e in entries.items()}
    views = kv.router_views(values)
    unknown = [r for r, v in views.items() if v.get("members") is None]
    members = routed_by_all(views)
    names = {w.url: w.name for w in expected}
    routed = metrics.per_worker(
        await asyncio.to_thread(metrics.scrape, router_metrics) if router_metrics else None,
        "vllm_router_processed_requests_total",
    )
    workers = []

    def order(item):
        role, index = item[1].get("role"), item[1].get("index")
        return str(role), index if isinstance(index, int) else 0

    for key, e in sorted(values.items(), key=order):
        # an entry without a URL is nobody's worker (the sync skips it too)
        if not key.startswith(kv.WORKER_PREFIX) or not isinstance(e.get("url"), str):
            continue
        running = None
        if e.get("health") == "healthy":
            text = await asyncio.to_thread(metrics.scrape, f"{e['url']}/metrics")
            running = metrics.total(text, "vllm:num_requests_running")
        # another layout's, or written by someone else: the sync does not route it
        foreign = layout is not None and e["url"] not in layout
        workers.append(
            {
                **e,
                "name": names.get(e["url"], f"{e.get('role')}-{e.get('index')}"),
                "foreign": foreign,
                "heartbeat_age_s": round(age[key], 1),
                "in_router": None if members is None else e["url"] in members,
                "routed": routed.get(e["url"]),
                "running": running,
            }
        )
    problems = assess(expected, values, members)
    if layout is not None and members:
        problems += [
            f"{url} is in the router but is no worker of the deployed layout" for url in members if url not in layout
        ]
    if router and router_health != "healthy":
        problems.insert(0, f"router at {router} is {router_health}")
    if expected and not views:
        problems.append("the router sync has not reported (disagg-registry-sync on the router hosts)")
    for r in unknown:
        problems.append(f"the router's own view is unknown ({r}): {views[r].get('view_error')}")
    routers = {r: v.get("members") for r, v in views.items()}
    return Status(
        nats="healthy",
        router=router_health,
        workers=workers,
        members=members,
        problems=problems,
        routers=routers,
        nats_servers=servers,
    )


async def _server_state(server: kv.Server, url: str) -> str:
    """One server of a cluster: "up" when it takes a connection, else "down: why"."""
    try:
        nc = await asyncio.wait_for(kv.connect(dataclasses.replace(server, url=url), reconnect=False), 5)
    except Exception as e:
        return f"down: {kv.describe(e)}"
    await asyncio.wait_for(nc.close(), kv.NATS_TIMEOUT)
    return "up"


async def wait_ready(
    server: kv.Server, router: str | None, expected: list[Expected], timeout: float, interval: float = 2.0, **kw
) -> Status:
    """Poll until ready or timeout; an unreadable registry is retried too
    (the gate may run while NATS restarts)."""
    deadline = time.monotonic() + timeout
    while True:
        current = await status(server, router, expected, **kw)
        if current.ready or time.monotonic() >= deadline:
            return current
        await asyncio.sleep(interval)


def table(current: Status) -> str:
    """The status as an operator reads it."""
    head = ("worker", "host", "GPUs", "url", "health", "heartbeat", "in router", "routed", "running")
    rows = [head]
    for w in current.workers:
        rows.append(
            (
                w["name"] + (" (foreign)" if w.get("foreign") else ""),
                w.get("host", ""),
                ",".join(map(str, w.get("gpus", []))),
                w["url"],
                w.get("health", ""),
                f"{w['heartbeat_age_s']:.0f} s ago",
                {None: "?", True: "yes", False: "no"}[w["in_router"]],
                "" if w["routed"] is None else f"{w['routed']:g}",
                "" if w["running"] is None else f"{w['running']:g}",
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = [f"NATS: {current.nats}    router: {current.router}"]
    if current.nats_servers:
        lines.append("NATS servers: " + "; ".join(f"{u} {state}" for u, state in current.nats_servers.items()))
    if len(current.routers) > 1:
        # several router hosts: "in router" is "listed by every one"
        lines += [
            f"router {r}: {'view unknown' if m is None else f'{len(m)} members'}"
            for r, m in sorted(current.routers.items())
        ]
    lines += ["  ".join(str(c).ljust(n) for c, n in zip(r, widths)).rstrip() for r in rows]
    if not current.workers:
        lines.append("(no worker registered)")
    if current.error:
        lines.append(f"unknown: {current.error}")
    else:
        lines.append("ready" if current.ready else "not ready: " + "; ".join(current.problems))
    return "\n".join(lines)
