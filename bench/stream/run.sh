#!/usr/bin/env bash
# Streaming latency: message round trips app → mosquitto → outpost stream →
# bc_mlp → mosquitto → app on loopback, one in flight at a time (p50/p90/p99),
# then a burst for throughput and queue drops. Needs `mosquitto` on PATH.
#
#   bench/stream/run.sh
#   OUTPOST_BENCH_MESSAGES=20000 OUTPOST_BENCH_QOS=0 bench/stream/run.sh
#   OUTPOST_BENCH_BURST=50000 OUTPOST_BENCH_QUEUE=1024 bench/stream/run.sh
#
# Prints one JSON line (times in microseconds). The benchmark is
# runtime/benches/stream_latency.rs (a plain `main`, built by cargo bench
# with the release-like bench profile).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
command -v mosquitto >/dev/null || { echo "mosquitto not found (apt install mosquitto)" >&2; exit 1; }
cd "$repo"
cargo bench -q -p outpost-runtime --bench stream_latency 2>&1 \
  | grep '^{"bench"'
