#!/usr/bin/env python3
"""Helpers of bench/fleet/run.sh (standard library only).

  bench.py pad MODEL.onnx OUT.onnx BYTES   -- a copy of MODEL grown to about BYTES
  bench.py report DIR LABEL                -- the figures of one run, as markdown

`pad` appends a `doc_string` field (ModelProto field 6) to the ONNX
protobuf: a valid model that computes exactly the same, but whose bundle is
the size the benchmark asks for (the issue's "100 KiB model").

`report` reads what run.sh left in DIR:
  sim.jsonl       the simulator's per-second JSON snapshots
  events.csv      unix_ms,device,event,detail from the simulator
  rollout.json    the last `rollout status ID --json`
  usage.csv       unix_ms,pid_label,utime+stime ticks,rss_kb,hwm_kb per second
  metrics.*.txt   the server's /metrics at named moments
  times.env       unix_ms of named moments (KEY=VALUE)
"""
import csv
import json
import os
import re
import sys


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pad(src, dst, size):
    model = open(src, "rb").read()
    extra = max(0, size - len(model) - 8)
    field = bytes([(6 << 3) | 2]) + varint(extra) + b"p" * extra
    open(dst, "wb").write(model + field)


def metric(path, name, **labels):
    """Sum of a Prometheus counter's samples matching `labels`."""
    total = 0.0
    if not os.path.exists(path):
        return None
    for line in open(path):
        if not line.startswith(name):
            continue
        m = re.match(r"^([a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line.strip())
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def report(d, label):
    times = {}
    for line in open(os.path.join(d, "times.env")):
        k, _, v = line.strip().partition("=")
        if k:
            times[k] = int(v)
    snaps = [json.loads(l) for l in open(os.path.join(d, "sim.jsonl")) if l.startswith("{")]
    snaps = [s.get("summary", s) for s in snaps]
    n = snaps[-1]["devices"] if snaps else 0
    connected_after = next((s["all_connected_after_secs"] for s in snaps if s.get("all_connected_after_secs")), None)
    out = [f"### {label}", ""]
    out.append(f"- devices: {n}; all connected after: "
               + (f"{connected_after:.1f} s" if connected_after else "not all connected"))

    # Telemetry absorbed: accepted telemetry+sketch messages per second over the steady window.
    t0, t1 = times.get("steady_start"), times.get("steady_end")
    m0, m1 = os.path.join(d, "metrics.steady_start.txt"), os.path.join(d, "metrics.steady_end.txt")
    if t0 and t1 and os.path.exists(m0) and os.path.exists(m1):
        secs = (t1 - t0) / 1000
        for kind in ["telemetry", "sketch", "state"]:
            a = metric(m0, "outpost_fleet_mqtt_messages_total", kind=kind, result="accepted") or 0
            b = metric(m1, "outpost_fleet_mqtt_messages_total", kind=kind, result="accepted") or 0
            out.append(f"- steady state, {kind} messages verified and absorbed: {(b - a) / secs:.0f}/s (over {secs:.0f} s)")
        rej = (metric(m1, "outpost_fleet_mqtt_messages_total", result="rejected") or 0)
        drop = (metric(m1, "outpost_fleet_mqtt_messages_total", kind="dropped") or 0)
        out.append(f"- messages rejected so far: {rej:.0f} (of which dropped at the full queue: {drop:.0f})")
    sent = [s for s in snaps if s["elapsed_secs"] * 1000 >= 0]
    if len(sent) > 2:
        first, last = sent[0], sent[-1]
        dt = last["elapsed_secs"] - first["elapsed_secs"]
        out.append(f"- simulator offered {(last['telemetry_sent'] - first['telemetry_sent']) / max(dt, 1):.0f} telemetry/s on average over the run")

    # The rollout.
    rpath = os.path.join(d, "rollout.json")
    if os.path.exists(rpath) and os.path.getsize(rpath) > 0:
        r = json.load(open(rpath))
        commits = {}
        for row in csv.reader(open(os.path.join(d, "events.csv"))):
            if len(row) >= 4 and row[2] == "committed":
                commits.setdefault(row[3], {})[row[1]] = int(row[0])
        name = r.get("target")
        c = commits.get(name, {}) if name else (next(iter(commits.values())) if commits else {})
        started = times.get("rollout_start")
        ended = times.get("rollout_end")
        st = r.get("stages", [])
        first = st[0].get("started_at_ms") if st else None
        last_end = max((x.get("ended_at_ms") or 0 for x in st), default=0)
        bake = r.get("policy", {}).get("bake_secs", 0)
        out.append(f"- rollout {r.get('id')}: state **{r.get('state')}**"
                   + (f", first stage start → last stage end {(last_end - first) / 1000:.1f} s" if first and last_end else "")
                   + f" (sum of bakes {bake * len(st):.0f} s, target ≤ {bake * len(st) + 60:.0f} s)"
                   + f"; {len(c)} devices committed {name or ''}")
        seen = set()
        rows = []
        for i, st in enumerate(r.get("stages", [])):
            devs = [x["id"] if isinstance(x, dict) else x for x in st.get("devices", [])]
            new = [x for x in devs if x not in seen]
            seen.update(devs)
            s_ms = st.get("started_at_ms")
            last_commit = max((c[x] for x in new if x in c), default=None)
            missing = sum(1 for x in new if x not in c)
            took = (last_commit - s_ms) / 1000 if (last_commit and s_ms) else None
            e_ms = st.get("ended_at_ms")
            rows.append(f"| {i + 1} | {st.get('percent')} % | {len(devs)} ({len(new)} new) | "
                        + (f"{took:.1f} s" if took is not None else "-")
                        + f" | {missing} | " + (f"{(e_ms - s_ms) / 1000:.1f} s" if e_ms and s_ms else "-") + " |")
        out += ["", "| stage | percent | devices | start → all its new devices committed | not committed | stage duration (incl. bake) |",
                "|---|---|---|---|---|---|"] + rows + [""]
        mb0, mb1 = os.path.join(d, "metrics.rollout_start.txt"), os.path.join(d, "metrics.rollout_end.txt")
        if started and ended and os.path.exists(mb1):
            b = (metric(mb1, "outpost_fleet_chunk_bytes_total") or 0) - (metric(mb0, "outpost_fleet_chunk_bytes_total") or 0)
            # Bytes/s while chunks flowed: from the simulator's per-second counters.
            rates = []
            for p, q in zip(snaps, snaps[1:]):
                dt = q["elapsed_secs"] - p["elapsed_secs"]
                if dt > 0:
                    rates.append((q["chunk_bytes_received"] - p["chunk_bytes_received"]) / dt)
            peak = max(rates, default=0)
            busy = [x for x in rates if x > 0]
            out.append(f"- artifact bytes served: {b / 2**20:.1f} MiB over the rollout; "
                       f"peak {peak / 2**20:.1f} MiB/s, mean {sum(busy) / max(len(busy), 1) / 2**20:.1f} MiB/s over the {len(busy)} s with chunks in flight")

    # CPU and memory.
    usage = {}
    for row in csv.reader(open(os.path.join(d, "usage.csv"))):
        if len(row) == 5:
            usage.setdefault(row[1], []).append((int(row[0]), int(row[2]), int(row[3]), int(row[4])))
    for who, rows in usage.items():
        if len(rows) < 2:
            continue
        peak_rss = max(r[2] for r in rows)
        hwm = max(r[3] for r in rows)
        cpu = []
        for p, q in zip(rows, rows[1:]):
            dt = (q[0] - p[0]) / 1000
            if dt > 0:
                cpu.append((q[1] - p[1]) / 100 / dt * 100)
        total = (rows[-1][1] - rows[0][1]) / 100
        out.append(f"- {who}: peak RSS {hwm / 1024:.0f} MiB (VmHWM; sampled max {peak_rss / 1024:.0f} MiB), "
                   f"CPU {total:.0f} s over {(rows[-1][0] - rows[0][0]) / 1000:.0f} s, peak {max(cpu, default=0):.0f} % of one core")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "pad":
        pad(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif len(sys.argv) == 4 and sys.argv[1] == "report":
        sys.stdout.write(report(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
