//! The fleet's HTTP API (tiny_http): health, readiness and metrics for
//! anyone, and the operator endpoints behind `Authorization: Bearer <api_token>`.
//!
//! | method, path | auth | what |
//! |---|---|---|
//! | GET `/health` | – | 200 `{"status":"healthy"}` while the process serves |
//! | GET `/ready` | – | 200 `{"status":"ready"}` once the registry is open and the MQTT link is up, else 503 with the reason (naming any server thread that stopped) |
//! | GET `/metrics` | – | Prometheus text (see [`crate::metrics`]) |
//! | GET `/v1/devices` | ✓ | `{"devices":[…]}` (decommissioned devices left out) |
//! | GET `/v1/devices/{id}` | ✓ | one device, with its current directive (a decommissioned one with `decommissioned_at`) |
//! | POST `/v1/devices` | ✓ | provision: `{"device_id","tags":[…],"state_dir"?,"listen"?,"check_broker"?}` → 201 with the agent config (a decommissioned id gets new keys and credentials) |
//! | POST `/v1/devices/{id}/decommission`, DELETE `/v1/devices/{id}` | ✓ | decommission: credential and key revoked, caches dropped, retained directive cleared → `{"device","decommissioned":true,"already":bool}`; 404 for an unknown id |
//! | GET `/v1/models` | ✓ | `{"versions":[…]}` |
//! | POST `/v1/uploads?filename=F` | ✓ | raw body → 201 `{"upload":ID,"size":N}`; single-use, for publish |
//! | POST `/v1/publish` | ✓ | `{"name","version","model":ID,"train_data":ID,"test_data":ID,"min_accuracy"}` → 201 report; 422/409 refusal |
//! | POST `/v1/deploy` | ✓ | `{"target":"NAME@VERSION","devices":[…]}` → `{"deployed":[…]}` |
//! | GET `/v1/audit?limit=N` | ✓ | newest audit entries first |
//! | GET `/v1/drift/{name}/{version}?scope=recent\|lifetime` | ✓ | the fleet's drift view of a version (see [`crate::fleet_view`]) |
//! | GET `/` , `/dashboard` | – | the dashboard page (no data in it; it asks the API with the token from its URL fragment) |
//! | POST `/v1/rollouts` | ✓ | `{"target":"NAME@VERSION","tags"?,"stages":[1,10,50,100],"bake":"10m", gates…,"on_failure"?}` → 201 status; 409 while the model has a live rollout |
//! | GET `/v1/rollouts` | ✓ | `{"rollouts":[…]}`, newest first |
//! | GET `/v1/rollouts/{id}` | ✓ | status: `id`, `model`, `version`, `state`, `stage`, `reason`, `stages[]` with devices and gates |
//! | POST `/v1/rollouts/{id}/pause` \| `resume` \| `abort` | ✓ | the new status; 409 when the state does not allow it |
//! | POST `/v1/rollback` | ✓ | `{"model","to","tags"?,"devices"?}` → `{"targeted":N,"devices":[…]}` |
//!
//! Errors are `{"error":{"code":…,"message":…}}`, as on devices:
//! 400 `bad_request` (malformed JSON), 401 `unauthorized`, 404 `not_found`,
//! 405 `method_not_allowed`, 409 `conflict`, 413 `too_large`,
//! 422 `invalid` / `refused`, 500 `internal`, 503 `unavailable`.
//!
//! Every operator action (provision, upload, publish, deploy) is written to
//! the audit log with its result. The actor is the `X-Outpost-Actor` header
//! the CLI sets (`user@host`), or `operator`: there is one token, so this
//! names who claims to act, for the record, not for access control.
//!
//! The API speaks plain HTTP; put it on loopback or a private network, or
//! behind a TLS-terminating proxy (provisioning answers carry device secrets).
//!
//! # Limits
//!
//! The process also hosts the broker, so what a client can make the API
//! hold is bounded like the device's server (tiny_http's event-driven
//! server on Linux, `vendor/tiny_http/PATCHES.md`): a request head of at
//! most [`MAX_HEAD_BYTES`] (431 beyond, the connection closed),
//! [`MAX_CONNECTIONS`] open connections, [`IO_TIMEOUT`] for any stall while
//! a body is read or an answer written. Heads and bodies up to 64 KiB are
//! read by the epoll loop before a worker sees the request, so a client
//! that sends slowly (or announces a body and sends nothing) holds a
//! connection slot, not a worker; a larger body (an upload, streamed to
//! disk up to [`MAX_UPLOAD_BYTES`]) is read by the worker, and only for
//! an authorized request, at most [`MAX_UPLOADS_AT_ONCE`] at a time. A body the handler left unread is never drained:
//! the connection is closed after the answer (a 413, a 401, a 404). A
//! panic while answering is caught: the client gets a 500 and the worker
//! goes on (see [`crate::supervisor`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response};

