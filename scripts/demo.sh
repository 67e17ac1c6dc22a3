#!/usr/bin/env bash
# The demo: the whole loop on this machine, in about a minute after the build.
#
#   builds outpost-fleet and outpost-agent (debug),
#   starts a fleet server (fresh keys, embedded MQTT broker, free ports),
#   provisions four devices (two tagged pi4, two pi5) and runs an agent for
#   each, with its own state directory and predict port,
#   publishes fixtures/bc_mlp.onnx as bc@1.0.0 through the publish gate,
#   rolls it out in two canary stages (50 %: one device per tag, then
#   100 %), printing each step as the fleet reports it, sends a prediction
#   to each device, and prints a summary.
#
# Exits 0 only if every claim held: the rollout completed, its first stage
# was smaller than the fleet, every device serves bc 1.0.0 (its own
# /v1/model says so) and answered the prediction.
# Everything it starts is stopped and its temporary directory removed,
# whatever happens. KEEP=1 keeps the directory (logs, configs) for a look.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in curl jq; do
  command -v "$tool" >/dev/null 2>&1 || { echo "demo: needs $tool (Debian/Ubuntu: sudo apt-get install $tool)" >&2; exit 1; }
done

t0=$(date +%s.%N)
since() { awk -v a="${1:-$t0}" -v b="$(date +%s.%N)" 'BEGIN { printf "%5.1fs", b - a }'; }
say() { printf '[%s] %s\n' "$(since)" "$*"; }
fail() { printf '[%s] demo: FAILED: %s\n' "$(since)" "$*" >&2; exit 1; }

say "building outpost-fleet and outpost-agent (debug)"
cargo build -q -p outpost-fleet -p outpost-agent
target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
fleet="$target_dir/debug/outpost-fleet"
agent="$target_dir/debug/outpost-agent"
t_built=$(date +%s.%N)
say "built"

work=$(mktemp -d "${TMPDIR:-/tmp}/outpost-demo.XXXXXX")
pids=()
cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "${KEEP:-}" = 1 ]; then echo "demo: kept $work"; else rm -rf "$work"; fi
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free port: a fixed one may belong to something else on this machine.
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 20000))
    (echo >/dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo $p; return; }
  done
}
wait_http() { # URL WHAT PID
  for _ in $(seq 1 300); do
    kill -0 "$3" 2>/dev/null || fail "$2 exited (log: $work)"
    curl -sf "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "$2 did not come up at $1"
}

# ---- the fleet server
api_port=$(free_port)
broker_port=$(free_port)
export OUTPOST_SERVER="http://127.0.0.1:$api_port"
OUTPOST_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
export OUTPOST_TOKEN
"$fleet" keygen --out "$work/keys" >/dev/null
cat >"$work/fleet.toml" <<EOF
data_dir   = "data"
api_listen = "127.0.0.1:$api_port"
api_token  = "$OUTPOST_TOKEN"
keys_dir   = "keys"

[broker]
listen = "127.0.0.1:$broker_port"
EOF
"$fleet" serve --config "$work/fleet.toml" 2>"$work/fleet.log" &
fleet_pid=$!
pids+=("$fleet_pid")
wait_http "$OUTPOST_SERVER/ready" "outpost-fleet serve" "$fleet_pid"
say "fleet server ready: API $OUTPOST_SERVER, embedded MQTT broker on 127.0.0.1:$broker_port"

