"""`disagg` as an operator runs it, for the end-to-end tests."""

from __future__ import annotations

import json
import subprocess
import sys


def status(inventory: str, *args: str) -> tuple[int, dict]:
    """`disagg status -i INVENTORY --json ARGS`: its exit status (0 ready, 1 not) and its JSON."""
    out = subprocess.run(
        [sys.executable, "-m", "disagg", "status", "-i", inventory, "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode in (0, 1), out.stderr[-3000:]
    return out.returncode, json.loads(out.stdout)
