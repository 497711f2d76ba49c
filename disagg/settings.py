"""Deployment-wide settings read from inventory data, with their defaults in
one place. Role-specific defaults (driver branch, package pins) sit at the
top of each role."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from .topology import Ports, TopologyError

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
# disagg's vLLM plugin (disagg/vllm_plugin.py) as the workers import it
VLLM_PLUGIN_DIR = f"{OPT_DIR}/vllm-plugin"
SYSTEMD_DIR = "/etc/systemd/system"
SERVICE_USER = "disagg"
NATS_USER = "disagg-nats"
HF_TOKEN_ENV = f"{CONFIG_DIR}/hf-token.env"
NATS_SECRET_ENV = f"{CONFIG_DIR}/nats.env"
# the router sync's last members, for a restart while NATS is down
SYNC_STATE = f"{STATE_DIR}/sync-members.json"
MODELS_DIR = f"{STATE_DIR}/models"
ROUTER_UNIT = "disagg-router"
NATS_UNIT = "disagg-nats"
SYNC_UNIT = "disagg-registry-sync"
# First line of every unit we write: teardown and prune remove only units
# that carry it, never a foreign unit that happens to be named disagg-*.
MANAGED_MARKER = "# Managed by disagg: removed by deploys/teardown.py"
# how long a leaving worker waits for the router to drop it
LEAVE_ROUTER_TIMEOUT = 15


@dataclass(frozen=True)
class Settings:
    model: str
    # a model directory on the controller, pushed to every worker host
    model_dir: str | None = None
    label: str | None = None
    baseline_label: str | None = None
    served_model_name: str | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_dtype: str | None = None
    extra_args: tuple[str, ...] = ()
    engine_env: dict[str, str] = field(default_factory=dict)
    # per role, after the shared ones: prefill and decode are tuned apart
    context_args: tuple[str, ...] = ()
    generate_args: tuple[str, ...] = ()
    baseline_args: tuple[str, ...] = ()
    context_env: dict[str, str] = field(default_factory=dict)
    generate_env: dict[str, str] = field(default_factory=dict)
    baseline_env: dict[str, str] = field(default_factory=dict)
    kv_transfer_config: dict[str, Any] | None = field(
        default_factory=lambda: {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    )
    router_kv_connector: str = "nixl"
    # false: NIXL without its busy-polling progress thread (disagg's vLLM
    # plugin), for hosts whose cores are the engines' (CPU hosts)
    nixl_progress_thread: bool = True
    # vllm-router's --policy (None: its default, cache_aware)
    router_policy: str | None = None
    # vllm-router's fault handling in regular (aggregated) mode: a worker
    # that fails is retried around at once and skipped for a short while.
    # vllm-router 0.1.17 does not retry in PD discovery mode (measured), so
    # these are not passed there.
    router_retry_max_retries: int = 3
    router_retry_initial_backoff_ms: int = 50
    router_retry_max_backoff_ms: int = 1000
    router_cb_failure_threshold: int = 5
    router_cb_timeout_duration_secs: int = 10
    router_health_check_interval_secs: int = 10
    nats_user: str = "disagg"
    http_port_base: int = Ports.http_base
    nixl_port_base: int = Ports.nixl_base
    router_port: int = Ports.router
    router_metrics_port: int = Ports.router_metrics
    nats_port: int = Ports.nats
    nats_monitor_port: int = Ports.nats_monitor
    router_discovery_port: int = Ports.router_discovery
    # vLLM drains in-flight requests for this long on SIGTERM
    shutdown_timeout: int = 60
    # rolling restarts: workers of one role restarted at a time, and how
    # long a worker out of the router may take to finish its requests
    max_unavailable: int = 1
    drain_timeout: int = 60
    # preflight before the first change; disk the deploy needs on a worker
    # host (the CUDA build of vLLM with its venv is ~10 GB; a hub model's
    # size is unknown here, so only checked when given)
    preflight: bool = True
    venv_disk_gb: float = 20
    model_disk_gb: float | None = None
    # a 70B model's first start downloads ~70 GB and loads it on every GPU
    health_timeout: int = 1800

    @classmethod
    def from_data(cls, data: Any) -> Settings:
        """Build from pyinfra host data (or any mapping with .get); values
        given as strings with `--data key=value` are converted."""
        values = {}
        for f in fields(cls):
            raw = data.get(f.name)
            if raw is not None:
                values[f.name] = _coerce(f.name, f.type, raw)
        if not values.get("model"):
            raise TopologyError("inventory data 'model' is missing; set it to a model id or path")
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
            router_metrics=self.router_metrics_port,
            nats=self.nats_port,
            nats_monitor=self.nats_monitor_port,
            router_discovery=self.router_discovery_port,
        )

    @property
    def model_path(self) -> str:
        """What vLLM loads: the pushed copy of model_dir, else the model id."""
        if self.model_dir:
            return f"{MODELS_DIR}/{self.model_dir.rstrip('/').rsplit('/', 1)[-1]}"
        return self.model

    @property
    def served_name(self) -> str | None:
        """The name clients ask for; a pushed model is served as `model`."""
        return self.served_model_name or (self.model if self.model_dir else None)

    @property
    def stop_timeout(self) -> int:
        """systemd's TimeoutStopSec: longer than leaving the router, our
        drain and vLLM's own, so that it never SIGKILLs an engine that is
        still releasing its GPUs."""
        return LEAVE_ROUTER_TIMEOUT + self.drain_timeout + self.shutdown_timeout + 30


def _coerce(name: str, type_: str, raw: Any) -> Any:
    if type_ == "bool":
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "1", "yes", "false", "0", "no"):
            return str(raw).lower() in ("true", "1", "yes")
        raise TopologyError(f"inventory data {name!r} = {raw!r} is not true or false; fix it in the inventory or --data")
    try:
        if "int" in type_ and "float" not in type_:
            return int(raw)
        if "float" in type_:
            return float(raw)
        if type_.startswith("tuple"):
            return tuple(json.loads(raw) if isinstance(raw, str) else raw)
        if type_.startswith("dict"):
            value = json.loads(raw) if isinstance(raw, str) else raw
            if value is not None and not isinstance(value, dict):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise TopologyError(
            f"inventory data {name!r} = {raw!r} is not a valid {type_}; fix it in the inventory or --data"
        ) from None
    return str(raw)
