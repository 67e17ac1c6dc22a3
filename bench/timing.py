"""Timing helpers shared by bench/ort_inference.py and bench/tflite_inference.py
(numpy + stdlib only, so that both venvs can import it)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def load_inputs(expected_path: Path) -> dict[str, np.ndarray]:
    e = json.loads(expected_path.read_text())
    return {
        name: np.asarray(t["data"], dtype=t["dtype"]).reshape(t["shape"])
        for name, t in e["inputs"].items()
    }


def make_batch(rows: np.ndarray, start: int, batch: int) -> np.ndarray:
    idx = (start + np.arange(batch)) % len(rows)
    return np.ascontiguousarray(rows[idx])


def feeds_for(inputs: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(inputs.values())))
    if batch == 1:
        return [{k: make_batch(v, i, 1) for k, v in inputs.items()} for i in range(n)]
    return [{k: make_batch(v, 0, batch) for k, v in inputs.items()}]


def time_calls(call, feeds, warmup: int, min_iters: int, min_time: float, max_iters: int):
    n = len(feeds)
    for i in range(warmup):
        call(feeds[i % n])
    times = []
    deadline = time.perf_counter() + min_time
    i = 0
    while (len(times) < min_iters or time.perf_counter() < deadline) and len(times) < max_iters:
        f = feeds[i % n]
        t0 = time.perf_counter_ns()
        call(f)
        times.append(time.perf_counter_ns() - t0)
        i += 1
    return np.asarray(times, dtype=np.float64) / 1000.0


def summary(times_us: np.ndarray) -> dict:
    return {
        "iters": int(len(times_us)),
        "median_us": round(float(np.median(times_us)), 2),
        "mean_us": round(float(times_us.mean()), 2),
        "p90_us": round(float(np.percentile(times_us, 90)), 2),
        "p99_us": round(float(np.percentile(times_us, 99)), 2),
        "min_us": round(float(times_us.min()), 2),
    }
