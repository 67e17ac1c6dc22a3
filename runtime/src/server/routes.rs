//! The route table: method and path to [`Route`], or why not (404 / 405).

use tiny_http::Method;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Health,
    Ready,
    Predict,
    PredictBatch,
    Metrics,
    ModelInfo,
    Drift,
    V2Live,
    V2Ready,
    V2Server,
    V2ModelMetadata { name: String, version: Option<String> },
    V2ModelReady { name: String, version: Option<String> },
    V2Infer { name: String, version: Option<String> },
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Routed {
    Found(Route),
    NotFound,
    /// The path exists; the method does not. Carries the `Allow` header value.
    WrongMethod(&'static str),
}

impl Route {
    /// The `endpoint` label of the request metrics: a fixed, small set.
    pub fn endpoint(&self) -> &'static str {
        match self {
            Route::Health => "health",
            Route::Ready => "ready",
            Route::Predict => "predict",
            Route::PredictBatch => "predict_batch",
            Route::Metrics => "metrics",
            Route::ModelInfo => "model",
            Route::Drift => "drift",
            Route::V2Live => "v2_live",
            Route::V2Ready => "v2_ready",
            Route::V2Server => "v2_server",
            Route::V2ModelMetadata { .. } => "v2_model_metadata",
            Route::V2ModelReady { .. } => "v2_model_ready",
            Route::V2Infer { .. } => "v2_infer",
        }
    }

    /// Open Inference Protocol routes answer errors in that protocol's shape.
    pub fn is_v2(&self) -> bool {
        matches!(
            self,
            Route::V2Live
                | Route::V2Ready
                | Route::V2Server
                | Route::V2ModelMetadata { .. }
                | Route::V2ModelReady { .. }
                | Route::V2Infer { .. }
        )
    }

    /// Answered on the accepting thread, without queueing: probes must keep
    /// working when the workers are saturated, or an orchestrator would kill
    /// a server that is merely busy.
    pub fn is_probe(&self) -> bool {
        matches!(
            self,
            Route::Health | Route::Ready | Route::V2Live | Route::V2Ready | Route::V2ModelReady { .. }
        )
    }
}

/// Endpoint label for requests that matched no route.
pub(crate) const UNKNOWN_ENDPOINT: &str = "unknown";

const GET: &str = "GET, HEAD";
const POST: &str = "POST";

pub(crate) fn route(method: &Method, url: &str) -> Routed {
    let path = url.split(['?', '#']).next().unwrap_or("");
    let is_get = matches!(method, Method::Get | Method::Head);
    let is_post = matches!(method, Method::Post);
    let get = |r: Route| if is_get { Routed::Found(r) } else { Routed::WrongMethod(GET) };
    let post = |r: Route| if is_post { Routed::Found(r) } else { Routed::WrongMethod(POST) };
    match path {
        "/health" => return get(Route::Health),
        "/ready" => return get(Route::Ready),
        "/predict" => return post(Route::Predict),
        "/predict/batch" => return post(Route::PredictBatch),
        "/metrics" => return get(Route::Metrics),
        "/v1/model" => return get(Route::ModelInfo),
        "/v1/drift" => return get(Route::Drift),
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v2") else { return Routed::NotFound };
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let owned = |s: &str| s.to_string();
    match segments.as_slice() {
        [] => get(Route::V2Server),
        ["health", "live"] => get(Route::V2Live),
        ["health", "ready"] => get(Route::V2Ready),
        ["models", name] => get(Route::V2ModelMetadata { name: owned(name), version: None }),
        ["models", name, "ready"] => get(Route::V2ModelReady { name: owned(name), version: None }),
        ["models", name, "infer"] => post(Route::V2Infer { name: owned(name), version: None }),
        ["models", name, "versions", v] => {
            get(Route::V2ModelMetadata { name: owned(name), version: Some(owned(v)) })
        }
        ["models", name, "versions", v, "ready"] => {
            get(Route::V2ModelReady { name: owned(name), version: Some(owned(v)) })
        }
        ["models", name, "versions", v, "infer"] => {
            post(Route::V2Infer { name: owned(name), version: Some(owned(v)) })
        }
        _ => Routed::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_methods() {
        assert_eq!(route(&Method::Get, "/health"), Routed::Found(Route::Health));
        assert_eq!(route(&Method::Get, "/ready?x=1"), Routed::Found(Route::Ready));
        assert_eq!(route(&Method::Get, "/predict"), Routed::WrongMethod("POST"));
        assert_eq!(route(&Method::Post, "/health"), Routed::WrongMethod("GET, HEAD"));
        assert_eq!(route(&Method::Get, "/nope"), Routed::NotFound);
        assert_eq!(
            route(&Method::Post, "/v2/models/bc/versions/1.0.0/infer"),
            Routed::Found(Route::V2Infer { name: "bc".into(), version: Some("1.0.0".into()) })
        );
        assert_eq!(
            route(&Method::Get, "/v2/models/bc"),
            Routed::Found(Route::V2ModelMetadata { name: "bc".into(), version: None })
        );
        assert_eq!(route(&Method::Get, "/v2/models/bc/infer"), Routed::WrongMethod("POST"));
        assert_eq!(route(&Method::Get, "/v2/models/bc/extra/infer"), Routed::NotFound);
    }
}
