#!/usr/bin/env python3
"""The batch job the way a Python user writes it: onnxruntime + pandas.

Reads the CSV in chunks with ``pandas.read_csv(chunksize=...)``, runs
``InferenceSession.run`` once per chunk on the feature columns, and appends
``line,prediction,probability`` rows with ``DataFrame.to_csv`` — the same
output ``outpost-runtime batch`` writes (``line`` is the 1-based line number
in the input file, so the header is line 1).

The breast-cancer classifiers come from skl2onnx with a ZipMap: onnxruntime
hands the probabilities back as a list of Python dicts. ``--probability``
picks what a user does about it:

* ``zipmap`` (default): fetch both outputs and take ``max`` of each dict;
* ``none``: fetch only the label output (the fastest onnxruntime path, with
  no probability column) — the strongest baseline there is for this model.

Prints one JSON line: rows, seconds, rows_per_sec, threads, chunk size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import onnxruntime as ort
import pandas as pd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--chunksize", type=int, default=100_000)
    ap.add_argument("--label-column", action="store_true", help="the last column is a label (not fed to the model)")
    ap.add_argument("--probability", choices=["zipmap", "none"], default="zipmap")
    args = ap.parse_args()

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    outputs = [o.name for o in sess.get_outputs()]
    fetch = outputs if args.probability == "zipmap" else outputs[:1]

    started = time.perf_counter()
    rows = 0
    with open(args.output, "w", newline="") as out:
        out.write("line,prediction,probability\n" if args.probability == "zipmap" else "line,prediction\n")
        for chunk in pd.read_csv(args.input, chunksize=args.chunksize):
            features = chunk.iloc[:, :-1] if args.label_column else chunk
            x = features.to_numpy(dtype=np.float32)
            result = sess.run(fetch, {input_name: x})
            frame = {"line": chunk.index.to_numpy() + 2, "prediction": result[0]}
            if args.probability == "zipmap":
                probs = result[1]
                if isinstance(probs, list):  # ZipMap: a dict per row
                    frame["probability"] = np.fromiter((max(d.values()) for d in probs), dtype=np.float32, count=len(probs))
                else:
                    frame["probability"] = np.asarray(probs).max(axis=1)
            pd.DataFrame(frame).to_csv(out, header=False, index=False)
            rows += len(chunk)
    seconds = time.perf_counter() - started
    print(json.dumps({
        "runtime": f"onnxruntime {ort.__version__} + pandas {pd.__version__}",
        "probability": args.probability,
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_sec": round(rows / seconds),
        "threads": args.threads,
        "chunksize": args.chunksize,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
