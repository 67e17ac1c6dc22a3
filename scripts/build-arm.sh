#!/usr/bin/env bash
# Builds the device binaries (outpost-runtime, outpost-agent) for ARM with
# plain cargo and prints their paths and sizes:
#   aarch64-unknown-linux-musl       fully static; 64-bit Raspberry Pi OS, Jetson
#   armv7-unknown-linux-gnueabihf    glibc linked statically (+crt-static);
#                                    32-bit Raspberry Pi OS
# Linker and C compiler per target come from .cargo/config.toml. On a fresh
# Debian/Ubuntu machine with rustup this installs what it needs first.
#
#   scripts/build-arm.sh [--target aarch64|armv7|all] [--profile NAME]
#                        [--lean-runtime] [-- CARGO_ARGS...]
#
# --profile defaults to `device` (Cargo.toml: size over build speed).
# --lean-runtime builds outpost-runtime without its default features (no
# MQTT streaming client: `serve --mqtt`), for devices where only the HTTP
# API is used and every MiB counts; it costs a second cargo run, because the
# agent needs the runtime library with them. Arguments after `--` go to
# `cargo build`.
# With Docker instead of cross compilers, `cross build --target T --profile
# device -p outpost-runtime -p outpost-agent` does the same (cross.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf)
profile=device
lean=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --target)
      [ $# -ge 2 ] || { echo "build-arm.sh: --target needs a value" >&2; exit 2; }
      case "$2" in
        aarch64|aarch64-unknown-linux-musl) targets=(aarch64-unknown-linux-musl) ;;
        armv7|armv7-unknown-linux-gnueabihf) targets=(armv7-unknown-linux-gnueabihf) ;;
        all) ;;
        *) echo "build-arm.sh: unknown target $2 (aarch64, armv7 or all)" >&2; exit 2 ;;
      esac
      shift 2 ;;
    --profile)
      [ $# -ge 2 ] || { echo "build-arm.sh: --profile needs a value" >&2; exit 2; }
      profile="$2"; shift 2 ;;
    --lean-runtime) lean=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-arm.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# --- toolchain: cross C compilers (tract-linalg assembles its kernels with
# them; the armv7 one also links), and the Rust standard library per target.
need_apt=()
for t in "${targets[@]}"; do
  case "$t" in
    aarch64-unknown-linux-musl)
      command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need_apt+=(gcc-aarch64-linux-gnu)
      # ring (rustls' crypto, for mqtts and HTTPS downloads) compiles C that
      # includes <stdint.h>: the target's libc headers, which the cross gcc
      # only recommends (and --no-install-recommends skips).
      [ -f /usr/aarch64-linux-gnu/include/stdint.h ] || need_apt+=(libc6-dev-arm64-cross) ;;
    armv7-unknown-linux-gnueabihf)
      command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 || need_apt+=(gcc-arm-linux-gnueabihf)
      # The static glibc (libc.a, CRT objects) and its headers (ring's C):
      # only recommended by the cross gcc, so named here.
      [ -f /usr/arm-linux-gnueabihf/include/stdint.h ] || need_apt+=(libc6-dev-armhf-cross) ;;
  esac
done
if [ ${#need_apt[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || {
    echo "build-arm.sh: install cross compilers providing: ${need_apt[*]} (Debian package names)" >&2; exit 1; }
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if command -v rustup >/dev/null 2>&1; then
  installed="$(rustup target list --installed)"
  for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t"
  done
fi

# --- build. Both binaries in one cargo run per target, so the shared
# dependency graph (tract) is compiled once per target (a run with different
# features recompiles much of it).
for t in "${targets[@]}"; do
  echo "build-arm.sh: building $t ($profile profile)" >&2
  start=$SECONDS
  if [ "$lean" -eq 1 ]; then
    cargo build --profile "$profile" --target "$t" -p outpost-runtime --bin outpost-runtime \
      --no-default-features ${extra[@]+"${extra[@]}"}
    cargo build --profile "$profile" --target "$t" -p outpost-agent --bin outpost-agent \
      ${extra[@]+"${extra[@]}"}
  else
    cargo build --profile "$profile" --target "$t" \
      -p outpost-runtime --bin outpost-runtime \
      -p outpost-agent --bin outpost-agent \
      ${extra[@]+"${extra[@]}"}
  fi
  echo "build-arm.sh: $t built in $((SECONDS - start)) s" >&2
done

# --- report: path, size, and proof of static linking (no ELF interpreter,
# no dynamic dependencies) — a device has neither musl nor a matching glibc.
# The dev and test profiles keep their output in target/<t>/debug.
dir=$profile
case "$profile" in dev|test) dir=debug ;; bench) dir=release ;; esac
readelf=$(command -v readelf || command -v aarch64-linux-gnu-readelf || command -v arm-linux-gnueabihf-readelf || true)
status=0
for t in "${targets[@]}"; do
  for bin in outpost-runtime outpost-agent; do
    path="${CARGO_TARGET_DIR:-target}/$t/$dir/$bin"
    if [ ! -f "$path" ]; then
      echo "build-arm.sh: missing $path" >&2; status=1; continue
    fi
    bytes=$(stat -c %s "$path")
    mib=$(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1048576 }')
    if [ -z "$readelf" ]; then
      linkage="linkage unchecked (no readelf)"
    elif LC_ALL=C "$readelf" -lW "$path" | grep -q 'Requesting program interpreter'; then
      echo "build-arm.sh: $path is dynamically linked" >&2; status=1
      linkage=DYNAMIC
    else
      linkage=static
    fi
    printf '%s\t%s MiB\t%s\n' "$path" "$mib" "$linkage"
  done
done
exit $status
