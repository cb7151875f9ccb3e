#!/usr/bin/env bash
# Ensures the local services Pictor needs are running: Redis on 127.0.0.1:6379 and RabbitMQ on
# 127.0.0.1:5672 (guest/guest). A service that already answers is left alone; a missing one is
# installed from Debian's packages and started the same way the machine starts it, then waited for.
# Also installs Debian's Chromium and ChromeDriver for the dashboard's browser test when
# chromedriver is missing, and Debian's `prometheus` package for promtool (the alert rules' checker
# and unit-test runner) when promtool is missing, and Debian's `prometheus-alertmanager` package
# (the Alertmanager binary the alerting test runs, and amtool, the config checker) when either is
# missing, without running either server; and checks that a Rust toolchain is on PATH.
# Idempotent, and quick when everything is up.
set -euo pipefail

readonly REDIS_HOST=127.0.0.1
readonly REDIS_PORT=6379
readonly RABBITMQ_HOST=127.0.0.1
readonly RABBITMQ_PORT=5672
readonly REDIS_TIMEOUT_SECONDS="${PICTOR_REDIS_TIMEOUT_SECONDS:-30}"
readonly RABBITMQ_TIMEOUT_SECONDS="${PICTOR_RABBITMQ_TIMEOUT_SECONDS:-90}"
readonly REDIS_LOG=/var/log/redis/ci.log
readonly CHROMEDRIVER=/usr/bin/chromedriver
# Debian's interpreter: the python3 first on PATH may be another one (pyenv) that does not see
# Debian's packages.
readonly SYSTEM_PYTHON=/usr/bin/python3
readonly PROMETHEUS_HOST=127.0.0.1
readonly PROMETHEUS_PORT=9090
readonly PROMETHEUS_STOP_TIMEOUT_SECONDS=15
readonly ALERTMANAGER_PORT=9093
readonly POLICY_RC_D=/usr/sbin/policy-rc.d

# Commands that need root are prefixed with sudo when we are not root and sudo exists.
as_root=()
if [[ "$(id -u)" -ne 0 ]] && command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
fi

packages_installed=false

fail() {
    echo "services: error: $*" >&2
    exit 1
}

# True when something accepts a TCP connection on host:port (bash's /dev/tcp, no extra tools).
port_open() {
    local host="$1" port="$2"
    timeout 2 bash -c "exec 3<>/dev/tcp/${host}/${port}" 2>/dev/null
}

