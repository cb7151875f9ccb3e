#!/usr/bin/env bash
# Runs a local S3-compatible server: moto's server (PyPI `moto[server]`, pinned), on 127.0.0.1 and
# the port given as the first argument, in the foreground (it `exec`s, so a signal to this
# script's pid reaches the server). The end-to-end tests in tests/tests/e2e/s3.rs start it to run
# the `s3://bucket/prefix` image store against the real S3 wire protocol; people can use it the
# same way to try the S3 store locally (docs/storage.md, "Testing against a real S3 server"):
#
#   scripts/s3-server.sh 9000
#   curl -X PUT http://127.0.0.1:9000/pictor-images            # create a bucket
#   AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
#     AWS_REGION=us-east-1 PICTOR_IMAGE_STORE=s3://pictor-images/pictor scripts/run.sh
#
# moto keeps everything in memory and does not check signatures: any credentials do. Installs
# moto (pinned) into a virtualenv under target/ when it is missing; quiet and quick when it is
# there. `--install-only` just makes sure of the virtualenv (scripts/test.sh runs it before the
# tests, so no test waits for an install).
#
# Settings: PICTOR_MOTO_VENV (the virtualenv, default target/moto-venv).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

readonly MOTO_VERSION=5.2.6
readonly VENV="${PICTOR_MOTO_VENV:-${repo_root}/target/moto-venv}"

as_root=()
if [[ "$(id -u)" -ne 0 ]] && command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
fi

fail() {
    echo "s3-server: error: $*" >&2
    exit 1
}

# shellcheck source=scripts/python-venv.sh
source "${repo_root}/scripts/python-venv.sh"

usage() {
    echo "usage: scripts/s3-server.sh PORT | --install-only" >&2
    exit 2
}

has_moto() {
    [[ -x "${VENV}/bin/moto_server" ]] \
        && "${VENV}/bin/python" -c 'import sys, importlib.metadata as m; sys.exit(m.version("moto") != sys.argv[1])' "$MOTO_VERSION" >/dev/null 2>&1
}

# A virtualenv with the pinned moto server; quiet and quick when it is already there. Tests run in
# parallel start this script at once: a lock lets one of them install while the others wait.
ensure_moto() {
    has_moto && return
    mkdir -p "$(dirname "$VENV")"
    exec {lock}>"${VENV}.lock"
    flock "$lock"
    if has_moto; then
        exec {lock}>&-
        return
    fi
    fresh_venv_with "$VENV" "moto[server]==${MOTO_VERSION}"
    echo "s3-server: installed moto ${MOTO_VERSION} in ${VENV}" >&2
    exec {lock}>&-
}

[[ $# -eq 1 ]] || usage
case "$1" in
    --install-only)
        ensure_moto
        exit 0
        ;;
    -*) usage ;;
esac
port="$1"
[[ "$port" =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || fail "not a port: ${port}"

ensure_moto
exec "${VENV}/bin/moto_server" -H 127.0.0.1 -p "$port"
