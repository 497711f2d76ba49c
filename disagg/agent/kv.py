"""The registry in NATS: the bucket, its keys, connecting (loudly, with
backoff, stoppable) and reading every entry with the server's timestamps."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime

from . import envfile

# nats-py closing a TLS connection makes asyncio's sslproto say this (at
# WARNING, on every `disagg status`); it means nothing for us
logging.getLogger("asyncio").addFilter(
    lambda record: "eof_received() has no effect when using ssl" not in record.getMessage()
)

# a NATS client leaving a server whose host died waits for that server's TLS
# goodbye before it tries the next (nats-py's reconnect closes first), for
# asyncio's default of 30 s: longer than the registry's TTL
asyncio.constants.SSL_SHUTDOWN_TIMEOUT = 1.0

BUCKET = "disagg-workers"
# The bucket's max age: an entry not refreshed for TTL (by the NATS server's
# clock) is gone, so a worker whose host dies leaves the registry within TTL.
# Liveness is presence in the bucket; no two hosts' clocks are compared.
TTL = 10.0
HEARTBEAT = 2.0
# vllm-router drops a discovered instance 4-5 s after its last message
# (expiry in whole seconds); the sync re-sends every SYNC_INTERVAL
SYNC_INTERVAL = 1.0
ROUTER_FORGETS_AFTER = 5.0
PASSWORD_ENV = "DISAGG_NATS_PASSWORD"
WORKER_PREFIX = "worker."
# each router's view, put by its sync: one key per router (several router hosts)
ROUTER_PREFIX = "router."
# what each role is to vllm-router's service discovery
DISCOVERY_TYPE = {"context": "P", "generate": "D"}
# a NATS operation that takes longer than this is treated as failed, so that
# no loop waits on a control plane that is down
NATS_TIMEOUT = 3.0
# seconds the server keeps a read's consumer once nobody reads from it
CONSUMER_IDLE = 5.0


@dataclass(frozen=True)
class Server:
    """A NATS server as the agent reaches it. `ca`: the CA file that signed
    its certificate: with it the connection is TLS and verified."""

    # one URL, or every server of a cluster comma-separated: the client fails over between them
    url: str
    user: str | None = None
    password: str | None = None
    ca: str | None = None

    def __str__(self) -> str:
        return self.url

    @property
    def urls(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    def options(self) -> dict:
        tls = None
        if self.ca:
            import ssl

            tls = ssl.create_default_context(cafile=self.ca)
        return dict(user=self.user, password=self.password, tls=tls)


class Stopped(Exception):
    """SIGTERM/SIGINT arrived while waiting."""


def heartbeat_user(url: str) -> str:
    """The NATS user of the heartbeat of the worker at url: it may write
    that worker's key alone (heartbeat_permissions)."""
    return "heartbeat-" + worker_key(url).removeprefix(WORKER_PREFIX)


def _reading() -> list[str]:
    """What looks the bucket up and reads it: a watch (an ordered consumer,
    flow-controlled) or one key (direct get, else a stream message get)."""
    stream = f"KV_{BUCKET}"
    return [
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
    ]


def heartbeat_permissions(url: str) -> dict:
    """What a heartbeat's user may do (the heartbeat, and its worker's leave
    and rejoin wait): read the registry, put or delete its worker's key
    (JetStream acknowledges on the client's inbox)."""
    return {
        "publish": {"allow": [*_reading(), f"$KV.{BUCKET}.{worker_key(url)}"]},
        "subscribe": {"allow": ["_INBOX.>"]},
    }


# the sync's NATS user (the registry's reader)
SYNC_USER = "sync"


def sync_permissions() -> dict:
    """What the sync's user may do: read the registry, make the bucket on
    first use and put the router's view; never a worker's key."""
    return {
        "publish": {"allow": [*_reading(), f"$JS.API.STREAM.CREATE.KV_{BUCKET}", f"$KV.{BUCKET}.{ROUTER_PREFIX}>"]},
        "subscribe": {"allow": ["_INBOX.>"]},
    }


def worker_key(url: str) -> str:
    """One key per worker endpoint, so that two layouts that both have a
    `context-0` (on different hosts) never share a key."""
    return WORKER_PREFIX + re.sub(r"[^A-Za-z0-9_-]", "-", hostport(url))


