"""Each host's nftables rules, from the placement: every port of ours is
admitted only from the peers that need it, and dropped from anyone else.
The rules live in a table of our own (`inet disagg`) whose chain accepts by
default, so nothing but our ports is touched (ssh, other services, other
tables' rules all stay as they are); the front door's port is open.

Who needs what:
- NATS (each NATS host): every host of the layout (agents, syncs), admins;
  its cluster routes (three or more): the other NATS hosts alone;
- a worker's HTTP port: the router hosts (router, sync), the head
  (Prometheus), admins (`disagg status` reads its /metrics);
- a worker's NIXL side channel and UCX's TCP listeners (the KV cache,
  bound within ucx_port_base..+ucx_port_count by UCX_TCP_PORT_RANGE):
  hosts of the other role;
- a router host's router: every router host's front door, admins; its
  metrics and its front door's: the head (Prometheus), admins;
- Prometheus (head): admins (the head's own services come over loopback);
- VRRP (keepalived, data vip): the other router hosts alone;
- a GPU host's DCGM exporter: the head (Prometheus), admins;
- the router's discovery socket (head, loopback): the registry sync's
  user, in the output chain (any local user could register a worker).
Admins are the controller that deploys (its address as the host sees it)
and data `firewall_allow`. Loopback is always admitted. (On GPU fabrics
the KV cache moves over RDMA, which netfilter does not see.) A host's
address that is a name is written as the addresses the host resolves it to
when the deploy plans (roles/firewall.py): nft would resolve it when the
rules load, at boot perhaps before DNS answers."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from disagg.agent.net import is_ip
from disagg.core import settings as S
from disagg.core.plan import Plan

TABLE = "disagg"
VRRP = 112


@dataclass(frozen=True)
class Rule:
    what: str
    ports: tuple[int | range, ...]
    sources: tuple[str, ...]
    # an IP protocol number without ports (VRRP: 112; a name needs
    # /etc/protocols, which minimal images lack) instead of TCP ports
    protocol: int | None = None


def rules(
    plan: Plan, host: str, admins: tuple[str, ...], resolved: dict[str, tuple[str, ...]] | None = None
) -> list[Rule]:
    """What host admits to each of its ports of ours, and from whom; admins
    besides data firewall_allow: the controller as the host sees it;
    resolved: {name: addresses} of the hosts' addresses that are names."""
    admins = (*plan.settings.firewall_allow, *admins)
    where = {h.name: (resolved or {}).get(h.address, (h.address,)) for h in plan.cluster.hosts}

    def of(hosts) -> list[str]:
        return sorted({a for h in hosts for a in where[h]})

    routers = of(plan.cluster.routers)
    layout = of(plan.serving_hosts)
    head = tuple(of([plan.cluster.head]))
    out: list[Rule] = []
    s = plan.settings
    if host in plan.cluster.nats:
        out.append(Rule("NATS: the agents of every host", (s.nats_port,), _sources(layout, admins)))
        if plan.nats_clustered:
            peers = of(n for n in plan.cluster.nats if n != host)
            out.append(Rule("NATS cluster routes: the other NATS hosts", (s.nats_cluster_port,), _sources(peers, ())))
    if host == plan.cluster.head:
        if s.prometheus and s.prometheus_listen == "cluster":
            out.append(Rule("Prometheus", (s.prometheus_port,), _sources((), admins)))
    if host in plan.cluster.routers:
        # clients reach the front door (router_port) alone; the router itself is the
        # other router hosts' front doors' (this host's own come over loopback)
        peers = of(r for r in plan.cluster.routers if r != host)
        out.append(Rule("the router behind the front doors", (s.router_internal_port,), _sources(peers, admins)))
        out.append(
            Rule(
                "the router's metrics, the front door's metrics: Prometheus",
                (s.router_metrics_port, s.frontdoor_metrics_port),
                _sources(head if host != plan.cluster.head else (), admins),
            )
        )
        if s.vip:
            out.append(Rule("VRRP (the floating address): the other router hosts", (), tuple(peers), VRRP))
    mine = plan.workers_on(host)
    if mine:
        ports = tuple(w.http_port for w in mine)
        out.append(Rule("workers' HTTP: the routers, Prometheus", ports, _sources(routers, head, admins)))
        if s.prometheus and s.dcgm:
            out.append(Rule("DCGM exporter: Prometheus", (s.dcgm_exporter_port,), _sources(head, admins)))
    if plan.topology.disaggregated:
        for role in ("context", "generate"):
            ports = tuple(p for w in mine if w.role == role for p in w.nixl_ports)
            peers = of({w.host for w in plan.workers if w.role != role})
            if ports:
                out.append(Rule(f"{role} NIXL side channel: the other role's hosts", ports, _sources(peers, ())))
        if mine:
            roles = {w.role for w in mine}
            # the hosts of a worker of a role other than one here
            peers = of({w.host for w in plan.workers if roles - {w.role}})
            out.append(
                Rule("UCX's TCP listeners (the KV cache): the other role's hosts", (s.ports.ucx,), _sources(peers, ()))
            )
    return out


