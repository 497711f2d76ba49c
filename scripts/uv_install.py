"""Install into this interpreter's venv with uv, configured as pip is.

    .venv/bin/python scripts/uv_install.py -q -e '.[test]'

uv reads no pip.conf nor PIP_* variables, so a site's mirror, wheel directory
or constraints would be silently ignored: this reads pip's own view of its
configuration (`pip config list`) and passes it to uv as flags. A setting uv
has no equivalent for makes it exit 3 with one line saying so (scripts/setup.sh
then installs with pip). uv itself comes by pip (so pip's configuration applies
to it), pinned where the hosts' is: disagg/core/settings.py `PINS`.
Standard library only: it runs before the project is installed.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

FALLBACK = 3
ROOT = Path(__file__).resolve().parent.parent
# pip's precedence for `pip install`: PIP_* variables, then [install], then [global]
SECTIONS = (":env:", "install", "global")
# one flag per whitespace-separated value
LISTS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
    "trusted-host": "--allow-insecure-host",
}
SWITCHES = {"no-index": "--no-index", "pre": "--prerelease=allow", "no-cache-dir": "--no-cache"}
ENV = {
    "cert": ("SSL_CERT_FILE",),
    "timeout": ("UV_HTTP_TIMEOUT",),
    "default-timeout": ("UV_HTTP_TIMEOUT",),
    "proxy": ("HTTPS_PROXY", "HTTP_PROXY"),
}
# change how pip talks or what it prints, not what it installs
IGNORED = {
    "disable-pip-version-check",
    "quiet",
    "verbose",
    "progress-bar",
    "no-input",
    "retries",
    "root-user-action",
    "no-color",
    "log",
    "cache-dir",
    "break-system-packages",
    "exists-action",
    "config-file",
}


class Untranslatable(Exception):
    pass


def settings(listing: str) -> dict[str, str]:
    """`pip config list` output -> {key: value} as `pip install` sees it."""
    found: dict[tuple[str, str], str] = {}
    for line in listing.splitlines():
        m = re.fullmatch(r"([^.=]*)\.([\w-]+)=(.*)", line.strip())
        if m:
            found[m[1], m[2]] = ast.literal_eval(m[3])
    out: dict[str, str] = {}
    for section in reversed(SECTIONS):
        out.update({key: value for (sec, key), value in found.items() if sec == section})
    return out


def _true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def uv_options(config: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """pip settings -> (uv pip install flags, environment); Untranslatable
    names the first setting uv cannot take."""
    # pip picks the best version across all its indexes; uv by default stops
    # at the first index that has the package
    flags, env = ["--index-strategy", "unsafe-best-match"], {}
    for key, value in sorted(config.items()):
        if key in LISTS:
            flags += [part for v in value.split() for part in (LISTS[key], v)]
        elif key in SWITCHES:
            flags += [SWITCHES[key]] if _true(value) else []
        elif key in ENV:
            env.update(dict.fromkeys(ENV[key], value))
        elif key not in IGNORED:
            raise Untranslatable(key)
    return flags, env


def uv_pin() -> str:
    m = re.search(r'"uv_package": "(uv==[^"]+)"', (ROOT / "disagg" / "core" / "settings.py").read_text())
    assert m, "disagg/core/settings.py has no uv_package pin"
    return m[1]


def main(args: list[str]) -> int:
    pip = [sys.executable, "-m", "pip"]
    listing = subprocess.run([*pip, "config", "list"], check=True, capture_output=True, text=True).stdout
    try:
        flags, env = uv_options(settings(listing))
    except Untranslatable as e:
        print(
            f"setup: pip's configuration sets {e}, which uv has no equivalent for: installing with pip", file=sys.stderr
        )
        return FALLBACK
    uv = Path(sys.executable).parent / "uv"
    pin = uv_pin()
    have = subprocess.run([uv, "--version"], capture_output=True, text=True).stdout if uv.exists() else ""
    if have.split()[1:2] != [pin.partition("==")[2]]:
        subprocess.run([*pip, "install", "-q", pin], check=True)
    os.execve(uv, [str(uv), "pip", "install", "--python", sys.executable, *flags, *args], {**os.environ, **env})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