use crate::bundles::unique;
use crate::directives::parse_target;
use crate::provisioning::{provision, ProvisionError, ProvisionRequest};
use crate::publish::{PublishError, PublishRequest};
use crate::rollout::machine::Command as RolloutCommand;
use crate::rollout::{RollbackRequest, RolloutError, StartRequest};
use crate::server::Fleet;

/// Largest JSON request body.
pub const MAX_JSON_BYTES: u64 = 1 << 20;
/// Largest upload (a model or a CSV).
pub const MAX_UPLOAD_BYTES: u64 = 512 << 20;
/// Worker threads answering requests; a publish occupies one for seconds.
pub const WORKERS: usize = 8;
/// Longest request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 16 << 10;
/// Most connections open at once; more are closed as soon as accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// Longest wait for a client while reading a body or writing an answer.
pub const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Uploads streaming at once. An upload holds a worker while its body
/// arrives (a slow client: up to [`IO_TIMEOUT`] per stall), so half the
/// workers stay free for everything else; one more upload is answered 503.
pub const MAX_UPLOADS_AT_ONCE: usize = WORKERS / 2;

/// Uploads streaming now (process-wide: one API per process).
static UPLOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the [`MAX_UPLOADS_AT_ONCE`] upload slots, given back on drop.
struct UploadSlot;

impl UploadSlot {
    fn take() -> Option<UploadSlot> {
        use std::sync::atomic::Ordering;
        UPLOADS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_UPLOADS_AT_ONCE).then_some(n + 1))
            .ok()
            .map(|_| UploadSlot)
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        UPLOADS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// An API answer: status and JSON (or text for /metrics).
pub struct Reply {
    status: u16,
    body: Vec<u8>,
    content_type: &'static str,
}

impl Reply {
    fn json(status: u16, v: Value) -> Reply {
        Reply { status, body: serde_json::to_vec(&v).unwrap_or_default(), content_type: "application/json" }
    }
    fn ok<T: serde::Serialize>(status: u16, v: &T) -> Reply {
        match serde_json::to_value(v) {
            Ok(v) => Reply::json(status, v),
            Err(e) => error(500, "internal", &format!("encoding the answer: {e}")),
        }
    }
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    Reply::json(status, json!({"error": {"code": code, "message": message}}))
}

