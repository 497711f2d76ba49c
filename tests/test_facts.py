"""GPU facts parsed from output captured on a real NVIDIA host, and our unit
facts run in a real shell."""

import hashlib
import os
import subprocess

from fakehosts import FIXTURES, fixture_output

from disagg.infra.facts import FileStates, UnitState, parse_driver_version, parse_pci, parse_query_gpu
from disagg.roles.nvidia_driver import skip_reason


def test_query_gpu_on_real_h200_output():
    (gpu,) = parse_query_gpu(fixture_output("query-gpu.txt"))
    assert gpu["index"] == 0
    assert gpu["name"] == "NVIDIA H200"
    assert gpu["memory.total"] == 143771
    assert gpu["driver_version"] == "580.159.04"
    assert gpu["persistence_mode"] == "Enabled"
    # agrees with the plain nvidia-smi table of the same host
    assert "Driver Version: 580.159.04" in (FIXTURES / "nvidia-h200" / "nvidia-smi.txt").read_text()


def test_query_gpu_ignores_noise():
    assert parse_query_gpu([]) == []
    assert parse_query_gpu(["NVIDIA-SMI has failed because it couldn't communicate with the driver."]) == []


def test_loaded_driver_on_real_host():
    loaded = parse_driver_version((FIXTURES / "nvidia-h200" / "host.txt").read_text().splitlines())
    assert loaded == {"version": "580.159.04", "open": True}
    assert parse_driver_version(["NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug"]) == {
        "version": "535.104.05",
        "open": False,
    }
    assert parse_driver_version([]) is None


def test_pci_counts_gpus_and_nvswitches():
    lines = [
        "0000:18:00.0 0x10de 0x030200",
        "0000:2a:00.0 0x10de 0x030200",
        "0000:05:00.0 0x10de 0x068000",
        "0000:00:00.0 0x8086 0x060000",
        "garbage",
    ]
    assert parse_pci(lines) == {"gpus": 2, "nvswitches": 1}


def test_driver_role_skips_with_a_reason():
    ubuntu = {"name": "Ubuntu", "major": 24}
    gpus = {"gpus": 8, "nvswitches": 4}
    assert skip_reason(gpus, ubuntu) is None
    assert skip_reason(gpus, {"name": "Ubuntu", "major": 22}) is None
    assert "no NVIDIA GPU" in skip_reason({"gpus": 0, "nvswitches": 0}, ubuntu)
    assert "Debian 12 is not Ubuntu" in skip_reason(gpus, {"name": "Debian", "major": 12})


def test_unit_state_reads_active_and_enabled_in_one_line():
    fact = UnitState()
    assert fact.process(["active enabled"]) == {"active": True, "enabled": True, "outdated": False}
    assert fact.process(["activating enabled"]) == {"active": False, "enabled": True, "outdated": False}
    assert fact.process(["inactive disabled"]) == {"active": False, "enabled": False, "outdated": False}
    assert fact.process(["inactive"]) == {"active": False, "enabled": False, "outdated": False}  # unit not found
    assert "systemctl is-active disagg-router.service" in fact.command("disagg-router.service")


def test_unit_state_sees_files_changed_after_the_unit_started(tmp_path):
    """The shell the fact runs, with a stand-in systemctl that reports a
    unit started at 12:00:00 UTC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(
        '#!/bin/sh\ncase "$1" in is-active) echo active;; is-enabled) echo enabled;; '
        'show) echo "Fri 2026-11-27 12:00:00 UTC";; esac\n'
    )
    (bin_dir / "systemctl").chmod(0o755)
    started = 1795780800  # 2026-11-27 12:00:00 UTC
    unit, env = tmp_path / "w.service", tmp_path / "w.env"
    for path in (unit, env):
        path.write_text("x")
        os.utime(path, (started - 60, started - 60))

    def state():
        out = subprocess.run(
            ["sh", "-c", UnitState().command("w.service", (str(unit), str(env)))],
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"},
        )
        return UnitState().process(out.stdout.splitlines())

    assert state() == {"active": True, "enabled": True, "outdated": False}
    os.utime(env, (started + 30, started + 30))  # rewritten after the start: its roll did not finish
    assert state() == {"active": True, "enabled": True, "outdated": True}


def test_file_states_reads_checksums_and_modes_of_many_files_at_once(tmp_path):
    present, missing, spaced = tmp_path / "a.service", tmp_path / "b.env", tmp_path / "with space.env"
    present.write_text("x\n")
    present.chmod(0o644)
    spaced.write_text("y\n")
    spaced.chmod(0o600)
    fact = FileStates()
    out = subprocess.run(
        ["sh", "-c", fact.command((str(present), str(missing), str(spaced)))], capture_output=True, text=True
    )
    assert fact.process(out.stdout.splitlines()) == {
        str(present): {"sha1": hashlib.sha1(b"x\n").hexdigest(), "mode": "644", "owner": "root"},
        str(spaced): {"sha1": hashlib.sha1(b"y\n").hexdigest(), "mode": "600", "owner": "root"},
    }
