"""A vLLM general plugin (entry point `vllm.general_plugins`), loaded by
vLLM itself in the API server, the engine core and every worker process.
Shipped to the workers of a disaggregated layout as plain files under
VLLM_PLUGIN_DIR, on their PYTHONPATH. It adjusts NIXL (nixl 1.5.1 under
vLLM 0.32.0) in two ways:

- A peer NIXL has marked disconnected is re-handshaken. When UCX loses an
  endpoint (a network cut longer than its keepalive), NIXL fails every
  transfer to that agent with NIXL_ERR_REMOTE_DISCONNECT, but still reports
  its metadata as present; vLLM re-handshakes a failed peer only when that
  metadata is gone, so the generate worker failed every request of that
  context worker until restarted (measured on the local stack after a
  27 s link cut). Here a disconnected agent's metadata counts as gone, so
  vLLM's own invalid-peer path releases it and handshakes again.
- With DISAGG_NIXL_PROGRESS_THREAD=0, no NIXL progress thread. nixl 1.5.1
  starts it with a poll delay of 0 (`pthrDelay = 0` in nixl/_api.py, not
  settable through vLLM's kv_transfer_config): it busy-polls a core per
  engine. On GPU hosts that core is spare; on CPU hosts it is the engines'
  (measured on the test hosts: deploys and tests twice as slow). Without
  it, NIXL progresses transfers when vLLM polls them, every engine step.

Both reach into internals: on releases other than WRITTEN_FOR it patches
nothing and logs an error saying so.
"""

import functools
import logging
import os

ENV = "DISAGG_NIXL_PROGRESS_THREAD"
# the releases whose internals the patches were written and tested against
WRITTEN_FOR = {"vllm": "0.32.0", "nixl": "1.5.1"}

logger = logging.getLogger("disagg.vllm_plugin")


def installed() -> dict[str, str | None]:
    """The release of each of WRITTEN_FOR's packages here (a local version
    label such as +cpu dropped), None where unknown."""
    from importlib.metadata import PackageNotFoundError, version

    have: dict[str, str | None] = {}
    for name in WRITTEN_FOR:
        try:
            have[name] = __import__(name).__version__ if name == "vllm" else version(name)
        except (ImportError, AttributeError, PackageNotFoundError):
            have[name] = None
        if have[name]:
            have[name] = have[name].split("+")[0]
    return have


def register() -> None:
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError:
        return  # no nixl in this venv: nothing to adjust
    if getattr(nixl_agent, "__disagg__", False):
        return  # vLLM loads plugins once per process, and again in workers
    nixl_agent.__disagg__ = True
    have = installed()
    if have != WRITTEN_FOR:
        logger.error(
            "disagg: vLLM plugin off: written for %s, found %s (no re-handshake of a disconnected NIXL "
            "peer, NIXL's progress thread as nixl starts it)",
            WRITTEN_FOR,
            have,
        )
        return
    _rehandshake_disconnected(nixl_agent)
    if os.environ.get(ENV, "1") == "0":
        _no_progress_thread(nixl_agent_config)


def _no_progress_thread(config) -> None:
    init = config.__init__

    @functools.wraps(init)
    def without_progress_thread(self, *args, **kwargs):
        if args:  # enable_prog_thread is the first parameter
            args = (False, *args[1:])
        else:
            kwargs["enable_prog_thread"] = False
        init(self, *args, **kwargs)

    config.__init__ = without_progress_thread
    logger.warning("disagg: NIXL agent progress thread off (%s=0): transfers progress on vLLM's polls", ENV)


def _name(agent) -> str:
    # vLLM passes agent names as NIXL returned them: bytes
    return agent.decode() if isinstance(agent, bytes) else agent


def _disconnected(error: Exception) -> bool:
    return type(error).__name__ == "nixlRemoteDisconnectError"


def _rehandshake_disconnected(agent) -> None:
    """Remember which remote agent each transfer goes to (handles have
    __slots__: kept by their native value); one that fails as disconnected
    has no metadata as far as vLLM asks, until it is removed or added again."""
    prep, make, transfer = agent.prep_xfer_dlist, agent.make_prepped_xfer, agent.transfer
    check, add, remove = agent.check_remote_metadata, agent.add_remote_agent, agent.remove_remote_agent

    def books(self) -> tuple[dict, dict, set]:
        if not hasattr(self, "_disagg_books"):
            # remote dlist -> agent, transfer -> agent (until transfer()), disconnected agents
            self._disagg_books = ({}, {}, set())
        return self._disagg_books

    @functools.wraps(prep)
    def prep_xfer_dlist(self, agent_name, *args, **kwargs):
        handle = prep(self, agent_name, *args, **kwargs)
        books(self)[0][handle._handle] = _name(agent_name)
        return handle

    @functools.wraps(make)
    def make_prepped_xfer(self, operation, local_side, local_ids, remote_side, *args, **kwargs):
        handle = make(self, operation, local_side, local_ids, remote_side, *args, **kwargs)
        dlists, xfers, _ = books(self)
        if remote_side._handle in dlists:
            xfers[handle._handle] = dlists[remote_side._handle]
        return handle

    @functools.wraps(transfer)
    def transfer_watched(self, handle, *args, **kwargs):
        _, xfers, gone = books(self)
        peer = xfers.pop(handle._handle, None)
        try:
            return transfer(self, handle, *args, **kwargs)
        except Exception as e:
            if _disconnected(e) and peer is not None and peer not in gone:
                gone.add(peer)
                logger.warning("disagg: NIXL agent %s disconnected: handshaking again once its reads drain", peer)
            raise

    @functools.wraps(check)
    def check_remote_metadata(self, agent_name, *args, **kwargs):
        return _name(agent_name) not in books(self)[2] and check(self, agent_name, *args, **kwargs)

    @functools.wraps(add)
    def add_remote_agent(self, metadata):
        name = add(self, metadata)
        books(self)[2].discard(_name(name))
        return name

    @functools.wraps(remove)
    def remove_remote_agent(self, agent_name):
        books(self)[2].discard(_name(agent_name))
        return remove(self, agent_name)

    agent.prep_xfer_dlist, agent.make_prepped_xfer, agent.transfer = (
        prep_xfer_dlist,
        make_prepped_xfer,
        transfer_watched,
    )
    agent.check_remote_metadata = check_remote_metadata
    agent.add_remote_agent, agent.remove_remote_agent = add_remote_agent, remove_remote_agent