/// Serves the API until the process ends. Returns once the listener is up.
pub fn start(fleet: Arc<Fleet>) -> Result<std::net::SocketAddr, String> {
    let listen = fleet.config.api_listen;
    let listener =
        std::net::TcpListener::bind(listen).map_err(|e| format!("api_listen: cannot listen on {listen}: {e}"))?;
    let server = http_server(listener).map_err(|e| format!("api_listen: serving on {listen}: {e}"))?;
    let addr = server.server_addr().to_ip().ok_or("api_listen: not an IP listener")?;
    let server = Arc::new(server);
    for i in 0..WORKERS {
        let server = server.clone();
        let worker_fleet = fleet.clone();
        fleet
            .supervisor
            .spawn(&format!("api-{i}"), move || loop {
                match server.recv() {
                    Ok(req) => handle(&worker_fleet, req),
                    Err(e) => {
                        log::warn!("api: accepting a request: {e}");
                        // Not a busy loop if accepting keeps failing (fds exhausted).
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            })
            .map_err(|e| format!("starting API threads: {e}"))?;
    }
    Ok(addr)
}

/// The API's server with its limits (module docs).
#[cfg(target_os = "linux")]
fn http_server(listener: std::net::TcpListener) -> std::io::Result<tiny_http::Server> {
    let limits = tiny_http::EventedLimits {
        max_head_bytes: MAX_HEAD_BYTES,
        max_buffered_body: 64 << 10,
        max_connections: MAX_CONNECTIONS,
        io_timeout: IO_TIMEOUT,
        // Close, never drain: draining waits for the client, on a worker.
        max_drain_bytes: 0,
        // At MAX_CONNECTIONS, silent or trickling clients make room for new ones.
        ..tiny_http::EventedLimits::default()
    };
    tiny_http::Server::from_listener_evented(listener, limits)
}

/// Elsewhere upstream's threaded server (no limits on heads or waits:
/// the fleet server is meant to run on Linux).
#[cfg(not(target_os = "linux"))]
fn http_server(listener: std::net::TcpListener) -> std::io::Result<tiny_http::Server> {
    tiny_http::Server::from_listener(listener, None).map_err(|e| std::io::Error::other(e.to_string()))
}

fn handle(fleet: &Fleet, mut req: Request) {
    let reply = fleet
        .supervisor
        .guard("an API request", || route(fleet, &mut req))
        .unwrap_or_else(|| error(500, "internal", "the server failed on this request (logged); it carries on"));
    fleet.metrics.api(reply.status);
    let mut response = Response::from_data(reply.body).with_status_code(reply.status);
    if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], reply.content_type.as_bytes()) {
        response = response.with_header(h);
    }
    if let Err(e) = req.respond(response) {
        log::debug!("api: answering: {e}");
    }
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers().iter().find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name)).map(|h| h.value.as_str())
}

fn authorized(fleet: &Fleet, req: &Request) -> bool {
    let Some(value) = header(req, "Authorization") else { return false };
    let Some(token) = value.strip_prefix("Bearer ").map(str::trim) else { return false };
    let want = fleet.config.api_token.as_bytes();
    token.len() == want.len() && token.bytes().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Who the audit log says acted.
fn actor(req: &Request) -> String {
    header(req, "X-Outpost-Actor")
        .map(|a| a.chars().filter(|c| !c.is_control()).take(128).collect::<String>())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "operator".into())
}

