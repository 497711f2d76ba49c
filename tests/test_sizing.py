"""`disagg plan`: AIConfigurator's saved output (recorded from a real run of
0.12.0 for the reference case, tests/fixtures/aiconfigurator) converted to
labels and placed; and one real run of AIConfigurator for the reference case."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from disagg.cli import main
from disagg.core.errors import ToolError, UsageError
from disagg.core.plan import cluster_from_inventory
from disagg.infra.inventory import load_inventory
from disagg.perf import extras, sizing

REFERENCE = Path(__file__).parent / "fixtures" / "aiconfigurator" / "reference"
H100 = "inventories/h100.py"


@pytest.fixture
def reference():
    return sizing.read_saved(REFERENCE)


def test_labels_from_aiconfigurators_own_files(reference):
    by_label = {c.label: c for c in reference}
    # 4 x TP2 prefill + 1 x TP8 decode, one replica
    one = by_label["context_tp2dp4_generate_tp8dp1"]
    assert (one.mode, one.rank, one.replicas, one.gpus) == ("disagg", 1, 1, 16)
    # 2P1D (TP2, TP4) x 2 replicas: replicas multiply dp, and concurrency
    two = by_label["context_tp2dp4_generate_tp4dp2"]
    assert (two.replicas, two.gpus) == (2, 16)
    assert two.concurrency == 2 * int(two.source["concurrency"])
    # aggregated TP8 x 2 and TP4 x 4
    assert by_label["baseline_tp8dp2"].replicas == 2 and by_label["baseline_tp4dp4"].replicas == 4
    assert len(reference) == 4


def test_predicted_numbers_are_aiconfigurators(reference):
    rows = {}
    for mode in sizing.MODES:
        (table,) = REFERENCE.rglob(f"{mode}/best_config_topn.csv")
        rows[mode] = list(csv.DictReader(open(table)))
    for c in reference:
        row = rows[c.mode][c.rank - 1]
        assert c.tokens_per_gpu == float(row["tokens/s/gpu"])
        assert c.tokens_per_user == float(row["tokens/s/user"])
        assert c.ttft_ms == float(row["ttft"])


def test_shapes_labels_cannot_express_are_kept_and_marked():
    row = {
        "num_total_gpus": "8",
        "tp": "4",
        "pp": "2",
        "dp": "1",
        "tokens/s/gpu": "1",
        "tokens/s/user": "1",
        "ttft": "1",
        "tpot": "1",
        "concurrency": "4",
    }
    c = sizing.candidate(row, "agg", 16, 1)
    assert (
        c.label == "baseline_tp4dp2"
        and c.unplaceable == "baseline pp2 inside a worker is not expressible as a disagg label"
    )


def test_placement_on_two_hosts_of_eight(reference):
    sizing.place_all(reference, sizing.synthetic_cluster(16, 8))
    top = sizing.pick(reference, "disagg")
    assert top.label == "context_tp2dp4_generate_tp8dp1"
    assert [(w["role"], w["host"], w["gpus"]) for w in top.placement] == [
        ("context", "host1", [0, 1]),
        ("context", "host1", [2, 3]),
        ("context", "host1", [4, 5]),
        ("context", "host1", [6, 7]),
        ("generate", "host2", [0, 1, 2, 3, 4, 5, 6, 7]),
    ]
    assert sizing.placement_text(top) == "context x4 on host1; generate x1 on host2"


def test_layout_needing_more_hosts_than_the_inventory_is_unplaceable(reference, monkeypatch):
    monkeypatch.setenv("DISAGG_CONTEXT_HOST", "10.0.0.1")
    monkeypatch.setenv("DISAGG_GENERATE_HOST", "10.0.0.2")
    sizing.place_all(reference, cluster_from_inventory(load_inventory(H100)))
    by_label = {c.label: c for c in reference}
    # the reference inventory runs the baseline on the context host only
    assert "needs 2 groups of 8 GPUs (16 GPUs) in group 'context'" in by_label["baseline_tp8dp2"].unplaceable
    assert by_label["context_tp2dp4_generate_tp8dp1"].unplaceable is None
    assert sizing.pick(reference, "agg") is None  # listed with the reason, never picked


def test_predictions_from_a_plan_file(reference, tmp_path):
    request = sizing.Request("meta-llama/Meta-Llama-3.1-70B", "h100_sxm", 16)
    sizing.place_all(reference, sizing.synthetic_cluster(16, 8))
    plan = sizing.as_dict(request, reference, 1.0, tmp_path)
    assert plan["pick"] == {"label": "context_tp2dp4_generate_tp8dp1", "baseline_label": "baseline_tp8dp2"}
    assert plan["request"]["tpot_ms"] == 20.0
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    predicted = sizing.predictions(tmp_path / "plan.json")
    assert predicted["baseline_tp4dp4"]["concurrency"] == 12 and set(predicted) == {c.label for c in reference}


def test_missing_aiconfigurator_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(extras.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(extras.shutil, "which", lambda name: None)
    out = CliRunner().invoke(
        main, ["plan", "--model", "m", "--system", "h100_sxm", "--gpus", "16", "-o", str(tmp_path)]
    )
    assert (
        out.exit_code == ToolError.exit_code
        and "AIConfigurator is not installed: pip install 'disagg[plan]'" in out.output
    )


def test_unknown_model_and_system_list_the_supported_ones():
    with pytest.raises(UsageError, match=r"model 'nobody/model' is not in .*meta-llama/Meta-Llama-3.1-70B"):
        sizing.check_supported("nobody/model", "h100_sxm")
    with pytest.raises(UsageError, match=r"system 'h999' is unknown .*h100_sxm"):
        sizing.check_supported("meta-llama/Meta-Llama-3.1-70B", "h999")


def test_plan_for_the_reference_case_with_aiconfigurator(tmp_path, monkeypatch):
    """The real performance model (about 30 s): the reference layout comes first."""
    monkeypatch.setenv("DISAGG_CONTEXT_HOST", "10.0.0.1")
    monkeypatch.setenv("DISAGG_GENERATE_HOST", "10.0.0.2")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "disagg",
            "plan",
            "--model",
            "meta-llama/Meta-Llama-3.1-70B",
            "--system",
            "h100_sxm",
            "-i",
            H100,
            "--isl",
            "3000",
            "--osl",
            "150",
            "--sla-tokens-per-user",
            "50",
            "-o",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads(out.stdout)
    assert plan["request"]["gpus"] == 16  # from the inventory
    disagg = [c for c in plan["candidates"] if c["mode"] == "disagg"]
    assert disagg[0]["label"] == "context_tp2dp4_generate_tp8dp1" and disagg[0]["unplaceable"] is None
    roles = [(w["role"], w["host"]) for w in disagg[0]["placement"]]
    assert roles == [("context", "10.0.0.1")] * 4 + [("generate", "10.0.0.2")]
    assert plan["pick"]["label"] == "context_tp2dp4_generate_tp8dp1"
    assert json.loads((tmp_path / "plan.json").read_text()) == plan
    assert list((tmp_path / "aiconfigurator").rglob("disagg/best_config_topn.csv"))  # raw files kept


SLA500 = Path(__file__).parent / "fixtures" / "aiconfigurator" / "sla500"


def test_best_effort_answers_that_miss_the_sla_are_never_picked():
    """Asked for 500 tokens/s/user, AIConfigurator 0.12.0 still returns
    configurations (at 3-63 tokens/s/user): listed, marked, not picked."""
    candidates = sizing.read_saved(SLA500)
    sizing.place_all(candidates, sizing.synthetic_cluster(16, 8))
    sizing.check_sla(candidates, sizing.Request("m", "h100_sxm", 16, sla_tokens_per_user=500))
    assert candidates and not any(c.meets_sla for c in candidates)
    assert sizing.pick(candidates, "disagg") is None and sizing.pick(candidates, "agg") is None
    # at a lower SLA the best tokens/s/GPU among those that meet it wins
    sizing.check_sla(candidates, sizing.Request("m", "h100_sxm", 16, sla_tokens_per_user=25))
    assert sizing.pick(candidates, "disagg").label == "context_tp2dp6_generate_tp4dp1"
    assert sizing.pick(candidates, "agg").label == "baseline_tp2dp8"
    order = sizing.ranked(candidates)
    assert [c.meets_sla for c in order] == sorted((c.meets_sla for c in order), reverse=True)
    # a 3P5D replica and a 6P1D one, both in our labels
    assert {"context_tp2dp3_generate_tp2dp5", "context_tp2dp6_generate_tp4dp1"} <= {c.label for c in candidates}
