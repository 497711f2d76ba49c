import pytest

from disagg.core.errors import InventoryError
from disagg.core.topology import Cluster, Host, Ports, Topology, place


def cluster(groups: dict[str, list[str]], gpus: dict[str, int], head: str | None = None) -> Cluster:
    hosts = tuple(Host(n, f"10.0.0.{i + 1}", g) for i, (n, g) in enumerate(gpus.items()))
    return Cluster(hosts, {k: tuple(v) for k, v in groups.items()}, head or hosts[0].name)


TWO_NODES = cluster({"context": ["n1"], "generate": ["n2"]}, {"n1": 8, "n2": 8})


@pytest.mark.parametrize(
    "label",
    [
        "context_tp2dp4_generate_tp8dp1",
        "context_tp1dp1_generate_tp1dp1",
        "baseline_tp4dp2",
        "context_tp16dp10_generate_tp4dp12",
        "baseline_tp1dp1",
    ],
)
def test_label_round_trips(label):
    topology = Topology.parse(label)
    assert topology.label == label
    assert Topology.parse(topology.label) == topology


def test_label_fields():
    t = Topology.parse("context_tp2dp4_generate_tp8dp1")
    assert t.disaggregated
    assert (t.stage("context").tp, t.stage("context").dp) == (2, 4)
    assert (t.stage("generate").tp, t.stage("generate").dp) == (8, 1)
    assert t.gpus == 16
    b = Topology.parse("baseline_tp4dp2")
    assert not b.disaggregated and b.gpus == 8


@pytest.mark.parametrize(
    "label",
    [
        "",
        "context_tp2dp4",
        "generate_tp8dp1_context_tp2dp4",
        "baseline_tp4",
        "baseline_tp4dp2_",
        "context_tp02dp4_generate_tp8dp1",
        "context_tpXdp4_generate_tp8dp1",
        "Baseline_tp4dp2",
    ],
)
def test_malformed_labels(label):
    with pytest.raises(InventoryError, match="malformed: expected context_tp<T>dp<D>_generate"):
        Topology.parse(label)


@pytest.mark.parametrize(
    "label, message",
    [
        ("context_tp2dp0_generate_tp8dp1", "context dp0 is invalid, dp must be >= 1"),
        ("baseline_tp4dp0", "baseline dp0 is invalid, dp must be >= 1"),
        ("context_tp2dp4_generate_tp0dp1", "generate tp0 is invalid, tp must be >= 1"),
    ],
)
def test_zero_sizes(label, message):
    with pytest.raises(InventoryError, match=message):
        Topology.parse(label)


def test_reference_placement():
    workers = place(Topology.parse("context_tp2dp4_generate_tp8dp1"), TWO_NODES)
    context = [w for w in workers if w.role == "context"]
    assert [w.gpus for w in context] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert {w.host for w in context} == {"n1"}
    assert [w.unit for w in context] == [f"disagg-context-{i}" for i in range(4)]
    (gen,) = [w for w in workers if w.role == "generate"]
    assert (gen.host, gen.gpus, gen.unit) == ("n2", tuple(range(8)), "disagg-generate-0")
    # every port of ours is distinct per host, NIXL blocks included
    for host in ("n1", "n2"):
        ports = [p for w in workers if w.host == host for p in (w.http_port, *w.nixl_ports)]
        assert len(ports) == len(set(ports))
    assert len({w.http_port for w in context}) == 4
    assert gen.url == "http://10.0.0.2:8100"


def test_one_host_in_both_groups_shares_its_gpus():
    one = cluster({"context": ["n1"], "generate": ["n1"]}, {"n1": 8})
    workers = place(Topology.parse("context_tp2dp2_generate_tp4dp1"), one)
    assert [(w.role, w.gpus) for w in workers] == [("context", (0, 1)), ("context", (2, 3)), ("generate", (4, 5, 6, 7))]
    assert len({w.http_port for w in workers}) == 3
    with pytest.raises(InventoryError, match="generate_tp8dp1 needs 1 groups of 8 GPUs"):
        place(Topology.parse("context_tp2dp2_generate_tp8dp1"), one)


