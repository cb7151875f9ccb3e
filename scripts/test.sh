#!/usr/bin/env bash
# Runs every check and test of the workspace: makes sure Redis and RabbitMQ are up, checks
# formatting and clippy (failing fast), checks the Prometheus configs and alert rules and runs the
# rules' unit tests with promtool, checks the Alertmanager config with amtool, builds all binaries
# (the end-to-end tests spawn the worker binary), fuzzes the api against its OpenAPI document
# (scripts/schemathesis.sh), makes sure the local S3 server the S3 image-store tests start is
# installed (scripts/s3-server.sh) and runs all tests. Extra arguments are passed through to the
# test binaries.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

bash scripts/services.sh
if ! command -v cargo >/dev/null 2>&1; then
    # services.sh found the toolchain under ~/.cargo/bin, which is not on this shell's PATH yet.
    PATH="${HOME}/.cargo/bin:${PATH}"
    export PATH
fi

if [[ "${CI:-}" == "true" ]]; then
    echo "versions:"
    echo "  $(rustc --version)"
    echo "  $(redis-server --version)"
    echo "  $(promtool --version 2>&1 | head -n 1)"
    echo "  $(amtool --version 2>&1 | head -n 1)"
    echo "  rabbitmq $(rabbitmq-diagnostics -q server_version 2>/dev/null || rabbitmqctl -q version)"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
promtool check config infra/prometheus/prometheus.yml
promtool check config infra/prometheus/prometheus.compose.yml
promtool check rules infra/prometheus/alerts.yml
promtool test rules infra/prometheus/alerts_test.yml
amtool check-config infra/alertmanager/alertmanager.yml
cargo build --workspace --bins
bash scripts/schemathesis.sh
bash scripts/s3-server.sh --install-only
cargo test --workspace --no-fail-fast -- "$@"
