#!/usr/bin/env bash
# Builds the sdist and the wheel as a release would, checks them, and installs the *wheel* into a fresh
# venv on the oldest and the newest Python found here, where it must import, report its version and run
# one task end to end against a RabbitMQ started by deploy/rabbitmq.sh (a vhost of its own, deleted after).
#
#   bash deploy/package-check.sh            # `tox -e package` runs this
#   PACKAGE_CHECK_PYTHONS="python3.12" bash deploy/package-check.sh
#
# Fails on: a build warning about deprecated configuration, `twine check --strict`, LICENSE missing from
# either artifact, a version mismatch, or the smoke task not answering.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
work=$(mktemp -d)
vhost="amqtask-package-$$"
broker_version=${AMQTASK_TEST_RABBITMQ:-3.10}
broker_name="amqtask-${broker_version//./}"
log() { echo "[package-check] $*" >&2; }
cleanup() {
    [ -n "${worker_pid:-}" ] && kill "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null
    bash "$root/deploy/rabbitmq.sh" ctl --name "$broker_name" -- delete_vhost "$vhost" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

log "building sdist and wheel"
python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
if grep -iE "deprecat" "$work/build.log"; then
    log "the build warns about deprecated configuration (above)"
    exit 1
fi
python -m twine check --strict "$work"/dist/*
sdist=$(ls "$work"/dist/amqtask-*.tar.gz)
wheel=$(ls "$work"/dist/amqtask-*.whl)
# Read from the source, not by importing it: this environment has the build tools, not amqtask's dependencies.
version=$(python -c 'import ast, sys; print(next(n.value.value for n in ast.parse(open(sys.argv[1]).read()).body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__version__"))' "$root/amqtask/__init__.py")
tar tzf "$sdist" >"$work/sdist.txt"
grep -qx "amqtask-$version/LICENSE" "$work/sdist.txt" || { log "LICENSE missing from $sdist"; exit 1; }
python -m zipfile -l "$wheel" >"$work/wheel.txt"
grep -q "amqtask-$version.dist-info/licenses/LICENSE" "$work/wheel.txt" || { log "LICENSE missing from $wheel"; exit 1; }

# The oldest and the newest Python >= 3.10 on this machine: on PATH, or installed by pyenv.
pythons=()
for minor in 10 11 12 13 14 15; do
    for candidate in "python3.$minor" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.$minor.*/bin/python3; do
        if "$candidate" -c 'import venv, ensurepip' 2>/dev/null; then
            pythons+=("$(command -v "$candidate")")
            break
        fi
    done
done
[ ${#pythons[@]} -gt 0 ] || { log "no Python >= 3.10 found"; exit 1; }
chosen=("${pythons[0]}")
[ ${#pythons[@]} -gt 1 ] && chosen+=("${pythons[-1]}")
# PACKAGE_CHECK_PYTHONS="python3.11 python3.12" checks those instead.
[ -n "${PACKAGE_CHECK_PYTHONS:-}" ] && read -r -a chosen <<<"$PACKAGE_CHECK_PYTHONS"

url=$(bash deploy/rabbitmq.sh start --version "$broker_version" | tail -n 1)
bash deploy/rabbitmq.sh ctl --name "$broker_name" -- add_vhost "$vhost" >/dev/null
bash deploy/rabbitmq.sh ctl --name "$broker_name" -- set_permissions -p "$vhost" guest ".*" ".*" ".*" >/dev/null
export AMQTASK_BROKER_URL="${url%/}/$vhost"
cat >"$work/smoke_app.py" <<'PY'
from amqtask import App

app = App("smoke", task_default_queue="smoke")


@app.task(name="smoke.add")
def add(x: int, y: int) -> int:
    return x + y
PY

for python in "${chosen[@]}"; do
    log "$python: fresh venv, installing the wheel"
    env_dir="$work/venv-${#python}-$RANDOM"
    "$python" -m venv "$env_dir"
    "$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel" 2>&1 | { grep -v "^WARNING: Location" || true; }
    (cd "$work" && "$env_dir/bin/python" -c "import amqtask, sys; assert amqtask.__version__ == '$version', amqtask.__version__; print(sys.version.split()[0], 'import ok')")
    [ "$("$env_dir/bin/amqtask" --version)" = "amqtask, version $version" ] || { log "amqtask --version is wrong"; exit 1; }
    (cd "$work" && exec "$env_dir/bin/amqtask" worker -A smoke_app -c 1 -l warning) &
    worker_pid=$!
    result=$(cd "$work" && "$env_dir/bin/amqtask" call -A smoke_app smoke.add --args '[2, 3]' --wait --timeout 60)
    kill "$worker_pid" && wait "$worker_pid" || true
    worker_pid=
    [ "$result" = "5" ] || { log "$python: the smoke task answered ${result@Q}, wanted 5"; exit 1; }
    log "$python: wheel installed, amqtask --version and one task ok"
done
log "ok: sdist and wheel of amqtask $version (${chosen[*]})"
