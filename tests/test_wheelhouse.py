"""One wheelhouse per host platform: the platform read from each host,
wheels fetched by the controller's real pip for that platform (a local
index of fixture wheels, and once the package registry itself), a pin
without a wheel for a host named by preflight."""

import zipfile
from pathlib import Path

import pytest
from fakehosts import plan_deploy

from disagg.core import settings as S
from disagg.core.plan import make_plan
from disagg.infra import preflight, wheelhouse
from disagg.infra.facts import PreflightFacts
from disagg.infra.inventory import load_inventory
from disagg.infra.wheelhouse import Platform, parse_platform

# facts.PLATFORM_COMMAND as the Debian 12 test hosts answered it
DEBIAN12_X86 = "x86_64 3.11 2.36"
# Ubuntu 24.04 on a Grace host (GH200): noble's python3 and glibc, on aarch64
NOBLE_ARM = "aarch64 3.12 2.39"
NATIVE, PURE = "disagg-fixture-native==1.0", "disagg-fixture-pure==1.0"


def test_a_hosts_platform_from_its_fact_line():
    assert parse_platform(DEBIAN12_X86) == Platform("x86_64", "3.11", "2.36")
    assert parse_platform(NOBLE_ARM + "\n") == Platform("aarch64", "3.12", "2.39")
    for line in ("x86_64 - 2.36", "aarch64 3.12 -", "", "x86_64 3 2.36"):
        assert parse_platform(line) is None, line
    # the same line inside preflight's one round trip
    facts = PreflightFacts().process(["### platform", NOBLE_ARM])
    assert facts["platform"] == Platform("aarch64", "3.12", "2.39")


def test_the_platform_tags_pip_is_given_cover_every_glibc_the_host_runs():
    tags = Platform("aarch64", "3.12", "2.39").tags()
    assert tags[0] == "manylinux_2_39_aarch64" and tags[-1] == "linux_aarch64"
    assert {"manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_5_aarch64"} <= set(tags)
    assert not any("x86_64" in t or "manylinux_2_40" in t for t in tags)
    flags = Platform("x86_64", "3.11", "2.36").pip_flags()
    assert flags[:5] == ["--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11"]
    assert flags.count("--platform") == len(Platform("x86_64", "3.11", "2.36").tags())


def _wheel(directory: Path, name: str, version: str, tag: str) -> None:
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}/__init__.py": "",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: {tag}\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(directory / f"{dist}-{version}-{tag}.whl", "w") as z:
        for n, text in files.items():
            z.writestr(n, text)


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A find-links index holding a pure wheel and a native one for
    x86_64/cp311 only; pip reads it alone (no config, no package index)."""
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, "disagg-fixture-pure", "1.0", "py3-none-any")
    _wheel(index, "disagg-fixture-native", "1.0", "cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def test_each_platform_gets_its_own_wheels_and_a_missing_one_is_named(local_index, tmp_path):
    house = str(tmp_path / "house")
    x86 = wheelhouse.ensure(house, [NATIVE, PURE], parse_platform(DEBIAN12_X86))
    assert sorted(p.name for p in x86.glob("*.whl")) == [
        "disagg_fixture_native-1.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "disagg_fixture_pure-1.0-py3-none-any.whl",
    ]
    with pytest.raises(wheelhouse.WheelhouseError) as e:
        wheelhouse.ensure(house, [NATIVE, PURE], parse_platform(NOBLE_ARM))
    assert e.value.package == NATIVE and "aarch64, Python 3.12, glibc 2.39" in str(e.value)
    # the same set for another platform is another directory; a finished one is not fetched again
    assert wheelhouse.directory_for(house, [NATIVE, PURE], parse_platform(NOBLE_ARM)) != x86
    (local_index / "disagg_fixture_pure-1.0-py3-none-any.whl").unlink()
    assert wheelhouse.ensure(house, [NATIVE, PURE], parse_platform(DEBIAN12_X86)) == x86


def _fixture_pins(tmp_path) -> dict:
    """Every pin of S.PINS on a fixture wheel, the engine's on the native one."""
    pins = {key: [PURE] if isinstance(value, list) else PURE for key, value in S.PINS.items()}
    return {**pins, "vllm_package": NATIVE, "wheelhouse": str(tmp_path / "house")}


