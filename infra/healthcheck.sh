#!/bin/bash
# Container health check for the `pictor` image, which has neither curl nor wget: an HTTP/1.0
# GET of /healthz over bash's /dev/tcp. With a port argument it checks that port; without one
# it passes when any of the roles' default ports answers (api 8080, worker 9464, scheduler
# 9465), so one HEALTHCHECK fits every role.
set -u

check() {
    local port="$1" status
    exec 3<>"/dev/tcp/127.0.0.1/${port}" || return 1
    printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
    IFS= read -r -t 3 status <&3 || status=""
    exec 3<&- 3>&-
    [[ "${status}" == "HTTP/1."?" 200"* ]]
}

if [[ $# -gt 0 ]]; then
    check "$1" 2>/dev/null
    exit $?
fi
for port in 8080 9464 9465; do
    check "${port}" 2>/dev/null && exit 0
done
exit 1