# ---- four devices, two per hardware tag
devices=(dev-a:pi4 dev-b:pi5 dev-c:pi4 dev-d:pi5)
ids=()
declare -A port
for dev in "${devices[@]}"; do
  id=${dev%%:*}
  tag=${dev##*:}
  ids+=("$id")
  port[$id]=$(free_port)
  mkdir -p "$work/$id"
  "$fleet" provision "$id" --force --tag "$tag" --out "$work/$id/agent.toml" \
    --state-dir "$work/$id/state" --listen "127.0.0.1:${port[$id]}" >/dev/null
  # Demo tuning (real agent.toml keys): a short probation and frequent
  # telemetry, so a stage takes seconds instead of minutes.
  printf 'probation_secs = 3\ntelemetry_interval_secs = 1\nreconnect_max_ms = 2000\n' >>"$work/$id/agent.toml"
  "$agent" run --config "$work/$id/agent.toml" 2>"$work/$id/agent.log" &
  pids+=("$!")
  wait_http "http://127.0.0.1:${port[$id]}/health" "outpost-agent $id" "$!"
  say "device $id (tag $tag) provisioned and running: predict API on 127.0.0.1:${port[$id]}"
done
for _ in $(seq 1 100); do
  n=$("$fleet" devices --json | jq '[.devices[] | select(.status != null)] | length')
  [ "$n" -ge ${#ids[@]} ] && break
  sleep 0.2
done
[ "$n" -ge ${#ids[@]} ] || fail "the devices never reported to the fleet (log: $work)"
say "all ${#ids[@]} devices reported their signed state to the fleet"

# ---- publish
t=$(date +%s.%N)
pub=$("$fleet" publish fixtures/bc_mlp.onnx --name bc --version 1.0.0 \
  --train-data fixtures/data/bc_train.csv --test-data fixtures/data/bc_test.csv \
  --min-accuracy 0.9 --json)
say "published bc@1.0.0: accuracy $(jq -r '.accuracy.accuracy * 10000 | round / 10000' <<<"$pub") on $(jq -r .accuracy.total <<<"$pub") test rows (gate 0.9), signed bundle $(jq -r .bundle_size <<<"$pub") bytes, in $(since "$t" | tr -d " ")"

# ---- the apps on the devices: a prediction to each every 0.2 s, so the
# rollout's gates judge real traffic (error rate, p99 latency)
row=$(sed -n 2p fixtures/data/bc_test.csv | awk -F, 'BEGIN{OFS=","} {NF--; print}')
label=$(sed -n 2p fixtures/data/bc_test.csv | awk -F, '{print $NF}')
(
  while :; do
    for p in "${port[@]}"; do
      curl -s -o /dev/null -H 'content-type: application/json' -d "{\"features\":[$row]}" "http://127.0.0.1:$p/predict" || true
    done
    sleep 0.2
  done
) &
pids+=("$!")

# ---- roll out
t_rollout=$(date +%s.%N)
id=$("$fleet" rollout start bc@1.0.0 --stages 50,100 --bake 5s --max-error-rate 0.05 --max-p99-ms 50 --json | jq -r .id)
say "rollout $id started: stages 50%,100%, bake 5s, gates: error rate ≤ 0.05, p99 ≤ 50 ms"
say "plan: $("$fleet" rollout status "$id" --json | jq -r '[.stages[] | "stage \(.index + 1) (\(.percent)%): \([.devices[].id] | join(", "))"] | join("; ")') — each stage has at least one device per tag"
last=""
status=""
for _ in $(seq 1 900); do
  status=$("$fleet" rollout status "$id" --json) || fail "rollout status $id"
  # One line whenever the stage, the rollout's state or a device's changes.
  now=$(jq -r '[.state, .stage, ([.stages[].devices[] | "\(.id)=\(.state)"] | join(" "))] | join("|")' <<<"$status")
  if [ "$now" != "$last" ]; then
    say "$(jq -r '
      "stage \(.stage + 1)/\(.stages | length) (\(.stages[.stage].percent)%) \(.state): " +
      ([.stages[.stage].devices[] | "\(.id) \(.state)"] | join(", ")) +
      (if (.stages[.stage].gates // {}) == {} then "" else
        "; gates (value/limit) " + ([.stages[.stage].gates | to_entries[] | "\(.key) \(.value.value // "-" | if type == "number" then . * 1000 | round / 1000 else . end)/\(.value.limit // "-")"] | join(" ")) end)
      ' <<<"$status")"
    last=$now
  fi
  case $(jq -r .state <<<"$status") in
    completed | halted | aborted) break ;;
  esac
  sleep 0.5
done
state=$(jq -r .state <<<"$status")
say "rollout $id $state in $(since "$t_rollout" | tr -d " ")$(jq -r 'if .reason then ": " + .reason else "" end' <<<"$status")"

# ---- predictions, straight to each device's local API
declare -A answer version
ok=1
[ "$state" = completed ] || ok=0
# A real canary: the first stage is smaller than the fleet.
first=$(jq '.stages[0].devices | length' <<<"$status")
[ "$first" -lt ${#ids[@]} ] || ok=0
for id_ in "${ids[@]}"; do
  answer[$id_]=$(curl -s -H 'content-type: application/json' -d "{\"features\":[$row]}" "http://127.0.0.1:${port[$id_]}/predict" || true)
  version[$id_]=$(curl -s "http://127.0.0.1:${port[$id_]}/v1/model" | jq -r '.version // .model.version // "-"' 2>/dev/null || echo -)
  say "POST $id_ /predict (first test row, label $label) → ${answer[$id_]}"
  [ "${version[$id_]}" = 1.0.0 ] || ok=0
  [ "$(jq -r '.model.version // empty' <<<"${answer[$id_]}" 2>/dev/null)" = 1.0.0 ] || ok=0
done

# ---- summary
devices=$("$fleet" devices --json)
echo
printf '%-8s %-5s %-10s %-10s %-10s %s\n' DEVICE TAG "MODEL" "FLEET SAYS" "COMMITTED" "PREDICTION (p)"
for id_ in "${ids[@]}"; do
  printf '%-8s %-5s %-10s %-10s %-10s %s\n' "$id_" \
    "$(jq -r --arg d "$id_" '.devices[] | select(.id == $d) | .tags | join(",")' <<<"$devices")" \
    "bc@${version[$id_]}" \
    "$(jq -r --arg d "$id_" '.devices[] | select(.id == $d) | .status // "-"' <<<"$devices")" \
    "$(jq -r --arg d "$id_" '.devices[] | select(.id == $d) | .committed // "-"' <<<"$devices")" \
    "$(jq -r '"\(.prediction) (\(.probability // "-"))"' <<<"${answer[$id_]}" 2>/dev/null || echo -)"
done
echo
span() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1fs", b - a }'; }
t_end=$(date +%s.%N)
say "durations: build $(span "$t0" "$t_built"), fleet+devices+publish $(span "$t_built" "$t_rollout"), rollout+predictions $(span "$t_rollout" "$t_end"), total $(span "$t0" "$t_end")"
[ "$ok" = 1 ] || fail "not every claim held: rollout $state, first stage $first of ${#ids[@]} devices, versions $(for i in "${ids[@]}"; do printf '%s=%s ' "$i" "${version[$i]}"; done)(logs: rerun with KEEP=1)"
say "demo: ok — bc@1.0.0 rolled out in 2 stages ($first canaries, then all ${#ids[@]}), every device serves it and answers"
