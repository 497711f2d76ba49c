"""Stop and remove exactly what disagg installed: units found by our marker
(whatever label deployed them), their env files and our config files; with
purge also the venvs, the model cache, the NATS store, Prometheus's data
the service users disagg made and its masks of distro units. The NVIDIA
driver, and with it the nouveau blacklist, stays: without the blacklist
nouveau would take the GPUs at the next boot.
Nothing else on the host is stopped."""

from pyinfra.api import deploy
from pyinfra.operations import files

from disagg.core import settings as S
from disagg.core import units
from disagg.roles.firewall import table_absent
from disagg.roles.frontdoor import DISTRO_UNIT as HAPROXY_UNIT
from disagg.roles.keepalived import DISTRO_UNIT as KEEPALIVED_UNIT
from disagg.roles.ops import distro_unit_unmasked, prune_units, service_user_absent
from disagg.roles.prometheus import DISTRO_UNIT as PROMETHEUS_UNIT


@deploy("disagg teardown")
def teardown(purge: bool = False):
    prune_units(name="Stop and remove disagg units", keep=[])
    table_absent(name="Remove our nftables table")
    # the sync's members belong to the layout that ends here
    for path in (
        units.NATS_CONF,
        units.NATS_AUTH_CONF,
        units.NATS_SECRET_ENV,
        S.FIREWALL_RULES,
        S.HF_TOKEN_ENV,
        S.API_KEY_ENV,
        S.LAYOUT_FILE,
        S.KEEPALIVED_CONF,
    ):
        files.file(name=f"Remove {path}", path=path, present=False)
    # Prometheus's TSDB (S.PROMETHEUS_DATA) is kept: the history of what ran
    for path in (S.TLS_DIR, S.PROMETHEUS_CONFIG_DIR, S.SCRAPE_TARGETS_DIR, S.FRONTDOOR_DIR, S.SYNC_DIR):
        files.directory(name=f"Remove {path}", path=path, present=False)
    if not purge:
        return
    # the packages stay (someone may use them), their own units as before us: disabled
    for unit, _ in (PROMETHEUS_UNIT, HAPROXY_UNIT, KEEPALIVED_UNIT):
        distro_unit_unmasked(name=f"Unmask {unit}", unit=unit)
    for path in (S.OPT_DIR, S.STATE_DIR, S.CONFIG_DIR):
        files.directory(name=f"Remove {path}", path=path, present=False)
    for user in S.SERVICE_USERS:
        service_user_absent(name=f"Remove user {user}", user=user)
