//! The request decoders as plain functions of bytes: what the fuzz tests
//! (`runtime/tests/fuzz_*.rs`) drive without a socket in between, so they
//! can run many thousands of bodies a second. The server itself calls the
//! same functions in [`super::request`] and [`super::v2`].

use super::error::ApiError;
use super::slot::Deployed;
use super::{request, v2};
use crate::tensor::TensorData;

/// `POST /predict`: the model inputs a body decodes to, in the model's order.
pub fn predict(body: &[u8], d: &Deployed) -> Result<Vec<TensorData>, ApiError> {
    request::parse_predict(body, d).map(|p| p.inputs)
}

/// `POST /predict/batch`.
pub fn predict_batch(body: &[u8], d: &Deployed) -> Result<Vec<TensorData>, ApiError> {
    request::parse_batch(body, d).map(|p| p.inputs)
}

/// `POST /v2/models/{name}/infer`; `header_len` is the
/// `Inference-Header-Content-Length` header, if sent.
pub fn v2_infer(body: &[u8], header_len: Option<usize>, d: &Deployed) -> Result<Vec<TensorData>, ApiError> {
    v2::parse_infer(body, header_len, d).map(|p| p.inputs)
}
