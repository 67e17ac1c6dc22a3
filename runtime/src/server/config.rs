//! Server settings, with the defaults a device wants.

use std::time::Duration;

/// How the HTTP server runs. `ServerConfig::default()` listens on
/// `127.0.0.1:8080` with one worker per core and dynamic batching off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// `host:port` to listen on; port 0 picks a free port (see
    /// [`RunningServer::local_addr`](super::RunningServer::local_addr)).
    pub listen: String,
    /// Worker threads: they take requests, parse them and run the model.
    /// 0 = one per core, plus one with dynamic batching on (the worker that
    /// gathers a batch waits out part of the window while the others keep
    /// parsing; measured on 2 cores: 31k req/s with 2 workers, 39k with 3).
    pub threads: usize,
    /// Largest request body accepted; a larger one is answered 413 before it
    /// is read. Default 4 MiB.
    pub max_body_bytes: usize,
    /// Requests admitted but not yet picked up by a worker (and, with dynamic
    /// batching, parsed requests waiting for a batch). A request that finds
    /// the queue full is answered 503 with `Retry-After` at once, so latency
    /// stays bounded under overload instead of growing without end.
    pub queue_capacity: usize,
    /// How long the first request of a batch waits for others to join it.
    /// Zero turns dynamic batching off. A batch also closes early when it is
    /// full or when no other request is on its way, so a lone request never
    /// waits out the window.
    pub batch_window: Duration,
    /// Most samples (rows) one batched run takes.
    pub max_batch: usize,
    /// Socket write timeout (a client that stops reading its answer is cut
    /// off after it) and TCP keepalive idle time (a client that vanished is
    /// noticed within a minute after it). There is no read timeout: see
    /// `bind_listener` in the server module for why tiny_http cannot have one.
    pub io_timeout: Duration,
    /// Seconds a shed client is told to wait (`Retry-After`).
    pub retry_after_secs: u32,
    /// How long a worker that has just answered keeps polling for the next
    /// request before it sleeps. Waking a sleeping thread on an idle core
    /// costs tens of µs (a virtual machine's idle vCPU more); a request that
    /// arrives within the spin skips it. Between polls the worker yields
    /// its core to any other runnable thread (the client, on a small
    /// device), so polling only uses a core nobody else wants. Measured on
    /// 2 vCPUs with wrk on the same cores (event-driven server): p50 at one
    /// connection 93 µs without, 58 µs with 200 µs; at 32 connections
    /// 47k req/s without, 49.6k with (39k when the poll did not yield). It
    /// costs at most this much CPU after the last request of a burst; zero
    /// turns it off (battery-powered devices).
    pub idle_spin: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".to_string(),
            threads: 0,
            max_body_bytes: 4 * 1024 * 1024,
            queue_capacity: 256,
            batch_window: Duration::ZERO,
            max_batch: 32,
            io_timeout: Duration::from_secs(30),
            retry_after_secs: 1,
            idle_spin: Duration::from_micros(200),
        }
    }
}

impl ServerConfig {
    /// The worker count actually used (see [`threads`](Self::threads)).
    pub fn worker_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            cores + usize::from(self.batching_enabled())
        }
    }

    pub fn batching_enabled(&self) -> bool {
        !self.batch_window.is_zero() && self.max_batch > 1
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_body_bytes == 0 {
            return Err("max body size must be at least 1 byte".into());
        }
        if self.queue_capacity == 0 {
            return Err("queue capacity must be at least 1".into());
        }
        if self.max_batch == 0 {
            return Err("max batch must be at least 1".into());
        }
        if self.io_timeout.is_zero() {
            return Err("I/O timeout must be above zero".into());
        }
        if self.threads > 1024 {
            return Err(format!("{} worker threads is more than any device has use for", self.threads));
        }
        Ok(())
    }
}
