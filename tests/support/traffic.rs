//! The apps on the devices: one thread per device sending `/predict` with
//! the fixture's test rows, recording every answer. The traffic is what
//! probation and the rollout gates judge (error rate, latency), and the
//! record shows whether a device kept serving through an outage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::device::feature_rows;
use super::http;

/// One request's outcome.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    /// HTTP status; 0 when nothing answered.
    pub status: u16,
    /// The version that answered.
    pub version: Option<String>,
}

pub struct Traffic {
    samples: Arc<Mutex<HashMap<String, Vec<Sample>>>>,
    paused: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    /// Starts sending to each (device id, port) every `every`.
    pub fn start(devices: &[(String, u16)], every: Duration) -> Traffic {
        let rows = Arc::new(feature_rows("bc_test.csv"));
        let samples = Arc::new(Mutex::new(HashMap::new()));
        let paused = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = devices
            .iter()
            .cloned()
            .map(|(id, port)| {
                let (rows, samples, paused, stop) = (rows.clone(), samples.clone(), paused.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        if !paused.lock().expect("paused").contains(&id) {
                            let row = &rows[i % rows.len()];
                            i += 1;
                            let answer = http::post(port, "/predict", &json!({ "features": row }));
                            let (status, version) = match answer {
                                Ok(a) => {
                                    let v: Value = a.json();
                                    (a.status, v["model"]["version"].as_str().map(str::to_string))
                                }
                                Err(_) => (0, None),
                            };
                            let s = Sample { at: Instant::now(), status, version };
                            samples.lock().expect("samples").entry(id.clone()).or_insert_with(Vec::new).push(s);
                        }
                        std::thread::sleep(every);
                    }
                })
            })
            .collect();
        Traffic { samples, paused, stop, threads }
    }

    pub fn pause(&self, device: &str) {
        self.paused.lock().expect("paused").push(device.to_string());
    }

    pub fn resume(&self, device: &str) {
        self.paused.lock().expect("paused").retain(|d| d != device);
    }

    /// A device's samples answered at or after `since`.
    pub fn since(&self, device: &str, since: Instant) -> Vec<Sample> {
        self.samples
            .lock()
            .expect("samples")
            .get(device)
            .map(|v| v.iter().filter(|s| s.at >= since).cloned().collect())
            .unwrap_or_default()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
