#!/usr/bin/env bash
# Adds a provisioned device to mosquitto's password file, from the agent.toml
# that `outpost-fleet provision` wrote, and tells mosquitto to reload.
#
#   fleet-server/mosquitto/add-device.sh agent.toml [/etc/mosquitto/outpost/passwd]
#
# The fleet stores only a hash of each device's broker password, in its own
# format; mosquitto needs its own hash, which only the password's one copy
# (the agent config) can produce.
set -euo pipefail
config=${1:?usage: add-device.sh agent.toml [passwd-file]}
passwd=${2:-/etc/mosquitto/outpost/passwd}
get() { sed -n "s/^$1 = \"\\(.*\\)\"$/\\1/p" "$config" | head -n1; }
user=$(get username)
pass=$(get password)
[ -n "$user" ] && [ -n "$pass" ] || { echo "add-device.sh: $config has no username/password" >&2; exit 1; }
[ -f "$passwd" ] || { touch "$passwd"; chmod 600 "$passwd"; }
mosquitto_passwd -b "$passwd" "$user" "$pass"
# SIGHUP makes mosquitto re-read the password and ACL files.
pkill -HUP -x mosquitto 2>/dev/null || true
echo "added $user to $passwd"
