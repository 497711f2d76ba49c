"""Run a deploy the way a user does (`pyinfra INVENTORY DEPLOY`: pyinfra's
own CLI, started faster by disagg/infra/pyinfra_cli.py), for the CLI's sweep, the
local stack script and the end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from disagg.core.errors import HostError
from disagg.infra.profile import ENV as PROFILE_ENV

# longer than any deploy should take (a 70B model's first download and load
# is bounded by the health timeout, 1800 s): a hung SSH session ends here
DEPLOY_TIMEOUT = 7200


class DeployError(HostError):
    """pyinfra failed; the message carries the end of its output."""


@dataclass
class DeployRun:
    seconds: float
    changed: dict[str, list[str]]  # operation name -> hosts it changed
    output: str


def run_deploy(
    inventory: str,
    deploy: str,
    *data: str,
    dry: bool = False,
    diff: bool = False,
    progress: bool = False,
    limit: str | None = None,
    timeout: float = DEPLOY_TIMEOUT,
    profile: Path | None = None,
) -> DeployRun:
    """Run `pyinfra INVENTORY DEPLOY` as a user would, with --data key=value
    overrides (and --limit, comma-separated); raise with pyinfra's output if it fails or
    takes longer than timeout seconds. With progress, each operation's name
    is echoed to stderr as it starts; with profile, each operation's time
    per host is written there (disagg/infra/profile.py)."""
    args = [sys.executable, "-m", "disagg.infra.pyinfra_cli", inventory, deploy, "--dry" if dry else "-y"]
    args += ["--diff"] if diff else ["--json"]
    for item in data:
        args += ["--data", item]
    for pattern in limit.split(",") if limit else ():
        args += ["--limit", pattern]
    start = time.monotonic()
    # stdout to a file: with --json it is one document; the log streams on stderr
    with tempfile.TemporaryFile("w+") as out:
        # its own process group: on timeout it goes with its SSH children
        env = {**os.environ, PROFILE_ENV: str(profile)} if profile else None
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
        watchdog = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
        watchdog.start()
        log = []
        try:
            for line in proc.stderr:
                log.append(line)
                if progress and line.startswith("--> Starting operation:"):
                    print(f"    {line[len('--> Starting operation:') :].strip()}", file=sys.stderr, flush=True)
            proc.wait()
        except BaseException:
            # interrupted (Ctrl-C, a test's teardown): pyinfra and its SSH go too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            watchdog.cancel()
        out.seek(0)
        stdout = out.read()
    seconds = time.monotonic() - start
    stderr = "".join(log)
    if proc.returncode == -signal.SIGKILL and seconds >= timeout:
        raise DeployError(f"{' '.join(args[2:])} timed out after {timeout:.0f} s:\n{stderr[-6000:]}")
    if proc.returncode:
        raise DeployError(f"{' '.join(args[2:])} failed:\n{_failures(log)}{stdout[-6000:]}\n{stderr[-6000:]}")
    changed: dict[str, list[str]] = {}
    if not diff:
        for op in json.loads(stdout).get("results", {}).get("operations", []):
            if op["success"]:
                changed[op["name"]] = op["success"]
    return DeployRun(seconds, changed, stdout + stderr)


def _failures(log: list[str]) -> str:
    """Each operation that failed, with the host's lines under it: the log's
    tail may show only the last host to fail."""
    failed, operation = [], ""
    for i, line in enumerate(log):
        if line.startswith("--> Starting operation:"):
            operation = line
        elif "] Error" in line:
            # the lines a failing operation printed come before its Error line
            failed += [operation, *log[max(0, i - 15) : i + 1]]
    return "".join(["failed operations:\n", *failed, "\n"]) if failed else ""
