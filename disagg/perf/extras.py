"""Heavy tools come as optional extras (aiperf: disagg[bench], AIConfigurator:
disagg[plan]); a missing one is named with the command that installs it."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from disagg.core.errors import ToolError


def tool(binary: str, package: str, extra: str) -> str:
    """The tool's executable from this environment, else from PATH."""
    beside = Path(sys.executable).parent / binary
    found = str(beside) if beside.exists() else shutil.which(binary)
    if not found:
        raise ToolError(f"{package} is not installed: pip install 'disagg[{extra}]'")
    return found


def module(name: str, extra: str):
    """The Python module name, which the extra installs."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ToolError(f"{name} is not installed: pip install 'disagg[{extra}]'") from None


def run_logged(command: list[str], log: Path, timeout: float) -> int | None:
    """Run a tool with its output in log; its exit code, or None when it ran
    past timeout seconds (then it is killed with every process it started)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
