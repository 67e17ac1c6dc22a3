//! Errors: the ones [`Server::start`](super::Server::start) returns, and the
//! error *answers* a request gets.
//!
//! Every error answer has the same body, so a client needs one code path:
//!
//! ```json
//! {"error": {"code": "non_finite", "message": "features[3]: NaN is not a finite number", "field": "features[3]"}}
//! ```
//!
//! `code` is stable and meant for programs; `message` is for people and names
//! the field at fault; `field` repeats it on its own when there is one. The
//! Open Inference Protocol v2 routes answer `{"error": "<message>"}` instead,
//! because that is the shape KServe and Triton clients parse.
//!
//! | status | code | when |
//! |---|---|---|
//! | 400 | `malformed_json` | the body is not JSON |
//! | 400 | `bad_request` | the body cannot be read as the protocol says (e.g. a bad binary-data header) |
//! | 404 | `not_found` | unknown route, or a model name that is not the one served |
//! | 405 | `method_not_allowed` | known route, wrong method (with an `Allow` header) |
//! | 408 | `request_timeout` | the client stopped sending its body |
//! | 413 | `body_too_large` | the body is over the limit (answered before it is read) |
//! | 422 | `invalid_field` | JSON of the wrong structure: missing, unknown or mistyped field |
//! | 422 | `invalid_shape` | a tensor of the wrong rank, size or ragged nesting |
//! | 422 | `non_finite` | NaN, infinity, or a number too large for the input's type |
//! | 500 | `inference_failed` | the model itself failed on valid input (never the caller's fault) |
//! | 503 | `model_not_ready` | no model is loaded yet |
//! | 503 | `overloaded` | the request queue is full (with a `Retry-After` header) |

use std::fmt::Write as _;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid listen address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("cannot start the HTTP server: {0}")]
    Http(String),
    #[error("cannot start a server thread: {0}")]
    Spawn(std::io::Error),
    #[error("invalid server configuration: {0}")]
    Config(String),
}

/// An error answer to one request. See the module docs for the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, e.g. `features[3]` or `inputs[1].shape`.
    pub field: Option<String>,
    /// Seconds for the `Retry-After` header (overload only).
    pub retry_after: Option<u32>,
    /// Methods for the `Allow` header (405 only).
    pub allow: Option<&'static str>,
}

impl ApiError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), field: None, retry_after: None, allow: None }
    }

    fn with_field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }

    pub fn malformed_json(reason: impl std::fmt::Display) -> ApiError {
        ApiError::new(400, "malformed_json", format!("request body is not valid JSON: {reason}"))
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "bad_request", message)
    }

    /// Well-formed JSON of the wrong structure (missing, unknown or mistyped field).
    pub fn invalid_field(field: impl Into<String>, message: impl std::fmt::Display) -> ApiError {
        let field = field.into();
        ApiError::new(422, "invalid_field", format!("{field}: {message}")).with_field(field)
    }

    pub fn invalid_shape(field: impl Into<String>, message: impl std::fmt::Display) -> ApiError {
        let field = field.into();
        ApiError::new(422, "invalid_shape", format!("{field}: {message}")).with_field(field)
    }

    pub fn non_finite(field: impl Into<String>, message: impl std::fmt::Display) -> ApiError {
        let field = field.into();
        ApiError::new(422, "non_finite", format!("{field}: {message}")).with_field(field)
    }

    pub fn body_too_large(limit: usize, declared: Option<usize>) -> ApiError {
        let message = match declared {
            Some(n) => format!("request body of {n} bytes is over the limit of {limit} bytes"),
            None => format!("request body is over the limit of {limit} bytes"),
        };
        ApiError::new(413, "body_too_large", message)
    }

    pub fn request_timeout() -> ApiError {
        ApiError::new(408, "request_timeout", "the client stopped sending the request body")
    }

    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(404, "not_found", what)
    }

    pub fn method_not_allowed(method: &str, path: &str, allow: &'static str) -> ApiError {
        let mut e = ApiError::new(
            405,
            "method_not_allowed",
            format!("{method} is not allowed on {path}; use {allow}"),
        );
        e.allow = Some(allow);
        e
    }

    pub fn not_ready() -> ApiError {
        ApiError::new(503, "model_not_ready", "no model is loaded yet")
    }

    pub fn overloaded(retry_after: u32) -> ApiError {
        let mut e = ApiError::new(503, "overloaded", "the server is at capacity; retry later");
        e.retry_after = Some(retry_after.max(1));
        e
    }

    pub fn shutting_down() -> ApiError {
        let mut e = ApiError::new(503, "shutting_down", "the server is shutting down");
        e.retry_after = Some(1);
        e
    }

    /// The model failed on input that passed validation: the server's fault.
    pub fn inference_failed(reason: impl std::fmt::Display) -> ApiError {
        ApiError::new(500, "inference_failed", format!("inference failed: {reason}"))
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "internal", message)
    }

    /// `{"error":{"code":…,"message":…,"field":…}}`
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = String::with_capacity(96 + self.message.len());
        out.push_str("{\"error\":{\"code\":");
        push_json_str(&mut out, self.code);
        out.push_str(",\"message\":");
        push_json_str(&mut out, &self.message);
        if let Some(field) = &self.field {
            out.push_str(",\"field\":");
            push_json_str(&mut out, field);
        }
        out.push_str("}}");
        out.into_bytes()
    }

    /// `{"error":"<message>"}`: the Open Inference Protocol's error body.
    pub fn to_v2_json(&self) -> Vec<u8> {
        let mut out = String::with_capacity(16 + self.message.len());
        out.push_str("{\"error\":");
        push_json_str(&mut out, &self.message);
        out.push('}');
        out.into_bytes()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// Appends `s` as a JSON string literal.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_names_the_field_and_escapes() {
        let e = ApiError::non_finite("features[3]", "NaN is not a \"finite\" number");
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["error"]["code"], "non_finite");
        assert_eq!(v["error"]["field"], "features[3]");
        assert_eq!(v["error"]["message"], "features[3]: NaN is not a \"finite\" number");
        let v2: serde_json::Value = serde_json::from_slice(&e.to_v2_json()).unwrap();
        assert!(v2["error"].as_str().unwrap().contains("features[3]"));
    }
}
