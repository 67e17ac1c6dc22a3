//! Chunked, resumable bundle download over MQTT, verified as it arrives.
//!
//! The bundle is written, byte for byte, to the inactive slot's `.part`
//! file and fed at the same time through the bundle module's
//! [`StreamVerifier`] (header signature, certificate, expiry, the manifest
//! the directive named, model size, model digest) and a sha256 of the whole
//! file (the directive's `bundle_sha256`). A bad header is refused as soon
//! as it has arrived, before the model is downloaded.
//!
//! **Resuming.** Bytes are only ever appended in order, so the `.part`
//! file's length is how far the download got. After a reconnect the agent
//! simply asks again from there; after a restart it first feeds the existing
//! `.part` file through a fresh verifier (re-checking what is on disk), then
//! continues. A `.part.for` file next to it names the bundle the part
//! belongs to, so a part of another bundle is discarded, not resumed.
//!
//! **Sources.** Chunks over MQTT ([`Download::requests`] /
//! [`Download::on_reply`]), or — when the signed directive gives a `url` —
//! an HTTP(S) body read by [`crate::fetch`] ([`Download::on_bytes`]). Both
//! feed the same checks; the URL earns no trust.
//!
//! **Flow control.** At most `chunks_in_flight` requests are outstanding;
//! replies that arrive out of order wait (bounded by the same window) until
//! the gap is filled; a window with no progress for `chunk_timeout` is asked
//! again.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outpost_runtime::bundle::{Digest, StreamVerifier, TrustRoot, VerifiedHeader, VerifyError, VerifyOptions};
use outpost_runtime::protocol::{ChunkReply, ChunkRequest, Directive};
use sha2::{Digest as _, Sha256};

/// fsync the part file at least this often, so a power cut loses little.
const SYNC_EVERY: u64 = 1 << 20;

/// Why a download stopped.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The bytes are refused (signature, certificate, digest…). Chunks are
    /// unsigned, so this ends an attempt, not the update (see `retry`).
    #[error("bundle refused: {0}")]
    Refused(#[from] VerifyError),
    #[error("bundle refused: {0}")]
    Mismatch(String),
    /// The fleet cannot serve it now: retry later.
    #[error("the fleet cannot serve the bundle: {0}")]
    Unavailable(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// What a reply did.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Not for this download, or a duplicate.
    Ignored,
    /// Bytes verified and written; more to come.
    Advanced,
    /// Every byte is in and verified: call [`Download::finish`].
    Complete,
}

/// One bundle being downloaded into a `.part` file.
pub struct Download {
    directive: Directive,
    part_path: PathBuf,
    file: File,
    verifier: StreamVerifier,
    hasher: Sha256,
    /// Bytes verified and written (the resume point).
    written: u64,
    synced: u64,
    /// Next offset not yet requested.
    requested: u64,
    /// Outstanding requests by offset.
    in_flight: BTreeMap<u64, u32>,
    /// Replies ahead of `written`, waiting for the gap to fill.
    pending: BTreeMap<u64, Vec<u8>>,
    last_progress: Instant,
    chunk_size: u32,
    max_in_flight: usize,
    timeout: Duration,
    started: Instant,
    resumed_from: u64,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("bundle", &self.directive.bundle_sha256)
            .field("written", &self.written)
            .field("total", &self.directive.bundle_size)
            .finish()
    }
}

