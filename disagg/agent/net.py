"""Host:port and URLs for IPv4 and IPv6 alike: the one place that puts an
IPv6 address in brackets (`[fd00::11]:8100`). Shipped with the host agent
(standard library only)."""

from __future__ import annotations

import ipaddress

# what a service that listens on "every address" is reached at on its own host
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def is_ip(host: str) -> bool:
    """An IPv4 or IPv6 address, not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def hostport(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if is_ipv6(host) else f"{host}:{port}"


def url(scheme: str, host: str, port: int, path: str = "") -> str:
    return f"{scheme}://{hostport(host, port)}{path}"


def loopback_for(listen: str) -> str:
    """Where a client on the same host reaches a service that listens on
    `listen`: loopback of the same family for an unspecified address."""
    return _LOOPBACK.get(listen, listen)
