//! The `.outpost` file: one signed manifest, its certificates, and the model,
//! laid out so it can be verified while it streams in.
//!
//! # Layout
//!
//! All integers little-endian, fixed width (no varints in the framing, so a
//! reader knows how many bytes to wait for):
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic [`MAGIC`] = `"OUTPOST\0"` |
//! | 4 | container format, u32 = [`CONTAINER_FORMAT`] |
//! | 4 | `m`: length of the signed manifest, u32 ≤ [`Limits::manifest_bytes`] |
//! | m | postcard [`Signed<Manifest>`] |
//! | 4 | `c`: length of the certificate list, u32 ≤ [`Limits::certificate_section_bytes`] |
//! | c | postcard `Vec<Signed<Certificate>>` (the certificate chain: root → online key) |
//! | 8 | `n`: model length, u64 — must equal the manifest's `model_size` |
//! | n | the model file, byte for byte |
//!
//! and then the file ends. The manifest and certificates come first so a
//! device checks every signature (steps 1–7) before it has downloaded any of
//! the model, and hashes the model (step 8) as it arrives.

use std::io::{Read, Write};
use std::ops::Range;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::certificate::Certificate;
use super::manifest::{Digest, Manifest};
use super::signed::{decode_exact, Signed};
use super::verify::{verify_with_certificates, TrustRoot, VerifiedHeader, VerifyError, VerifyOptions};
use super::Limits;

/// The first 8 bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"OUTPOST\0";
/// The container format this build writes and reads.
pub const CONTAINER_FORMAT: u32 = 1;

/// Writes a bundle, first checking that the model is the one the manifest
/// describes (size and sha256) — a bundle every device would refuse is a
/// bug better caught here. The manifest is decoded for that check only.
pub fn write_bundle<W: Write>(
    out: W,
    manifest: &Signed<Manifest>,
    certificates: &[Signed<Certificate>],
    model: &[u8],
) -> std::io::Result<()> {
    let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
    let m = manifest.decode_unverified(&Limits::default()).map_err(|e| invalid(e.to_string()))?;
    if m.model_size != model.len() as u64 {
        return Err(invalid(format!("manifest says {} model bytes, got {}", m.model_size, model.len())));
    }
    if m.model_sha256 != Digest::of(model) {
        return Err(invalid("the model's sha256 differs from the manifest's".into()));
    }
    write_container(out, manifest, certificates, model)
}

/// Writes the container framing around the given parts **without** any
/// consistency check (for tests that need a broken bundle, and for tools).
pub fn write_container<W: Write>(
    mut out: W,
    manifest: &Signed<Manifest>,
    certificates: &[Signed<Certificate>],
    model: &[u8],
) -> std::io::Result<()> {
    let too_big = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what} over 4 GiB"));
    let manifest_bytes = manifest.to_bytes();
    let cert_bytes = postcard::to_stdvec(&certificates.to_vec())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    out.write_all(&MAGIC)?;
    out.write_all(&CONTAINER_FORMAT.to_le_bytes())?;
    out.write_all(&u32::try_from(manifest_bytes.len()).map_err(|_| too_big("manifest"))?.to_le_bytes())?;
    out.write_all(&manifest_bytes)?;
    out.write_all(&u32::try_from(cert_bytes.len()).map_err(|_| too_big("certificates"))?.to_le_bytes())?;
    out.write_all(&cert_bytes)?;
    out.write_all(&(model.len() as u64).to_le_bytes())?;
    out.write_all(model)?;
    out.flush()
}

/// Where the parser is in the layout above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Preamble,
    ManifestLen,
    Manifest(usize),
    CertificatesLen,
    Certificates(usize),
    ModelLen,
    Model,
    Done,
    Failed,
}

impl State {
    fn section(self) -> &'static str {
        match self {
            State::Preamble => "magic and format number",
            State::ManifestLen => "manifest length",
            State::Manifest(_) => "signed manifest",
            State::CertificatesLen => "certificate list length",
            State::Certificates(_) => "certificate list",
            State::ModelLen => "model length",
            State::Model => "model",
            State::Done | State::Failed => "end",
        }
    }
}

