"""Where a deploy's time goes: each operation's wall time on each host, from
pyinfra's own callbacks, written as JSON when the deploy ends (data or env
DISAGG_PROFILE=FILE; `run_deploy(profile=...)` sets it), and summarised by
`disagg deploy-profile FILE`.

pyinfra runs one operation on every host at once and starts the next when
the slowest host is done, so a deploy's critical path is the sum over its
operations of the slowest host's time, plus the planning before the first
(the deploy file run against every host's facts, host after host)."""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path

ENV = "DISAGG_PROFILE"
_attached = False


def attach() -> None:
    """In a deploy file: record this run when DISAGG_PROFILE names a file
    (pyinfra runs the deploy file once per host: the first call attaches)."""
    global _attached
    path = os.environ.get(ENV)
    if not path or _attached:
        return
    _attached = True
    from pyinfra.api.state import BaseStateCallback
    from pyinfra.context import state

    record = {"loaded": time.time(), "operations": [], "hosts": {}}
    started: dict[tuple[str, str], float] = {}

    class Recorder(BaseStateCallback):
        @staticmethod
        def operation_host_start(state, host, op_hash):
            started[(host.name, op_hash)] = time.time()

        @staticmethod
        def operation_host_success(state, host, op_hash, retry_count=0):
            _done(state, host, op_hash, True)

        @staticmethod
        def operation_host_error(state, host, op_hash, retry_count=0, max_retries=0):
            _done(state, host, op_hash, False)

    def _done(state, host, op_hash, ok: bool) -> None:
        start = started.pop((host.name, op_hash), None)
        if start is None:
            return
        name = ", ".join(sorted(state.op_meta[op_hash].names))
        record["operations"].append(
            {"name": name, "host": host.name, "start": start, "seconds": round(time.time() - start, 4), "ok": ok}
        )

    def write() -> None:
        record["ended"] = time.time()
        Path(path).write_text(json.dumps(record, indent=1) + "\n")

    state.add_callback_handler(Recorder())
    atexit.register(write)


def summary(record: dict, top: int = 10) -> dict:
    """Per operation (in the order run): each host's seconds and the
    slowest; the top operations by their slowest host, the top per host, the
    planning and execution phases and the critical path."""
    ops: dict[str, dict] = {}
    for o in record["operations"]:
        entry = ops.setdefault(o["name"], {"name": o["name"], "start": o["start"], "hosts": {}})
        entry["start"] = min(entry["start"], o["start"])
        entry["hosts"][o["host"]] = round(entry["hosts"].get(o["host"], 0) + o["seconds"], 4)
    ordered = sorted(ops.values(), key=lambda e: e["start"])
    for e in ordered:
        e["slowest"] = max(e["hosts"].values())
        del e["start"]
    first = min((o["start"] for o in record["operations"]), default=record["ended"])
    hosts = sorted({o["host"] for o in record["operations"]})
    per_host = {
        h: sorted(
            ({"name": e["name"], "seconds": e["hosts"][h]} for e in ordered if h in e["hosts"]),
            key=lambda x: -x["seconds"],
        )[:top]
        for h in hosts
    }
    return {
        "planning_s": round(first - record["loaded"], 2),
        "execution_s": round(record["ended"] - first, 2),
        "critical_path_s": round(sum(e["slowest"] for e in ordered), 2),
        "operations": len(ordered),
        "top": sorted(ordered, key=lambda e: -e["slowest"])[:top],
        "per_host": per_host,
        "order": ordered,
    }


def text(s: dict, top: int = 10) -> str:
    lines = [
        f"planning {s['planning_s']:.1f} s (deploy file against every host's facts), execution "
        f"{s['execution_s']:.1f} s over {s['operations']} operations; critical path (the slowest host of "
        f"each operation, one after the other) {s['critical_path_s']:.1f} s",
        f"top {top} operations by their slowest host:",
    ]
    for e in s["top"][:top]:
        each = ", ".join(f"{h} {v:.1f}" for h, v in sorted(e["hosts"].items()))
        lines.append(f"  {e['slowest']:7.1f} s  {e['name']}  ({each})")
    for host, ops in s["per_host"].items():
        lines.append(f"top {top} on {host}:")
        lines += [f"  {o['seconds']:7.1f} s  {o['name']}" for o in ops[:top]]
    return "\n".join(lines)
