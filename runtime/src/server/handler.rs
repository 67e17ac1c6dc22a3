//! Taking requests, handling them, answering them.
//!
//! Threads, and why:
//!
//! - There is no thread per connection (on Linux: our tiny_http patch 4,
//!   its `evented` module). Every connection waits in one epoll set, and
//!   idle **workers** (`threads`) all wait there; the kernel wakes one per
//!   ready connection, and that worker reads the request (its body too, up
//!   to 64 KiB, before the request is handed over — a client sending slowly
//!   holds no worker), handles it itself — parses and validates it against
//!   the model, runs it — and writes the answer. One wake-up per request at
//!   most, and under load none: a worker goes from answer to next request
//!   with a read, a write and a re-arm, and requests waiting their turn
//!   wait in their sockets (one per connection at most, connections
//!   bounded), not in a queue of ours. Probes (`/health`, `/ready`, v2
//!   health), 404 and 405 are answered at once. Elsewhere than Linux,
//!   upstream tiny_http reads each connection on a thread of its own and
//!   queues requests for the workers, who take them the same way.
//! - The **overflow dispatcher** steps in only when every worker is stuck:
//!   all busy, and none has finished a request for [`STUCK_AFTER`] (with
//!   upstream tiny_http: as soon as all are busy, since its queue grows
//!   meanwhile). It answers probes itself (so an orchestrator's probes keep
//!   working when the workers are held up by slow clients or long batches)
//!   and puts everything else in the bounded work queue, which workers
//!   empty before taking new requests; a request that finds that queue
//!   full is answered 503 with `Retry-After` at once. Overload is shed
//!   instead of queued without end. (With batching on, the queue of parsed
//!   requests waiting for a batch is bounded the same way.)
//! - With dynamic batching on, a validated request that can be merged
//!   becomes a [`Job`] in the batch queue, and the worker then tries to
//!   gather and run a batch itself; see [`super::batching`].
//!
//! Every handler runs under `catch_unwind`: a bug answers 500 for that one
//! request and the worker carries on.

use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tiny_http::{Header, Request, Response};

use super::batching::Job;
use super::config::ServerConfig;
use super::error::{push_json_str, ApiError};
use super::metrics::Metrics;
use super::queue::{BoundedQueue, PushError};
use super::request::{self, Render};
use super::response;
use super::routes::{self, Route, Routed};
use super::slot::{Deployed, ModelSlot};
use super::v2;
use crate::tensor::TensorData;

/// State every server thread shares.
pub(crate) struct Shared {
    pub config: ServerConfig,
    pub slot: Arc<ModelSlot>,
    pub metrics: Metrics,
    pub work: Arc<BoundedQueue<Work>>,
    pub jobs: BoundedQueue<Job>,
    /// Requests being drained after a 413 (see [`answer_oversized`]).
    pub draining: Arc<AtomicUsize>,
    pub batching: bool,
    /// Inference requests admitted to the work queue and not yet turned into
    /// a job or answered. The batcher closes a batch early when this is zero
    /// and no job waits: nobody else is coming.
    pub pending: AtomicUsize,
    /// Only one worker gathers a batch at a time, so concurrent
    /// requests end up in one batch rather than in several half-empty ones.
    pub gather: Mutex<()>,
    /// A gatherer is waiting for jobs (see [`super::batching`]).
    pub gathering: AtomicBool,
    pub stopping: AtomicBool,
    /// The tiny_http server requests come from (replaced if its listener fails).
    pub http: RwLock<Arc<tiny_http::Server>>,
    pub local_addr: std::net::SocketAddr,
    /// Workers handling a request (not waiting for one), out of `workers`.
    pub busy: AtomicUsize,
    pub workers: usize,
    /// Signalled when every worker is busy: the overflow dispatcher's cue.
    pub all_busy: (Mutex<()>, std::sync::Condvar),
    /// The overflow dispatcher waits on `all_busy` (only then is it signalled).
    pub overflow_waiting: AtomicBool,
    /// When a worker last finished a request, in µs since `epoch`
    /// (kept only with [`OVERFLOW_AFTER`] above zero).
    pub last_free_us: AtomicU64,
    pub epoch: Instant,
}

