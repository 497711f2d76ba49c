#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine: the tools the local test hosts need
# (as root) and the project's venv in .venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pair in debootstrap:debootstrap systemd-nspawn:systemd-container iptables:iptables \
            ssh:openssh-client ip:iproute2; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root, or first: apt-get install ${need[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# uv: a fresh setup 50 s here, pip 181 s (README, "uv");
# bytecode compiled now: where PYTHONDONTWRITEBYTECODE is set (our machines), every
# later start would compile what it imports again (pyinfra: 2.8 s against 1.2 s)
extras='.[test,bench,plan]'
rc=0
.venv/bin/python scripts/uv_install.py -q --compile-bytecode -e "$extras" || rc=$?
if [ "$rc" = 3 ]; then
  .venv/bin/pip install -q -e "$extras"
elif [ "$rc" != 0 ]; then
  exit "$rc"
fi
