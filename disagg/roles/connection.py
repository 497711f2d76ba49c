"""The deploy's SSH connection to this host without Nagle's algorithm.

paramiko sets no socket options, so every command pyinfra runs (each fact,
each operation's check) sends its small requests under Nagle and waits out
the host's delayed ACK: 52 ms per command on the local test hosts, 6 ms with
TCP_NODELAY (as OpenSSH's own client sets for interactive sessions). A no-op
deploy is ~50 such commands per host."""

import socket

from pyinfra import host


def no_delay() -> None:
    """Call first in a deploy file (pyinfra has connected every host by then)."""
    client = getattr(host.connector, "client", None)
    transport = client.get_transport() if client else None
    # a proxied connection (ProxyCommand, a jump host's channel) is no TCP socket of ours
    if transport is not None and isinstance(transport.sock, socket.socket):
        transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
