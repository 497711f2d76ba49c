"""Prometheus text from the workers and the router, parsed with
prometheus_client's parser (timestamps, NaN, escaped labels and all)."""

from __future__ import annotations

import urllib.error
import urllib.request


def samples(text: str, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample named `name` (a counter's sample
    carries its `_total` suffix) whose labels include `match`."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in match.items())
    ]


def scrape(url: str, timeout: float = 2.0) -> str | None:
    """The text at url (a /metrics URL), None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None


def total(text: str | None, name: str, **match: str) -> float | None:
    """Sum of a metric's samples (those with `match` labels); None when it
    has none (or no text)."""
    found = samples(text, name, **match) if text else []
    return sum(value for _, value in found) if found else None


def in_flight(worker_url: str) -> float | None:
    """Requests a vLLM worker is running or has queued, from its /metrics."""
    text = scrape(f"{worker_url}/metrics")
    parts = [total(text, f"vllm:num_requests_{state}") for state in ("running", "waiting")]
    return None if parts[0] is None else sum(p or 0 for p in parts)


def per_worker(text: str | None, name: str) -> dict[str, float]:
    """A router metric by its `worker` label, e.g. vllm_router_processed_requests_total."""
    out: dict[str, float] = {}
    for labels, value in samples(text, name) if text else []:
        if "worker" in labels:
            out[labels["worker"]] = out.get(labels["worker"], 0) + value
    return out
