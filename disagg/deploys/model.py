"""Stage the model on every worker host of the inventory, ahead of a
deploy (a 70 GB model before a maintenance window): the engine's venv, then
model_dir pushed or the hub model downloaded and verified, as
deploys/disagg.py does before its workers start. Nothing is started.

    pyinfra inventories/h100.py deploys/model.py [--data model_revision=...]
"""

from pyinfra import host, inventory

from disagg.core.plan import make_plan
from disagg.infra import profile
from disagg.infra.pyinfra_cli import as_pyinfra_errors
from disagg.roles import connection
from disagg.roles.base import base
from disagg.roles.model import model
from disagg.roles.vllm import vllm

connection.no_delay()
profile.attach()
with as_pyinfra_errors():
    plan = make_plan(inventory, label_key="label")
    if plan.workers_on(host.name):
        base(also=tuple(host.data.get("vllm_system_packages") or ()))
        vllm(plan)
        model(plan)