impl Download {
    /// Starts (or resumes) downloading the bundle `directive` names into
    /// `part_path`.
    pub fn start(
        directive: &Directive,
        part_path: &Path,
        trust: &TrustRoot,
        options: VerifyOptions,
        chunk_size: u32,
        max_in_flight: usize,
        timeout: Duration,
    ) -> Result<Download, DownloadError> {
        let io = |source| DownloadError::Io { path: part_path.to_path_buf(), source };
        let marker = marker_path(part_path);
        let same_bundle = std::fs::read_to_string(&marker).ok().is_some_and(|s| s.trim() == directive.bundle_sha256.to_hex());
        if !same_bundle {
            let _ = std::fs::remove_file(part_path);
            crate::slots::write_atomically(&marker, directive.bundle_sha256.to_hex().as_bytes())
                .map_err(|e| DownloadError::Io { path: marker.clone(), source: std::io::Error::other(e.to_string()) })?;
        }
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(part_path).map_err(io)?;
        let mut download = Download {
            directive: directive.clone(),
            part_path: part_path.to_path_buf(),
            verifier: StreamVerifier::new(trust.clone(), options),
            hasher: Sha256::new(),
            written: 0,
            synced: 0,
            requested: 0,
            in_flight: BTreeMap::new(),
            pending: BTreeMap::new(),
            last_progress: Instant::now(),
            chunk_size,
            max_in_flight,
            timeout,
            started: Instant::now(),
            resumed_from: 0,
            file: file.try_clone().map_err(io)?,
        };
        // Re-verify what an earlier run wrote. A part that fails (another
        // bundle's, or damaged by a power cut) is discarded, not trusted.
        let existing = file.metadata().map_err(io)?.len().min(directive.bundle_size);
        if existing > 0 {
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            let mut buf = vec![0u8; 64 << 10];
            let mut reader = (&mut file).take(existing);
            let mut ok = true;
            loop {
                let n = reader.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                if download.verifier.feed(&buf[..n]).is_err() {
                    ok = false;
                    break;
                }
                download.hasher.update(&buf[..n]);
                download.written += n as u64;
            }
            if !ok {
                log::warn!("discarding the partial download in {}: it does not verify", part_path.display());
                return Download::restart_empty(download, trust, options);
            }
            // Drop anything past the bundle's size (cannot normally happen).
            download.file.set_len(download.written).map_err(io)?;
            download.synced = download.written;
            download.requested = download.written;
            download.resumed_from = download.written;
            log::info!("resuming the download of {} at byte {}", directive.id(), download.written);
        }
        Ok(download)
    }

    fn restart_empty(mut d: Download, trust: &TrustRoot, options: VerifyOptions) -> Result<Download, DownloadError> {
        d.file.set_len(0).map_err(|source| DownloadError::Io { path: d.part_path.clone(), source })?;
        d.verifier = StreamVerifier::new(trust.clone(), options);
        d.hasher = Sha256::new();
        d.written = 0;
        d.synced = 0;
        d.requested = 0;
        d.resumed_from = 0;
        Ok(d)
    }

    pub fn directive(&self) -> &Directive {
        &self.directive
    }

    pub fn bundle(&self) -> &Digest {
        &self.directive.bundle_sha256
    }

    /// (bytes verified, total).
    pub fn progress(&self) -> (u64, u64) {
        (self.written, self.directive.bundle_size)
    }

