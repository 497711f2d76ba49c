"""The host agent's command line (see the package docstring):

python -m disagg.agent heartbeat --nats tls://10.0.0.1:4222 --ca ca.crt --role context ...
python -m disagg.agent sync --nats tls://10.0.0.1:4222 --ca ca.crt --router http://127.0.0.1:8000 --mode pd ...
python -m disagg.agent leave --nats tls://10.0.0.1:4222 --ca ca.crt --url http://10.0.0.1:8100 --drain-timeout 60
python -m disagg.agent status --nats tls://10.0.0.1:4222 --ca ca.crt --expect context-0=http://... --wait
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from . import kv
from .layout import Layout
from .status import parse_expected, status, table, wait_ready


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disagg.agent", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--nats", required=True, help="tls://HOST:PORT (with --ca) or nats://HOST:PORT")
    common.add_argument("--user", default="disagg")
    common.add_argument("--password-file", help=f"file with the NATS password (default: ${kv.PASSWORD_ENV})")
    common.add_argument("--ca", help="CA certificate that signed the NATS server's: connect with TLS and verify it")
    sub = parser.add_subparsers(dest="command", required=True)
    hb = sub.add_parser("heartbeat", parents=[common], help="register one worker while it runs")
    for name in ("role", "host", "url", "label", "model", "zmq"):
        hb.add_argument(f"--{name}", required=True)
    hb.add_argument("--index", type=int, required=True)
    hb.add_argument("--gpus", required=True, help="comma-separated GPU indices")
    sy = sub.add_parser("sync", parents=[common], help="keep the router's membership equal to the registry")
    sy.add_argument("--router", required=True)
    sy.add_argument("--mode", choices=("pd", "aggregated"), required=True)
    sy.add_argument("--discovery", help="vllm-router's --vllm-discovery-address (pd mode)")
    sy.add_argument("--router-log", help="where the router logs (pd mode): journal:UNIT or a file")
    sy.add_argument("--layout", required=True, help="the deployed layout's workers (JSON): no other entry is routed")
    sy.add_argument("--state-file", help="keeps the last members across restarts")
    sy.add_argument("--targets-dir", help="write Prometheus file_sd targets (workers, DCGM exporters) here")
    sy.add_argument("--metrics-address", help="HOST:PORT to serve NATS's and the registry's metrics on")
    sy.add_argument("--nats-monitor", default="http://127.0.0.1:8222", help="NATS's monitoring URL")
    sy.add_argument("--dcgm-port", type=int, default=9400, help="where the workers' hosts run a DCGM exporter")
    sy.add_argument("--certificate", action="append", default=[], help="a PEM certificate whose expiry is exported")
    lv = sub.add_parser("leave", parents=[common], help="out of the registry and the router, then drained")
    lv.add_argument("--url", required=True)
    lv.add_argument("--drain-timeout", type=float, default=60)
    lv.add_argument("--router-timeout", type=float, default=15, help="seconds to wait for the router to drop it")
    st = sub.add_parser(
        "status", parents=[common], help="registry, router and NATS health (exit 0 ready, 1 not ready, 3 unknown)"
    )
    st.add_argument("--router")
    st.add_argument("--expect", action="append", default=[], metavar="NAME=URL")
    st.add_argument("--layout", help="the deployed layout's file: entries of no worker of it are foreign")
    st.add_argument("--wait", action="store_true")
    st.add_argument("--timeout", type=float, default=300)
    st.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        password = kv.read_password(args.password_file)
    except OSError as e:
        parser.error(f"--password-file: {e}")
    server = kv.Server(args.nats, args.user, password, args.ca)
    if args.command == "heartbeat":
        worker = {
            "role": args.role,
            "index": args.index,
            "host": args.host,
            "url": args.url,
            "gpus": [int(g) for g in args.gpus.split(",") if g],
            "label": args.label,
            "model": args.model,
            "zmq": args.zmq,
        }
        from .heartbeat import heartbeat

        asyncio.run(heartbeat(server, worker))
        return 0
    if args.command == "sync":
        if args.mode == "pd" and not args.discovery:
            parser.error("--discovery is required in pd mode")
        if bool(args.targets_dir) != bool(args.metrics_address):
            parser.error("--targets-dir and --metrics-address go together")
        from .sync import Scrape, sync

        scrape = (
            Scrape(args.targets_dir, args.metrics_address, args.nats_monitor, args.dcgm_port, tuple(args.certificate))
            if args.targets_dir
            else None
        )
        asyncio.run(
            sync(
                server,
                args.router,
                args.mode,
                args.discovery,
                Layout(args.layout),
                args.router_log,
                args.state_file,
                scrape=scrape,
            )
        )
        return 0
    if args.command == "leave":
        from .leave import leave

        asyncio.run(leave(server, args.url, args.drain_timeout, args.router_timeout))
        return 0
    expected = parse_expected(args.expect)
    kw = {"layout": set(Layout(args.layout).workers) if args.layout else None}
    if args.wait:
        current = asyncio.run(wait_ready(server, args.router, expected, args.timeout, **kw))
    else:
        current = asyncio.run(status(server, args.router, expected, **kw))
    print(json.dumps(current.as_dict(), indent=2) if args.json else table(current))
    return current.exit_code


if __name__ == "__main__":
    sys.exit(main())
