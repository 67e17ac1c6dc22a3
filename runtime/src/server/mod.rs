//! The device's local predict API over HTTP (tiny_http), as a library: the
//! `outpost-runtime serve` command and the agent both start it with
//! [`Server::start`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use outpost_runtime::server::{Deployed, ModelSlot, Server, ServerConfig};
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let slot = Arc::new(ModelSlot::with(Deployed::load_file("fixtures/bc_mlp.onnx", &Default::default())?));
//! let config = ServerConfig { listen: "127.0.0.1:0".into(), ..ServerConfig::default() };
//! let server = Server::start(config, slot.clone())?;
//! println!("serving on http://{}", server.local_addr());
//! // ... later, switch models with no request failing:
//! slot.swap(Deployed::load_file("fixtures/bc_gb.onnx", &Default::default())?);
//! server.shutdown(); // answers what was admitted, then stops
//! # Ok(()) }
//! ```
//!
//! # Endpoints
//!
//! | method, path | answer |
//! |---|---|
//! | GET `/health` | 200 `{"status":"healthy"}` while the process serves |
//! | GET `/ready` | 200 `{"status":"ready"}` once a model is loaded and warm, else 503 |
//! | POST `/predict` | `{"features":[…]}` → `{"prediction","probability","model":{"name","version"}}`; `{"inputs":{name: array}}` → `{"outputs":{name: array},"model"}` ([`request`], [`response`]) |
//! | POST `/predict/batch` | `{"instances":[[…],…]}` → `{"predictions":[…],"probabilities":[…],"model"}`, one run |
//! | `/v2/…` | Open Inference Protocol v2, see [`v2`] |
//! | GET `/metrics` | Prometheus exposition, see [`metrics`] |
//! | GET `/v1/model` | name, version, sha256, format, size, signer, inputs, outputs |
//! | GET `/v1/drift` | the drift report (once the drift monitor is wired in) |
//!
//! Errors: see [`error`] for the body and the table of status codes. Bad
//! input never gets a 5xx and never stops the server.
//!
//! # Threads, queueing, batching
//!
//! See [`handler`] (who does what, where load is shed) and [`batching`].
//! The model lives in a [`ModelSlot`]: see [`slot`] for how swapping it
//! never fails a request.

pub mod batching;
pub mod config;
pub mod decode;
pub mod error;
pub mod handler;
pub mod memory;
pub mod metrics;
pub mod process_metrics;
mod queue;
pub mod request;
pub mod response;
pub mod routes;
pub mod slot;
pub mod v2;

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use config::ServerConfig;
pub use error::{ApiError, ServerError};
pub use process_metrics::{BuildInfo, ProcessCollector};
pub use slot::{sha256_hex, DeployError, Deployed, ModelInfo, ModelSlot, ServingStats, StatsSnapshot};

use handler::Shared;
use queue::BoundedQueue;

/// Starts servers. See the module docs.
pub struct Server;

impl Server {
    /// Binds `config.listen`, starts the threads, and returns at once. The
    /// server answers from the slot's model; an empty slot makes `/ready`
    /// and predictions answer 503 until a model is swapped in.
    pub fn start(config: ServerConfig, slot: Arc<ModelSlot>) -> Result<RunningServer, ServerError> {
        Server::start_with_metrics(config, slot, Vec::new())
    }

    /// [`start`](Self::start), with more Prometheus collectors exposed on
    /// `/metrics` beside the server's own — e.g. the MQTT stream's counters
    /// of `serve --mqtt`, which serves the same slot over another transport.
    pub fn start_with_metrics(
        config: ServerConfig,
        slot: Arc<ModelSlot>,
        extra_metrics: Vec<Box<dyn prometheus_client::collector::Collector>>,
    ) -> Result<RunningServer, ServerError> {
        Server::start_as(BuildInfo::runtime(), config, slot, extra_metrics)
    }

    /// [`start_with_metrics`](Self::start_with_metrics) for a program that
    /// embeds the server (the agent): `build` names it in
    /// `outpost_build_info` on `/metrics`, beside the process metrics.
    pub fn start_as(
        build: BuildInfo,
        config: ServerConfig,
        slot: Arc<ModelSlot>,
        extra_metrics: Vec<Box<dyn prometheus_client::collector::Collector>>,
    ) -> Result<RunningServer, ServerError> {
        config.validate().map_err(ServerError::Config)?;
        let addr = resolve(&config.listen)?;
        let listener = bind_listener(addr, &config)?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr: config.listen.clone(), source })?;
        let http = http_server(listener, &config)?;

        let workers = config.worker_threads();
        let batching = config.batching_enabled();
        let work = Arc::new(BoundedQueue::new(config.queue_capacity));
        let depth_of = work.clone();
        let metrics = metrics::Metrics::new(slot.clone(), Box::new(move || depth_of.len()), build, extra_metrics);
        let shared = Arc::new(Shared {
            jobs: BoundedQueue::new(config.queue_capacity),
            draining: Arc::new(AtomicUsize::new(0)),
            config,
            slot,
            metrics,
            work,
            batching,
            pending: AtomicUsize::new(0),
            gather: Mutex::new(()),
            gathering: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            http: std::sync::RwLock::new(Arc::new(http)),
            local_addr,
            busy: AtomicUsize::new(0),
            workers,
            all_busy: (Mutex::new(()), std::sync::Condvar::new()),
            overflow_waiting: AtomicBool::new(false),
            last_free_us: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        });

        let mut running = RunningServer { shared: shared.clone(), local_addr, overflow: None, workers: Vec::new() };
        // If a spawn fails, dropping `running` stops what did start.
        for i in 0..workers {
            let s = shared.clone();
            running.workers.push(spawn(format!("outpost-worker-{i}"), move || handler::work(&s))?);
        }
        let s = shared.clone();
        running.overflow = Some(spawn("outpost-overflow".into(), move || handler::overflow(&s))?);
        log::info!(
            "listening on http://{local_addr} ({workers} workers, queue {}, dynamic batching {})",
            shared.config.queue_capacity,
            if batching {
                format!("up to {} rows within {:?}", shared.config.max_batch, shared.config.batch_window)
            } else {
                "off".to_string()
            }
        );
        Ok(running)
    }
}

