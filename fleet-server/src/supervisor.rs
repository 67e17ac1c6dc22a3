//! The fleet's long-lived threads, watched: a panic in one request, one
//! MQTT message or one rollout tick is caught and counted, and the thread
//! goes on; a thread that ends anyway (a panic outside the guarded part, a
//! channel that closed) is named by `/ready`, which turns 503.
//!
//! - [`guarded`] runs one unit of work (a request, a message, a tick) under
//!   `catch_unwind`. What the work held is dropped during unwinding: an
//!   open SQLite transaction rolls back, and the locks the fleet shares
//!   recover from poisoning (see `registry`, `fleet_link`), so the next unit
//!   starts from consistent state.
//! - [`Supervisor::spawn`] starts a named thread meant to run for the life
//!   of the process and registers it; a guard inside the thread marks it
//!   dead when it ends, by return or by unwinding.
//!
//! Not caught: an abort (allocation failure, a panic while panicking) ends
//! the process, which is what the service manager's restart is for.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One watched thread.
#[derive(Debug)]
struct Watched {
    name: String,
    alive: AtomicBool,
}

/// Marks its thread dead when dropped (at the thread's end, unwinding or not).
struct AliveGuard(Arc<Watched>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            log::error!("thread {} died of a panic; /ready now reports it", self.0.name);
        } else {
            log::error!("thread {} ended; /ready now reports it", self.0.name);
        }
    }
}

/// The registry of long-lived threads (module docs).
#[derive(Debug, Default)]
pub struct Supervisor {
    threads: Mutex<Vec<Arc<Watched>>>,
    panics: AtomicU64,
    /// Also counts caught panics (`outpost_fleet_panics_total`).
    counter: Option<prometheus_client::metrics::counter::Counter>,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// A supervisor that also counts caught panics on `counter`.
    pub fn with_counter(counter: prometheus_client::metrics::counter::Counter) -> Supervisor {
        Supervisor { counter: Some(counter), ..Supervisor::default() }
    }

    /// Starts `f` on a thread named `name`, watched for the rest of the
    /// process: it should never return.
    pub fn spawn<F>(&self, name: &str, f: F) -> std::io::Result<JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        let watched = Arc::new(Watched { name: name.to_string(), alive: AtomicBool::new(true) });
        let guard = AliveGuard(watched.clone());
        let handle = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            let _guard = guard;
            f();
        })?;
        self.threads.lock().unwrap_or_else(|p| p.into_inner()).push(watched);
        Ok(handle)
    }

    /// Names of the watched threads that ended, in start order.
    pub fn dead(&self) -> Vec<String> {
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|w| !w.alive.load(Ordering::SeqCst))
            .map(|w| w.name.clone())
            .collect()
    }

    /// Panics caught by [`Supervisor::guard`] since start.
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    /// [`guarded`], counting a caught panic.
    pub fn guard<T>(&self, what: &str, f: impl FnOnce() -> T) -> Option<T> {
        let out = guarded(what, f);
        if out.is_none() {
            self.panics.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = &self.counter {
                c.inc();
            }
        }
        out
    }
}

/// Runs `f`; a panic in it is logged with `what` and becomes `None`.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-text panic".into());
            log::error!("panic caught in {what}: {msg}; carrying on");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_panicking_unit_is_caught_and_the_thread_goes_on() {
        let sup = Arc::new(Supervisor::new());
        let (tx, rx) = mpsc::channel::<u32>();
        let (done_tx, done_rx) = mpsc::channel::<u32>();
        let s = sup.clone();
        sup.spawn("test-worker", move || {
            while let Ok(n) = rx.recv() {
                // Every third unit panics; the others answer.
                if let Some(v) = s.guard("test unit", || {
                    assert!(n % 3 != 0, "unit {n} panics");
                    n * 2
                }) {
                    done_tx.send(v).expect("send");
                }
            }
            loop {
                std::thread::park();
            }
        })
        .expect("spawn");
        for n in 1..=7 {
            tx.send(n).expect("send");
        }
        let answers: Vec<u32> = (0..5).map(|_| done_rx.recv_timeout(Duration::from_secs(5)).expect("answer")).collect();
        assert_eq!(answers, vec![2, 4, 8, 10, 14]);
        assert_eq!(sup.panics(), 2);
        assert!(sup.dead().is_empty(), "the worker lives on: {:?}", sup.dead());
    }

    #[test]
    fn a_thread_that_dies_is_named() {
        let sup = Supervisor::new();
        let alive = sup.spawn("stays", || loop {
            std::thread::park();
        });
        assert!(alive.is_ok());
        let dies = sup.spawn("rollout-driver", || panic!("outside any guard")).expect("spawn");
        assert!(dies.join().is_err(), "it panicked");
        assert_eq!(sup.dead(), vec!["rollout-driver".to_string()]);
        let ends = sup.spawn("returns", || {}).expect("spawn");
        ends.join().expect("join");
        assert_eq!(sup.dead(), vec!["rollout-driver".to_string(), "returns".to_string()]);
    }
}
