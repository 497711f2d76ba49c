"""scripts/uv_install.py: pip's configuration, as pip itself lists it, handed
to uv (the real `pip config list` of this venv, fed by a config file and PIP_*
variables)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("uv_install", ROOT / "scripts" / "uv_install.py")
uv_install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(uv_install)


@pytest.fixture
def pip_env(monkeypatch, tmp_path):
    """A pip configured only by what a test writes: a config file and PIP_* variables."""
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    conf = tmp_path / "pip.conf"
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    return conf


def _listing():
    return subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], check=True, capture_output=True, text=True
    ).stdout


def _pairs(flags, flag):
    return [flags[i + 1] for i, f in enumerate(flags) if f == flag]


def test_indexes_wheels_constraints_and_cert_reach_uv_with_pips_precedence(pip_env, monkeypatch):
    pip_env.write_text(
        "[global]\nindex-url = https://mirror.example/simple\n"
        "extra-index-url =\n    file:///srv/a/simple\n    file:///srv/b/simple\n"
        "find-links = /from/global\ncert = /etc/site-ca.pem\n"
        "[install]\nfind-links = /from/install\n[download]\nno-index = true\n"
    )
    monkeypatch.setenv("PIP_CONSTRAINT", "/etc/caps.txt")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    flags, env = uv_install.uv_options(uv_install.settings(_listing()))
    assert _pairs(flags, "--index-url") == ["https://mirror.example/simple"]
    assert _pairs(flags, "--extra-index-url") == ["file:///srv/a/simple", "file:///srv/b/simple"]
    assert _pairs(flags, "--find-links") == ["/from/install"]  # [install] over [global]
    assert _pairs(flags, "--constraint") == ["/etc/caps.txt"]
    assert "--no-index" not in flags  # [download] is not `pip install`'s
    assert _pairs(flags, "--index-strategy") == ["unsafe-best-match"]  # pip's choice across indexes
    assert env == {"SSL_CERT_FILE": "/etc/site-ca.pem"}

    monkeypatch.setenv("PIP_FIND_LINKS", "/from/env")
    flags, _ = uv_install.uv_options(uv_install.settings(_listing()))
    assert _pairs(flags, "--find-links") == ["/from/env"]  # PIP_* over any file

    monkeypatch.setenv("PIP_PROXY", "http://proxy.example:3128")
    _, env = uv_install.uv_options(uv_install.settings(_listing()))
    assert env["HTTPS_PROXY"] == env["HTTP_PROXY"] == "http://proxy.example:3128"


def test_a_setting_uv_cannot_take_falls_back_to_pip_before_anything_is_installed(pip_env, monkeypatch, capsys):
    monkeypatch.setenv("PIP_REQUIRE_HASHES", "1")
    assert uv_install.main(["-e", "."]) == uv_install.FALLBACK
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "require-hashes" in err and "pip" in err


def test_uv_is_pinned_where_the_hosts_is():
    from disagg.core.settings import PINS

    assert uv_install.uv_pin() == PINS["uv_package"]
