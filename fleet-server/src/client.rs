//! A small blocking HTTP/1.1 client for the operator CLI.
//!
//! The CLI talks only to its own server's JSON API, over plain HTTP (see
//! [`crate::api`] on TLS), so a hundred lines over `TcpStream` do the job
//! without an HTTP client dependency. Uploads stream from the file with a
//! progress callback, never holding the file in memory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--server {0:?} must look like http://HOST:PORT")]
    BadServer(String),
    #[error("cannot reach the fleet server at {server}: {source}")]
    Connect { server: String, source: std::io::Error },
    #[error("talking to the fleet server: {0}")]
    Io(#[from] std::io::Error),
    #[error("{path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("{message}")]
    Api { status: u16, code: String, message: String },
    #[error("unexpected answer from the fleet server: {0}")]
    Protocol(String),
}

pub struct ApiClient {
    host: String,
    port: u16,
    token: String,
    actor: String,
    read_timeout: Duration,
}

/// How long a connection attempt may take: a server that does not answer
/// a SYN is down, whatever the kernel's own retry schedule says.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl ApiClient {
    pub fn new(server: &str, token: &str) -> Result<ApiClient, ClientError> {
        let rest = server.strip_prefix("http://").ok_or_else(|| ClientError::BadServer(server.into()))?;
        let hostport = rest.split('/').next().unwrap_or_default();
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| ClientError::BadServer(server.into()))?),
            None => (hostport, 80),
        };
        if host.is_empty() {
            return Err(ClientError::BadServer(server.into()));
        }
        let user = std::env::var("USER").unwrap_or_else(|_| "operator".into());
        let hostname = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let actor = if hostname.is_empty() { user } else { format!("{user}@{hostname}") };
        // Publishing runs the whole gate before answering: allow minutes.
        let read_timeout = Duration::from_secs(600);
        Ok(ApiClient { host: host.trim_matches(['[', ']']).into(), port, token: token.into(), actor, read_timeout })
    }

    /// The longest wait for any read of an answer (default 10 minutes, for
    /// publish); pollers that ask every few seconds use less.
    pub fn with_read_timeout(mut self, timeout: Duration) -> ApiClient {
        self.read_timeout = timeout;
        self
    }

    fn connect(&self) -> Result<TcpStream, ClientError> {
        use std::net::ToSocketAddrs;
        let server = format!("http://{}:{}", self.host, self.port);
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|source| ClientError::Connect { server: server.clone(), source })?;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{} has no address", self.host));
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    s.set_read_timeout(Some(self.read_timeout))?;
                    s.set_write_timeout(Some(self.read_timeout))?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(ClientError::Connect { server, source: last })
    }

    fn head(&self, method: &str, path: &str, content_type: &str, len: u64) -> String {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {}:{}\r\nAuthorization: Bearer {}\r\nX-Outpost-Actor: {}\r\n\
             Content-Type: {content_type}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
            self.host, self.port, self.token, self.actor
        )
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        let mut s = self.connect()?;
        s.write_all(self.head("GET", path, "application/json", 0).as_bytes())?;
        read_response(s)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut s = self.connect()?;
        s.write_all(self.head("POST", path, "application/json", bytes.len() as u64).as_bytes())?;
        s.write_all(&bytes)?;
        read_response(s)
    }

    /// Streams a file to `POST /v1/uploads`, calling `progress(bytes_sent)`.
    pub fn upload(&self, file: &Path, mut progress: impl FnMut(u64)) -> Result<Value, ClientError> {
        let ferr = |source| ClientError::File { path: file.display().to_string(), source };
        let mut f = std::fs::File::open(file).map_err(ferr)?;
        let len = f.metadata().map_err(ferr)?.len();
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let encoded: String = name
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b".-_".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let mut s = self.connect()?;
        s.write_all(self.head("POST", &format!("/v1/uploads?filename={encoded}"), "application/octet-stream", len).as_bytes())?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(ferr)?;
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n])?;
            progress(n as u64);
        }
        read_response(s)
    }
}

/// The largest JSON answer the CLI reads (a device list of a big fleet
/// fits many times over).
const MAX_ANSWER_BYTES: u64 = 256 << 20;

fn read_response(stream: TcpStream) -> Result<Value, ClientError> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("status line {:?}", line.trim())))?;
    let mut length = None;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<u64>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| ClientError::Protocol("bad chunk size".into()))?;
            if size == 0 {
                break;
            }
            // Read what arrives, not what the size line claims: a lying
            // server cannot make the CLI allocate gigabytes up front.
            let got = (&mut r).take(size as u64).read_to_end(&mut body)?;
            if got < size {
                return Err(ClientError::Protocol("the answer ended inside a chunk".into()));
            }
            if body.len() as u64 > MAX_ANSWER_BYTES {
                return Err(ClientError::Protocol(format!("answer larger than {MAX_ANSWER_BYTES} bytes")));
            }
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        r.take(n.min(MAX_ANSWER_BYTES)).read_to_end(&mut body)?;
    } else {
        r.take(MAX_ANSWER_BYTES).read_to_end(&mut body)?;
    }
    let value: Value = serde_json::from_slice(&body)
        .map_err(|_| ClientError::Protocol(format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim())))?;
    if status >= 400 {
        let code = value["error"]["code"].as_str().unwrap_or("error").to_string();
        let message = value["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
        return Err(ClientError::Api { status, code, message });
    }
    Ok(value)
}
