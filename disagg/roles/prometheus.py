"""Prometheus on the head: Debian/Ubuntu's own `prometheus` package (bookworm
2.42, noble 2.45, jammy 2.31: each has file_sd, recording rules and
`promtool`; a distro package gets the distro's security updates and needs no
download from GitHub, which air-gapped clusters cannot reach), run by a unit
of ours under its own user with our config, rules and TSDB. The package's
own unit is masked before its first install so that apt starts no second
Prometheus with the package defaults; a Prometheus installed before us is
left alone."""

from pyinfra.api import deploy

from disagg.core import settings as S
from disagg.core import units
from disagg.core.plan import Plan
from disagg.roles.ops import commands_if_changed, directories, put_files, service_user, unit_running, wait_healthy

PACKAGES = ("prometheus",)
# the package's own unit and what it runs (roles/ops.py distro_unit_masked)
DISTRO_UNIT = ("prometheus.service", "/usr/bin/prometheus")


@deploy("Prometheus")
def prometheus(plan: Plan):
    """After the base packages (which include PACKAGES on the head). It
    reads the scrape targets the registry sync writes (roles/registry.py)."""
    service_user(name=f"Service user {S.PROMETHEUS_USER}", user=S.PROMETHEUS_USER, home=S.PROMETHEUS_DATA)
    wanted = {S.PROMETHEUS_CONFIG_DIR: ("root", "755"), S.PROMETHEUS_DATA: (S.PROMETHEUS_USER, "750")}
    directories(name="Prometheus directories", wanted=wanted)
    rendered = units.prometheus_files(plan)
    written = put_files(rendered)
    # a config or rule Prometheus would refuse stops the deploy before the restart
    commands_if_changed(
        name="promtool check config", commands=[f"promtool check config {units.PROMETHEUS_CONF}"], changed_by=written
    )
    unit_running(name=f"Run {S.PROMETHEUS_UNIT}", unit=S.PROMETHEUS_UNIT, changed_by=written, files=list(rendered))
    wait_healthy(name="Prometheus ready", unit=S.PROMETHEUS_UNIT, url=f"{plan.prometheus_url}/-/ready", timeout=60)
