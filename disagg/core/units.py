"""Files our services need on a host, rendered from templates/.

Every function returns {remote path: content}; the roles upload exactly that
and `disagg render --units` prints exactly that.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import jinja2

from disagg.agent import envfile, layout, net
from disagg.agent.kv import PASSWORD_ENV
from disagg.core import nftables, pki
from disagg.core import settings as S
from disagg.core.plan import Plan
from disagg.core.topology import Worker

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
AGENT_PACKAGE = Path(__file__).resolve().parents[1] / "agent"
FRONTDOOR_CONF = f"{S.FRONTDOOR_DIR}/haproxy.cfg"
# "Bearer KEY" lines, the ACL HAProxy checks a client's Authorization header against
FRONTDOOR_KEYS = f"{S.FRONTDOOR_DIR}/client-keys"
# the clients' certificate with its key, one PEM, as HAProxy's `crt` takes it
FRONTDOOR_TLS = f"{S.FRONTDOOR_DIR}/client-tls.pem"
VLLM_PLUGIN = AGENT_PACKAGE / "vllm_plugin.py"
NATS_CONF = f"{S.CONFIG_DIR}/nats-server.conf"
NATS_AUTH_CONF = f"{S.CONFIG_DIR}/nats-auth.conf"
NATS_SECRET_ENV = S.NATS_SECRET_ENV
NATS_PASSWORD_ENV = PASSWORD_ENV
NATS_STORE = f"{S.STATE_DIR}/nats"

_PLAIN_ARG = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


@cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **context) -> str:
    return _env().get_template(template).render(marker=S.MANAGED_MARKER, **context)


def systemd_arg(arg: str) -> str:
    """Quote one ExecStart argument for systemd (see systemd.syntax(7))."""
    if _PLAIN_ARG.fullmatch(arg):
        return arg
    # systemd expands % specifiers and $VARIABLES even inside quotes
    escaped = arg.replace("\\", "\\\\").replace("%", "%%").replace("$", "$$")
    if "'" not in escaped:
        return f"'{escaped}'"
    return '"' + escaped.replace('"', '\\"') + '"'


def exec_start(args: list[str]) -> str:
    """One argument per line (flags with their value), so that a diff shows
    exactly the engine argument that changed."""
    lines: list[list[str]] = [[]]
    for arg in args:
        if arg.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(systemd_arg(arg))
    return " \\\n    ".join(" ".join(line) for line in lines)


def unit_path(unit: str, kind: str = "service") -> str:
    return f"{S.SYSTEMD_DIR}/{unit}.{kind}"


def _service(
    description: str,
    user: str,
    args: list[str],
    stop_timeout: int,
    env_files: list[str],
    binds_to: str | None = None,
    exec_stop: str | None = None,
    groups: tuple[str, ...] = (),
    unlimited_log: bool = False,
    write_paths: tuple[str, ...] = (),
    gpu: bool = False,
    reads_journal: bool = False,
    notify: bool = False,
    reload: str | None = None,
    restart_sec: int = 5,
    net_admin: bool = False,
    runtime_dir: str | None = None,
    socket: str | None = None,
) -> str:
    return render(
        "service.j2",
        socket=socket,
        description=description,
        user=user,
        notify=notify,
        reload=reload,
        restart_sec=restart_sec,
        exec_start=exec_start(args),
        stop_timeout=stop_timeout,
        env_files=env_files,
        binds_to=binds_to,
        exec_stop=exec_stop,
        groups=groups,
        unlimited_log=unlimited_log,
        write_paths=write_paths,
        gpu=gpu,
        reads_journal=reads_journal,
        net_admin=net_admin,
        runtime_dir=runtime_dir,
    )


def worker_files(plan: Plan, w: Worker) -> dict[str, str]:
    env = {k: envfile.quote(v) for k, v in plan.worker_env(w).items()}
    unit = _service(
        # no label here: a relabel must not restart workers whose layout is unchanged
        f"disagg {w.role} worker {w.index}, GPUs {','.join(map(str, w.gpus))}",
        S.SERVICE_USER,
        plan.worker_command(w),
        plan.settings.stop_timeout,
        # '-': the HF token is optional (public or local models)
        [S.env_path(w.unit), f"-{S.HF_TOKEN_ENV}", *api_key_env(plan)],
        # '+': as root (and unsandboxed), to read the root-only NATS password file
        exec_stop="+" + exec_start(plan.leave_command(w)),
        # its caches; the model is root's, read-only
        write_paths=(S.SERVICE_HOME, S.HF_HOME, S.PYCACHE_DIR),
        gpu=True,
    )
    return {unit_path(w.unit): unit, S.env_path(w.unit): render("env.j2", env=env)}


def api_key_env(plan: Plan) -> list[str]:
    """The API key's env file, for the workers and the router of a
    disaggregated layout. vllm-router 0.1.17 sends $OPENAI_API_KEY to PD
    workers but forwards a client's own Authorization header to aggregated
    ones, so the baseline's workers take no key (the firewall keeps them
    to the router)."""
    return [S.API_KEY_ENV] if plan.topology.disaggregated else []


def agent_files(plan: Plan, w: Worker) -> dict[str, str]:
    unit = _service(
        f"disagg registry heartbeat of {w.unit}",
        S.HEARTBEAT_USER,
        plan.agent_command(w),
        10,
        # its own NATS password, root-only: never on a command line or in a unit
        [plan.heartbeat_env(w)],
        binds_to=w.unit,
    )
    return {unit_path(w.agent_unit): unit}


def sync_files(plan: Plan, on: str | None = None) -> dict[str, str]:
    unit = _service(
        "disagg router membership from the registry",
        S.SYNC_USER,
        plan.sync_command(on),
        10,
        [SYNC_ENV],
        # the router's own view of its members is in its journal
        groups=("systemd-journal",),
        reads_journal=True,
        # its state file (replaced by rename), Prometheus's targets
        write_paths=(S.SYNC_DIR, *([S.SCRAPE_TARGETS_DIR] if plan.feeds_prometheus(on) else [])),
    )
    return {unit_path(S.SYNC_UNIT): unit}


def layout_file(plan: Plan) -> dict[str, str]:
    """What the sync admits; it reads a change itself (no restart)."""
    return {S.LAYOUT_FILE: layout.text(plan.label, plan.layout_workers())}


@cache
def agent_code() -> dict[str, str]:
    """The host agent (disagg/agent) as the hosts run it: plain files, so
    that --diff shows a change to it like any other file. Read once per
    process (every host's deploy and every agent unit's check use it);
    callers copy, never change, it."""
    files = {f"{S.AGENT_SRC}/disagg/__init__.py": '"""disagg\'s host agent only (disagg.agent)."""\n'}
    # the vLLM plugin goes to the engines' venv instead (vllm_plugin_files)
    files.update(
        {
            f"{S.AGENT_SRC}/disagg/agent/{p.name}": p.read_text()
            for p in sorted(AGENT_PACKAGE.glob("*.py"))
            if p != VLLM_PLUGIN
        }
    )
    return files


