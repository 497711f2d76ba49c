"""Converge the disaggregated layout of the inventory's `label`
(e.g. context_tp2dp4_generate_tp8dp1):

    pyinfra inventories/h100.py deploys/disagg.py [--dry --diff]

Preflight (ports, GPUs, fabric, model, versions, disk), NVIDIA driver,
NATS, vLLM, one unit per context/generate worker behind health gates, then
vllm-router in PD mode. Units of another layout are removed first. Invalid
input or a failed preflight stops here, before any host is changed."""

from pyinfra import inventory

from disagg import profile
from disagg.plan import make_plan
from disagg.roles import connection
from disagg.roles.preflight import gate
from disagg.roles.serving import converge

connection.no_delay()
profile.attach()
plan = make_plan(inventory, label_key="label")
gate(plan)
converge(plan)