def local_ruleset(plan: Plan, host: str) -> list[str]:
    """The output chain's rules: the router's discovery socket (loopback,
    PD layouts) takes registrations from the registry sync's user alone,
    not from any local user."""
    if host not in plan.cluster.routers or not plan.topology.disaggregated:
        return []
    port = plan.settings.router_discovery_port
    return [
        "# the router's discovery socket: the registry sync's user only",
        f'oif "lo" tcp dport {port} meta skuid != "{S.SYNC_USER}" counter reject with tcp reset',
    ]


def _sources(*groups) -> tuple[str, ...]:
    """Each source once: an address and the same address as a /32 or /128
    (data firewall_allow is normalised to networks) are one."""
    unique: dict[str, str] = {}
    for source in (a for g in groups for a in g):
        try:
            key = str(ipaddress.ip_network(source, strict=False))
        except ValueError:  # a host name
            key = source
        unique.setdefault(key, source)
    return tuple(unique.values())


def names(plan: Plan) -> tuple[str, ...]:
    """The hosts' addresses that are names, not IP addresses."""
    return tuple(sorted({h.address for h in plan.cluster.hosts if not is_ip(h.address)}))


def _family(source: str) -> str:
    """nft's match for source: ip6 for IPv6, else ip (a name no host
    answer resolved: the planning core's rules, never a deploy's)."""
    try:
        return "ip6" if ipaddress.ip_network(source, strict=False).version == 6 else "ip"
    except ValueError:
        return "ip"


def _element(item: int | range | str) -> str:
    """A port, a port range (first-last) or an address, as nft writes it."""
    return f"{item.start}-{item.stop - 1}" if isinstance(item, range) else str(item)


def _set(items) -> str:
    return "{ " + ", ".join(map(_element, items)) + " }"


def ruleset(
    plan: Plan, host: str, admins: tuple[str, ...], resolved: dict[str, tuple[str, ...]] | None = None
) -> list[str]:
    """The chain's rules, in order: loopback, each admission, then a drop
    of every port of ours from anyone else."""
    lines = ['iif "lo" accept']
    ours: list[int] = []
    for rule in rules(plan, host, admins, resolved):
        if rule.protocol:
            lines.append(f"# {rule.what}")
            for family in ("ip", "ip6"):
                sources = [s for s in rule.sources if _family(s) == family]
                if sources:
                    lines.append(f"{family} saddr {_set(sources)} meta l4proto {rule.protocol} accept")
            lines.append(f"meta l4proto {rule.protocol} counter drop")
            continue
        ours += rule.ports
        lines.append(f"# {rule.what}" + ("" if rule.sources else ": none listed, so loopback only"))
        for family in ("ip", "ip6"):
            sources = [s for s in rule.sources if _family(s) == family]
            if sources:
                lines.append(f"tcp dport {_set(rule.ports)} {family} saddr {_set(sources)} accept")
    if ours:
        # a range sorts by its first port
        lines.append(f"tcp dport {_set(sorted(set(ours), key=lambda p: getattr(p, 'start', p)))} counter drop")
    return lines