/// A started server. Dropping it shuts it down.
pub struct RunningServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    overflow: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer").field("local_addr", &self.local_addr).finish()
    }
}

impl RunningServer {
    /// The address the server listens on (the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The slot the server answers from (swap models through it).
    pub fn slot(&self) -> &Arc<ModelSlot> {
        &self.shared.slot
    }

    /// The settings it runs with.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// Blocks until the server stops (it only stops through [`shutdown`](Self::shutdown)
    /// from another thread, or with the process).
    pub fn wait(mut self) {
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.stop();
    }

    /// Stops taking requests, answers every request already admitted, and
    /// joins the server's threads. Connections that are open but idle are
    /// left to tiny_http, which closes them as their clients go.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let s = &self.shared;
        s.stopping.store(true, Ordering::Release);
        s.all_busy.1.notify_all();
        // Wake whichever worker waits in tiny_http's queue (once per worker,
        // as each may take a turn before it sees `stopping`).
        let server = s.current_server();
        for _ in 0..=s.workers {
            server.unblock();
        }
        if let Some(o) = self.overflow.take() {
            let _ = o.join();
        }
        // Workers answer what is queued, then leave.
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        s.work.close();
        s.jobs.close();
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, ServerError> {
    std::thread::Builder::new().name(name).spawn(f).map_err(ServerError::Spawn)
}

/// Bodies up to this size arrive with their request, read already:
/// tiny_http's own 1 KiB, or with the event-driven server up to 64 KiB
/// (within the body limit), read while the request waits in its socket.
pub(crate) fn buffered_body_bytes(config: &ServerConfig) -> usize {
    if EVENTED {
        config.max_body_bytes.clamp(1024, 64 * 1024)
    } else {
        1024
    }
}

/// Whether [`http_server`] is the event-driven tiny_http.
pub(crate) const EVENTED: bool = cfg!(target_os = "linux");

/// tiny_http over a bound listener. On Linux the event-driven server of our
/// tiny_http patch 4: no thread per connection, the workers read requests
/// themselves (see [`handler`]). Elsewhere upstream's threaded server.
pub(crate) fn http_server(listener: TcpListener, config: &ServerConfig) -> Result<tiny_http::Server, ServerError> {
    #[cfg(target_os = "linux")]
    {
        let limits = tiny_http::EventedLimits {
            max_buffered_body: buffered_body_bytes(config),
            io_timeout: config.io_timeout,
            // A client refused with 413 that sends its body anyway keeps its
            // connection (the answer to `a_413_does_not_read_...` in tests).
            max_drain_bytes: config.max_body_bytes.saturating_add(64 * 1024).max(8 << 20),
            ..tiny_http::EventedLimits::default()
        };
        tiny_http::Server::from_listener_evented(listener, limits).map_err(|e| ServerError::Http(e.to_string()))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = config;
        tiny_http::Server::from_listener(listener, None).map_err(|e| ServerError::Http(e.to_string()))
    }
}

fn resolve(listen: &str) -> Result<SocketAddr, ServerError> {
    let mut addrs = listen.to_socket_addrs().map_err(|e| ServerError::Address {
        addr: listen.to_string(),
        reason: e.to_string(),
    })?;
    addrs.next().ok_or_else(|| ServerError::Address {
        addr: listen.to_string(),
        reason: "resolves to no address".to_string(),
    })
}

/// A listening socket whose options accepted connections inherit (on Linux):
/// no Nagle delay on small answers, a write timeout so a client that stops
/// reading cannot hold a thread forever, and TCP keepalive so a client that
/// vanished (power cut, Wi-Fi gone) is noticed and its thread freed.
///
/// Deliberately no *read* timeout: Linux applies a listener's receive
/// timeout to `accept` itself, and tiny_http's accept loop ends on the first
/// accept error, so the server would go deaf after one idle period.
pub(crate) fn bind_listener(addr: SocketAddr, config: &ServerConfig) -> Result<TcpListener, ServerError> {
    use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};
    let bind_err = |source| ServerError::Bind { addr: addr.to_string(), source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(bind_err)?;
    // A restarted server must not wait for the old one's TIME_WAIT sockets.
    socket.set_reuse_address(true).map_err(bind_err)?;
    socket.set_tcp_nodelay(true).map_err(bind_err)?;
    socket.set_write_timeout(Some(config.io_timeout)).map_err(bind_err)?;
    let keepalive = TcpKeepalive::new()
        .with_time(config.io_timeout)
        .with_interval(Duration::from_secs(5));
    socket.set_keepalive(true).map_err(bind_err)?;
    socket.set_tcp_keepalive(&keepalive).map_err(bind_err)?;
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.listen(1024).map_err(bind_err)?;
    Ok(socket.into())
}