def router_key(router: str) -> str:
    """The key a router's sync puts its view under (router: its URL)."""
    return ROUTER_PREFIX + re.sub(r"[^A-Za-z0-9_-]", "-", hostport(router))


def router_views(values: dict[str, dict]) -> dict[str, dict]:
    """{router URL: its view} of every live router report in the registry."""
    return {v.get("router", k): v for k, v in values.items() if k.startswith(ROUTER_PREFIX) and isinstance(v, dict)}


def hostport(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def probe(url: str, timeout: float = 2.0) -> str:
    """healthy (GET /health is 200), refused (no process listens: the worker
    is gone), down (no answer at all) or unhealthy."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return "healthy" if response.status == 200 else "unhealthy"
    except urllib.error.HTTPError:
        return "unhealthy"
    except (urllib.error.URLError, OSError) as e:
        return "refused" if isinstance(getattr(e, "reason", e), ConnectionRefusedError) else "down"


def read_password(path: str | None = None) -> str | None:
    """The NATS password: from a file (the password alone, or the head's
    `DISAGG_NATS_PASSWORD=...` line, read literally: never shell-sourced),
    else from the environment."""
    if path:
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        if lines and lines[0].startswith(f"{PASSWORD_ENV}="):
            return envfile.value(lines, PASSWORD_ENV)
        return lines[0] if lines else None
    return os.environ.get(PASSWORD_ENV) or None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Complaint:
    """Logs a recurring error when it starts, changes or ends, not every second."""

    def __init__(self):
        self.last: str | None = None

    def __call__(self, message: str | None, recovered: str | None = None) -> None:
        if message and message != self.last:
            log(message)
        elif message is None and self.last and recovered:
            log(recovered)
        self.last = message


def stop_event() -> asyncio.Event:
    """Set on SIGTERM or SIGINT: every loop of the agent waits on it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_all(stop: asyncio.Event, loops: list, grace: float = 10.0) -> None:
    """Run the agent's loops until stopped. One that fails stops the others
    (they all end on stop) and the agent exits with its error, for systemd
    to restart it: left to asyncio.run's cancelling, a loop inside nats-py's
    connect never ended and the agent hung silently."""
    tasks = [asyncio.ensure_future(loop) for loop in loops]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    failed = next((t.exception() for t in done if not t.cancelled() and t.exception()), None)
    if failed is None:
        return
    log(f"stopping: {describe(failed)}")
    stop.set()
    if pending:
        await asyncio.wait(pending, timeout=grace)
    raise failed


async def sleep(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, but wake at once when stopped."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


def describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{error.__class__.__name__}: {text}" if text else error.__class__.__name__


async def connect(server: Server, stop: asyncio.Event | None = None, reconnect: bool = True, max_backoff: float = 30.0):
    """A connection that, once made, reconnects for ever. With stop, the
    first connect is retried with backoff (units start before NATS is up),
    each failure logged with its reason (never the password), until it
    succeeds or stop is set (raises Stopped). Without stop, a failure raises
    at once."""
    import nats

    last = {"at": 0.0}

    async def reconnecting(error):  # nats-py's error callback: at most every 30 s
        if time.monotonic() - last["at"] >= 30:
            last["at"] = time.monotonic()
            log(f"NATS at {server}: {describe(error)}; reconnecting")

    failed: list[BaseException] = []

    async def first_failed(error):
        failed.append(error)

    # a server whose host died sends no FIN: without a pong for 4 s the
    # client moves to another (nats-py's default waits 2 pings of 120 s,
    # while the entries it should refresh expire after TTL)
    options = dict(server.options(), connect_timeout=2, reconnect_time_wait=1, ping_interval=1, max_outstanding_pings=3)
    backoff = 1.0
    complain = Complaint()
    while True:
        try:
            # nats-py retries a first connect silently for ever when reconnects
            # are allowed: fail fast here, and retry (or not) ourselves
            nc = await nats.connect(
                server.urls, allow_reconnect=False, max_reconnect_attempts=1, error_cb=first_failed, **options
            )
            break
        except Exception as e:
            reason = describe(failed[-1] if failed else e)
            failed.clear()
            if stop is None:
                raise ConnectionError(reason) from None
            complain(
                f"cannot connect to NATS at {server} as {server.user!r}: {reason}; retrying (up to every "
                f"{max_backoff:.0f} s)"
            )
        await sleep(stop, backoff)
        if stop.is_set():
            raise Stopped
        backoff = min(backoff * 2, max_backoff)
    if complain.last:
        log(f"connected to NATS at {server}")
    if not reconnect:
        return nc
    await nc.close()
    connecting = asyncio.ensure_future(
        nats.connect(server.urls, allow_reconnect=True, max_reconnect_attempts=-1, error_cb=reconnecting, **options)
    )
    if stop is None:
        return await connecting
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not connecting.done():
        connecting.cancel()
        raise Stopped
    return connecting.result()


async def bucket(nc, ttl: float = TTL):
    """The registry bucket; created on first use by whoever comes first (the
    same config from every creator, so creating is idempotent): three
    replicas on a cluster of three or more servers (it survives one lost),
    else one."""
    from nats.js.api import KeyValueConfig
    from nats.js.errors import BucketNotFoundError

    js = nc.jetstream(timeout=NATS_TIMEOUT)
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        replicas = 3 if len(nc.servers) >= 3 else 1
        return await js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1, ttl=ttl, replicas=replicas))


