"""A model repository served as the Hugging Face Hub serves one, for
HF_ENDPOINT: the endpoints huggingface_hub 2.4 uses to download a snapshot
(model info, the recursive tree with blob and LFS checksums, resolve with
HEAD and ranged GET). Files ending in .safetensors or .bin are LFS files,
as on the hub. `publish` moves main to a new commit; earlier commits are
still served by their sha. Each request is recorded, to count what a run
fetched."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS = (".safetensors", ".bin")


class Hub:
    def __init__(self, repo: str, root: Path, address: str = "127.0.0.1", token: str | None = None):
        self.repo, self.token = repo, token
        self.snapshots: dict[str, dict[str, Path]] = {}
        self.publish(root)
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer((address, 0), self._handler())
        self.url = f"http://{address}:{self.server.server_port}"

    def __enter__(self) -> Hub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def publish(self, root: Path) -> str:
        """root's files as a new commit, which main then names (files, commit: main's)."""
        self.files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        self.commit = hashlib.sha1(b"".join(p.read_bytes() for p in self.files.values())).hexdigest()
        self.snapshots[self.commit] = self.files
        return self.commit

    def snapshot(self, revision: str) -> tuple[str, dict[str, Path]]:
        """(commit, files) that revision names; files {} for none."""
        sha = self.commit if revision == "main" else revision
        return sha, self.snapshots.get(sha, {})

    def downloads(self) -> list[str]:
        """The files fetched (GET on resolve) so far."""
        return [
            path.rsplit("/resolve/", 1)[1].split("/", 1)[1]
            for method, path in self.requests
            if method == "GET" and "/resolve/" in path
        ]

    @staticmethod
    def entry(name: str, path: Path) -> dict:
        data = path.read_bytes()
        blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        entry = {"type": "file", "path": name, "size": len(data), "oid": blob}
        if name.endswith(LFS):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _handler(self):
        hub = self
        repo = re.escape(hub.repo)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(code)
                for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, value):
                self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

            def _route(self, head: bool):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._send(401, b"unauthorized", head=head)
                m = re.fullmatch(rf"/api/models/{repo}(?:/revision/([^/]+))?", path)
                if m and (snap := hub.snapshot(m.group(1) or "main"))[1]:
                    return self._json(
                        {
                            "id": hub.repo,
                            "modelId": hub.repo,
                            "sha": snap[0],
                            "private": False,
                            "siblings": [{"rfilename": n} for n in snap[1]],
                        }
                    )
                m = re.fullmatch(rf"/api/models/{repo}/tree/([^/]+)", path)
                if m and (snap := hub.snapshot(m.group(1)))[1]:
                    return self._json([hub.entry(n, p) for n, p in snap[1].items()])
                m = re.fullmatch(rf"/{repo}/resolve/([^/]+)/(.+)", path)
                sha, files = hub.snapshot(m.group(1)) if m else ("", {})
                if m and m.group(2) in files:
                    entry, data = hub.entry(m.group(2), files[m.group(2)]), files[m.group(2)].read_bytes()
                    etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
                    headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
                    start = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                    if start and not head:
                        offset = int(start.group(1))
                        headers["Content-Range"] = f"bytes {offset}-{len(data) - 1}/{len(data)}"
                        return self._send(206, data[offset:], headers)
                    return self._send(200, data, headers, head=head)
                self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, head=head)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        return Handler
