#!/usr/bin/env python3
"""Write exact drift statistics for the runtime's drift tests.

    python scripts/drift_reference.py            # writes fixtures/drift/cases.json

Needs numpy, scipy and scikit-learn (the versions pinned in
scripts/requirements-fixtures.txt; e.g. FIXTURE_PYTHON from
scripts/make_fixtures.sh, or any venv with those three packages).
Deterministic: seed 0 throughout; rerun after changing the binning rule.

What it computes, per case (a reference sample and a device sample):

* the equal-mass bin edges, with the SAME rule as
  `ColumnReference::quantile` in runtime/src/drift/reference.rs: sort the
  finite float32 values v[0..m]; cut points v[(i*m)//bins] for i in 1..bins;
  edges = v[0], each cut point above the previous edge, nextafter(v[m-1], +inf);
* bin counts (searchsorted side="right", NaN counted last),
* PSI on those bins (empty bins floored at 1e-4, like the runtime),
* Jensen-Shannon distance base 2 (scipy.spatial.distance.jensenshannon),
* the EXACT two-sample KS statistic on the raw values
  (scipy.stats.ks_2samp; NaN is ordered above +inf, as in the runtime),
* for class columns, the total variation distance.

The runtime tests (runtime/tests/drift_fixtures.rs) rebuild the bins, check
they match, check PSI/JS to 1e-9 and that the exact KS D lies inside the
interval the runtime derives from the bins alone.

Data: breast cancer as fixtures/data/bc_train.csv / bc_test.csv (reference =
train). If those files are missing the same split is recomputed from
sklearn (load_breast_cancer, train_test_split(test_size=0.25, stratify=y,
random_state=0)) -- but fixtures/data/ is owned by make_fixtures.py and is
not written here.
"""

import json
import os
import sys

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO, "fixtures", "drift")
PSI_EPSILON = 1e-4
F32 = np.float32


def load_bc():
    train = os.path.join(REPO, "fixtures", "data", "bc_train.csv")
    test = os.path.join(REPO, "fixtures", "data", "bc_test.csv")
    if os.path.exists(train) and os.path.exists(test):
        def read(path):
            with open(path) as f:
                names = f.readline().strip().split(",")
            # float32 straight from the shortest decimals the CSV holds.
            data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64).astype(F32)
            return names[:-1], data[:, :-1], data[:, -1].astype(np.int64)
        names, xtr, ytr = read(train)
        _, xte, yte = read(test)
        return names, xtr, ytr, xte, yte, "fixtures/data/bc_*.csv"
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    ds = load_breast_cancer()
    xtr, xte, ytr, yte = train_test_split(
        ds.data, ds.target, test_size=0.25, stratify=ds.target, random_state=0)
    return list(ds.feature_names), xtr.astype(F32), ytr, xte.astype(F32), yte, "sklearn split"


