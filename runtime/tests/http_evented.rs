#![cfg(target_os = "linux")]
//! tiny_http's event-driven server (vendor/tiny_http/src/evented.rs,
//! PATCHES.md item 4) over real sockets: raw `TcpStream` clients write
//! bytes and read what comes back, one or two server threads loop on
//! `recv_timeout` and answer. The handler echoes the method, the URL and the
//! body it read (`"POST /x\n" + body`); `/noread…` is answered without
//! touching the body; `/big` is answered with 8 MiB of a known pattern.
//!
//! Every client read has a timeout, so a server that hangs fails a test
//! instead of hanging it.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use tiny_http::{EventedLimits, Request, Response, Server, StatusCode};

/// How long a client waits for anything it is owed.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long "promptly" is: an answer that should not wait for anything, a
/// connection that should be closed right after its answer.
const PROMPT: Duration = Duration::from_secs(3);
/// Size of the `/big` answer.
const BIG: usize = 8 * 1024 * 1024;

// ------------------------------------------------------------------ server

/// An evented server with `threads` threads answering through [`handle`].
/// Dropping it stops the threads (within one `recv_timeout` period); they are
/// not joined, so a thread stuck in a bug cannot hang the test.
struct TestServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl TestServer {
    fn start(limits: EventedLimits, threads: usize) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let server = Arc::new(Server::from_listener_evented(listener, limits).expect("evented server"));
        let stop = Arc::new(AtomicBool::new(false));
        for _ in 0..threads {
            let (server, stop) = (server.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    match server.recv_timeout(Duration::from_millis(50)) {
                        Ok(Some(rq)) => handle(rq),
                        Ok(None) => {}
                        Err(_) => break,
                    }
                }
            });
        }
        TestServer { addr, stop }
    }

    fn client(&self) -> Client {
        Client::connect(self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn short_drain_limits() -> EventedLimits {
    EventedLimits { max_buffered_body: 2048, io_timeout: Duration::from_millis(300), ..Default::default() }
}

fn small_body_limits() -> EventedLimits {
    EventedLimits { max_buffered_body: 2048, ..Default::default() }
}

fn handle(mut rq: Request) {
    let url = rq.url().to_owned();
    let method = rq.method().to_string();
    if url.starts_with("/noread") {
        let _ = rq.respond(Response::from_string("ignored"));
        return;
    }
    if url.starts_with("/big") {
        let _ = rq.respond(Response::from_data(big_pattern()).with_chunked_threshold(usize::MAX));
        return;
    }
    let mut body = Vec::new();
    match rq.as_reader().read_to_end(&mut body) {
        Ok(_) => {
            let mut out = format!("{method} {url}\n").into_bytes();
            out.extend_from_slice(&body);
            let _ = rq.respond(Response::from_data(out).with_chunked_threshold(usize::MAX));
        }
        Err(e) => {
            let _ = rq.respond(Response::from_string(format!("read error: {e}")).with_status_code(StatusCode(400)));
        }
    }
}

fn big_pattern() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8).collect()
}

/// Printable bytes whose position can be recognised (a shift shows).
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 23) as u8).collect()
}

fn echo(method: &str, url: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {url}\n").into_bytes();
    out.extend_from_slice(body);
    out
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
}

fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!("POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    r.extend_from_slice(body);
    r
}

// ------------------------------------------------------------------ client

#[derive(Debug)]
struct Answer {
    version: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn assert_body(answer: &Answer, expected: &[u8], context: &str) {
    assert_eq!(answer.status, 200, "{context}: status (body {:?})", String::from_utf8_lossy(&answer.body));
    if answer.body != expected {
        let first_diff = answer.body.iter().zip(expected).position(|(a, b)| a != b);
        let show = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(80)]).into_owned();
        panic!(
            "{context}: body differs: {} bytes, expected {}; first difference at {:?}; got {:?}…, expected {:?}…",
            answer.body.len(),
            expected.len(),
            first_diff,
            show(&answer.body),
            show(expected)
        );
    }
}

