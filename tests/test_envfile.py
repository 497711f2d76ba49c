"""Env files as systemd and the agent read them, and the NATS server's
password: any printable value reads back as written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from disagg.agent import envfile, kv
from disagg.core import units
from disagg.infra.facts import EnvFileValue

# the ones that broke a deploy (nats-server read them as a number or a list), and the quoting characters
NASTY = [
    "123456",
    "x y",
    "12 34;x",
    'a"b\\c',
    "$HOME",
    "`id`",
    "it's",
    "  padded  ",
    "#not a comment",
    "ünï",
    "1e5",
    "true",
]


def test_plain_values_stay_unquoted():
    assert envfile.quote("0,1") == "0,1" and envfile.text({"A": "hf_x-1.2"}) == "A=hf_x-1.2\n"
    assert envfile.quote('a "b"') == '"a \\"b\\""'


@pytest.mark.parametrize("value", NASTY)
def test_a_value_reads_back_as_written(value, tmp_path):
    text = envfile.text({kv.PASSWORD_ENV: value, "OTHER": "x"})
    assert envfile.value(text.splitlines(), kv.PASSWORD_ENV) == value
    (tmp_path / "nats.env").write_text(text)
    assert kv.read_password(str(tmp_path / "nats.env")) == value
    # the fact that reads the head's current password (sed prints the value as it stands)
    line = text.splitlines()[0].removeprefix(f"{kv.PASSWORD_ENV}=")
    assert EnvFileValue().process([line]) == value
    # POSIX sh reads the same four escapes in double quotes (roles/model.py sources the HF token file)
    shell = subprocess.run(
        ["sh", "-c", f'set -a; . "{tmp_path / "nats.env"}"; printf %s "${kv.PASSWORD_ENV}"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout == value


def test_a_bare_password_file_and_an_older_unquoted_line_read_literally(tmp_path):
    bare = tmp_path / "password"
    bare.write_text("pw with spaces\n")
    assert kv.read_password(str(bare)) == "pw with spaces"
    old = tmp_path / "nats.env"
    old.write_text(f"{kv.PASSWORD_ENV}=0123abcd\n")
    assert kv.read_password(str(old)) == "0123abcd"


def test_the_nats_server_takes_any_printable_password(tmp_path):
    server = Path(sys.executable).parent / "nats-server"
    for value in NASTY:
        (tmp_path / "auth.conf").write_text(units.nats_auth_text("disagg", value))
        conf = tmp_path / "nats.conf"
        conf.write_text('listen: "127.0.0.1:4222"\ninclude "auth.conf"\n')
        checked = subprocess.run([str(server), "-c", str(conf), "-t"], capture_output=True, text=True)
        assert checked.returncode == 0, (value, checked.stderr)
        (line,) = [line for line in units.nats_auth_text("u", value).splitlines() if '"user": "u"' in line]
        assert json.loads(line.strip().rstrip(",")) == {"user": "u", "password": value}
