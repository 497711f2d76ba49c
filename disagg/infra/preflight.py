"""Preflight: what can be checked on the hosts before anything starts, so
that a wrong address, a port in use, a model that does not split across a
role's GPUs or a full disk is named before the first request finds it.

`disagg preflight -i INVENTORY` and the first step of deploys/disagg.py and
baseline.py run the same checks (`run`): one round trip per host for its
facts (PreflightFacts), then the fabric: from each generate host a TCP
connect to each context worker's NIXL side-channel address and port (with a
short-lived listener there when the worker does not run yet). Every problem
is one line naming host, field and fix; all of them are listed."""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from disagg.agent import net
from disagg.core import packages
from disagg.core import settings as S
from disagg.core.plan import Plan
from disagg.core.topology import Worker
from disagg.infra import wheelhouse
from disagg.infra.wheelhouse import Platform

# a listener on one of our ports that belongs to a unit of ours is fine
OUR_UNIT = re.compile(r"^disagg-[A-Za-z0-9-]+\.(service|socket)$")
GiB = 1024**3


@dataclass(frozen=True)
class Problem:
    host: str
    field: str
    message: str
    fix: str

    def line(self) -> str:
        return f"{self.host}: {self.field}: {self.message}; {self.fix}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    # checks that could not apply, and why (a CPU host has no GPUs to count)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "problems": [asdict(p) | {"line": p.line()} for p in self.problems],
            "skipped": self.skipped,
            "seconds": round(self.seconds, 1),
        }


# -- what each host answers (one round trip: PreflightFacts) ---------------------


def parse_listeners(lines: list[str]) -> list[dict]:
    """`ADDRESS:PORT PID UNIT users:((...))` lines (ss -ltnpH with each
    listener's systemd unit) as {port, address, pid, unit, process}."""
    out = []
    for line in lines:
        parts = line.split(None, 3)
        if len(parts) < 3 or ":" not in parts[0]:
            continue
        address, _, port = parts[0].rpartition(":")
        if not port.isdigit():
            continue
        process = re.search(r'\(\("([^"]+)"', parts[3] if len(parts) > 3 else "")
        out.append(
            {
                "address": address.strip("[]"),
                "port": int(port),
                "pid": int(parts[1]) if parts[1].isdigit() else None,
                "unit": parts[2] if parts[2] != "-" else None,
                "process": process.group(1) if process else None,
            }
        )
    return out


# -- the checks: plain functions of the plan and the facts -------------------------


def our_ports(plan: Plan, host: str) -> dict[int, str]:
    """Every port our layout binds on host: port -> what binds it."""
    ports: dict[int, str] = {}
    for w in plan.workers_on(host):
        ports[w.http_port] = f"{w.name} http_port"
        if plan.topology.disaggregated:
            for p in w.nixl_ports:
                ports[p] = f"{w.name} NIXL side channel"
    if host == plan.cluster.head:
        for name, port in plan.settings.ports.head_services().items():
            ports[port] = name
    if host in plan.cluster.routers:
        for name, port in plan.settings.ports.router_services().items():
            ports[port] = name
    if host in plan.cluster.nats:
        for name, port in plan.settings.ports.nats_services().items():
            ports[port] = name
    return ports


def check_ports(plan: Plan, host: str, listeners: list[dict]) -> list[Problem]:
    problems = []
    wanted = our_ports(plan, host)
    for listener in listeners:
        owner = wanted.get(listener["port"])
        if owner is None or (listener["unit"] and OUR_UNIT.match(listener["unit"])):
            continue
        who = listener["process"] or "a process"
        if listener["pid"]:
            who += f" (pid {listener['pid']}{', unit ' + listener['unit'] if listener['unit'] else ''})"
        problems.append(
            Problem(
                host,
                f"port {listener['port']}",
                f"{who} listens on {listener['address']}:{listener['port']}, which {owner} needs",
                "stop it, or move our ports (http_port_base, nixl_port_base or the service port)",
            )
        )
    return problems


