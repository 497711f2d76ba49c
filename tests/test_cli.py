import json
from pathlib import Path

from click.testing import CliRunner

from disagg.cli import main
from disagg.core.errors import InventoryError, UsageError

ROOT = Path(__file__).resolve().parent.parent
H100 = str(ROOT / "inventories/h100.py")


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_render_json_reference_layout():
    result = run("render", "context_tp2dp4_generate_tp8dp1", "-i", H100, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["label"] == "context_tp2dp4_generate_tp8dp1"
    assert [(w["role"], w["index"], w["host"], w["gpus"], w["unit"]) for w in out["workers"]] == [
        ("context", 0, "h100-node1", [0, 1], "disagg-context-0"),
        ("context", 1, "h100-node1", [2, 3], "disagg-context-1"),
        ("context", 2, "h100-node1", [4, 5], "disagg-context-2"),
        ("context", 3, "h100-node1", [6, 7], "disagg-context-3"),
        ("generate", 0, "h100-node2", list(range(8)), "disagg-generate-0"),
    ]
    assert set(out["workers"][0]) == {"role", "index", "host", "gpus", "http_port", "nixl_port", "unit"}
    ctx = [(w["http_port"], w["nixl_port"]) for w in out["workers"] if w["role"] == "context"]
    assert len(set(ctx)) == 4


def test_render_defaults_to_the_inventory_label_and_prints_a_table():
    result = run("render", "-i", H100)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].startswith("context_tp2dp4_generate_tp8dp1: 16 GPUs")
    assert lines[1].split() == ["host", "role", "index", "gpus", "http_port", "nixl_port", "unit"]
    assert lines[2].split() == ["h100-node1", "context", "0", "0,1", "8100", "5600", "disagg-context-0"]
    assert lines[6].split() == ["h100-node2", "generate", "0", "0,1,2,3,4,5,6,7", "8100", "5600", "disagg-generate-0"]


def test_render_units_prints_every_file():
    result = run("render", "baseline_tp4dp2", "-i", H100, "--units")
    assert result.exit_code == 0
    for path in (
        "/etc/systemd/system/disagg-baseline-0.service",
        "/etc/disagg/disagg-baseline-1.env",
        "/etc/systemd/system/disagg-router.service",
        "/etc/disagg/nats-server.conf",
    ):
        assert f"### h100-node1:{path}\n" in result.output
    assert "--worker-urls http://h100-node1:8100 http://h100-node1:8101" in result.output


def test_tp_wider_than_a_host_is_one_line_naming_tp16_and_8_gpus():
    result = run("render", "context_tp2dp4_generate_tp16dp1", "-i", H100)
    assert result.exit_code != 0
    assert result.output.count("\n") == 1
    assert "tp16" in result.output and "8 GPUs per host" in result.output


def test_malformed_label_and_missing_inventory():
    bad = run("render", "context_tp2_generate_tp8dp1", "-i", H100)
    assert bad.exit_code == InventoryError.exit_code == 4
    assert bad.output.startswith("error: ") and "malformed" in bad.output and bad.output.count("\n") == 1
    missing = run("render", "-i", "no/such/inventory.py")
    assert missing.exit_code == UsageError.exit_code == 2
    assert "inventory 'no/such/inventory.py' not found" in missing.output
    both = run("deploy", "-i", H100, "--baseline", "--teardown")
    assert (
        both.exit_code == 2 and both.output == "error: --baseline and --teardown are two deploys: run one at a time\n"
    )


