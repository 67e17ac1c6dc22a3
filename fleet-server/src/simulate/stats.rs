//! What the simulated fleet did, counted as it happens: shared by every
//! worker, read by the progress loop ([`Snapshot`]), and optionally written
//! as an event log (one CSV line per connect, directive, commit, failure)
//! from which a benchmark times each rollout stage.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use outpost_runtime::protocol::Status;

/// Every status a device can be in, in lifecycle order (for the counts).
const STATUSES: [Status; 9] = [
    Status::Idle,
    Status::Downloading,
    Status::Verifying,
    Status::Activating,
    Status::Probation,
    Status::Serving,
    Status::RolledBack,
    Status::Failed,
    Status::Offline,
];

fn index(s: Status) -> usize {
    STATUSES.iter().position(|x| *x == s).unwrap_or(0)
}

/// Shared counters (relaxed atomics: they are statistics, not synchronisation).
pub struct Stats {
    started: Instant,
    devices: i64,
    connected: AtomicI64,
    /// Seconds from the start until every device was connected at once.
    all_connected_after: Mutex<Option<f64>>,
    by_status: [AtomicI64; 9],
    states: AtomicU64,
    telemetry: AtomicU64,
    sketches: AtomicU64,
    chunk_requests: AtomicU64,
    chunk_bytes: AtomicU64,
    directives_accepted: AtomicU64,
    directives_refused: AtomicU64,
    /// Devices that committed each NAME@VERSION (and still serve it).
    committed: Mutex<BTreeMap<String, u64>>,
    events: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
}

/// The counters at one moment.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Snapshot {
    pub elapsed_secs: f64,
    pub devices: i64,
    pub connected: i64,
    /// Seconds from the start until every device was connected (first time).
    pub all_connected_after_secs: Option<f64>,
    pub statuses: BTreeMap<String, i64>,
    /// NAME@VERSION → devices serving it committed.
    pub committed: BTreeMap<String, u64>,
    pub states_sent: u64,
    pub telemetry_sent: u64,
    pub sketches_sent: u64,
    pub chunk_requests_sent: u64,
    /// Bundle bytes received and verified.
    pub chunk_bytes_received: u64,
    pub directives_accepted: u64,
    pub directives_refused: u64,
    /// This process (the simulator): resident memory and CPU time so far.
    pub rss_bytes: Option<u64>,
    pub cpu_secs: Option<f64>,
}

impl Stats {
    /// Counters for `devices` devices, started now.
    pub fn new(devices: usize, events: Option<std::fs::File>) -> Stats {
        Stats {
            started: Instant::now(),
            devices: devices as i64,
            connected: AtomicI64::new(0),
            all_connected_after: Mutex::new(None),
            by_status: Default::default(),
            states: AtomicU64::new(0),
            telemetry: AtomicU64::new(0),
            sketches: AtomicU64::new(0),
            chunk_requests: AtomicU64::new(0),
            chunk_bytes: AtomicU64::new(0),
            directives_accepted: AtomicU64::new(0),
            directives_refused: AtomicU64::new(0),
            committed: Mutex::new(BTreeMap::new()),
            events: events.map(|f| Mutex::new(std::io::BufWriter::new(f))),
        }
    }

    pub fn connected(&self, up: bool) {
        let now = self.connected.fetch_add(if up { 1 } else { -1 }, Ordering::Relaxed) + if up { 1 } else { -1 };
        if up && now == self.devices {
            if let Ok(mut at) = self.all_connected_after.lock() {
                at.get_or_insert(self.started.elapsed().as_secs_f64());
            }
        }
    }

    pub fn enter(&self, s: Status) {
        self.by_status[index(s)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn leave(&self, s: Status) {
        self.by_status[index(s)].fetch_sub(1, Ordering::Relaxed);
    }

    pub fn state(&self) {
        self.states.fetch_add(1, Ordering::Relaxed);
    }

    pub fn telemetry(&self) {
        self.telemetry.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sketch(&self) {
        self.sketches.fetch_add(1, Ordering::Relaxed);
    }

    pub fn chunk_request(&self) {
        self.chunk_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn chunk_bytes(&self, n: u64) {
        self.chunk_bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub fn directive(&self, accepted: bool) {
        let c = if accepted { &self.directives_accepted } else { &self.directives_refused };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Moves a device's committed version from `from` to `to`.
    pub fn commit(&self, from: Option<&str>, to: Option<&str>) {
        if let Ok(mut c) = self.committed.lock() {
            if let Some(f) = from {
                if let Some(n) = c.get_mut(f) {
                    *n = n.saturating_sub(1);
                }
            }
            if let Some(t) = to {
                *c.entry(t.to_string()).or_insert(0) += 1;
            }
        }
    }

    /// Appends `unix_ms,device,event,detail` to the event log, if any.
    pub fn event(&self, device: &str, event: &str, detail: &str) {
        let Some(events) = &self.events else { return };
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let detail = detail.replace([',', '\n'], " ");
        if let Ok(mut w) = events.lock() {
            let _ = writeln!(w, "{ms},{device},{event},{detail}");
        }
    }

    pub fn flush(&self) {
        if let Some(events) = &self.events {
            if let Ok(mut w) = events.lock() {
                let _ = w.flush();
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (rss_bytes, cpu_secs) = process_usage();
        Snapshot {
            elapsed_secs: self.started.elapsed().as_secs_f64(),
            devices: self.devices,
            connected: self.connected.load(Ordering::Relaxed),
            all_connected_after_secs: self.all_connected_after.lock().ok().and_then(|a| *a),
            statuses: STATUSES
                .iter()
                .zip(&self.by_status)
                .map(|(s, n)| (s.as_str().to_string(), n.load(Ordering::Relaxed)))
                .filter(|(_, n)| *n != 0)
                .collect(),
            committed: self.committed.lock().map(|c| c.iter().filter(|(_, n)| **n > 0).map(|(k, v)| (k.clone(), *v)).collect()).unwrap_or_default(),
            states_sent: load(&self.states),
            telemetry_sent: load(&self.telemetry),
            sketches_sent: load(&self.sketches),
            chunk_requests_sent: load(&self.chunk_requests),
            chunk_bytes_received: load(&self.chunk_bytes),
            directives_accepted: load(&self.directives_accepted),
            directives_refused: load(&self.directives_refused),
            rss_bytes,
            cpu_secs,
        }
    }
}

/// This process's resident memory (bytes) and user+system CPU time
/// (seconds), from /proc (Linux; `None` elsewhere).
pub fn process_usage() -> (Option<u64>, Option<f64>) {
    let rss = outpost_agent::telemetry::rss_bytes();
    let cpu = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| {
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th fields of the line, in clock ticks (100 Hz on Linux).
        let rest = s.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = f.get(11)?.parse().ok()?;
        let stime: f64 = f.get(12)?.parse().ok()?;
        Some((utime + stime) / 100.0)
    });
    (rss, cpu)
}