def check_gpus(host: str, wanted: int, gpus: list[dict], pci_gpus: int) -> tuple[list[Problem], str | None]:
    """(problems, skipped reason). The count the inventory gives against
    what the host has (nvidia-smi, else the PCI bus before a driver)."""
    if not gpus and not pci_gpus:
        return [], f"{host}: no NVIDIA GPU on the PCI bus: 'gpus' ({wanted}) counts worker slots, not checked"
    have = len(gpus) or pci_gpus
    problems = []
    if have < wanted:
        problems.append(
            Problem(
                host,
                "gpus",
                f"the inventory says {wanted} but the host has {have} NVIDIA GPUs",
                f"set gpus: {have} for this host",
            )
        )
    models = sorted({g["name"] for g in gpus})
    if len(models) > 1:
        problems.append(
            Problem(
                host,
                "gpus",
                f"mixed GPU models ({', '.join(models)})",
                "tensor parallelism needs one model per worker: split the host or pin workers",
            )
        )
    return problems, None


def check_driver_branches(drivers: dict[str, str]) -> list[Problem]:
    """One NVIDIA driver branch on every GPU host (KV cache moves between them)."""
    branches = {host: version.split(".")[0] for host, version in drivers.items() if version}
    if len(set(branches.values())) <= 1:
        return []
    most = max(set(branches.values()), key=list(branches.values()).count)
    return [
        Problem(
            host,
            "nvidia_driver_branch",
            f"driver {drivers[host]} (branch {b}), other GPU hosts run branch {most}",
            f"install branch {most} here (nvidia_driver_branch)",
        )
        for host, b in sorted(branches.items())
        if b != most
    ]


def check_model(plan: Plan, config: dict | None, where: str) -> tuple[list[Problem], str | None]:
    """Attention heads divide across each role's TP; the TP mix is one the
    pinned vLLM's NixlConnector can transfer between."""
    if config is None:
        return [], f"model config not readable ({where}): heads against TP not checked"
    text = config.get("text_config", config)
    heads = text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads", heads)
    problems = []
    for stage in plan.topology.stages:
        tp = stage.tp
        if heads and heads % tp:
            problems.append(
                Problem(
                    where,
                    f"{stage.role} tp",
                    f"{stage.role} tp{tp} does not divide the model's {heads} attention heads",
                    f"use a tp that divides {heads}",
                )
            )
        # vLLM splits KV heads across ranks, or replicates them when tp is a multiple
        elif kv_heads and kv_heads % tp and tp % kv_heads:
            problems.append(
                Problem(
                    where,
                    f"{stage.role} tp",
                    f"{stage.role} tp{tp} neither divides nor is a multiple of the model's {kv_heads} KV heads",
                    f"use a tp that divides {kv_heads} or a multiple of it",
                )
            )
    if plan.topology.disaggregated:
        ctx, gen = plan.topology.stage("context").tp, plan.topology.stage("generate").tp
        # vLLM 0.32.0 NixlConnector, TransferTopology.tp_ratio
        # (vllm/distributed/kv_transfer/kv_connector/utils.py): the larger TP
        # must be a multiple of the smaller, or the transfer asserts
        if max(ctx, gen) % min(ctx, gen):
            problems.append(
                Problem(
                    where,
                    "label",
                    f"context tp{ctx} and generate tp{gen}: vLLM's NixlConnector "
                    "transfers only between TP sizes where one is a multiple of the other",
                    "pick tp sizes such as 2 and 8, or 4 and 4",
                )
            )
    return problems, None


def check_disk(host: str, available: dict[str, int], needed: dict[str, int]) -> list[Problem]:
    return [
        Problem(
            host,
            f"disk {path}",
            f"{available[path] / GiB:.1f} GiB free, {need / GiB:.1f} GiB needed",
            f"free space under {path}",
        )
        for path, need in needed.items()
        if path in available and available[path] < need
    ]


def check_accounts(host: str, accounts: dict[str, dict]) -> list[Problem]:
    """An account of one of our services' names that someone else made
    (facts.parse_passwd): a deploy would run a service as it, a purge
    would delete it."""
    return [
        Problem(
            host,
            f"user {user}",
            f"exists and is not disagg's (GECOS {a['comment']!r}, shell {a['shell']})",
            "disagg never takes over an account: rename or remove it",
        )
        for user, a in sorted(accounts.items())
        if not a["ours"]
    ]


