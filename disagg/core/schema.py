"""The types of inventory data, checked all at once before anything is
planned: strict (no bool for a number, no float for an int), ranged, and
with no control character in any string that reaches a unit file, an env
file or a command line. Every problem is one line naming host, key, value
and the fix; `check` returns them all, `validate` raises them together."""

from __future__ import annotations

import difflib
import ipaddress
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError

from disagg.core.errors import InventoryError

ROLE_GROUPS = ("context", "generate", "baseline")
# the groups of the hosts that run the layout's own services: the head
# (NATS, Prometheus), the routers (front door, vllm-router, registry sync)
# and the NATS servers (one, or a cluster of three or more)
SERVICE_GROUPS = ("head", "routers", "nats")
# values never printed, in errors neither
SECRETS = frozenset({"hf_token", "nats_password", "api_key", "client_api_keys"})


def _printable(value: str) -> str:
    bad = sorted({repr(c) for c in value if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ValueError(
            f"contains control character(s) {', '.join(bad)}, which would start a new line or "
            "field in a rendered file; remove them"
        )
    return value


def _no_control_anywhere(value: Any) -> Any:
    if isinstance(value, str):
        _printable(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_control_anywhere(k)
            _no_control_anywhere(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _no_control_anywhere(v)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("is not a finite number")
    return value


def _no_parent(value: str) -> str:
    if ".." in value:
        raise ValueError("must not contain '..'")
    return value


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("is not an IP address this host can bind") from None


def _interface(value: str) -> str:
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise ValueError("is not an address with its prefix length") from None
    if "/" not in value:
        raise ValueError("has no prefix length") from None
    return str(iface)


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError("is not an IP address or network (CIDR)") from None


Text = Annotated[StrictStr, Field(min_length=1), AfterValidator(_printable)]
Network = Annotated[StrictStr, AfterValidator(_network)]
BindAddress = Annotated[StrictStr, AfterValidator(_ip)]
# an address with the prefix length of its network, e.g. 10.0.0.100/24
Interface = Annotated[StrictStr, AfterValidator(_interface)]
# the name of a network interface, as `ip link` shows it
InterfaceName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.:@-]{1,15}$")]
EnvKey = Annotated[StrictStr, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# an env value from data may be a number; a bool would render as "True"
EnvValue = Annotated[StrictStr, AfterValidator(_printable)] | StrictInt | StrictFloat
Env = dict[EnvKey, EnvValue]
Args = tuple[Text, ...]
Json = Annotated[dict[Text, Any], AfterValidator(_no_control_anywhere)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
# a hub repository (org/name) and a revision (branch, tag or commit): they
# become a directory name on the hosts
HUB_ID = r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?"
Revision = Annotated[StrictStr, Field(pattern=r"^[\w.][\w./-]*$"), AfterValidator(_no_parent)]
Url = Annotated[StrictStr, Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$")]
Seconds = Annotated[StrictInt, Field(ge=1)]
Count = Annotated[StrictInt, Field(ge=1)]
Gigabytes = Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)] | Annotated[StrictInt, Field(gt=0)]
Packages = tuple[Text, ...]
# vLLM 0.32.0's CacheDType (vllm/config/cache.py)
KvCacheDtype = Literal[
    "auto",
    "float16",
    "bfloat16",
    "fp8",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp8_inc",
    "fp8_ds_mla",
    "nvfp4_ds_mla",
    "turboquant_k8v4",
    "turboquant_4bit_nc",
    "turboquant_k3v4_nc",
    "turboquant_3bit_nc",
    "ultraquant_4bit",
    "int4_per_token_head",
    "int8_per_token_head",
    "fp8_per_token_head",
    "nvfp4",
    "nvfp4_4over6",
]
# vllm-router 0.1.17's --policy choices
RouterPolicy = Literal[
    "random", "round_robin", "cache_aware", "kv_aware", "power_of_two", "consistent_hash", "sticky_least_loaded"
]

# pyinfra's own keys (connectors, sudo, ...) are never ours to refuse
PYINFRA_PREFIXES = ("ssh_", "_", "docker_", "local_", "chroot_", "winrm_", "terraform_", "vagrant_")

FIX = {
    "gpus": "set it to the number of GPUs on the host, a whole number >= 1",
    "gpu_memory_utilization": "set a fraction in (0, 1], e.g. 0.9",
    "kv_cache_dtype": "use one of vLLM 0.32.0's cache dtypes, e.g. auto or fp8",
    "router_address": "use the head's cluster address (the default), or 0.0.0.0 to serve clients on every network",
    "router_policy": "use one of vllm-router's policies, e.g. round_robin or cache_aware",
    "prometheus_retention": "give a duration Prometheus takes, e.g. 15d or 12h",
    "prometheus_listen": "use cluster (the head's address, admins only through the firewall) or loopback",
    "vip": "give the clients' floating address with its prefix length, e.g. 10.0.0.100/24",
    "vip_interface": "name the interface the floating address goes on, e.g. eth0",
    "firewall_allow": "list the addresses or networks (CIDR) of admins' machines, e.g. ['10.0.0.5', '10.1.0.0/24']",
}


@dataclass(frozen=True)
class Problem:
    host: str
    key: str
    value: Any
    message: str

    @property
    def line(self) -> str:
        shown = "<secret>" if self.key in SECRETS else repr(self.value)
        return f"{self.host}: inventory data '{self.key}' = {shown}: {self.message}"


def _fix(key: str, message: str) -> str:
    if key in FIX:
        return f"{message}; {FIX[key]}"
    return message if "; " in message else f"{message}; fix it in the inventory or --data"


def _message(error: dict) -> str:
    msg = error["msg"].removeprefix("Value error, ")
    return msg[0].lower() + msg[1:]


def checked(host: str, types: dict[str, Any], data: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """Each known key of data validated against its type (a list becomes
    the tuple its type says): the valid values, and a Problem for each
    other one; unknown keys and None ignored."""
    values, found = {}, []
    for key, value in data.items():
        if key not in types or value is None:
            continue
        try:
            values[key] = TypeAdapter(types[key]).validate_python(value)
        except ValidationError as e:
            first = e.errors()[0]
            where, inner = _locate(value, first["loc"])
            found.append(Problem(host, key + where, inner, _fix(key, _message(first))))
    return values, found


def _locate(value: Any, loc: tuple) -> tuple[str, Any]:
    """The path into value that an error's loc names (without pydantic's
    union and validator tags), and the value found there."""
    where = ""
    for part in loc:
        if isinstance(value, dict) and part in value:
            where, value = f"{where}[{part!r}]", value[part]
        elif isinstance(value, (list, tuple)) and isinstance(part, int) and part < len(value):
            where, value = f"{where}[{part}]", value[part]
    return where, value


def unknown_keys(host: str, data: dict[str, Any], known: set[str]) -> list[Problem]:
    """Keys that look like a typo of ours: refused with the likely one."""
    found = []
    for key in data:
        if key in known or key.startswith(PYINFRA_PREFIXES):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        if close:
            found.append(Problem(host, key, data[key], f"unknown key; did you mean {close[0]!r}?"))
    return found


def lines(problems: list[Problem], hosts: list[str]) -> list[str]:
    """One line per distinct problem: the same one on several hosts (data
    of a group) names them together, or "all hosts"."""
    where: dict[tuple, list[str]] = {}
    for p in problems:
        where.setdefault((p.key, repr(p.value), p.message), []).append(p.host)
    out = []
    for p in problems:
        names = where.pop((p.key, repr(p.value), p.message), None)
        if names is not None:
            many = "all hosts" if len(names) > 1 and sorted(names) == sorted(hosts) else ", ".join(names)
            out.append(Problem(many, p.key, p.value, p.message).line)
    return out


class SchemaError(InventoryError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))