fn route(fleet: &Fleet, req: &mut Request) -> Reply {
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let path = path.trim_end_matches('/');
    let method = req.method().clone();
    match (&method, path) {
        (Method::Get, "/health") => return Reply::json(200, json!({"status": "healthy"})),
        (Method::Get, "/ready") => {
            return match fleet.not_ready_reason() {
                None => Reply::json(200, json!({"status": "ready"})),
                Some(reason) => Reply::json(503, json!({"status": "not ready", "reason": reason})),
            }
        }
        (Method::Get, "" | "/dashboard") => {
            return Reply { status: 200, body: crate::dashboard::PAGE.as_bytes().to_vec(), content_type: "text/html; charset=utf-8" }
        }
        (Method::Get, "/metrics") => {
            return Reply {
                status: 200,
                body: fleet.metrics.render(&fleet.registry).into_bytes(),
                content_type: "text/plain; version=0.0.4; charset=utf-8",
            }
        }
        _ => {}
    }
    if !path.starts_with("/v1/") {
        return error(404, "not_found", &format!("no endpoint {path}"));
    }
    if !authorized(fleet, req) {
        log::warn!("api: refused {method} {path} from {:?}: missing or wrong bearer token", req.remote_addr());
        return error(
            401,
            "unauthorized",
            "this endpoint needs `Authorization: Bearer <api_token>` (the api_token of fleet.toml; the CLI reads OUTPOST_TOKEN or --token)",
        );
    }
    let actor = actor(req);
    let segments: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    match (&method, segments.as_slice()) {
        (Method::Get, ["devices"]) => match crate::fleet_view::devices_json(fleet) {
            Ok(v) => Reply::json(200, v),
            Err(e) => error(500, "internal", &e.to_string()),
        },
        (Method::Get, ["drift", name, version]) => {
            let scope = match query_param(query, "scope") {
                None | Some("recent") => crate::observations::Scope::Recent,
                Some("lifetime") => crate::observations::Scope::Lifetime,
                Some(other) => return error(422, "invalid", &format!("scope {other:?}: use recent or lifetime")),
            };
            match crate::fleet_view::drift_view(&fleet.observations, name, version, scope) {
                Ok(v) => Reply::json(200, v),
                Err(e @ crate::fleet_view::ViewError::UnknownVersion(_)) => error(404, "not_found", &e.to_string()),
                Err(e) => error(500, "internal", &e.to_string()),
            }
        }
        (Method::Get, ["devices", id]) => match (fleet.registry.device(id), fleet.registry.directive(id)) {
            (Ok(Some(d)), Ok(directive)) => Reply::ok(200, &json!({"device": d, "directive": directive})),
            (Ok(None), _) => error(404, "not_found", &format!("no device {id}")),
            (Err(e), _) | (_, Err(e)) => error(500, "internal", &e.to_string()),
        },
        (Method::Post, ["devices", id, "decommission"]) | (Method::Delete, ["devices", id]) => {
            decommission(fleet, id, &actor)
        }
        (Method::Post, ["devices"]) => {
            let body: ProvisionRequest = match read_json(req) {
                Ok(b) => b,
                Err(r) => return r,
            };
            let result = provision(&fleet.registry, &fleet.root, &fleet.config.public_broker_url, &body);
            let target = body.device_id.clone();
            match result {
                Ok(p) => {
                    // The new key from now on (a re-provisioned id's old
                    // one is forgotten with everything cached about it).
                    fleet.inbox.learn(&target);
                    if let Some(auth) = &fleet.broker_auth {
                        auth.forget(&target);
                    }
                    fleet.audit(&actor, "provision", &target, "ok");
                    Reply::ok(201, &p)
                }
                Err(e) => {
                    fleet.audit(&actor, "provision", &target, &format!("refused: {e}"));
                    match e {
                        ProvisionError::Exists(_) => error(409, "conflict", &e.to_string()),
                        ProvisionError::BadId(..) | ProvisionError::BadTag(_) | ProvisionError::LocalBroker { .. } => error(422, "invalid", &e.to_string()),
                        _ => error(500, "internal", &e.to_string()),
                    }
                }
            }
        }
        (Method::Get, ["models"]) => match fleet.registry.versions() {
            Ok(v) => Reply::ok(200, &json!({ "versions": v })),
            Err(e) => error(500, "internal", &e.to_string()),
        },
        (Method::Post, ["uploads"]) => upload(fleet, req, query, &actor),
        (Method::Post, ["publish"]) => publish(fleet, req, &actor),
        (Method::Post, ["deploy"]) => deploy(fleet, req, &actor),
        (Method::Post, ["rollouts"]) => rollout_start(fleet, req, &actor),
        (Method::Get, ["rollouts"]) => match fleet.rollouts.list(fleet) {
            Ok(all) => Reply::ok(200, &json!({ "rollouts": all })),
            Err(e) => rollout_error(&e),
        },
        (Method::Get, ["rollouts", id]) => match fleet.rollouts.status(fleet, id) {
            Ok(v) => Reply::json(200, v),
            Err(e) => rollout_error(&e),
        },
        (Method::Post, ["rollouts", id, verb @ ("pause" | "resume" | "abort")]) => {
            let cmd = match *verb {
                "pause" => RolloutCommand::Pause,
                "resume" => RolloutCommand::Resume,
                _ => RolloutCommand::Abort,
            };
            let result = fleet.rollouts.command(fleet, id, cmd);
            fleet.audit(&actor, &format!("rollout_{verb}"), id, &result.as_ref().map(|_| "ok".to_string()).unwrap_or_else(|e| format!("refused: {e}")));
            match result {
                Ok(v) => Reply::json(200, v),
                Err(e) => rollout_error(&e),
            }
        }
        (Method::Post, ["rollback"]) => rollback(fleet, req, &actor),
        (Method::Get, ["audit"]) => {
            let limit = query_param(query, "limit").and_then(|v| v.parse().ok()).unwrap_or(100usize).min(10_000);
            match fleet.registry.audit_log(limit) {
                Ok(a) => Reply::ok(200, &json!({ "audit": a })),
                Err(e) => error(500, "internal", &e.to_string()),
            }
        }
        (_, ["rollouts"] | ["rollouts", _] | ["rollouts", _, "pause" | "resume" | "abort"] | ["rollback"]) => {
            error(405, "method_not_allowed", &format!("{method} is not allowed on {path}"))
        }
        (_, ["devices", _, "decommission"]) => {
            error(405, "method_not_allowed", &format!("{method} is not allowed on {path}"))
        }
        (_, ["devices"] | ["devices", _] | ["models"] | ["uploads"] | ["publish"] | ["deploy"] | ["audit"]) => {
            error(405, "method_not_allowed", &format!("{method} is not allowed on {path}"))
        }
        _ => error(404, "not_found", &format!("no endpoint {path}")),
    }
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}

