"""The companion of each worker: puts the worker's entry, with the health of
its /health, every HEARTBEAT seconds while it runs."""

from __future__ import annotations

import asyncio

from . import kv


async def heartbeat(server: kv.Server, worker: dict, interval: float = kv.HEARTBEAT) -> None:
    """Keep the worker's entry fresh until SIGTERM. Stopping does not delete
    it: the worker's own ExecStop (`leave`) does that when the worker stops,
    so a restart of this companion alone never takes a worker out of the
    router."""
    stop = kv.stop_event()
    try:
        nc = await kv.connect(server, stop=stop)
    except kv.Stopped:
        return
    key = kv.worker_key(worker["url"])
    store = None
    complain = kv.Complaint()
    try:
        while not stop.is_set():
            health = await asyncio.to_thread(kv.probe, worker["url"])
            health = "down" if health == "refused" else health
            try:
                store = store or await kv.bucket(nc)
                await kv.put(store, key, {**worker, "health": health})
                complain(None, recovered="registry put works again")
            except Exception as e:  # NATS restarting: keep beating
                complain(f"registry put failed, retrying: {kv.describe(e)}")
            await kv.sleep(stop, interval)
    finally:
        await nc.close()