def test_dp_spills_over_hosts_of_a_group():
    two = cluster({"context": ["a", "b"], "generate": ["c"]}, {"a": 4, "b": 4, "c": 8})
    workers = place(Topology.parse("context_tp2dp4_generate_tp8dp1"), two)
    assert [(w.host, w.gpus, w.http_port) for w in workers if w.role == "context"] == [
        ("a", (0, 1), 8100),
        ("a", (2, 3), 8101),
        ("b", (0, 1), 8100),
        ("b", (2, 3), 8101),
    ]


def test_baseline_defaults_to_context_hosts_and_honours_its_group():
    workers = place(Topology.parse("baseline_tp4dp2"), TWO_NODES)
    assert [(w.host, w.gpus, w.unit) for w in workers] == [
        ("n1", (0, 1, 2, 3), "disagg-baseline-0"),
        ("n1", (4, 5, 6, 7), "disagg-baseline-1"),
    ]
    grouped = cluster({"context": ["n1"], "generate": ["n2"], "baseline": ["n2"]}, {"n1": 8, "n2": 8})
    assert {w.host for w in place(Topology.parse("baseline_tp4dp2"), grouped)} == {"n2"}


def test_tp_larger_than_a_host():
    with pytest.raises(InventoryError) as e:
        place(Topology.parse("context_tp2dp4_generate_tp16dp1"), TWO_NODES)
    message = str(e.value)
    assert "generate tp16" in message and "at most 8 GPUs per host" in message
    assert "\n" not in message


def test_not_enough_gpus_in_group():
    with pytest.raises(
        InventoryError,
        match=r"context_tp2dp8 needs 8 groups of 2 GPUs \(16 GPUs\) "
        r"in group 'context', which has room for 4.*add hosts to group 'context'",
    ):
        place(Topology.parse("context_tp2dp8_generate_tp8dp1"), TWO_NODES)


def test_empty_group():
    no_generate = cluster({"context": ["n1"]}, {"n1": 8})
    with pytest.raises(InventoryError, match="group 'generate' has no hosts; add the hosts"):
        place(Topology.parse("context_tp2dp4_generate_tp8dp1"), no_generate)


@pytest.mark.parametrize(
    "ports, clash",
    [
        (Ports(http_base=8000), "8000 is both router_port and context-0 http_port"),
        (Ports(http_base=5601), "5601 is both context-0 http_port and context-0 nixl_port"),
        (Ports(nats=5603), "5603 is both nats_port and context-1 nixl_port"),
    ],
)
def test_port_clash(ports, clash):
    with pytest.raises(InventoryError, match=f"port clash on host 'n1': {clash}; change"):
        place(Topology.parse("context_tp2dp4_generate_tp8dp1"), TWO_NODES, ports)


def test_port_out_of_range():
    with pytest.raises(InventoryError, match="port 65536 of context-1 http_port .* out of range"):
        place(Topology.parse("context_tp2dp4_generate_tp8dp1"), TWO_NODES, Ports(http_base=65535))


def test_no_port_of_ours_inside_ucx_range_on_a_worker_host():
    with pytest.raises(
        InventoryError,
        match=r"port clash on host 'n1': 20500 of context-0 http_port is inside "
        r"UCX's port range 20000-20999; change ucx_port_base",
    ):
        place(Topology.parse("context_tp2dp4_generate_tp8dp1"), TWO_NODES, Ports(http_base=20500))
    # moved away, or an aggregated layout (no UCX): fine
    place(Topology.parse("context_tp2dp4_generate_tp8dp1"), TWO_NODES, Ports(http_base=20500, ucx_base=40000))
    place(Topology.parse("baseline_tp4dp2"), TWO_NODES, Ports(http_base=20500))
    with pytest.raises(InventoryError, match="UCX's port range 65000-65999 is out of 1..65535"):
        place(Topology.parse("context_tp2dp4_generate_tp8dp1"), TWO_NODES, Ports(ucx_base=65000))
