#!/usr/bin/env bash
# The fleet benchmark (issue 9): N simulated devices (`outpost-fleet
# simulate`, one MQTT connection each, the agent's protocol code) against a
# fleet server on this machine, with its embedded broker and with mosquitto.
#
#   bench/fleet/run.sh [N=10000] [embedded|mosquitto|both=both]
#
# Each run: fresh keys and data; publish the fixture MLP padded to a
# 100 KiB model as bc@1.0.0; connect N devices (time to all connected);
# steady-state telemetry for STEADY seconds (messages absorbed per second);
# `rollout start bc@1.0.0 --stages 1,10,50,100 --bake BAKE` until it ends
# (per stage: start → all its devices committed); CPU and peak RSS of the
# server, of mosquitto and of the simulator, sampled from /proc every second.
# Figures go to stdout as markdown (bench/fleet/results.md holds a run).
#
# Knobs (environment): BAKE=10s, STEADY=20, TELEMETRY=5 (seconds between a
# device's telemetry), PROBATION=2 (seconds on the simulated devices), GATES,
# PROFILE=release, KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-10000}
which=${2:-both}
bake=${BAKE:-10s}
steady=${STEADY:-20}
telemetry=${TELEMETRY:-5}
probation=${PROBATION:-2}
profile=${PROFILE:-release}
# The reporting gate (share of a stage's devices that sent telemetry for the
# new version) is judged the moment the last device commits, before that
# device's next telemetry tick: at TELEMETRY=5 it would halt on cadence, not
# on capacity, so the benchmark gates on failed devices only.
gates=${GATES:---max-failed 0 --min-reporting 0}

# One socket per device in the simulator and in the broker, plus files.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# NO_BUILD=1 uses the binary already built (e.g. while the tree is mid-edit).
[ -n "${NO_BUILD:-}" ] || cargo build -q --profile "$profile" -p outpost-fleet --bin outpost-fleet
bin=$PWD/target/$([ "$profile" = dev ] && echo debug || echo "$profile")/outpost-fleet
token=bench-token-0123456789abcdef
now_ms() { date +%s%3N; }

