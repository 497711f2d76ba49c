"""A worker leaving on purpose (its unit's ExecStop, before vLLM gets
SIGTERM): out of the registry, then out of the router (as the router itself
reports it), then drained of the requests it still runs."""

from __future__ import annotations

import asyncio
import time

from . import kv, metrics


async def leave(server: kv.Server, url: str, drain_timeout: float, forget_timeout: float) -> None:
    start = time.monotonic()
    try:
        await _out_of_router(server, url, forget_timeout)
    except Exception as e:
        grace = kv.ROUTER_FORGETS_AFTER + 2 * kv.SYNC_INTERVAL
        kv.log(
            f"{url}: cannot confirm through NATS that the router dropped it ({kv.describe(e)}); waiting {grace:.0f} s"
        )
        await asyncio.sleep(grace)
    left = time.monotonic() - start
    drained = await asyncio.to_thread(_drain, url, drain_timeout)
    kv.log(f"{url}: out of the router after {left:.1f} s; {drained}")


async def _out_of_router(server: kv.Server, url: str, timeout: float) -> None:
    nc = await asyncio.wait_for(kv.connect(server, reconnect=False), 5)
    try:
        store = await kv.bucket(nc)
        await asyncio.wait_for(store.delete(kv.worker_key(url)), kv.NATS_TIMEOUT)
        deadline = time.monotonic() + timeout
        while True:
            members = await _router_members(store)
            if members is not None and url not in members:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the router still lists it after {timeout:.0f} s"
                    if members is not None
                    else "the router's own view is unknown"
                )
            await asyncio.sleep(0.5)
    finally:
        await asyncio.wait_for(nc.close(), kv.NATS_TIMEOUT)


async def _router_members(store) -> list[str] | None:
    """Every worker some router still lists (each router host's sync
    reports its own), None while a router's view is unknown."""
    views = kv.router_views({k: e.value for k, e in (await kv.read_all(store)).items()})
    if not views or any(v.get("members") is None for v in views.values()):
        return None
    return sorted({m for v in views.values() for m in v["members"]})


def _drain(url: str, timeout: float) -> str:
    """Wait until the worker runs and queues nothing (vLLM's own gauges)."""
    start = time.monotonic()
    first = metrics.in_flight(url)
    while True:
        now = metrics.in_flight(url)
        if not now:
            return f"drained {first or 0:g} requests in {time.monotonic() - start:.1f} s"
        if time.monotonic() - start >= timeout:
            return f"drain timeout ({timeout:.0f} s) with {now:g} requests in flight"
        time.sleep(0.5)