/// What the parser found, handed to the caller as it goes.
pub(crate) enum Event {
    /// Manifest and certificates are complete (nothing checked yet).
    Sections { manifest: Signed<Manifest>, certificates: Vec<Signed<Certificate>> },
    /// The model length from the container, and the offset where the model
    /// bytes start.
    ModelLen { len: u64, starts_at: u64 },
    /// The model is complete; its sha256.
    End(Digest),
}

/// The container framing as a push parser: bytes in, [`Event`]s out, model
/// bytes located within each chunk. Checks only the framing and the limits.
pub(crate) struct Parser {
    limits: Limits,
    state: State,
    /// The field being assembled (preamble, a length, a section).
    buf: Vec<u8>,
    manifest: Option<Signed<Manifest>>,
    hasher: Sha256,
    model_remaining: u64,
    /// Bytes consumed so far, for error messages.
    offset: u64,
}

impl Parser {
    pub(crate) fn new(limits: Limits) -> Parser {
        Parser {
            limits,
            state: State::Preamble,
            buf: Vec::new(),
            manifest: None,
            hasher: Sha256::new(),
            model_remaining: 0,
            offset: 0,
        }
    }

    /// Consumes `chunk`; returns where in it the model bytes are (possibly
    /// empty). After an error the parser stays failed.
    pub(crate) fn feed(
        &mut self,
        chunk: &[u8],
        on_event: &mut dyn FnMut(Event) -> Result<(), VerifyError>,
    ) -> Result<Range<usize>, VerifyError> {
        match self.feed_inner(chunk, on_event) {
            Ok(range) => Ok(range),
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    fn feed_inner(
        &mut self,
        chunk: &[u8],
        on_event: &mut dyn FnMut(Event) -> Result<(), VerifyError>,
    ) -> Result<Range<usize>, VerifyError> {
        let mut model_range = 0..0;
        let mut pos = 0;
        while pos < chunk.len() {
            let rest = &chunk[pos..];
            let want = match self.state {
                State::Failed => return Err(VerifyError::AlreadyFailed),
                State::Done => return Err(VerifyError::TrailingData { offset: self.offset }),
                State::Model => {
                    // usize -> u64 never loses; the min fits back in usize.
                    let n = (rest.len() as u64).min(self.model_remaining) as usize;
                    self.hasher.update(&rest[..n]);
                    model_range = pos..pos + n;
                    self.advance(n, &mut pos);
                    self.model_remaining -= n as u64;
                    if self.model_remaining == 0 {
                        self.end_model(on_event)?;
                    }
                    continue;
                }
                State::Preamble => 12,
                State::ManifestLen | State::CertificatesLen => 4,
                State::ModelLen => 8,
                State::Manifest(n) | State::Certificates(n) => n,
            };
            let n = (want - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..n]);
            self.advance(n, &mut pos);
            if self.buf.len() == want {
                let field = std::mem::take(&mut self.buf);
                self.complete_field(&field, on_event)?;
            }
        }
        Ok(model_range)
    }

    fn advance(&mut self, n: usize, pos: &mut usize) {
        *pos += n;
        self.offset += n as u64;
    }

    /// One fixed-size field or section is complete: check it, move on.
    fn complete_field(
        &mut self,
        field: &[u8],
        on_event: &mut dyn FnMut(Event) -> Result<(), VerifyError>,
    ) -> Result<(), VerifyError> {
        self.state = match self.state {
            State::Preamble => {
                if field[..8] != MAGIC {
                    return Err(VerifyError::NotABundle);
                }
                let format = u32::from_le_bytes([field[8], field[9], field[10], field[11]]);
                if format != CONTAINER_FORMAT {
                    return Err(VerifyError::UnknownContainerFormat { found: format, supported: CONTAINER_FORMAT });
                }
                State::ManifestLen
            }
            State::ManifestLen => {
                let len = le_u32(field);
                let limit = self.limits.manifest_bytes as u64;
                if len as u64 > limit {
                    return Err(VerifyError::LimitExceeded { what: "signed manifest", limit, found: len as u64 });
                }
                self.sized_section(len as usize, State::Manifest(len as usize))
            }
            State::Manifest(_) => {
                self.manifest = Some(decode_exact(field, "signed manifest")?);
                State::CertificatesLen
            }
            State::CertificatesLen => {
                let len = le_u32(field);
                let limit = self.limits.certificate_section_bytes();
                if len as u64 > limit {
                    return Err(VerifyError::LimitExceeded { what: "certificate list", limit, found: len as u64 });
                }
                self.sized_section(len as usize, State::Certificates(len as usize))
            }
            State::Certificates(_) => {
                let certificates: Vec<Signed<Certificate>> = decode_exact(field, "certificate list")?;
                let manifest = self
                    .manifest
                    .take()
                    .ok_or(VerifyError::Malformed { what: "bundle", reason: "no manifest".into() })?;
                on_event(Event::Sections { manifest, certificates })?;
                State::ModelLen
            }
            State::ModelLen => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&field[..8]);
                let len = u64::from_le_bytes(b);
                if len > self.limits.model_bytes {
                    return Err(VerifyError::LimitExceeded { what: "model", limit: self.limits.model_bytes, found: len });
                }
                on_event(Event::ModelLen { len, starts_at: self.offset })?;
                self.model_remaining = len;
                if len == 0 {
                    self.end_model(on_event)?;
                    State::Done
                } else {
                    State::Model
                }
            }
            s @ (State::Model | State::Done | State::Failed) => s,
        };
        Ok(())
    }

    fn sized_section(&mut self, len: usize, section: State) -> State {
        // Grow the buffer as bytes arrive rather than reserving `len` up
        // front: the limit bounds it, but a peer that claims 8 MiB and sends
        // 12 bytes should not cost 8 MiB.
        self.buf = Vec::with_capacity(len.min(64 * 1024));
        section
    }

    fn end_model(&mut self, on_event: &mut dyn FnMut(Event) -> Result<(), VerifyError>) -> Result<(), VerifyError> {
        let digest = Digest(std::mem::take(&mut self.hasher).finalize().into());
        self.state = State::Done;
        on_event(Event::End(digest))
    }

    /// Whether the whole container was read; `Truncated` names where not.
    pub(crate) fn finish(&self) -> Result<(), VerifyError> {
        match self.state {
            State::Done => Ok(()),
            State::Failed => Err(VerifyError::AlreadyFailed),
            s => Err(VerifyError::Truncated { section: s.section(), offset: self.offset }),
        }
    }
}

