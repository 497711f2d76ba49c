"""Preflight's decisions on output captured from real hosts: a test host's
answers to PreflightFacts (listeners with their units, free disk, the tiny
model's config, the engine version) and the H200's nvidia-smi."""

from __future__ import annotations

from pathlib import Path

from fakehosts import fixture_output

from disagg.core import settings as S
from disagg.core.plan import make_plan
from disagg.infra import preflight
from disagg.infra.facts import PreflightFacts, parse_passwd, parse_query_gpu
from disagg.infra.inventory import load_inventory

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
H1, H2 = "10.213.0.11", "10.213.0.12"


def local_plan(label=None):
    return make_plan(load_inventory(str(ROOT / "inventories/local.py")), label)


def h100_plan(label=None):
    return make_plan(load_inventory(str(ROOT / "inventories/h100.py")), label)


def captured() -> dict:
    lines = (FIXTURES / "testhost" / "preflight-facts-h1.txt").read_text().splitlines()
    return PreflightFacts().process(lines)


def test_a_deployed_layout_listens_on_its_ports_and_that_is_fine():
    facts = captured()
    listeners = preflight.parse_listeners(facts["listeners"])
    nats = next(x for x in listeners if x["port"] == 4222)
    assert nats == {
        "address": H1,
        "port": 4222,
        "pid": nats["pid"],
        "unit": "disagg-nats.service",
        "process": "nats-server",
    }
    assert preflight.check_ports(local_plan(), H1, listeners) == []
    assert facts["versions"] == {"vllm": "0.32.0", "nixl": None}
    assert facts["config"]["num_attention_heads"] == 2
    assert facts["free"]["/opt/disagg"] > 0 and facts["gpus"] == [] and facts["pci_gpus"] == 0


def test_a_foreign_listener_on_a_worker_port_is_named_with_its_process():
    foreign = [
        '10.213.0.12:8100 4242 - users:(("python3",pid=4242,fd=3))',
        '0.0.0.0:5600 977 ssh.service users:(("sshd",pid=977,fd=3))',
    ]
    problems = preflight.check_ports(local_plan(), H2, preflight.parse_listeners(foreign))
    assert [p.line() for p in problems] == [
        f"{H2}: port 8100: python3 (pid 4242) listens on {H2}:8100, which generate-0 http_port needs; stop it, "
        "or move our ports (http_port_base, nixl_port_base or the service port)",
        f"{H2}: port 5600: sshd (pid 977, unit ssh.service) listens on 0.0.0.0:5600, which generate-0 NIXL side "
        "channel needs; stop it, or move our ports (http_port_base, nixl_port_base or the service port)",
    ]


def test_gpus_counted_on_the_host_cpu_hosts_skipped_with_the_reason():
    h200 = parse_query_gpu(fixture_output("query-gpu.txt"))
    (problem,), skipped = preflight.check_gpus("h100-node2", 8, h200, 1)
    assert problem.line() == (
        "h100-node2: gpus: the inventory says 8 but the host has 1 NVIDIA GPUs; set gpus: 1 for this host"
    )
    assert preflight.check_gpus("h100-node2", 1, h200, 1) == ([], None)
    # before the driver: the PCI bus counts them
    assert preflight.check_gpus("n", 8, [], 8) == ([], None)
    problems, skipped = preflight.check_gpus(H1, 2, [], 0)
    assert problems == [] and "no NVIDIA GPU on the PCI bus" in skipped


def test_one_driver_branch_on_every_gpu_host():
    assert preflight.check_driver_branches({"a": "580.159.04", "b": "580.95.05"}) == []
    (problem,) = preflight.check_driver_branches({"a": "580.159.04", "b": "570.1", "c": "580.1"})
    assert problem.host == "b" and "install branch 580 here" in problem.line()


def test_model_heads_against_each_roles_tp_and_the_nixl_tp_mix():
    config = {"num_attention_heads": 64, "num_key_value_heads": 8}
    assert preflight.check_model(h100_plan(), config, "m")[0] == []  # tp2 and tp8
    problems, _ = preflight.check_model(h100_plan("context_tp3dp2_generate_tp8dp1"), config, "m")
    assert [p.field for p in problems] == ["context tp", "label"]
    assert "context tp3 does not divide the model's 64 attention heads" in problems[0].line()
    assert "one is a multiple of the other" in problems[1].line()
    # more ranks than KV heads: vLLM replicates them when tp is a multiple
    assert preflight.check_model(h100_plan(), {"num_attention_heads": 16, "num_key_value_heads": 4}, "m")[0] == []
    problems, skipped = preflight.check_model(h100_plan(), None, "HF cache")
    assert problems == [] and "not readable (HF cache)" in skipped


def test_disk_and_versions():
    (disk,) = preflight.check_disk("h", {"/opt/disagg": 2 * preflight.GiB}, {"/opt/disagg": 5 * preflight.GiB})
    assert disk.line() == "h: disk /opt/disagg: 2.0 GiB free, 5.0 GiB needed; free space under /opt/disagg"
    versions = {
        "a": {"vllm": "0.32.0", "nixl": "1.5.1"},
        "b": {"vllm": "0.32.0", "nixl": "1.5.1"},
        "c": {"vllm": "0.31.0", "nixl": None},
    }
    (problem,) = preflight.check_versions(versions)
    assert (
        problem.line() == "c: vllm: vllm 0.31.0 here, 0.32.0 on the other worker hosts; install vllm==0.32.0 "
        "(vllm_package / nixl_packages)"
    )


def test_every_generate_host_must_reach_every_context_side_channel():
    pairs = preflight.side_channels(h100_plan())
    assert [(g, w.name, w.nixl_port) for g, w in pairs] == [
        ("h100-node2", f"context-{i}", 5600 + 2 * i) for i in range(4)
    ]
    assert preflight.side_channels(h100_plan("baseline_tp4dp2")) == []


def test_an_account_of_our_name_that_someone_else_made_is_named():
    accounts = dict(
        map(
            parse_passwd,
            [
                f"disagg:x:998:998:{S.ACCOUNT_COMMENT}:/var/lib/disagg:/usr/sbin/nologin",  # ours
                "disagg-nats:x:997:997::/var/lib/disagg/nats:/usr/sbin/nologin",  # as releases before the GECOS made it
                "disagg-router:x:1001:1001:Jane Doe,,,:/home/jane:/bin/bash",  # a person's
            ],
        )
    )
    assert [p.line() for p in preflight.check_accounts(H1, accounts)] == [
        f"{H1}: user disagg-router: exists and is not disagg's (GECOS 'Jane Doe,,,', shell /bin/bash); disagg never "
        "takes over an account: rename or remove it"
    ]
