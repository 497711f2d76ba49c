"""Router membership on the head: the healthy workers of the registry go to
vllm-router, and what the router itself reports routing to goes back into
the registry (key `router`) for `status` and the readiness gate.

Serving must not depend on the control plane: the discovery messages are
sent every second from memory by their own task, whatever NATS does. While
NATS is unreachable the last members stay (they survive a restart of the
sync in its state file). Every second each member's /health is also asked
from here: one whose port refuses connections (its process is gone, as
after a crash) is no longer sent, without waiting for its heartbeat."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import exporter, kv, targets
from .layout import Layout
from .routerview import DiscoveryLog, aggregated_members


def discovery_message(entry: dict) -> dict:
    return {
        "type": kv.DISCOVERY_TYPE[entry["role"]],
        "http_address": kv.hostport(entry["url"]),
        "zmq_address": entry["zmq"],
    }


@dataclass(frozen=True)
class Scrape:
    """What the sync does for Prometheus: file_sd targets in targets_dir,
    /metrics (NATS's and its own) at metrics_address."""

    targets_dir: str
    metrics_address: str
    nats_monitor: str
    dcgm_port: int
    certificates: tuple[str, ...] = ()


class Members:
    """The workers the router should have, by URL; kept in a state file so
    that a sync restarted while NATS is down still knows them."""

    def __init__(self, state_file: str | None, roles: set[str], layout: Layout):
        self.path = Path(state_file) if state_file else None
        self.entries: dict[str, dict] = {}
        # URLs whose port refused the last direct probe
        self.gone: set[str] = set()
        # URLs absent from the last read of the registry (kept once)
        self.missing: set[str] = set()
        if self.path and self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
            except ValueError:
                saved = {}
            # the file outlives a relabel: a member of the layout before is none now
            self.entries = {
                url: e
                for url, e in saved.items()
                if isinstance(e, dict)
                and (m := kv.member(kv.worker_key(url), e, roles))
                and layout.admits(kv.worker_key(url), m)
            }

    def routable(self) -> list[dict]:
        return [e for url, e in self.entries.items() if url not in self.gone]

    def replace(self, entries: dict[str, dict], hold: bool = False) -> None:
        """hold: keep every member the read lacks (the registry failed less
        than a TTL ago: entries expired while their heartbeats could not put
        them, as while a NATS server's host dies and a new leader is chosen)."""
        # else a member missing from one read only is kept until the next: a
        # read of the bucket has come back empty for a moment under load
        kept = {url: e for url, e in self.entries.items() if url not in entries and (hold or url not in self.missing)}
        self.missing = set(kept)
        entries = {**entries, **kept}
        if entries == self.entries:
            return
        for url in sorted(set(entries) - set(self.entries)):
            kv.log(f"member: + {entries[url]['role']} {url}")
        for url in sorted(set(self.entries) - set(entries)):
            kv.log(f"member: - {self.entries[url]['role']} {url}")
        self.entries = entries
        if self.path:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, self.path)


async def sync(
    server: kv.Server,
    router: str,
    mode: str,
    discovery: str | None,
    layout: Layout,
    router_log: str | None = None,
    state_file: str | None = None,
    interval: float = kv.SYNC_INTERVAL,
    scrape: Scrape | None = None,
) -> None:
    stop = kv.stop_event()
    roles = set(kv.DISCOVERY_TYPE) if mode == "pd" else {"baseline"}
    members = Members(state_file, roles, layout)
    view = DiscoveryLog(router_log or "journal:disagg-router.service") if mode == "pd" else None
    send = (
        _send_discovery(discovery, members, stop, interval)
        if mode == "pd"
        else _reconcile(router, members, stop, interval)
    )
    tasks = [
        send,
        _watch_health(members, stop, interval),
        _registry(server, router, mode, roles, layout, members, view, stop, interval, scrape),
    ]
    if scrape:
        entries = lambda: list(members.entries.values())  # noqa: E731
        routable = lambda: [e["url"] for e in members.routable()]  # noqa: E731
        deployed = lambda: list(layout.workers.values())  # noqa: E731
        exporter.serve(
            scrape.metrics_address,
            exporter.Collector(scrape.nats_monitor, entries, routable, deployed, scrape.certificates),
        )
        tasks.append(targets.watch_dcgm(scrape.targets_dir, scrape.dcgm_port, entries, stop))
    if view:
        tasks.append(view.follow(stop))
    await kv.run_all(stop, tasks)


async def _send_discovery(address: str, members: Members, stop: asyncio.Event, interval: float) -> None:
    """vllm-router forgets a discovered instance ~5 s after its last message:
    re-send every member every interval, from memory only."""
    import msgpack
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # queue nothing for a router that is not connected: a send then fails
    # instead of vanishing, and the log says so
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.connect(f"tcp://{address}")
    complain = kv.Complaint()
    try:
        while not stop.is_set():
            try:
                for entry in members.routable():
                    sock.send(msgpack.packb(discovery_message(entry)), zmq.NOBLOCK)
                complain(None, recovered=f"router discovery at {address} takes messages again")
            except zmq.Again:
                complain(f"router discovery at {address} is not connected: nothing sent")
            await kv.sleep(stop, interval)
    finally:
        sock.close()


