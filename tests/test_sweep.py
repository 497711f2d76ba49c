"""`disagg sweep` without hosts: what counts as finished (resume), which
deploy a label takes, and a bad label stopping it before any host is touched.
The sweep itself runs end to end on the test hosts (tests/e2e)."""

import json
import subprocess
import sys

from disagg.core.errors import InventoryError
from disagg.perf import results
from disagg.perf.sweep import complete_run, label_key


def _run(root, label, run_id, runs):
    d = root / label / run_id
    d.mkdir(parents=True)
    (d / results.PROVENANCE).write_text(json.dumps({"label": label, "runs": runs}))
    return d


def test_a_label_is_complete_when_every_concurrency_ran_without_error(tmp_path):
    label = "baseline_tp1dp2"
    _run(tmp_path, label, "20260101T000000Z", [{"concurrency": 1}, {"concurrency": 2, "error": "aiperf exited 1"}])
    assert complete_run(tmp_path, label, [1, 2]) is None
    assert complete_run(tmp_path, label, [1]) == tmp_path / label / "20260101T000000Z"
    done = _run(tmp_path, label, "20260102T000000Z", [{"concurrency": 1}, {"concurrency": 2}])
    assert complete_run(tmp_path, label, [1, 2]) == done
    assert complete_run(tmp_path, "context_tp1dp1_generate_tp1dp1", [1]) is None


def test_label_key():
    assert label_key("context_tp2dp4_generate_tp8dp1") == "label"
    assert label_key("baseline_tp4dp2") == "baseline_label"


def test_an_unplaceable_label_stops_the_sweep_before_any_deploy(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "disagg",
            "sweep",
            "-i",
            "inventories/local.py",
            "-o",
            str(tmp_path),
            "--labels",
            "baseline_tp1dp2,context_tp1dp5_generate_tp1dp1",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == InventoryError.exit_code
    assert out.stderr.startswith("error: label 'context_tp1dp5_generate_tp1dp1': context_tp1dp5 needs 5 groups")
    assert list(tmp_path.iterdir()) == []
