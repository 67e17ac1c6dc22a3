#!/usr/bin/env bash
# Fleet server memory with N provisioned devices connected to its embedded
# broker (issue 7's figure; the 10,000-device benchmark is the end-to-end
# issue's). Usage: bench/fleet/run.sh [N=1000]
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-1000}
# PROFILE=dev measures the debug build (dependencies at opt-level 1).
profile=${PROFILE:-release}
cargo build -q --profile "$profile" -p outpost-fleet --bin outpost-fleet --example fleet_load
bin=target/$([ "$profile" = dev ] && echo debug || echo "$profile")
dir=$(mktemp -d)
trap 'kill $server $load 2>/dev/null || true; rm -rf "$dir"' EXIT
api=$((20000 + RANDOM % 10000)); mqtt=$((api + 1))
token=bench-token-0123456789abcdef
$bin/outpost-fleet keygen --out "$dir/keys" >/dev/null
cat > "$dir/fleet.toml" <<TOML
data_dir = "data"
api_listen = "127.0.0.1:$api"
api_token = "$token"
keys_dir = "keys"
[broker]
listen = "127.0.0.1:$mqtt"
TOML
$bin/outpost-fleet serve --config "$dir/fleet.toml" 2>"$dir/serve.log" & server=$!
until curl -sf "http://127.0.0.1:$api/ready" >/dev/null; do sleep 0.1; done
rss() { awk '/VmRSS/ {print $2 " kB"}' /proc/$server/status; }
echo "server RSS idle: $(rss)"
$bin/examples/fleet_load --server "http://127.0.0.1:$api" --token "$token" --broker-port $mqtt --devices "$n" \
    >"$dir/load.out" 2>"$dir/load.log" & load=$!
until grep -q "all $n connected" "$dir/load.out" 2>/dev/null; do
    kill -0 $load 2>/dev/null || { cat "$dir/load.log"; exit 1; }
    sleep 0.5
done
cat "$dir/load.out"
sleep 5
echo "server RSS with $n devices connected: $(rss)"
curl -s "http://127.0.0.1:$api/metrics" | grep -E '^outpost_fleet_(devices|mqtt_messages_total)' || true
