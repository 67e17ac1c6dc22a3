#!/usr/bin/env python3
"""Runs `outpost-runtime batch` and the onnxruntime + pandas script on the
same CSV, alternately, and reports wall time, rows per second, CPU time and
peak resident memory of each (from wait4's rusage of the child), plus a
check that both wrote the same predictions.

Called by bench/batch/run.sh; prints a table on stderr and one JSON object
on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def run(cmd: list[str], work: str) -> dict:
    # Output to files, not pipes: nothing to drain while waiting on the child.
    out_path, err_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        # wait4 gives this child's own rusage: CPU time and peak RSS.
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(open(err_path, errors="replace").read())
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_mib": usage.ru_maxrss / 1024,
        "stdout": open(out_path, errors="replace").read(),
    }


def predictions(path: str, limit: int) -> list[tuple[str, str]]:
    rows = []
    with open(path) as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split(",")
            rows.append((parts[0], parts[1]))
            if len(rows) >= limit:
                break
    return rows


def count_lines(path: str) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--python", required=True)
    ap.add_argument("--script", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--probability", default="zipmap")
    ap.add_argument("--cpus", default="", help="taskset CPU list both runs are pinned to")
    args = ap.parse_args()

    pin = ["taskset", "-c", args.cpus] if args.cpus else []
    ours_out = os.path.join(args.work, "ours.csv")
    py_out = os.path.join(args.work, "python.csv")
    ours_cmd = pin + [args.bin, "batch", "--model", args.model, "--input", args.input, "--output", ours_out,
                      "--label-column", "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--json"]
    py_cmd = pin + [args.python, args.script, "--model", args.model, "--input", args.input, "--output", py_out,
                    "--label-column", "--threads", str(args.threads), "--probability", args.probability]
    results = {"ours": [], "python": []}
    for i in range(args.repeat):
        for name, cmd in (("ours", ours_cmd), ("python", py_cmd)):
            r = run(cmd, args.work)
            results[name].append(r)
            print(f"  run {i + 1} {name:6}: {r['wall_s']:6.2f} s wall, {r['cpu_s']:6.2f} s CPU, "
                  f"{args.rows / r['wall_s']:>10,.0f} rows/s, peak RSS {r['max_rss_mib']:.0f} MiB", file=sys.stderr)

    # Same predictions, same lines (probabilities are both f32, compared as text would be too strict).
    same = predictions(ours_out, 100_000) == predictions(py_out, 100_000)
    lines_ok = count_lines(ours_out) == count_lines(py_out) == args.rows + 1

    def summary(name):
        walls = [r["wall_s"] for r in results[name]]
        best = min(walls)
        return {
            "median_wall_s": round(statistics.median(walls), 3),
            "best_wall_s": round(best, 3),
            "rows_per_sec_median": round(args.rows / statistics.median(walls)),
            "rows_per_sec_best": round(args.rows / best),
            "cpu_s_median": round(statistics.median(r["cpu_s"] for r in results[name]), 3),
            "max_rss_mib": round(max(r["max_rss_mib"] for r in results[name]), 1),
        }

    ours, py = summary("ours"), summary("python")
    report = {
        "rows": args.rows,
        "input_mib": round(os.path.getsize(args.input) / 2**20, 1),
        "threads": args.threads,
        "cpus": args.cpus or "all",
        "python_probability": args.probability,
        "ours": ours,
        "python": py,
        "speedup_median": round(ours["rows_per_sec_median"] / py["rows_per_sec_median"], 2),
        "speedup_best": round(ours["rows_per_sec_best"] / py["rows_per_sec_best"], 2),
        "cpu_ratio": round(py["cpu_s_median"] / ours["cpu_s_median"], 2),
        "same_predictions_first_100k": same,
        "same_line_count": lines_ok,
        "ours_summary": json.loads(results["ours"][-1]["stdout"].strip().splitlines()[-1]),
        "python_summary": json.loads(results["python"][-1]["stdout"].strip().splitlines()[-1]),
    }
    print(json.dumps(report))
    print(f"\n{'':8}{'rows/s (median)':>16}{'rows/s (best)':>15}{'CPU s':>8}{'peak RSS':>10}", file=sys.stderr)
    for name, s in (("outpost", ours), ("python", py)):
        print(f"{name:8}{s['rows_per_sec_median']:>16,}{s['rows_per_sec_best']:>15,}{s['cpu_s_median']:>8.2f}"
              f"{s['max_rss_mib']:>8.0f} MiB", file=sys.stderr)
    print(f"speed-up {report['speedup_median']}x (median), {report['speedup_best']}x (best); "
          f"same predictions: {same and lines_ok}", file=sys.stderr)
    return 0 if same and lines_ok else 1


if __name__ == "__main__":
    sys.exit(main())
