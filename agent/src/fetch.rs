//! Bundle download over HTTP(S), for directives that give a `url` (large
//! models kept on a web server or object store rather than sent through
//! the broker).
//!
//! The URL is a *source*, not a trust anchor: every byte still goes through
//! the same [`Download`](crate::download::Download) — the streaming
//! signature and digest checks, the `.part` file, the resume point — exactly
//! as chunks over MQTT do. A server that sends other bytes gets the bundle
//! refused; one that sends more bytes than the signed size is cut off at
//! that size (the limit against endless data); one that stops midway is
//! asked again later from the last verified byte with `Range: bytes=N-`.
//!
//! One thread per fetch reads the body in [`PIECE`]-sized pieces and hands
//! them to the agent's main loop, which verifies and writes them. It never
//! runs more than [`AHEAD`] bytes ahead of what the main loop accepted, so
//! a fast server and a slow disk cannot fill memory.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use outpost_runtime::bundle::Digest;

use crate::agent::Input;

/// Bytes per piece handed to the main loop.
pub const PIECE: usize = 64 << 10;
/// Most bytes read but not yet accepted by the main loop.
pub const AHEAD: u64 = 1 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A server silent this long mid-body is given up on (and asked again later).
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What a fetch thread reports to the main loop.
#[derive(Debug)]
pub enum FetchEvent {
    /// `bytes` of the bundle starting at `offset`.
    Bytes { bundle: Digest, offset: u64, bytes: Vec<u8> },
    /// The fetch stopped before the end; retry later from the resume point.
    Failed { bundle: Digest, reason: String },
}

/// A running fetch. Dropping it stops the thread at its next piece.
#[derive(Debug)]
pub struct Fetch {
    cancel: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
}

impl Fetch {
    /// Starts fetching `url` from byte `from` up to `size` (the signed size).
    pub fn start(url: &str, bundle: Digest, from: u64, size: u64, events: Sender<Input>) -> std::io::Result<Fetch> {
        let cancel = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(from));
        let (stop, done) = (cancel.clone(), accepted.clone());
        let url = url.to_string();
        std::thread::Builder::new().name("outpost-fetch".into()).spawn(move || {
            let report = |e: FetchEvent| events.send(Input::Fetch(e)).is_ok();
            if let Err(reason) = run(&url, bundle, from, size, &stop, &done, &report) {
                if !stop.load(Ordering::Relaxed) {
                    report(FetchEvent::Failed { bundle, reason });
                }
            }
        })?;
        Ok(Fetch { cancel, accepted })
    }

    /// The main loop accepted everything up to `offset`.
    pub fn accepted(&self, offset: u64) {
        self.accepted.store(offset, Ordering::Relaxed);
    }
}

impl Drop for Fetch {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

fn run(
    url: &str,
    bundle: Digest,
    from: u64,
    size: u64,
    cancel: &AtomicBool,
    accepted: &AtomicU64,
    report: &dyn Fn(FetchEvent) -> bool,
) -> Result<(), String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("{url}: only http:// and https:// URLs are fetched"));
    }
    let agent = ureq::AgentBuilder::new().timeout_connect(CONNECT_TIMEOUT).timeout_read(READ_TIMEOUT).build();
    let mut request = agent.get(url);
    if from > 0 {
        request = request.set("Range", &format!("bytes={from}-"));
    }
    let response = request.call().map_err(|e| format!("GET {url}: {e}"))?;
    // 206 must start where we asked; a 200 (Range ignored) starts at 0 and
    // the bytes we already have are skipped.
    let mut skip = 0u64;
    match response.status() {
        206 => {
            let range = response.header("Content-Range").unwrap_or("");
            let start = range
                .strip_prefix("bytes ")
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.trim().parse::<u64>().ok());
            if start != Some(from) {
                return Err(format!("GET {url}: asked for bytes from {from}, got Content-Range {range:?}"));
            }
        }
        200 => skip = from,
        other => return Err(format!("GET {url}: HTTP {other}")),
    }
    // Never read past the signed size, whatever the server says.
    let mut body = response.into_reader().take(skip + size.saturating_sub(from));
    let mut offset = from;
    let mut buf = vec![0u8; PIECE];
    while offset < size {
        if cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        if offset.saturating_sub(accepted.load(Ordering::Relaxed)) >= AHEAD {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let n = body.read(&mut buf).map_err(|e| format!("GET {url}: reading at byte {offset}: {e}"))?;
        if n == 0 {
            return Err(format!("GET {url}: the body ended at byte {offset} of {size}"));
        }
        let mut piece = &buf[..n];
        if skip > 0 {
            let drop = (skip as usize).min(piece.len());
            piece = &piece[drop..];
            skip -= drop as u64;
            if piece.is_empty() {
                continue;
            }
        }
        if !report(FetchEvent::Bytes { bundle, offset, bytes: piece.to_vec() }) {
            return Ok(());
        }
        offset += piece.len() as u64;
    }
    Ok(())
}