# Samples utime+stime (ticks) and VmRSS/VmHWM (kB) of LABEL=PID pairs every second.
sample() {
    local out=$1; shift
    while true; do
        local t; t=$(now_ms)
        for pair in "$@"; do
            local label=${pair%%=*} pid=${pair#*=}
            [ -r "/proc/$pid/stat" ] || continue
            local ticks rss hwm
            ticks=$(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$pid/stat" 2>/dev/null) || continue
            rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
            hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
            echo "$t,$label,$ticks,$rss,$hwm"
        done >>"$out"
        sleep 1
    done
}

run_one() {
    local broker=$1
    local dir; dir=$(mktemp -d)
    local shm=/dev/shm; [ -d $shm ] || shm=$dir
    local state; state=$(mktemp -d "$shm/outpost-fleet-bench.XXXXXX")
    local api=$((20000 + RANDOM % 10000)); local mqtt=$((api + 1))
    local pids=()
    cleanup() {
        for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
        wait 2>/dev/null || true
        rm -rf "$state"
        [ -n "${KEEP:-}" ] && echo "kept $dir" >&2 || rm -rf "$dir"
    }
    trap cleanup RETURN
    mark() { echo "$1=$(now_ms)" >>"$dir/times.env"; curl -s "http://127.0.0.1:$api/metrics" >"$dir/metrics.$1.txt" || true; }

    "$bin" keygen --out "$dir/keys" >/dev/null
    local broker_toml
    if [ "$broker" = mosquitto ]; then
        # Anonymous: the benchmark measures routing, not mosquitto's password
        # file (the fleet still believes only device-signed messages). Queues
        # sized for one subscriber (the fleet) receiving from 10,000 devices.
        cat >"$dir/mosquitto.conf" <<CONF
listener $mqtt 127.0.0.1
allow_anonymous true
persistence false
max_packet_size 1200000
max_queued_messages 100000
max_inflight_messages 200
CONF
        mosquitto -c "$dir/mosquitto.conf" 2>"$dir/mosquitto.log" & pids+=($!)
        local mosq=$!
        until (exec 3<>/dev/tcp/127.0.0.1/$mqtt) 2>/dev/null; do sleep 0.1; done
        broker_toml="url = \"mqtt://127.0.0.1:$mqtt\""
    else
        broker_toml="listen = \"127.0.0.1:$mqtt\""
    fi
    cat >"$dir/fleet.toml" <<TOML
data_dir = "data"
api_listen = "127.0.0.1:$api"
api_token = "$token"
keys_dir = "keys"
[broker]
$broker_toml
public_url = "mqtt://127.0.0.1:$mqtt"
TOML
    "$bin" serve --config "$dir/fleet.toml" 2>"$dir/serve.log" & pids+=($!)
    local server=$!
    until curl -sf "http://127.0.0.1:$api/ready" >/dev/null; do
        kill -0 $server 2>/dev/null || { cat "$dir/serve.log" >&2; return 1; }
        sleep 0.1
    done
    export OUTPOST_SERVER=http://127.0.0.1:$api OUTPOST_TOKEN=$token
    python3 bench/fleet/bench.py pad fixtures/bc_mlp.onnx "$dir/model.onnx" $((100 * 1024))
    "$bin" publish "$dir/model.onnx" --name bc --version 1.0.0 --train-data fixtures/data/bc_train.csv \
        --test-data fixtures/data/bc_test.csv --min-accuracy 0.9 --quiet >"$dir/publish.txt"
    local bundle_bytes; bundle_bytes=$(curl -s -H "Authorization: Bearer $token" "http://127.0.0.1:$api/v1/models" | jq '[.versions[] | .bundle_size] | max')

    local samplers=("server=$server")
    [ "$broker" = mosquitto ] && samplers+=("mosquitto=$mosq")
    mark connect_start
    "$bin" simulate --devices "$n" --state-dir "$state" --events "$dir/events.csv" --json \
        --telemetry-interval-secs "$telemetry" --probation-secs "$probation" \
        >"$dir/sim.jsonl" 2>"$dir/sim.log" & pids+=($!)
    local sim=$!
    samplers+=("simulator=$sim")
    sample "$dir/usage.csv" "${samplers[@]}" & pids+=($!)
    # All connected (the simulator's own clock), or give up after 10 minutes.
    local t0; t0=$(date +%s)
    until grep -q '"all_connected_after_secs":[0-9]' "$dir/sim.jsonl" 2>/dev/null; do
        kill -0 $sim 2>/dev/null || { tail -5 "$dir/sim.log" >&2; return 1; }
        [ $(($(date +%s) - t0)) -lt 600 ] || { echo "not all connected after 600 s" >&2; break; }
        sleep 1
    done
    mark connected
    sleep 5

    mark rollout_start
    # shellcheck disable=SC2086
    local id; id=$("$bin" rollout start bc@1.0.0 --stages 1,10,50,100 --bake "$bake" $gates 2>>"$dir/rollout.log")
    local state_now=running
    t0=$(date +%s)
    while [ "$state_now" = running ] || [ "$state_now" = paused ]; do
        sleep 3
        "$bin" rollout status "$id" --json >"$dir/rollout.json" 2>/dev/null || true
        state_now=$(jq -r .state "$dir/rollout.json" 2>/dev/null || echo running)
        [ $(($(date +%s) - t0)) -lt 900 ] || { echo "rollout still $state_now after 900 s" >&2; break; }
    done
    mark rollout_end
    # Steady state with every device serving: telemetry and sketches.
    sleep 5
    mark steady_start
    sleep "$steady"
    mark steady_end
    {
        echo "bundle: $bundle_bytes bytes"
        python3 bench/fleet/bench.py report "$dir" "$broker broker, $n devices"
    } | tee "$dir/report.md"
}

case $which in
    embedded) run_one embedded ;;
    mosquitto) run_one mosquitto ;;
    both) run_one embedded; run_one mosquitto ;;
    *) echo "usage: $0 [N] [embedded|mosquitto|both]" >&2; exit 2 ;;
esac