/// With the event-driven tiny_http (Linux), requests that wait for a
/// worker wait in their sockets, one per connection at most — bounded by
/// the connection limit, nothing queues inside the server. Workers that are
/// all busy but keep finishing requests need no help then, and a dispatcher
/// moving requests between them would only add a hand-off to each. It steps
/// in when no worker has finished a request for this long: every worker is
/// stuck (a slow client, a long batch), and probes must still be answered
/// and new requests shed rather than left waiting.
const STUCK_AFTER: Duration = Duration::from_millis(2);

/// How long every worker must have been busy without a break before the
/// dispatcher steps in: [`STUCK_AFTER`] with the event-driven tiny_http,
/// zero with upstream's (whose queue grows while the workers are busy).
const OVERFLOW_AFTER: Duration = if super::EVENTED { STUCK_AFTER } else { Duration::ZERO };

impl Shared {
    /// Every worker busy, and (with [`OVERFLOW_AFTER`]) none has finished a
    /// request for that long.
    fn workers_stuck(&self) -> bool {
        if self.busy.load(Ordering::SeqCst) < self.workers {
            return false;
        }
        let since_free = (self.epoch.elapsed().as_micros() as u64).saturating_sub(self.last_free_us.load(Ordering::Acquire));
        since_free >= OVERFLOW_AFTER.as_micros() as u64
    }

