#!/usr/bin/env python3
"""TFLite/LiteRT baseline: per-call inference latency of every TFLite fixture.

For each ``fixtures/*.tflite`` and each batch size (default 1 and 32) this
times set_tensor + invoke + get_tensor of ``tf.lite.Interpreter`` with
``num_threads=1`` on the fixture's own test rows (the 16 input rows stored in
``<model>.expected.json``; batch 1 cycles through them, larger batches repeat
them). The fixtures have a dynamic batch dimension (shape_signature -1), so a
batch of 32 is one invoke after resize_tensor_input; a fixed-batch model would
instead be invoked once per row ("mode": "rows").

Two kernel sets are measured, each reported separately ("resolver"):
  * "default": the interpreter's default, which applies the XNNPACK delegate
    (what LiteRT users get out of the box);
  * "builtin": BUILTIN_WITHOUT_DEFAULT_DELEGATES, TFLite's own kernels.

One JSON line per (model, resolver, batch) on stdout, same fields as
bench/ort_inference.py plus "resolver" and "mode". Run with the TF venv, e.g.
``bench/run_python_baselines.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import load_inputs, make_batch, summary, time_calls  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

RESOLVERS = {
    "default": tf.lite.experimental.OpResolverType.AUTO,
    "builtin": tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
}


def main():
    ap = argparse.ArgumentParser(description="tf.lite.Interpreter per-call latency of the TFLite fixtures")
    ap.add_argument("--fixtures", type=Path, default=REPO / "fixtures")
    ap.add_argument("--models", nargs="*", help="file names (default: every fixtures/*.tflite)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--resolvers", default="default,builtin", help="comma-separated: default,builtin")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--min-iters", type=int, default=2000)
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--max-iters", type=int, default=200_000)
    args = ap.parse_args()

    # --models may list both kinds (run_python_baselines.sh passes it to both scripts)
    models = [m for m in args.models if m.endswith(".tflite")] if args.models else sorted(
        p.name for p in args.fixtures.glob("*.tflite"))
    batches = [int(b) for b in args.batches.split(",") if b]
    runtime = f"tflite (tensorflow {tf.__version__})"
    print(f"# {runtime}, python {platform.python_version()}, {platform.machine()}", file=sys.stderr)
    for name in models:
        (inp_name, rows), = load_inputs(args.fixtures / f"{name}.expected.json").items()
        for resolver in args.resolvers.split(","):
            interp = tf.lite.Interpreter(
                model_path=str(args.fixtures / name),
                num_threads=args.threads,
                experimental_op_resolver_type=RESOLVERS[resolver],
            )
            (ind,) = interp.get_input_details()
            (outd,) = interp.get_output_details()
            assert ind["name"] == inp_name, (ind["name"], inp_name)
            dynamic = int(ind["shape_signature"][0]) == -1
            for batch in batches:
                if dynamic:
                    interp.resize_tensor_input(ind["index"], [batch] + list(ind["shape_signature"][1:]))
                    interp.allocate_tensors()
                    i_in = ind["index"]
                    i_out = interp.get_output_details()[0]["index"]

                    def call(x):
                        interp.set_tensor(i_in, x)
                        interp.invoke()
                        return interp.get_tensor(i_out).copy()

                    feeds = ([make_batch(rows, i, 1) for i in range(len(rows))] if batch == 1
                             else [make_batch(rows, 0, batch)])
                    mode = "batch"
                else:
                    interp.allocate_tensors()

                    def call(x):
                        outs = []
                        for r in x:
                            interp.set_tensor(ind["index"], r[None])
                            interp.invoke()
                            outs.append(interp.get_tensor(outd["index"]).copy())
                        return outs

                    feeds = ([make_batch(rows, i, 1) for i in range(len(rows))] if batch == 1
                             else [make_batch(rows, 0, batch)])
                    mode = "batch" if batch == 1 else "rows"
                times = time_calls(call, feeds, args.warmup, args.min_iters, args.min_time, args.max_iters)
                rec = {"model": name, "runtime": runtime, "resolver": resolver, "batch": batch,
                       "mode": mode, "threads": args.threads, **summary(times)}
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
