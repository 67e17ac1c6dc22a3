"""The seed document's FastAPI model server, as written there, backed by
onnxruntime instead of a joblib pickle. It is the baseline the Rust device
server (`outpost-runtime serve`) is load-tested against (wrk on /predict).

    MODEL_PATH   ONNX model (default: ../../fixtures/bc_mlp.onnx, relative to this file)
    INTRA_OP_THREADS  onnxruntime intra-op threads (default 1; inter-op is 1)

    uvicorn app:app --host 127.0.0.1 --port 8000      # from bench/seed_server/

Endpoints (as in the seed): GET /health, GET /ready, POST /predict with
{"features": [f32, ...]} -> {"prediction": float, "probability": float}.
Following the seed's "known issues" section, features must be finite (422
otherwise), and a wrong number of features is a 422 too rather than a 500.
Malformed JSON is FastAPI's usual 422 (the Rust server answers 400).

Output interpretation, like sklearn's predict / predict_proba(...).max():
  * skl2onnx classifiers (label + probabilities, ZipMap or tensor): the label,
    and the largest class probability;
  * one probability per row (e.g. a sigmoid [N,1]): 1.0 if p >= 0.5 else 0.0,
    and max(p, 1 - p);
  * class probabilities [N,C]: the argmax, and the largest probability.
"""

from __future__ import annotations

import math
import os
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

MODEL_PATH = os.getenv("MODEL_PATH", str(Path(__file__).resolve().parent / "../../fixtures/bc_mlp.onnx"))
INTRA_OP_THREADS = int(os.getenv("INTRA_OP_THREADS", "1"))


class ModelStore:
    def __init__(self):
        self.session: ort.InferenceSession | None = None

    def load(self, path: str):
        so = ort.SessionOptions()
        so.intra_op_num_threads = INTRA_OP_THREADS
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise RuntimeError(f"{path}: expected a single-input model, got {len(inputs)} inputs")
        self.input_name = inputs[0].name
        # fixed dims after the batch dim, e.g. [30] or [1, 8, 8]
        self.row_shape = [d if isinstance(d, int) else 1 for d in inputs[0].shape[1:]]
        self.n_features = int(np.prod(self.row_shape))
        self.session = session
        self.predict(np.zeros(self.n_features, dtype=np.float32))  # warm-up

    @property
    def model(self) -> ort.InferenceSession:
        if self.session is None:
            raise RuntimeError("model not loaded")
        return self.session

    def predict(self, features: np.ndarray) -> tuple[float, float]:
        x = features.astype(np.float32).reshape([1] + self.row_shape)
        outs = self.model.run(None, {self.input_name: x})
        if len(outs) >= 2:  # skl2onnx classifier: label, probabilities
            label, probs = outs[0], outs[1]
            p = probs[0]
            p_max = max(p.values()) if isinstance(p, dict) else float(np.max(p))
            return float(np.asarray(label).reshape(-1)[0]), float(p_max)
        p = np.asarray(outs[0], dtype=np.float32).reshape(-1)
        if p.size == 1:
            return (1.0 if p[0] >= 0.5 else 0.0), float(max(p[0], 1.0 - p[0]))
        return float(np.argmax(p)), float(np.max(p))


model_store = ModelStore()


@asynccontextmanager
async def lifespan(app: FastAPI):
    model_store.load(MODEL_PATH)
    yield


app = FastAPI(lifespan=lifespan)


class PredictionRequest(BaseModel):
    features: list[float] = Field(..., min_length=1, max_length=4096)


class PredictionResponse(BaseModel):
    prediction: float
    probability: float


@app.get("/health")
def health():
    return {"status": "healthy"}


@app.get("/ready")
def ready():
    try:
        _ = model_store.model  # the model is loaded (and was warmed up)
        return {"status": "ready"}
    except Exception:
        raise HTTPException(503, "not ready")


@app.post("/predict", response_model=PredictionResponse)
def predict(request: PredictionRequest):
    # The seed validates finiteness in a pydantic validator; FastAPI then echoes
    # the NaN back in its 422 body, fails to encode it and answers 500. Checked
    # here instead, so NaN/Infinity (which Python's JSON parser accepts) get 422.
    if not all(math.isfinite(v) for v in request.features):
        raise HTTPException(422, "features: all values must be finite")
    if len(request.features) != model_store.n_features:
        raise HTTPException(
            422, f"features: expected {model_store.n_features} values, got {len(request.features)}"
        )
    features = np.array(request.features, dtype=np.float32)
    prediction, probability = model_store.predict(features)
    return PredictionResponse(prediction=prediction, probability=probability)
