"""The test-host harness's own safety: it signals only the containers it
started, and fails in one line."""

import subprocess
import sys

import pytest

from disagg.lab import testhosts


def test_a_recorded_pid_is_signalled_only_while_it_is_our_nspawn(tmp_path):
    root = str(tmp_path / "root")
    # a process whose command line is that of our container: systemd-nspawn -D ROOT ...
    ours = subprocess.Popen(
        ["systemd-nspawn", "-c", "import time; time.sleep(60)", "-D", root, "--boot"], executable=sys.executable
    )
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert testhosts.is_our_container(ours.pid, root)
        assert not testhosts.is_our_container(ours.pid, str(tmp_path / "another-root"))
        # after a reboot the recorded PID may be anything else
        assert not testhosts.is_our_container(other.pid, root)
    finally:
        for p in (ours, other):
            p.kill()
            p.wait()
    assert not testhosts.is_our_container(ours.pid, root)  # gone


def test_a_failing_harness_command_is_one_line():
    with pytest.raises(testhosts.HarnessError) as e:
        testhosts._run("ip", "link", "show", "disagg-no-such-link")
    assert "\n" not in str(e.value) and "ip link show disagg-no-such-link exited" in str(e.value)