fn eof() -> io::Error {
    io::Error::new(ErrorKind::UnexpectedEof, "the server closed the connection")
}

/// A raw HTTP/1.1 client keeping what it read beyond the current answer.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Pause before every read (a slow reader).
    slow: Option<Duration>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to the test server");
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client { stream, buf: Vec::new(), slow: None }
    }

    fn set_timeout(&self, timeout: Duration) {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
    }

    fn send(&mut self, data: &[u8]) {
        self.stream.write_all(data).expect("client write");
    }

    /// Writes, ignoring errors (the server may close first, on purpose).
    fn send_lossy(&mut self, data: &[u8]) {
        let _ = self.stream.write_all(data);
    }

    fn fill(&mut self) -> io::Result<usize> {
        if let Some(pause) = self.slow {
            thread::sleep(pause);
        }
        let mut tmp = [0u8; 16 * 1024];
        let n = self.stream.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(eof());
            }
        }
        let rest = self.buf.split_off(n);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.fill()? == 0 {
                return Err(eof());
            }
        }
    }

    fn try_head(&mut self) -> io::Result<(String, u16, Vec<(String, String)>)> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if self.fill()? == 0 {
                return Err(eof());
            }
        };
        let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("").to_owned();
        let status = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP status line: {status_line:?}"));
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap_or_else(|| panic!("bad answer header line {l:?}"));
                (n.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        Ok((version, status, headers))
    }

    fn try_answer(&mut self) -> io::Result<Answer> {
        let (version, status, headers) = self.try_head()?;
        let mut answer = Answer { version, status, headers, body: Vec::new() };
        if status < 200 || status == 204 || status == 304 {
            return Ok(answer);
        }
        let chunked = answer.header("Transfer-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            loop {
                let size_line = self.line()?;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
                if size == 0 {
                    while !self.line()?.is_empty() {}
                    break;
                }
                let data = self.take(size)?;
                answer.body.extend_from_slice(&data);
                assert_eq!(self.take(2)?, b"\r\n", "chunk not followed by CRLF");
            }
        } else if let Some(n) = answer.header("Content-Length") {
            let n: usize = n.parse().unwrap_or_else(|_| panic!("bad Content-Length {n:?}"));
            answer.body = self.take(n)?;
        } else {
            // Delimited by the end of the connection.
            while self.fill()? > 0 {}
            answer.body = std::mem::take(&mut self.buf);
        }
        Ok(answer)
    }

    fn answer(&mut self) -> Answer {
        self.try_answer().unwrap_or_else(|e| panic!("no complete answer: {e} (kind {:?})", e.kind()))
    }

    /// Sends `GET path` and expects the echo server's answer to it.
    fn expect_get(&mut self, path: &str, context: &str) {
        self.send(&get(path));
        assert_body(&self.answer(), &echo("GET", path, b""), context);
    }

    /// The next answer has `status`, and the connection is closed after it.
    fn expect_refused(&mut self, status: u16, context: &str) {
        assert_eq!(self.answer().status, status, "{context}");
        self.expect_closed(&format!("after {status} ({context})"));
    }

    /// The server must have closed the connection (FIN or RST) with
    /// nothing more to read, within [`PROMPT`].
    fn expect_closed(&mut self, context: &str) {
        assert!(
            self.buf.is_empty(),
            "{context}: unexpected bytes after the answer: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.set_timeout(PROMPT);
        let mut tmp = [0u8; 512];
        match self.stream.read(&mut tmp) {
            Ok(0) => {}
            Ok(n) => panic!(
                "{context}: the connection should be closed, but more bytes came: {:?}",
                String::from_utf8_lossy(&tmp[..n])
            ),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {}
            Err(e) => panic!("{context}: the connection is still open {PROMPT:?} after the answer ({e})"),
        }
    }
}

/// A new connection's request is answered within [`PROMPT`].
fn assert_served(addr: SocketAddr, path: &str, context: &str) {
    let mut c = Client::connect(addr);
    c.set_timeout(PROMPT);
    c.send(&get(path));
    let a = c.try_answer().unwrap_or_else(|e| panic!("{context}: a new connection was not answered within {PROMPT:?}: {e}"));
    assert_body(&a, &echo("GET", path, b""), context);
}

