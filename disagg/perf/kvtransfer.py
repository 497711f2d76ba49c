"""Whether the KV cache really moved: the generate workers' own counters of
where their prompt tokens came from (vLLM's prompt_tokens_by_source) and of
NIXL transfers, read before and after some traffic."""

from __future__ import annotations

from disagg.agent import metrics

COUNTERS = {
    # prompt tokens the generate worker got from the context worker's KV cache
    "prompt_tokens_external": ("vllm:prompt_tokens_by_source_total", {"source": "external_kv_transfer"}),
    # ... found in its own prefix cache (a chat template it has seen)
    "prompt_tokens_local_cache": ("vllm:prompt_tokens_by_source_total", {"source": "local_cache_hit"}),
    # ... computed itself: a broken transfer shows here
    "prompt_tokens_local_compute": ("vllm:prompt_tokens_by_source_total", {"source": "local_compute"}),
    "bytes": ("vllm:nixl_bytes_transferred_sum", {}),
    "transfers": ("vllm:nixl_bytes_transferred_count", {}),
    "failed_transfers": ("vllm:nixl_num_failed_transfers_total", {}),
}


def read(urls: list[str]) -> dict[str, float] | None:
    """The counters summed over workers (their /metrics); None when one of
    them does not answer."""
    out = dict.fromkeys(COUNTERS, 0.0)
    for url in urls:
        text = metrics.scrape(f"{url}/metrics", timeout=5)
        if text is None:
            return None
        for key, (name, labels) in COUNTERS.items():
            out[key] += metrics.total(text, name, **labels) or 0.0
    return out


def delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {key: after[key] - before[key] for key in COUNTERS}


def block_size(url: str) -> int | None:
    """The worker's KV cache block size (vllm:cache_config_info)."""
    found = metrics.samples(metrics.scrape(f"{url}/metrics") or "", "vllm:cache_config_info")
    for labels, _ in found:
        if labels.get("block_size", "").isdigit():
            return int(labels["block_size"])
    return None
