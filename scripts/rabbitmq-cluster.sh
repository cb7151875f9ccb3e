#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this one host, for trying Pictor against a cluster and for the
# tests that take nodes away under load (tests/tests/e2e/cluster.rs). Each node is a separate
# Erlang VM with its own name, AMQP port, distribution port, data and log directories, all under
# DIR; they share an Erlang cookie kept in DIR, and none of it touches the system's RabbitMQ
# (its node, port 5672, cookie and data stay as they are).
#
#   scripts/rabbitmq-cluster.sh start DIR [BASE_PORT]   three nodes on BASE_PORT..BASE_PORT+2
#                                                        (default 5701), clustered; prints one
#                                                        amqp:// URL per node (guest/guest, vhost /)
#   scripts/rabbitmq-cluster.sh stop-node DIR N          stops node N (0, 1 or 2), as a lost node
#   scripts/rabbitmq-cluster.sh start-node DIR N         starts node N again; it rejoins
#   scripts/rabbitmq-cluster.sh leader DIR QUEUE         the node (0, 1 or 2) leading QUEUE
#   scripts/rabbitmq-cluster.sh node-of DIR NAME         the node a client's connection named
#                                                        NAME (pictor-publisher, pictor-worker) is on
#   scripts/rabbitmq-cluster.sh stop DIR                 stops every node and deletes DIR
#
# Try Pictor on it: PICTOR_AMQP_URL="$(scripts/rabbitmq-cluster.sh start /tmp/pictor-cluster | paste -sd,)"
# Needs rabbitmq-server installed (scripts/services.sh installs it); runs as the current user.
set -euo pipefail

readonly RABBIT_BIN="${PICTOR_RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}"
readonly START_TIMEOUT_SECONDS=90

fail() {
    echo "rabbitmq-cluster: error: $*" >&2
    exit 1
}

[[ -x "${RABBIT_BIN}/rabbitmq-server" ]] || fail "no ${RABBIT_BIN}/rabbitmq-server (install rabbitmq-server)"

command="${1:-}"
dir="${2:-}"
[[ -n "$command" && -n "$dir" ]] || fail "usage: $0 start|stop|stop-node|start-node|leader DIR [...]"

# The node names carry DIR's name, so two clusters on one host do not collide in epmd.
cluster_id() {
    basename "$dir" | tr -c 'a-zA-Z0-9\n' '-'
}

node_name() {
    echo "pictor-$(cluster_id)-$1@localhost"
}

base_port() {
    cat "${dir}/base-port"
}

# Runs a RabbitMQ command-line tool as one of this cluster's nodes sees it.
as_cluster() {
    HOME="$dir" RABBITMQ_CONF_ENV_FILE="${dir}/env.conf" ERL_EPMD_ADDRESS=127.0.0.1 "$@"
}

ctl() {
    as_cluster "${RABBIT_BIN}/rabbitmqctl" -q -n "$(node_name "$1")" "${@:2}"
}

start_node() {
    local n="$1" port
    port=$(($(base_port) + n))
    mkdir -p "${dir}/node-${n}"
    cat >"${dir}/node-${n}/rabbit.conf" <<EOF
listeners.tcp.default = ${port}
loopback_users = none
EOF
    (
        cd "$dir"
        HOME="$dir" \
            RABBITMQ_CONF_ENV_FILE="${dir}/env.conf" \
            RABBITMQ_NODENAME="$(node_name "$n")" \
            RABBITMQ_NODE_PORT="$port" \
            RABBITMQ_DIST_PORT=$((port + 20000)) \
            RABBITMQ_MNESIA_BASE="${dir}/node-${n}/data" \
            RABBITMQ_LOG_BASE="${dir}/node-${n}/log" \
            RABBITMQ_CONFIG_FILE="${dir}/node-${n}/rabbit" \
            RABBITMQ_ENABLED_PLUGINS_FILE="${dir}/plugins" \
            ERL_EPMD_ADDRESS=127.0.0.1 \
            nohup "${RABBIT_BIN}/rabbitmq-server" >"${dir}/node-${n}/server.log" 2>&1 &
        echo $! >"${dir}/node-${n}/pid"
    )
}

wait_node() {
    local n="$1" waited=0
    until ctl "$n" await_startup >/dev/null 2>&1; do
        sleep 1
        waited=$((waited + 1))
        if ((waited > START_TIMEOUT_SECONDS)); then
            tail -n 20 "${dir}/node-${n}/server.log" >&2 || true
            fail "node $n did not start within ${START_TIMEOUT_SECONDS} s"
        fi
    done
}

case "$command" in
start)
    base="${3:-5701}"
    mkdir -p "$dir"
    echo "$base" >"${dir}/base-port"
    : >"${dir}/env.conf"
    echo "[]." >"${dir}/plugins"
    if [[ ! -f "${dir}/.erlang.cookie" ]]; then
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"${dir}/.erlang.cookie"
        chmod 400 "${dir}/.erlang.cookie"
    fi
    for n in 0 1 2; do start_node "$n"; done
    for n in 0 1 2; do wait_node "$n"; done
    for n in 1 2; do
        ctl "$n" stop_app
        ctl "$n" join_cluster "$(node_name 0)"
        ctl "$n" start_app
    done
    for n in 0 1 2; do
        echo "amqp://guest:guest@127.0.0.1:$((base + n))/%2f"
    done
    ;;
stop-node)
    ctl "$3" stop >/dev/null
    ;;
start-node)
    start_node "$3"
    wait_node "$3"
    ;;
leader)
    # quorum_status lists each member with its Raft state; the leader's name gives its number.
    leader=$(as_cluster "${RABBIT_BIN}/rabbitmq-queues" -q -n "$(node_name 0)" quorum_status "$3" 2>/dev/null |
        awk '/leader/ {print $0}' | grep -o "pictor-$(cluster_id)-[0-9]@localhost" | head -n 1 || true)
    if [[ -z "$leader" ]]; then
        # Ask the other nodes when node 0 is the one that is down.
        for n in 1 2; do
            leader=$(as_cluster "${RABBIT_BIN}/rabbitmq-queues" -q -n "$(node_name "$n")" quorum_status "$3" 2>/dev/null |
                awk '/leader/ {print $0}' | grep -o "pictor-$(cluster_id)-[0-9]@localhost" | head -n 1 || true)
            [[ -n "$leader" ]] && break
        done
    fi
    [[ -n "$leader" ]] || fail "no leader found for $3"
    echo "${leader}" | sed -E "s/^pictor-$(cluster_id)-([0-9])@localhost$/\1/"
    ;;
node-of)
    # Connections are listed cluster-wide by any running node; the port a connection reached is
    # its node's AMQP port.
    for n in 0 1 2; do
        listing=$(ctl "$n" list_connections port client_properties --formatter json 2>/dev/null) || continue
        port=$(NAME="$3" python3 -c '
import json, os, sys
for connection in json.load(sys.stdin):
    if os.environ["NAME"] in json.dumps(connection.get("client_properties")):
        print(connection["port"]); break
' <<<"$listing")
        [[ -n "$port" ]] || fail "no connection named $3"
        echo $((port - $(base_port)))
        exit 0
    done
    fail "no node answered"
    ;;
stop)
    for n in 0 1 2; do
        ctl "$n" stop >/dev/null 2>&1 || true
        if [[ -f "${dir}/node-${n}/pid" ]]; then
            kill "$(cat "${dir}/node-${n}/pid")" 2>/dev/null || true
        fi
    done
    rm -rf "$dir"
    ;;
*)
    fail "unknown command $command"
    ;;
esac