redis_answers() {
    command -v redis-cli >/dev/null 2>&1 || return 1
    [[ "$(timeout 2 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == "PONG" ]]
}

# The AMQP port opens near the end of boot; await_startup then confirms the app is fully started.
rabbitmq_answers() {
    port_open "$RABBITMQ_HOST" "$RABBITMQ_PORT" || return 1
    if command -v rabbitmqctl >/dev/null 2>&1; then
        "${as_root[@]}" rabbitmqctl -q await_startup --timeout 10 >/dev/null 2>&1 || return 1
    fi
}

# Installs both server packages in one go, at most once per run.
install_packages() {
    if [[ "$packages_installed" == true ]]; then
        return
    fi
    if [[ "$(id -u)" -ne 0 && ${#as_root[@]} -eq 0 ]]; then
        fail "redis-server or rabbitmq-server is missing and installing them needs root (no sudo found);" \
            "run: apt-get install -y redis-server rabbitmq-server"
    fi
    command -v apt-get >/dev/null 2>&1 ||
        fail "redis-server or rabbitmq-server is missing and apt-get is not available; install them by hand"
    echo "services: installing redis-server and rabbitmq-server with apt-get"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server rabbitmq-server
    packages_installed=true
}

# Polls a check function once a second until it succeeds or the timeout passes.
wait_until() {
    local timeout_seconds="$1" check="$2"
    local deadline=$((SECONDS + timeout_seconds))
    while ((SECONDS < deadline)); do
        if "$check"; then
            return 0
        fi
        sleep 1
    done
    "$check"
}

ensure_redis() {
    if redis_answers; then
        echo "redis: already running on ${REDIS_HOST}:${REDIS_PORT}"
        return
    fi
    local action="started"
    if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
        install_packages
        action="installed and started"
        # The package's own service may already be up (where an init system runs it).
        if redis_answers; then
            echo "redis: installed; the package's service is running on ${REDIS_HOST}:${REDIS_PORT}"
            return
        fi
    fi
    "${as_root[@]}" mkdir -p /var/lib/redis /var/log/redis
    "${as_root[@]}" redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir /var/lib/redis --logfile "$REDIS_LOG" >/dev/null
    wait_until "$REDIS_TIMEOUT_SECONDS" redis_answers ||
        fail "redis did not answer PING on ${REDIS_HOST}:${REDIS_PORT} within ${REDIS_TIMEOUT_SECONDS}s;" \
            "see ${REDIS_LOG}"
    echo "redis: ${action} on ${REDIS_HOST}:${REDIS_PORT} (log ${REDIS_LOG})"
}

ensure_rabbitmq() {
    if rabbitmq_answers; then
        echo "rabbitmq: already running on ${RABBITMQ_HOST}:${RABBITMQ_PORT}"
        return
    fi
    local action="started"
    if ! command -v rabbitmq-server >/dev/null 2>&1 || ! command -v rabbitmqctl >/dev/null 2>&1; then
        install_packages
        action="installed and started"
        if rabbitmq_answers; then
            echo "rabbitmq: installed; the package's service is running on ${RABBITMQ_HOST}:${RABBITMQ_PORT}"
            return
        fi
    fi
    # A node that is still booting (port not yet open) must not be started a second time.
    if ! "${as_root[@]}" rabbitmqctl -q status >/dev/null 2>&1; then
        "${as_root[@]}" rabbitmq-server -detached >/dev/null 2>&1 ||
            fail "rabbitmq-server -detached failed; see /var/log/rabbitmq/"
    fi
    wait_until "$RABBITMQ_TIMEOUT_SECONDS" rabbitmq_answers ||
        fail "rabbitmq did not start on ${RABBITMQ_HOST}:${RABBITMQ_PORT} within" \
            "${RABBITMQ_TIMEOUT_SECONDS}s; see /var/log/rabbitmq/"
    echo "rabbitmq: ${action} on ${RABBITMQ_HOST}:${RABBITMQ_PORT}"
}

# The dashboard's end-to-end test drives Debian's Chromium (/usr/bin/chromium) through
# chromedriver; nothing is started here, the test starts its own chromedriver.
ensure_chromium() {
    if [[ -x "$CHROMEDRIVER" ]]; then
        echo "chromium: chromedriver found at ${CHROMEDRIVER}"
        return
    fi
    if [[ "$(id -u)" -ne 0 && ${#as_root[@]} -eq 0 ]]; then
        fail "chromedriver is missing and installing it needs root (no sudo found);" \
            "run: apt-get install -y chromium chromium-driver"
    fi
    command -v apt-get >/dev/null 2>&1 ||
        fail "chromedriver is missing and apt-get is not available;" \
            "install chromium and chromium-driver by hand"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        chromium chromium-driver >/dev/null
    [[ -x "$CHROMEDRIVER" ]] || fail "chromium-driver was installed but ${CHROMEDRIVER} is missing"
    echo "chromium: installed chromium and chromium-driver ($("$CHROMEDRIVER" --version))"
}

# Nothing listens on the Prometheus server's port (used as a wait_until check).
prometheus_port_closed() {
    ! port_open "$PROMETHEUS_HOST" "$PROMETHEUS_PORT"
}

# Stops and disables the server that Debian's `prometheus` package may have started on install
# (where an init system runs services and policy-rc.d allows it). Without an init system its
# daemon can only be found by process: it runs as the package's own `prometheus` user, so only
# that process is ended, never another Prometheus someone runs on purpose.
stop_packaged_prometheus() {
    if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
        "${as_root[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
    "${as_root[@]}" service prometheus stop >/dev/null 2>&1 || true
    if command -v update-rc.d >/dev/null 2>&1 && [[ -e /etc/init.d/prometheus ]]; then
        "${as_root[@]}" update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
    "${as_root[@]}" pkill -x -u prometheus prometheus >/dev/null 2>&1 || true
}

# The alert rules (infra/prometheus) are checked and unit-tested with promtool, which Debian ships
# in the `prometheus` package together with the server. Only promtool is wanted: the server is
# stopped and disabled again if the package started it, so nothing of it listens on 9090.
ensure_promtool() {
    if command -v promtool >/dev/null 2>&1; then
        echo "promtool: found ($(promtool --version 2>&1 | head -n 1))"
        return
    fi
    if [[ "$(id -u)" -ne 0 && ${#as_root[@]} -eq 0 ]]; then
        fail "promtool is missing and installing it needs root (no sudo found);" \
            "run: apt-get install -y --no-install-recommends prometheus"
    fi
    command -v apt-get >/dev/null 2>&1 ||
        fail "promtool is missing and apt-get is not available; install Prometheus's promtool by hand"
    local port_was_open=false
    if port_open "$PROMETHEUS_HOST" "$PROMETHEUS_PORT"; then
        port_was_open=true
    fi
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # --no-install-recommends: the recommended node exporter would be one more server to stop.
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends prometheus >/dev/null
    stop_packaged_prometheus
    if [[ "$port_was_open" == false ]]; then
        wait_until "$PROMETHEUS_STOP_TIMEOUT_SECONDS" prometheus_port_closed ||
            fail "the prometheus package's server still listens on ${PROMETHEUS_HOST}:${PROMETHEUS_PORT}" \
                "after being stopped; stop it by hand (service prometheus stop)"
    fi
    command -v promtool >/dev/null 2>&1 || fail "prometheus was installed but promtool is missing"
    echo "promtool: installed with the prometheus package ($(promtool --version 2>&1 | head -n 1));" \
        "its server is stopped and disabled"
}

# Nothing listens on Alertmanager's port (used as a wait_until check).
alertmanager_port_closed() {
    ! port_open "$PROMETHEUS_HOST" "$ALERTMANAGER_PORT"
}

# Debian names the server binary `prometheus-alertmanager`; upstream's archive `alertmanager`.
alertmanager_binary() {
    command -v alertmanager 2>/dev/null || command -v prometheus-alertmanager 2>/dev/null
}

# Stops and disables the server Debian's `prometheus-alertmanager` package starts on install
# where an init system runs services. Only its own service is addressed (by unit or init script),
# never an Alertmanager someone runs on purpose.
stop_packaged_alertmanager() {
    if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
        "${as_root[@]}" systemctl disable --now prometheus-alertmanager.service >/dev/null 2>&1 || true
    fi
    if [[ -e /etc/init.d/prometheus-alertmanager ]]; then
        "${as_root[@]}" service prometheus-alertmanager stop >/dev/null 2>&1 || true
        if command -v update-rc.d >/dev/null 2>&1; then
            "${as_root[@]}" update-rc.d prometheus-alertmanager disable >/dev/null 2>&1 || true
        fi
    fi
}

# The alerting config (infra/alertmanager) is checked with amtool, and the alerting test
# (tests/tests/e2e/alertmanager.rs) runs the real Alertmanager on ports of its own. Both are in
# Debian's `prometheus-alertmanager` package, whose postinst would start the packaged server on
# 9093: a policy-rc.d that forbids starting services is put in place for the install (when the
# machine has none; Docker images usually have one already), and the server is stopped and
# disabled afterwards in any case.
ensure_alertmanager() {
    if command -v amtool >/dev/null 2>&1 && alertmanager_binary >/dev/null; then
        echo "alertmanager: found $(alertmanager_binary) and amtool" \
            "($("$(alertmanager_binary)" --version 2>&1 | head -n 1))"
        return
    fi
    if [[ "$(id -u)" -ne 0 && ${#as_root[@]} -eq 0 ]]; then
        fail "alertmanager or amtool is missing and installing them needs root (no sudo found);" \
            "run: apt-get install -y --no-install-recommends prometheus-alertmanager"
    fi
    command -v apt-get >/dev/null 2>&1 ||
        fail "alertmanager or amtool is missing and apt-get is not available;" \
            "install Prometheus's Alertmanager (with amtool) by hand"
    local port_was_open=false
    if port_open "$PROMETHEUS_HOST" "$ALERTMANAGER_PORT"; then
        port_was_open=true
    fi
    local own_policy=false
    if [[ ! -e "$POLICY_RC_D" ]]; then
        printf '#!/bin/sh\n# scripts/services.sh: no service starts while it installs packages.\nexit 101\n' |
            "${as_root[@]}" tee "$POLICY_RC_D" >/dev/null
        "${as_root[@]}" chmod 755 "$POLICY_RC_D"
        own_policy=true
    fi
    local installed=true
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq || installed=false
    if [[ "$installed" == true ]]; then
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends prometheus-alertmanager >/dev/null || installed=false
    fi
    if [[ "$own_policy" == true ]]; then
        "${as_root[@]}" rm -f "$POLICY_RC_D"
    fi
    [[ "$installed" == true ]] || fail "apt-get could not install prometheus-alertmanager"
    stop_packaged_alertmanager
    if [[ "$port_was_open" == false ]]; then
        wait_until "$PROMETHEUS_STOP_TIMEOUT_SECONDS" alertmanager_port_closed ||
            fail "the prometheus-alertmanager package's server still listens on" \
                "${PROMETHEUS_HOST}:${ALERTMANAGER_PORT} after being stopped;" \
                "stop it by hand (service prometheus-alertmanager stop)"
    fi
    command -v amtool >/dev/null 2>&1 || fail "prometheus-alertmanager was installed but amtool is missing"
    alertmanager_binary >/dev/null ||
        fail "prometheus-alertmanager was installed but its server binary is missing"
    echo "alertmanager: installed with the prometheus-alertmanager package" \
        "($("$(alertmanager_binary)" --version 2>&1 | head -n 1)); its server is stopped and disabled"
}

aiosmtpd_importable() {
    [[ -x "$SYSTEM_PYTHON" ]] && "$SYSTEM_PYTHON" -c 'import aiosmtpd' >/dev/null 2>&1
}

# The email tests (tests::smtp) start Debian's aiosmtpd under /usr/bin/python3 as a local SMTP
# server, one per test on a free port; nothing is started here.
ensure_aiosmtpd() {
    if aiosmtpd_importable; then
        echo "aiosmtpd: found ($("$SYSTEM_PYTHON" -c 'import aiosmtpd; print(aiosmtpd.__version__)'))"
        return
    fi
    if [[ "$(id -u)" -ne 0 && ${#as_root[@]} -eq 0 ]]; then
        fail "aiosmtpd is missing and installing it needs root (no sudo found);" \
            "run: apt-get install -y --no-install-recommends python3-aiosmtpd"
    fi
    command -v apt-get >/dev/null 2>&1 ||
        fail "aiosmtpd is missing and apt-get is not available; install python3-aiosmtpd by hand"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends python3-aiosmtpd >/dev/null
    aiosmtpd_importable ||
        fail "python3-aiosmtpd was installed but ${SYSTEM_PYTHON} cannot import aiosmtpd"
    echo "aiosmtpd: installed python3-aiosmtpd" \
        "($("$SYSTEM_PYTHON" -c 'import aiosmtpd; print(aiosmtpd.__version__)'))"
}

# The toolchain is installed by rustup, which this script never downloads.
ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -x "${HOME}/.cargo/bin/cargo" ]]; then
        PATH="${HOME}/.cargo/bin:${PATH}"
        export PATH
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "rust: cargo not found. Install the toolchain with rustup (https://rustup.rs):" >&2
        echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2
        echo "then open a new shell (or run: . \"\$HOME/.cargo/env\") and try again;" \
            "rust-toolchain.toml selects the pinned version." >&2
        exit 1
    fi
    echo "rust: $(cargo --version)"
}

ensure_redis
ensure_rabbitmq
ensure_chromium
ensure_promtool
ensure_alertmanager
ensure_aiosmtpd
ensure_rust
