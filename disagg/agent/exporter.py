"""The registry sync's /metrics (loopback, for Prometheus on the head): NATS's
own monitoring, which is JSON (/varz, /jsz), under the names NATS's
prometheus-nats-exporter gives it (gnatsd_*), so that existing NATS
dashboards work; and the registry as the sync sees it, among which each
worker's placed GPU count (what tokens/s per GPU is divided by)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.request
from collections.abc import Callable, Iterable

VARZ = ("connections", "subscriptions", "slow_consumers", "mem", "cpu", "in_msgs", "out_msgs", "in_bytes", "out_bytes")
JSZ = ("streams", "consumers", "messages", "bytes")


def _json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


class Collector:
    """monitor: NATS's monitoring URL; entries: a callable giving the
    registry's worker entries as the sync last read them; routable: the URLs
    it sends to the router."""

    def __init__(
        self,
        monitor: str,
        entries: Callable[[], Iterable[dict]],
        routable: Callable[[], Iterable[str]],
        layout: Callable[[], Iterable[dict]] = tuple,
        certificates: Iterable[str] = (),
    ):
        """layout: the deployed layout's workers; certificates: PEM files
        whose expiry is exported (the alerting rules warn before it)."""
        self.monitor, self.entries, self.routable = monitor.rstrip("/"), entries, routable
        self.layout, self.certificates = layout, tuple(certificates)
        self._not_after: dict[str, tuple[int, float | None]] = {}

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        varz, jsz = _json(f"{self.monitor}/varz"), _json(f"{self.monitor}/jsz")
        up = GaugeMetricFamily("gnatsd_up", "1 when NATS's monitoring port answers")
        up.add_metric([], 1.0 if varz is not None else 0.0)
        yield up
        for key in VARZ if varz else ():
            yield GaugeMetricFamily(f"gnatsd_varz_{key}", f"NATS /varz {key}", value=float(varz.get(key, 0)))
        for key in JSZ if jsz else ():
            yield GaugeMetricFamily(f"gnatsd_jsz_{key}", f"NATS /jsz {key}", value=float(jsz.get(key, 0)))
        routable = set(self.routable())
        gpus = GaugeMetricFamily(
            "disagg_worker_gpus",
            "GPUs placed for a worker of the registry",
            labels=["layout", "role", "index", "host", "worker"],
        )
        routed = GaugeMetricFamily(
            "disagg_worker_routed",
            "1 when the sync sends the worker to the router",
            labels=["layout", "role", "index", "host", "worker"],
        )
        for e in self.entries():
            labels = [e["label"], e["role"], str(e["index"]), e["host"], f"{e['role']}-{e['index']}"]
            gpus.add_metric(labels, float(len(e["gpus"])))
            routed.add_metric(labels, 1.0 if e["url"] in routable else 0.0)
        yield gpus
        yield routed
        deployed = GaugeMetricFamily(
            "disagg_layout_workers", "Workers of the deployed layout (what the sync routes)", labels=["role"]
        )
        roles: dict[str, int] = {}
        for w in self.layout():
            roles[w["role"]] = roles.get(w["role"], 0) + 1
        for role, count in sorted(roles.items()):
            deployed.add_metric([role], float(count))
        yield deployed
        expiry = GaugeMetricFamily(
            "disagg_certificate_not_after_seconds", "When a certificate of ours expires (Unix time)", labels=["path"]
        )
        for path in self.certificates:
            not_after = self.not_after(path)
            if not_after is not None:
                expiry.add_metric([path], not_after)
        yield expiry

    def not_after(self, path: str) -> float | None:
        """A PEM certificate's notAfter, read again when the file changes."""
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return None
        cached = self._not_after.get(path)
        if cached is None or cached[0] != mtime:
            out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", path], capture_output=True, text=True)
            when = out.stdout.strip().removeprefix("notAfter=") if out.returncode == 0 else ""
            cached = (mtime, float(ssl.cert_time_to_seconds(when)) if when else None)
            self._not_after[path] = cached
        return cached[1]


def serve(address: str, collector: Collector) -> None:
    """address: HOST:PORT; a thread of its own."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    host, port = address.rsplit(":", 1)
    start_http_server(int(port), addr=host.strip("[]"), registry=registry)
