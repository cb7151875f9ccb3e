#!/usr/bin/env bash
# Runs the whole Pictor fleet locally: makes sure Redis and RabbitMQ are up, builds the `pictor`
# binary in release mode and execs `pictor dev` (api and worker in one process) with development
# defaults for any setting left unset. Extra arguments are passed through to `pictor dev`.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

bash scripts/services.sh
if ! command -v cargo >/dev/null 2>&1; then
    # services.sh found the toolchain under ~/.cargo/bin, which is not on this shell's PATH yet.
    PATH="${HOME}/.cargo/bin:${PATH}"
    export PATH
fi

cargo build --release --bin pictor

# Development defaults, applied only where the caller has not set a value.
: "${PICTOR_API_KEYS:=demo:user:demo-key,ops:ops:ops-key}"
: "${PICTOR_IMAGE_STORE:=var/images}"
: "${PICTOR_CORS_ORIGINS:=http://localhost:5173}"
export PICTOR_API_KEYS PICTOR_IMAGE_STORE PICTOR_CORS_ORIGINS

provider_mode() {
    if [[ -n "${!1:-}" ]]; then
        echo "real (${1} is set)"
    else
        echo "simulated (${1} is unset)"
    fi
}

cat <<BANNER

Pictor dev: api and worker in one process
  openai:       $(provider_mode OPENAI_API_KEY)
  gemini:       $(provider_mode GEMINI_API_KEY)
  image store:  ${PICTOR_IMAGE_STORE}
  cors origins: ${PICTOR_CORS_ORIGINS}

Try it:
  curl -s -X POST localhost:8080/v1/jobs -H 'Authorization: Bearer demo-key' -H 'Content-Type: application/json' -d '{"prompt":"a lighthouse at dawn, watercolor"}'

BANNER

exec "${CARGO_TARGET_DIR:-target}/release/pictor" dev "$@"
