"""pyinfra's own CLI, started without two costs of its dependencies:

    python -m disagg.infra.pyinfra_cli INVENTORY DEPLOY ...   # = pyinfra INVENTORY DEPLOY ...

- gevent's monkey-patching asks `importlib.metadata.entry_points()` 26
  times, and each call reads the metadata of every installed distribution
  (0.5-0.7 s with the controller's 154): answered once per process here, as
  nothing is installed into the controller's venv during a deploy;
- pyinfra orders operations by the line numbers of the deploy code's call
  stack, taken with `inspect.stack()`, which also reads each frame's source
  line: about 0.3 s of a no-op's planning. It uses only file names and line
  numbers, so the stack is taken without source context.

Same arguments, same output, same exit status; `disagg.infra.launch.run_deploy`
(the CLI, scripts/local_stack.py, the tests) starts deploys with it."""

import functools
import importlib.metadata
import importlib.util
import inspect
import runpy
import sys
from contextlib import contextmanager

from disagg.core.errors import DisaggError


def speedups() -> None:
    importlib.metadata.entry_points = functools.lru_cache(maxsize=None)(importlib.metadata.entry_points)
    import pyinfra.api.util as util
    import pyinfra_cli  # noqa: F401  gevent's monkey-patching, first, as pyinfra's CLI does it

    util.stack = functools.partial(inspect.stack, 0)
    util.getframeinfo = functools.partial(inspect.getframeinfo, context=0)


def unpatched() -> None:
    """Let `pyinfra_cli.*` (the inventory loader) be imported by a process
    that runs no deploy: the controller's CLI, the tests. The package's
    __init__ monkey-patches the stdlib for gevent; done this late, under
    asyncio, threads and child processes, it now and then aborts the
    interpreter (libev). A no-op where pyinfra's CLI was imported already."""
    if "pyinfra_cli" not in sys.modules:
        sys.modules["pyinfra_cli"] = importlib.util.module_from_spec(importlib.util.find_spec("pyinfra_cli"))


@contextmanager
def as_pyinfra_errors():
    """A deploy file's body: our errors raised as pyinfra's own, which its
    CLI prints as one line with the deploy file's line, where anything
    else is a traceback (the planning core imports no pyinfra)."""
    from pyinfra.api.exceptions import PyinfraError

    try:
        yield
    except DisaggError as e:
        raise PyinfraError(str(e)) from e


def main() -> None:
    speedups()
    runpy.run_module("pyinfra", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
