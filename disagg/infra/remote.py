"""Asking hosts from the controller outside a deploy (status, preflight,
fingerprint) the way a deploy asks them: pyinfra's connections, facts and
shell commands with the inventory's own SSH settings, every host at once
(greenlets, as pyinfra's own host work; its contexts are greenlet-local)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager


@contextmanager
def connected(inventory, quiet: bool = True) -> Iterator:
    """A pyinfra State over inventory; every host it connected is
    disconnected at the end. quiet: without pyinfra's warnings (about the
    host keys of inventories that do not check them)."""
    from pyinfra.api import Config, State

    if quiet:
        logging.getLogger("pyinfra").setLevel(logging.ERROR)
    state = State(inventory, Config())
    try:
        yield state
    finally:
        for host in inventory:
            host.disconnect()


def fact(state, name: str, cls, **kwargs):
    """pyinfra fact cls of host name."""
    from pyinfra.api.facts import get_fact
    from pyinfra.context import ctx_host, ctx_state

    host = state.inventory.get_host(name)
    with ctx_state.use(state), ctx_host.use(host):
        return get_fact(state, host, cls, kwargs=kwargs)


def facts(state, names: Iterable[str], cls, kwargs: Callable[[str], dict]) -> dict:
    """{name: fact cls of that host}, read from every host at once."""
    names = list(names)
    return dict(
        zip(names, in_parallel([(functools.partial(fact, state, name, cls, **kwargs(name)), ()) for name in names]))
    )


def shell(state, name: str, command: str) -> tuple[bool, str]:
    """(succeeded, stdout) of a shell command on host name."""
    from pyinfra.api import StringCommand
    from pyinfra.context import ctx_host, ctx_state

    host = state.inventory.get_host(name)
    with ctx_state.use(state), ctx_host.use(host):
        ok, output = host.run_shell_command(StringCommand(command), print_output=False, print_input=False)
    return ok, "\n".join(output.stdout_lines) if ok else ""


def in_parallel(calls: list[tuple[Callable, tuple]]) -> list:
    """The results of calls [(function, args)], run at once."""
    import gevent

    greenlets = [gevent.spawn(f, *args) for f, args in calls]
    gevent.joinall(greenlets, raise_error=True)
    return [g.value for g in greenlets]