def check_versions(versions: dict[str, dict[str, str | None]]) -> list[Problem]:
    """The same engine and NIXL on every worker host that has them installed."""
    problems = []
    for package in ("vllm", "nixl"):
        seen = {h: v[package] for h, v in versions.items() if v.get(package)}
        if len(set(seen.values())) > 1:
            most = max(set(seen.values()), key=list(seen.values()).count)
            problems += [
                Problem(
                    h,
                    package,
                    f"{package} {v} here, {most} on the other worker hosts",
                    f"install {package}=={most} (vllm_package / nixl_packages)",
                )
                for h, v in sorted(seen.items())
                if v != most
            ]
    return problems


def side_channels(plan: Plan) -> list[tuple[str, Worker]]:
    """(generate host, context worker) pairs whose NIXL side channel must be
    reachable from the generate host (it connects to the context worker)."""
    if not plan.topology.disaggregated:
        return []
    generate_hosts = sorted({w.host for w in plan.workers if w.role == "generate"})
    return [(g, w) for g in generate_hosts for w in plan.workers if w.role == "context"]


# -- running it: the facts of every host, then the fabric -----------------------------


def needed_disk(plan: Plan) -> dict[str, int]:
    """Bytes the deploy will put under each path of a worker host."""
    s = plan.settings
    need = {"/opt/disagg": int(s.venv_disk_gb * GiB)}
    if s.model_dir and Path(s.model_dir).is_dir():
        need[s.model_path] = sum(p.stat().st_size for p in Path(s.model_dir).rglob("*") if p.is_file())
    elif s.model_disk_gb and s.model_source in ("hub", "engine"):
        need[S.MODELS_DIR if s.model_source == "hub" else S.HF_HOME] = int(s.model_disk_gb * GiB)
    return need


def model_config(plan: Plan) -> tuple[dict | None, tuple[str, ...], str]:
    """The model's config.json: read here from model_dir, else to be read on
    the hosts from their HF cache (globs). Returns (config, globs, where)."""
    s = plan.settings
    if s.model_dir:
        path = Path(s.model_dir) / "config.json"
        try:
            return json.loads(path.read_text()), (), str(path)
        except (OSError, ValueError):
            return None, (), str(path)
    if s.model_source in ("host", "hub"):
        return None, (f"{s.model_path}/config.json",), f"{s.model_path}/config.json"
    cache = f"/var/lib/disagg/hf/hub/models--{s.model.replace('/', '--')}/snapshots/*/config.json"
    return None, (cache,), f"HF cache of {s.model} on the worker hosts"


_LISTEN = (
    "import socket, time; s = socket.socket(socket.AF_INET6 if ':' in {address!r} else socket.AF_INET); "
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.bind(({address!r}, {port})); s.listen(8); s.settimeout(1); end = time.time() + {seconds}\n"
    "while time.time() < end:\n    try: s.accept()[0].close()\n    except OSError: pass"
)


def run(state, plan: Plan) -> Report:
    """All checks against the hosts of plan, with pyinfra's connections in
    state (the deploy's own, or one made by `disagg preflight`)."""
    from disagg.infra import remote
    from disagg.infra.facts import PreflightFacts

    start = time.monotonic()
    report = Report()
    config, globs, where = model_config(plan)
    need = needed_disk(plan)
    names = plan.serving_hosts

    def kwargs(name: str) -> dict:
        worker_host = bool(plan.workers_on(name))
        return {
            "paths": tuple(need) if worker_host else (),
            "config_globs": globs if worker_host else (),
            "venv": "/opt/disagg/vllm",
        }

    facts = remote.facts(state, names, PreflightFacts, kwargs)
    for name in names:
        f = facts[name]
        report.problems += check_ports(plan, name, parse_listeners(f["listeners"]))
        report.problems += check_accounts(name, f["accounts"])
        if plan.workers_on(name):
            gpus = plan.cluster.host(name).gpus
            problems, skipped = check_gpus(name, gpus, f["gpus"], f["pci_gpus"])
            report.problems += problems
            report.skipped += [skipped] if skipped else []
            report.problems += check_disk(name, f["free"], need)
            config = config or f["config"]
    report.problems += check_driver_branches({n: f["gpus"][0]["driver_version"] for n, f in facts.items() if f["gpus"]})
    problems, skipped = check_model(plan, config, where)
    report.problems += problems
    report.skipped += [skipped] if skipped else []
    report.problems += check_versions({n: facts[n]["versions"] for n in names if plan.workers_on(n)})
    report.problems += check_fabric(state, plan, {n: parse_listeners(facts[n]["listeners"]) for n in names})
    report.problems += check_wheels(
        plan, {n: state.inventory.get_host(n).data for n in names}, {n: facts[n]["platform"] for n in names}
    )
    report.seconds = time.monotonic() - start
    return report


