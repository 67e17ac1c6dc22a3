#!/usr/bin/env python3
"""Generate Outpost's model fixtures (top-level ``fixtures/``).

Small but REAL models trained on data sets that scikit-learn bundles, with
fixed seeds, plus the reference outputs the Rust runtime is tested against.

Two Python environments are involved because TensorFlow and the
scikit-learn/skl2onnx/onnxruntime stack are kept apart:

* the "fixture" environment runs this file (requirements-fixtures.txt);
* the "tf" environment runs ``make_fixtures.py --stage tf`` as a subprocess
  (requirements-tf.txt): it trains the Keras models, writes the .tflite files
  and their expected outputs, and hands the CNN weights over in
  ``fixtures/digits_cnn_weights.npz``.

Normally run through ``scripts/make_fixtures.sh``, which creates the venvs
(``.venv-fixtures/``, ``.venv-tf/``) or uses ``FIXTURE_PYTHON`` / ``TF_PYTHON``.
With ``--no-tf`` the TensorFlow stage is skipped: the .tflite files, their
expected outputs and the CNN weights already in ``fixtures/`` are reused.

What is produced (see the generated fixtures/README.md and manifest.json):

  data/bc_train.csv, data/bc_test.csv, data/digits_test.csv
  bc_mlp.onnx          StandardScaler + MLPClassifier(32,16), skl2onnx defaults (keeps ZipMap)
  bc_gb.onnx           StandardScaler + GradientBoostingClassifier(50, depth 3), defaults
  bc_mlp_int8.onnx     quantize_dynamic(bc_mlp.onnx), weights QInt8 (MatMulInteger)
  bc_mlp_qdq.onnx      quantize_static(bc_mlp.onnx), QDQ, per-tensor, S8S8
  digits_cnn.onnx      Keras CNN rebuilt with onnx.helper (NCHW), checked against Keras
  digits_cnn_int8.onnx quantize_static(digits_cnn.onnx), QDQ, per-tensor, U8S8
  digits_cnn.tflite, digits_cnn_fp16.tflite, digits_cnn_int8.tflite, bc_mlp_prelu.tflite
  <model file>.expected.json for each model (e.g. digits_cnn.onnx.expected.json),
  bad/ (malformed and unsupported models)

Quantization decisions (all verified with onnxruntime by this script):

* quantize_dynamic works directly on the skl2onnx model WITH its ZipMap and
  ai.onnx.ml Scaler: ORT only rewrites the MatMul nodes (DynamicQuantizeLinear
  -> MatMulInteger -> Cast -> Mul) and leaves the rest alone. No
  pre-processing (onnxruntime.quantization.quant_pre_process) is applied: it
  needs sympy for symbolic shape inference and changes nothing for these
  graphs.
* quantize_static (QDQ) also works on the ZipMap model. It is restricted to
  op_types_to_quantize=["MatMul", "Add"]: letting ORT also quantize the
  Sigmoid/Sub/Concat head turns the probabilities into exact 0.0/1.0 steps.
  Activations QInt8 + weights QInt8 ("S8S8", ORT's recommended QDQ format on
  CPU), per-tensor, MinMax calibration on the training rows.
* The CNN's QDQ model uses activations QUInt8 + weights QInt8 ("U8S8"),
  per-tensor, MinMax calibration on the training images, all op types, so the
  fixtures cover both int8 and uint8 activation zero points.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SEED = 0
N_EXPECTED = 16  # rows in every <model file>.expected.json
DIGITS_TEST_ROWS = 200  # size of the digits test split (= rows of digits_test.csv)
CNN_TOLERANCE = 1e-4  # |onnx - keras| on the digits test rows
KERAS_CNN_EPOCHS = 15
KERAS_PRELU_EPOCHS = 60
TFLITE_INT8_CALIBRATION_ROWS = 500


# --------------------------------------------------------------------------
# shared helpers (importable from both venvs: stdlib + numpy + scikit-learn)
# --------------------------------------------------------------------------

def f32_text(v) -> str:
    """Shortest decimal text that round-trips to the same float32."""
    return str(np.float32(v))


def f32_list(a) -> list:
    """Flat list of Python floats whose JSON text round-trips to the float32 values."""
    return [float(f32_text(v)) for v in np.asarray(a, dtype=np.float32).ravel()]


def tensor_json(a, dtype: str | None = None) -> dict:
    a = np.asarray(a)
    dtype = dtype or str(a.dtype)
    if dtype == "float32":
        data = f32_list(a)
    elif dtype in ("int64", "int32", "int8", "uint8"):
        data = [int(v) for v in a.ravel()]
    else:
        raise ValueError(f"unsupported dtype {dtype}")
    return {"dtype": dtype, "shape": list(a.shape), "data": data}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_breast_cancer_split():
    """Breast cancer, float32 features, stratified 75/25 split, seed 0.

    Labels as scikit-learn ships them: 0 = malignant, 1 = benign.
    """
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    d = load_breast_cancer()
    X = d.data.astype(np.float32)
    y = d.target.astype(np.int64)
    Xtr, Xte, ytr, yte = train_test_split(
        X, y, test_size=0.25, stratify=y, random_state=SEED
    )
    return [str(n) for n in d.feature_names], Xtr, Xte, ytr, yte


def load_digits_split():
    """Digits 8x8, raw pixel values 0..16 (float32), stratified split keeping
    DIGITS_TEST_ROWS rows for test, seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = d.data.astype(np.float32)
    y = d.target.astype(np.int64)
    Xtr, Xte, ytr, yte = train_test_split(
        X, y, test_size=DIGITS_TEST_ROWS, stratify=y, random_state=SEED
    )
    return [str(n) for n in d.feature_names], Xtr, Xte, ytr, yte


