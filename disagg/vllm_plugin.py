"""A vLLM general plugin (entry point `vllm.general_plugins`), loaded by
vLLM itself in the API server, the engine core and every worker process.
Shipped to worker hosts as plain files under VLLM_PLUGIN_DIR, on the
workers' PYTHONPATH only where inventory data asks for what it does.

It turns off the NIXL agent's progress thread when
DISAGG_NIXL_PROGRESS_THREAD=0. nixl 1.5.1 starts that thread with a poll
delay of 0 (`pthrDelay = 0` in nixl/_api.py, not settable through vLLM
0.32.0's kv_transfer_config): it busy-polls one core per engine for as long
as the engine runs. On GPU hosts that core is spare; on CPU hosts it is
taken from the engines (measured on the test hosts: one core per worker,
deploys and tests twice as slow). Without it, NIXL progresses the transfers
when vLLM polls them, every engine step."""

import functools
import logging
import os

ENV = "DISAGG_NIXL_PROGRESS_THREAD"

logger = logging.getLogger("disagg.vllm_plugin")


def register() -> None:
    if os.environ.get(ENV, "1") != "0":
        return
    try:
        from nixl._api import nixl_agent_config
    except ImportError:
        return  # no nixl in this venv: nothing to configure
    init = nixl_agent_config.__init__
    if getattr(init, "__disagg__", False):
        return  # vLLM loads plugins once per process, and again in workers

    @functools.wraps(init)
    def without_progress_thread(self, *args, **kwargs):
        if args:  # enable_prog_thread is the first parameter
            args = (False, *args[1:])
        else:
            kwargs["enable_prog_thread"] = False
        init(self, *args, **kwargs)

    without_progress_thread.__disagg__ = True
    nixl_agent_config.__init__ = without_progress_thread
    logger.warning("disagg: NIXL agent progress thread off (%s=0): transfers progress on vLLM's polls", ENV)
