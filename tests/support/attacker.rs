//! An attacker's tools: a raw MQTT client with whatever credentials it
//! stole, and raw sockets for slow or oversized HTTP requests. Everything
//! here is bounded in time and bytes, and talks only to 127.0.0.1.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

/// What an MQTT session of the attacker saw.
#[derive(Debug, Default)]
pub struct Session {
    /// Whether the broker accepted the CONNECT (a CONNACK arrived).
    pub connected: bool,
    /// `(topic, payload)` of every message delivered to it.
    pub received: Vec<(String, Vec<u8>)>,
    /// Whether the broker closed the connection on it.
    pub dropped: bool,
}

/// One MQTT session: connect with these credentials, subscribe to
/// `subscribe`, publish `publish` (topic, payload, retained), and collect
/// what arrives for `listen`. Never reconnects: a broker that drops the
/// offender ends the session.
pub fn mqtt_session(
    port: u16,
    client_id: &str,
    user: &str,
    password: &str,
    subscribe: &[&str],
    publish: &[(String, Vec<u8>, bool)],
    listen: Duration,
) -> Session {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_credentials(user, password);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut conn) = Client::new(o, 64);
    let (tx, rx) = channel();
    let t = std::thread::spawn(move || {
        for event in conn.iter() {
            let stop = event.is_err();
            if tx.send(event).is_err() || stop {
                break;
            }
        }
    });
    let mut s = Session::default();
    let deadline = Instant::now() + Duration::from_secs(5);
    // Wait for the CONNACK (or the refusal).
    while !s.connected && !s.dropped {
        match next(&rx, deadline) {
            Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => s.connected = true,
            Some(Ok(_)) => {}
            Some(Err(_)) | None => s.dropped = true,
        }
    }
    if s.connected {
        for f in subscribe {
            let _ = client.try_subscribe(*f, QoS::AtLeastOnce);
        }
        for (topic, payload, retain) in publish {
            let _ = client.try_publish(topic.as_str(), QoS::AtLeastOnce, *retain, payload.clone());
        }
        let until = Instant::now() + listen;
        while !s.dropped {
            match next(&rx, until) {
                Some(Ok(Event::Incoming(Packet::Publish(p)))) => s.received.push((p.topic.clone(), p.payload.to_vec())),
                Some(Ok(_)) => {}
                Some(Err(_)) => s.dropped = true,
                None => break,
            }
        }
    }
    let _ = client.try_disconnect();
    drop(client);
    let _ = t.join();
    s
}

fn next<T>(rx: &Receiver<T>, deadline: Instant) -> Option<T> {
    let left = deadline.saturating_duration_since(Instant::now());
    match rx.recv_timeout(left) {
        Ok(v) => Some(v),
        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
    }
}

/// Opens `n` connections that announce a `Content-Length` of 100 MB on a
/// POST and then send nothing; they stay open until dropped.
pub fn stalled_bodies(port: u16, path: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
            );
            s.write_all(head.as_bytes()).ok()?;
            Some(s)
        })
        .collect()
}

/// Opens `n` connections that send a request head one byte at a time, a
/// byte every 500 ms, from a thread each; the threads end after `for_how_long`.
pub fn slow_heads(port: u16, n: usize, for_how_long: Duration) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return };
                let head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
                let end = Instant::now() + for_how_long;
                for b in head.iter().cycle() {
                    if Instant::now() > end || s.write_all(&[*b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        })
        .collect()
}

/// Sends one header line of up to `max_bytes` bytes; returns how many the
/// server took before it closed the connection (or all of them, if it never
/// did within the write timeout).
pub fn huge_header(port: u16, max_bytes: usize) -> usize {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return 0 };
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /health HTTP/1.1\r\nX-Huge: ").is_err() {
        return 0;
    }
    let block = vec![b'a'; 64 << 10];
    let mut sent = 0;
    while sent < max_bytes {
        match s.write(&block) {
            Ok(0) | Err(_) => break,
            Ok(n) => sent += n,
        }
    }
    // Whatever the server answered (a 431 or nothing) before closing.
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 1024];
    let _ = s.read(&mut sink);
    sent
}

/// A `/predict` body whose nesting claims `width^depth × innermost`
/// elements: at each of `depth` levels an array of `width` items, the first
/// of which is the next level (the others short), down to an innermost
/// array of `innermost` zeros; padded with spaces to `bytes`. A decoder that
/// sizes its buffer from the first elements' lengths before checking them
/// against the model's input asks for that many floats.
pub fn nested_predict_body(width: usize, depth: usize, innermost: usize, bytes: usize) -> String {
    let mut inner = format!("[{}]", vec!["0"; innermost].join(","));
    for _ in 0..depth {
        let siblings = vec!["[0]"; width.saturating_sub(1)].join(",");
        inner = format!("[{inner},{siblings}]");
    }
    let mut body = format!("{{\"inputs\":{{\"features\":{inner}}}}}");
    if body.len() < bytes {
        body.push_str(&" ".repeat(bytes - body.len()));
    }
    body
}

/// A raw HTTP POST with a body; returns the status (0 when nothing answered).
pub fn post_raw(port: u16, path: &str, content_type: &str, body: &[u8]) -> u16 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return 0 };
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(20)));
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).is_err() {
        return 0;
    }
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// How long `GET /health` takes to answer 200, `None` when it did not
/// within `timeout`.
pub fn health_within(port: u16, timeout: Duration) -> Option<Duration> {
    let t = Instant::now();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(super::http::get(port, "/health").map(|a| a.status));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(200)) => Some(t.elapsed()),
        _ => None,
    }
}
