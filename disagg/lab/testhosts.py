"""Local test hosts: Debian hosts with a real systemd, booted with
systemd-nspawn from a debootstrap root filesystem, each in its own network
namespace on a private bridge with NAT to the package mirrors, reached over
SSH with a generated key. They stand in for GPU nodes on machines without
one; only their addresses are ever targeted.

Everything created is recorded in a state file, so that `down` removes it
all (containers by PID, namespaces, veths, bridge, NAT rule, tmpfs) even from
another process after a crash or an interrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from disagg.core.errors import HostError

CACHE = Path(os.environ.get("DISAGG_CACHE", "/var/cache/disagg"))
STATE = CACHE / "testhosts" / "state.json"
KEY = CACHE / "testhosts" / "id_ed25519"
BRIDGE = "disaggbr0"
NET = "10.213.0"
GATEWAY = f"{NET}.1"
# each host also has an address from this ULA prefix (IPv6 deployments)
NET6 = "fd00:213::"
NSPAWN_RUN = Path("/run/systemd/nspawn")
OUTSIDER, OUTSIDER_NETNS, OUTSIDER_VETH = f"{NET}.99", "disagg-x", "disaggvx"
# the clients' floating address of inventories/local-ha.py (keepalived)
VIP = f"{NET}.100"
# the login deploys use, as cloud images give one: passwordless sudo, not root
LOGIN = "deployer"
RECIPE = {
    "suite": "bookworm",
    "mirror": "http://deb.debian.org/debian",
    # sudo for LOGIN; rsyslog: /var/log/auth.log, where sudo logs every command line
    "include": [
        "systemd",
        "systemd-sysv",
        "dbus",
        "openssh-server",
        "python3",
        "python3-venv",
        "iproute2",
        "ca-certificates",
        "procps",
        "sudo",
        "rsyslog",
    ],
    "login": LOGIN,
}
TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "iptables": "iptables",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "ip": "iproute2",
}


class HarnessError(HostError):
    pass


def address(i: int) -> str:
    """Address of test host i (1-based)."""
    return f"{NET}.{10 + i}"


def address6(i: int) -> str:
    """IPv6 address of test host i (1-based)."""
    return f"{NET6}{10 + i}"


def check_prerequisites() -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise HarnessError(f"test hosts need: apt-get install {' '.join(missing)}")
    if os.geteuid() != 0:
        raise HarnessError("test hosts need root (network namespaces, nspawn): run as root")


def _run(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a harness command; a failure is one HarnessError line."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HarnessError(f"{' '.join(args)}: {e}") from None
    if check and result.returncode:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise HarnessError(f"{' '.join(args)} exited {result.returncode}: {last}")
    return result


def rootfs() -> Path:
    """The root filesystem for RECIPE, built once and kept in CACHE; a new
    recipe builds a new one."""
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    root = CACHE / f"rootfs-{RECIPE['suite']}-{digest}"
    if root.is_dir():
        return root
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    print(f"building test-host root filesystem {root} (about a minute)", flush=True)
    result = _run(
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(RECIPE['include'])}",
        RECIPE["suite"],
        str(tmp),
        RECIPE["mirror"],
        check=False,
        timeout=1800,
    )
    if result.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HarnessError(f"debootstrap failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    _run("chroot", str(tmp), "useradd", "--create-home", "--shell", "/bin/bash", RECIPE["login"])
    sudoers = tmp / "etc" / "sudoers.d" / RECIPE["login"]
    sudoers.write_text(f"{RECIPE['login']} ALL=(ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    tmp.rename(root)
    return root


def _ssh_key() -> Path:
    if not KEY.exists():
        KEY.parent.mkdir(parents=True, exist_ok=True)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "disagg-testhosts", "-f", str(KEY))
    return KEY


@contextmanager
def outsider():
    """A machine on the hosts' network that is none of theirs and not the
    controller: a bare network namespace on the bridge, at OUTSIDER. Yields
    a function that runs a command in it (check=False)."""
    _remove_outsider()
    try:
        _run("ip", "netns", "add", OUTSIDER_NETNS)
        _run("ip", "link", "add", OUTSIDER_VETH, "type", "veth", "peer", "name", "eth0", "netns", OUTSIDER_NETNS)
        _run("ip", "link", "set", OUTSIDER_VETH, "master", BRIDGE, "up")
        _run("ip", "-n", OUTSIDER_NETNS, "addr", "add", f"{OUTSIDER}/24", "dev", "eth0")
        _run("ip", "-n", OUTSIDER_NETNS, "link", "set", "eth0", "up")
        yield lambda *command, timeout=60: _run(
            "ip", "netns", "exec", OUTSIDER_NETNS, *command, check=False, timeout=timeout
        )
    finally:
        _remove_outsider()


def _remove_outsider() -> None:
    _run("ip", "link", "del", OUTSIDER_VETH, check=False)
    _run("ip", "netns", "del", OUTSIDER_NETNS, check=False)


def ssh_command(i: int) -> list[str]:
    """ssh to test host i as root, the command to follow."""
    return [
        "ssh",
        "-i",
        str(KEY),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=5",
        f"root@{address(i)}",
    ]


def ssh(i: int, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a shell command on test host i as root."""
    return subprocess.run([*ssh_command(i), command], check=check, capture_output=True, text=True, timeout=timeout)


