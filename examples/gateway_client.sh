#!/bin/sh
# A client of amqtask's HTTP gateway with nothing but curl: send a task, wait for its result.
#
#   GATEWAY=http://127.0.0.1:8080 TOKEN=s3cret sh examples/gateway_client.sh proj.tasks.add '[2, 3]'
#
# Prints the task's final state as JSON; exits 1 unless it succeeded.
set -eu
name=${1:?usage: gateway_client.sh TASK_NAME [ARGS_JSON]}
args=${2:-[]}
gateway=${GATEWAY:-http://127.0.0.1:8080}
wait=${WAIT:-30} # seconds per long poll, at most the gateway's gateway_max_wait_s
auth="Authorization: Bearer ${TOKEN:-}"

sent=$(curl -sS --fail-with-body -X POST "$gateway/tasks/$name" -H "$auth" \
    -H 'Content-Type: application/json' -d "{\"args\": $args}")
id=$(printf '%s' "$sent" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
[ -n "$id" ] || { echo "not sent: $sent" >&2; exit 1; }

# Long poll: the gateway answers as soon as the task is ready, or after $wait s with its current state.
while :; do
    state=$(curl -sS --fail-with-body "$gateway/tasks/$id?wait=$wait" -H "$auth")
    case $state in
    *'"state":"SUCCESS"'*) echo "$state"; exit 0 ;;
    *'"state":"FAILURE"'* | *'"state":"REVOKED"'*) echo "$state"; exit 1 ;;
    esac
done
