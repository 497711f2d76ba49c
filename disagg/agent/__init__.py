"""The host agent: what runs on the hosts beside the workers and the router,
around the worker registry in the head's NATS (JetStream key-value bucket).

- `heartbeat` (beside each worker): puts the worker's entry every 2 s;
- `sync` (on the head): keeps vllm-router's members equal to the healthy
  entries, and publishes what the router itself says it routes to;
- `leave` (each worker unit's ExecStop): out of the registry and the router,
  then drained, before vLLM gets SIGTERM;
- `status` (controller, and the deploy's readiness gate on the head).

Beside them: `stage` (a hub model onto a host, run by the deploy), `net`
(host:port and URLs, IPv6 in brackets, which the controller uses too) and
`vllm_plugin` (loaded by the workers' engines, shipped to their venv).

This package is shipped to the hosts as plain files and run there with
`python -m disagg.agent`: it imports nothing else of disagg and no pyinfra,
only the standard library, nats-py, pyzmq, msgpack and prometheus_client
(tests/test_homes.py).
"""