@dataclass
class Entry:
    value: dict
    # when the NATS server stored it (its clock)
    created: datetime
    # its position in the stream: a copy that lacks revision R lacks all after R
    revision: int = 0


async def read_all(kv, timeout: float = NATS_TIMEOUT) -> dict[str, Entry]:
    """Every live key of the bucket with its decoded value and the server's
    time of its last put."""
    # each read is a consumer of its own, left to the server once stopped:
    # nats-py keeps an idle one 5 minutes, and the syncs read every second
    # (1000 of them piled up on a cluster: "maximum consumers limit reached")
    watcher = await kv.watchall(ignore_deletes=True, inactive_threshold=CONSUMER_IDLE)
    out: dict[str, Entry] = {}
    try:
        while True:
            entry = await watcher.updates(timeout=timeout)
            if entry is None:  # the end of the current values
                break
            if entry.value:
                try:
                    value = json.loads(entry.value)
                except ValueError:
                    value = None
                if not isinstance(value, dict):
                    skipped(entry.key, "is not a JSON object")
                    continue
                out[entry.key] = Entry(value, entry.created, entry.revision)
    finally:
        await watcher.stop()
    return out


# (key, reason) already logged: a bad entry is read again every second
_logged: set[tuple[str, str]] = set()


def skipped(key: str, reason: str) -> None:
    if (key, reason) not in _logged:
        _logged.add((key, reason))
        log(f"registry: {key} {reason}: skipped")


def member(key: str, value: dict, roles: set[str]) -> dict | None:
    """A worker entry fit to be routed (its role one of roles, healthy, its
    URL and, for a PD role, its ZMQ address well formed), else None, logged
    once: an entry a bug or a hand wrote never stops whoever reads it."""
    if not key.startswith(WORKER_PREFIX) or value.get("role") not in roles or value.get("health") != "healthy":
        return None
    url, zmq = value.get("url"), value.get("zmq")
    try:
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        well_formed = parts is not None and parts.scheme in ("http", "https") and parts.hostname and parts.port
    except ValueError:  # a port out of range
        well_formed = False
    if not well_formed:
        skipped(key, f"has no http URL with a host and port ({url!r})")
        return None
    if value["role"] in DISCOVERY_TYPE and not (isinstance(zmq, str) and re.fullmatch(r"\S+:\d+", zmq)):
        skipped(key, f"has no ZMQ address host:port ({zmq!r})")
        return None
    return value


async def put(kv, key: str, value: dict) -> int:
    """Its revision."""
    return await asyncio.wait_for(kv.put(key, json.dumps(value).encode()), NATS_TIMEOUT)


def ages(entries: dict[str, Entry]) -> dict[str, float]:
    """Seconds since each entry's last put, against the newest put in the
    bucket (the sync writes every second): the server's clock only."""
    if not entries:
        return {}
    newest = max(e.created for e in entries.values())
    return {k: (newest - e.created).total_seconds() for k, e in entries.items()}
