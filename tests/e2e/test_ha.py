"""No single point of failure in the request path, on three test hosts
(inventories/local-ha.py): load through the floating address while the
router or the front door on the host holding it is killed, while that
host, the head (NATS, Prometheus, the preferred router host), loses its
power and comes back, and while a NATS server is down and a worker is
added. Every request is counted; `fault:` lines print the figures.

The address is moved to host 3 before each fault: host 2 runs the only
generate worker, so a host 2 that died would take the layout with it
(the lab's three engines, not the design: on GPUs, give the router hosts
no workers, or enough that losing one host leaves every role served)."""

from __future__ import annotations

import functools
import shlex
import time
import urllib.error
import urllib.request
from pathlib import Path

import as_operator
import pytest
import waiting

from disagg.agent import kv
from disagg.core import settings as S
from disagg.infra.launch import run_deploy
from disagg.lab import smoke, testhosts
from disagg.lab.load import Load
from disagg.lab.testhosts import ssh

pytestmark = pytest.mark.e2e

until = functools.partial(waiting.until, every=0.2)

INVENTORY = "inventories/local-ha.py"
H1, H2, H3 = 1, 2, 3
MODEL = "tiny-llama"
CLIENTS, PAUSE = 2, 0.05


def holds(i: int) -> bool:
    """Whether test host i has the floating address on its interface."""
    out = ssh(i, "ip -4 -o addr show dev eth0", check=False, timeout=10)
    return f" {testhosts.VIP}/" in out.stdout