def vllm_plugin_files() -> dict[str, str]:
    """disagg/agent/vllm_plugin.py as vLLM finds it: a module and the dist-info
    whose entry point vLLM's plugin loader reads (importlib.metadata scans
    PYTHONPATH), so no build step and no pip install on the host."""
    name = "disagg_vllm_plugin"
    return {
        f"{S.VLLM_PLUGIN_DIR}/{name}.py": VLLM_PLUGIN.read_text(),
        f"{S.VLLM_PLUGIN_DIR}/{name}-1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1\n",
        f"{S.VLLM_PLUGIN_DIR}/{name}-1.dist-info/entry_points.txt": f"[vllm.general_plugins]\ndisagg = {name}:register\n",
    }


def router_files(plan: Plan, on: str | None = None) -> dict[str, str]:
    unit = _service(
        # no label here (nor in the front door's or Prometheus's): a relabel, such as a worker added, restarts none
        "disagg vllm-router",
        S.ROUTER_USER,
        plan.router_command(on),
        30,
        api_key_env(plan),
        unlimited_log=plan.topology.disaggregated,
        # stateless: back at once, while the front door retries its clients' requests
        restart_sec=1,
    )
    return {unit_path(S.ROUTER_UNIT): unit}


def frontdoor_files(
    plan: Plan, on: str | None = None, resolved: dict[str, tuple[str, ...]] | None = None
) -> dict[str, str]:
    """HAProxy's config, unit and listening sockets; the client keys and
    TLS files are secrets, written by roles/frontdoor.py. Its routers: the
    host's own, then the other router hosts' as backups. systemd binds the
    sockets and takes no name: resolved gives the address (the first the
    host resolves, as HAProxy took it) of each that is a name."""
    s = plan.settings
    on = on or plan.cluster.head
    own = plan.cluster.host(on)
    routers = [own, *(r for r in plan.routers if r.name != on)]

    def listen(address: str, port: int) -> str:
        return net.hostport((resolved or {}).get(address, (address,))[0], port)

    # systemd's sockets in this order: HAProxy's file descriptors 3, 4, ...
    binds = {"clients": listen(plan.router_address(on), s.router_port)}
    if plan.vip_address:
        binds["vip"] = listen(plan.vip_address, s.router_port)
    binds["metrics"] = listen(own.address, s.frontdoor_metrics_port)
    conf = render(
        "haproxy.cfg.j2",
        binds=binds,
        fds={name: f"fd@{3 + i}" for i, name in enumerate(binds)},
        tls=FRONTDOOR_TLS if plan.client_tls else None,
        keys=FRONTDOOR_KEYS if s.client_api_keys else None,
        bufsize=s.frontdoor_retry_buffer_kb * 1024,
        max_bytes=s.client_max_request_mb << 20,
        rate_limit=s.client_rate_limit,
        max_connections=s.client_max_connections,
        routers={r.name: net.hostport(r.address, s.router_internal_port) for r in routers},
        retries=s.frontdoor_retries,
    )
    unit = _service(
        "disagg front door (HAProxy)",
        S.FRONTDOOR_USER,
        ["/usr/sbin/haproxy", "-Ws", "-f", FRONTDOOR_CONF],
        30,
        [],
        # -Ws: it tells systemd when it is ready, and reloads on USR2 without dropping a connection
        notify=True,
        reload="/bin/kill -USR2 $MAINPID",
        # clients' requests are retried for about `frontdoor_retries` seconds while it is away
        restart_sec=1,
        socket=f"{S.FRONTDOOR_UNIT}.socket",
    )
    socket = render(
        "socket.j2",
        description="disagg front door's listening sockets",
        listen=list(binds.values()),
        free_bind=plan.vip_address is not None,
        service=S.FRONTDOOR_UNIT,
    )
    return {FRONTDOOR_CONF: conf, unit_path(S.FRONTDOOR_UNIT): unit, unit_path(S.FRONTDOOR_UNIT, "socket"): socket}


