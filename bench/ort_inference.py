#!/usr/bin/env python3
"""onnxruntime baseline: per-call inference latency of every ONNX fixture.

For each ``fixtures/*.onnx`` (not ``fixtures/bad/``) and each batch size
(default 1 and 32) this times ``InferenceSession.run`` through the Python API
with one intra-op and one inter-op thread, sequential execution and the
default (full) graph optimizations, on the fixture's own test rows: the 16
input rows stored in ``<model>.expected.json``. Batch 1 cycles through the 16
rows one at a time; larger batches repeat the 16 rows to fill the batch. All
outputs are fetched, as a server would (for the skl2onnx classifiers that
includes building the ZipMap list of Python dicts, part of the Python cost).

After a warm-up, every call is timed separately (time.perf_counter_ns) until
both --min-iters calls and --min-time seconds have been spent. One JSON line
per (model, batch) goes to stdout:

  {"model": "bc_mlp.onnx", "runtime": "onnxruntime 1.32.0", "batch": 1, "threads": 1,
   "iters": 20000, "median_us": 41.2, "mean_us": 43.0, "p90_us": ..., "p99_us": ..., "min_us": ...}

Run with the fixture venv, e.g. ``bench/run_python_baselines.sh`` or
``FIXTURE_PYTHON=... bench/run_python_baselines.sh``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import feeds_for, load_inputs, summary, time_calls  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description="onnxruntime per-call latency of the ONNX fixtures (JSON lines)")
    ap.add_argument("--fixtures", type=Path, default=REPO / "fixtures")
    ap.add_argument("--models", nargs="*", help="file names (default: every fixtures/*.onnx)")
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1; inter-op is 1)")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--min-iters", type=int, default=2000)
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per (model, batch), at least")
    ap.add_argument("--max-iters", type=int, default=200_000)
    args = ap.parse_args()

    # --models may list both kinds (run_python_baselines.sh passes it to both scripts)
    models = [m for m in args.models if m.endswith(".onnx")] if args.models else sorted(
        p.name for p in args.fixtures.glob("*.onnx"))
    batches = [int(b) for b in args.batches.split(",") if b]
    print(
        f"# onnxruntime {ort.__version__}, python {platform.python_version()}, {platform.machine()}, "
        f"{platform.processor() or platform.platform()}",
        file=sys.stderr,
    )
    for name in models:
        path = args.fixtures / name
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inputs = load_inputs(args.fixtures / f"{name}.expected.json")
        for batch in batches:
            feeds = feeds_for(inputs, batch)
            times = time_calls(lambda f: sess.run(None, f), feeds, args.warmup, args.min_iters,
                               args.min_time, args.max_iters)
            rec = {"model": name, "runtime": f"onnxruntime {ort.__version__}", "batch": batch,
                   "threads": args.threads, **summary(times)}
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
