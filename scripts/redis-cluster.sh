#!/usr/bin/env bash
# A three-primary Redis Cluster on this one host, for checking that Pictor's keyspace is
# Cluster-ready (tests/tests/e2e/redis_cluster.rs): with a hash tag in PICTOR_REDIS_PREFIX, every
# key of a deployment is in one slot, so every script and transaction is legal on a Cluster.
# Each node is its own redis-server process (AOF on) with its port, config and log under DIR;
# the cluster bus uses port + 10000. None of it touches the system's Redis on 6379.
#
#   scripts/redis-cluster.sh start DIR [BASE_PORT]   nodes on BASE_PORT..BASE_PORT+2 (default
#                                                      7001), the 16384 slots split between them;
#                                                      prints their host:port list
#   scripts/redis-cluster.sh owner DIR KEY           the port of the node serving KEY's slot
#   scripts/redis-cluster.sh stop DIR                stops every node and deletes DIR
set -euo pipefail

readonly START_TIMEOUT_SECONDS=30

fail() {
    echo "redis-cluster: error: $*" >&2
    exit 1
}

command -v redis-server >/dev/null || fail "no redis-server (install redis-server)"

command="${1:-}"
dir="${2:-}"
[[ -n "$command" && -n "$dir" ]] || fail "usage: $0 start|owner|stop DIR [...]"

ports() {
    local base
    base=$(cat "${dir}/base-port")
    echo "$base" "$((base + 1))" "$((base + 2))"
}

case "$command" in
start)
    base="${3:-7001}"
    mkdir -p "$dir"
    echo "$base" >"${dir}/base-port"
    for port in $(ports); do
        mkdir -p "${dir}/node-${port}"
        redis-server --port "$port" --bind 127.0.0.1 --dir "${dir}/node-${port}" \
            --cluster-enabled yes --cluster-config-file "${dir}/node-${port}/nodes.conf" \
            --appendonly yes --maxmemory-policy noeviction \
            --daemonize yes --pidfile "${dir}/node-${port}.pid" --logfile "${dir}/node-${port}.log"
    done
    deadline=$((SECONDS + START_TIMEOUT_SECONDS))
    for port in $(ports); do
        until redis-cli -p "$port" ping >/dev/null 2>&1; do
            ((SECONDS < deadline)) || fail "nothing answers on port ${port}; see ${dir}/*.log"
            sleep 0.1
        done
    done
    # shellcheck disable=SC2046 # one argument per node
    redis-cli --cluster create $(for port in $(ports); do echo "127.0.0.1:${port}"; done) \
        --cluster-replicas 0 --cluster-yes >"${dir}/create.log" 2>&1 ||
        fail "cluster create failed: $(cat "${dir}/create.log")"
    for port in $(ports); do
        until redis-cli -p "$port" cluster info | grep -q '^cluster_state:ok'; do
            ((SECONDS < deadline)) || fail "the cluster did not come up; see ${dir}/*.log"
            sleep 0.2
        done
    done
    for port in $(ports); do
        echo "127.0.0.1:${port}"
    done | paste -sd, -
    ;;
owner)
    key="${3:?owner needs a key}"
    for port in $(ports); do
        # Only the node serving the key's slot answers without a MOVED redirection.
        if [[ "$(redis-cli -p "$port" exists "$key" 2>&1)" =~ ^[0-9]+$ ]]; then
            echo "$port"
            exit 0
        fi
    done
    fail "no node serves ${key}"
    ;;
stop)
    for pidfile in "${dir}"/*.pid; do
        [[ -f "$pidfile" ]] || continue
        kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
    rm -rf "$dir"
    ;;
*)
    fail "unknown command ${command}"
    ;;
esac
