"""Prometheus file_sd target files, written by the head's registry sync from
what the registry holds: the layout's workers (with their role, index, host,
layout and placed GPU count as target labels) and, on the workers' hosts, a
DCGM exporter wherever one answers. Prometheus re-reads a changed file by
itself (inotify): a worker that joins or leaves is scraped or dropped
without a reload."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from . import kv, net

WORKERS = "workers.json"
DCGM = "dcgm.json"
# how often the workers' hosts are asked whether a DCGM exporter listens
DCGM_INTERVAL = 15.0


def worker_groups(entries: list[dict]) -> list[dict]:
    """One file_sd group per worker entry of the registry."""
    return [
        {
            "targets": [kv.hostport(e["url"])],
            "labels": {
                "layout": e["label"],
                "role": e["role"],
                "index": str(e["index"]),
                "host": e["host"],
                "worker": f"{e['role']}-{e['index']}",
                "gpus": str(len(e["gpus"])),
            },
        }
        for e in sorted(entries, key=lambda e: (e["role"], e["index"]))
    ]


def hosts(entries: list[dict]) -> dict[str, str]:
    """Inventory name -> address of the hosts that run the workers."""
    return {e["host"]: urlsplit(e["url"]).hostname for e in entries}


def dcgm_groups(answering: dict[str, str], port: int) -> list[dict]:
    return [{"targets": [net.hostport(a, port)], "labels": {"host": name}} for name, a in sorted(answering.items())]


def write(directory: str, name: str, groups: list[dict]) -> bool:
    """Replace directory/name with groups (by rename: Prometheus never reads
    half a file); False when it already says that."""
    path = Path(directory) / name
    text = json.dumps(groups, indent=1) + "\n"
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


def listens(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


async def watch_dcgm(directory: str, port: int, entries, stop: asyncio.Event, interval: float = DCGM_INTERVAL) -> None:
    """entries: a callable giving the current worker entries. Hosts without
    NVIDIA GPUs run no exporter: they refuse, and are not listed."""
    while not stop.is_set():
        found = hosts(list(entries()))
        answers = await asyncio.gather(*(asyncio.to_thread(listens, a, port) for a in found.values()))
        write(directory, DCGM, dcgm_groups({n: a for (n, a), ok in zip(found.items(), answers) if ok}, port))
        await kv.sleep(stop, interval)
