"""Bad inventory data, as a hostile or careless user writes it: each case
is refused in one line naming the key, the value and the fix, before
anything is planned, and never with a traceback or a silent coercion."""

import math

import pytest
from click.testing import CliRunner
from fakehosts import gpu_host_responses, plan_deploy
from pyinfra.api.exceptions import PyinfraError

from disagg.cli import main
from disagg.core.plan import check_inventory, make_plan
from disagg.core.schema import SchemaError
from disagg.infra.inventory import load_inventory

H100 = "inventories/h100.py"
NODES = ("h100-node1", "h100-node2")
NL = "\n"

# (data for every host, what the one line says after "inventory data ")
BAD_DATA = [
    ({"gpus": 8.5}, "'gpus' = 8.5: input should be a valid integer"),
    ({"gpus": True}, "'gpus' = True: input should be a valid integer"),
    ({"gpus": 0}, "'gpus' = 0: input should be greater than or equal to 1"),
    ({"gpus": -8}, "'gpus' = -8: input should be greater than or equal to 1"),
    ({"gpus": "8"}, "'gpus' = '8': input should be a valid integer"),
    ({"http_port_base": 8000.7}, "'http_port_base' = 8000.7: input should be a valid integer"),
    ({"nats_port": True}, "'nats_port' = True: input should be a valid integer"),
    ({"nats_port": 70000}, "'nats_port' = 70000: input should be less than or equal to 65535"),
    ({"router_port": 0}, "'router_port' = 0: input should be greater than or equal to 1"),
    ({"max_model_len": -1}, "'max_model_len' = -1: input should be greater than or equal to 1"),
    ({"max_model_len": 3500.5}, "'max_model_len' = 3500.5: input should be a valid integer"),
    (
        {"gpu_memory_utilization": 1.5},
        "'gpu_memory_utilization' = 1.5: input should be less than or equal to 1; set a fraction",
    ),
    ({"gpu_memory_utilization": math.nan}, "'gpu_memory_utilization' = nan: input should be a finite number"),
    ({"gpu_memory_utilization": 0}, "'gpu_memory_utilization' = 0: input should be greater than 0"),
    ({"gpu_memory_utilization": True}, "'gpu_memory_utilization' = True: input should be a valid number"),
    ({"kv_cache_dtype": "fp9"}, "'kv_cache_dtype' = 'fp9': input should be 'auto'"),
    (
        {"kv_cache_dtype": f"fp8{NL}ExecStartPre=/x"},
        "'kv_cache_dtype' = 'fp8\\nExecStartPre=/x': input should be 'auto'",
    ),
    ({"router_policy": "fastest"}, "'router_policy' = 'fastest': input should be 'random'"),
    (
        {"router_address": "head.example.com"},
        "'router_address' = 'head.example.com': is not an IP address this host can bind; use the head's",
    ),
    (
        {"router_address": f"0.0.0.0{NL}ExecStartPre=/bin/sh"},
        "'router_address' = '0.0.0.0\\nExecStartPre=/bin/sh': is not an IP",
    ),
    ({"router_address": 0}, "'router_address' = 0: input should be a valid string"),
    ({"router_policy": f"round_robin{NL}x"}, "'router_policy' = 'round_robin\\nx': input should be 'random'"),
    ({"extra_args": [1, None]}, "'extra_args[0]' = 1: input should be a valid string"),
    ({"extra_args": "--enforce-eager"}, "'extra_args' = '--enforce-eager': input should be a valid tuple"),
    ({"extra_args": [f"--x{NL}--y"]}, "'extra_args[0]' = '--x\\n--y': contains control character(s) '\\n'"),
    (
        {"engine_env": {"A": f"1{NL}LD_PRELOAD=/evil.so"}},
        "'engine_env['A']' = '1\\nLD_PRELOAD=/evil.so': contains control",
    ),
    ({"engine_env": {"A B": "1"}}, "'engine_env['A B']' = '1': string should match pattern"),
    ({"engine_env": {"A": True}}, "'engine_env['A']' = True: input should be a valid string"),
    ({"engine_env": ["A=1"]}, "'engine_env' = ['A=1']: input should be a valid dictionary"),
    ({"context_args": [None]}, "'context_args[0]' = None: input should be a valid string"),
    ({"generate_env": {"X": None}}, "'generate_env['X']' = None: input should be a valid string"),
    ({"baseline_env": {f"X{NL}Y": "1"}}, "'baseline_env['X\\nY']' = '1': string should match pattern"),
    (
        {"kv_transfer_config": "NixlConnector"},
        "'kv_transfer_config' = 'NixlConnector': input should be a valid dictionary",
    ),
    (
        {"kv_transfer_config": {"kv_connector": f"Nixl{NL}"}},
        "'kv_transfer_config' = {'kv_connector': 'Nixl\\n'}: contains control",
    ),
    ({"ready_timeout": "abc"}, "'ready_timeout' = 'abc': input should be a valid integer"),
    ({"ready_timeout": -5}, "'ready_timeout' = -5: input should be greater than or equal to 1"),
    ({"health_timeout": 0}, "'health_timeout' = 0: input should be greater than or equal to 1"),
    ({"shutdown_timeout": -70}, "'shutdown_timeout' = -70: input should be greater than or equal to 1"),
    ({"drain_timeout": 1.5}, "'drain_timeout' = 1.5: input should be a valid integer"),
    ({"max_unavailable": 0}, "'max_unavailable' = 0: input should be greater than or equal to 1"),
    ({"preflight": "yes"}, "'preflight' = 'yes': input should be a valid boolean"),
    ({"preflight": 1}, "'preflight' = 1: input should be a valid boolean"),
    ({"nixl_progress_thread": "false"}, "'nixl_progress_thread' = 'false': input should be a valid boolean"),
    ({"venv_disk_gb": -1}, "'venv_disk_gb' = -1: input should be greater than or equal to 0"),
    ({"model_disk_gb": math.inf}, "'model_disk_gb' = inf: input should be a finite number"),
    ({"model": ""}, "'model' = '': string should have at least 1 character"),
    ({"model": f"m{NL}x"}, "'model' = 'm\\nx': contains control character(s) '\\n'"),
    ({"model": 70}, "'model' = 70: input should be a valid string"),
    ({"served_model_name": "a\rb"}, "'served_model_name' = 'a\\rb': contains control character(s) '\\r'"),
    ({"nats_user": "dis agg"}, "'nats_user' = 'dis agg': string should match pattern"),
    ({"nats_user": f"u{NL}}}"}, "'nats_user' = 'u\\n}': contains control"),
    ({"nats_password": f"p{NL}X=1"}, "'nats_password' = <secret>: contains control character(s) '\\n'"),
    ({"hf_token": f"tok{NL}LD_PRELOAD=/x.so"}, "'hf_token' = <secret>: contains control character(s) '\\n'"),
    ({"hf_token": 123}, "'hf_token' = <secret>: input should be a valid string"),
    (
        {"vllm_package": f"vllm==0.32.0{NL}--index-url http://evil"},
        "'vllm_package' = 'vllm==0.32.0\\n--index-url http://evil': contains",
    ),
    ({"nixl_packages": "nixl"}, "'nixl_packages' = 'nixl': input should be a valid tuple"),
    ({"install_nvidia_driver": "no"}, "'install_nvidia_driver' = 'no': input should be a valid boolean"),
    ({"nvidia_driver_branch": 580.5}, "'nvidia_driver_branch' = 580.5: input should be a valid integer"),
    ({"nvidia_driver_branch": 12}, "'nvidia_driver_branch' = 12: input should be greater than or equal to 400"),
    ({"router_retry_max_retries": -1}, "'router_retry_max_retries' = -1: input should be greater than or equal to 0"),
    (
        {"router_cb_timeout_duration_secs": 0},
        "'router_cb_timeout_duration_secs' = 0: input should be greater than or equal to 1",
    ),
    ({"wheelhouse": f"/x{NL}"}, "'wheelhouse' = '/x\\n': contains control"),
    ({"address": f"10.0.0.1{NL}Evil=1"}, "'address' = '10.0.0.1\\nEvil=1': contains control"),
    ({"ucx_net_devices": "eth0\t"}, "'ucx_net_devices' = 'eth0\\t': contains control character(s) '\\t'"),
    (
        {"gpu_memory_utilisation": 0.9},
        "'gpu_memory_utilisation' = 0.9: unknown key; did you mean 'gpu_memory_utilization'?",
    ),
    ({"max_model_length": 4096}, "'max_model_length' = 4096: unknown key; did you mean 'max_model_len'?"),
    ({"router_polcy": "round_robin"}, "'router_polcy' = 'round_robin': unknown key; did you mean 'router_policy'?"),
    (
        {"label": f"context_tp2dp4_generate_tp8dp1{NL}"},
        "'label' = 'context_tp2dp4_generate_tp8dp1\\n': contains control",
    ),
    ({"api_key": f"k{NL}LD_PRELOAD=/x.so"}, "'api_key' = <secret>: contains control character(s) '\\n'"),
    ({"api_key": 42}, "'api_key' = <secret>: input should be a valid string"),
    ({"firewall": "off"}, "'firewall' = 'off': input should be a valid boolean"),
    (
        {"firewall_allow": ["10.0.0.0/8", "admin-laptop"]},
        "'firewall_allow[1]' = 'admin-laptop': is not an IP address or network (CIDR); list the addresses",
    ),
    ({"firewall_allow": "10.0.0.5"}, "'firewall_allow' = '10.0.0.5': input should be a valid tuple"),
    ({"firewal": False}, "'firewal' = False: unknown key; did you mean 'firewall'?"),
    # its copy would be MODELS_DIR itself (pruning every other model) or the hub models' tree
    ({"model_dir": "/"}, "'model_dir' = '/': its copy on the hosts is named after it: name a directory other than /"),
    ({"model_dir": "/srv/hub"}, "'model_dir' = '/srv/hub': its copy on the hosts is named after it"),
]


