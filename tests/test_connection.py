"""roles/connection.py: the deploy's SSH socket without Nagle, on a real TCP
connection (a paramiko transport stands on it as on a host's)."""

import socket
from types import SimpleNamespace

import paramiko
import pytest

from disagg.roles import connection


@pytest.fixture
def tcp():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    yield client
    client.close()
    server.close()


def _host(sock):
    transport = paramiko.Transport(sock)
    client = SimpleNamespace(get_transport=lambda: transport)
    return SimpleNamespace(connector=SimpleNamespace(client=client))


def test_the_hosts_socket_gets_tcp_nodelay(monkeypatch, tcp):
    assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    monkeypatch.setattr(connection, "host", _host(tcp))
    connection.no_delay()
    assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


class ProxySock:
    """What a ProxyCommand or jump host's channel is to paramiko: no TCP
    socket of ours; any option set on it is recorded."""

    def __init__(self):
        self.options = []

    def setsockopt(self, *args):
        self.options.append(args)


def test_a_proxied_or_unconnected_host_is_left_alone(monkeypatch):
    proxy = ProxySock()
    proxied = SimpleNamespace(
        connector=SimpleNamespace(client=SimpleNamespace(get_transport=lambda: SimpleNamespace(sock=proxy)))
    )
    for host in (proxied, SimpleNamespace(connector=SimpleNamespace(client=None)), SimpleNamespace(connector=object())):
        monkeypatch.setattr(connection, "host", host)
        connection.no_delay()  # raises nothing
    assert proxy.options == []
