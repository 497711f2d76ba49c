"""Plan a deploy with pyinfra's own loader and its @fake connector: the same
code path as `pyinfra INVENTORY DEPLOY --dry`, with fact output fed from
commands captured on real hosts (../shared/fixtures) instead of SSH."""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyinfra
from hubserver import Hub
from pyinfra.api import Config, State
from pyinfra.api.command import FileUploadCommand, StringCommand
from pyinfra.api.connect import connect_all
from pyinfra.api.state import StateStage
from pyinfra.connectors.fake import FakeConnector
from pyinfra.context import ctx_host, ctx_inventory, ctx_state

from disagg.infra import hub
from disagg.infra.pyinfra_cli import unpatched

unpatched()
from pyinfra_cli.inventory import make_inventory  # noqa: E402
from pyinfra_cli.util import load_deploy_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# copied from ../shared/fixtures: what a real NVIDIA host answered
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture_output(name: str) -> list[str]:
    """Output lines of a captured command file (header '$ cmd', footer '[exit N]')."""
    lines = (FIXTURES / "nvidia-h200" / name).read_text().splitlines()
    return [line for line in lines if not line.startswith(("$ ", "[exit "))]


def os_release() -> list[str]:
    """/etc/os-release of the real GPU host, from host.txt."""
    lines = (FIXTURES / "nvidia-h200" / "host.txt").read_text().splitlines()
    start = lines.index("--- os") + 1
    return [line for line in lines[start:] if "=" in line]


RESOLVED = ["### h100-node1", "10.100.0.1", "fd00:100::1", "### h100-node2", "10.100.0.2"]


def gpu_host_responses(gpus: int = 8, nvswitches: int = 4) -> dict:
    """Fact output of an Ubuntu 24.04 HGX node with no driver loaded yet:
    GPUs and NVSwitches on the PCI bus (sysfs lines), nvidia-smi absent."""
    pci = [f"0000:{i:02x}:00.0 0x10de 0x030200" for i in range(gpus)]
    pci += [f"0000:{0x80 + i:02x}:00.0 0x10de 0x068000" for i in range(nvswitches)]
    return {
        "/sys/bus/pci/devices": pci,
        "*-release": ["/etc/os-release", *os_release(), "---"],
        "/proc/driver/nvidia/version": [],
        "uname -s": ["Linux"],
        # a stock Ubuntu has these tools
        re.compile(r"^command -v '?(useradd|userdel|groupadd|python3|apt-get)"): ["/usr/bin/tool"],
        # the reference inventory's hosts are names, in every host's /etc/hosts
        "getent ahosts": RESOLVED,
    }