def health(url: str) -> int | None:
    """The HTTP status of url's /health, None when nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def journal(i: int, since: float, lines: dict[str, str]) -> str:
    """{unit: pattern}: the lines of each unit's journal on host i since the
    epoch time `since` that match, for a failed assertion to show."""
    return "\n".join(
        f"host {i} {unit}:\n"
        + ssh(
            i,
            f"journalctl -u {unit} --since @{int(since)} --no-pager -o short-precise | grep -E {shlex.quote(pattern)}"
            " | tail -n 20",
            check=False,
        ).stdout
        for unit, pattern in lines.items()
    )


def answers(url: str) -> bool:
    try:
        return smoke.chat(url, MODEL, 2, timeout=10)["completion_tokens"] == 2
    except OSError:
        return False


@pytest.fixture
def ha(deployment):
    """The HA layout, serving through the floating address, which host 3 holds."""
    plan = deployment.ensure(inventory=INVENTORY)
    if not holds(H3):
        # a holder that stops says goodbye (priority 0): the other takes the address at once
        ssh(H2, f"systemctl restart {S.KEEPALIVED_UNIT}")
    until(lambda: holds(H3) and not holds(H2), 30, "host 3 holding the floating address")
    until(lambda: answers(plan.router_url), 60, "an answer through the floating address")
    return plan


def test_every_front_door_and_the_floating_address_answer(ha):
    assert ha.router_url == f"http://{testhosts.VIP}:8000"
    for url in (ha.router_url, *ha.router_urls):
        assert answers(url), url
    # each front door asks its own router first; the other is its backup
    door = ssh(H2, "cat /etc/disagg/frontdoor/haproxy.cfg").stdout
    servers = [line.split()[1] for line in door.splitlines() if line.strip().startswith("server ")]
    assert servers == [testhosts.address(H2), testhosts.address(H3), "last-resort"]


@pytest.mark.parametrize("unit", [S.ROUTER_UNIT, S.FRONTDOOR_UNIT])
def test_kill_9_on_the_address_holder_loses_only_the_streams_under_way_through_it(ha, unit, figures, timings):
    """The router: its front door sends to the other router host's router
    until its own answers /health again (restarted, and given its members
    by the sync). The front door: systemd holds its sockets
    (disagg-frontdoor.socket), so a client that connects while it restarts
    waits instead of being refused, and keepalived's check waits too (the
    address stays). No request sent after the kill fails; a stream whose
    answer had started through the killed process cannot be sent again by
    anyone."""
    h3 = testhosts.address(H3)
    ready = {
        S.ROUTER_UNIT: lambda: health(ha.router_internal_url(h3)) == 200,
        S.FRONTDOOR_UNIT: lambda: answers(ha.frontdoor_url(h3)),
    }[unit]
    with Load(ha.router_url, MODEL, concurrency=CLIENTS, pause=PAUSE) as traffic:
        time.sleep(3)
        pid = ssh(H3, f"systemctl show -p MainPID --value {unit}").stdout.strip()
        killed = traffic.at()
        ssh(H3, f"kill -9 {pid}")
        until(lambda: ssh(H3, f"systemctl show -p MainPID --value {unit}").stdout.strip() not in ("0", pid), 30, unit)
        back = until(ready, 60, f"{unit} serving again")
        time.sleep(3)
    result = traffic.result
    figures.append(f"HA: kill -9 of {unit} on the address holder under load: {result.summary()}")
    timings[f"HA: kill -9 of {unit} -> serving again"] = back
    # at most those in flight through it, ended by the kill (the ssh that kills takes up to a second)
    assert result.failed <= CLIENTS, result.summary()
    assert all(killed <= ended <= killed + 2 for _, ended, _ in result.failures), result.failures
    assert result.failed_between(killed + 1, result.seconds) == 0, result.failures
    assert not any("Refused" in reason for *_, reason in result.failures), result.failures
    assert result.ok > 20 and holds(H3)


def test_the_address_holder_loses_its_power_under_load_and_comes_back(ha, test_hosts, figures, timings):
    """Host 3 (the head, the address holder) dies at once: the requests in
    flight through it fail, the address answers from host 2 within 5 s, and
    nothing sent after that fails; host 3 boots again and rejoins without
    taking the address back (no request lost)."""
    off = False
    try:
        # a stream in flight through the dead host waits for an answer that never comes: its client gives up
        with Load(ha.router_url, MODEL, concurrency=CLIENTS, pause=PAUSE, timeout=15) as traffic:
            time.sleep(3)
            cut, clock = traffic.at(), time.monotonic()
            test_hosts.power_off(H3)
            off = True
            until(lambda: holds(H2), 30, "host 2 holding the floating address")
            moved = time.monotonic() - clock
            until(lambda: answers(ha.router_url), 30, "an answer through the floating address")
            serving = time.monotonic() - clock
            time.sleep(5)
        died = traffic.result
        figures.append(
            f"HA: the address holder (the head) powered off under load: {died.summary()}; the address on host 2 "
            f"{moved:.1f} s and answering {serving:.1f} s after the cut"
        )
        timings["HA: head powered off -> the floating address answers from host 2"] = serving
        assert moved < 5 and serving < 10, (moved, serving)
        # those in flight through host 3 at the cut, at most
        assert died.failed <= CLIENTS, died.summary()
        assert died.failed_between(cut + 0.5, died.seconds) == 0, died.failures
        with Load(ha.router_url, MODEL, concurrency=CLIENTS, pause=PAUSE) as traffic:
            time.sleep(2)
            booted = time.time()
            test_hosts.power_on(H3)
            off = False
            rejoined = until(
                lambda: answers(ha.frontdoor_url(testhosts.address(H3))), 180, "host 3's front door answering again"
            )
            time.sleep(5)
        back = traffic.result
        figures.append(
            f"HA: the head powered on again under load: {back.summary()}; its front door answered after {rejoined:.0f} s"
        )
        # what decided where requests went meanwhile: the address, each front door's servers, each sync's members
        why = {S.KEEPALIVED_UNIT: "STATE", S.FRONTDOOR_UNIT: "is (UP|DOWN)", S.SYNC_UNIT: "member|unreadable"}
        seen = "\n".join(journal(i, booted, why) for i in (H2, H3))
        assert holds(H2) and not holds(H3), seen
        # its NATS server answers from its old copy for a moment: no sync drops a member for it
        assert back.failed == 0, f"{back.summary()}\n{seen}"
    finally:
        if off:
            test_hosts.power_on(H3)


def status(*args: str) -> tuple[int, dict]:
    """`disagg status` of the HA layout, from the controller (every NATS server's URL)."""
    return as_operator.status(INVENTORY, *args)


def test_a_nats_server_stopped_for_60_s_under_load_fails_no_request_and_a_scale_out_meanwhile_is_routed(
    ha, deployment, tmp_path, figures, timings
):
    """Host 1's NATS server stops for 60 s: the agents and syncs that used it
    move to the other two, which keep the registry (three replicas, a
    quorum of two), and every entry stays refreshed (they expire after the
    TTL otherwise). Meanwhile a generate worker is added on host 2 with
    `--limit` of the head and the router hosts only (host 1, whose server
    is down, left out): it registers and both routers route it."""
    scaled = tmp_path / "scaled.py"
    here = 'Path(__file__).with_name("local.py")'
    scaled.write_text(
        # its data from inventories/local.py wherever the copy is
        open(INVENTORY).read().replace(here, repr(str(Path(INVENTORY).resolve().with_name("local.py"))))
        # a second generate worker beside the first (which keeps its port)
        + "\n_h2data = {'gpus': 2, **_router}\ngenerate = [(_h2, _h2data)]\nrouters = [(_h2, _h2data), (_h3, _router)]\n"
        + "nats = [(_h1, {'gpus': 2, **_ssh}), (_h2, _h2data), (_h3, _router)]\n"
    )
    label = "context_tp1dp2_generate_tp1dp2"
    stopped = False
    try:
        with Load(ha.router_url, MODEL, concurrency=CLIENTS, pause=PAUSE) as traffic:
            time.sleep(3)
            ssh(H1, f"systemctl stop {S.NATS_UNIT}")
            stopped, since = True, time.monotonic()
            time.sleep(kv.TTL + 5)
            code, current = status()
            assert code == 0, current["problems"]
            # shown, not a problem: the other two keep the registry
            down = [u for u, state in current["nats_servers"].items() if state != "up"]
            assert down == [f"tls://{testhosts.address(H1)}:{ha.settings.nats_port}"], current["nats_servers"]
            data = deployment.data
            deployment.changed()
            start = time.monotonic()
            run_deploy(
                str(scaled),
                "deploys/disagg.py",
                f"label={label}",
                *data,
                limit=f"{testhosts.address(H2)},{testhosts.address(H3)}",
            )
            code, current = as_operator.status(str(scaled), "--label", label, "--wait", "--timeout", "180")
            added = time.monotonic() - start
            assert code == 0, current["problems"]
            assert ssh(H1, f"systemctl is-active {S.NATS_UNIT}", check=False).stdout.strip() == "inactive"
            time.sleep(max(0.0, 60 - (time.monotonic() - since)))
            ssh(H1, f"systemctl start {S.NATS_UNIT}")
            stopped = False
            time.sleep(3)
        result = traffic.result
        figures.append(
            f"HA: host 1's NATS server stopped for 60 s under load: {result.summary()}; a generate worker added "
            f"meanwhile on host 2 (--limit of hosts 2 and 3) was registered and routed by both routers {added:.0f} s after "
            "the deploy began"
        )
        timings["HA: deploy --limit of a worker with a NATS server down -> routed by both routers"] = added
        assert result.failed == 0, result.summary()
        assert result.ok > 100
    finally:
        if stopped:
            ssh(H1, f"systemctl start {S.NATS_UNIT}")
