"""Converge the aggregated baseline of the inventory's `baseline_label`
(e.g. baseline_tp4dp2) behind vllm-router in regular mode:

    pyinfra inventories/h100.py deploys/baseline.py

Units of the disaggregated layout are removed first."""

from pyinfra import inventory

from disagg import profile
from disagg.plan import make_plan
from disagg.roles import connection
from disagg.roles.preflight import gate
from disagg.roles.serving import converge

connection.no_delay()
profile.attach()
plan = make_plan(inventory, label_key="baseline_label")
gate(plan)
converge(plan)
