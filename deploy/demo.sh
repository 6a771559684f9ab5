#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install amqtask into .venv, start a throwaway
# RabbitMQ on loopback (deploy/rabbitmq.sh), run a worker, run the example producers (sync and
# async) and print their results, then stop the worker (SIGTERM: it drains) and the broker.
#
#   bash deploy/demo.sh                 # RabbitMQ 3.10 (Debian's package)
#   RABBITMQ_VERSION=4.3 bash deploy/demo.sh
#   KEEP_BROKER=1 bash deploy/demo.sh   # leave the broker running afterwards
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version=${RABBITMQ_VERSION:-3.10}

if [ ! -x .venv/bin/amqtask ]; then
    echo "[demo] installing amqtask into .venv" >&2
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e .
fi

echo "[demo] starting RabbitMQ $version" >&2
url=$(bash deploy/rabbitmq.sh start --version "$version" --name "amqtask-demo-${version//./}" | tail -n 1)
export AMQTASK_BROKER_URL=$url

cd examples
../.venv/bin/amqtask worker -A tasks -Q default,high_priority -c 4 --loglevel warning &
worker=$!
cleanup() {
    kill -TERM "$worker" 2>/dev/null && wait "$worker" || true
    if [ "${KEEP_BROKER:-0}" != 1 ]; then
        bash ../deploy/rabbitmq.sh stop --name "amqtask-demo-${version//./}" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

echo "[demo] producer (sync API):" >&2
../.venv/bin/python producer.py
echo "[demo] producer (async API):" >&2
../.venv/bin/python async_producer.py