fn le_u32(field: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&field[..4]);
    u32::from_le_bytes(b)
}

/// Verifies a bundle fed chunk by chunk (e.g. as MQTT chunks arrive).
///
/// ```no_run
/// # use outpost_runtime::bundle::*;
/// # fn demo(chunks: Vec<Vec<u8>>, trust: TrustRoot, last: u64, scratch: &mut std::fs::File) -> Result<(), Box<dyn std::error::Error>> {
/// use std::io::Write;
/// let mut v = StreamVerifier::new(trust, VerifyOptions::new(Freshness::Above(last)));
/// for chunk in chunks {
///     let model_part = v.feed(&chunk)?;   // refuses early: bad signature, replay, size...
///     scratch.write_all(model_part)?;     // not trusted yet
/// }
/// let header = v.finish()?;               // digest checked: now rename scratch into place
/// println!("accepted {}", header.value.id());
/// # Ok(()) }
/// ```
pub struct StreamVerifier {
    trust: TrustRoot,
    options: VerifyOptions,
    parser: Parser,
    header: Option<VerifiedHeader>,
    /// Offset at which the model bytes start, once the length field is read.
    model_start: Option<u64>,
    complete: bool,
}

impl StreamVerifier {
    pub fn new(trust: TrustRoot, options: VerifyOptions) -> StreamVerifier {
        StreamVerifier {
            parser: Parser::new(options.limits),
            trust,
            options,
            header: None,
            model_start: None,
            complete: false,
        }
    }