@pytest.mark.parametrize("data, says", BAD_DATA, ids=[str(i) for i in range(len(BAD_DATA))])
def test_bad_data_is_one_line_naming_key_value_and_fix(data, says):
    problems = check_inventory(load_inventory(H100, override_data=data))
    assert problems == [f"all hosts: inventory data {says}" + problems[0].split(says, 1)[-1]], problems
    with pytest.raises(SchemaError):
        make_plan(load_inventory(H100, override_data=data))


def test_pyinfra_keys_and_unrelated_keys_pass():
    data = {"ssh_port": 2222, "_sudo": True, "rack": "r12", "owner_team": "serving"}
    assert check_inventory(load_inventory(H100, override_data=data)) == []


def test_secrets_are_never_printed_in_errors():
    problems = check_inventory(load_inventory(H100, override_data={"hf_token": "hf_s3cret\n", "nats_password": 7}))
    assert len(problems) == 2 and not any("s3cret" in p or "= 7" in p for p in problems)


SHAPES = {
    "stray host": (
        'context = [("a", {"gpus": 8})]\ngenerate = [("b", {"gpus": 8})]\nspare = [("c", {"gpus": 8})]\n'
        'all = (["a", "b", "c"], {"model": "m", "label": "context_tp1dp1_generate_tp1dp1"})\n',
        ["c: inventory data 'groups' = ['spare', "],
    ),
    "listed twice": (
        'context = [("a", {"gpus": 8}), ("a", {"gpus": 4})]\ngenerate = [("b", {"gpus": 8})]\n'
        'all = (["a", "b"], {"model": "m", "label": "context_tp1dp1_generate_tp1dp1"})\n',
        ["a: inventory data 'groups' = 'context': listed 2 times in group 'context'"],
    ),
    "gpus differ by group": (
        'context = [("a", {"gpus": 8})]\ngenerate = [("a", {"gpus": 4})]\n'
        'all = (["a"], {"model": "m", "label": "context_tp1dp1_generate_tp1dp1"})\n',
        ["a: inventory data 'gpus' = {'context': 8, 'generate': 4}: differs between the groups"],
    ),
    "per-host setting": (
        'context = [("a", {"gpus": 8})]\ngenerate = [("b", {"gpus": 8, "max_model_len": 4096})]\n'
        'all = (["a", "b"], {"model": "m", "label": "context_tp1dp1_generate_tp1dp1"})\n',
        ["b: inventory data 'max_model_len' = 4096: differs from the head's (a: None)"],
    ),
    "gpus missing": (
        'context = ["a"]\ngenerate = [("b", {"gpus": 8})]\n'
        'all = (["a", "b"], {"model": "m", "label": "context_tp1dp1_generate_tp1dp1"})\n',
        ["a: inventory data 'gpus' = None: missing"],
    ),
    "all at once": (
        'context = [("a", {"gpus": 8.5})]\ngenerate = [("b", {"gpus": True, "ucx_net_device": "eth0"})]\n'
        'all = (["a", "b"], {"model": "m", "label": "context_tp1dp1_generate_tp1dp1", "max_model_len": -1})\n',
        [
            "all hosts: inventory data 'max_model_len' = -1",
            "a: inventory data 'gpus' = 8.5",
            "b: inventory data 'gpus' = True",
            "b: inventory data 'ucx_net_device' = 'eth0': unknown key",
        ],
    ),
}


