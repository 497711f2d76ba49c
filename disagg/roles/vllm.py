"""The vLLM engine: a venv at a fixed path with the pinned
engine package (optionally from a controller wheelhouse), its plugin, the
workers' bytecode cache and the HF token (the model: roles/model.py)."""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files

from disagg.agent import envfile
from disagg.core import settings as S
from disagg.core import units
from disagg.core.plan import Plan
from disagg.roles.ops import commands_if_changed, directories, put_files, python_packages, secret_file

DEFAULTS = S.role_defaults("vllm_package", "vllm_system_packages", "vllm_remove_packages", "nixl_packages", "hf_token")


@deploy("vLLM engine", data_defaults=DEFAULTS)
def vllm(plan: Plan) -> list[OperationMeta]:
    """Returns the operations whose change restarts the workers (the
    plugin's files, where they load it)."""
    installed = python_packages(
        S.VLLM_VENV,
        [host.data.get("vllm_package")],
        remove=host.data.get("vllm_remove_packages"),
        no_deps=host.data.get("nixl_packages"),
        bytecode=False,
    )
    # the workers' own (caches): the one place below root's STATE_DIR they write
    wanted = {
        S.SERVICE_HOME: (S.SERVICE_USER, "750"),
        S.HF_HOME: (S.SERVICE_USER, "750"),
        S.PYCACHE_DIR: (S.SERVICE_USER, "755"),
    }
    directories(name=f"Directories {', '.join(wanted)}", wanted=wanted)
    # the workers' entry module imported once, as they run it: its bytecode
    # compiled once here, not by every engine of the host at its first start
    commands_if_changed(
        name="Bytecode of the engine's imports",
        commands=[
            f"runuser -u {S.SERVICE_USER} -- env HOME={S.SERVICE_HOME} PYTHONPYCACHEPREFIX={S.PYCACHE_DIR} "
            f"{S.VLLM_VENV}/bin/python -c 'import {S.VLLM_ENTRY}'"
        ],
        changed_by=installed,
    )
    if plan.engine_plugin:
        plugin = put_files(units.vllm_plugin_files())
    else:
        plugin = []
        files.directory(name=f"No {S.VLLM_PLUGIN_DIR}", path=S.VLLM_PLUGIN_DIR, present=False)
    token = host.data.get("hf_token")
    if token:
        secret_file(name="HF token", path=S.HF_TOKEN_ENV, content=envfile.text({"HF_TOKEN": str(token)}))
    else:
        files.file(name="No HF token", path=S.HF_TOKEN_ENV, present=False)
    return plugin
