"""NVIDIA driver stack for Ubuntu 22.04/24.04 GPU hosts, as NVIDIA's own
Ansible driver role does it: a pinned branch, open kernel modules, Fabric
Manager only where NVSwitches exist, persistence daemon, nouveau blacklisted,
reboot only when allowed."""

from io import StringIO

from pyinfra import host, logger
from pyinfra.api import deploy, operation
from pyinfra.facts.files import File
from pyinfra.facts.server import LinuxDistribution
from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus
from pyinfra.operations import apt, files, server

from disagg.core import settings as S
from disagg.infra.facts import NvidiaDriverLoaded
from disagg.roles.ops import commands_if_changed

DEFAULTS = S.role_defaults(
    "install_nvidia_driver",
    "nvidia_driver_branch",
    "nvidia_driver_open",
    "nvidia_driver_package",
    "nvidia_fabricmanager_package",
    "nvswitch",
    "nvidia_allow_reboot",
)
SUPPORTED = {("Ubuntu", 22), ("Ubuntu", 24)}
BLACKLIST = "/etc/modprobe.d/disagg-blacklist-nouveau.conf"


def skip_reason(pci: dict, distro: dict) -> str | None:
    if not pci["gpus"]:
        return "no NVIDIA GPU on the PCI bus"
    if (distro.get("name"), distro.get("major")) not in SUPPORTED:
        return f"{distro.get('name')} {distro.get('major')} is not Ubuntu 22.04 or 24.04"
    return None


def gpu_host_skip_reason(pci: dict) -> str | None:
    """skip_reason, asking the host for its distro only where it has GPUs."""
    return skip_reason(pci, {}) if not pci["gpus"] else skip_reason(pci, host.get_fact(LinuxDistribution))


@operation()
def reboot_if_pending(allow: bool, branch: int):
    """
    Reboot when the loaded kernel module is not the installed branch (or the
    system asks for a reboot) and the inventory allows it; else say so.

    **Example:**

    .. code:: python

        reboot_if_pending(allow=False, branch=580)
    """
    loaded = host.get_fact(NvidiaDriverLoaded)
    stale = loaded is None or not loaded["version"].startswith(f"{branch}.")
    if not (stale or host.get_fact(File, path="/var/run/reboot-required")):
        return
    if allow:
        yield from server.reboot._inner(delay=10, reboot_timeout=600)
    else:
        host.noop(
            f"reboot pending: NVIDIA driver {branch} is installed but not loaded "
            f"(loaded: {loaded['version'] if loaded else 'none'}); reboot the host "
            "or set nvidia_allow_reboot=True"
        )


@operation()
def driver_services(services: list[str]):
    """
    Enable the driver's daemons, and start them once its kernel module is
    loaded (with a reboot pending they start at boot).

    **Example:**

    .. code:: python

        driver_services(services=["nvidia-persistenced.service"])
    """
    loaded = host.get_fact(NvidiaDriverLoaded)
    enabled = host.get_fact(SystemdEnabled, services=services)
    running = host.get_fact(SystemdStatus, services=services)
    for service in services:
        if not enabled.get(service):
            yield f"systemctl enable {service}"
        if loaded and not running.get(service):
            yield f"systemctl start {service}"


@deploy("NVIDIA driver", data_defaults=DEFAULTS)
def nvidia_driver(pci: dict):
    """pci: the host's NvidiaPciDevices fact (read once for every role that needs it)."""
    if not host.data.get("install_nvidia_driver"):
        reason = "install_nvidia_driver is False in the inventory"
    else:
        reason = gpu_host_skip_reason(pci)
    if reason:
        logger.info(f"{host.print_prefix}skip NVIDIA driver: {reason}")
        return
    branch = int(host.data.get("nvidia_driver_branch"))
    open_suffix = "-open" if host.data.get("nvidia_driver_open") else ""
    nvswitch = host.data.get("nvswitch")
    if nvswitch is None:
        nvswitch = pci["nvswitches"] > 0

    blacklist = files.put(
        name="Blacklist nouveau",
        src=StringIO("blacklist nouveau\noptions nouveau modeset=0\n"),
        dest=BLACKLIST,
    )
    commands_if_changed(
        name="Rebuild initramfs without nouveau",
        commands=["update-initramfs -u"],
        changed_by=[blacklist],
    )
    packages = [host.data.get("nvidia_driver_package").format(branch=branch, open=open_suffix)]
    if nvswitch:
        packages.append(host.data.get("nvidia_fabricmanager_package").format(branch=branch))
    apt.packages(name=f"NVIDIA driver {branch}", packages=packages, update=True, cache_time=3600)
    services = ["nvidia-persistenced.service"]
    if nvswitch:
        services.append("nvidia-fabricmanager.service")
    driver_services(name="NVIDIA daemons", services=services)
    reboot_if_pending(
        name="Reboot for the NVIDIA driver",
        allow=bool(host.data.get("nvidia_allow_reboot")),
        branch=branch,
    )
