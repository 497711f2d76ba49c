"""The tar-stream push (disagg/roles/transfer.py): its `tar -x` wrapped by
pyinfra's own command builder, so a sudo login (and pyinfra's other
privilege arguments) extracts as root; the stream carries exactly the
files asked for. The channel is the one stand-in: what the SSH connection
would carry is recorded and extracted by the real tar."""

import io
import subprocess
import tarfile
from types import SimpleNamespace

import pytest

from disagg.roles.transfer import TarStream


class Channel:
    def __init__(self, rc: int = 0):
        self.command, self.data, self.rc = None, io.BytesIO(), rc

    def exec_command(self, command: str) -> None:
        self.command = command

    def sendall(self, data: bytes) -> None:
        self.data.write(data)

    def shutdown_write(self) -> None:
        pass

    def recv_exit_status(self) -> int:
        return self.rc

    def makefile_stderr(self, mode):
        return io.BytesIO(b"tar: .complete: Cannot open: Permission denied")


def _host(channel: Channel):
    transport = SimpleNamespace(open_session=lambda: channel)
    client = SimpleNamespace(get_transport=lambda: transport)
    logged = []
    return SimpleNamespace(
        name="h1",
        connector=SimpleNamespace(client=client),
        connector_data={},
        log_styled=lambda text, **kw: logged.append(text),
        logged=logged,
    )


@pytest.mark.parametrize(
    "arguments, prefix",
    [
        ({}, "sh -c "),
        ({"_sudo": True}, "sudo -H -n sh -c "),
        ({"_sudo": True, "_sudo_user": "disagg"}, "sudo -H -n -u disagg sh -c "),
        ({"_doas": True}, "doas -n sh -c "),
    ],
)
def test_the_stream_extracts_as_the_operation_runs_its_commands(tmp_path, arguments, prefix):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.whl").write_bytes(b"A" * 1000)
    (src / "sub" / "b.json").write_text("{}")
    (src / "not-asked").write_text("x")
    channel = Channel()
    host = _host(channel)
    # pyinfra passes every connector argument it has, control ones included
    assert TarStream(str(src), ["a.whl", "sub/b.json"], "/var/lib/disagg/models/m").execute(
        None, host, {"_timeout": 30, "_success_exit_codes": [0], **arguments}
    )
    assert channel.command == f"{prefix}'tar -x --no-same-owner -C /var/lib/disagg/models/m'"
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-x", "-C", str(out)], input=channel.data.getvalue(), check=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["a.whl", "sub/b.json"]
    assert (out / "a.whl").read_bytes() == b"A" * 1000
    with tarfile.open(fileobj=io.BytesIO(channel.data.getvalue())) as tar:
        assert [m.name for m in tar.getmembers()] == ["a.whl", "sub/b.json"]


def test_a_failed_extract_fails_the_operation_with_tars_own_words(tmp_path):
    (tmp_path / "f").write_text("x")
    host = _host(Channel(rc=2))
    assert TarStream(str(tmp_path), ["f"], "/opt/disagg/wheelhouse/x").execute(None, host, {"_sudo": True}) is False
    assert host.logged == [
        "tar -x into /opt/disagg/wheelhouse/x failed (2): tar: .complete: Cannot open: Permission denied"
    ]
