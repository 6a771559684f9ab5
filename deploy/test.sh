#!/usr/bin/env bash
# The whole test suite: installs tox when missing, then runs `tox` (lint, then the suite against
# RabbitMQ 3.10 and 4.3). Needs only Python; deploy/rabbitmq.sh installs the brokers. Extra
# arguments go to tox (e.g. `bash deploy/test.sh -e py-rmq310 -- -k core`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if command -v tox >/dev/null; then
    tox=(tox)
else
    tox=(python3 -m tox)
    if ! "${tox[@]}" --version >/dev/null 2>&1; then
        echo "[ci] installing tox" >&2
        if ! python3 -m pip --version >/dev/null 2>&1; then
            # Debian's python3 comes without pip.
            apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-pip
        fi
        # A distribution's Python refuses pip installs (PEP 668); a CI machine is throwaway.
        PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install tox </dev/null
    fi
fi
exec "${tox[@]}" "$@"