def test_inventory_errors_name_the_field(tmp_path):
    # pyinfra caches inventory code by file name: one file per case
    cases = {
        'context = ["a"]\ngenerate = [("b", {"gpus": 8})]\nall = (["a", "b"], {"model": "m"})\n': "a: inventory data 'gpus' = None: missing; set it to the number of GPUs",
        'context = [("a", {"gpus": 8})]\ngenerate = [("b", {"gpus": 8})]\n': "all hosts: inventory data 'model' = None: missing; set it to a model id or path",
        'context = [("a", {"gpus": 8})]\ngenerate = [("b", {"gpus": 8})]\n'
        'all = (["a", "b"], {"model": "m", "max_model_len": "lots"})\n': "all hosts: inventory data 'max_model_len' = 'lots': input should be a valid integer",
        'generate = [("b", {"gpus": 8})]\nall = (["b"], {"model": "m"})\n': "inventory has no 'head' or 'context' group",
    }
    for i, (text, message) in enumerate(cases.items()):
        inv = tmp_path / f"inv{i}.py"
        inv.write_text(text)
        result = run("render", "context_tp1dp1_generate_tp1dp1", "-i", str(inv))
        assert result.exit_code != 0 and message in result.output, result.output
        assert result.output.count("\n") == 1


def test_status_needs_an_inventory_or_a_nats_url():
    result = CliRunner().invoke(main, ["status"])
    assert (
        result.exit_code == UsageError.exit_code
        and "give -i INVENTORY, or --nats tls://HOST:PORT --ca FILE" in result.output
    )


def test_status_against_an_unreachable_nats_is_unknown_not_just_not_ready():
    result = CliRunner().invoke(main, ["status", "--nats", "nats://127.0.0.1:9", "--json"])
    assert result.exit_code == 3  # distinct from 1, "not ready"
    current = json.loads(result.output)
    assert not current["ready"] and "NATS at nats://127.0.0.1:9 refused or unreachable" in current["error"]


def _deploy_argv(monkeypatch, *args):
    """What `disagg deploy ARGS` starts in its place (pyinfra's CLI)."""
    started = []
    monkeypatch.setattr("os.execv", lambda path, argv: started.append(argv))
    result = run("deploy", *args)
    return result, (started[0][3:] if started else None)


def test_deploy_runs_the_packaged_deploy_files_with_pyinfras_options_passed_through(monkeypatch):
    from disagg import deploys

    result, argv = _deploy_argv(monkeypatch, "-i", H100, "context_tp2dp2_generate_tp4dp1", "--dry", "--diff", "-v")
    assert result.exit_code == 0, result.output
    assert argv == [
        H100,
        str(deploys.path("disagg")),
        "--data",
        "label=context_tp2dp2_generate_tp4dp1",
        "--dry",
        "--diff",
        "-v",
    ]
    assert deploys.path("disagg").is_file()
    _, argv = _deploy_argv(monkeypatch, "-i", H100, "--baseline", "baseline_tp8dp1", "--limit", "h100-node1", "-y")
    assert argv == [
        H100,
        str(deploys.path("baseline")),
        "--data",
        "baseline_label=baseline_tp8dp1",
        "--limit",
        "h100-node1",
        "-y",
    ]
    # an option of pyinfra's first is not taken for a label
    _, argv = _deploy_argv(monkeypatch, "-i", H100, "--teardown", "--purge", "--serial")
    assert argv == [H100, str(deploys.path("teardown")), "--data", "purge=true", "--serial"]
    _, argv = _deploy_argv(monkeypatch, "-i", H100, "--model", "--data", "model_revision=abc")
    assert argv == [H100, str(deploys.path("model")), "--data", "model_revision=abc"]


def test_deploy_refuses_what_it_cannot_mean_in_one_line(monkeypatch):
    for args, message in (
        (("--teardown", "--baseline"), "--baseline and --teardown are two deploys"),
        (("--purge",), "--purge goes with --teardown"),
        (("--teardown", "baseline_tp4dp2"), "--teardown takes no LABEL"),
    ):
        result, argv = _deploy_argv(monkeypatch, "-i", H100, *args)
        assert result.exit_code == 2 and argv is None
        (line,) = result.output.strip().splitlines()
        assert line.startswith(f"error: {message}")