@dataclass
class TestHosts:
    count: int = 2

    def _state(self) -> dict:
        try:
            return json.loads(STATE.read_text()) if STATE.exists() else {}
        except ValueError:
            raise HarnessError(f"{STATE} is not valid JSON; remove the leftovers by hand, then delete it") from None

    def _record(self, state: dict) -> None:
        STATE.parent.mkdir(parents=True, exist_ok=True)
        tmp = STATE.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, STATE)

    def up(self) -> list[str]:
        """Boot the hosts and return their addresses; removes leftovers of an
        earlier run first."""
        check_prerequisites()
        self.down()
        root, key = rootfs(), _ssh_key()
        state: dict = {"hosts": {}, "bridge": False, "nat": False, "tmpfs": False}
        self._record(state)
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        state["bridge"] = True
        self._record(state)
        _run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        _run("ip", "addr", "add", f"{NET6}1/64", "dev", BRIDGE, "nodad")
        _run("ip", "link", "set", BRIDGE, "up")
        _run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        _run("iptables", "-t", "nat", "-A", "POSTROUTING", *self._nat_rule())
        state["nat"] = True
        self._record(state)
        # nspawn cannot clean its propagation directory on a disk-backed /run
        NSPAWN_RUN.mkdir(parents=True, exist_ok=True)
        if _run("mountpoint", "-q", str(NSPAWN_RUN), check=False).returncode:
            _run("mount", "-t", "tmpfs", "tmpfs", str(NSPAWN_RUN))
            state["tmpfs"] = True
        for i in range(1, self.count + 1):
            state["hosts"][str(i)] = self._boot(i, root, key)
            self._record(state)
        for i in range(1, self.count + 1):
            self._wait_running(i)
        return [address(i) for i in range(1, self.count + 1)]

    def _nat_rule(self) -> list[str]:
        return ["-s", f"{NET}.0/24", "!", "-o", BRIDGE, "-j", "MASQUERADE"]

    def _boot(self, i: int, root: Path, key: Path) -> dict:
        name, ns, veth = f"disagg-h{i}", f"disagg-h{i}", f"disaggv{i}"
        host = {"netns": ns, "veth": veth, "root": str(CACHE / "testhosts" / name), "pid": None}
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", veth, "master", BRIDGE, "up")
        _addresses(i, ns)
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _default_route(ns)
        target = Path(host["root"])
        shutil.rmtree(target, ignore_errors=True)
        _run("cp", "-a", str(root), str(target))
        # root for the harness (ssh()), LOGIN for the deploys
        for home in (target / "root", target / "home" / LOGIN):
            ssh_dir = home / ".ssh"
            ssh_dir.mkdir(mode=0o700, exist_ok=True)
            (ssh_dir / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
            owner = home.stat()
            for path in (ssh_dir, ssh_dir / "authorized_keys"):
                os.chown(path, owner.st_uid, owner.st_gid)
        shutil.copy("/etc/resolv.conf", target / "etc" / "resolv.conf")
        (target / "etc" / "hostname").write_text(f"{name}\n")
        # as Debian's installer does: sudo looks its host's name up, and waited 5 s for DNS on every command
        (target / "etc" / "hosts").write_text(
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost\n"
        )
        host["pid"] = _start(name, ns, target)
        return host

    def power_off(self, i: int) -> None:
        """Cut host i's power: its init killed (and with it every process
        of the container, at once: no unit stops, no VRRP goodbye), its
        link dark and the addresses its programs added gone, as a host
        that dies is (the namespace would answer for them otherwise)."""
        state = self._state()
        host = state["hosts"][str(i)]
        pid = host["pid"]
        if not (pid and is_our_container(pid, host["root"])):
            raise HarnessError(f"test host {address(i)} is not running")
        _run("ip", "link", "set", host["veth"], "down")
        for child in _children(pid):
            os.kill(child, signal.SIGKILL)
        _stop(pid)
        host["pid"] = None
        self._record(state)
        _run("ip", "-n", host["netns"], "addr", "flush", "dev", "eth0")
        _addresses(i, host["netns"])

    def power_on(self, i: int) -> None:
        """Boot host i again from its disk as it was (after power_off)."""
        state = self._state()
        host = state["hosts"][str(i)]
        _run("ip", "link", "set", host["veth"], "up")
        _default_route(host["netns"])
        host["pid"] = _start(f"disagg-h{i}", host["netns"], Path(host["root"]))
        self._record(state)
        self._wait_running(i)

    def cut(self, i: int) -> None:
        """Cut host i's link (it keeps running, unreachable)."""
        _run("ip", "-n", self._state()["hosts"][str(i)]["netns"], "link", "set", "eth0", "down")

    def reconnect(self, i: int) -> None:
        """Host i's link back after cut(), with the default route a link
        taken down loses (the package mirrors are reached through it)."""
        ns = self._state()["hosts"][str(i)]["netns"]
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _default_route(ns)

    def _wait_running(self, i: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = ssh(i, "systemctl is-system-running", check=False, timeout=10).stdout.strip()
            except subprocess.TimeoutExpired:
                state = ""
            if state in ("running", "degraded"):
                return
            time.sleep(1)
        raise HarnessError(f"test host {address(i)} did not boot within {timeout:.0f} s")

    def down(self) -> None:
        """Remove everything the last `up` created, as recorded."""
        state = self._state()
        for host in state.get("hosts", {}).values():
            if host.get("pid") and is_our_container(host["pid"], host["root"]):
                _stop(host["pid"])
            _run("ip", "link", "del", host["veth"], check=False)
            _run("ip", "netns", "del", host["netns"], check=False)
            shutil.rmtree(host["root"], ignore_errors=True)
        _remove_outsider()
        if state.get("nat"):
            _run("iptables", "-t", "nat", "-D", "POSTROUTING", *self._nat_rule(), check=False)
        if state.get("bridge"):
            _run("ip", "link", "del", BRIDGE, check=False)
        if state.get("tmpfs"):
            _run("umount", str(NSPAWN_RUN), check=False)
        STATE.unlink(missing_ok=True)


def _addresses(i: int, ns: str) -> None:
    """Test host i's own addresses on its interface in namespace ns."""
    _run("ip", "-n", ns, "addr", "add", f"{address(i)}/24", "dev", "eth0")
    _run("ip", "-n", ns, "addr", "add", f"{address6(i)}/64", "dev", "eth0", "nodad")


def _default_route(ns: str) -> None:
    _run("ip", "-n", ns, "route", "replace", "default", "via", GATEWAY)


def _start(name: str, ns: str, root: Path) -> int:
    """Boot a container on root in network namespace ns; returns its PID."""
    log = open(CACHE / "testhosts" / f"{name}.log", "a")
    proc = subprocess.Popen(
        [
            "systemd-nspawn",
            "-q",
            "-D",
            str(root),
            "--boot",
            "--register=no",
            "--keep-unit",
            f"--network-namespace-path=/run/netns/{ns}",
            f"--machine={name}",
            # as root on a real host: nftables (our firewall), in its own namespace only
            "--capability=CAP_NET_ADMIN",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc.pid


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (the container's init, for nspawn)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(p) for p in task.read_text().split()]
    return found


def is_our_container(pid: int, root: str) -> bool:
    """Whether pid is still the systemd-nspawn we started on root: the state
    file outlives reboots, and a recorded PID may since belong to anything."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in argv if a]
    return (
        bool(args)
        and Path(args[0]).name == "systemd-nspawn"
        and "-D" in args
        and args[args.index("-D") + 1 : args.index("-D") + 2] == [root]
    )


def _stop(pid: int, timeout: float = 30) -> None:
    """Stop one container by the PID we started (SIGTERM powers it off)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # not our child (down from another process)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