def test_preflight_names_the_host_whose_platform_has_no_wheel_for_a_pin(local_index, tmp_path):
    plan = make_plan(load_inventory("inventories/h100.py"))
    data = {name: _fixture_pins(tmp_path) for name in ("h100-node1", "h100-node2")}
    platforms = {
        "h100-node1": PreflightFacts().process(["### platform", DEBIAN12_X86])["platform"],
        "h100-node2": PreflightFacts().process(["### platform", NOBLE_ARM])["platform"],
    }
    problems = preflight.check_wheels(plan, data, platforms)
    assert [p.line() for p in problems] == [
        f"h100-node2: wheels: no wheel of {NATIVE} (for {NATIVE}) for its platform (aarch64, Python 3.12, "
        "glibc 2.39); pin a release with one in data 'vllm_package', add one to your package index, or deploy "
        "this host without data 'wheelhouse'"
    ]
    # a host without python3 cannot say its platform
    problems = preflight.check_wheels(plan, data, {**platforms, "h100-node2": None})
    assert [(p.host, p.field) for p in problems] == [("h100-node2", "platform")]
    # without a wheelhouse, hosts install from their index: nothing to fetch here
    assert preflight.check_wheels(plan, {n: {} for n in data}, {n: None for n in data}) == []


def test_each_host_installs_from_the_wheelhouse_of_its_own_platform(local_index, tmp_path):
    """The deploy planned on two hosts, an x86_64 one and an aarch64 one
    (their platform facts answered), every pin with a wheel for both."""
    _wheel(local_index, "disagg-fixture-native", "1.0", "cp312-cp312-manylinux_2_28_aarch64")
    pins = _fixture_pins(tmp_path)
    inventory = tmp_path / "inventory.py"
    inventory.write_text(
        f"context = [('x86-node', {{'gpus': 8, 'address': '10.0.0.1', 'fake_responses': {{'getconf GNU_LIBC_VERSION': [{DEBIAN12_X86!r}]}}}})]\n"
        f"generate = [('arm-node', {{'gpus': 8, 'address': '10.0.0.2', 'fake_responses': {{'getconf GNU_LIBC_VERSION': [{NOBLE_ARM!r}]}}}})]\n"
        f"all = (['x86-node', 'arm-node'], {{'label': 'context_tp2dp4_generate_tp8dp1', 'model': 'm', "
        f"'install_nvidia_driver': False, 'preflight': False, **{pins!r}}})\n"
    )
    planned = plan_deploy(str(inventory), "deploys/disagg.py")
    for host, line in (("x86-node", DEBIAN12_X86), ("arm-node", NOBLE_ARM)):
        local = wheelhouse.directory_for(pins["wheelhouse"], [NATIVE], parse_platform(line))
        remote = f"/opt/disagg/wheelhouse/{local.name}"
        assert any(f"--no-index --find-links {remote} {NATIVE}" in c for c in planned.commands(host))
        assert any(n.endswith(f"Push wheels of {NATIVE}") for n, _ in planned.ops(host))
        native = [p.name for p in local.glob("*.whl")]
        assert native == [
            f"disagg_fixture_native-1.0-{'cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64' if host == 'x86-node' else 'cp312-cp312-manylinux_2_28_aarch64'}.whl"
        ]


def test_the_host_agents_wheels_for_aarch64_and_python_3_12_from_the_package_registry(tmp_path):
    """A real download from the registry this machine reaches (its pip
    configuration), for a platform this controller is not."""
    agent = S.PINS["agent_packages"]
    path = wheelhouse.ensure(str(tmp_path), agent, parse_platform(NOBLE_ARM))
    names = sorted(p.name for p in path.glob("*.whl"))
    for pin in agent:
        project, version = pin.split("==")
        (wheel,) = [n for n in names if n.lower().startswith(f"{project.replace('-', '_').lower()}-{version}-")]
        tags = wheel.removesuffix(".whl").split("-")[-3:]
        assert tags[0] in ("cp312", "py3", "py2.py3") and (tags[2] == "any" or "aarch64" in tags[2]), wheel
    assert any("aarch64" in n for n in names)  # pyzmq and msgpack are native
