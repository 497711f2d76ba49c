"""Heavy tools come as optional extras (aiperf: disagg[bench], AIConfigurator:
disagg[plan]); a missing one is named with the command that installs it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .topology import TopologyError


def tool(binary: str, package: str, extra: str) -> str:
    """The tool's executable from this environment, else from PATH."""
    beside = Path(sys.executable).parent / binary
    found = str(beside) if beside.exists() else shutil.which(binary)
    if not found:
        raise TopologyError(f"{package} is not installed: pip install 'disagg[{extra}]'")
    return found
