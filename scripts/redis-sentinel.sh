#!/usr/bin/env bash
# A Redis primary, two replicas and three sentinels on this one host, for trying Pictor against
# Redis with failover and for the tests that fail it over under load (tests/tests/e2e/sentinel.rs).
# Every server is its own redis-server process with its own port, config, AOF and log under DIR;
# none of it touches the system's Redis on 6379.
#
#   scripts/redis-sentinel.sh start DIR [BASE_PORT]  data nodes on BASE_PORT..BASE_PORT+2 (default
#                                                     6401; the first starts as primary), sentinels
#                                                     on BASE_PORT+10..+12 watching it as service
#                                                     "pictor"; prints the sentinels' host:port list
#   scripts/redis-sentinel.sh primary DIR            the port of the primary the sentinels name now
#   scripts/redis-sentinel.sh failover DIR           SENTINEL FAILOVER: a planned switch
#   scripts/redis-sentinel.sh kill-primary DIR       SIGKILLs the primary: a crash
#   scripts/redis-sentinel.sh kill-replicas DIR      SIGKILLs every data node but the primary;
#                                                     prints their ports, space-separated
#   scripts/redis-sentinel.sh restart DIR PORT       starts the data node on PORT again (it
#                                                     rejoins as a replica)
#   scripts/redis-sentinel.sh stop DIR               stops every process and deletes DIR
#
# Try Pictor on it: PICTOR_REDIS_SENTINELS="$(scripts/redis-sentinel.sh start /tmp/pictor-sentinel)"
# The data nodes run with AOF (appendonly yes) and maxmemory-policy noeviction, as production
# should (docs/scaling.md, "Redis"). Sentinels call a primary down after 3 s without an answer.
set -euo pipefail

readonly SERVICE=pictor
readonly DOWN_AFTER_MS=3000
readonly FAILOVER_TIMEOUT_MS=10000
readonly START_TIMEOUT_SECONDS=20

fail() {
    echo "redis-sentinel: error: $*" >&2
    exit 1
}

command -v redis-server >/dev/null || fail "no redis-server (install redis-server)"

command="${1:-}"
dir="${2:-}"
[[ -n "$command" && -n "$dir" ]] || fail "usage: $0 start|primary|failover|kill-primary|kill-replicas|restart|stop DIR [...]"

base_port() {
    cat "${dir}/base-port"
}

data_ports() {
    local base
    base=$(base_port)
    echo "$base" "$((base + 1))" "$((base + 2))"
}

sentinel_ports() {
    local base
    base=$(base_port)
    echo "$((base + 10))" "$((base + 11))" "$((base + 12))"
}

wait_for() {
    local port="$1" deadline=$((SECONDS + START_TIMEOUT_SECONDS))
    until redis-cli -p "$port" ping >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "nothing answers on port $port; see ${dir}/*.log"
        sleep 0.1
    done
}

start_data() {
    local port="$1" primary="${2:-}"
    local conf="${dir}/data-${port}.conf"
    if [[ ! -f "$conf" ]]; then
        mkdir -p "${dir}/data-${port}"
        {
            echo "port ${port}"
            echo "bind 127.0.0.1"
            echo "dir ${dir}/data-${port}"
            echo "appendonly yes"
            echo "maxmemory-policy noeviction"
            echo "daemonize yes"
            echo "pidfile ${dir}/data-${port}.pid"
            echo "logfile ${dir}/data-${port}.log"
            # A replica answers reads while it resyncs; Pictor only talks to the primary.
            echo "replica-serve-stale-data yes"
            # A replica re-pointed after a switch is often ahead of the new primary and needs a
            # full resync; Redis holds a diskless one back 5 s by default (to batch replicas),
            # and until a replica is in sync, writes that must reach one are refused.
            echo "repl-diskless-sync-delay 0"
            [[ -n "$primary" ]] && echo "replicaof 127.0.0.1 ${primary}"
        } >"$conf"
    fi
    redis-server "$conf"
    wait_for "$port"
}

start_sentinel() {
    local port="$1" primary="$2"
    local conf="${dir}/sentinel-${port}.conf"
    {
        echo "port ${port}"
        echo "bind 127.0.0.1"
        echo "dir ${dir}"
        echo "daemonize yes"
        echo "pidfile ${dir}/sentinel-${port}.pid"
        echo "logfile ${dir}/sentinel-${port}.log"
        echo "sentinel monitor ${SERVICE} 127.0.0.1 ${primary} 2"
        echo "sentinel down-after-milliseconds ${SERVICE} ${DOWN_AFTER_MS}"
        echo "sentinel failover-timeout ${SERVICE} ${FAILOVER_TIMEOUT_MS}"
        echo "sentinel parallel-syncs ${SERVICE} 2"
    } >"$conf"
    redis-server "$conf" --sentinel
    wait_for "$port"
}

# The primary's port as the first answering sentinel names it.
primary_port() {
    local port answer
    for port in $(sentinel_ports); do
        if answer=$(redis-cli -p "$port" sentinel get-master-addr-by-name "$SERVICE" 2>/dev/null) &&
            [[ -n "$answer" ]]; then
            echo "$answer" | sed -n 2p
            return
        fi
    done
    fail "no sentinel names a primary"
}

case "$command" in
start)
    base="${3:-6401}"
    mkdir -p "$dir"
    echo "$base" >"${dir}/base-port"
    read -r first second third <<<"$(data_ports)"
    start_data "$first"
    start_data "$second" "$first"
    start_data "$third" "$first"
    # Both replicas in sync before the sentinels start watching.
    deadline=$((SECONDS + START_TIMEOUT_SECONDS))
    until [[ "$(redis-cli -p "$first" info replication | grep -c 'state=online')" == 2 ]]; do
        ((SECONDS < deadline)) || fail "the replicas did not sync; see ${dir}/*.log"
        sleep 0.1
    done
    for port in $(sentinel_ports); do
        start_sentinel "$port" "$first"
    done
    # Every sentinel sees both replicas and the other sentinels.
    deadline=$((SECONDS + START_TIMEOUT_SECONDS))
    for port in $(sentinel_ports); do
        until [[ "$(redis-cli -p "$port" sentinel master "$SERVICE" | grep -A1 -x 'num-slaves' | tail -1)" == 2 &&
            "$(redis-cli -p "$port" sentinel master "$SERVICE" | grep -A1 -x 'num-other-sentinels' | tail -1)" == 2 ]]; do
            ((SECONDS < deadline)) || fail "sentinel ${port} does not see the set; see ${dir}/*.log"
            sleep 0.2
        done
    done
    for port in $(sentinel_ports); do
        echo "127.0.0.1:${port}"
    done | paste -sd, -
    ;;
primary)
    primary_port
    ;;
failover)
    port=$(sentinel_ports | cut -d' ' -f1)
    redis-cli -p "$port" sentinel failover "$SERVICE" >/dev/null
    ;;
kill-primary)
    port=$(primary_port)
    kill -9 "$(cat "${dir}/data-${port}.pid")"
    echo "$port"
    ;;
kill-replicas)
    primary=$(primary_port)
    killed=()
    for port in $(data_ports); do
        [[ "$port" == "$primary" ]] && continue
        kill -9 "$(cat "${dir}/data-${port}.pid")" 2>/dev/null || true
        killed+=("$port")
    done
    echo "${killed[*]}"
    ;;
restart)
    port="${3:?restart needs the port}"
    # It rejoins as a replica: the sentinels reconfigure it once they see it again.
    start_data "$port"
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
