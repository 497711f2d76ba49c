"""The model on every worker host, before any worker starts, so that the
workers' health gates time the engine's load alone: model_dir pushed from
the controller, or a hub model downloaded (disagg/agent/stage.py), each
verified by checksum and stamped; a no-op reads sizes and the stamp."""

import shlex
from pathlib import PurePosixPath
from weakref import WeakKeyDictionary

from pyinfra import host, state
from pyinfra.api import OperationError, operation
from pyinfra.api.deploy import deploy
from pyinfra.context import ctx_state

from disagg.core import settings as S
from disagg.core.plan import Plan
from disagg.infra import hub
from disagg.infra.facts import StagedTree
from disagg.roles.ops import directories
from disagg.roles.transfer import made_safe, root_only, tree_pushed


@deploy("Model")
def model(plan: Plan) -> None:
    s = plan.settings
    # root's: a worker reads a model, never renames one (nor a directory above it)
    above = [str(p) for p in reversed(PurePosixPath(s.model_path).parents) if p.is_relative_to(S.MODELS_DIR)]
    wanted = {d: ("root", "755") for d in (S.MODELS_DIR, *above)}
    directories(name=f"Directories {', '.join(wanted)}", wanted=wanted)
    if s.model_source == "controller":
        tree_pushed(name=f"Push model {s.model_dir}", src=s.model_dir, dest=s.model_path)
    elif s.model_source == "hub":
        commit = hub_commit(plan)
        hub_staged(
            name=f"Stage {s.model}@{s.model_revision} ({commit[:12]}) from {s.hf_endpoint or 'the hub'}",
            repo=s.model,
            commit=commit,
            dest=s.model_path,
            endpoint=s.hf_endpoint,
        )


# the deploy file runs once per host: one answer per deploy (pyinfra's State) for all of them
_commits: WeakKeyDictionary = WeakKeyDictionary()


def hub_commit(plan: Plan) -> str:
    """The commit every worker host stages: the one they already hold (a
    host added later gets its peers' weights, whatever the revision names
    today), else the revision resolved on the controller, once."""
    s = plan.settings
    known = _commits.setdefault(ctx_state.get(), {})
    key = (s.model, s.model_revision, s.model_path)
    if key not in known:
        held = {}
        for name in sorted({w.host for w in plan.workers}):
            staged = state.inventory.get_host(name).get_fact(StagedTree, path=s.model_path, hashes=False)
            if staged.intact and staged.commit:
                held[name] = staged.commit
        if len(set(held.values())) > 1:
            raise OperationError(
                f"the hosts hold different commits of {s.model}@{s.model_revision} "
                f"({', '.join(f'{n}: {c[:12]}' for n, c in held.items())}); set model_revision to "
                "the commit they should all serve"
            )
        try:
            known[key] = next(iter(held.values()), None) or hub.commit(
                s.model, s.model_revision, s.hf_endpoint, host.data.get("hf_token")
            )
        except hub.HubError as e:
            raise OperationError(str(e)) from None
    return known[key]


@operation()
def hub_staged(repo: str, commit: str, dest: str, endpoint: str | None = None):
    """
    A hub model's commit downloaded into dest with the engine's
    huggingface_hub, verified against the hub's checksums and stamped with
    its manifest and commit. The token is read from the root-only env
    file, never a command line. With the stamp of that commit in place and
    no file changed since, nothing runs (and the hub is not asked).

    **Example:**

    .. code:: python

        hub_staged(repo="meta-llama/Llama-3.1-70B-Instruct", commit=hub_commit(plan),
                   dest="/var/lib/disagg/models/hub/meta-llama--Llama-3.1-70B-Instruct/main")
    """
    staged = host.get_fact(StagedTree, path=dest, hashes=False)
    fresh = staged.intact and staged.commit == commit
    if fresh and not staged.unsafe:
        return
    yield from made_safe(dest, staged)
    if not fresh:  # (a link removed from it leaves a file short of the stamp)
        env = f"HF_ENDPOINT={shlex.quote(endpoint)} " if endpoint else ""
        yield (
            f"{env}PYTHONPATH={S.AGENT_SRC} {S.VLLM_VENV}/bin/python -m disagg.agent.stage "
            f"--repo {shlex.quote(repo)} --revision {shlex.quote(commit)} --dest {shlex.quote(dest)} "
            f"--token-file {S.HF_TOKEN_ENV}"
        )
    yield root_only(dest)
