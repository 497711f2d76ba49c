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
# nats-py, pyzmq, msgpack and disagg/registry.py, for the registry units
AGENT_VENV = f"{OPT_DIR}/agent"
AGENT_SCRIPT = f"{AGENT_VENV}/registry.py"
SYSTEMD_DIR = "/etc/systemd/system"
SERVICE_USER = "disagg"
NATS_USER = "disagg-nats"
HF_TOKEN_ENV = f"{CONFIG_DIR}/hf-token.env"
MODELS_DIR = f"{STATE_DIR}/models"
ROUTER_UNIT = "disagg-router"
NATS_UNIT = "disagg-nats"
SYNC_UNIT = "disagg-registry-sync"
# First line of every unit we write: teardown and prune remove only units
# that carry it, never a foreign unit that happens to be named disagg-*.
MANAGED_MARKER = "# Managed by disagg: removed by deploys/teardown.py"


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
    kv_transfer_config: dict[str, Any] | None = field(
        default_factory=lambda: {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    )
    router_kv_connector: str = "nixl"
    # vllm-router's --policy (None: its default, cache_aware)
    router_policy: str | None = None
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
        """systemd's TimeoutStopSec: longer than vLLM's drain, so that it
        never SIGKILLs an engine that is still releasing its GPUs."""
        return self.shutdown_timeout + 30


def _coerce(name: str, type_: str, raw: Any) -> Any:
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