def edges_for(values, bins):
    v = np.sort(values[np.isfinite(values)].astype(F32))
    m = len(v)
    edges = [v[0]]
    for i in range(1, bins):
        cut = v[(i * m) // bins]
        if cut > edges[-1]:
            edges.append(cut)
    edges.append(np.nextafter(v[-1], F32(np.inf), dtype=F32))
    return np.array(edges, dtype=F32)


def counts_for(values, edges):
    values = values.astype(F32)
    nan = np.isnan(values)
    idx = np.searchsorted(edges, values[~nan], side="right")
    counts = np.bincount(idx, minlength=len(edges) + 1).astype(np.int64)
    return list(int(c) for c in counts) + [int(nan.sum())]


def psi(ref, dev):
    ref, dev = np.array(ref, dtype=np.float64), np.array(dev, dtype=np.float64)
    p = np.where(ref == 0, PSI_EPSILON, ref / ref.sum())
    q = np.where(dev == 0, PSI_EPSILON, dev / dev.sum())
    return float(np.sum((q - p) * np.log(q / p)))


def js(ref, dev):
    ref, dev = np.array(ref, dtype=np.float64), np.array(dev, dtype=np.float64)
    return float(jensenshannon(ref / ref.sum(), dev / dev.sum(), base=2))


def ks_exact(ref, dev):
    # NaN above everything (the runtime's order); 1e300 is above any float32.
    a = np.where(np.isnan(ref), 1e300, ref.astype(np.float64))
    b = np.where(np.isnan(dev), 1e300, dev.astype(np.float64))
    return float(stats.ks_2samp(a, b, method="asymp").statistic)


def f32_list(values):
    # Shortest decimal that round-trips to the float32; NaN as null.
    return [None if np.isnan(x) else float(str(F32(x))) for x in values]


def quantile_case(name, reference, sample, bins, reference_column=None):
    reference = reference.astype(F32)
    sample = sample.astype(F32)
    edges = edges_for(reference, bins)
    rc, dc = counts_for(reference, edges), counts_for(sample, edges)
    case = {
        "name": name,
        "kind": "quantile",
        "bins": bins,
        "edges": f32_list(edges),
        "reference_counts": rc,
        "sample_counts": dc,
        "psi": psi(rc, dc),
        "js_distance": js(rc, dc),
        "ks_d": ks_exact(reference, sample),
        "sample": f32_list(sample),
    }
    if reference_column is None:
        case["reference"] = f32_list(reference)
    else:
        case["reference_bc_train_column"] = reference_column
    return case


def class_case(name, reference, sample):
    labels = sorted(set(int(x) for x in reference))
    def counts(v):
        c = [int(np.sum(v == l)) for l in labels]
        return c + [int(len(v) - sum(c)), 0]
    rc, dc = counts(reference), counts(sample)
    p, q = np.array(rc) / sum(rc), np.array(dc) / sum(dc)
    return {
        "name": name,
        "kind": "classes",
        "labels": labels,
        "reference_counts": rc,
        "sample_counts": dc,
        "psi": psi(rc, dc),
        "js_distance": js(rc, dc),
        "tv": float(0.5 * np.abs(p - q).sum()),
        "reference_labels": [int(x) for x in reference],
        "sample_labels": [int(x) for x in sample],
    }


def main():
    rng = np.random.default_rng(0)
    names, xtr, ytr, xte, yte, source = load_bc()
    sd = xtr.astype(np.float64).std(axis=0, ddof=1)
    cases = []

    for j, name in enumerate(names):
        col, held = xtr[:, j], xte[:, j]
        cases.append(quantile_case(f"bc/{name}/held-out", col, held, 32, j))
        cases.append(quantile_case(
            f"bc/{name}/held-out+0.5sd", col, (held + F32(0.5 * sd[j])).astype(F32), 32, j))
        boot = rng.choice(col, size=500, replace=True)
        cases.append(quantile_case(
            f"bc/{name}/bootstrap500*1.2", col, (boot * F32(1.2)).astype(F32), 32, j))
    cases.append(class_case("bc/label/held-out", ytr, yte))
    cases.append(class_case("bc/label/more-benign", ytr, np.concatenate([yte, np.ones(60, dtype=np.int64)])))

    n = rng.normal(size=2000)
    cases.append(quantile_case("normal/null", n, rng.normal(size=1000), 32))
    cases.append(quantile_case("normal/mean+0.5", n, rng.normal(0.5, 1.0, size=1000), 32))
    cases.append(quantile_case("normal/scale*2", n, rng.normal(0.0, 2.0, size=1000), 32))
    cases.append(quantile_case("normal/8 bins", n, rng.normal(0.2, 1.0, size=300), 8))
    ln = rng.lognormal(size=2000)
    cases.append(quantile_case("lognormal/shift", ln, rng.lognormal(0.3, 1.0, size=1000), 32))
    ints = rng.integers(0, 6, size=2000).astype(F32)
    cases.append(quantile_case(
        "integers/ties", ints, rng.choice(6, size=800, p=[.3, .2, .2, .1, .1, .1]).astype(F32), 32))
    u = rng.uniform(size=2000)
    s = rng.uniform(size=1000)
    s[:50] = np.nan
    s[50:80] = rng.uniform(1.5, 3.0, size=30)
    s[80:90] = -1.0
    cases.append(quantile_case("uniform/nan+out-of-range", u, s, 32))
    r = rng.normal(size=2000)
    r[:100] = np.nan
    cases.append(quantile_case("normal/nan-in-reference", r, rng.normal(size=400), 32))
    cases.append(quantile_case("tiny/20 vs 7", rng.normal(size=20), rng.normal(size=7), 32))
    cases.append(quantile_case("constant/reference", np.full(50, 3.0), rng.normal(3.0, 1.0, size=40), 32))

    os.makedirs(OUT_DIR, exist_ok=True)
    out = {
        "generator": {
            "script": "scripts/drift_reference.py",
            "numpy": np.__version__,
            "scipy": __import__("scipy").__version__,
            "data": source,
            "psi_epsilon": PSI_EPSILON,
        },
        "cases": cases,
    }
    path = os.path.join(OUT_DIR, "cases.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(cases)} cases to {os.path.relpath(path, REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
