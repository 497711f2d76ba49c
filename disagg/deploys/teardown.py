"""Stop and remove exactly what disagg deployed, and nothing else:

    pyinfra inventories/h100.py deploys/teardown.py [--data purge=true]

Unlike `pkill -f python3`, only our units are stopped (found by the marker
in their unit file), so other processes on the hosts keep running."""

from pyinfra import host

from disagg.infra import profile
from disagg.roles import connection
from disagg.roles.teardown import teardown

connection.no_delay()
profile.attach()
teardown(purge=str(host.data.get("purge", False)).lower() in ("1", "true", "yes"))
