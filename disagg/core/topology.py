"""Topology labels and the placement of workers onto inventory hosts.

This module is the one source of truth for which GPUs and ports each worker
gets; templates and roles only substitute what it computes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from disagg.agent import net
from disagg.core.errors import InventoryError

LABEL_FORMS = "context_tp<T>dp<D>_generate_tp<T>dp<D> or baseline_tp<T>dp<D>"
_N = r"(0|[1-9][0-9]*)"  # no leading zeros, so that labels round-trip
_DISAGG_RE = re.compile(rf"context_tp{_N}dp{_N}_generate_tp{_N}dp{_N}")
_BASELINE_RE = re.compile(rf"baseline_tp{_N}dp{_N}")

UNIT_PREFIX = "disagg-"


@dataclass(frozen=True)
class Stage:
    """One role of a topology: dp instances of tp GPUs each."""

    role: str
    tp: int
    dp: int

    @property
    def gpus(self) -> int:
        return self.tp * self.dp

    @property
    def label(self) -> str:
        return f"{self.role}_tp{self.tp}dp{self.dp}"


@dataclass(frozen=True)
class Topology:
    stages: tuple[Stage, ...]

    @classmethod
    def parse(cls, label: str) -> Topology:
        if m := _DISAGG_RE.fullmatch(label):
            ct, cd, gt, gd = map(int, m.groups())
            stages = (Stage("context", ct, cd), Stage("generate", gt, gd))
        elif m := _BASELINE_RE.fullmatch(label):
            bt, bd = map(int, m.groups())
            stages = (Stage("baseline", bt, bd),)
        else:
            raise InventoryError(
                f"label {label!r} is malformed: expected {LABEL_FORMS}, e.g. context_tp2dp4_generate_tp8dp1"
            )
        for s in stages:
            for name, value in (("tp", s.tp), ("dp", s.dp)):
                if value < 1:
                    raise InventoryError(f"label {label!r}: {s.role} {name}{value} is invalid, {name} must be >= 1")
        return cls(stages)

    @property
    def label(self) -> str:
        return "_".join(s.label for s in self.stages)

    @property
    def disaggregated(self) -> bool:
        return self.stages[0].role == "context"

    @property
    def gpus(self) -> int:
        return sum(s.gpus for s in self.stages)

    @property
    def configuration(self) -> str:
        """In words, e.g. '4 x TP2 context + 1 x TP8 generate'."""
        return " + ".join(f"{s.dp} x TP{s.tp} {'aggregated' if s.role == 'baseline' else s.role}" for s in self.stages)

    def stage(self, role: str) -> Stage:
        for s in self.stages:
            if s.role == role:
                return s
        raise KeyError(role)


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    gpus: int
    # the interface(s) UCX moves KV cache over (UCX_NET_DEVICES), per host
    ucx_net_devices: str | None = None
    # the interface the floating client address goes on (router hosts)
    vip_interface: str | None = None


@dataclass(frozen=True)
class Cluster:
    """The inventory as placement sees it: hosts in order, and the hosts of
    each group (`context`, `generate`, `baseline`) by name."""

    hosts: tuple[Host, ...]
    groups: dict[str, tuple[str, ...]]
    head: str

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    @property
    def routers(self) -> tuple[str, ...]:
        """The hosts of the `routers` group (front door, vllm-router,
        registry sync) in order of preference: the head, then the others
        in inventory order; default: the head alone."""
        return self._head_first("routers")

    @property
    def nats(self) -> tuple[str, ...]:
        """The hosts of the `nats` group (a NATS server each, clustered when
        three or more), the head first; default: the head alone."""
        return self._head_first("nats")

    def _head_first(self, group: str) -> tuple[str, ...]:
        names = self.groups.get(group) or (self.head,)
        return tuple(sorted(names, key=lambda n: n != self.head))

    def group(self, role: str) -> tuple[str, str, tuple[Host, ...]]:
        """(group name, its hosts) for a role. Baseline workers default to
        the context hosts."""
        name = role
        if role == "baseline" and not self.groups.get("baseline"):
            name = "context"
        return name, tuple(self.host(n) for n in self.groups.get(name, ()))


@dataclass(frozen=True)
class Ports:
    """Port numbers of our services. Worker ports are bases: the n-th worker
    on a host gets http_base + n and a block of NIXL ports from nixl_base."""

    http_base: int = 8100
    nixl_base: int = 5600
    # the front door (clients' port); vllm-router behind it on router_internal
    router: int = 8000
    router_internal: int = 8001
    router_metrics: int = 29000
    # the front door's own Prometheus metrics (HAProxy's exporter)
    frontdoor_metrics: int = 8404
    nats: int = 4222
    nats_monitor: int = 8222
    # NATS's cluster routes between the hosts of group nats (three or more)
    nats_cluster: int = 6222
    # vllm-router's ZMQ service discovery (PD mode), on loopback
    router_discovery: int = 30001
    prometheus: int = 9090
    # the registry sync's own metrics and NATS's (loopback), for Prometheus
    registry_metrics: int = 9091
    # NVIDIA's DCGM exporter on each GPU host (its own default port)
    dcgm_exporter: int = 9400
    # UCX's TCP listeners (NIXL's data path) in a disaggregated layout: UCX
    # binds each at a free port of this range, which the firewall can name
    ucx_base: int = 20000
    ucx_count: int = 1000

    @property
    def ucx(self) -> range:
        return range(self.ucx_base, self.ucx_base + self.ucx_count)

    @property
    def ucx_spec(self) -> str:
        """The range as UCX_TCP_PORT_RANGE (and nft) write it: first-last."""
        return f"{self.ucx_base}-{self.ucx_base + self.ucx_count - 1}"

    def head_services(self) -> dict[str, int]:
        return {"prometheus_port": self.prometheus}

    def nats_services(self) -> dict[str, int]:
        """The ports of each NATS host's server."""
        return {"nats_port": self.nats, "nats_monitor_port": self.nats_monitor, "nats_cluster_port": self.nats_cluster}

    def router_services(self) -> dict[str, int]:
        """The ports of each router host's services."""
        return {
            "router_port": self.router,
            "router_internal_port": self.router_internal,
            "router_metrics_port": self.router_metrics,
            "frontdoor_metrics_port": self.frontdoor_metrics,
            "router_discovery_port": self.router_discovery,
            "registry_metrics_port": self.registry_metrics,
        }