    /// Where this run started (0, or where an earlier run got to).
    pub fn resumed_from(&self) -> u64 {
        self.resumed_from
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Forget outstanding requests (the connection dropped: they are lost),
    /// so the next [`requests`](Self::requests) asks again from the resume
    /// point.
    pub fn reset_in_flight(&mut self) {
        self.in_flight.clear();
        self.pending.clear();
        self.requested = self.written;
        self.last_progress = Instant::now();
    }

    /// The requests to send now: fills the window, or asks the whole window
    /// again after a timeout without progress.
    pub fn requests(&mut self) -> Vec<ChunkRequest> {
        if !self.in_flight.is_empty() && self.last_progress.elapsed() >= self.timeout {
            log::warn!("no chunk for {:?}; asking again from byte {}", self.timeout, self.written);
            self.reset_in_flight();
        }
        let total = self.directive.bundle_size;
        let mut out = Vec::new();
        while self.in_flight.len() < self.max_in_flight && self.requested < total {
            let len = (total - self.requested).min(self.chunk_size as u64) as u32;
            out.push(ChunkRequest::new(self.directive.bundle_sha256, self.requested, len));
            self.in_flight.insert(self.requested, len);
            self.requested += len as u64;
        }
        out
    }

    /// Takes a reply from `chunks/data`.
    pub fn on_reply(&mut self, reply: ChunkReply) -> Result<Progress, DownloadError> {
        if reply.bundle_sha256() != &self.directive.bundle_sha256 {
            return Ok(Progress::Ignored);
        }
        // Replies are unsigned: one that answers nothing we asked, or
        // contradicts the signed size, is ignored — the real answer to the
        // same request is still welcome.
        let (offset, total, bytes) = match reply {
            ChunkReply::Data { offset, total, bytes, .. } => (offset, total, bytes),
            ChunkReply::Unavailable { offset, reason, .. } => {
                if !self.in_flight.contains_key(&offset) {
                    return Ok(Progress::Ignored);
                }
                return Err(DownloadError::Unavailable(reason));
            }
        };
        if total != self.directive.bundle_size {
            // Debug: a forger must not be able to fill the log.
            log::debug!(
                "ignoring a chunk reply that says the bundle has {total} bytes (the signed directive says {})",
                self.directive.bundle_size
            );
            return Ok(Progress::Ignored);
        }
        // Only replies we asked for, of the length we asked for (the last
        // chunk may not be shorter than asked: we never ask past the end).
        match self.in_flight.get(&offset) {
            Some(len) if *len as usize == bytes.len() => {}
            _ => return Ok(Progress::Ignored),
        }
        self.in_flight.remove(&offset);
        if offset != self.written {
            self.pending.insert(offset, bytes);
            return Ok(Progress::Ignored);
        }
        let before = self.written;
        self.accept(&bytes)?;
        while let Some(next) = self.pending.remove(&self.written) {
            self.accept(&next)?;
        }
        self.advanced_from(before)
    }

    /// Takes bytes read from the directive's URL (see [`crate::fetch`]):
    /// only the ones that continue the file are used.
    pub fn on_bytes(&mut self, offset: u64, bytes: &[u8]) -> Result<Progress, DownloadError> {
        if offset != self.written || bytes.is_empty() {
            return Ok(Progress::Ignored);
        }
        if self.written + bytes.len() as u64 > self.directive.bundle_size {
            return Err(DownloadError::Mismatch(format!(
                "the server sent more than the signed {} bytes",
                self.directive.bundle_size
            )));
        }
        let before = self.written;
        self.accept(bytes)?;
        self.advanced_from(before)
    }

    /// Whether this download reads the directive's URL instead of chunks.
    pub fn over_http(&self) -> Option<&str> {
        self.directive.url.as_deref()
    }

    /// After bytes were accepted from `before` on: complete, or advanced
    /// (fsync and the test hook once past the middle).
    fn advanced_from(&mut self, before: u64) -> Result<Progress, DownloadError> {
        self.last_progress = Instant::now();
        if self.written == self.directive.bundle_size {
            return Ok(Progress::Complete);
        }
        let half = self.directive.bundle_size / 2;
        if self.written >= half && before < half {
            self.sync()?;
            crate::test_hooks::pause_at("download");
        }
        Ok(Progress::Advanced)
    }

    /// Verify, hash, append.
    fn accept(&mut self, bytes: &[u8]) -> Result<(), DownloadError> {
        self.verifier.feed(bytes)?;
        if let Some(header) = self.verifier.header() {
            let m = &header.value;
            if m.name != self.directive.model || m.version != self.directive.version {
                return Err(DownloadError::Mismatch(format!(
                    "the bundle holds {}, the directive names {}",
                    m.id(),
                    self.directive.id()
                )));
            }
        }
        self.hasher.update(bytes);
        self.file
            .write_all(bytes)
            .map_err(|source| DownloadError::Io { path: self.part_path.clone(), source })?;
        self.written += bytes.len() as u64;
        if self.written - self.synced >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), DownloadError> {
        self.file.sync_data().map_err(|source| DownloadError::Io { path: self.part_path.clone(), source })?;
        self.synced = self.written;
        Ok(())
    }

    /// All bytes are in: the model digest and the whole file's sha256 are
    /// checked, the part file is fsynced. Only then may it be installed.
    pub fn finish(mut self) -> Result<VerifiedHeader, DownloadError> {
        self.sync()?;
        let header = self.verifier.finish()?;
        let found = Digest(self.hasher.finalize().into());
        if found != self.directive.bundle_sha256 {
            return Err(DownloadError::Mismatch(format!(
                "the bundle file hashes to {found}, the signed directive says {}",
                self.directive.bundle_sha256
            )));
        }
        let _ = std::fs::remove_file(marker_path(&self.part_path));
        Ok(header)
    }

    /// Deletes the part file (after a refusal: those bytes are worthless).
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.part_path);
        let _ = std::fs::remove_file(marker_path(&self.part_path));
    }
}

fn marker_path(part: &Path) -> PathBuf {
    let mut name = part.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".for");
    part.with_file_name(name)
}
