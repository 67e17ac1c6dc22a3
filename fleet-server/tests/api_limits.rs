//! The fleet API under hostile clients: slow ones, huge heads, oversized
//! bodies. The process also hosts the broker, so it must neither starve nor
//! grow.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(20))).expect("timeout");
    s
}

/// How long `GET /health` takes, and its status.
fn health(port: u16) -> (Duration, u16) {
    let t = Instant::now();
    let (status, _) = http_get(port, "/health").expect("health");
    (t.elapsed(), status)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
        .expect("VmRSS")
}

/// The status of the answer on `s`, if any arrives before the server closes.
fn status_of(s: &mut TcpStream) -> Option<u16> {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).split_whitespace().nth(1).and_then(|c| c.parse().ok())
}

#[test]
fn slow_clients_do_not_starve_health() {
    let fleet = Fleet::start();
    let port = fleet.api_port;
    let mut held = Vec::new();
    // Bodies announced and never sent: without a token (answered 401 at
    // once), and with one (an upload waits for its body, at most half the
    // workers at a time; more are answered 503).
    for i in 0..24 {
        let mut s = connect(port);
        let auth = if i % 2 == 0 { format!("Authorization: Bearer {TOKEN}\r\n") } else { String::new() };
        write!(s, "POST /v1/uploads?filename=m.onnx HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100000000\r\n\r\n").expect("head");
        held.push(s);
    }
    for _ in 0..8 {
        let mut s = connect(port);
        write!(s, "POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n").expect("head");
        held.push(s);
    }
    // Heads sent one byte a second.
    let trickle: Vec<_> = (0..8)
        .map(|_| {
            let mut s = connect(port);
            std::thread::spawn(move || {
                for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaa".iter() {
                    if s.write_all(&[*b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    for _ in 0..20 {
        let (took, status) = health(port);
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(1), "/health took {took:?} with slow clients around");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("/health x20 with 32 held and 8 trickling connections: {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(10));
    // Operator requests too (a worker is free for them).
    let t = Instant::now();
    fleet.api().get("/v1/devices").expect("devices");
    assert!(t.elapsed() < Duration::from_secs(1));
    drop(held);
    drop(trickle);
}

#[test]
fn a_huge_head_is_refused_without_growing_the_process() {
    let fleet = Fleet::start();
    let port = fleet.api_port;
    let before = rss_kib(fleet.pid());
    let mut s = connect(port);
    s.set_write_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ").expect("head");
    // Up to 200 MiB of one header line, until the server stops taking it.
    let chunk = vec![b'a'; 64 << 10];
    let mut sent = 0usize;
    while sent < 200 << 20 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(sent < 32 << 20, "the server kept reading a header line: {sent} bytes taken");
    let after = rss_kib(fleet.pid());
    eprintln!("200 MiB header line: {sent} bytes taken before the server stopped reading; RSS {before} -> {after} KiB");
    assert!(after < before + 32 * 1024, "RSS grew from {before} KiB to {after} KiB");
    // A head just over the limit gets its answer: 431.
    let mut s = connect(port);
    let _ = write!(s, "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(20 << 10));
    assert_eq!(status_of(&mut s), Some(431));
    assert_eq!(health(port).1, 200);
}

#[test]
fn bodies_over_the_limits_are_refused_with_413() {
    let fleet = Fleet::start();
    let port = fleet.api_port;
    // An upload over MAX_UPLOAD_BYTES, refused from its Content-Length.
    let mut s = connect(port);
    let len = outpost_fleet::api::MAX_UPLOAD_BYTES + 1;
    write!(s, "POST /v1/uploads?filename=m.onnx HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {len}\r\n\r\n")
        .expect("head");
    assert_eq!(status_of(&mut s), Some(413));
    // JSON over MAX_JSON_BYTES.
    let mut s = connect(port);
    let len = outpost_fleet::api::MAX_JSON_BYTES + 1;
    write!(s, "POST /v1/deploy HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {len}\r\n\r\n")
        .expect("head");
    assert_eq!(status_of(&mut s), Some(413));
    // Uploads below the limit still stream through (several MiB, more than
    // the server buffers before handing a request over).
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("big.csv");
    std::fs::write(&file, vec![b'1'; 6 << 20]).expect("write");
    let r = fleet.api().upload(&file, |_| {}).expect("upload");
    assert_eq!(r["size"], 6 << 20);
    assert_eq!(health(port).1, 200);
}
