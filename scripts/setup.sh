#!/usr/bin/env bash
# Installs what Outpost's build and tests need on a fresh Debian machine with
# rustup: system packages (idempotent) and the Rust targets for device builds.
# Safe to run again; does nothing that is already done.
set -euo pipefail

need_apt=()
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto mosquitto-clients)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# The demo drives the fleet's JSON API with curl and jq.
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v jq >/dev/null 2>&1 || need_apt+=(jq)
# The embedded broker's TLS test makes its throwaway CA with openssl.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# Headless browser for the fleet dashboard's test.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The system mosquitto service is not needed: tests start their own brokers
# on free ports so runs never collide.
echo "setup: ok"
