#!/usr/bin/env bash
# A throwaway RabbitMQ broker (or cluster) on loopback, for amqtask's tests and CI.
#
#   deploy/rabbitmq.sh start [--version 3.10|4.3] [--name NAME] [--port PORT|auto] [--nodes N] [--tls CERTDIR]
#   deploy/rabbitmq.sh stop|url|status [--name NAME]
#   deploy/rabbitmq.sh stop-node|start-node [--name NAME] [--node I]
#   deploy/rabbitmq.sh ctl [--name NAME] [--node I] -- RABBITMQCTL-ARGS...
#
# start is idempotent: it reuses a running broker of that name, restarts its stopped nodes,
# or creates it. It returns once every node has booted and accepts AMQP, and prints the
# AMQP URL (for a cluster: the nodes' URLs, comma-separated) as the last line of stdout;
# everything else goes to stderr. With --tls, CERTDIR holds ca.pem, server.pem and
# server-key.pem, and an extra line AMQPS=<url> goes to stderr (a running broker of that name
# serving other certificates is an error, not reused). stop deletes the broker's
# data, so the next start gives a fresh broker; stop-node keeps it (restart tests).
# NAME defaults to amqtask-<version without dot>, so --version alone also names the broker.
#
# Where the broker runs:
#   - a Docker engine answers `docker info`: the official rabbitmq:<version> image
#     (AMQTASK_RABBITMQ_DOCKER=0 skips Docker);
#   - the machine's rabbitmq-server package is that version (3.10 on Debian 12; apt installs
#     it when missing): a private node run as the calling user;
#   - otherwise Debian's package of that version in a debootstrap chroot (3.10: bookworm;
#     4.3: sid, or trixie's 4.0 when sid is not installable; AMQTASK_RMQ43_SUITE picks
#     another suite). Needs root.
# Each node has its own node name, data directory, config file, Erlang cookie, epmd port and
# dist port, and listens on 127.0.0.1 only. State: /var/tmp/amqtask-rabbitmq/NAME/state.
set -euo pipefail

BASE=/var/tmp/amqtask-rabbitmq
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TIMEOUT=${AMQTASK_RABBITMQ_TIMEOUT:-120}
RMQ_BIN=/usr/lib/rabbitmq/bin
FIRST_AUTO_PORT=5700
LAST_AUTO_PORT=6699
DIST_OFFSET=20000   # RabbitMQ's own convention: dist port = AMQP port + 20000
DOCKER_UID=999      # the rabbitmq user of the official image

log() { echo "[rabbitmq.sh] $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
usage() {
    sed -n '2,7s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

# ------------------------------------------------------------------- arguments ---
CMD=${1:-}
[ $# -eq 0 ] || shift
OPT_VERSION="" OPT_NAME="" OPT_PORT=auto OPT_NODES="" OPT_TLS="" OPT_NODE=0
CTL_ARGS=()
while [ $# -gt 0 ]; do
    case $1 in
    --) shift; CTL_ARGS=("$@"); break ;;
    -h | --help) usage ;;
    --version | --name | --port | --nodes | --tls | --node)
        [ $# -ge 2 ] || die "$1 needs a value"
        case $1 in
        --version) OPT_VERSION=$2 ;;
        --name) OPT_NAME=$2 ;;
        --port) OPT_PORT=$2 ;;
        --nodes) OPT_NODES=$2 ;;
        --tls) OPT_TLS=$2 ;;
        --node) OPT_NODE=$2 ;;
        esac
        shift 2
        ;;
    *) die "unknown argument '$1' (a rabbitmqctl command goes after --)" ;;
    esac
