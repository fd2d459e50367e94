#!/usr/bin/env bash
# Install what hotlab and its tests need on a fresh Debian machine: the service binaries the
# integration tests start (mosquitto, influxd, socat, mbpoll, openssl), the browser the web panel's
# test drives (chromium) and a virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for bin in mosquitto:mosquitto mosquitto_sub:mosquitto-clients influxd:influxdb socat:socat mbpoll:mbpoll openssl:openssl chromium:chromium; do
    command -v "${bin%%:*}" >/dev/null 2>&1 || need+=("${bin##*:}")
done
if ((${#need[@]})); then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[test]' >.venv/pip.log 2>&1 || { cat .venv/pip.log; exit 1; }