@pytest.mark.parametrize("case", SHAPES)
def test_inventory_shape_errors(case, tmp_path):
    text, starts = SHAPES[case]
    # pyinfra caches inventory code by file name: one file per case
    path = tmp_path / f"{case.replace(' ', '_').replace('-', '_')}.py"
    path.write_text(text)
    result = CliRunner().invoke(main, ["check", "-i", str(path)])
    lines = result.output.splitlines()
    assert result.exit_code == 1 and len(lines) == len(starts), result.output
    assert all(any(line.startswith(s) for line in lines) for s in starts), result.output
    assert "Traceback" not in result.output


def test_check_passes_the_shipped_inventories():
    for path in ("inventories/h100.py", "inventories/local.py"):
        result = CliRunner().invoke(main, ["check", "-i", path, "--json"])
        assert result.exit_code == 0 and '"ok": true' in result.output, result.output


@pytest.mark.parametrize("data", [{"gpus": True}, {"hf_token": "t\nLD_PRELOAD=/x.so"}, {"extra_args": [None]}])
def test_a_deploy_with_bad_data_touches_no_host(data):
    # raised as pyinfra's own error, which its CLI prints as one line
    with pytest.raises(PyinfraError) as e:
        plan_deploy(H100, "deploys/disagg.py", data=data, responses=gpu_host_responses())
    assert isinstance(e.value.__cause__, SchemaError)
    for host in NODES:
        assert e.value.planned.executed(host) == [] and e.value.planned.ops(host) == []