async def _watch_health(members: Members, stop: asyncio.Event, interval: float) -> None:
    """Ask every member's /health from here; a refused connection (the
    worker's process is gone) stops sending it within a second."""
    while not stop.is_set():
        urls = list(members.entries)
        health = await asyncio.gather(*(asyncio.to_thread(kv.probe, url, 1.0) for url in urls))
        gone = {url for url, h in zip(urls, health) if h == "refused"}
        for url in sorted(gone ^ members.gone):
            kv.log(f"{url}: {'connection refused: no longer sent' if url in gone else 'answers again'}")
        members.gone = gone
        await kv.sleep(stop, interval)


async def _reconcile(router: str, members: Members, stop: asyncio.Event, interval: float) -> None:
    """Regular (aggregated) mode: /add_worker and /remove_worker until the
    router's own list equals the members."""
    complain = kv.Complaint()
    while not stop.is_set():
        try:
            await asyncio.to_thread(_reconcile_once, router, {e["url"] for e in members.routable()})
            complain(None, recovered=f"router at {router} reconciled again")
        except Exception as e:  # the router restarting
            complain(f"router sync failed: {kv.describe(e)}")
        await kv.sleep(stop, interval)


def _reconcile_once(router: str, wanted: set[str]) -> None:
    have = set(aggregated_members(router))
    for path, urls in (("add_worker", wanted - have), ("remove_worker", have - wanted)):
        for url in sorted(urls):
            query = urllib.parse.urlencode({"url": url})
            with urllib.request.urlopen(urllib.request.Request(f"{router}/{path}?{query}", method="POST"), timeout=5):
                pass
            kv.log(f"{path} {url}")


async def _registry(
    server: kv.Server,
    router: str,
    mode: str,
    roles: set[str],
    layout: Layout,
    members: Members,
    view: DiscoveryLog | None,
    stop: asyncio.Event,
    interval: float,
    scrape: Scrape | None,
) -> None:
    """Read the registry's workers of the layout into members; publish the
    router's own view."""
    try:
        nc = await kv.connect(server, stop=stop)
    except kv.Stopped:
        return
    store = None
    own = kv.router_key(router)
    # the revision of this sync's last put of its view: a read without it is behind
    written = 0
    # when a read or put last failed: for a TTL after, an absent entry proves nothing
    failed_at = float("-inf")
    read_failed, publish_failed = kv.Complaint(), kv.Complaint()
    try:
        while not stop.is_set():
            try:
                store = store or await kv.bucket(nc)
                entries = await kv.read_all(store)
                behind(entries.get(own), written)
                layout.refresh()
                routable = ((k, kv.member(k, e.value, roles)) for k, e in entries.items())
                members.replace(
                    {m["url"]: m for k, m in routable if m and layout.admits(k, m)},
                    hold=time.monotonic() - failed_at < kv.TTL,
                )
                read_failed(None, recovered="registry readable again")
            except Exception as e:
                failed_at = time.monotonic()
                read_failed(f"registry unreadable, keeping the last {len(members.entries)} members: {kv.describe(e)}")
            if scrape:
                targets.write(
                    scrape.targets_dir, targets.WORKERS, targets.worker_groups(list(members.entries.values()))
                )
            state = await asyncio.to_thread(_router_state, router, mode, view)
            try:
                if store is None:
                    raise RuntimeError("no registry bucket")
                report = {**state, "sending": sorted(e["url"] for e in members.routable())}
                written = await kv.put(store, own, report)
                publish_failed(None)
            except Exception as e:
                failed_at = time.monotonic()
                publish_failed(f"cannot publish the router's view: {kv.describe(e)}")
            await kv.sleep(stop, interval)
    finally:
        await asyncio.wait_for(nc.close(), kv.NATS_TIMEOUT)


class Behind(Exception):
    pass


def behind(own: kv.Entry | None, written: int) -> None:
    """Raise when a read lacks this sync's own last write: it came from a
    NATS server still catching up (one that rejoins its cluster serves its
    old copy for a moment, the workers' entries expired in it), and would
    drop members that are alive."""
    if written and (own is None or own.revision < written):
        have = own.revision if own else "none"
        raise Behind(f"the read lacks this sync's last write (revision {written}, read {have}): a server catching up")


def _router_state(router: str, mode: str, view: DiscoveryLog | None) -> dict:
    """The router's own account of its members: None where it cannot be had
    (and why); [] when the router does not answer at all."""
    state = {"router": router, "mode": mode, "members": None, "view_error": None}
    if kv.probe(router) in ("down", "refused"):
        state.update(members=[], view_error=f"the router at {router} does not answer")
    elif view is not None:
        state.update(members=view.view(), view_error=view.error)
    else:
        try:
            state["members"] = aggregated_members(router)
        except Exception as e:
            state["view_error"] = f"GET {router}/workers failed: {kv.describe(e)}"
    return state