@dataclass
class Planned:
    state: State

    def ops(self, host: str) -> list[tuple[str, list[str]]]:
        """(operation name, commands) that would run on host, in order;
        secrets masked as pyinfra prints them, uploads as 'upload PATH'."""
        return [(name, [_masked(c) for c in cmds]) for name, cmds in self._raw_ops(host)]

    def _raw_ops(self, host: str) -> list[tuple[str, list]]:
        h = self.state.inventory.get_host(host)
        out = []
        with ctx_state.use(self.state), ctx_inventory.use(self.state.inventory), ctx_host.use(h):
            for op_hash in self.state.get_op_order():
                op_data = self.state.ops[h].get(op_hash)
                if op_data is None:
                    continue
                names = ", ".join(sorted(self.state.op_meta[op_hash].names))
                out.append((names, list(op_data.command_generator())))
        return out

    def commands(self, host: str) -> list[str]:
        """Every command that would run on host, secrets masked as pyinfra prints them."""
        return [c for _, cmds in self.ops(host) for c in cmds if not c.startswith("upload ")]

    def uploads(self, host: str) -> dict[str, str]:
        """{remote path: content} of every file that would be written on host."""
        out = {}
        for _, cmds in self._raw_ops(host):
            for c in cmds:
                if isinstance(c, FileUploadCommand):
                    c.src.seek(0)
                    out[c.dest] = c.src.read()
        return out

    def held(self, host: str, but: str) -> dict:
        """Fact responses (FileStates, DirectoryStates) of a host that holds
        every file and directory this plan makes (content, mode, owner),
        except files whose path contains `but`: the host after a deploy of
        the plan without that part."""
        files: dict[str, dict] = {}
        dirs: dict[str, dict] = {}
        for _, cmds in self._raw_ops(host):
            for c in cmds:
                if isinstance(c, FileUploadCommand):
                    c.src.seek(0)
                    files[c.dest] = {"text": c.src.read(), "mode": "644", "owner": "root"}
                elif "_stdin" in c.connector_arguments:  # a secret (ops.hidden_content)
                    path = re.search(r'mv -f "\$t" (\S+)', c.get_raw_value()).group(1)
                    files[path] = {"text": c.connector_arguments["_stdin"], "mode": "600", "owner": "root"}
                elif m := re.match(r"mkdir -p (\S+)$", str(c)):
                    dirs.setdefault(m[1], {"owner": "root", "group": "root", "mode": "755"})
                elif m := re.match(r"chown (?:-h )?([^:]+):(\S+) (\S+)$", str(c)):
                    (dirs if m[3] in dirs else files).setdefault(m[3], {}).update(owner=m[1], group=m[2])
                elif m := re.match(r"chmod (\d+) (\S+)$", str(c)):
                    (dirs if m[2] in dirs else files).setdefault(m[2], {}).update(mode=m[1])
        return {
            "sha1sum <": [
                f"{hashlib.sha1(f['text'].encode()).hexdigest()} {f['mode']} {f['owner']} {path}"
                for path, f in files.items()
                if "text" in f and but not in path
            ],
            "-printf '%y %u %g %m %p": [f"d {d['owner']} {d['group']} {d['mode']} {path}" for path, d in dirs.items()],
        }

    def executed(self, host: str) -> list[str]:
        return self.state.inventory.get_host(host).connector.executed_commands


def _masked(command) -> str:
    if isinstance(command, FileUploadCommand):
        return f"upload {command.dest}"
    # a command of our own (disagg.roles.transfer.TarStream) says what it does
    return command.get_masked_value() if isinstance(command, StringCommand) else repr(command)


# huggingface.co cannot be reached from here: where the controller resolves a
# hub model's revision (roles/model.py), a local server in the hub's layout
# answers for the inventory's model
_hubs: dict[str, tuple[Hub, tempfile.TemporaryDirectory]] = {}


def stand_in_hub(repo: str) -> Hub:
    if repo not in _hubs:
        root = tempfile.TemporaryDirectory(prefix="disagg-hub-")
        (Path(root.name) / "config.json").write_text("{}")
        _hubs[repo] = (Hub(repo, Path(root.name)).__enter__(), root)
    hub.DEFAULT_ENDPOINT = _hubs[repo][0].url
    return _hubs[repo][0]


def plan_deploy(
    inventory: str,
    deploy: str,
    data: dict | None = None,
    responses: dict | None = None,
    limit: tuple[str, ...] = (),
    host_responses: dict[str, dict] | None = None,
) -> Planned:
    """host_responses: {host: responses} for those hosts, instead of `responses`."""
    pyinfra.is_cli = True  # order operations by line, as the CLI does
    state = State(check_for_changes=True)
    state.cwd = str(ROOT)
    override = {"fake_delay": 0, "fake_delay_jitter": 0}
    if responses is not None:  # else each host's own, from the inventory
        override["fake_responses"] = responses
    override.update(data or {})
    with ctx_state.use(state):
        inv = make_inventory(str(ROOT / inventory), override_data=override)
    if isinstance(model := next(iter(inv)).data.get("model"), str):
        stand_in_hub(model)
    for h in inv:
        h.connector_cls = FakeConnector
        if h.name in (host_responses or {}):
            h.data.fake_responses = host_responses[h.name]
    with ctx_state.use(state), ctx_inventory.use(inv):
        state.init(inv, Config(), initial_limit=[inv.get_host(name) for name in limit] or None)
        state.set_stage(StateStage.Connect)
        connect_all(state)
        state.set_stage(StateStage.Prepare)
        state.current_op_file_number = 0
        try:
            load_deploy_file(state, str(ROOT / deploy))
        except Exception as e:
            e.planned = Planned(state)  # so that a test can see what ran before
            raise
    return Planned(state)
