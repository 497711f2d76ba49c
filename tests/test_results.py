"""Tables and reports from real aiperf exports, recorded against the CPU
stack on the test hosts (tests/fixtures/aiperf), recomputed here
independently from the raw JSON."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from disagg.core.errors import ToolError, UsageError
from disagg.perf import results
from disagg.perf.report import frontier, pick, report
from disagg.perf.results import Point

RECORDED = Path(__file__).resolve().parent / "fixtures" / "aiperf"
LABELS = {"context_tp1dp2_generate_tp1dp1": 3, "baseline_tp1dp2": 2}


def recorded_runs():
    return {label: next((RECORDED / label).iterdir()) for label in LABELS}


def test_table_is_computed_from_the_raw_export_and_the_topology():
    for label, gpus in LABELS.items():
        run = recorded_runs()[label]
        rows = results.load_run(run)
        provenance = json.loads((run / "provenance.json").read_text())
        assert [r["concurrency"] for r in rows] == [e["concurrency"] for e in provenance["runs"]]
        for r in rows:
            raw = json.loads((run / f"c{r['concurrency']}" / "profile_export_aiperf.json").read_text())
            assert r["output_token_throughput_per_gpu"] == pytest.approx(raw["output_token_throughput"]["avg"] / gpus)
            assert r["output_token_throughput_per_user"] == raw["output_token_throughput_per_user"]["avg"]
            assert r["time_to_first_token"] == raw["time_to_first_token"]["avg"]
            assert r["inter_token_latency_p99"] == raw["inter_token_latency"]["p99"]
            assert r["request_throughput"] == raw["request_throughput"]["avg"]
            assert r["status"] == "ok" and r["errors"] == 0
            assert r["configuration"] in ("2 x TP1 context + 1 x TP1 generate", "2 x TP1 aggregated")


def test_older_genai_perf_exports_are_read(tmp_path):
    run = recorded_runs()["baseline_tp1dp2"]
    copy = tmp_path / "baseline_tp1dp2" / run.name
    shutil.copytree(run, copy)
    for export in copy.glob("c*/profile_export_aiperf.json"):
        data = json.loads(export.read_text())
        data["output_token_throughput_per_request"] = data.pop("output_token_throughput_per_user")
        (export.parent / "profile_export_genai_perf.json").write_text(json.dumps(data))
        export.unlink()
    assert [r["output_token_throughput_per_user"] for r in results.load_run(copy)] == [
        r["output_token_throughput_per_user"] for r in results.load_run(run)
    ]


def test_a_failed_run_is_marked_and_the_rest_kept(tmp_path):
    run = recorded_runs()["baseline_tp1dp2"]
    copy = tmp_path / "baseline_tp1dp2" / run.name
    shutil.copytree(run, copy)
    provenance = json.loads((copy / "provenance.json").read_text())
    first = provenance["runs"][0]["concurrency"]
    shutil.rmtree(copy / f"c{first}")
    provenance["runs"][0]["error"] = "aiperf exited 1: connection refused"
    (copy / "provenance.json").write_text(json.dumps(provenance))
    rows = results.load_run(copy)
    assert rows[0]["status"] == "error: aiperf exited 1: connection refused"
    assert rows[0]["output_token_throughput_per_gpu"] is None
    assert all(r["status"] == "ok" for r in rows[1:])
    assert "| error: aiperf exited 1" in results.markdown(rows)


def test_a_run_under_another_labels_directory_is_refused(tmp_path):
    run = recorded_runs()["baseline_tp1dp2"]
    shutil.copytree(run, tmp_path / "context_tp1dp2_generate_tp1dp1" / run.name)
    with pytest.raises(UsageError, match="recorded for label 'baseline_tp1dp2' but lies under"):
        results.load_run(tmp_path / "context_tp1dp2_generate_tp1dp1" / run.name)


def test_report_over_two_recorded_labels(tmp_path):
    points = {label: [results.point(r) for r in results.load_run(run)] for label, run in recorded_runs().items()}
    # an SLA between the two concurrencies' tokens/s/user of the disaggregated run
    users = sorted(p.per_user for p in points["context_tp1dp2_generate_tp1dp1"])
    sla = (users[0] + users[-1]) / 2
    summary = report([RECORDED], tmp_path, sla, None)
    assert len(summary["rows"]) == sum(len(p) for p in points.values())
    png = tmp_path / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = json.loads(png.with_suffix(".json").read_text())
    assert sorted(shown["series"]) == sorted(LABELS) == summary["series"]
    for label, want in points.items():
        expected = pick(want, sla)
        got = summary["picks"][label]
        assert (got is None) == (expected is None)
        if expected:
            assert got["per_gpu"] == pytest.approx(expected.per_gpu) and got["how"] == expected.how
    for name in ("report.csv", "report.json", "report.md"):
        assert (tmp_path / name).is_file()


def P(c, user, gpu, ttft=100.0):
    return Point("context_tp2dp4_generate_tp8dp1", c, user, gpu, ttft, 20.0, {})


def test_pick_measured_and_interpolated():
    points = [P(1, 80, 10), P(8, 60, 50), P(16, 40, 90), P(32, 20, 120)]
    # the crossing at 50 between c8 (60, 50) and c16 (40, 90): 70 tokens/s/GPU
    chosen = pick(points, 50)
    assert chosen.per_gpu == pytest.approx(70) and chosen.how == "interpolated between c8 and c16"
    assert pick(points, 60).how == "measured at c8" and pick(points, 60).per_gpu == 50
    assert pick(points, 90) is None
    # a TTFT limit the crossing misses leaves the measured point
    slow = [P(8, 60, 50, ttft=100), P(16, 40, 90, ttft=900)]
    assert pick(slow, 50, sla_ttft_ms=300).how == "measured at c8"


def test_frontier_drops_dominated_points():
    points = [P(1, 80, 10), P(2, 70, 5), P(8, 60, 50), P(16, 40, 45)]
    assert [p.concurrency for p in frontier(points)] == [1, 8]


def test_report_puts_predictions_beside_measurements(tmp_path):
    label = "context_tp1dp2_generate_tp1dp1"
    measured = {p.concurrency: p for p in (results.point(r) for r in results.load_run(recorded_runs()[label]))}
    predicted = {
        label: {"tokens_per_gpu": 9.5, "tokens_per_user": 30.0, "ttft_ms": 80.0, "concurrency": 2},
        "context_tp2dp4_generate_tp8dp1": {
            "tokens_per_gpu": 92.0,
            "tokens_per_user": 53.2,
            "ttft_ms": 661.0,
            "concurrency": 116,
        },  # not measured: its own row
    }
    summary = report([RECORDED], tmp_path, None, None, predicted)
    rows = {(r["label"], r["concurrency"]): r for r in summary["predicted"]}
    assert sorted(rows) == [(label, 1), (label, 2), ("context_tp2dp4_generate_tp8dp1", 116)]
    both = rows[(label, 2)]
    assert both["predicted_per_gpu"] == 9.5 and both["measured_per_gpu"] == measured[2].per_gpu
    assert both["measured_ttft_ms"] == measured[2].ttft
    assert rows[(label, 1)]["predicted_per_gpu"] is None
    assert rows[("context_tp2dp4_generate_tp8dp1", 116)]["measured_per_gpu"] is None
    shown = json.loads((tmp_path / "pareto.json").read_text())
    assert shown["predicted"][label] == [2, 30.0, 9.5]
    assert "| predicted_per_gpu |" in (tmp_path / "predicted.md").read_text()


def _with_deployment(tmp_path, name: str, run: Path, digest: str | None) -> Path:
    copy = tmp_path / name / run.parent.name / run.name
    shutil.copytree(run, copy)
    provenance = json.loads((copy / "provenance.json").read_text())
    provenance["deployment"] = {"hash": digest, "hosts": {}} if digest else None
    (copy / "provenance.json").write_text(json.dumps(provenance))
    return copy


def test_a_label_measured_on_two_deployments_is_refused_unless_split(tmp_path):
    label = "context_tp1dp2_generate_tp1dp1"
    run = recorded_runs()[label]
    a = _with_deployment(tmp_path, "a", run, "1f53091d41c91954")
    b = _with_deployment(tmp_path, "b", run, "77aa00bb11cc22dd")
    assert {r["deployment"] for r in results.load_run(a)} == {"1f53091d41c91954"}
    with pytest.raises(
        UsageError,
        match=rf"{label} was measured on 2 different deployments "
        r"\(1f53091d41c91954, 77aa00bb11cc22dd\).*--split-deployments",
    ):
        report([a, b], tmp_path / "out", None, None)
    summary = report([a, b], tmp_path / "out", 1.0, None, split_deployments=True)
    assert summary["series"] == [f"{label} @1f53091d41c91954", f"{label} @77aa00bb11cc22dd"]
    assert summary["deployments"] == {label: ["1f53091d41c91954", "77aa00bb11cc22dd"]}
    assert set(summary["picks"]) == set(summary["series"])
    # one deployment (or runs recorded before hashes: "unknown") is one series, as before
    same = report([a, _with_deployment(tmp_path, "c", run, "1f53091d41c91954")], tmp_path / "one", None, None)
    assert same["series"] == [label] and same["deployments"] == {label: ["1f53091d41c91954"]}
    assert report([run], tmp_path / "old", None, None)["deployments"] == {label: ["unknown"]}


def test_report_writes_apart_from_its_runs_and_names_the_extra_without_matplotlib(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from disagg.cli import main

    monkeypatch.chdir(tmp_path)
    before = sorted(p for p in RECORDED.rglob("*"))
    out = CliRunner().invoke(main, ["report", str(RECORDED)])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "report" / "pareto.png").is_file() and sorted(RECORDED.rglob("*")) == before
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    out = CliRunner().invoke(main, ["report", str(RECORDED), "-o", "again"])
    assert out.exit_code == ToolError.exit_code
    assert out.output.strip() == "error: matplotlib is not installed: pip install 'disagg[bench]'"
