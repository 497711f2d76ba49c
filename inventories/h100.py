"""The reference study's cluster: two 8 x H100 SXM nodes.

Node 1 (head) runs NATS, the router and the context workers; node 2 runs the
generate worker. Addresses come from the environment, so the file needs no
edit per cluster:

    DISAGG_CONTEXT_HOST=10.0.0.11 DISAGG_GENERATE_HOST=10.0.0.12 DISAGG_SSH_USER=ubuntu \\
        disagg deploy -i inventories/h100.py

Any data below can be overridden per run with --data key=value.
"""

import os

_context = os.environ.get("DISAGG_CONTEXT_HOST", "h100-node1")
_generate = os.environ.get("DISAGG_GENERATE_HOST", "h100-node2")
# a cloud image's login (ubuntu, ...) deploys through passwordless sudo
_user = os.environ.get("DISAGG_SSH_USER", "root")
_node = {"gpus": 8, "ssh_user": _user, "_sudo": _user != "root"}

context = [(_context, dict(_node))]
generate = [(_generate, dict(_node))]

all = (
    [_context, _generate],
    {
        "label": "context_tp2dp4_generate_tp8dp1",
        "baseline_label": "baseline_tp4dp2",
        "model": "neuralmagic/Meta-Llama-3.1-70B-Instruct-FP8",
        # the reference study's engine arguments
        "kv_cache_dtype": "fp8",
        "max_model_len": 3500,
        "gpu_memory_utilization": 0.9,
    },
)