def check_wheels(plan: Plan, data: dict, platforms: dict[str, Platform | None]) -> list[Problem]:
    """With data `wheelhouse`: every package set a host installs, fetched
    for its platform on the controller (what the deploy pushes next, so
    nothing is fetched twice); a pin without a wheel for a host's platform
    is named with the host and the platform."""
    problems, seen = [], {}
    for name, host_data in data.items():
        directory = host_data.get("wheelhouse")
        if not directory:
            continue
        platform = platforms.get(name)
        if platform is None:
            problems.append(
                Problem(
                    name,
                    "platform",
                    "no /usr/bin/python3 (or no glibc) to fetch wheels for",
                    "install python3 on the host, or deploy it without data 'wheelhouse'",
                )
            )
            continue
        for s in packages.host_sets(plan, name, host_data):
            key = (directory, s.requirements, s.no_deps, platform)
            if key not in seen:
                try:
                    wheelhouse.ensure(directory, list(s.requirements), platform, no_deps=s.no_deps)
                    seen[key] = None
                except wheelhouse.WheelhouseError as e:
                    seen[key] = e
            e = seen[key]
            if e is None:
                continue
            if e.package:
                problems.append(
                    Problem(
                        name,
                        "wheels",
                        f"no wheel of {e.package} (for {s}) for its platform ({platform})",
                        f"pin a release with one in data '{s.key}', add one to "
                        "your package index, or deploy this host without data 'wheelhouse'",
                    )
                )
            else:
                problems.append(
                    Problem(
                        name,
                        "wheels",
                        f"cannot fetch {s} for {platform}: {e}",
                        "check the controller's package index (pip config), then run again",
                    )
                )
    return problems


def check_fabric(state, plan: Plan, listeners: dict[str, list[dict]]) -> list[Problem]:
    """From each generate host, a TCP connect to each context worker's
    side-channel address and port: a wrong address, a firewall or a routing
    problem shows here instead of at the first request."""
    from disagg.infra.remote import in_parallel, shell

    problems = []
    pairs = side_channels(plan)
    started: dict[tuple[str, int], str] = {}
    try:
        for _, w in pairs:
            port = w.nixl_port
            if any(s["port"] == port for s in listeners.get(w.host, [])) or (w.host, port) in started:
                continue  # the worker runs: its own listener answers
            code = _LISTEN.format(address=w.address, port=port, seconds=30)
            # its pid, once it listens (or after 5 s: then the probe names the port)
            listening = f"until </dev/tcp/{w.address}/{port}; do sleep 0.05; done"
            ok, out = shell(
                state,
                w.host,
                f"setsid nohup python3 -c {shlex.quote(code)} >/dev/null 2>&1 "
                f"< /dev/null & echo $!; timeout 5 bash -c {shlex.quote(listening)} "
                "2>/dev/null; true",
            )
            if ok and out.strip().isdigit():
                started[(w.host, port)] = out.strip()
        # every pair at once (greenlets, like pyinfra's own host work)
        probes = in_parallel(
            [
                (
                    shell,
                    (state, generate_host, f"timeout 3 bash -c {shlex.quote(f'</dev/tcp/{w.address}/{w.nixl_port}')}"),
                )
                for generate_host, w in pairs
            ]
        )
        for (generate_host, w), (ok, _) in zip(pairs, probes):
            if not ok:
                problems.append(
                    Problem(
                        generate_host,
                        "fabric",
                        f"cannot open TCP to {w.name}'s NIXL side channel "
                        f"{net.hostport(w.address, w.nixl_port)} on {w.host}",
                        "check the address (the host's routable one), firewalls and routes between the hosts",
                    )
                )
    finally:
        for (host, _), pid in started.items():
            shell(state, host, f"kill {pid} 2>/dev/null; true")
    return problems