def digits_nchw(X):
    """Raw 0..16 pixels [N,64] -> model input [N,1,8,8] scaled to 0..1."""
    return (np.asarray(X, np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)


def digits_nhwc(X):
    """Raw 0..16 pixels [N,64] -> model input [N,8,8,1] scaled to 0..1."""
    return (np.asarray(X, np.float32) / np.float32(16.0)).reshape(-1, 8, 8, 1)


def write_csv(path: Path, names, X, y):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="\n") as f:
        f.write(",".join(list(names) + ["label"]) + "\n")
        for row, label in zip(X, y):
            f.write(",".join(f32_text(v) for v in row) + f",{int(label)}\n")


def json_text(o, level: int = 0) -> str:
    """Indented JSON, but lists of scalars (tensor data, shapes) on one line."""
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(o, dict) and o:
        items = [f"{inner}{json.dumps(str(k))}: {json_text(v, level + 1)}" for k, v in o.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(o, list) and any(isinstance(v, (dict, list)) for v in o):
        return "[\n" + ",\n".join(inner + json_text(v, level + 1) for v in o) + "\n" + pad + "]"
    return json.dumps(o, ensure_ascii=False)


def write_json(path: Path, obj):
    path.write_text(json_text(obj) + "\n")


def log(*a):
    print("[make_fixtures]", *a, flush=True)


# --------------------------------------------------------------------------
# ONNX stage (fixture venv)
# --------------------------------------------------------------------------

def onnx_value_info(vi) -> dict:
    t = vi.type
    if t.HasField("tensor_type"):
        from onnx import helper

        dims = []
        for d in t.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        return {
            "name": vi.name,
            "dtype": helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type).name,
            "shape": dims,
        }
    if t.HasField("sequence_type"):
        m = t.sequence_type.elem_type.map_type
        from onnx import helper

        k = helper.tensor_dtype_to_np_dtype(m.key_type).name
        v = helper.tensor_dtype_to_np_dtype(m.value_type.tensor_type.elem_type).name
        return {"name": vi.name, "type": f"seq(map({k},{v}))", "zipmap": True}
    return {"name": vi.name, "type": str(t)}


def onnx_ops(path: Path) -> list[str]:
    """Op types in node order, 'domain:Op' outside the default domain."""
    import onnx

    m = onnx.load(str(path))
    return [
        (f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
        for n in m.graph.node
    ]


def unique(seq):
    out = []
    for s in seq:
        if s not in out:
            out.append(s)
    return out


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    # Reference outputs follow the ONNX operators' own definitions: with graph
    # optimizations on, onnxruntime fuses QDQ pairs into QLinear* kernels whose
    # requantization differs from the graph as written (by up to 0.26 on a
    # probability of digits_cnn_int8.onnx). For float models both agree to 1e-7.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def zipmap_classes(path: Path, output_name: str):
    """Class labels (ZipMap attribute order) of the ZipMap producing output_name."""
    import onnx
    from onnx import helper

    m = onnx.load(str(path))
    for n in m.graph.node:
        if n.op_type == "ZipMap" and output_name in n.output:
            for a in n.attribute:
                if a.name in ("classlabels_int64s", "classlabels_strings"):
                    return list(helper.get_attribute_value(a))
    raise ValueError(f"no ZipMap produces {output_name} in {path}")


def ort_expected(path: Path, feeds: dict) -> dict:
    """Run onnxruntime and convert every output to a JSON tensor (ZipMap -> [N, C])."""
    import onnxruntime as ort

    sess = ort_session(path)
    names = [o.name for o in sess.get_outputs()]
    results = sess.run(names, feeds)
    outputs = {}
    for name, value in zip(names, results):
        if isinstance(value, list) and value and isinstance(value[0], dict):
            classes = zipmap_classes(path, name)
            arr = np.array([[row[c] for c in classes] for row in value], dtype=np.float32)
            entry = tensor_json(arr, "float32")
            entry["zipmap"] = True
            entry["classes"] = [int(c) if not isinstance(c, (bytes, str)) else str(c) for c in classes]
            outputs[name] = entry
        else:
            outputs[name] = tensor_json(value)
    return {
        "model": path.name,
        "runtime": f"onnxruntime {ort.__version__}",
        "batch_mode": "batch",
        "inputs": {k: tensor_json(v) for k, v in feeds.items()},
        "outputs": outputs,
    }


def ort_predict_labels(path: Path, input_name: str, X) -> np.ndarray:
    """Predicted class per row: the int64 label output if there is one, else argmax."""
    sess = ort_session(path)
    outs = sess.run(None, {input_name: X})
    for o, value in zip(sess.get_outputs(), outs):
        if "int64" in o.type and np.asarray(value).ndim == 1:
            return np.asarray(value)
    return np.asarray(outs[0]).argmax(axis=1)


class ArrayReader:
    """onnxruntime CalibrationDataReader over an array, in fixed-size chunks."""

    def __init__(self, input_name: str, X, chunk: int = 32):
        self.feeds = [{input_name: X[i : i + chunk]} for i in range(0, len(X), chunk)]
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.feeds):
            return None
        self.pos += 1
        return self.feeds[self.pos - 1]

    def rewind(self):
        self.pos = 0


