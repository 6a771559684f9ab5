#!/usr/bin/env bash
# Build, once, a debootstrap root holding Debian's rabbitmq-server, for deploy/rabbitmq.sh.
#
#   deploy/rabbitmq-chroot.sh ROOT SUITE [FALLBACK_SUITE]
#
# Returns at once when ROOT already holds rabbitmq-server (a root is reused, never rebuilt:
# sid moves daily). Otherwise debootstraps SUITE, or FALLBACK_SUITE if SUITE is not
# installable (sid in the middle of an Erlang transition). Needs root and the Debian
# mirror ($AMQTASK_DEBIAN_MIRROR). All output goes to stderr.
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: $0 ROOT SUITE [FALLBACK_SUITE]" >&2; exit 2; }
ROOT=$1
SUITE=$2
FALLBACK=${3:-}
MIRROR=${AMQTASK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PARTIAL=$ROOT.partial

log() { echo "[rabbitmq-chroot] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "building $ROOT needs root (debootstrap, chroot)"

exec 9>"$ROOT.lock"
flock -w 900 9 || die "another build of $ROOT holds $ROOT.lock"

# Node names are NAME@localhost and the CLI names itself after the host name, so both
# must resolve inside the root; debootstrap writes no /etc/hosts. Rewritten on every
# call in case the machine was renamed.
write_hosts() {
    printf '127.0.0.1\tlocalhost %s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        "$(hostname -s)" >"$1/etc/hosts"
}

if [ -x "$ROOT/usr/lib/rabbitmq/bin/rabbitmq-server" ]; then
    write_hosts "$ROOT"
    exit 0
fi

remove_partial() {
    [ -e "$PARTIAL" ] || return 0
    log "removing $PARTIAL left by an interrupted build"
    # debootstrap mounts proc and sys inside its target while it runs
    findmnt -rn -o TARGET | { grep -F "$PARTIAL/" || true; } | sort -r | while read -r mnt; do
        umount -l "$mnt" || true
    done
    rm -rf --one-file-system "$PARTIAL"
}

bootstrap() {
    log "debootstrap $1 -> $PARTIAL (minbase + rabbitmq-server; about a minute)"
    remove_partial &&
        debootstrap --variant=minbase --include=rabbitmq-server "$1" "$PARTIAL" "$MIRROR" >&2
}

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap debian-archive-keyring >&2
fi

started=$SECONDS
if ! bootstrap "$SUITE"; then
    [ -n "$FALLBACK" ] || die "debootstrap $SUITE failed"
    log "WARNING: $SUITE is not installable now; falling back to $FALLBACK (an older RabbitMQ)"
    bootstrap "$FALLBACK" || die "debootstrap $FALLBACK failed too"
fi
write_hosts "$PARTIAL"
# No init system runs in the root; keep package scripts from trying to start services.
printf '#!/bin/sh\nexit 101\n' >"$PARTIAL/usr/sbin/policy-rc.d"
chmod +x "$PARTIAL/usr/sbin/policy-rc.d"
# The downloaded .debs and apt lists are ~150 MB of the ~400 MB.
chroot "$PARTIAL" apt-get clean
rm -rf "$PARTIAL"/var/lib/apt/lists/*
mv "$PARTIAL" "$ROOT"
# shellcheck disable=SC2016 # ${Version} is dpkg-query's field, not a shell variable
log "built $ROOT in $((SECONDS - started))s: $(du -sh "$ROOT" | cut -f1)," \
    "$(chroot "$ROOT" dpkg-query -W -f='rabbitmq-server ${Version}' rabbitmq-server)"