// ------------------------------------------------------------------ tests

/// 1. Several requests on one connection, each answered in order.
#[test]
fn keep_alive_answers_several_requests_on_one_connection_in_order() {
    let server = TestServer::start(EventedLimits::default(), 2);
    let mut c = server.client();
    for (i, size) in [0usize, 10, 0, 1500, 5000, 0, 70_000, 3].into_iter().enumerate() {
        let path = format!("/ka/{i}");
        if size == 0 {
            c.expect_get(&path, &path);
        } else {
            let body = pattern(size);
            c.send(&post(&path, &body));
            assert_body(&c.answer(), &echo("POST", &path, &body), &path);
        }
    }
}

/// 2. Complete requests written in one write() are answered in order.
#[test]
fn pipelined_requests_in_one_write_are_answered_in_order() {
    let server = TestServer::start(EventedLimits::default(), 2);
    let mut c = server.client();
    let second = pattern(3000);
    let mut bytes = get("/first");
    bytes.extend(post("/second", &second));
    bytes.extend(post("/third", b"hello"));
    bytes.extend(get("/fourth"));
    c.send(&bytes);
    assert_body(&c.answer(), &echo("GET", "/first", b""), "first pipelined");
    assert_body(&c.answer(), &echo("POST", "/second", &second), "second pipelined");
    assert_body(&c.answer(), &echo("POST", "/third", b"hello"), "third pipelined");
    assert_body(&c.answer(), &echo("GET", "/fourth", b""), "fourth pipelined");
    // The connection is still usable afterwards.
    c.expect_get("/after", "after the pipelined ones");
}