def frontdoor_names(plan: Plan, on: str) -> tuple[str, ...]:
    """The front door's listening addresses on host `on` that are names."""
    return tuple(sorted({a for a in (plan.router_address(on), plan.cluster.host(on).address) if not net.is_ip(a)}))


def nats_files(plan: Plan, on: str | None = None) -> dict[str, str]:
    """A NATS host's server; with three or more, clustered: routes over TLS
    to the others, each end's certificate checked against our CA."""
    s = plan.settings
    on = on or plan.cluster.head
    own = plan.cluster.host(on)
    routes = [
        net.url("nats-route", plan.cluster.host(n).address, s.nats_cluster_port) for n in plan.cluster.nats if n != on
    ]
    conf = render(
        "nats-server.conf.j2",
        server_name=f"disagg-{on}",
        listen=net.hostport(own.address, s.nats_port),
        cluster=net.hostport(own.address, s.nats_cluster_port) if plan.nats_clustered else None,
        routes=routes,
        ca_file=S.CA_CERT,
        monitor_port=s.nats_monitor_port,
        # a standalone server's streams are no cluster's: a server that joins one starts a store of its own
        # (the registry is soft state, put again by every heartbeat within seconds)
        store_dir=f"{NATS_STORE}/cluster" if plan.nats_clustered else NATS_STORE,
        auth=Path(NATS_AUTH_CONF).name,
        cert_file=S.NATS_CERT,
        key_file=S.NATS_KEY,
    )
    unit = _service(
        "disagg NATS server with JetStream",
        S.NATS_USER,
        [f"{S.NATS_VENV}/bin/nats-server", "-c", NATS_CONF],
        30,
        [],
        write_paths=(NATS_STORE,),
        # users, passwords and TLS files are re-read in place: its clients stay connected
        reload="/bin/kill -HUP $MAINPID",
    )
    return {NATS_CONF: conf, unit_path(S.NATS_UNIT): unit}


def nats_auth_text(user: str, password: str, restricted: list[tuple[str, str, dict]] = ()) -> str:
    """The server's authorization block: `user` may do everything (status,
    the readiness gate); each of `restricted` (user, password,
    permissions: the sync, each heartbeat) only what it needs. JSON's quoted
    strings, so that a password such as `123456` or `x y` is read as text (a
    NATS config value unquoted, or read from an environment variable, may
    become a number or a list)."""
    users = [{"user": user, "password": password}]
    users += [
        {"user": name, "password": secret, "permissions": permissions}
        for name, secret, permissions in sorted(restricted, key=lambda u: u[0])
    ]
    lines = ",\n    ".join(json.dumps(u, ensure_ascii=False) for u in users)
    return f"authorization {{\n  users: [\n    {lines}\n  ]\n}}\n"


# the sync's own NATS password (root-only; systemd reads it)
SYNC_ENV = S.env_path(S.SYNC_UNIT)


