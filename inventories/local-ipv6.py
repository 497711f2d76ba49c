"""inventories/local.py over IPv6: the same two test hosts and data, each
host named by its address from the test bridge's ULA prefix (SSH, every
service and the KV cache's path then use IPv6):

    disagg testhosts up
    pyinfra inventories/local-ipv6.py deploys/disagg.py -y
"""

import runpy
from pathlib import Path

from disagg.lab import testhosts

_local = runpy.run_path(str(Path(__file__).with_name("local.py")))
_v6 = {testhosts.address(i): testhosts.address6(i) for i in (1, 2)}

context = [(_v6[name], data) for name, data in _local["context"]]
generate = [(_v6[name], data) for name, data in _local["generate"]]
all = ([_v6[name] for name in _local["all"][0]], _local["all"][1])
