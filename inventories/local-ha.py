"""Three local test hosts in the shape to copy for a production cluster
with no single point of failure in the request path (`disagg testhosts up
--count 3`):

    host 1  context workers, a NATS server
    host 2  the generate worker, a router host (front door, vllm-router,
            registry sync), a NATS server
    host 3  the head (Prometheus), the preferred router host, a NATS server

Clients use the floating address (vip), which keepalived keeps on a router
host whose front door answers: host 3 while it lives, else host 2. The
three NATS servers are a cluster: the registry has three replicas and
serves while any two are up. On GPUs,
give the router hosts no workers of their own, or enough that losing one
host leaves every role served. The rest of the data is inventories/local.py's:

    pyinfra inventories/local-ha.py deploys/disagg.py -y
"""

import runpy
from pathlib import Path

from disagg.lab import testhosts

_local = runpy.run_path(str(Path(__file__).with_name("local.py")))
_ssh = _local["_ssh"]
_h1, _h2, _h3 = (testhosts.address(i) for i in (1, 2, 3))
_router = {**_ssh, "vip_interface": "eth0"}

context = [(_h1, {"gpus": 2, **_ssh})]
generate = [(_h2, {"gpus": 1, **_router})]
# the head is the preferred router host: it takes the address when both start
routers = [(_h2, {"gpus": 1, **_router}), (_h3, _router)]
head = [(_h3, _router)]
nats = [(_h1, {"gpus": 2, **_ssh}), (_h2, {"gpus": 1, **_router}), (_h3, _router)]

all = (
    [_h1, _h2, _h3],
    {**_local["all"][1], "vip": f"{testhosts.VIP}/24"},
)