PROMETHEUS_CONF = f"{S.PROMETHEUS_CONFIG_DIR}/prometheus.yml"
PROMETHEUS_RULES = f"{S.PROMETHEUS_CONFIG_DIR}/rules.yml"


def prometheus_files(plan: Plan) -> dict[str, str]:
    conf = render(
        "prometheus.yml.j2",
        interval=S.SCRAPE_INTERVAL,
        rules=PROMETHEUS_RULES,
        prometheus=plan.prometheus_hostport,
        routers=[plan.router_metrics_hostport(r.name) for r in plan.routers],
        frontdoors=[plan.frontdoor_metrics_hostport(r.name) for r in plan.routers],
        registry=plan.registry_metrics_address,
        layout=plan.label,
        targets=S.SCRAPE_TARGETS_DIR,
    )
    unit = _service(
        "disagg Prometheus",
        S.PROMETHEUS_USER,
        plan.prometheus_command(),
        30,
        [],
        write_paths=(S.PROMETHEUS_DATA,),
    )
    return {PROMETHEUS_CONF: conf, PROMETHEUS_RULES: prometheus_rules(), unit_path(S.PROMETHEUS_UNIT): unit}


def prometheus_rules() -> str:
    """Recording and alerting rules; a certificate alerts when the deploy would renew it."""
    return render("prometheus-rules.yml.j2", renew_days=pki.RENEW_BEFORE.days)


def firewall_files(
    plan: Plan, host: str, admins: tuple[str, ...] = (), resolved: dict[str, tuple[str, ...]] | None = None
) -> dict[str, str]:
    """The host's nftables rules and the unit that loads them; admins: the
    controller as the host sees it; resolved: the hosts' names as it
    resolves them."""
    rules = nftables.ruleset(plan, host, admins, resolved)
    return {
        S.FIREWALL_RULES: render(
            "firewall.nft.j2", table=nftables.TABLE, rules=rules, local_rules=nftables.local_ruleset(plan, host)
        ),
        unit_path(S.FIREWALL_UNIT): render("firewall.service.j2", table=nftables.TABLE, rules=S.FIREWALL_RULES),
    }


def keepalived_files(plan: Plan, on: str) -> dict[str, str]:
    """keepalived's config on a router host (data vip): VRRP by unicast to
    the other router hosts (clouds drop multicast), the preferred router
    the highest priority; the address stays where it is when a host comes
    back (nopreempt: a move would cut the streams under way)."""
    s = plan.settings
    own = plan.cluster.host(on)
    rank = plan.cluster.routers.index(on)
    conf = render(
        "keepalived.conf.j2",
        name=on,
        interface=own.vip_interface,
        router_id=s.vrrp_router_id,
        priority=200 - 10 * rank,
        source=own.address,
        peers=[r.address for r in plan.routers if r.name != on],
        vip=s.vip,
        check=f"/usr/bin/curl -fs -m 1 -o /dev/null http://{plan.frontdoor_metrics_hostport(on)}/metrics",
    )
    unit = _service(
        "disagg floating client address (keepalived, VRRP)",
        "root",
        [
            "/usr/sbin/keepalived",
            "--dont-fork",
            "--log-console",
            # the console is the journal: not every line twice
            "--no-syslog",
            "--vrrp",
            "--use-file",
            S.KEEPALIVED_CONF,
            "--pid",
            f"/run/{S.KEEPALIVED_UNIT}/keepalived.pid",
            "--vrrp_pid",
            f"/run/{S.KEEPALIVED_UNIT}/vrrp.pid",
        ],
        10,
        [],
        reload="/bin/kill -HUP $MAINPID",
        restart_sec=1,
        net_admin=True,
        runtime_dir=S.KEEPALIVED_UNIT,
    )
    return {S.KEEPALIVED_CONF: conf, unit_path(S.KEEPALIVED_UNIT): unit}


def host_units(plan: Plan, host: str, admins: tuple[str, ...] = ()) -> dict[str, str]:
    """Every unit, env and config file of ours that belongs on host under plan."""
    files: dict[str, str] = {}
    if plan.settings.firewall and plan.serves(host):
        files.update(firewall_files(plan, host, admins))
    for w in plan.workers_on(host):
        files.update(worker_files(plan, w))
        files.update(agent_files(plan, w))
    if host in plan.cluster.nats:
        files.update(nats_files(plan, host))
    if host == plan.cluster.head and plan.settings.prometheus:
        files.update(prometheus_files(plan))
    if host in plan.cluster.routers:
        files.update(router_files(plan, host))
        files.update(frontdoor_files(plan, host))
        files.update(sync_files(plan, host))
        files.update(layout_file(plan))
        if plan.settings.vip:
            files.update(keepalived_files(plan, host))
    return files
