"""A bounded load through the router, for fault tests and for operators who
want to see what a change does to traffic: a fixed number of concurrent
streaming chat requests, each counted as ok only when it ends in HTTP 200
with `data: [DONE]`, every other outcome counted with its reason and time."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    sent: int = 0
    ok: int = 0
    # (sent, ended, reason) of every failed request, in seconds since the
    # load started: a request can fail long after it was sent (a KV
    # transfer from a dead context worker fails when NIXL gives up on it)
    failures: list[tuple[float, float, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    def reasons(self) -> dict[str, int]:
        return dict(Counter(reason for *_, reason in self.failures).most_common())

    def failed_between(self, start: float, end: float) -> int:
        """Failed requests sent between start and end."""
        return sum(1 for sent, _, _ in self.failures if start <= sent <= end)

    def summary(self) -> str:
        reasons = "; ".join(f"{n} x {r}" for r, n in self.reasons().items()) or "none"
        return f"{self.sent} sent, {self.failed} failed ({reasons}) in {self.seconds:.0f} s"


class Load:
    """`concurrency` clients, each sending one request after the other until
    stop(). Use as a context manager; `at()` is the load's own clock."""

    def __init__(
        self,
        url: str,
        model: str,
        concurrency: int = 6,
        max_tokens: int = 8,
        timeout: float = 120,
        prompt: str = "Tell me a story.",
        pause: float = 0.0,
        api_key: str | None = None,
        ca: str | None = None,
    ) -> None:
        """api_key: a client key the front door asks; ca: the CA file an https url is verified with."""
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = ssl.create_default_context(cafile=ca) if parts.scheme == "https" else None
        self.body = json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "min_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
            }
        )
        self.headers = {
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {api_key}"} if api_key else {}),
        }
        # seconds each client waits between its requests (0: back to back)
        self.concurrency, self.timeout, self.pause = concurrency, timeout, pause
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._start = 0.0

    def at(self) -> float:
        return time.monotonic() - self._start

    def __enter__(self) -> Load:
        self._start = time.monotonic()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.concurrency)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        self.result.seconds = self.at()
        return self.result

    def _client(self) -> None:
        while not self._stop.is_set():
            sent = self.at()
            reason = self._one()
            with self._lock:
                self.result.sent += 1
                if reason is None:
                    self.result.ok += 1
                else:
                    self.result.failures.append((sent, self.at(), reason))
            # a refused request returns at once: do not spin
            self._stop.wait(self.pause if reason is None else max(self.pause, 0.05))

    def _one(self) -> str | None:
        """None when the request succeeded, else why not."""
        conn = (
            http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.tls)
            if self.tls
            else http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        )
        try:
            conn.request("POST", "/v1/chat/completions", self.body, self.headers)
            response = conn.getresponse()
            if response.status != 200:
                # who answered it: the front door's page or the router's message
                said = " ".join(re.sub(r"<[^>]*>", " ", response.read(300).decode(errors="replace")).split())
                return f"HTTP {response.status}" + (f": {said[:80]}" if said else "")
            done = False
            for raw in response:
                line = raw.strip()
                if line == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data: ") and b'"error"' in line:
                    return "error event in stream"
            return None if done else "stream ended without [DONE]"
        except (OSError, http.client.HTTPException) as e:
            return e.__class__.__name__
        finally:
            conn.close()