/// 3. A body trickling in does not hold the only recv thread.
#[test]
fn trickling_body_does_not_hold_the_only_recv_thread() {
    let server = TestServer::start(EventedLimits::default(), 1);
    let body = pattern(120); // 30 pieces of 4 bytes, one every 50 ms: 1.5 s
    let mut a = server.client();
    a.send(format!("POST /trickle HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut stream = a.stream.try_clone().unwrap();
        let (body, done) = (body.clone(), done.clone());
        thread::spawn(move || {
            for piece in body.chunks(4) {
                thread::sleep(Duration::from_millis(50));
                stream.write_all(piece).expect("trickle write");
            }
            done.store(true, Ordering::Release);
        })
    };
    thread::sleep(Duration::from_millis(150));
    let mut b = server.client();
    b.set_timeout(PROMPT);
    b.send(&get("/meanwhile"));
    let answer = b.try_answer().expect("the other connection was not answered while a body trickled in");
    assert!(
        !done.load(Ordering::Acquire),
        "the other connection was answered only after the trickled body was complete"
    );
    assert_body(&answer, &echo("GET", "/meanwhile", b""), "other connection");
    writer.join().unwrap();
    assert_body(&a.answer(), &echo("POST", "/trickle", &body), "trickled request");
    // Still usable.
    a.expect_get("/after-trickle", "after the trickled request");
}

/// 4. A body larger than `max_buffered_body` is streamed to the handler.
#[test]
fn body_larger_than_max_buffered_body_is_streamed_to_the_handler() {
    let server = TestServer::start(small_body_limits(), 1);
    let body = pattern(200_000);
    let mut c = server.client();
    // Sent in pieces with pauses, so the handler has to wait for the client.
    let writer = {
        let mut stream = c.stream.try_clone().unwrap();
        let request = post("/stream", &body);
        thread::spawn(move || {
            for piece in request.chunks(30_000) {
                stream.write_all(piece).expect("client write");
                thread::sleep(Duration::from_millis(30));
            }
        })
    };
    let answer = c.answer();
    writer.join().unwrap();
    assert_body(&answer, &echo("POST", "/stream", &body), "streamed body");
    // Read to its end, so the connection goes on.
    c.expect_get("/next", "after a streamed body");
    // Once more, in one write.
    c.send(&post("/stream2", &body));
    assert_body(&c.answer(), &echo("POST", "/stream2", &body), "streamed body in one write");
}

/// 5. A head longer than `max_head_bytes`: 431, then closed.
#[test]
fn head_longer_than_max_head_bytes_is_refused_431_and_closed() {
    let limits = EventedLimits { max_head_bytes: 1024, ..Default::default() };
    let server = TestServer::start(limits, 1);
    // Just under the limit: served.
    let mut c = server.client();
    let filler = "a".repeat(900);
    c.send(format!("GET /fits HTTP/1.1\r\nHost: test\r\nX-Filler: {filler}\r\n\r\n").as_bytes());
    assert_body(&c.answer(), &echo("GET", "/fits", b""), "head under the limit");
    // Over it (complete head).
    let mut c = server.client();
    let filler = "a".repeat(3000);
    c.send_lossy(format!("GET /long HTTP/1.1\r\nHost: test\r\nX-Filler: {filler}\r\n\r\n").as_bytes());
    let a = c.answer();
    assert_eq!(a.status, 431, "head longer than max_head_bytes");
    c.expect_closed("after 431");
    // Over it, head never ending.
    let mut c = server.client();
    c.send_lossy(format!("GET /endless HTTP/1.1\r\nX-Filler: {filler}").as_bytes());
    c.expect_refused(431, "unterminated head longer than max_head_bytes");
    assert_served(server.addr, "/after-431", "after 431s");
}

/// 6. An unparsable request line (or header line): 400, then closed.
#[test]
fn unparsable_request_is_refused_400_and_closed() {
    let server = TestServer::start(EventedLimits::default(), 1);
    let mut c = server.client();
    c.send(b"this is not http\r\n\r\n");
    c.expect_refused(400, "unparsable request line");

    let mut c = server.client();
    c.send(b"GET /x HTTP/1.1\r\nHost: test\r\nthis header has no colon\r\n\r\n");
    c.expect_refused(400, "unparsable header line");

    // A good request followed by garbage on one connection: the good one
    // is answered, then 400 and closed.
    let mut c = server.client();
    let mut bytes = get("/good");
    bytes.extend_from_slice(b"garbage garbage\r\n\r\n");
    c.send(&bytes);
    assert_body(&c.answer(), &echo("GET", "/good", b""), "request before the garbage");
    c.expect_refused(400, "garbage after a good request");
    assert_served(server.addr, "/after-400", "after 400s");
}

/// 7. `Expect: 100-continue`: "100 Continue" first, the answer after the body.
#[test]
fn expect_100_continue_gets_interim_answer_then_the_answer() {
    let server = TestServer::start(EventedLimits::default(), 1);
    let mut c = server.client();
    c.send(b"POST /continue HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n");
    let (version, status, _) = c.try_head().expect("no interim answer to Expect: 100-continue");
    assert_eq!((version.as_str(), status), ("HTTP/1.1", 100), "interim answer");
    assert!(c.buf.is_empty(), "bytes after the interim answer before the body was sent: {:?}", String::from_utf8_lossy(&c.buf));
    c.send(b"hello world");
    assert_body(&c.answer(), &echo("POST", "/continue", b"hello world"), "answer after 100 Continue");
    // The body was read to its end: the connection goes on.
    c.expect_get("/after-continue", "after 100 Continue");
}

/// 7 (bis). `Expect: 100-continue` answered with a final status without
/// reading the body: the client rightly never sends the body (RFC 9110
/// §10.1.1), and that must not take the server's only thread.
#[test]
fn expect_100_continue_answered_without_reading_does_not_hold_the_recv_thread() {
    let server = TestServer::start(EventedLimits::default(), 1);
    let mut a = server.client();
    a.send(b"POST /noread HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: 100000\r\n\r\n");
    let answer = a.answer();
    assert_eq!((answer.status, answer.body.as_slice()), (200, &b"ignored"[..]), "final answer without 100 Continue");
    // The client keeps its connection open and sends no body.
    assert_served(server.addr, "/meanwhile", "while a refused 100-continue body is never sent");
    drop(a);
}

/// 8. An unknown `Expect` value: 417.
#[test]
fn unknown_expect_value_is_refused_417() {
    let server = TestServer::start(EventedLimits::default(), 1);
    let mut c = server.client();
    c.send(b"POST /x HTTP/1.1\r\nHost: test\r\nExpect: something-else\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(c.answer().status, 417, "unknown Expect value");
    assert_served(server.addr, "/after-417", "after 417");
}

/// 9. `GET / HTTP/2.0`: 505.
#[test]
fn http_2_0_request_is_answered_505() {
    let server = TestServer::start(EventedLimits::default(), 1);
    let mut c = server.client();
    c.send(b"GET / HTTP/2.0\r\nHost: test\r\n\r\n");
    let a = c.answer();
    assert_eq!(a.status, 505, "HTTP/2.0 request line");
    assert_served(server.addr, "/after-505", "after 505");
}

/// 10. A chunked body is decoded for the handler; closed after the answer.
#[test]
fn chunked_body_is_decoded_and_the_connection_closed_after_the_answer() {
    let server = TestServer::start(EventedLimits::default(), 1);
    let mut c = server.client();
    c.send(b"POST /chunked HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
    thread::sleep(Duration::from_millis(50));
    c.send(b"6\r\n world\r\n");
    thread::sleep(Duration::from_millis(50));
    c.send(b"0\r\n\r\n");
    assert_body(&c.answer(), &echo("POST", "/chunked", b"hello world"), "chunked body");
    c.expect_closed("after a chunked request");

    // In one write, with a larger chunk.
    let big = pattern(10_000);
    let mut c = server.client();
    let mut bytes = b"POST /chunked2 HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    bytes.extend(format!("{:x}\r\n", big.len()).as_bytes());
    bytes.extend(&big);
    bytes.extend(b"\r\n3\r\nend\r\n0\r\n\r\n");
    c.send(&bytes);
    let mut expected = big.clone();
    expected.extend(b"end");
    assert_body(&c.answer(), &echo("POST", "/chunked2", &expected), "chunked body in one write");
    c.expect_closed("after a chunked request in one write");
    assert_served(server.addr, "/after-chunked", "after chunked requests");
}

/// 11. `Connection: close` and HTTP/1.0 without keep-alive close after the
/// answer; HTTP/1.0 with `Connection: keep-alive` stays open.
#[test]
fn connection_close_and_http_1_0_close_but_http_1_0_keep_alive_stays_open() {
    let server = TestServer::start(EventedLimits::default(), 1);

    let mut c = server.client();
    c.send(b"GET /close HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    assert_body(&c.answer(), &echo("GET", "/close", b""), "Connection: close");
    c.expect_closed("after Connection: close");

    let mut c = server.client();
    c.send(b"POST /ten HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc");
    let a = c.answer();
    assert_body(&a, &echo("POST", "/ten", b"abc"), "HTTP/1.0");
    assert_eq!(a.version, "HTTP/1.0", "answer version to an HTTP/1.0 request");
    c.expect_closed("after HTTP/1.0 without keep-alive");

    let mut c = server.client();
    c.send(b"GET /one HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_body(&c.answer(), &echo("GET", "/one", b""), "HTTP/1.0 keep-alive, first");
    c.send(b"POST /two HTTP/1.0\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nhi");
    assert_body(&c.answer(), &echo("POST", "/two", b"hi"), "HTTP/1.0 keep-alive, second");
    c.send(b"GET /three HTTP/1.0\r\n\r\n");
    assert_body(&c.answer(), &echo("GET", "/three", b""), "HTTP/1.0, last");
    c.expect_closed("after the HTTP/1.0 request without keep-alive");
}

/// 12. Clients leaving mid-head or mid-body do not break the server.
#[test]
fn clients_leaving_mid_head_or_mid_body_do_not_break_the_server() {
    let server = TestServer::start(small_body_limits(), 1);
    let pause = || thread::sleep(Duration::from_millis(100));
    {
        let mut c = server.client();
        c.send(b"POST /gone HTTP/1.1\r\nHost: test\r\nContent-Le");
        pause();
    }
    {
        // Mid buffered body.
        let mut c = server.client();
        c.send(b"POST /gone HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n0123456789");
        pause();
    }
    {
        // Mid streamed body (beyond max_buffered_body): the handler reads it.
        let mut c = server.client();
        let mut bytes = b"POST /gone HTTP/1.1\r\nHost: test\r\nContent-Length: 10000\r\n\r\n".to_vec();
        bytes.extend(pattern(100));
        c.send(&bytes);
        pause();
    }
    {
        // Mid streamed body, unread by the handler.
        let mut c = server.client();
        let mut bytes = b"POST /noread HTTP/1.1\r\nHost: test\r\nContent-Length: 10000\r\n\r\n".to_vec();
        bytes.extend(pattern(100));
        c.send(&bytes);
        pause();
    }
    {
        // Reset (not closed) mid-head.
        let mut c = server.client();
        c.send(b"GET /reset HTTP/1.1\r\nHost: te");
        pause();
        socket2::SockRef::from(&c.stream).set_linger(Some(Duration::ZERO)).unwrap();
    }
    {
        // Reset mid buffered body.
        let mut c = server.client();
        c.send(b"POST /reset HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n01234");
        pause();
        socket2::SockRef::from(&c.stream).set_linger(Some(Duration::ZERO)).unwrap();
    }
    pause();
    let mut c = server.client();
    c.set_timeout(PROMPT);
    c.send(&get("/after"));
    assert_body(&c.try_answer().expect("served after clients left"), &echo("GET", "/after", b""), "after clients left");
    c.send(&post("/after2", b"body"));
    assert_body(&c.answer(), &echo("POST", "/after2", b"body"), "after clients left, keep-alive");
}

/// 13. `max_connections`: a connection beyond is closed (nobody has waited
/// long enough to be evicted); once one closes, a new one is served.
#[test]
fn max_connections_closes_extra_connections_until_one_closes() {
    let limits = EventedLimits { max_connections: 2, evict_after: Duration::MAX, ..Default::default() };
    let server = TestServer::start(limits, 1);
    let mut c1 = server.client();
    c1.expect_get("/one", "first connection");
    let mut c2 = server.client();
    c2.expect_get("/two", "second connection");

    let mut c3 = server.client();
    c3.expect_closed("a third connection with max_connections = 2");

    drop(c1);
    thread::sleep(Duration::from_millis(200));
    let mut served = None;
    for _ in 0..20 {
        let mut c = server.client();
        c.set_timeout(PROMPT);
        c.send_lossy(&get("/four"));
        match c.try_answer() {
            Ok(a) => {
                served = Some(a);
                break;
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
    let a = served.expect("no new connection served after one of the two closed");
    assert_body(&a, &echo("GET", "/four", b""), "connection after one closed");
    c2.expect_get("/two-again", "second connection again");
}

/// 13b. Clients that connect and say nothing, or trickle a head a byte at a
/// time, cannot lock others out: at `max_connections` a new connection
/// closes the one that has waited longest for its next request.
#[test]
fn silent_and_trickling_clients_make_room_for_new_ones() {
    let limits = EventedLimits { max_connections: 4, evict_after: Duration::from_millis(300), ..Default::default() };
    let server = TestServer::start(limits, 1);
    let silent: Vec<Client> = (0..2).map(|_| server.client()).collect();
    let mut trickling: Vec<Client> = (0..2).map(|_| server.client()).collect();
    for round in 0..6 {
        for c in &mut trickling {
            c.send_lossy(&b"GET /slow HTTP/1.1\r\nX-Slow: "[round..round + 1]);
        }
        thread::sleep(Duration::from_millis(100));
    }
    // Four connections held well past `evict_after`: each new client (kept
    // open) gets in by taking one's place.
    let mut served = Vec::new();
    for i in 0..4 {
        let mut c = server.client();
        c.expect_get(&format!("/new-{i}"), "a new client at max_connections");
        served.push(c);
    }
    drop((silent, trickling, served));
}

/// 14. `unblock()` releases a thread blocked in `recv()` / `recv_timeout()`.
#[test]
fn unblock_releases_recv_and_recv_timeout_promptly() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = Arc::new(Server::from_listener_evented(listener, EventedLimits::default()).unwrap());

    // Nothing pending: try_recv and a short recv_timeout return Ok(None).
    let t = Instant::now();
    assert!(matches!(server.try_recv(), Ok(None)), "try_recv on an idle server");
    assert!(t.elapsed() < Duration::from_secs(1), "try_recv blocked {:?}", t.elapsed());
    let t = Instant::now();
    assert!(matches!(server.recv_timeout(Duration::from_millis(300)), Ok(None)), "recv_timeout on an idle server");
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(2), "recv_timeout(300 ms) took {waited:?}");

    let describe = |r: io::Result<Option<Request>>| match r {
        Ok(None) => "Ok(None)",
        Ok(Some(_)) => "Ok(Some(request))",
        Err(_) => "Err",
    };

    // recv()
    let (tx, rx) = mpsc::channel();
    {
        let server = server.clone();
        thread::spawn(move || {
            let r = server.recv().map(Some);
            let _ = tx.send(describe(r));
        });
    }
    thread::sleep(Duration::from_millis(200));
    assert!(rx.try_recv().is_err(), "recv() returned before unblock()");
    let t = Instant::now();
    server.unblock();
    let r = rx.recv_timeout(Duration::from_secs(2)).expect("recv() still blocked 2 s after unblock()");
    assert_eq!(r, "Err", "recv() after unblock()");
    assert!(t.elapsed() < Duration::from_secs(2));

    // recv_timeout(long), two threads, two unblocks.
    let (tx, rx) = mpsc::channel();
    for _ in 0..2 {
        let (server, tx) = (server.clone(), tx.clone());
        thread::spawn(move || {
            let r = server.recv_timeout(Duration::from_secs(60));
            let _ = tx.send(describe(r));
        });
    }
    thread::sleep(Duration::from_millis(200));
    assert!(rx.try_recv().is_err(), "recv_timeout(60 s) returned before unblock()");
    server.unblock();
    server.unblock();
    for i in 0..2 {
        let r = rx
            .recv_timeout(Duration::from_secs(2))
            .unwrap_or_else(|_| panic!("recv_timeout(60 s) #{i} still blocked 2 s after unblock()"));
        assert_eq!(r, "Ok(None)", "recv_timeout after unblock()");
    }
}

/// 15. A large answer to a slow reader arrives complete and intact.
#[test]
fn large_answer_to_a_slow_reader_is_delivered_intact() {
    let server = TestServer::start(EventedLimits::default(), 1);
    let mut c = server.client();
    c.send(&get("/big"));
    // Let the server fill every buffer before reading at all.
    thread::sleep(Duration::from_millis(500));
    c.slow = Some(Duration::from_millis(1));
    let t = Instant::now();
    let a = c.answer();
    c.slow = None;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("Content-Length"), Some(BIG.to_string().as_str()));
    assert_eq!(a.body.len(), BIG, "answer length");
    let expected = big_pattern();
    if a.body != expected {
        let i = a.body.iter().zip(&expected).position(|(x, y)| x != y);
        panic!("8 MiB answer corrupted, first difference at {i:?}");
    }
    assert!(t.elapsed() < Duration::from_secs(20));
    c.expect_get("/after-big", "after the large answer");
}

/// 16 (a). A buffered body the handler does not read: the connection goes on.
#[test]
fn unread_buffered_body_keeps_the_connection_usable() {
    let server = TestServer::start(EventedLimits::default(), 1);
    let mut c = server.client();
    for size in [500usize, 1500, 10_000, 64 * 1024] {
        let body = pattern(size);
        c.send(&post("/noread", &body));
        let a = c.answer();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"ignored"[..]), "unread body of {size} bytes");
        let path = format!("/next-after-{size}");
        c.expect_get(&path, &format!("request after an unread body of {size} bytes"));
    }
    // Pipelined behind an unread body.
    let mut bytes = post("/noread", &pattern(5000));
    bytes.extend(get("/pipelined-after-unread"));
    c.send(&bytes);
    assert_eq!(c.answer().body, b"ignored");
    assert_body(&c.answer(), &echo("GET", "/pipelined-after-unread", b""), "pipelined after an unread body");
}

/// 16 (b). A streamed body (beyond `max_buffered_body`) sent in full and
/// left unread: after the answer the connection is closed, or — if the
/// server discarded the body — still correct for a next request. Never a
/// next request read from inside the old body.
#[test]
fn unread_streamed_body_sent_in_full_leaves_the_connection_closed_or_correct() {
    let server = TestServer::start(small_body_limits(), 1);
    let mut c = server.client();
    let body = pattern(100_000);
    let writer = {
        let mut stream = c.stream.try_clone().unwrap();
        let request = post("/noread", &body);
        thread::spawn(move || {
            let _ = stream.write_all(&request);
        })
    };
    let a = c.answer();
    assert_eq!((a.status, a.body.as_slice()), (200, &b"ignored"[..]), "answer to an unread streamed body");
    writer.join().unwrap();
    c.set_timeout(PROMPT);
    c.send_lossy(&get("/after-unread-stream"));
    match c.try_answer() {
        Ok(a) => assert_body(&a, &echo("GET", "/after-unread-stream", b""), "request after an unread streamed body"),
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted),
            "after an unread streamed body: neither closed nor answered ({e})"
        ),
    }
    assert_served(server.addr, "/after", "after an unread streamed body");
}

/// 16 (c). A streamed body left unread while the client has not sent all of
/// it (it waits for the answer, as a client does that expects an early
/// refusal): after the answer the server waits for the rest (to keep the
/// connection usable) at most `io_timeout`, then its only thread is free.
#[test]
fn unread_streamed_body_not_yet_sent_holds_the_recv_thread_at_most_io_timeout() {
    let server = TestServer::start(short_drain_limits(), 1);
    let mut a = server.client();
    let mut bytes = b"POST /noread HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n".to_vec();
    bytes.extend(pattern(1000));
    a.send(&bytes);
    let answer = a.answer();
    assert_eq!((answer.status, answer.body.as_slice()), (200, &b"ignored"[..]), "answer to an unread streamed body");
    assert_served(server.addr, "/meanwhile", "while an unread streamed body is incomplete");
    drop(a);
}

/// 16 (d). Same, as documented (PATCHES.md item 4, evented.rs): "a
/// connection ... whose body was not read to its end, is closed after the
/// answer".
#[test]
fn unread_streamed_body_not_yet_sent_closes_the_connection_after_the_answer() {
    let server = TestServer::start(short_drain_limits(), 1);
    let mut a = server.client();
    let mut bytes = b"POST /noread HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n".to_vec();
    bytes.extend(pattern(1000));
    a.send(&bytes);
    let answer = a.answer();
    assert_eq!((answer.status, answer.body.as_slice()), (200, &b"ignored"[..]), "answer to an unread streamed body");
    a.expect_closed("after an unread, incomplete streamed body");
    assert_served(server.addr, "/after", "after an unread streamed body");
}

/// Many keep-alive clients at once on two threads, some pipelining: every
/// answer arrives, in order, on its own connection.
#[test]
fn concurrent_clients_on_two_threads_are_all_served() {
    let server = TestServer::start(EventedLimits::default(), 2);
    let addr = server.addr;
    let clients: Vec<_> = (0..6)
        .map(|i| {
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                for j in 0..30 {
                    let p1 = format!("/c{i}/r{j}");
                    if j % 3 == 0 {
                        let p2 = format!("/c{i}/r{j}/b");
                        let body = pattern(j * 37);
                        let mut bytes = get(&p1);
                        bytes.extend(post(&p2, &body));
                        c.send(&bytes);
                        assert_body(&c.answer(), &echo("GET", &p1, b""), &p1);
                        assert_body(&c.answer(), &echo("POST", &p2, &body), &p2);
                    } else {
                        c.expect_get(&p1, &p1);
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client failed (see its panic above)");
    }
}
