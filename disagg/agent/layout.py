"""The deployed layout's workers as the deploy writes them on the head
(/etc/disagg/layout.json, from the plan): the registry sync forwards to the
router only an entry the layout names, by URL, role and ZMQ address.
Anything else in the registry is foreign (a worker of another layout, or an
entry a compromised host wrote) and is logged once, never routed. The file
is read again when it changes: a deploy that adds a worker rewrites it
without restarting the sync."""

from __future__ import annotations

import json
from pathlib import Path

from . import kv


def text(label: str, workers: list[dict]) -> str:
    """The file's content: {"label", "workers": [{"name", "role", "url", "zmq"}]}."""
    return json.dumps({"label": label, "workers": workers}, indent=1, sort_keys=True) + "\n"


class Layout:
    def __init__(self, path: str):
        self.path = Path(path)
        self.workers: dict[str, dict] = {}
        self._seen: tuple[int, int] | None = None
        self.refresh()

    def refresh(self) -> None:
        """Read the file again if it changed; an unreadable one keeps the
        last layout (none before the first read: nothing is routed)."""
        try:
            st = self.path.stat()
            if (st.st_mtime_ns, st.st_size) == self._seen:
                return
            data = json.loads(self.path.read_text())
            workers = {w["url"]: w for w in data["workers"] if isinstance(w.get("url"), str)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            kv.log(
                f"layout: {self.path} unreadable, keeping the last one ({len(self.workers)} workers): {kv.describe(e)}"
            )
            return
        self._seen = (st.st_mtime_ns, st.st_size)
        if workers != self.workers:
            kv.log(f"layout: {data.get('label')}, {len(workers)} workers ({self.path})")
        self.workers = workers

    def admits(self, key: str, entry: dict) -> bool:
        """Whether a (well-formed) worker entry is one of the layout's."""
        ours = self.workers.get(entry["url"])
        if ours is not None and ours.get("role") == entry.get("role") and ours.get("zmq") == entry.get("zmq"):
            return True
        kv.skipped(
            key,
            f"names {entry.get('role')} {entry['url']} (ZMQ {entry.get('zmq')}), not a worker of the "
            "deployed layout: foreign",
        )
        return False