def build_bc_onnx(out: Path, manifest: dict):
    import onnx
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    _, Xtr, Xte, ytr, yte = load_breast_cancer_split()
    initial_types = [("features", FloatTensorType([None, Xtr.shape[1]]))]
    # Pinned so that a newer skl2onnx does not silently raise the opset;
    # skl2onnx then emits the lowest opset each model actually needs.
    target_opset = {"": 17, "ai.onnx.ml": 3}

    pipelines = {
        "bc_mlp.onnx": (
            Pipeline([
                ("scaler", StandardScaler()),
                ("mlp", MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=500, random_state=SEED)),
            ]),
            "breast cancer: StandardScaler + MLPClassifier(hidden_layer_sizes=(32,16), max_iter=500), "
            "skl2onnx default options (ZipMap kept)",
        ),
        "bc_gb.onnx": (
            Pipeline([
                ("scaler", StandardScaler()),
                ("gb", GradientBoostingClassifier(n_estimators=50, max_depth=3, random_state=SEED)),
            ]),
            "breast cancer: StandardScaler + GradientBoostingClassifier(n_estimators=50, max_depth=3), "
            "skl2onnx default options (ZipMap kept)",
        ),
        "bc_logreg.onnx": (
            Pipeline([
                ("scaler", StandardScaler()),
                ("logreg", LogisticRegression(max_iter=1000, random_state=SEED)),
            ]),
            "breast cancer: StandardScaler + LogisticRegression(max_iter=1000), "
            "skl2onnx default options (ZipMap kept)",
        ),
        "bc_rf.onnx": (
            Pipeline([
                ("scaler", StandardScaler()),
                ("rf", RandomForestClassifier(n_estimators=30, max_depth=6, random_state=SEED)),
            ]),
            "breast cancer: StandardScaler + RandomForestClassifier(n_estimators=30, max_depth=6), "
            "skl2onnx default options (ZipMap kept)",
        ),
    }
    for fname, (pipe, desc) in pipelines.items():
        pipe.fit(Xtr, ytr)
        onx = convert_sklearn(pipe, initial_types=initial_types, target_opset=target_opset)
        onx.producer_name = "outpost-fixtures (skl2onnx)"
        onx.graph.name = Path(fname).stem  # skl2onnx uses a random uuid: keep the file reproducible
        onnx.save(onx, str(out / fname))
        manifest["models"][fname] = {
            "description": desc,
            "reference_accuracy": {"sklearn": float(pipe.score(Xte, yte))},
        }
        log(f"{fname}: sklearn test accuracy {pipe.score(Xte, yte):.4f}")

    # Dynamic quantization, directly on the ZipMap model (see module docstring).
    quantize_dynamic(
        str(out / "bc_mlp.onnx"),
        str(out / "bc_mlp_int8.onnx"),
        weight_type=QuantType.QInt8,
        per_channel=False,
    )
    manifest["models"]["bc_mlp_int8.onnx"] = {
        "description": "bc_mlp.onnx after onnxruntime.quantization.quantize_dynamic(weight_type=QInt8, "
        "per_channel=False): MatMul -> DynamicQuantizeLinear(uint8) + MatMulInteger(int8 weights); "
        "Scaler and ZipMap untouched",
    }

    # Static QDQ quantization, calibrated on the training rows.
    quantize_static(
        str(out / "bc_mlp.onnx"),
        str(out / "bc_mlp_qdq.onnx"),
        ArrayReader("features", Xtr),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=False,
        op_types_to_quantize=["MatMul", "Add"],
    )
    manifest["models"]["bc_mlp_qdq.onnx"] = {
        "description": "bc_mlp.onnx after onnxruntime.quantization.quantize_static, QuantFormat.QDQ, "
        "activations QInt8 + weights QInt8 (S8S8), per-tensor, MinMax calibration on bc_train rows, "
        "op_types_to_quantize=[MatMul, Add] (biases as int32 DequantizeLinear); ZipMap kept",
    }

    for fname in ("bc_mlp.onnx", "bc_gb.onnx", "bc_logreg.onnx", "bc_rf.onnx", "bc_mlp_int8.onnx", "bc_mlp_qdq.onnx"):
        path = out / fname
        write_json(out / f"{path.name}.expected.json", ort_expected(path, {"features": Xte[:N_EXPECTED]}))
        pred = ort_predict_labels(path, "features", Xte)
        acc = float((pred == yte).mean())
        manifest["models"][fname].update({"test_accuracy": acc, "test_data": "data/bc_test.csv"})
        log(f"{fname}: onnxruntime test accuracy {acc:.4f}")


