"""A deployment plan: the inventory's hosts, its settings and a label, placed.

The same plan feeds `disagg render` and the pyinfra deploys, so what the CLI
prints is what the deploy writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from disagg.agent import kv, net, vllm_plugin
from disagg.core import schema
from disagg.core import settings as S
from disagg.core.errors import InventoryError
from disagg.core.settings import Settings
from disagg.core.topology import Cluster, Host, Topology, Worker, place

ROLE_GROUPS = schema.ROLE_GROUPS
SERVICE_GROUPS = schema.SERVICE_GROUPS


def _address(h) -> str:
    """Where peers reach an inventory host: data address, else its SSH name, else its inventory name."""
    return str(h.data.get("address") or h.data.get("ssh_hostname") or h.name)


def cluster_from_inventory(inventory) -> Cluster:
    groups = {name: tuple(h.name for h in inventory.get_group(name, [])) for name in (*ROLE_GROUPS, *SERVICE_GROUPS)}
    placed = {n for g in ROLE_GROUPS for n in groups[g]}
    hosts = []
    for h in inventory:
        gpus = h.data.get("gpus")
        if h.name in placed:
            try:
                gpus = int(gpus)
            except (TypeError, ValueError):
                raise InventoryError(
                    f"host {h.name!r}: inventory data 'gpus' is {gpus!r}; set it to the number of GPUs on the host"
                ) from None
        address = _address(h)
        devices = h.data.get("ucx_net_devices")
        vip_interface = h.data.get("vip_interface")
        hosts.append(
            Host(
                h.name,
                address,
                gpus if h.name in placed else 0,
                str(devices) if devices else None,
                str(vip_interface) if vip_interface else None,
            )
        )
    head_group = groups["head"] or groups["context"] or groups["baseline"]
    if not head_group:
        raise InventoryError(
            "inventory has no 'head' or 'context' group; add the host that runs "
            "the router and NATS to group 'head' (or 'context')"
        )
    return Cluster(tuple(hosts), groups, head_group[0])


def check_inventory(inventory) -> list[str]:
    """Every problem with the inventory's data and shape, one line each:
    types and ranges per host, typos of our keys, layout settings set on a
    host other than the head (they would be ignored), hosts in no group or
    listed twice."""
    hosts = list(inventory)
    groups = {name: [h.name for h in inventory.get_group(name, [])] for name in (*ROLE_GROUPS, *SERVICE_GROUPS)}
    head = (groups["head"] or groups["context"] or groups["baseline"] or [None])[0]
    per_host = {**S.HOST_DATA, **S.ROLE_TYPES}
    known = {*per_host, *(f.name for f in fields(Settings))}
    placed = {n for g in ROLE_GROUPS for n in groups[g]}
    problems: list[schema.Problem] = []
    if head is not None:
        layout = {f.name: inventory.get_host(head).data.get(f.name) for f in fields(Settings)}
    for h in hosts:
        data = h.data.dict()
        # on every host, so that a bad value of a group is one line for the group
        problems += Settings.checked(h.name, h.data)[1]
        problems += schema.checked(h.name, per_host, data)[1]
        problems += schema.unknown_keys(h.name, data, known)
        if h.name in placed and data.get("gpus") is None:
            problems.append(schema.Problem(h.name, "gpus", None, "missing; set it to the number of GPUs on the host"))
        mine = {g for g in (*ROLE_GROUPS, *SERVICE_GROUPS) if h.name in groups[g]}
        if not mine:
            problems.append(
                schema.Problem(
                    h.name,
                    "groups",
                    [g for g in h.groups if g != "all"],
                    (
                        "the host is in none of the groups context, generate, baseline, head, routers or nats, so nothing would "
                        "run there; add it to one or remove it from the inventory"
                    ),
                )
            )
        for g in sorted(mine):
            if h.groups.count(g) > 1:
                problems.append(
                    schema.Problem(
                        h.name,
                        "groups",
                        g,
                        (
                            f"listed {h.groups.count(g)} times in group {g!r}; list it once (pyinfra keeps the data of "
                            "its last listing only)"
                        ),
                    )
                )
        listed = getattr(inventory, "listings", {}).get(h.name, [])
        for key in sorted({k for _, d in listed for k in d}):
            values = {g: d[key] for g, d in listed if key in d}
            if len({repr(v) for v in values.values()}) > 1:
                problems.append(
                    schema.Problem(
                        h.name,
                        key,
                        values,
                        (
                            "differs between the groups that list the host; pyinfra keeps one silently: give it the "
                            "same value in each listing, or in one only"
                        ),
                    )
                )
        if head is not None and h.name in (groups["routers"] or [head]):
            problems += _router_problems(h, layout.get("vip"))
        if head is not None and h.name != head:
            for key, value in layout.items():
                if data.get(key) != value and repr(data.get(key)) != repr(value):  # nan != nan
                    problems.append(
                        schema.Problem(
                            h.name,
                            key,
                            data.get(key),
                            (
                                f"differs from the head's ({head}: {'<secret>' if key in schema.SECRETS else repr(value)}); "
                                "layout settings are read from the head only: set it once for all hosts (group data) or "
                                "drop it here"
                            ),
                        )
                    )
    why = {
        "routers": "its registry sync feeds Prometheus there",
        "nats": "the admin password and the NATS monitor Prometheus reads are the head's",
    }
    for group, reason in why.items():
        if head is not None and groups[group] and head not in groups[group]:
            problems.append(
                schema.Problem(
                    head,
                    "groups",
                    [g for g in inventory.get_host(head).groups if g != "all"],
                    f"the head is not in group {group!r} ({', '.join(groups[group])}): {reason}; add the head to it",
                )
            )
    if len(groups["nats"]) == 2:
        problems.append(
            schema.Problem(
                groups["nats"][1],
                "groups",
                "nats",
                (
                    "group 'nats' has two hosts: JetStream needs a majority of its servers, so two survive the loss "
                    "of none; give it one host or three"
                ),
            )
        )
    return schema.lines(problems, [h.name for h in hosts])


def _router_problems(h, vip) -> list[schema.Problem]:
    """A router host that is to hold the floating address needs the
    interface it goes on, and an address of its own other than it."""
    if not vip:
        return []
    problems = []
    if not h.data.get("vip_interface"):
        problems.append(
            schema.Problem(
                h.name,
                "vip_interface",
                None,
                "missing: this router host may hold the floating address (vip); name the interface it goes on, e.g. eth0",
            )
        )
    own = _address(h)
    if own == str(vip).split("/")[0]:
        problems.append(
            schema.Problem(
                h.name,
                "vip",
                vip,
                "is this host's own address: the floating address moves between hosts; choose a free one in their network",
            )
        )
    return problems


@dataclass(frozen=True)
class Plan:
    topology: Topology
    settings: Settings
    cluster: Cluster
    workers: tuple[Worker, ...]

    @property
    def label(self) -> str:
        return self.topology.label

    @property
    def head(self) -> Host:
        return self.cluster.host(self.cluster.head)

    @property
    def routers(self) -> tuple[Host, ...]:
        """The router hosts (front door, vllm-router, registry sync), the preferred first."""
        return tuple(self.cluster.host(n) for n in self.cluster.routers)

    def _router(self, on: str | None) -> Host:
        return self.cluster.host(on or self.cluster.head)

    def router_address(self, on: str | None = None) -> str:
        """Where a router host's front door takes clients (its router's own
        ports are on the host's address)."""
        return self.settings.router_address or self._router(on).address

    @property
    def vip_address(self) -> str | None:
        return self.settings.vip.split("/")[0] if self.settings.vip else None

    @property
    def client_tls(self) -> bool:
        s = self.settings
        return bool(s.client_tls_cert or s.client_tls_names)

    def frontdoor_url(self, on: str | None = None) -> str:
        """A router host's front door, as clients reach it: the host's address where it listens on every one."""
        host = self.router_address(on)
        host = self._router(on).address if net.loopback_for(host) != host else host
        return net.url("https" if self.client_tls else "http", host, self.settings.router_port)

    @property
    def router_url(self) -> str:
        """Where clients send requests: the floating address (vip), else the
        head's front door (router_urls: every front door)."""
        if self.vip_address:
            return net.url("https" if self.client_tls else "http", self.vip_address, self.settings.router_port)
        return self.frontdoor_url()

    @property
    def router_urls(self) -> list[str]:
        """Every front door, the preferred first: what clients without a vip are given."""
        return [self.frontdoor_url(r.name) for r in self.routers]

    def router_internal_url(self, on: str | None = None) -> str:
        """A router host's vllm-router itself, behind the front doors: they,
        the host's own services and admins (the firewall) reach it."""
        return net.url("http", self._router(on).address, self.settings.router_internal_port)

    @property
    def router_metrics_url(self) -> str:
        return f"http://{self.router_metrics_hostport()}/metrics"

    def router_metrics_hostport(self, on: str | None = None) -> str:
        return net.hostport(self._router(on).address, self.settings.router_metrics_port)

    def frontdoor_metrics_hostport(self, on: str | None = None) -> str:
        return net.hostport(self._router(on).address, self.settings.frontdoor_metrics_port)

    @property
    def prometheus_address(self) -> str:
        return self.head.address if self.settings.prometheus_listen == "cluster" else "127.0.0.1"

    @property
    def prometheus_hostport(self) -> str:
        return net.hostport(self.prometheus_address, self.settings.prometheus_port)

    @property
    def prometheus_url(self) -> str:
        """Prometheus as the controller (cluster) or the head (loopback) reaches it."""
        return f"http://{self.prometheus_hostport}"

    @property
    def registry_metrics_address(self) -> str:
        """The registry sync's /metrics (its own and NATS's), on loopback."""
        return net.hostport("127.0.0.1", self.settings.registry_metrics_port)

    @property
    def nats_clustered(self) -> bool:
        return len(self.cluster.nats) >= 3

    @property
    def nats_url(self) -> str:
        """Every NATS server, the head's first, comma-separated: clients fail over between them."""
        return ",".join(
            net.url("tls", self.cluster.host(n).address, self.settings.nats_port) for n in self.cluster.nats
        )

    def workers_on(self, host: str) -> list[Worker]:
        return [w for w in self.workers if w.host == host]

    def serves(self, host: str) -> bool:
        """Whether host runs anything of this layout."""
        return (
            bool(self.workers_on(host))
            or host == self.cluster.head
            or host in self.cluster.routers
            or host in self.cluster.nats
        )

    @property
    def serving_hosts(self) -> list[str]:
        """The names of the hosts that run anything of this layout, sorted."""
        return sorted(h.name for h in self.cluster.hosts if self.serves(h.name))

    def units_on(self, host: str) -> list[str]:
        """Names of the units that belong on host under this plan."""
        names = [u for w in self.workers_on(host) for u in (w.unit, w.agent_unit)]
        if self.settings.firewall and self.serves(host):
            names.append(S.FIREWALL_UNIT)
        if host in self.cluster.nats:
            names.append(S.NATS_UNIT)
        if host == self.cluster.head and self.settings.prometheus:
            names.append(S.PROMETHEUS_UNIT)
        if host in self.cluster.routers:
            names += [S.ROUTER_UNIT, S.FRONTDOOR_UNIT, S.SYNC_UNIT]
            if self.settings.vip:
                names.append(S.KEEPALIVED_UNIT)
        return names

    def worker_command(self, w: Worker) -> list[str]:
        s = self.settings
        args = [
            f"{S.VLLM_VENV}/bin/python",
            "-m",
            S.VLLM_ENTRY,
            "--model",
            s.model_path,
            "--host",
            w.address,
            "--port",
            str(w.http_port),
            "--tensor-parallel-size",
            str(len(w.gpus)),
        ]
        optional = {
            "--served-model-name": s.served_name,
            "--max-model-len": s.max_model_len,
            "--gpu-memory-utilization": s.gpu_memory_utilization,
            "--kv-cache-dtype": s.kv_cache_dtype,
        }
        for flag, value in optional.items():
            if value is not None:
                args += [flag, str(value)]
        if self.topology.disaggregated and s.kv_transfer_config:
            config = {**s.kv_transfer_config, "kv_load_failure_policy": s.kv_load_failure_policy}
            args += ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]
        args += ["--shutdown-timeout", str(s.shutdown_timeout), *s.role_args(w.role)]
        return args

    @property
    def engine_plugin(self) -> bool:
        """Whether the workers load disagg's vLLM plugin (disagg/agent/vllm_plugin.py):
        those that move KV cache with NIXL."""
        return self.topology.disaggregated

    def worker_env(self, w: Worker) -> dict[str, str]:
        env = {
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, w.gpus)),
            "HF_HOME": S.HF_HOME,
            # not the user's home (root's STATE_DIR): vLLM's, Triton's, torch's caches
            "HOME": S.SERVICE_HOME,
            "PYTHONPYCACHEPREFIX": S.PYCACHE_DIR,
        }
        if self.topology.disaggregated:
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = w.address
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(w.nixl_port)
            env["UCX_TCP_PORT_RANGE"] = self.settings.ports.ucx_spec
            devices = self.cluster.host(w.host).ucx_net_devices
            if devices:
                env["UCX_NET_DEVICES"] = devices
            # disagg's vLLM plugin (disagg/agent/vllm_plugin.py)
            env["PYTHONPATH"] = S.VLLM_PLUGIN_DIR
            if not self.settings.nixl_progress_thread:
                env[vllm_plugin.ENV] = "0"
        env.update({k: str(v) for k, v in sorted(self.settings.role_env(w.role).items())})
        return env

    def router_command(self, on: str | None = None) -> list[str]:
        s = self.settings
        address = self._router(on).address
        args = [
            f"{S.ROUTER_VENV}/bin/vllm-router",
            "--host",
            address,
            "--port",
            str(s.router_internal_port),
            "--prometheus-host",
            address,
            "--prometheus-port",
            str(s.router_metrics_port),
        ]
        # a chunked body has no Content-Length for the front door to refuse: the router refuses it
        args += ["--max-payload-size", str(s.client_max_request_mb << 20)]
        if s.router_policy:
            args += ["--policy", s.router_policy]
        if self.topology.disaggregated:
            # no --prefill/--decode: members come from the registry through
            # service discovery, so workers join and leave without a restart
            args += [
                "--vllm-pd-disaggregation",
                "--vllm-discovery-address",
                self.discovery_address,
                "--kv-connector",
                s.router_kv_connector,
            ]
        else:
            args += [
                "--worker-urls",
                *(w.url for w in self.workers),
                "--retry-max-retries",
                str(s.router_retry_max_retries),
                "--retry-initial-backoff-ms",
                str(s.router_retry_initial_backoff_ms),
                "--retry-max-backoff-ms",
                str(s.router_retry_max_backoff_ms),
                "--cb-failure-threshold",
                str(s.router_cb_failure_threshold),
                "--cb-timeout-duration-secs",
                str(s.router_cb_timeout_duration_secs),
                "--health-check-interval-secs",
                str(s.router_health_check_interval_secs),
            ]
        return args

    @property
    def discovery_address(self) -> str:
        # IPv4 loopback on IPv6 hosts too: vllm-router 0.1.17 cannot bind its
        # ZMQ discovery socket to an IPv6 address (it does not enable ZMQ_IPV6)
        return net.hostport("127.0.0.1", self.settings.router_discovery_port)

    def _agent(self, command: str, *args: str, user: str | None = None) -> list[str]:
        # env: the agent's files, and nothing else of ours, on its path; not
        # the engine's bytecode cache (a worker's ExecStop runs as root)
        return [
            "/usr/bin/env",
            "-u",
            "PYTHONPYCACHEPREFIX",
            f"PYTHONPATH={S.AGENT_SRC}",
            f"{S.AGENT_VENV}/bin/python",
            "-m",
            "disagg.agent",
            command,
            "--nats",
            self.nats_url,
            "--ca",
            S.CA_CERT,
            "--user",
            user or self.settings.nats_user,
            *args,
        ]

    def heartbeat_env(self, w: Worker) -> str:
        """The own NATS password of w's heartbeat (root-only), which w's
        leave and rejoin wait use too: a worker host holds no other."""
        return S.env_path(w.agent_unit)

    def leave_command(self, w: Worker) -> list[str]:
        """The worker unit's ExecStop: out of the registry and the router, drained."""
        return self._agent(
            "leave",
            "--password-file",
            self.heartbeat_env(w),
            "--url",
            w.url,
            "--router-timeout",
            str(S.LEAVE_ROUTER_TIMEOUT),
            "--drain-timeout",
            str(self.settings.drain_timeout),
            user=kv.heartbeat_user(w.url),
        )

    def agent_command(self, w: Worker) -> list[str]:
        """The companion that registers w while it runs."""
        return self._agent(
            "heartbeat",
            "--role",
            w.role,
            "--index",
            str(w.index),
            "--host",
            w.host,
            "--url",
            w.url,
            "--gpus",
            ",".join(map(str, w.gpus)),
            "--label",
            self.label,
            "--model",
            self.settings.served_name or self.settings.model,
            "--zmq",
            self.zmq_address(w),
            user=kv.heartbeat_user(w.url),
        )

    def zmq_address(self, w: Worker) -> str:
        """What w's heartbeat registers as its ZMQ address (NIXL's side channel)."""
        return net.hostport(w.address, w.nixl_port)

    def layout_workers(self) -> list[dict]:
        """The workers the head's registry sync admits (disagg/agent/layout.py):
        each as its heartbeat registers it."""
        return [{"name": w.name, "role": w.role, "url": w.url, "zmq": self.zmq_address(w)} for w in self.workers]

    def feeds_prometheus(self, on: str | None = None) -> bool:
        """Whether a router host's sync writes Prometheus's targets: the head's, where Prometheus runs."""
        return self.settings.prometheus and (on or self.cluster.head) == self.cluster.head

    def sync_command(self, on: str | None = None) -> list[str]:
        """A router host's service that keeps its router's members = the
        registry's healthy workers; the head's also feeds Prometheus."""
        args = [
            "sync",
            "--router",
            self.router_internal_url(on),
            "--layout",
            S.LAYOUT_FILE,
            "--state-file",
            S.SYNC_STATE,
        ]
        if self.feeds_prometheus(on):
            args += [
                "--targets-dir",
                S.SCRAPE_TARGETS_DIR,
                "--metrics-address",
                self.registry_metrics_address,
                "--nats-monitor",
                net.url("http", "127.0.0.1", self.settings.nats_monitor_port),
                "--dcgm-port",
                str(self.settings.dcgm_exporter_port),
                "--certificate",
                S.CA_CERT,
                "--certificate",
                S.NATS_CERT,
            ]
        if self.topology.disaggregated:
            args += [
                "--mode",
                "pd",
                "--discovery",
                self.discovery_address,
                "--router-log",
                f"journal:{S.ROUTER_UNIT}.service",
            ]
        else:
            args += ["--mode", "aggregated"]
        return self._agent(*args, user=kv.SYNC_USER)

    def prometheus_command(self) -> list[str]:
        s = self.settings
        return [
            "/usr/bin/prometheus",
            f"--config.file={S.PROMETHEUS_CONFIG_DIR}/prometheus.yml",
            f"--storage.tsdb.path={S.PROMETHEUS_DATA}",
            f"--storage.tsdb.retention.time={s.prometheus_retention}",
            f"--web.listen-address={self.prometheus_hostport}",
        ]

    def expected(self) -> list[str]:
        """NAME=URL of every worker, as `status --expect` takes them."""
        return [f"{w.name}={w.url}" for w in self.workers]

    def status_command(self, timeout: int | None = None) -> list[str]:
        """`status` on the head (as root: it reads the password file); with a
        timeout, wait until ready."""
        args = [
            "status",
            "--password-file",
            S.NATS_SECRET_ENV,
            "--router",
            self.router_internal_url(),
            "--layout",
            S.LAYOUT_FILE,
        ]
        args += [a for e in self.expected() for a in ("--expect", e)]
        if timeout is not None:
            args += ["--wait", "--timeout", str(timeout)]
        return self._agent(*args)

    def waves(self) -> list[list[Worker]]:
        """Rolling restarts: wave k holds, of each role, the workers at
        positions k*m .. k*m+m-1 (m = max_unavailable), so that no more than
        m workers of a role are out of the router at a time."""
        m = self.settings.max_unavailable
        count = max((s.dp + m - 1) // m for s in self.topology.stages)
        return [[w for w in self.workers if w.index // m == k] for k in range(count)]

    def rejoin_command(self, w: Worker, timeout: int) -> list[str]:
        """On w's host, as root: wait until w is registered, healthy and
        listed by the router again."""
        return self._agent(
            "status",
            "--password-file",
            self.heartbeat_env(w),
            "--expect",
            f"{w.name}={w.url}",
            "--wait",
            "--timeout",
            str(timeout),
            user=kv.heartbeat_user(w.url),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "router_url": self.router_url,
            "front_doors": self.router_urls,
            "workers": [w.as_dict() for w in self.workers],
        }


def make_plan(inventory, label: str | None = None, label_key: str = "label") -> Plan:
    """Validate everything and place the workers; raises InventoryError with a
    one-line message before any host is touched."""
    problems = check_inventory(inventory)
    if problems:
        raise schema.SchemaError(problems)
    cluster = cluster_from_inventory(inventory)
    settings = Settings.from_data(inventory.get_host(cluster.head).data, cluster.head)
    label = label or getattr(settings, label_key)
    if not label:
        raise InventoryError(
            f"inventory data {label_key!r} is missing; set it, e.g. --data {label_key}=context_tp2dp4_generate_tp8dp1"
        )
    topology = Topology.parse(label)
    return Plan(topology, settings, cluster, tuple(place(topology, cluster, settings.ports)))
