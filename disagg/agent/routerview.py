"""What vllm-router itself says it routes to.

vllm-router 0.1.17 lists workers it was given (`--worker-urls`,
/add_worker) at GET /workers, but not the instances it found through its
ZMQ service discovery (PD mode): for those, its only per-instance account is
its log, where it writes `Add Prefill [HTTP:host:port, ...]` when an instance
first registers and `Remove Prefill [HTTP:host:port, ..., expired]` when it
drops one. The PD view follows that log (its systemd journal on the head),
so "in router" means the router said so, not that we sent it a message."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

from . import kv

# an IPv6 instance as vllm-router logs it: `Add Prefill [HTTP:[fd00::11]:8100, ZMQ:...]`
_EVENT = re.compile(r"(Add|Remove) (Prefill|Decode) \[HTTP:(\[[0-9A-Fa-f:.]+\]:\d+|[^,\]\s]+)")
# the router (re)starting its discovery listener: it knows no instance yet
_STARTED = "Starting vLLM service discovery listener"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class DiscoveryLog:
    """Membership of a PD router from its log, followed from the start of
    the router's current run. `source`: `journal:UNIT` (the unit's journal
    since boot) or a file path."""

    def __init__(self, source: str):
        self.source = source
        self.members: dict[str, str] = {}  # url -> "Prefill" | "Decode"
        self.error: str | None = "the router's log has not been read yet"

    def feed(self, line: str) -> None:
        line = _ANSI.sub("", line)
        if _STARTED in line:
            self.members.clear()
        elif m := _EVENT.search(line):
            url = f"http://{m.group(3)}"
            if m.group(1) == "Add":
                self.members[url] = m.group(2)
            else:
                self.members.pop(url, None)

    def view(self) -> list[str] | None:
        return None if self.error else sorted(self.members)

    async def follow(self, stop: asyncio.Event) -> None:
        """Read the log until stopped; if the reader ends, start over (from
        the beginning: the state is rebuilt from the whole log)."""
        while not stop.is_set():
            self.members.clear()
            try:
                await self._read(stop)
            except Exception as e:
                self.error = f"cannot read the router's log ({self.source}): {kv.describe(e)}"
                kv.log(self.error)
            await kv.sleep(stop, 2)

    async def _read(self, stop: asyncio.Event) -> None:
        if self.source.startswith("journal:"):
            unit = self.source.removeprefix("journal:")
            proc = await asyncio.create_subprocess_exec(
                "journalctl",
                "-u",
                unit,
                "-b",
                "-f",
                "-n",
                "all",
                "-o",
                "cat",
                "--no-pager",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                await self._lines(proc.stdout, stop, live=lambda: proc.returncode is None)
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
            if not stop.is_set():
                error = (await proc.stderr.read()).decode().strip()
                raise RuntimeError(f"journalctl exited {proc.returncode}: {error[-300:]}")
            return
        with open(self.source, errors="replace") as f:
            self.error = None
            while not stop.is_set():
                line = f.readline()
                if line:
                    self.feed(line)
                else:
                    await kv.sleep(stop, 0.2)

    async def _lines(self, stream: asyncio.StreamReader, stop: asyncio.Event, live) -> None:
        # journalctl prints the whole log, then follows: the state is current
        # once its first output has been read
        self.error = None
        while not stop.is_set() and live():
            reading = asyncio.ensure_future(stream.readline())
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if reading not in done:
                reading.cancel()
                return
            line = reading.result()
            if not line:
                return
            self.feed(line.decode(errors="replace"))


def aggregated_members(router: str, timeout: float = 3) -> list[str]:
    """A regular-mode router's own worker list (GET /workers)."""
    with urllib.request.urlopen(f"{router}/workers", timeout=timeout) as response:
        return sorted(w["url"] for w in json.load(response).get("workers", []))
