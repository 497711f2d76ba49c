"""`disagg` as an operator runs it, for the end-to-end tests."""

from __future__ import annotations

import json
import subprocess
import sys


def run_json(command: str, inventory: str, *args: str) -> tuple[int, dict]:
    """`disagg COMMAND -i INVENTORY --json ARGS` (status, preflight): its exit status (0 yes, 1 no) and its JSON."""
    out = subprocess.run(
        [sys.executable, "-m", "disagg", command, "-i", inventory, "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode in (0, 1), out.stderr[-3000:]
    return out.returncode, json.loads(out.stdout)


def status(inventory: str, *args: str) -> tuple[int, dict]:
    return run_json("status", inventory, *args)