fn read_json<T: serde::de::DeserializeOwned>(req: &mut Request) -> Result<T, Reply> {
    if req.body_length().is_some_and(|n| n as u64 > MAX_JSON_BYTES) {
        return Err(error(413, "too_large", &format!("the JSON body is over {MAX_JSON_BYTES} bytes")));
    }
    let mut body = Vec::new();
    req.as_reader()
        .take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| error(400, "bad_request", &format!("reading the body: {e}")))?;
    if body.len() as u64 > MAX_JSON_BYTES {
        return Err(error(413, "too_large", &format!("the JSON body is over {MAX_JSON_BYTES} bytes")));
    }
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| error(400, "bad_request", &format!("malformed JSON: {e}")))?;
    serde_json::from_value(value).map_err(|e| error(422, "invalid", &e.to_string()))
}

/// A file name safe to keep (its extension tells the model format).
fn safe_file_name(name: &str) -> Option<String> {
    let base = Path::new(name).file_name()?.to_str()?;
    let clean: String =
        base.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect();
    (!clean.is_empty() && !clean.starts_with('.')).then_some(clean)
}

fn upload(fleet: &Fleet, req: &mut Request, query: &str, actor: &str) -> Reply {
    let Some(name) = query_param(query, "filename").and_then(safe_file_name) else {
        return error(422, "invalid", "upload needs ?filename=NAME (the extension tells a model's format)");
    };
    if req.body_length().is_some_and(|n| n as u64 > MAX_UPLOAD_BYTES) {
        return error(413, "too_large", &format!("uploads are limited to {MAX_UPLOAD_BYTES} bytes"));
    }
    let Some(_slot) = UploadSlot::take() else {
        return error(503, "unavailable", &format!("{MAX_UPLOADS_AT_ONCE} uploads are in progress; try again shortly"));
    };
    let id = format!("{:016x}", unique());
    let dir = fleet.config.uploads_dir().join(&id);
    let path = dir.join(&name);
    let result = (|| -> Result<u64, Reply> {
        std::fs::create_dir_all(&dir).map_err(|e| error(500, "internal", &format!("creating {}: {e}", dir.display())))?;
        let mut file =
            std::fs::File::create(&path).map_err(|e| error(500, "internal", &format!("creating {}: {e}", path.display())))?;
        let n = std::io::copy(&mut req.as_reader().take(MAX_UPLOAD_BYTES + 1), &mut file)
            .map_err(|e| error(400, "bad_request", &format!("reading the upload: {e}")))?;
        if n > MAX_UPLOAD_BYTES {
            return Err(error(413, "too_large", &format!("uploads are limited to {MAX_UPLOAD_BYTES} bytes")));
        }
        Ok(n)
    })();
    match result {
        Ok(size) => {
            fleet.audit(actor, "upload", &name, &format!("ok: {id}, {size} bytes"));
            Reply::json(201, json!({"upload": id, "size": size, "filename": name}))
        }
        Err(reply) => {
            let _ = std::fs::remove_dir_all(&dir);
            fleet.audit(actor, "upload", &name, "failed");
            reply
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    name: String,
    version: String,
    model: String,
    train_data: String,
    test_data: String,
    min_accuracy: f64,
}

/// The single file of upload `id`.
fn upload_path(fleet: &Fleet, id: &str) -> Result<PathBuf, String> {
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{id:?} is not an upload id"));
    }
    let dir = fleet.config.uploads_dir().join(id);
    let entry = std::fs::read_dir(&dir)
        .ok()
        .and_then(|mut it| it.next())
        .and_then(Result::ok)
        .ok_or_else(|| format!("no upload {id} (uploads are single-use)"))?;
    Ok(entry.path())
}

fn publish(fleet: &Fleet, req: &mut Request, actor: &str) -> Reply {
    let body: PublishBody = match read_json(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let target = format!("{}@{}", body.name, body.version);
    let ids = [&body.model, &body.train_data, &body.test_data];
    let paths: Result<Vec<PathBuf>, String> = ids.iter().map(|id| upload_path(fleet, id)).collect();
    let reply = match paths {
        Err(e) => {
            fleet.metrics.publish("refused");
            fleet.audit(actor, "publish", &target, &format!("refused: {e}"));
            error(422, "invalid", &e)
        }
        Ok(paths) => {
            let request = PublishRequest {
                name: body.name.clone(),
                version: body.version.clone(),
                model: paths[0].clone(),
                train_data: paths[1].clone(),
                test_data: paths[2].clone(),
                min_accuracy: body.min_accuracy,
            };
            match fleet.publisher.publish(&request) {
                Ok(report) => {
                    fleet.metrics.publish("ok");
                    let acc = report.accuracy.as_ref().map(|a| format!(", accuracy {:.4}", a.accuracy)).unwrap_or_default();
                    fleet.audit(actor, "publish", &target, &format!("ok: sequence {}{acc}", report.sequence));
                    Reply::ok(201, &report)
                }
                Err(e) => {
                    let refusal = e.is_refusal();
                    fleet.metrics.publish(if refusal { "refused" } else { "error" });
                    fleet.audit(actor, "publish", &target, &format!("refused: {e}"));
                    match e {
                        PublishError::VersionExists { .. } => error(409, "conflict", &e.to_string()),
                        PublishError::Refused(_) => error(422, "refused", &e.to_string()),
                        _ => error(500, "internal", &e.to_string()),
                    }
                }
            }
        }
    };
    // Uploads are single-use: whatever the outcome, they go.
    for id in ids {
        if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            let _ = std::fs::remove_dir_all(fleet.config.uploads_dir().join(id));
        }
    }
    reply
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    target: String,
    devices: Vec<String>,
}

fn deploy(fleet: &Fleet, req: &mut Request, actor: &str) -> Reply {
    let body: DeployBody = match read_json(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let what = format!("{} to {}", body.target, body.devices.join(","));
    let result = parse_target(&body.target).and_then(|(n, v)| fleet.directives.deploy(n, v, &body.devices, None));
    match result {
        Ok(deployed) => {
            fleet.audit(actor, "deploy", &what, "ok");
            Reply::ok(200, &json!({ "deployed": deployed }))
        }
        Err(e) => {
            fleet.audit(actor, "deploy", &what, &format!("refused: {e}"));
            if e.is_client_error() {
                error(422, "invalid", &e.to_string())
            } else {
                error(500, "internal", &e.to_string())
            }
        }
    }
}

fn rollout_error(e: &RolloutError) -> Reply {
    let (status, code) = e.status();
    error(status, code, &e.to_string())
}

fn rollout_start(fleet: &Fleet, req: &mut Request, actor: &str) -> Reply {
    let body: StartRequest = match read_json(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let what = body
        .target
        .clone()
        .unwrap_or_else(|| format!("{}@{}", body.model.as_deref().unwrap_or("?"), body.version.as_deref().unwrap_or("?")));
    match fleet.rollouts.start(fleet, &body) {
        Ok(v) => {
            fleet.audit(actor, "rollout_start", &what, &format!("ok: {}", v["id"].as_str().unwrap_or("?")));
            Reply::json(201, v)
        }
        Err(e) => {
            fleet.audit(actor, "rollout_start", &what, &format!("refused: {e}"));
            rollout_error(&e)
        }
    }
}

fn rollback(fleet: &Fleet, req: &mut Request, actor: &str) -> Reply {
    let body: RollbackRequest = match read_json(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let what = format!("{} to {}", body.model, body.to);
    match fleet.rollouts.rollback(fleet, &body) {
        Ok(v) => {
            fleet.audit(actor, "rollback", &what, &format!("ok: {} device(s)", v["targeted"]));
            Reply::json(200, v)
        }
        Err(e) => {
            fleet.audit(actor, "rollback", &what, &format!("refused: {e}"));
            rollout_error(&e)
        }
    }
}

/// Decommissions a device (`outpost-fleet decommission`): the registry
/// empties its credential and key and drops its directive; the link forgets
/// its key, counters and presence, so everything it signs is rejected from
/// now on; the embedded broker revokes it (cached credential dropped, an
/// open session closed at its next packet or ping), so it cannot connect
/// again; its retained directive is cleared. With an external broker the
/// operator removes the credential there; nothing the device publishes is
/// believed either way.
fn decommission(fleet: &Fleet, id: &str, actor: &str) -> Reply {
    let newly = match fleet.registry.decommission(id) {
        Ok(n) => n,
        Err(e @ crate::registry::RegistryError::UnknownDevice(_)) => {
            fleet.audit(actor, "decommission", id, &format!("refused: {e}"));
            return error(404, "not_found", &e.to_string());
        }
        Err(e) => {
            fleet.audit(actor, "decommission", id, &format!("failed: {e}"));
            return error(500, "internal", &e.to_string());
        }
    };
    fleet.inbox.forget(id);
    if let Some(auth) = &fleet.broker_auth {
        auth.revoke(id);
    }
    // An empty retained message removes the retained directive.
    let cleared = fleet.link.client.try_publish(
        outpost_runtime::protocol::topics::desired(id),
        rumqttc::QoS::AtLeastOnce,
        true,
        Vec::new(),
    );
    let mut result = if newly { "ok".to_string() } else { "ok: already decommissioned".to_string() };
    if let Err(e) = &cleared {
        log::warn!("decommission {id}: clearing its retained directive: {e}");
        result.push_str(&format!("; its retained directive was not cleared ({e})"));
    }
    fleet.audit(actor, "decommission", id, &result);
    Reply::json(200, json!({"device": id, "decommissioned": true, "already": !newly}))
}