done
requested_version=${OPT_VERSION:-3.10}
case $requested_version in 3.10 | 4.3) ;; *) die "--version must be 3.10 or 4.3" ;; esac
NAME=${OPT_NAME:-amqtask-${requested_version//./}}
[[ $NAME =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] || die "--name may hold letters, digits, _ and - only"
[[ $OPT_PORT == auto || ($OPT_PORT =~ ^[0-9]+$ && $OPT_PORT -ge 1024 && $OPT_PORT -le 45000) ]] ||
    die "--port must be auto or 1024-45000 (the dist port is PORT+$DIST_OFFSET)"
[[ -z $OPT_NODES || $OPT_NODES =~ ^[1-9]$ ]] || die "--nodes must be 1-9"
[[ $OPT_NODE =~ ^[0-9]$ ]] || die "--node must be a node index (0 is the first node)"
if [ -n "$OPT_TLS" ]; then
    for f in ca.pem server.pem server-key.pem; do
        [ -r "$OPT_TLS/$f" ] || die "--tls $OPT_TLS: $f is missing"
    done
    OPT_TLS=$(cd "$OPT_TLS" && pwd)
fi

STATE_DIR=$BASE/$NAME
STATE=$STATE_DIR/state
BDIR=$BASE/$NAME    # the broker's data as the node sees it; on the host it is $ROOT$BDIR

# --------------------------------------------------------------------- state ---
# READY=0 marks a creation still under way (or killed half-way).
STATE_VARS=(KIND VERSION NODES PORTS TLS_PORTS EPMD_PORT NODENAMES ROOT URL AMQPS_URL READY)

write_state() {
    local v
    for v in "${STATE_VARS[@]}"; do printf '%s=%q\n' "$v" "${!v}"; done >"$STATE.tmp"
    mv "$STATE.tmp" "$STATE"
}

load_state() {
    [ -f "$STATE" ] || die "no broker named $NAME; start it first"
    # shellcheck source=/dev/null
    . "$STATE"
    split_state
    [ "$KIND" != chroot ] || [ "$(id -u)" = 0 ] || die "$NAME runs in a chroot: run this as root"
    [ "$OPT_NODE" -lt "$NODES" ] || die "$NAME has $NODES node(s); --node $OPT_NODE does not exist"
}

# The space-separated state lists as arrays (P: AMQP ports, TP: amqps ports, NN: node
# names), and the command prefix that runs a program as the broker's Erlang user.
split_state() {
    read -ra P <<<"$PORTS"
    read -ra TP <<<"$TLS_PORTS"
    read -ra NN <<<"$NODENAMES"
    AS_NODE=()
    [ "$KIND" != chroot ] ||
        AS_NODE=(chroot "$ROOT" /usr/bin/setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups)
    # HOME holds the broker's own Erlang cookie, for the server and the CLI alike.
    AS_NODE+=(/usr/bin/env -i --chdir="$BDIR" PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$BDIR/home"
        LANG=C.UTF-8 LC_ALL=C.UTF-8 ERL_EPMD_PORT="$EPMD_PORT" ERL_EPMD_ADDRESS=127.0.0.1)
}

lock() {
    mkdir -p "$BASE"
    exec 9>"$BASE/.$NAME.lock"
    flock -w 900 9 || die "another deploy/rabbitmq.sh holds the lock of $NAME"
}

# ---------------------------------------------------------------------- ports ---
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

port_usable() { [[ " $RESERVED " != *" $1 "* ]] && ! port_open "$1"; }

block_usable() {
    local start=$1 count=$2 i
    for ((i = 0; i < count; i++)); do port_usable $((start + i)) || return 1; done
    [ "$KIND" = docker ] && return 0
    for ((i = 0; i < NODES; i++)); do port_usable $((start + i + DIST_OFFSET)) || return 1; done
}

# Layout of a broker's consecutive ports: the nodes' AMQP ports, then their amqps ports,
# then the broker's epmd (which all its nodes register with).
allocate_ports() {
    local count=$NODES start f
    [ -z "$OPT_TLS" ] || count=$((count + NODES))
    [ "$KIND" = docker ] || count=$((count + 1))
    # Ports of brokers that are booting (or stopped) are taken even while nothing listens.
    RESERVED=$(for f in "$BASE"/*/state; do
        # shellcheck source=/dev/null
        if [ -f "$f" ]; then (. "$f" && echo "$PORTS $TLS_PORTS $EPMD_PORT"); fi
    done | tr '\n' ' ')
    if [ "$OPT_PORT" = auto ]; then
        for ((start = FIRST_AUTO_PORT; start <= LAST_AUTO_PORT; start++)); do
            block_usable "$start" "$count" && break
        done
        [ $start -le $LAST_AUTO_PORT ] ||
            die "no $count free consecutive ports in $FIRST_AUTO_PORT-$LAST_AUTO_PORT"
    else
        start=$OPT_PORT
        block_usable "$start" "$count" ||
            die "ports $start-$((start + count - 1)) (or their dist ports +$DIST_OFFSET) are in use"
    fi
    PORTS=$(seq -s ' ' "$start" $((start + NODES - 1)))
    TLS_PORTS="" EPMD_PORT=""
    [ -z "$OPT_TLS" ] || TLS_PORTS=$(seq -s ' ' $((start + NODES)) $((start + 2 * NODES - 1)))
    [ "$KIND" = docker ] || EPMD_PORT=$((start + count - 1))
}

urls() { # scheme host port...
    local scheme=$1 host=$2 sep="" out="" p
    shift 2
    for p; do out+="$sep$scheme://guest:guest@$host:$p/" sep=,; done
    echo "$out"
}

# ---------------------------------------------------------- where it runs ---
docker_usable() {
    [ "${AMQTASK_RABBITMQ_DOCKER:-1}" != 0 ] && command -v docker >/dev/null && docker info >/dev/null 2>&1
}

package_status() { dpkg-query -W -f='${db:Status-Status} ${Version}' rabbitmq-server 2>/dev/null || true; }

install_host_package() {
    local candidate guard=/usr/sbin/policy-rc.d own_guard=0 rc=0
    [ "$(id -u)" = 0 ] || die "rabbitmq-server is not installed; run as root so apt-get can install it"
    log "rabbitmq-server is not installed; asking apt"
    apt-get update >&2
    candidate=$(apt-cache policy rabbitmq-server | awk '$1 == "Candidate:" {print $2}')
    if [[ $candidate != "$VERSION".* ]]; then
        log "apt offers rabbitmq-server '$candidate', not $VERSION"
        return 0
    fi
    # Keep the package from starting its own system-wide broker where an init system runs.
    if [ ! -e $guard ]; then
        printf '#!/bin/sh\nexit 101\n' >$guard && chmod +x $guard && own_guard=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server >&2 || rc=$?
    [ $own_guard = 0 ] || rm -f $guard
    [ $rc = 0 ] || die "apt-get install rabbitmq-server failed"
}

choose_kind() {
    ROOT=""
    if docker_usable; then
        KIND=docker
        return
    fi
    command -v dpkg-query >/dev/null || die "no Docker engine and no dpkg/apt: cannot provide RabbitMQ"
    [[ $(package_status) == installed* ]] || install_host_package
    KIND=host
    [[ $(package_status) != "installed $VERSION".* ]] || return 0
    [ "$(id -u)" = 0 ] || die "RabbitMQ $VERSION needs a chroot here (the host has '$(package_status)'): run as root"
    KIND=chroot
    local suite fallback=""
    case $VERSION in
    3.10) suite=bookworm ROOT=/var/tmp/amqtask-rmq310-root ;;
    4.3)
        suite=${AMQTASK_RMQ43_SUITE:-sid}
        if [ "$suite" = sid ]; then
            ROOT=/var/tmp/amqtask-rmq43-root fallback=trixie
        else
            ROOT=/var/tmp/amqtask-rmq43-root-$suite
        fi
        ;;
    esac
    bash "$HERE/rabbitmq-chroot.sh" "$ROOT" "$suite" ${fallback:+"$fallback"}
}

# ----------------------------------------------------------------- one node ---
container() { echo "$NAME-$1"; }

pidfile() { echo "$ROOT$BDIR/node$1/pid"; }

# Alive, a beam and not a zombie: PID 1 here reaps orphans lazily.
pid_is_beam() { [ -n "$1" ] && awk '{exit !($2 ~ /beam/ && $3 != "Z")}' "/proc/$1/stat" 2>/dev/null; }

docker_exec() { # node-index command...
    docker exec -u rabbitmq -e HOME=/var/lib/rabbitmq "$(container "$1")" "${@:2}"
}

node_pid() { cat "$(pidfile "$1")" 2>/dev/null || true; }

node_running() {
    if [ "$KIND" = docker ]; then
        [ "$(docker inspect -f '{{.State.Running}}' "$(container "$1")" 2>/dev/null)" = true ]
    else
        pid_is_beam "$(node_pid "$1")"
    fi
}

rmqctl() { # node-index rabbitmqctl-args...
    local i=$1
    shift
    if [ "$KIND" = docker ]; then
        docker_exec "$i" rabbitmqctl "$@"
    else
        "${AS_NODE[@]}" "$RMQ_BIN/rabbitmqctl" -n "${NN[i]}" "$@"
    fi
}

declare -A LAUNCHER=() DOCKER_SINCE=()

launch_node() {
    local i=$1 nd=$BDIR/node$1
    if [ "$KIND" = docker ]; then
        DOCKER_SINCE[$i]=$(date +%s.%N)
        docker start "$(container "$i")" >/dev/null
        return
    fi
    if port_open "${P[i]}"; then die "port ${P[i]} of ${NN[i]} is taken by another program"; fi
    # The soft open-files limit is often 1024; RabbitMQ wants far more.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    : >"$ROOT$nd/console.log"
    rm -f "$ROOT$nd/pid"
    # advanced.config, rabbitmq-env.conf and conf.d do not exist on purpose: they keep the
    # system's files in /etc/rabbitmq out.
    local server=("${AS_NODE[@]}"
        RABBITMQ_NODENAME="${NN[i]}" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="${P[i]}"
        RABBITMQ_DIST_PORT=$((P[i] + DIST_OFFSET))
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
        RABBITMQ_MNESIA_BASE="$nd/mnesia" RABBITMQ_LOG_BASE="$nd/log" RABBITMQ_PID_FILE="$nd/pid"
        RABBITMQ_CONFIG_FILE="$nd/rabbitmq.conf" RABBITMQ_CONFIG_FILES="$nd/conf.d"
        RABBITMQ_ADVANCED_CONFIG_FILE="$nd/advanced.config" RABBITMQ_CONF_ENV_FILE="$nd/rabbitmq-env.conf"
        RABBITMQ_ENABLED_PLUGINS_FILE="$BDIR/enabled_plugins" ERL_CRASH_DUMP="$nd/erl_crash.dump"
        "$RMQ_BIN/rabbitmq-server")
    if [ "$KIND" = chroot ]; then
        # The node needs /proc (vm_memory_monitor crashes in a loop without it). It is mounted
        # in a private mount namespace that lives as long as the node: the host never sees
        # the mount, so deleting the root stays safe.
        # shellcheck disable=SC2016 # $1 and $@ belong to the inner sh
        setsid -w unshare --mount --propagation private /bin/sh -c \
            'mount -t proc proc "$1/proc" && shift && exec "$@"' sh "$ROOT" "${server[@]}" \
            >>"$ROOT$nd/console.log" 2>&1 </dev/null 9>&- &
    else
        setsid -w "${server[@]}" >>"$ROOT$nd/console.log" 2>&1 </dev/null 9>&- &
    fi
    LAUNCHER[$i]=$!
}

node_alive() { # running, or launched by us and still booting (no pid file yet)
    node_running "$1" || { [ -n "${LAUNCHER[$1]:-}" ] && kill -0 "${LAUNCHER[$1]}" 2>/dev/null; }
}

# "completed with N plugins" comes after every boot step; the ports must also accept.
node_ready() {
    local i=$1
    if [ "$KIND" = docker ]; then
        # The banner of an earlier boot must not count. docker-proxy accepts on the host port
        # even before RabbitMQ listens: ask the node.
        { [ -z "${DOCKER_SINCE[$i]:-}" ] ||
            docker logs --since "${DOCKER_SINCE[$i]}" "$(container "$i")" 2>&1 | grep -q 'completed with'; } &&
            docker_exec "$i" rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1
    else
        grep -q 'completed with' "$ROOT$BDIR/node$i/console.log" && port_open "${P[i]}" &&
            { [ -z "$TLS_PORTS" ] || port_open "${TP[i]}"; }
    fi
}

node_log_tail() {
    if [ "$KIND" = docker ]; then
        docker logs --tail 40 "$(container "$1")" >&2 || true
    else
        tail -n 40 "$ROOT$BDIR/node$1/console.log" >&2 || true
        log "full log: $ROOT$BDIR/node$1/log/${NN[$1]}.log"
    fi
}

wait_ready() {
    local i=$1 deadline=$((SECONDS + TIMEOUT))
    until node_ready "$i"; do
        if ! node_alive "$i"; then
            node_log_tail "$i"
            die "node ${NN[i]} exited while booting"
        fi
        if [ $SECONDS -ge $deadline ]; then
            node_log_tail "$i"
            die "node ${NN[i]} not ready after ${TIMEOUT}s"
        fi
        sleep 0.2
    done
}

wait_gone() { # pid seconds
    local deadline=$((SECONDS + $2))
    while pid_is_beam "$1"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

stop_node() {
    local i=$1 pid
    if [ "$KIND" = docker ]; then
        docker stop -t 60 "$(container "$i")" >/dev/null 2>&1 || true
        return
    fi
    pid=$(node_pid "$i")
    if pid_is_beam "$pid"; then
        log "stopping ${NN[i]} (pid $pid)"
        # A hung CLI must not stop the teardown: signals follow.
        timeout 60 "${AS_NODE[@]}" "$RMQ_BIN/rabbitmqctl" -n "${NN[i]}" shutdown >/dev/null 2>&1 || true
        wait_gone "$pid" 30 || { kill -TERM "$pid" 2>/dev/null || true; wait_gone "$pid" 15; } ||
            { kill -KILL "$pid" 2>/dev/null || true; wait_gone "$pid" 5; } || true
    elif [ -n "${LAUNCHER[$i]:-}" ] && kill -0 "${LAUNCHER[$i]}" 2>/dev/null; then
        # Still booting, before the pid file: end the session setsid gave the node.
        kill -KILL -- "-${LAUNCHER[$i]}" 2>/dev/null || true
    fi
    rm -f "$(pidfile "$i")"
}

# epmd refuses -kill while any node is registered with it: this ends it only after the last node.
kill_epmd() {
    [ "$KIND" != docker ] && port_open "$EPMD_PORT" || return 0
    "${AS_NODE[@]}" epmd -kill >/dev/null 2>&1 || true
}

stop_all() {
    local i
    for ((i = 0; i < NODES; i++)); do stop_node "$i" & done
    wait
    kill_epmd
}

# ------------------------------------------------------------------ creating ---
write_node_config() {
    local i=$1 tls=$BDIR/tls
    echo "# Written by deploy/rabbitmq.sh for ${NN[i]}."
    if [ -n "$TLS_PORTS" ]; then
        if [ "$KIND" = docker ]; then
            echo "listeners.ssl.default = 5671"
            tls=/etc/amqtask-tls
        else
            echo "listeners.ssl.1 = 127.0.0.1:${TP[i]}"
        fi
        printf '%s\n' "ssl_options.cacertfile = $tls/ca.pem" "ssl_options.certfile = $tls/server.pem" \
            "ssl_options.keyfile = $tls/server-key.pem" "ssl_options.verify = verify_peer" \
            "ssl_options.fail_if_no_peer_cert = false"
    fi
    if [ "$VERSION" = 4.3 ]; then
        # Test against what 4.3 announces as the future default: a transient non-exclusive
        # queue kills the connection (541), global QoS is refused.
        echo "deprecated_features.permit.transient_nonexcl_queues = false"
        echo "deprecated_features.permit.global_qos = false"
    fi
}

write_broker_files() {
    local d=$ROOT$BDIR i
    mkdir -p "$d/home"
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$d/home/.erlang.cookie"
    chmod 400 "$d/home/.erlang.cookie"
    echo '[].' >"$d/enabled_plugins"
    if [ -n "$OPT_TLS" ]; then
        mkdir -p "$d/tls"
        install -m 644 "$OPT_TLS/ca.pem" "$OPT_TLS/server.pem" "$d/tls/"
        install -m 600 "$OPT_TLS/server-key.pem" "$d/tls/"
    fi
    for ((i = 0; i < NODES; i++)); do
        mkdir -p "$d/node$i"
        write_node_config "$i" >"$d/node$i/rabbitmq.conf"
    done
    case $KIND in
    chroot) chroot "$ROOT" chown -R rabbitmq:rabbitmq "$BDIR" ;;
    docker)
        chown -R "$DOCKER_UID:$DOCKER_UID" "$d/home" ${OPT_TLS:+"$d/tls"} ||
            die "cannot hand the cookie to the containers' rabbitmq user ($DOCKER_UID): run as root"
        ;;
    esac
}

create_docker_containers() {
    local i c args
    docker network create "$NAME" >/dev/null
    for ((i = 0; i < NODES; i++)); do
        c=$(container "$i")
        args=(--name "$c" --hostname "$c" --network "$NAME" -p "127.0.0.1:${P[i]}:5672"
            -v "$BDIR/home/.erlang.cookie:/var/lib/rabbitmq/.erlang.cookie:ro"
            -v "$BDIR/node$i/rabbitmq.conf:/etc/rabbitmq/conf.d/90-amqtask.conf:ro")
        [ -z "$TLS_PORTS" ] || args+=(-p "127.0.0.1:${TP[i]}:5671" -v "$BDIR/tls:/etc/amqtask-tls:ro")
        docker create "${args[@]}" "rabbitmq:$VERSION" >/dev/null
    done
}

join_cluster() {
    local i=$1
    log "joining ${NN[i]} to ${NN[0]}"
    rmqctl "$i" stop_app >&2
    rmqctl "$i" join_cluster "${NN[0]}" >&2
    rmqctl "$i" start_app >&2
}

remove_broker() {
    local i
    if [ "$KIND" = docker ]; then
        for ((i = 0; i < NODES; i++)); do docker rm -f -v "$(container "$i")" >/dev/null 2>&1 || true; done
        docker network rm "$NAME" >/dev/null 2>&1 || true
    fi
    rm -rf --one-file-system "$STATE_DIR" "$ROOT$BDIR"
}

CREATING=0
on_exit() {
    local rc=$?
    [ $rc != 0 ] && [ $CREATING = 1 ] || return 0
    log "start failed: stopping what was started; logs stay in $ROOT$BDIR"
    stop_all
    rm -f "$STATE"
}
trap on_exit EXIT

create_broker() {
    local i started=$SECONDS
    VERSION=${OPT_VERSION:-3.10} NODES=${OPT_NODES:-1}
    choose_kind
    remove_broker # leftovers of a start that failed
    mkdir -p "$STATE_DIR"
    # Two brokers created at once must not pick the same free ports.
    exec 8>"$BASE/.ports.lock"
    flock -w 60 8 || die "could not lock $BASE/.ports.lock"
    allocate_ports
    NODENAMES=$(for ((i = 0; i < NODES; i++)); do
        if [ "$KIND" = docker ]; then echo "rabbit@$(container "$i")"; else echo "$NAME-$i@localhost"; fi
    done | paste -sd ' ')
    # shellcheck disable=SC2086 # the port lists split into words on purpose
    URL=$(urls amqp 127.0.0.1 $PORTS) AMQPS_URL=$(urls amqps localhost $TLS_PORTS) READY=0
    write_state
    exec 8>&-
    split_state
    CREATING=1
    log "creating $NAME: RabbitMQ $VERSION ($KIND${ROOT:+ in $ROOT}), $NODES node(s), ports $PORTS${TLS_PORTS:+ (amqps $TLS_PORTS)}"
    write_broker_files
    [ "$KIND" != docker ] || create_docker_containers
    for ((i = 0; i < NODES; i++)); do launch_node "$i"; done
    for ((i = 0; i < NODES; i++)); do wait_ready "$i"; done
    for ((i = 1; i < NODES; i++)); do join_cluster "$i"; done
    # start_app has restarted the joined nodes: check their listeners again
    for ((i = 1; i < NODES; i++)); do wait_ready "$i"; done
    READY=1
    write_state
    CREATING=0
    log "$NAME ready in $((SECONDS - started))s"
}

same_certificates() {
    local f
    for f in ca.pem server.pem; do cmp -s "$OPT_TLS/$f" "$ROOT$BDIR/tls/$f" || return 1; done
}

ensure_running() {
    local i todo=()
    for ((i = 0; i < NODES; i++)); do node_running "$i" || todo+=("$i"); done
    [ ${#todo[@]} -gt 0 ] || log "$NAME is running"
    for i in "${todo[@]}"; do
        log "starting ${NN[i]}"
        launch_node "$i"
    done
    for ((i = 0; i < NODES; i++)); do wait_ready "$i"; done
}

# ------------------------------------------------------------------ commands ---
cmd_start() {
    lock
    if [ -f "$STATE" ]; then
        load_state
    fi
    if [ -f "$STATE" ] && [ "${READY:-1}" = 1 ]; then
        [ -z "$OPT_VERSION" ] || [ "$OPT_VERSION" = "$VERSION" ] ||
            die "$NAME exists with RabbitMQ $VERSION, not $OPT_VERSION (stop it first, or pick another --name)"
        [ -z "$OPT_NODES" ] || [ "$OPT_NODES" = "$NODES" ] ||
            die "$NAME exists with $NODES node(s), not $OPT_NODES (stop it first, or pick another --name)"
        [ "$OPT_PORT" = auto ] || [ "$OPT_PORT" = "${P[0]}" ] ||
            die "$NAME exists on port ${P[0]}, not $OPT_PORT (stop it first, or pick another --name)"
        [ -z "$OPT_TLS" ] || [ -n "$AMQPS_URL" ] ||
            die "$NAME exists without TLS (stop it first, or pick another --name)"
        # A client trusting the CA in CERTDIR cannot verify a broker serving another CA's certificate.
        [ -z "$OPT_TLS" ] || same_certificates ||
            die "$NAME serves other TLS certificates than $OPT_TLS (stop it first, or pick another --name)"
        ensure_running
    else
        if [ -f "$STATE" ]; then
            log "an earlier start of $NAME did not finish: creating it afresh"
            stop_all
        fi
        create_broker
    fi
    [ -z "$AMQPS_URL" ] || echo "AMQPS=$AMQPS_URL" >&2
    echo "$URL"
}

cmd_stop() {
    lock
    if [ ! -f "$STATE" ]; then
        log "$NAME is not running"
        return
    fi
    load_state
    stop_all
    remove_broker
    log "$NAME stopped and removed"
}

cmd_stop_node() {
    lock
    load_state
    stop_node "$OPT_NODE"
    kill_epmd
}

cmd_start_node() {
    lock
    load_state
    if node_running "$OPT_NODE"; then
        log "${NN[OPT_NODE]} is already running"
    else
        launch_node "$OPT_NODE"
    fi
    wait_ready "$OPT_NODE"
}

cmd_status() {
    local i state down=0
    if [ ! -f "$STATE" ]; then
        echo "$NAME: not started"
        return 3
    fi
    load_state
    echo "$NAME: RabbitMQ $VERSION ($KIND${ROOT:+ in $ROOT})"
    for ((i = 0; i < NODES; i++)); do
        state=running
        node_running "$i" || { state=stopped down=1; }
        echo "node $i: ${NN[i]} 127.0.0.1:${P[i]}${TLS_PORTS:+ amqps :${TP[i]}} $state"
    done
    [ -z "$AMQPS_URL" ] || echo "AMQPS=$AMQPS_URL"
    echo "$URL"
    return $((down * 3))
}

cmd_url() {
    load_state
    [ -z "$AMQPS_URL" ] || echo "AMQPS=$AMQPS_URL" >&2
    echo "$URL"
}

cmd_ctl() {
    [ ${#CTL_ARGS[@]} -gt 0 ] || die "ctl needs rabbitmqctl arguments after --"
    load_state
    rmqctl "$OPT_NODE" "${CTL_ARGS[@]}"
}

case $CMD in
start) cmd_start ;;
stop) cmd_stop ;;
stop-node) cmd_stop_node ;;
start-node) cmd_start_node ;;
status) cmd_status ;;
url) cmd_url ;;
ctl) cmd_ctl ;;
*) usage ;;
esac