def build_cnn_onnx(w: dict, path: Path):
    """digits CNN from the Keras weights, NCHW, opset 13.

    Keras: NHWC input, Conv2D kernels (kh, kw, cin, cout), Flatten of an NHWC
    [4,4,16] map (h, w, c order). ONNX: NCHW, Conv weights (cout, cin, kh, kw),
    Flatten of an NCHW map (c, h, w order): the Dense kernel rows are permuted
    from (h, w, c) to (c, h, w) instead of adding a Transpose.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k1 = np.ascontiguousarray(w["conv1_kernel"].transpose(3, 2, 0, 1))  # (8,1,3,3)
    k2 = np.ascontiguousarray(w["conv2_kernel"].transpose(3, 2, 0, 1))  # (16,8,3,3)
    dk = w["dense_kernel"]  # (256,10), rows in (h,w,c) order of a 4x4x16 map
    h, ww, c = 4, 4, k2.shape[0]
    dk_nchw = np.ascontiguousarray(dk.reshape(h, ww, c, -1).transpose(2, 0, 1, 3).reshape(h * ww * c, -1))
    inits = [
        numpy_helper.from_array(k1.astype(np.float32), "conv1.weight"),
        numpy_helper.from_array(w["conv1_bias"].astype(np.float32), "conv1.bias"),
        numpy_helper.from_array(k2.astype(np.float32), "conv2.weight"),
        numpy_helper.from_array(w["conv2_bias"].astype(np.float32), "conv2.bias"),
        numpy_helper.from_array(dk_nchw.astype(np.float32), "dense.weight"),
        numpy_helper.from_array(w["dense_bias"].astype(np.float32), "dense.bias"),
    ]
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    nodes = [
        helper.make_node("Conv", ["image", "conv1.weight", "conv1.bias"], ["conv1"], name="conv1", **conv),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool1", "conv2.weight", "conv2.bias"], ["conv2"], name="conv2", **conv),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("Flatten", ["relu2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "dense.weight", "dense.bias"], ["logits"], name="dense"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="outpost-fixtures"
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def build_cnn_models(out: Path, manifest: dict):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    wpath = out / "digits_cnn_weights.npz"
    if not wpath.exists():
        raise SystemExit(f"{wpath} is missing: run the TensorFlow stage (without --no-tf) first")
    w = dict(np.load(wpath))
    _, Xtr, Xte, ytr, yte = load_digits_split()
    img_tr, img_te = digits_nchw(Xtr), digits_nchw(Xte)

    path = out / "digits_cnn.onnx"
    build_cnn_onnx(w, path)
    probs = ort_session(path).run(None, {"image": img_te})[0]
    diff = float(np.abs(probs - w["keras_test_probabilities"]).max())
    log(f"digits_cnn.onnx vs Keras on {len(img_te)} test rows: max |diff| = {diff:.3g}")
    assert diff <= CNN_TOLERANCE, f"ONNX CNN differs from Keras by {diff} > {CNN_TOLERANCE}"
    manifest["models"]["digits_cnn.onnx"] = {
        "description": "digits 8x8 CNN (Conv3x3x8 same+ReLU, MaxPool2, Conv3x3x16 same+ReLU, Flatten, "
        "Dense 10, Softmax), trained in Keras, rebuilt with onnx.helper in NCHW from "
        "digits_cnn_weights.npz; input = pixels/16",
        "max_abs_diff_vs_keras": diff,
    }

    quantize_static(
        str(path),
        str(out / "digits_cnn_int8.onnx"),
        ArrayReader("image", img_tr, chunk=64),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=False,
    )
    manifest["models"]["digits_cnn_int8.onnx"] = {
        "description": "digits_cnn.onnx after onnxruntime.quantization.quantize_static, QuantFormat.QDQ, "
        "activations QUInt8 + weights QInt8 (U8S8), per-tensor, MinMax calibration on the digits "
        "training images",
    }
    for fname in ("digits_cnn.onnx", "digits_cnn_int8.onnx"):
        p = out / fname
        write_json(out / f"{p.name}.expected.json", ort_expected(p, {"image": img_te[:N_EXPECTED]}))
        acc = float((ort_predict_labels(p, "image", img_te) == yte).mean())
        manifest["models"][fname].update({"test_accuracy": acc, "test_data": "data/digits_test.csv"})
        log(f"{fname}: onnxruntime test accuracy {acc:.4f}")


def build_bad(out: Path, manifest: dict):
    import onnx
    from onnx import TensorProto, helper

    bad = out / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    good = (out / "bc_mlp.onnx").read_bytes()
    (bad / "truncated.onnx").write_bytes(good[: len(good) // 2])
    (bad / "not_a_model.onnx").write_text(
        "This is a text file with an .onnx extension, not a model.\n"
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu_0"),
        helper.make_node("Frobnicate", ["r"], ["y"], name="frobnicate_1", domain="com.example", strength=3),
    ]
    graph = helper.make_graph(
        nodes,
        "unsupported_op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)],
        producer_name="outpost-fixtures",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)  # structurally valid; the custom domain is not checked
    onnx.save(model, str(bad / "unsupported_op.onnx"))
    manifest["bad"] = {
        "bad/truncated.onnx": f"first {len(good) // 2} of the {len(good)} bytes of bc_mlp.onnx",
        "bad/not_a_model.onnx": "plain text with an .onnx extension",
        "bad/unsupported_op.onnx": "valid ONNX (passes onnx.checker) whose node 'frobnicate_1' is the "
        "custom operator com.example:Frobnicate (after a Relu 'relu_0'); input x float32 [1,4], "
        "output y float32 [1,4]. A runtime must refuse it naming the operator and the node.",
    }


# --------------------------------------------------------------------------
# TensorFlow stage (tf venv): Keras training, .tflite files, their expected.json
# --------------------------------------------------------------------------

def stage_tf(out: Path, summary_path: Path):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    from keras import layers, ops

    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    summary = {"models": {}, "versions": {"tensorflow": tf.__version__, "keras": keras.__version__}}

    # ---- digits CNN ------------------------------------------------------
    _, Xtr, Xte, ytr, yte = load_digits_split()
    img_tr, img_te = digits_nhwc(Xtr), digits_nhwc(Xte)
    inp = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inp)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    # Same as layers.Flatten() (row-major over h, w, c), but with a constant
    # target shape: Flatten makes the converter emit SHAPE/STRIDED_SLICE/PACK
    # to compute the batch size, this keeps a single RESHAPE [-1, 256] while
    # the batch dimension stays dynamic.
    x = layers.Lambda(lambda t: ops.reshape(t, (-1, 4 * 4 * 16)), output_shape=(256,), name="flatten")(x)
    x = layers.Dense(10, name="dense")(x)
    probs = layers.Softmax(name="probabilities")(x)
    cnn = keras.Model(inp, probs, name="digits_cnn")
    cnn.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    cnn.fit(img_tr, ytr, epochs=KERAS_CNN_EPOCHS, batch_size=32, shuffle=True, verbose=0)
    keras_probs = cnn.predict(img_te, verbose=0)
    keras_acc = float((keras_probs.argmax(1) == yte).mean())
    print(f"[tf] digits CNN Keras test accuracy {keras_acc:.4f}", flush=True)
    assert keras_acc > 0.90, f"digits CNN accuracy {keras_acc} <= 0.90"
    k1, b1 = cnn.get_layer("conv1").get_weights()
    k2, b2 = cnn.get_layer("conv2").get_weights()
    kd, bd = cnn.get_layer("dense").get_weights()
    np.savez(
        out / "digits_cnn_weights.npz",
        conv1_kernel=k1, conv1_bias=b1, conv2_kernel=k2, conv2_bias=b2,
        dense_kernel=kd, dense_bias=bd,
        keras_test_probabilities=keras_probs.astype(np.float32),
    )
    summary["keras_cnn_accuracy"] = keras_acc

    def convert(model, kind):
        c = tf.lite.TFLiteConverter.from_keras_model(model)
        if kind == "fp16":
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            c.target_spec.supported_types = [tf.float16]
        elif kind == "int8":
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            c.representative_dataset = lambda: (
                [img_tr[i : i + 1]] for i in range(min(TFLITE_INT8_CALIBRATION_ROWS, len(img_tr)))
            )
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            # inference_input_type / inference_output_type stay float32: the
            # model starts with QUANTIZE and ends with DEQUANTIZE.
        return c.convert()

    def describe(path: Path, X_test, y_test, threshold=False):
        # Builtin kernels without the default XNNPACK delegate: the operator
        # list then shows the model's own ops (no DELEGATE nodes) and the
        # expected outputs come from TFLite's own kernels.
        interp = tf.lite.Interpreter(
            model_path=str(path), num_threads=1,
            experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        interp.allocate_tensors()
        ops_ = [o["op_name"] for o in interp._get_ops_details()]
        print(f"[tf] {path.name} operators: {ops_}", flush=True)
        tf.lite.experimental.Analyzer.analyze(model_path=str(path))
        ind, outd = interp.get_input_details(), interp.get_output_details()
        assert len(ind) == 1 and len(outd) == 1
        ind, outd = ind[0], outd[0]
        dynamic = int(ind["shape_signature"][0]) == -1

        def run(X):
            if dynamic:
                interp.resize_tensor_input(ind["index"], [len(X)] + list(ind["shape"][1:]))
                interp.allocate_tensors()
                interp.set_tensor(ind["index"], X)
                interp.invoke()
                return interp.get_tensor(interp.get_output_details()[0]["index"]).copy()
            rows = []
            for r in X:
                interp.set_tensor(ind["index"], r[None])
                interp.invoke()
                rows.append(interp.get_tensor(outd["index"])[0].copy())
            return np.stack(rows)

        x16 = X_test[:N_EXPECTED]
        y16 = run(x16)
        expected = {
            "model": path.name,
            "runtime": f"tflite: tf.lite.Interpreter (tensorflow {tf.__version__}), builtin kernels "
            "without default delegates (no XNNPACK), num_threads=1",
            "batch_mode": "batch" if dynamic else "rows",
            "inputs": {ind["name"]: tensor_json(x16, "float32")},
            "outputs": {outd["name"]: tensor_json(y16, "float32")},
        }
        write_json(out / f"{path.name}.expected.json", expected)
        full = run(X_test)
        pred = (full[:, 0] >= 0.5).astype(np.int64) if threshold else full.argmax(1)
        acc = float((pred == y_test).mean())
        print(f"[tf] {path.name} test accuracy {acc:.4f}", flush=True)
        sig = interp.get_signature_list()
        return {
            "ops": ops_,
            "test_accuracy": acc,
            "inputs": [{
                "name": ind["name"], "dtype": np.dtype(ind["dtype"]).name,
                "shape": [int(v) for v in ind["shape"]],
                "shape_signature": [int(v) for v in ind["shape_signature"]],
            }],
            "outputs": [{
                "name": outd["name"], "dtype": np.dtype(outd["dtype"]).name,
                "shape": [int(v) for v in outd["shape"]],
                "shape_signature": [int(v) for v in outd["shape_signature"]],
            }],
            "signature": {k: v for k, v in sig.items()},
        }

    cnn_desc = {
        "digits_cnn.tflite": "digits CNN (same Keras model as digits_cnn.onnx), float32, NHWC, "
        "TFLiteConverter.from_keras_model",
        "digits_cnn_fp16.tflite": "digits CNN, float16 weights (Optimize.DEFAULT + supported_types=[float16]): "
        "fp16 constants feed DEQUANTIZE ops, compute is float32",
        "digits_cnn_int8.tflite": "digits CNN, full integer quantization (TFLITE_BUILTINS_INT8, representative "
        f"dataset = first {TFLITE_INT8_CALIBRATION_ROWS} training images), float32 interface: "
        "QUANTIZE at the input, DEQUANTIZE at the output",
    }
    for fname, kind in (("digits_cnn.tflite", "float"), ("digits_cnn_fp16.tflite", "fp16"),
                        ("digits_cnn_int8.tflite", "int8")):
        p = out / fname
        p.write_bytes(convert(cnn, kind))
        info = describe(p, img_te, yte)
        info.update({"description": cnn_desc[fname], "test_data": "data/digits_test.csv",
                     "reference_accuracy": {"keras": keras_acc}})
        summary["models"][fname] = info
    assert "DEQUANTIZE" in summary["models"]["digits_cnn_fp16.tflite"]["ops"]
    int8_ops = summary["models"]["digits_cnn_int8.tflite"]["ops"]
    assert int8_ops[0] == "QUANTIZE" and int8_ops[-1] == "DEQUANTIZE", int8_ops

    # ---- breast cancer MLP with PReLU -----------------------------------
    keras.utils.set_random_seed(SEED)
    _, Btr, Bte, bytr, byte = load_breast_cancer_split()
    norm = layers.Normalization(name="normalize")
    norm.adapt(Btr)
    inp = keras.Input((Btr.shape[1],), name="features")
    x = norm(inp)
    x = layers.Dense(16, name="dense1")(x)
    x = layers.PReLU(name="prelu")(x)
    out_ = layers.Dense(1, activation="sigmoid", name="probability")(x)
    mlp = keras.Model(inp, out_, name="bc_mlp_prelu")
    mlp.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    mlp.fit(Btr, bytr.astype(np.float32), epochs=KERAS_PRELU_EPOCHS, batch_size=32, shuffle=True, verbose=0)
    pk = mlp.predict(Bte, verbose=0)
    keras_bc_acc = float(((pk[:, 0] >= 0.5).astype(np.int64) == byte).mean())
    print(f"[tf] bc PReLU MLP Keras test accuracy {keras_bc_acc:.4f}", flush=True)
    p = out / "bc_mlp_prelu.tflite"
    p.write_bytes(convert(mlp, "float"))
    info = describe(p, Bte, byte, threshold=True)
    assert "PRELU" in info["ops"], info["ops"]
    info.update({
        "description": "breast cancer Keras MLP: Normalization (adapted on bc_train) -> Dense 16 -> PReLU "
        "-> Dense 1 sigmoid; output = P(label = 1)",
        "test_data": "data/bc_test.csv",
        "reference_accuracy": {"keras": keras_bc_acc},
    })
    summary["models"]["bc_mlp_prelu.tflite"] = info
    write_json(summary_path, summary)


# --------------------------------------------------------------------------
# manifest + README
# --------------------------------------------------------------------------

def finish_manifest(out: Path, manifest: dict, tf_summary: dict | None):
    import onnx
    import onnxruntime as ort
    import skl2onnx
    import sklearn

    old = {}
    if (out / "manifest.json").exists():
        old = json.loads((out / "manifest.json").read_text())
    if tf_summary is None:  # --no-tf: keep what the last TensorFlow run recorded
        tf_summary = {
            "models": {k: v for k, v in old.get("models", {}).items() if k.endswith(".tflite")},
            "versions": {k: v for k, v in old.get("generator", {}).items() if k in ("tensorflow", "keras")},
            "keras_cnn_accuracy": old.get("models", {}).get("digits_cnn.onnx", {})
            .get("reference_accuracy", {}).get("keras"),
        }
    for fname, info in manifest["models"].items():
        if fname.endswith(".onnx"):
            m = onnx.load(str(out / fname))
            ops_ = onnx_ops(out / fname)
            info.update({
                "format": "onnx",
                "opset": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
                "ops": ops_,
                "inputs": [onnx_value_info(v) for v in m.graph.input],
                "outputs": [onnx_value_info(v) for v in m.graph.output],
            })
    if tf_summary.get("keras_cnn_accuracy") is not None:
        for f in ("digits_cnn.onnx", "digits_cnn_int8.onnx"):
            manifest["models"][f].setdefault("reference_accuracy", {})["keras"] = tf_summary["keras_cnn_accuracy"]
    for fname, info in tf_summary["models"].items():
        manifest["models"][fname] = dict(info, format="tflite")
    for fname, info in manifest["models"].items():
        p = out / fname
        info["op_types"] = unique(info["ops"])
        info["size_bytes"] = p.stat().st_size
        info["sha256"] = sha256(p)
        info["expected"] = f"{p.name}.expected.json"
    order = ["bc_mlp.onnx", "bc_gb.onnx", "bc_logreg.onnx", "bc_rf.onnx", "bc_mlp_int8.onnx", "bc_mlp_qdq.onnx", "digits_cnn.onnx",
             "digits_cnn_int8.onnx", "digits_cnn.tflite", "digits_cnn_fp16.tflite",
             "digits_cnn_int8.tflite", "bc_mlp_prelu.tflite"]
    manifest["models"] = {k: manifest["models"][k] for k in order if k in manifest["models"]}
    manifest["generator"] = {
        "script": "scripts/make_fixtures.py",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        **tf_summary.get("versions", {}),
    }
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in ("README.md", "manifest.json"))
    manifest["total_bytes"] = sum(p.stat().st_size for p in files)
    write_json(out / "manifest.json", manifest)


def fmt_shape(io: dict) -> str:
    if "shape" in io:
        dims = io.get("shape_signature") or io["shape"]
        dims = ["N" if (d is None or d == -1 or isinstance(d, str)) else str(d) for d in dims]
        return f"`{io['name']}` {io['dtype']} [{', '.join(dims)}]"
    return f"`{io['name']}` {io['type']} (ZipMap)"


def write_readme(out: Path, manifest: dict):
    m = manifest["models"]
    L = []
    L.append("# Model fixtures\n")
    L.append("Generated by `scripts/make_fixtures.sh` (which runs `scripts/make_fixtures.py`); do not edit by "
             "hand — rerun the script. Everything here is deterministic (seed 0) for fixed package versions "
             "(`scripts/requirements-*.txt`); the exact versions used are in `manifest.json` → `generator`. "
             "`manifest.json` also holds, per model, the full node-order operator list, inputs/outputs, "
             "sha256 and size.\n")
    L.append("## Data (`data/`)\n")
    L.append("| file | rows | columns |\n|---|---|---|")
    for f, d in manifest["data"].items():
        L.append(f"| `{f}` | {d['rows']} | {d['columns']} |")
    L.append("")
    L.append("CSV convention: header row (feature names, then `label`), one sample per row, label (integer "
             "class) in the last column, features written as the shortest decimal that round-trips to the "
             "float32 the models were trained and evaluated on.\n")
    L.append("* Breast cancer (`sklearn.datasets.load_breast_cancer`): 30 features, label 0 = malignant, "
             "1 = benign; stratified split, `random_state=0`, 25 % test.")
    L.append(f"* Digits (`load_digits`): 64 raw pixel values 0..16 (row-major 8x8); stratified split, "
             f"`random_state=0`, {DIGITS_TEST_ROWS} test rows (all of them in `digits_test.csv`), the rest "
             "for training. **The CNN models take pixels / 16**: ONNX as `image` [N,1,8,8] (NCHW), TFLite "
             "as [N,8,8,1] (NHWC); for a 1-channel 8x8 image both layouts hold the same 64 floats in the "
             "same order.\n")
    L.append("## Models\n")
    L.append("| file | size | test accuracy | inputs | outputs |\n|---|---:|---:|---|---|")
    for f, i in m.items():
        ins = "<br>".join(fmt_shape(x) for x in i["inputs"])
        outs = "<br>".join(fmt_shape(x) for x in i["outputs"])
        L.append(f"| `{f}` | {i['size_bytes']:,} B | {i['test_accuracy']:.4f} | {ins} | {outs} |")
    L.append("")
    L.append("Test accuracy is measured by the generator with the reference runtime (onnxruntime or "
             "tf.lite.Interpreter) on the whole test split (`bc_test.csv`: 143 rows, `digits_test.csv`: "
             f"{DIGITS_TEST_ROWS} rows). Reference accuracies of the source models: " + "; ".join(
                 f"`{f}` {k} {v:.4f}" for f, i in m.items() for k, v in i.get("reference_accuracy", {}).items()
             ) + ".\n")
    L.append("### What each model is, and its operators\n")
    for f, i in m.items():
        L.append(f"**`{f}`** — {i['description']}.")
        if "opset" in i:
            L.append(f"Opsets: {', '.join(f'{k} {v}' for k, v in i['opset'].items())}.")
        L.append(f"Operator types: {', '.join('`' + o + '`' for o in i['op_types'])} "
                 f"({len(i['ops'])} nodes).")
        if "max_abs_diff_vs_keras" in i:
            L.append(f"Max |ONNX − Keras| over the {DIGITS_TEST_ROWS} test rows: "
                     f"{i['max_abs_diff_vs_keras']:.2g} (asserted ≤ {CNN_TOLERANCE}).")
        if "signature" in i:
            sig = i["signature"].get("serving_default")
            if sig:
                L.append(f"Signature `serving_default`: inputs {sig['inputs']}, outputs {sig['outputs']}.")
        L.append("")
    L.append("`digits_cnn_weights.npz` holds the Keras weights (Keras layouts: conv kernels "
             "(kh, kw, cin, cout), dense kernel (256, 10) with rows in NHWC-flatten order) and the Keras "
             "probabilities on the digits test rows (`keras_test_probabilities`); the ONNX CNN is rebuilt "
             "from it without TensorFlow (`make_fixtures.py --no-tf`).\n")
    L.append("## Expected outputs (`<model file>.expected.json`, e.g. `bc_mlp.onnx.expected.json`)\n")
    L.append(f"For every model: the first {N_EXPECTED} rows of its test split and the reference runtime's "
             "outputs for them.\n")
    L.append("```\n{\"model\": \"bc_mlp.onnx\", \"runtime\": \"onnxruntime 1.x\", \"batch_mode\": \"batch\",\n"
             " \"inputs\":  {NAME: {\"dtype\": \"float32\", \"shape\": [16, 30], \"data\": [row-major flat]}},\n"
             " \"outputs\": {NAME: {\"dtype\": \"float32\"|\"int64\", \"shape\": [...], \"data\": [...]},\n"
             "             ZIPMAP_NAME: {\"dtype\": \"float32\", \"shape\": [16, C], \"data\": [...],"
             " \"zipmap\": true, \"classes\": [0, 1]}}}\n```\n")
    L.append("* `batch_mode`: `batch` = all 16 rows were run as one batch; `rows` = 16 runs of batch 1 "
             "stacked along axis 0 (only for fixed-batch models; all current models have a dynamic batch "
             "dimension, the TFLite ones via `shape_signature` [-1, …] with `shape` [1, …]).")
    L.append("* Outputs that are ZipMap (`seq(map(int64, float))`) in the ONNX model are written as a "
             "float32 tensor [N, n_classes] in `classes` order with `\"zipmap\": true`.")
    L.append("* Names are the model's own tensor names (for TFLite the flatbuffer tensor names, e.g. "
             "`serving_default_image:0`, `StatefulPartitionedCall_1:0`).")
    L.append("* Floats are the shortest decimals that round-trip to the float32 values.")
    L.append("* Suggested tolerances: float models 1e-5 abs / 1e-4 rel (the float TFLite CNN and the ONNX "
             "CNN agree to ~3e-7 on these rows); fp16-weight TFLite the same against its own expected file "
             "(compute is float32). Quantized models: another runtime may round an intermediate "
             "requantization differently by one step, which on an uncertain row can move a probability by "
             "several output steps; compare the predicted classes and use a loose tolerance (e.g. 0.05 abs) "
             "on probabilities.\n")
    L.append("## Bad models (`bad/`)\n")
    for f, d in manifest["bad"].items():
        L.append(f"* `{f}`: {d}")
    L.append("")
    L.append(f"Total size of `fixtures/` without README.md and manifest.json: {manifest['total_bytes']:,} bytes.\n")
    (out / "README.md").write_text("\n".join(L))


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "fixtures", help="output directory (default: fixtures/)")
    ap.add_argument("--tf-python", default=os.environ.get("TF_PYTHON"),
                    help="python of the TensorFlow venv (default: $TF_PYTHON)")
    ap.add_argument("--no-tf", action="store_true",
                    help="skip the TensorFlow stage, reuse the .tflite files and digits_cnn_weights.npz in --out")
    ap.add_argument("--stage", choices=["all", "tf"], default="all", help=argparse.SUPPRESS)
    ap.add_argument("--summary", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    if args.stage == "tf":
        stage_tf(out, args.summary)
        return

    manifest = {"models": {}, "data": {}, "bad": {}}
    names, Xtr, Xte, ytr, yte = load_breast_cancer_split()
    write_csv(out / "data/bc_train.csv", names, Xtr, ytr)
    write_csv(out / "data/bc_test.csv", names, Xte, yte)
    dnames, _, dXte, _, dyte = load_digits_split()
    write_csv(out / "data/digits_test.csv", dnames, dXte, dyte)
    manifest["data"] = {
        "data/bc_train.csv": {"rows": len(Xtr), "columns": f"{len(names)} features + label"},
        "data/bc_test.csv": {"rows": len(Xte), "columns": f"{len(names)} features + label"},
        "data/digits_test.csv": {"rows": len(dXte), "columns": f"{len(dnames)} pixels (0..16) + label"},
    }

    tf_summary = None
    if not args.no_tf:
        if not args.tf_python:
            raise SystemExit("no TensorFlow python: pass --tf-python / set TF_PYTHON, or use --no-tf")
        with tempfile.TemporaryDirectory() as td:
            summary_path = Path(td) / "tf_summary.json"
            env = dict(os.environ, PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
            log(f"TensorFlow stage with {args.tf_python}")
            subprocess.run(
                [args.tf_python, str(Path(__file__).resolve()), "--stage", "tf", "--out", str(out),
                 "--summary", str(summary_path)],
                check=True, env=env,
            )
            tf_summary = json.loads(summary_path.read_text())

    build_bc_onnx(out, manifest)
    build_cnn_models(out, manifest)
    build_bad(out, manifest)
    finish_manifest(out, manifest, tf_summary)
    write_readme(out, manifest)
    log(f"done: {manifest['total_bytes']:,} bytes in {out.name}/")
    for f, i in manifest["models"].items():
        log(f"  {f:24s} {i['size_bytes']:>8,} B  acc {i['test_accuracy']:.4f}  ops {i['op_types']}")


if __name__ == "__main__":
    sys.exit(main())
