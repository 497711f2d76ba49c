"""The model on every worker host, before any worker starts, so that the
workers' health gates time the engine's load alone: model_dir pushed from
the controller, or a hub model downloaded (disagg/agent/stage.py), each
verified by checksum and stamped; a no-op reads sizes and the stamp."""

import shlex
from pathlib import PurePosixPath

from pyinfra import host
from pyinfra.api import operation
from pyinfra.api.deploy import deploy

from disagg import settings as S
from disagg.facts import StagedTree
from disagg.plan import Plan
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
        hub_staged(name=f"Stage {s.model}@{s.model_revision} from {s.hf_endpoint or 'the hub'}",
                   repo=s.model, revision=s.model_revision, dest=s.model_path, endpoint=s.hf_endpoint)  # fmt: skip


@operation()
def hub_staged(repo: str, revision: str, dest: str, endpoint: str | None = None):
    """
    A hub model's revision downloaded into dest with the engine's
    huggingface_hub, verified against the hub's checksums and stamped. The
    token is read from the root-only env file, never a command line. With
    the stamp in place and no file changed since, nothing runs (and the hub
    is not asked): `model_revision` names what to move to.

    **Example:**

    .. code:: python

        hub_staged(repo="meta-llama/Llama-3.1-70B-Instruct", revision="main",
                   dest="/var/lib/disagg/models/hub/meta-llama--Llama-3.1-70B-Instruct/main")
    """
    staged = host.get_fact(StagedTree, path=dest, hashes=False)
    fresh = staged.stamp and staged.sizes == {p: e[0] for p, e in staged.stamp.items()} and not staged.rehashed
    if fresh and not staged.unsafe:
        return
    yield from made_safe(dest, staged)
    if not fresh:  # (a link removed from it leaves a file short of the stamp)
        env = f"HF_ENDPOINT={shlex.quote(endpoint)} " if endpoint else ""
        yield (f"{env}PYTHONPATH={S.AGENT_SRC} {S.VLLM_VENV}/bin/python -m disagg.agent.stage "
               f"--repo {shlex.quote(repo)} --revision {shlex.quote(revision)} --dest {shlex.quote(dest)} "
               f"--token-file {S.HF_TOKEN_ENV}")  # fmt: skip
    yield root_only(dest)