    pub(crate) fn current_server(&self) -> Arc<tiny_http::Server> {
        // Read on every worker loop; written only if the listener fails.
        self.http.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A request admitted to the work queue.
pub(crate) struct Work {
    request: Request,
    route: Route,
    started: Instant,
}

/// Where and how a handled request is answered, and what it is counted as.
pub(crate) struct Reply {
    request: Request,
    endpoint: &'static str,
    v2: bool,
    started: Instant,
    _in_flight: InFlight,
}

/// Counts a request in `outpost_http_requests_in_flight` until answered.
struct InFlight(Gauge);

impl InFlight {
    fn new(g: &Gauge) -> InFlight {
        g.inc();
        InFlight(g.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An answer ready to send.
pub(crate) struct Answer {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

const JSON: &str = "application/json";

impl Answer {
    fn json(status: u16, body: Vec<u8>) -> Answer {
        Answer { status, content_type: JSON, body, headers: Vec::new() }
    }

    fn error(e: &ApiError, v2: bool) -> Answer {
        let body = if v2 { e.to_v2_json() } else { e.to_json() };
        let mut a = Answer::json(e.status, body);
        if let Some(s) = e.retry_after {
            a.headers.push(("Retry-After", s.to_string()));
        }
        if let Some(allow) = e.allow {
            a.headers.push(("Allow", allow.to_string()));
        }
        a
    }
}

fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn request_header<'a>(rq: &'a Request, name: &'static str) -> Option<&'a str> {
    rq.headers().iter().find(|h| h.field.equiv(name)).map(|h| h.value.as_str())
}

fn build_response(a: Answer) -> Response<std::io::Cursor<Vec<u8>>> {
    // Always a Content-Length, never chunked: every answer is in memory
    // already, and simple clients (and load generators) count on it.
    let mut response =
        Response::from_data(a.body).with_status_code(a.status).with_chunked_threshold(usize::MAX);
    if let Some(h) = header("Content-Type", a.content_type) {
        response.add_header(h);
    }
    for (name, value) in &a.headers {
        if let Some(h) = header(name, value) {
            response.add_header(h);
        }
    }
    response
}

/// Sends `answer` and counts it. A client that hung up is not an error.
fn send(metrics: &Metrics, rq: Request, endpoint: &'static str, started: Instant, answer: Answer) {
    // Counted before the answer leaves, so a client that reads /metrics right
    // after its answer sees it counted.
    metrics.record_request(endpoint, answer.status, started.elapsed());
    let _ = rq.respond(build_response(answer));
}

impl Reply {
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    fn send(self, metrics: &Metrics, answer: Answer) {
        send(metrics, self.request, self.endpoint, self.started, answer);
    }
}

// ---------------------------------------------------------------- dispatcher

/// Routes a request just taken from tiny_http. Probes, 404 and 405 are
/// answered here; anything else comes back as [`Work`] (an inference
/// request is counted as pending from now on).
fn admit(shared: &Shared, rq: Request) -> Option<Work> {
    let started = Instant::now();
    if shared.stopping.load(Ordering::Acquire) {
        send_unread(shared, rq, routes::UNKNOWN_ENDPOINT, started, Answer::error(&ApiError::shutting_down(), false));
        return None;
    }
    let route = match routes::route(rq.method(), rq.url()) {
        Routed::Found(route) => route,
        Routed::NotFound => {
            let v2 = rq.url().starts_with("/v2");
            let e = ApiError::not_found(format!("no route {} {}", rq.method(), path_only(rq.url())));
            send_unread(shared, rq, routes::UNKNOWN_ENDPOINT, started, Answer::error(&e, v2));
            return None;
        }
        Routed::WrongMethod(allow) => {
            let v2 = rq.url().starts_with("/v2");
            let e = ApiError::method_not_allowed(rq.method().as_str(), path_only(rq.url()), allow);
            send_unread(shared, rq, routes::UNKNOWN_ENDPOINT, started, Answer::error(&e, v2));
            return None;
        }
    };
    if route.is_probe() {
        let endpoint = route.endpoint();
        let answer = probe(shared, &route);
        send_unread(shared, rq, endpoint, started, answer);
        return None;
    }
    if is_inference(&route) {
        shared.pending.fetch_add(1, Ordering::AcqRel);
    }
    Some(Work { request: rq, route, started })
}

fn is_inference(route: &Route) -> bool {
    matches!(route, Route::Predict | Route::PredictBatch | Route::V2Infer { .. })
}

/// Puts admitted work in the bounded queue for the workers, or sheds it.
fn enqueue(shared: &Shared, server: &tiny_http::Server, work: Work) {
    match shared.work.try_push(work) {
        Ok(()) => {
            // A worker may be waiting in tiny_http's queue meanwhile; wake it
            // so it empties ours first.
            if shared.busy.load(Ordering::Acquire) < shared.workers {
                server.unblock();
            }
        }
        Err(PushError::Full(w)) | Err(PushError::Closed(w)) => {
            if is_inference(&w.route) {
                release_pending(shared);
            }
            shared.metrics.record_shed();
            let e = ApiError::overloaded(shared.config.retry_after_secs);
            send_unread(shared, w.request, w.route.endpoint(), w.started, Answer::error(&e, w.route.is_v2()));
        }
    }
}

/// The overflow dispatcher: takes requests from tiny_http only while every
/// worker is busy; see the module docs.
pub(crate) fn overflow(shared: &Shared) {
    while !shared.stopping.load(Ordering::Acquire) {
        {
            let mut g = shared.all_busy.0.lock().unwrap_or_else(|p| p.into_inner());
            shared.overflow_waiting.store(true, Ordering::SeqCst);
            while shared.busy.load(Ordering::SeqCst) < shared.workers && !shared.stopping.load(Ordering::Acquire) {
                // The timeout only bounds how late a missed wake-up is noticed.
                g = shared
                    .all_busy
                    .1
                    .wait_timeout(g, Duration::from_millis(50))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            shared.overflow_waiting.store(false, Ordering::SeqCst);
        }
        if !OVERFLOW_AFTER.is_zero() {
            // Busy, but maybe still finishing requests: look again later.
            std::thread::sleep(OVERFLOW_AFTER);
        }
        let server = shared.current_server();
        while shared.workers_stuck() && !shared.stopping.load(Ordering::Acquire) {
            // Polls rather than waits: it must see `busy` drop (a worker
            // free again takes requests itself) within 100 µs.
            match server.try_recv() {
                Ok(Some(rq)) => {
                    if let Some(work) = admit(shared, rq) {
                        enqueue(shared, &server, work);
                    }
                }
                Ok(None) => std::thread::sleep(Duration::from_micros(100)),
                // The listener failed; the worker that got the error re-listens.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

/// Keeps serving the connections of a listener that failed (they still
/// send requests into its queue) by moving its requests to the work queue.
pub(crate) fn forward_old(shared: &Shared, old: Arc<tiny_http::Server>) {
    while !shared.stopping.load(Ordering::Acquire) {
        match old.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(rq)) => {
                if let Some(work) = admit(shared, rq) {
                    let current = shared.current_server();
                    enqueue(shared, &current, work);
                }
            }
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

/// Answers a request whose body was not read. tiny_http reads small bodies
/// with the head ([`super::buffered_body_bytes`]); a larger one is drained
/// when the request is dropped, which must not happen on the dispatcher (a
/// slow client would stall every other request), so it goes to a drain
/// thread like a 413.
fn send_unread(shared: &Shared, rq: Request, endpoint: &'static str, started: Instant, answer: Answer) {
    if rq.body_length().is_some_and(|n| n > super::buffered_body_bytes(&shared.config)) {
        let status = answer.status;
        shared.metrics.record_request(endpoint, status, started.elapsed());
        respond_and_drain(shared, rq, build_response(answer));
    } else {
        send(&shared.metrics, rq, endpoint, started, answer);
    }
}

fn path_only(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or("")
}

fn probe(shared: &Shared, route: &Route) -> Answer {
    let current = shared.slot.current();
    match (route, current) {
        (Route::Health, _) => Answer::json(200, br#"{"status":"healthy"}"#.to_vec()),
        (Route::V2Live, _) => Answer::json(200, br#"{"live":true}"#.to_vec()),
        (Route::Ready, Some(_)) => Answer::json(200, br#"{"status":"ready"}"#.to_vec()),
        (Route::V2Ready, Some(_)) => Answer::json(200, br#"{"ready":true}"#.to_vec()),
        (Route::V2ModelReady { name, version }, Some(d)) => match v2::check_model(&d, name, version.as_deref()) {
            Ok(()) => Answer::json(200, v2::model_ready(&d)),
            Err(e) => Answer::error(&e, true),
        },
        (Route::Ready, None) => Answer::json(503, br#"{"status":"not ready"}"#.to_vec()),
        (_, None) => Answer::error(&ApiError::not_ready(), true),
        // Probes are the routes above; anything else is answered by workers.
        (_, Some(_)) => Answer::error(&ApiError::internal("not a probe"), route.is_v2()),
    }
}

/// One admitted inference request is no longer pending; wakes the batcher
/// when that leaves nothing on its way.
fn release_pending(shared: &Shared) {
    if shared.pending.fetch_sub(1, Ordering::AcqRel) == 1 && shared.batching {
        shared.jobs.wake_all();
    }
}

// ------------------------------------------------------------------- workers

/// How long an idle worker waits on tiny_http's queue before looking at
/// the work queue again.
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// A request from tiny_http's queue if one comes within `spin`, polling.
fn poll_for(server: &tiny_http::Server, spin: Duration) -> Option<Request> {
    if spin.is_zero() {
        return None;
    }
    let until = Instant::now() + spin;
    loop {
        if let Ok(Some(rq)) = server.try_recv() {
            return Some(rq);
        }
        if Instant::now() >= until {
            return None;
        }
        // Lets a runnable thread on this core (the client, on a small
        // device; another worker) go first: a poll that takes the core
        // from whoever would send the next request only delays it.
        std::thread::yield_now();
    }
}

/// A worker: handles queued work first, else waits at tiny_http's queue;
/// see the module docs.
pub(crate) fn work(shared: &Arc<Shared>) {
    loop {
        if let Some(w) = shared.work.try_pop() {
            let _busy = Busy::new(shared);
            handle_work(shared, w);
            continue;
        }
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let server = shared.current_server();
        // Every idle worker waits here at once, and tiny_http wakes one per
        // ready connection (reading its request on this thread); first it
        // polls a little (`ServerConfig::idle_spin`), so a request that
        // comes meanwhile skips the wake-up. The wait is bounded, so work
        // the overflow dispatcher queued just after we looked is picked up
        // soon even if its wake-up went to another worker. (With upstream
        // tiny_http, waiting side by side needs our patch 3 to its queue.)
        let polled = poll_for(&server, shared.config.idle_spin);
        let rq = match polled {
            Some(rq) => rq,
            None => match server.recv_timeout(IDLE_WAIT) {
                Ok(Some(rq)) => rq,
                // Timed out, or woken by `unblock`: look at the queue again.
                Ok(None) => continue,
                Err(e) if shared.stopping.load(Ordering::Acquire) => {
                    log::debug!("worker stopping: {e}");
                    return;
                }
                Err(e) => {
                    // tiny_http's accept loop ends on its first error (e.g.
                    // out of file descriptors): listen again rather than
                    // leave a process that is alive but deaf. The error is
                    // queued once, so one worker re-listens.
                    log::error!("the HTTP listener failed ({e}); listening again on {}", shared.local_addr);
                    relisten(shared, server);
                    continue;
                }
            },
        };
        let _busy = Busy::new(shared);
        if let Some(w) = admit(shared, rq) {
            handle_work(shared, w);
        }
    }
}

/// Counts a worker as busy (not waiting for requests) while it lives.
struct Busy<'a>(&'a Shared);

impl<'a> Busy<'a> {
    fn new(shared: &'a Shared) -> Busy<'a> {
        // The dispatcher's cue, given only while it waits for it: under
        // sustained load every request makes the workers all busy, and a
        // notify costs a system call whether anyone waits or not.
        if shared.busy.fetch_add(1, Ordering::SeqCst) + 1 >= shared.workers
            && shared.overflow_waiting.load(Ordering::SeqCst)
        {
            let _g = shared.all_busy.0.lock().unwrap_or_else(|p| p.into_inner());
            shared.all_busy.1.notify_one();
        }
        Busy(shared)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if !OVERFLOW_AFTER.is_zero() {
            self.0.last_free_us.store(self.0.epoch.elapsed().as_micros() as u64, Ordering::Release);
        }
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
        // A waiting gatherer may now see that nobody else is coming.
        if self.0.gathering.load(Ordering::Acquire) {
            self.0.jobs.wake_all();
        }
    }
}

/// Binds a fresh listener on the same address and keeps the old one's
/// connections served.
fn relisten(shared: &Arc<Shared>, old: Arc<tiny_http::Server>) {
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let fresh = super::bind_listener(shared.local_addr, &shared.config)
            .and_then(|l| super::http_server(l, &shared.config));
        match fresh {
            Ok(s) => {
                *shared.http.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
                break;
            }
            Err(e) => {
                log::error!("{e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("outpost-old-listener".into())
        .spawn(move || forward_old(&s, old));
    if let Err(e) = spawned {
        log::error!("cannot keep the old listener's connections served: {e}");
    }
}

/// Takes one request that is ready in its socket, if any, and handles it on
/// this thread (an inference request becomes a queued job with batching on).
/// For the batch gatherer: with the event-driven server, requests that no
/// worker has picked up yet wait unread in their sockets, invisible to it.
pub(crate) fn take_ready_request(shared: &Shared) -> bool {
    if !super::EVENTED || shared.stopping.load(Ordering::Acquire) {
        return false;
    }
    match shared.current_server().try_recv() {
        Ok(Some(rq)) => {
            if let Some(w) = admit(shared, rq) {
                handle_work(shared, w);
            }
            true
        }
        _ => false,
    }
}

fn handle_work(shared: &Shared, w: Work) {
    let endpoint = w.route.endpoint();
    let inference = is_inference(&w.route);
    let started = w.started;
    let mut pending = PendingToken { shared, held: inference };
    let outcome = catch_unwind(AssertUnwindSafe(|| handle(shared, w, &mut pending)));
    drop(pending);
    if outcome.is_err() {
        // The request was dropped while unwinding, and tiny_http answers a
        // dropped request with 500 itself. Count it.
        log::error!("handler panicked on {endpoint}; answered 500");
        shared.metrics.record_request(endpoint, 500, started.elapsed());
    }
}

/// Releases the request's `pending` count exactly once.
struct PendingToken<'a> {
    shared: &'a Shared,
    held: bool,
}

impl PendingToken<'_> {
    fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            release_pending(self.shared);
        }
    }
}

impl Drop for PendingToken<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

fn handle(shared: &Shared, w: Work, pending: &mut PendingToken<'_>) {
    let Work { request, route, started } = w;
    let reply = Reply {
        request,
        endpoint: route.endpoint(),
        v2: route.is_v2(),
        started,
        _in_flight: InFlight::new(shared.metrics.in_flight()),
    };
    match &route {
        Route::Metrics => {
            let (text, content_type) = shared.metrics.encode(request_header(&reply.request, "Accept"));
            reply.send(&shared.metrics, Answer { status: 200, content_type, body: text.into_bytes(), headers: Vec::new() });
        }
        Route::ModelInfo => {
            let answer = match shared.slot.current() {
                Some(d) => Answer::json(200, model_info_json(&d, shared)),
                None => Answer::error(&ApiError::not_ready(), false),
            };
            reply.send(&shared.metrics, answer);
        }
        Route::Drift => {
            let answer = match shared.slot.current() {
                Some(d) => drift_answer(&d),
                None => Answer::error(&ApiError::not_ready(), false),
            };
            reply.send(&shared.metrics, answer);
        }
        Route::V2Server => reply.send(&shared.metrics, Answer::json(200, v2::server_metadata())),
        Route::V2ModelMetadata { name, version } => {
            let answer = match shared.slot.current() {
                Some(d) => match v2::check_model(&d, name, version.as_deref()) {
                    Ok(()) => Answer::json(200, v2::model_metadata(&d)),
                    Err(e) => Answer::error(&e, true),
                },
                None => Answer::error(&ApiError::not_ready(), true),
            };
            reply.send(&shared.metrics, answer);
        }
        Route::Predict | Route::PredictBatch | Route::V2Infer { .. } => {
            handle_inference(shared, reply, &route, pending)
        }
        // Probes never reach the workers (the dispatcher answers them).
        Route::Health | Route::Ready | Route::V2Live | Route::V2Ready | Route::V2ModelReady { .. } => {
            let answer = probe(shared, &route);
            reply.send(&shared.metrics, answer);
        }
    }
}

fn handle_inference(shared: &Shared, mut reply: Reply, route: &Route, pending: &mut PendingToken<'_>) {
    let v2 = reply.v2;
    let Some(d) = shared.slot.current() else {
        return reply.send(&shared.metrics, Answer::error(&ApiError::not_ready(), v2));
    };
    if let Route::V2Infer { name, version } = route {
        if let Err(e) = v2::check_model(&d, name, version.as_deref()) {
            return reply.send(&shared.metrics, Answer::error(&e, true));
        }
    }
    let body = match read_body(&mut reply.request, shared.config.max_body_bytes) {
        Ok(body) => body,
        Err(e) => {
            d.stats().record_input_error();
            if e.status == 413 {
                return answer_oversized(shared, reply, e);
            }
            return reply.send(&shared.metrics, Answer::error(&e, v2));
        }
    };
    let parsed = match route {
        Route::Predict => request::parse_predict(&body, &d),
        Route::PredictBatch => request::parse_batch(&body, &d),
        _ => match request_header(&reply.request, v2::HEADER_LENGTH).map(|v| v.trim().parse::<usize>()) {
            None => v2::parse_infer(&body, None, &d),
            Some(Ok(n)) => v2::parse_infer(&body, Some(n), &d),
            Some(Err(_)) => Err(ApiError::bad_request(format!("{} must be a byte count", v2::HEADER_LENGTH))),
        },
    };
    drop(body);
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            d.stats().record_input_error();
            return reply.send(&shared.metrics, Answer::error(&e, v2));
        }
    };
    if shared.batching && d.batches_dynamically() {
        if let Some(rows) = parsed.rows.filter(|r| *r <= shared.config.max_batch) {
            // Release before pushing: see `Shared::pending`.
            pending.release();
            let job = Job { deployed: d, inputs: parsed.inputs, rows, render: parsed.render, reply };
            match shared.jobs.try_push(job) {
                Ok(()) => return super::batching::drive(shared),
                Err(PushError::Full(job)) => {
                    shared.metrics.record_shed();
                    let e = ApiError::overloaded(shared.config.retry_after_secs);
                    let v2 = job.reply.v2;
                    return job.reply.send(&shared.metrics, Answer::error(&e, v2));
                }
                // Shutting down: run it here rather than fail it.
                Err(PushError::Closed(job)) => {
                    let Job { deployed, inputs, rows, render, reply } = job;
                    let result = run_model(shared, &deployed, inputs, 1);
                    return finish(shared, reply, &deployed, &render, rows, result);
                }
            }
        }
    }
    pending.release();
    let rows = parsed.rows.unwrap_or(1);
    let result = run_model(shared, &d, parsed.inputs, 1);
    finish(shared, reply, &d, &parsed.render, rows, result);
}

/// Runs the model once (`requests` merged requests), timing it.
pub(crate) fn run_model(
    shared: &Shared,
    d: &Deployed,
    inputs: Vec<TensorData>,
    requests: usize,
) -> Result<Vec<TensorData>, ApiError> {
    let rows = inputs.first().map(TensorData::batch_len).unwrap_or(1);
    // The drift sketch needs the input after the run has consumed it.
    let tapped = if d.drift().is_some() { inputs.first().cloned() } else { None };
    let t = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| d.model().run(inputs)));
    shared.metrics.record_run(t.elapsed(), rows, requests);
    match result {
        Ok(Ok(outputs)) => {
            if let Some(input) = &tapped {
                d.observe_drift(input, &outputs);
            }
            Ok(outputs)
        }
        Ok(Err(e)) if e.is_input_error() => {
            // Requests are validated before they get here, so this is a gap
            // in validation; still the caller's input, still a 422.
            let field = e.field().map(|f| format!("inputs.{f}")).unwrap_or_else(|| "inputs".to_string());
            Err(ApiError::invalid_shape(field, e))
        }
        Ok(Err(e)) => Err(ApiError::inference_failed(e)),
        Err(_) => Err(ApiError::inference_failed("the model panicked")),
    }
}

/// Renders and sends the answer of one request, and counts it on the model.
pub(crate) fn finish(
    shared: &Shared,
    reply: Reply,
    d: &Deployed,
    render: &Render,
    rows: usize,
    result: Result<Vec<TensorData>, ApiError>,
) {
    let answer = match result {
        Ok(outputs) => {
            d.stats().record_ok(rows, reply.started.elapsed());
            match render {
                Render::V2(r) => {
                    let body = v2::render_infer(r, d, &outputs);
                    match body.json_len {
                        None => Answer::json(200, body.body),
                        Some(n) => Answer {
                            status: 200,
                            content_type: "application/octet-stream",
                            body: body.body,
                            headers: vec![(v2::HEADER_LENGTH, n.to_string())],
                        },
                    }
                }
                other => Answer::json(200, response::render(other, d, &outputs)),
            }
        }
        Err(e) => {
            if e.status >= 500 {
                d.stats().record_failure(reply.started.elapsed());
            } else {
                d.stats().record_input_error();
            }
            Answer::error(&e, reply.v2)
        }
    };
    reply.send(&shared.metrics, answer);
}

// --------------------------------------------------------------------- bodies

/// Reads the body, refusing one over `limit` *before* reading it when its
/// length is declared (and as soon as it passes the limit when chunked).
fn read_body(rq: &mut Request, limit: usize) -> Result<Vec<u8>, ApiError> {
    let declared = rq.body_length();
    if let Some(n) = declared {
        if n > limit {
            return Err(ApiError::body_too_large(limit, Some(n)));
        }
    }
    let cap = declared.unwrap_or(0).min(limit);
    let mut body = Vec::with_capacity(cap);
    // One byte past the limit tells an over-long chunked body from one that
    // is exactly at it.
    let read = rq.as_reader().take(limit as u64 + 1).read_to_end(&mut body);
    match read {
        Ok(_) if body.len() > limit => Err(ApiError::body_too_large(limit, None)),
        Ok(_) => match declared {
            Some(n) if body.len() < n => Err(ApiError::request_timeout()),
            _ => Ok(body),
        },
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            Err(ApiError::request_timeout())
        }
        Err(e) => Err(ApiError::bad_request(format!("cannot read the request body: {e}"))),
    }
}

/// Answers 413 without reading the body, then disposes of the request.
///
/// Dropping a tiny_http request drains the unread rest of its declared body
/// (so the connection can carry the next request); the vendored tiny_http
/// does that through a fixed buffer (vendor/tiny_http/PATCHES.md). The drain
/// lasts as long as the client keeps sending, so it runs on a short-lived
/// thread of its own (at most [`MAX_DRAINING`] at once, else here): a client
/// that keeps sending after its 413 ties up neither a worker nor other
/// clients' answers. A chunked body (no declared length) is not drained.
fn answer_oversized(shared: &Shared, reply: Reply, e: ApiError) {
    let answer = Answer::error(&e, reply.v2);
    let Reply { request, endpoint, started, .. } = reply;
    shared.metrics.record_request(endpoint, 413, started.elapsed());
    respond_and_drain(shared, request, build_response(answer));
}

/// Sends `response`, then drops the request (draining its unread body) on a
/// drain thread when one is free, else here.
fn respond_and_drain(shared: &Shared, request: Request, response: Response<std::io::Cursor<Vec<u8>>>) {
    if request.body_length().is_some() && shared.draining.fetch_add(1, Ordering::AcqRel) < MAX_DRAINING {
        let slot = DrainSlot(shared.draining.clone());
        let spawned = std::thread::Builder::new().name("outpost-drain".into()).spawn(move || {
            let _slot = slot;
            let _ = request.respond(response);
        });
        if let Err(e) = spawned {
            // The closure (and the request in it) was dropped with the failed
            // spawn; tiny_http answers a dropped request itself.
            log::warn!("cannot start a drain thread: {e}");
        }
        return;
    }
    if request.body_length().is_some() {
        // Over the concurrent-drain limit: undo the count taken above.
        shared.draining.fetch_sub(1, Ordering::AcqRel);
    }
    let _ = request.respond(response);
}

/// Most requests drained at once on their own threads after a 413.
const MAX_DRAINING: usize = 8;

/// Releases a drain slot when the drain thread ends.
struct DrainSlot(Arc<AtomicUsize>);

impl Drop for DrainSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

// ------------------------------------------------------------- model info

fn spec_json(out: &mut String, spec: &crate::tensor::TensorSpec) {
    out.push_str("{\"name\":");
    push_json_str(out, &spec.name);
    out.push_str(",\"datatype\":\"");
    out.push_str(spec.element_type.v2_name());
    out.push_str("\",\"shape\":[");
    for (i, d) in spec.shape.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match d {
            Some(d) => out.push_str(&d.to_string()),
            None => out.push_str("null"),
        }
    }
    out.push_str("]}");
}

fn model_info_json(d: &Deployed, shared: &Shared) -> Vec<u8> {
    let info = d.info();
    let sig = d.model().signature();
    let mut out = String::with_capacity(512);
    out.push_str("{\"name\":");
    push_json_str(&mut out, &info.name);
    out.push_str(",\"version\":");
    push_json_str(&mut out, &info.version);
    out.push_str(",\"sha256\":");
    push_json_str(&mut out, &info.sha256);
    out.push_str(",\"format\":");
    push_json_str(&mut out, info.format.as_str());
    out.push_str(&format!(",\"size_bytes\":{}", info.size_bytes));
    out.push_str(",\"signer\":");
    match &info.signer {
        Some(s) => push_json_str(&mut out, s),
        None => out.push_str("null"),
    }
    // How the model takes a batch: "symbolic", "fixed", or "fixed_fallback"
    // when a free batch only loaded fixed at 1 (see model::BatchMode).
    out.push_str(",\"batch\":");
    push_json_str(&mut out, d.model().batch_mode().as_str());
    out.push_str(",\"inputs\":[");
    for (i, s) in sig.inputs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        spec_json(&mut out, s);
    }
    out.push_str("],\"outputs\":[");
    for (i, s) in sig.outputs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        spec_json(&mut out, s);
    }
    let loaded = d.loaded_at().duration_since(std::time::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
    out.push_str(&format!(
        "],\"loaded_at\":{loaded},\"dynamic_batching\":{}}}",
        shared.batching && d.batches_dynamically()
    ));
    out.into_bytes()
}

/// `GET /v1/drift`: the monitor's latest report (the last closed window,
/// or the open one before any closed).
fn drift_answer(d: &Deployed) -> Answer {
    match d.drift() {
        Some(monitor) => match serde_json::to_vec(&monitor.report()) {
            Ok(body) => Answer::json(200, body),
            Err(e) => Answer::error(&ApiError::internal(format!("cannot encode the drift report: {e}")), false),
        },
        None => Answer::error(
            &ApiError::not_found(format!(
                "model {:?} has no drift reference (a signed bundle carries one; a plain model file does not)",
                d.info().name
            )),
            false,
        ),
    }
}