    /// Consumes the next chunk. Returns the model bytes it contained (empty
    /// while the header is still arriving) — **untrusted until
    /// [`finish`](Self::finish) returns `Ok`**. Once a call failed, the
    /// bundle is refused for good and later calls fail too.
    pub fn feed<'c>(&mut self, chunk: &'c [u8]) -> Result<&'c [u8], VerifyError> {
        let StreamVerifier { trust, options, parser, header, model_start, complete } = self;
        let range = parser.feed(chunk, &mut |event| match event {
            Event::Sections { manifest, certificates } => {
                // Steps 3-6 as soon as the header is in.
                *header = Some(verify_with_certificates(&manifest, &certificates, trust, options)?);
                Ok(())
            }
            Event::ModelLen { len, starts_at } => {
                *model_start = Some(starts_at);
                let expected = header.as_ref().map(|h| h.value.model_size).unwrap_or(u64::MAX);
                // Step 7.
                if len != expected {
                    return Err(VerifyError::SizeMismatch { expected, found: len });
                }
                Ok(())
            }
            Event::End(found) => {
                // Step 8.
                let expected = header.as_ref().map(|h| h.value.model_sha256);
                match expected {
                    Some(expected) if expected == found => {
                        *complete = true;
                        Ok(())
                    }
                    Some(expected) => Err(VerifyError::DigestMismatch { expected, found }),
                    None => Err(VerifyError::AlreadyFailed),
                }
            }
        })?;
        Ok(&chunk[range])
    }

    /// The verified manifest, once steps 1–6 passed (before the model has
    /// arrived): enough to decide whether to keep downloading.
    pub fn header(&self) -> Option<&VerifiedHeader> {
        self.header.as_ref()
    }

    /// Total bundle length, once the header is verified: for progress.
    pub fn expected_len(&self) -> Option<u64> {
        let header = self.header.as_ref()?;
        // The model length field (8 bytes) follows the certificates; until
        // it has arrived the model starts 8 bytes past where it will be read.
        let start = match self.model_start {
            Some(start) => start,
            None => self.parser.offset + 8 - self.parser.buf.len() as u64,
        };
        Some(start + header.value.model_size)
    }

    /// Bytes consumed so far.
    pub fn bytes_seen(&self) -> u64 {
        self.parser.offset
    }

    /// Ends the stream: `Ok` only if every step passed and the data ended
    /// exactly at the end of the model.
    pub fn finish(self) -> Result<VerifiedHeader, VerifyError> {
        self.parser.finish()?;
        match (self.complete, self.header) {
            (true, Some(header)) => Ok(header),
            _ => Err(VerifyError::AlreadyFailed),
        }
    }
}

/// What a bundle file claims, read without checking any signature: for
/// `outpost-runtime inspect`. Never act on it.
#[derive(Debug)]
pub struct UnverifiedBundle {
    pub manifest: Signed<Manifest>,
    pub certificates: Vec<Signed<Certificate>>,
    /// Length of the model section.
    pub model_len: u64,
    /// sha256 of the model section as read.
    pub model_sha256: Digest,
}

/// Parses a bundle's framing (with the limits) and hashes the model without
/// keeping it. No signature is checked.
pub fn read_bundle_unverified<R: Read>(mut reader: R, limits: &Limits) -> Result<UnverifiedBundle, VerifyError> {
    let mut parser = Parser::new(*limits);
    let mut sections = None;
    let mut model_len = 0;
    let mut digest = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(VerifyError::Read(e)),
        };
        parser.feed(&buf[..n], &mut |event| {
            match event {
                Event::Sections { manifest, certificates } => sections = Some((manifest, certificates)),
                Event::ModelLen { len, .. } => model_len = len,
                Event::End(d) => digest = Some(d),
            }
            Ok(())
        })?;
    }
    parser.finish()?;
    match (sections, digest) {
        (Some((manifest, certificates)), Some(model_sha256)) => {
            Ok(UnverifiedBundle { manifest, certificates, model_len, model_sha256 })
        }
        _ => Err(VerifyError::AlreadyFailed),
    }
}

/// Reads a whole file, refusing one over `limit` bytes without reading past it.
pub(crate) fn read_file_limited(path: &Path, limit: u64) -> Result<Vec<u8>, VerifyError> {
    let io = |error| VerifyError::Io { path: path.into(), error };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(VerifyError::LimitExceeded { what: "file", limit, found: bytes.len() as u64 });
    }
    Ok(bytes)
}
