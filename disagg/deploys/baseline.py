"""Converge the aggregated baseline of the inventory's `baseline_label`
(e.g. baseline_tp4dp2) behind vllm-router in regular mode:

    pyinfra inventories/h100.py deploys/baseline.py

Units of the disaggregated layout are removed first."""

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
    plan = make_plan(inventory, label_key="baseline_label")
    gate(plan)
    converge(plan)
