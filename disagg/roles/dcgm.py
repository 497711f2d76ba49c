"""NVIDIA DCGM and its Prometheus exporter on the workers' GPU hosts, as
NVIDIA packages them for hosts without containers: the host engine
(`datacenter-gpu-manager-4-cuda12`, nvidia-dcgm.service) and the exporter
(`datacenter-gpu-manager-exporter`, nvidia-dcgm-exporter.service on :9400),
both from NVIDIA's CUDA network repository and run by the units they ship.
The packages pair the exporter with its DCGM release, which the container
images otherwise do; an exporter that already runs on the port (DeepOps,
GPU Operator) is scraped as it is. Skipped, with the reason, where there is
no NVIDIA GPU or the distro is not one NVIDIA's repository serves. Only
planned against captured GPU host output here (tests/test_deploy_plan.py):
no host of ours has a GPU and the network to install it."""

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.facts.server import LinuxDistribution
from pyinfra.operations import apt

from disagg.core import settings as S
from disagg.core.plan import Plan
from disagg.roles.nvidia_driver import driver_services, gpu_host_skip_reason

DEFAULTS = S.role_defaults("dcgm_packages", "cuda_keyring")
SERVICES = ["nvidia-dcgm.service", "nvidia-dcgm-exporter.service"]


@deploy("NVIDIA DCGM exporter", data_defaults=DEFAULTS)
def dcgm(plan: Plan, pci: dict):
    """pci: the host's NvidiaPciDevices fact."""
    reason = None if plan.settings.dcgm else "dcgm is False in the inventory"
    reason = reason or gpu_host_skip_reason(pci)
    if reason:
        logger.info(f"{host.print_prefix}skip DCGM exporter: {reason}")
        return
    major = host.get_fact(LinuxDistribution)["major"]
    apt.deb(name="NVIDIA CUDA repository key", src=host.data.get("cuda_keyring").format(major=major))
    apt.packages(
        name="DCGM and its exporter",
        packages=host.data.get("dcgm_packages"),
        update=True,
        cache_time=3600,
        no_recommends=True,
    )
    driver_services(name="DCGM services", services=SERVICES)
