"""Converge the disaggregated layout of the inventory's `label`
(e.g. context_tp2dp4_generate_tp8dp1):

    pyinfra inventories/h100.py deploys/disagg.py [--dry --diff]

Preflight (ports, GPUs, fabric, model, versions, disk), NVIDIA driver,
NATS, vLLM, one unit per context/generate worker behind health gates, then
vllm-router in PD mode. Units of another layout are removed first. Invalid
input or a failed preflight stops here, before any host is changed."""

from pyinfra import inventory

from disagg.core.plan import make_plan
from disagg.infra import profile
from disagg.infra.pyinfra_cli import as_pyinfra_errors
from disagg.roles import connection
from disagg.roles.gate import gate
from disagg.roles.serving import converge

connection.no_delay()
profile.attach()
with as_pyinfra_errors():
    plan = make_plan(inventory, label_key="label")
    gate(plan)
    converge(plan)
