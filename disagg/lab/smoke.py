"""Talk to a deployment the way a client does: one chat completion through
the router, plain or streaming, and a worker's Prometheus counters."""

from __future__ import annotations

import json
import urllib.request

from disagg.agent import metrics


def chat(
    url: str,
    model: str,
    max_tokens: int,
    stream: bool = False,
    timeout: float = 120,
    prompt: str = "Say something.",
    api_key: str | None = None,
) -> dict:
    """POST /v1/chat/completions asking for exactly max_tokens tokens (with
    a client key, where the front door asks one); returns {"text",
    "completion_tokens"}. (A prefix-aware router sends the same prompt to
    the same worker: vary it to reach them all.)"""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if not stream:
            answer = json.load(response)
            return {
                "text": answer["choices"][0]["message"]["content"],
                "completion_tokens": answer["usage"]["completion_tokens"],
                "prompt_tokens": answer["usage"]["prompt_tokens"],
            }
        text, usage, chunks = "", None, 0
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            for choice in event.get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
                chunks += 1
            usage = event.get("usage") or usage
        return {
            "text": text,
            "completion_tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"],
            "chunks": chunks,
        }


def counter(url: str, name: str, timeout: float = 10) -> float:
    """Sum of a Prometheus counter's samples at url/metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    return metrics.total(text, name) or 0.0
