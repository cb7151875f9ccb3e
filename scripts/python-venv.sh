# Sourced by the scripts that install a Python tool into a virtualenv under target/
# (schemathesis.sh, s3-server.sh). Needs `as_root` (an array: empty, or sudo) and `fail`.

# Creates the virtualenv at $1 afresh and pip-installs the pinned requirement $2 into it. A fresh
# Debian may have no python3, or one without venv/ensurepip (package python3-venv): those are
# installed with apt-get first.
fresh_venv_with() {
    local venv="$1" requirement="$2" python
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        command -v apt-get >/dev/null 2>&1 || fail "python3 with venv is missing; install python3-venv"
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    fi
    python="$(command -v python3)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "${venv}/bin/pip" install --quiet --disable-pip-version-check "$requirement"
}
