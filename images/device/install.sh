#!/usr/bin/env bash
# Installs the Outpost device agent into a root filesystem: the running system
# (ROOT=/) or a mounted SD-card image (ROOT=/mnt/rpi-root). Only copies files
# and makes the enable symlink, so it runs the same on a build host for any
# architecture; needs no systemd, chroot or qemu.
#
#   install.sh [options] ROOT
#     --binary FILE      outpost-agent for the device's architecture
#                        (default: the aarch64 device build in this checkout)
#     --config FILE      agent.toml for this device, e.g. from
#                        `outpost-fleet provision`; without it an existing
#                        ROOT/etc/outpost/agent.toml is kept, else the example
#                        is installed (and must be edited before first boot)
#     --trust-root FILE  the fleet's root public key -> /etc/outpost/root.pub
#     --no-enable        install but do not start the agent at boot
#
# Run it as root when ROOT is a real system or an image, so that files end up
# owned by root (the config holds the device's broker password).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0; }
die() { echo "install.sh: $*" >&2; exit 1; }

binary="$repo/target/aarch64-unknown-linux-musl/device/outpost-agent"
config=""
trust_root=""
enable=1
root=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) [ $# -ge 2 ] || die "--binary needs a file"; binary="$2"; shift 2 ;;
    --config) [ $# -ge 2 ] || die "--config needs a file"; config="$2"; shift 2 ;;
    --trust-root) [ $# -ge 2 ] || die "--trust-root needs a file"; trust_root="$2"; shift 2 ;;
    --no-enable) enable=0; shift ;;
    -h|--help) usage ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$root" ] || die "more than one ROOT given: $root and $1"; root="$1"; shift ;;
  esac
done
[ -n "$root" ] || die "no ROOT given (use / for this system; see --help)"
[ -d "$root" ] || die "ROOT $root is not a directory"
[ -f "$binary" ] || die "agent binary $binary not found (build it with scripts/build-arm.sh or pass --binary)"
[ -z "$config" ] || [ -f "$config" ] || die "config $config not found"
[ -z "$trust_root" ] || [ -f "$trust_root" ] || die "trust root $trust_root not found"
# Refuse to install something that is not a Linux executable (a truncated
# download, a macOS build, a text file): the device would fail at boot.
[ "$(head -c 4 "$binary" | od -An -tx1 | tr -d ' \n')" = "7f454c46" ] \
  || die "$binary is not an ELF executable"

root="$(cd "$root" && pwd)"
# Paths inside ROOT; ${root%/} keeps ROOT=/ from producing //usr/...
r="${root%/}"

install -d -m 0755 "$r/usr/local/bin" "$r/etc/systemd/system" "$r/etc/outpost"
# Copy to a temporary name, then rename: a running agent keeps its old inode
# and a power cut never leaves a half-written binary at the real path.
install -m 0755 "$binary" "$r/usr/local/bin/.outpost-agent.new"
mv -f "$r/usr/local/bin/.outpost-agent.new" "$r/usr/local/bin/outpost-agent"
install -m 0644 "$here/outpost-agent.service" "$r/etc/systemd/system/outpost-agent.service"

if [ -n "$config" ]; then
  install -m 0600 "$config" "$r/etc/outpost/agent.toml"
elif [ -e "$r/etc/outpost/agent.toml" ]; then
  echo "install.sh: keeping the existing /etc/outpost/agent.toml"
else
  install -m 0600 "$here/agent.toml" "$r/etc/outpost/agent.toml"
  echo "install.sh: installed the EXAMPLE /etc/outpost/agent.toml: edit it (or pass --config) before the device boots" >&2
fi
if [ -n "$trust_root" ]; then
  install -m 0644 "$trust_root" "$r/etc/outpost/root.pub"
fi

wants="$r/etc/systemd/system/multi-user.target.wants"
if [ "$enable" -eq 1 ]; then
  # What `systemctl enable` does, without needing systemctl for ROOT's
  # architecture or a running systemd. The link target is the path as the
  # device will see it, not as this host sees it.
  install -d -m 0755 "$wants"
  ln -sfn /etc/systemd/system/outpost-agent.service "$wants/outpost-agent.service"
else
  rm -f "$wants/outpost-agent.service"
fi

# On the live system, make systemd read the new unit; never for an image.
if [ "$root" = "/" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "install.sh: installed; start it with: systemctl restart outpost-agent"
else
  echo "install.sh: installed into $root"
fi
