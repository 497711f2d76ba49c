"""Pushing a directory from the controller: only the files a host lacks
(by the manifest, disagg/core/manifest.py), as one tar stream over the host's
SSH connection, verified by sha256 on the host and stamped. The stream's
`tar -x` runs as every command of the operation does (pyinfra's `_sudo`,
`_sudo_user`, `_su_user`, ... applied by pyinfra itself)."""

from __future__ import annotations

import shlex
import tarfile
from io import StringIO
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import FileUploadCommand, OperationError, QuoteString, StringCommand, operation
from pyinfra.api.command import PyinfraCommand
from pyinfra.connectors.util import extract_control_arguments, make_unix_command_for_host

from disagg.core import manifest
from disagg.infra.facts import StagedTree


@operation()
def tree_pushed(src: str, dest: str):
    """
    dest on the host = src on the controller: missing, partial or
    corrupted files pushed, others removed, all of them verified by sha256
    and a stamp written last. The tree is root's and read-only to services;
    a link or a loosened mode found in it is replaced first (a service user
    could have planted it). A no-op reads sizes and the stamp only.

    **Example:**

    .. code:: python

        tree_pushed(name="Push model", src="/models/tiny-llama", dest="/var/lib/disagg/models/tiny-llama")
    """
    wanted = manifest.of(src)
    staged = host.get_fact(StagedTree, path=dest)
    todo = manifest.changes(wanted, staged)
    if todo.none and not staged.unsafe:
        host.noop(f"{dest} matches {src} (by its stamp and sizes)")
        return
    q, stamp = shlex.quote(dest), shlex.quote(manifest.stamp_path(dest))
    yield from made_safe(dest, staged)
    # without a stamp, an interrupted push is checked file by file next time
    yield f"rm -f {stamp} && mkdir -p {q}"
    if todo.push:
        yield TarStream(src, todo.push, dest)
        sums = "".join(f"{wanted[p][1]}  {p}\n" for p in todo.push)
        yield f"cd {q} && sha256sum --quiet -c - <<'EOF'\n{sums}EOF"
    if todo.remove:
        yield f"cd {q} && rm -f -- {' '.join(map(shlex.quote, todo.remove))}"
    yield root_only(dest)
    yield FileUploadCommand(StringIO(manifest.text(wanted)), manifest.stamp_path(dest))


def not_a_directory(path: str, kind: str) -> str:
    """Removes what is at path where a directory belongs (a link a service
    planted: root never follows it), and says so."""
    logger.warning(f"{host.print_prefix}{path} is not a directory (find type {kind}): replaced")
    return f"rm -f -- {shlex.quote(path)}"


def made_safe(dest: str, staged: manifest.Staged):
    """Before root writes into dest: a link (or a file) at dest itself and
    any entry in it that is neither file nor directory removed, never
    followed; each said."""
    q = shlex.quote(dest)
    if staged.kind not in (None, "d"):
        yield not_a_directory(dest, staged.kind)
    elif staged.foreign:
        shown = ", ".join(staged.foreign[:5]) + (", ..." if len(staged.foreign) > 5 else "")
        logger.warning(f"{host.print_prefix}{dest}: {len(staged.foreign)} links or special files removed ({shown})")
        yield f"find {q} -mindepth 1 ! -type f ! -type d -delete"
    if staged.loose is not None and staged.kind == "d":
        logger.warning(
            f"{host.print_prefix}{dest}: {staged.loose} was not root's or was writable by others: "
            "made root's, read-only to services"
        )


def root_only(dest: str) -> str:
    """dest root's, readable by all and writable by root alone (links are
    neither followed nor changed)."""
    q = shlex.quote(dest)
    return f"chown -hR root:root {q} && chmod -R u=rwX,go=rX {q}"


class TarStream(PyinfraCommand):
    """src's `names` sent as one tar stream into dest over the host's SSH
    connection: 2.6x faster than pyinfra's SFTP here (166 against 64 MB/s
    for one 192 MB wheel), and one round trip instead of one per file.
    Under sudo pyinfra's own upload goes through a temp file and `cp`;
    here sudo (or su, doas) wraps `tar -x` as it wraps any command."""

    def __init__(self, src: str, names: list[str], dest: str):
        super().__init__()
        self.src, self.names, self.dest = src, names, dest

    def __repr__(self) -> str:
        return f"TarStream({self.src} -> {self.dest}: {len(self.names)} files)"

    def execute(self, state, host, connector_arguments) -> bool:
        client = getattr(host.connector, "client", None)
        if client is None:
            raise OperationError(f"pushing {self.src} needs an SSH connection to {host.name}")
        arguments = dict(connector_arguments)
        extract_control_arguments(arguments)  # timeout, stdin, pty: this stream's own
        tar = StringCommand("tar", "-x", "--no-same-owner", "-C", QuoteString(self.dest))
        channel = client.get_transport().open_session()
        channel.exec_command(make_unix_command_for_host(state, host, tar, **arguments).get_raw_value())
        # dereference: a link on the controller (a hub cache's snapshot) is sent as the file it names
        with tarfile.open(fileobj=_Channel(channel), mode="w|", dereference=True) as stream:
            for name in self.names:
                stream.add(Path(self.src) / name, arcname=name)
        channel.shutdown_write()
        rc = channel.recv_exit_status()
        if rc != 0:
            error = channel.makefile_stderr("rb").read().decode(errors="replace").strip()
            host.log_styled(f"tar -x into {self.dest} failed ({rc}): {error}", fg="red")
            return False
        return True


class _Channel:
    """A paramiko channel as the file object tarfile writes to."""

    def __init__(self, channel):
        self.channel = channel

    def write(self, data: bytes) -> int:
        self.channel.sendall(data)
        return len(data)