DEFAULT_PORTS = Ports()


@dataclass(frozen=True)
class Worker:
    role: str
    index: int
    host: str
    address: str
    gpus: tuple[int, ...]
    http_port: int
    nixl_port: int

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def unit(self) -> str:
        return f"{UNIT_PREFIX}{self.name}"

    @property
    def url(self) -> str:
        return net.url("http", self.address, self.http_port)

    @property
    def agent_unit(self) -> str:
        """The companion that keeps this worker in the registry."""
        return f"{self.unit}-agent"

    @property
    def nixl_ports(self) -> range:
        # vLLM has used one NIXL side-channel port per TP rank in some releases
        # and one per engine in others: a block of tp ports is safe for both.
        return range(self.nixl_port, self.nixl_port + len(self.gpus))

    def as_dict(self) -> dict:
        return {
            "role": self.role,
            "index": self.index,
            "host": self.host,
            "gpus": list(self.gpus),
            "http_port": self.http_port,
            "nixl_port": self.nixl_port,
            "unit": self.unit,
        }


def place(topology: Topology, cluster: Cluster, ports: Ports = DEFAULT_PORTS) -> list[Worker]:
    """Assign every worker a host, GPUs and ports, or raise InventoryError.

    Each TP group stays on one host and takes the lowest free GPUs there, so
    that tp2dp4 on an 8-GPU host gets the pairs 0,1 / 2,3 / 4,5 / 6,7. A host
    in several groups shares its GPUs between them.
    """
    label = topology.label
    free = {h.name: list(range(h.gpus)) for h in cluster.hosts}
    next_port = {h.name: (ports.http_base, ports.nixl_base) for h in cluster.hosts}
    workers: list[Worker] = []
    for stage in topology.stages:
        group, hosts = cluster.group(stage.role)
        if not hosts:
            raise InventoryError(
                f"label {label!r}: inventory group {group!r} has no hosts; "
                f"add the hosts that run {stage.role} workers to group {group!r}"
            )
        widest = max(h.gpus for h in hosts)
        if stage.tp > widest:
            raise InventoryError(
                f"label {label!r}: {stage.role} tp{stage.tp} needs {stage.tp} GPUs on one "
                f"host, but hosts in group {group!r} have at most {widest} GPUs per host "
                f"(host data 'gpus'); use tp <= {widest}"
            )
        room = sum(len(free[h.name]) // stage.tp for h in hosts)
        if room < stage.dp:
            have = ", ".join(f"{h.name}: {len(free[h.name])}" for h in hosts)
            raise InventoryError(
                f"label {label!r}: {stage.label} needs {stage.dp} groups of {stage.tp} GPUs "
                f"({stage.gpus} GPUs) in group {group!r}, which has room for {room} "
                f"(free GPUs {have}); lower dp or add hosts to group {group!r}"
            )
        for index in range(stage.dp):
            host = next(h for h in hosts if len(free[h.name]) >= stage.tp)
            gpus = tuple(free[host.name][: stage.tp])
            del free[host.name][: stage.tp]
            http_port, nixl_port = next_port[host.name]
            next_port[host.name] = (http_port + 1, nixl_port + stage.tp)
            workers.append(Worker(stage.role, index, host.name, host.address, gpus, http_port, nixl_port))
    check_ports(workers, cluster, ports, ucx=topology.disaggregated)
    return workers


def check_ports(workers: list[Worker], cluster: Cluster, ports: Ports, ucx: bool = False) -> None:
    """Every port of ours on a host must be distinct and valid; with ucx,
    none on a worker's host inside UCX's range."""
    by_host: dict[str, dict[int, str]] = {h.name: {} for h in cluster.hosts}
    claims: list[tuple[str, int, str]] = [(cluster.head, port, name) for name, port in ports.head_services().items()]
    claims += [(r, port, name) for r in cluster.routers for name, port in ports.router_services().items()]
    claims += [(n, port, name) for n in cluster.nats for name, port in ports.nats_services().items()]
    for w in workers:
        claims.append((w.host, w.http_port, f"{w.name} http_port"))
        claims.extend((w.host, p, f"{w.name} nixl_port") for p in w.nixl_ports)
    for host, port, owner in claims:
        if not 1 <= port <= 65535:
            raise InventoryError(
                f"port {port} of {owner} on host {host!r} is out of range; "
                "choose port bases so that every port is in 1..65535"
            )
        other = by_host[host].setdefault(port, owner)
        if other != owner:
            raise InventoryError(
                f"port clash on host {host!r}: {port} is both {other} and {owner}; "
                "change http_port_base, nixl_port_base or the service port in the inventory data"
            )
    if not ucx:
        return
    if not (1 <= ports.ucx.start and ports.ucx.stop - 1 <= 65535):
        raise InventoryError(
            f"UCX's port range {ports.ucx_spec} is out of 1..65535; change ucx_port_base or ucx_port_count"
        )
    for host in dict.fromkeys(w.host for w in workers):
        for port, owner in by_host[host].items():
            if port in ports.ucx:
                raise InventoryError(
                    f"port clash on host {host!r}: {port} of {owner} is inside UCX's port range "
                    f"{ports.ucx_spec}; change ucx_port_base or that port in the inventory data"
                )
