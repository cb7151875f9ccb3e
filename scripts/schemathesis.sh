#!/usr/bin/env bash
# Fuzzes the api against its own OpenAPI document (GET /openapi.json) with schemathesis: every
# response must be no 5xx, a documented status, of a documented content type, with the documented
# headers, and match the documented schema, each within a per-request time limit (no hangs).
#
# Starts target/debug/pictor's api and a worker (simulated providers, always: fuzzing must never
# spend money) against the local Redis and RabbitMQ, isolated in a RabbitMQ vhost, a queue prefix,
# a Redis key prefix and an image directory of their own, and removes all of them on exit. Needs
# `cargo build --bins` first and the services of scripts/services.sh. Installs schemathesis (pinned)
# into a virtualenv under target/ when it is missing. Extra arguments go to `st run`.
#
# Settings: PICTOR_SCHEMATHESIS_MAX_EXAMPLES (test cases per operation and phase, default 50),
# PICTOR_SCHEMATHESIS_SEED (default fixed, so a run is repeatable), PICTOR_SCHEMATHESIS_VENV.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

readonly SCHEMATHESIS_VERSION=4.32.5
readonly VENV="${PICTOR_SCHEMATHESIS_VENV:-${repo_root}/target/schemathesis-venv}"
readonly MAX_EXAMPLES="${PICTOR_SCHEMATHESIS_MAX_EXAMPLES:-50}"
readonly SEED="${PICTOR_SCHEMATHESIS_SEED:-20261125}"
readonly REQUEST_TIMEOUT_SECONDS=10
readonly READY_TIMEOUT_SECONDS=60
readonly PICTOR="${repo_root}/target/debug/pictor"
readonly CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance

as_root=()
if [[ "$(id -u)" -ne 0 ]] && command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
fi

fail() {
    echo "schemathesis: error: $*" >&2
    exit 1
}

# shellcheck source=scripts/python-venv.sh
source "${repo_root}/scripts/python-venv.sh"

# A virtualenv with the pinned schemathesis; quiet and quick when it is already there.
ensure_schemathesis() {
    if [[ -x "${VENV}/bin/st" ]] && "${VENV}/bin/st" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
        return
    fi
    fresh_venv_with "$VENV" "schemathesis==${SCHEMATHESIS_VERSION}"
    echo "schemathesis: installed $("${VENV}/bin/st" --version) in ${VENV}"
}

free_port() {
    "${VENV}/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# True when GET url answers 200 (the venv's python, so curl is not needed).
answers_200() {
    "${VENV}/bin/python" -c 'import sys, urllib.request; sys.exit(urllib.request.urlopen(sys.argv[1], timeout=3).status != 200)' "$1" >/dev/null 2>&1
}

[[ -x "$PICTOR" ]] || fail "${PICTOR} is missing; run cargo build --workspace --bins first"
command -v redis-cli >/dev/null 2>&1 || fail "redis-cli is missing; run scripts/services.sh"
command -v rabbitmqctl >/dev/null 2>&1 || fail "rabbitmqctl is missing; run scripts/services.sh"
ensure_schemathesis

unique="st-$(date +%s)-$$"
workdir="$(mktemp -d "${TMPDIR:-/tmp}/pictor-schemathesis.XXXXXX")"
redis_prefix="pictor-${unique}:"
vhost="pictor-${unique}"
pids=()

cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ $status -ne 0 ]]; then
        for log in "${workdir}"/*.log; do
            [[ -f "$log" ]] || continue
            echo "--- last lines of $(basename "$log") ---" >&2
            tail -n 30 "$log" >&2
        done
    fi
    # The vhost takes its queues and exchanges with it.
    "${as_root[@]}" rabbitmqctl -q delete_vhost "$vhost" >/dev/null 2>&1 || true
    redis-cli --scan --pattern "${redis_prefix}*" | xargs -r -n 500 redis-cli unlink >/dev/null || true
    rm -rf "$workdir"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"${as_root[@]}" rabbitmqctl -q add_vhost "$vhost" >/dev/null
"${as_root[@]}" rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null

port="$(free_port)"
base="http://127.0.0.1:${port}"
ops_key="fuzz-ops-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"

# Simulated providers (no keys), fast; per-user limits out of the way so generated jobs get far.
export PICTOR_API_ADDR="127.0.0.1:${port}"
export PICTOR_API_KEYS="fuzz:ops:${ops_key}"
export PICTOR_API_KEYS_FILE=""
export PICTOR_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/${vhost}"
export PICTOR_QUEUE_PREFIX="pictor-${unique}"
export PICTOR_REDIS_PREFIX="$redis_prefix"
export PICTOR_IMAGE_STORE="${workdir}/images"
export PICTOR_WORKER_METRICS_ADDR=""
export PICTOR_API_METRICS_ADDR=""
export PICTOR_SIMULATED_DELAY_MS=50
export PICTOR_USER_JOBS_PER_MINUTE=100000
export PICTOR_USER_BURST=100000
export PICTOR_PUBLIC_URL=""
export RUST_LOG="${RUST_LOG:-warn}"
unset OPENAI_API_KEY GEMINI_API_KEY PICTOR_CONFIG

"$PICTOR" api >"${workdir}/api.log" 2>&1 &
pids+=($!)
"$PICTOR" worker >"${workdir}/worker.log" 2>&1 &
pids+=($!)

deadline=$((SECONDS + READY_TIMEOUT_SECONDS))
until answers_200 "${base}/readyz"; do
    ((SECONDS < deadline)) || fail "the api did not become ready on ${base} within ${READY_TIMEOUT_SECONDS}s"
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || fail "pictor (pid ${pid}) exited at start"
    done
    sleep 0.2
done

echo "schemathesis: fuzzing ${base} (${MAX_EXAMPLES} examples per operation, seed ${SEED})"
started=$SECONDS
# From the work directory, so nothing schemathesis writes lands in the repository. One worker:
# CPython 3.11 before 3.11.8 can fail `ast.parse` in concurrent threads ("AST constructor recursion
# depth mismatch"), which hypothesis calls, and a single worker keeps a seeded run repeatable.
(
    cd "$workdir"
    "${VENV}/bin/st" run "${base}/openapi.json" \
        --checks "$CHECKS" \
        --header "Authorization: Bearer ${ops_key}" \
        --max-examples "$MAX_EXAMPLES" \
        --seed "$SEED" \
        --request-timeout "$REQUEST_TIMEOUT_SECONDS" \
        --workers 1 \
        --generation-database none \
        --no-color \
        "$@"
)
echo "schemathesis: passed in $((SECONDS - started))s"
