//! OUTPOST PATCH (4): connections served without a thread each (Linux).
//!
//! Upstream tiny_http gives every connection a thread that blocks reading
//! the connection's next request and hands each request to whichever thread
//! calls [`Server::recv`](crate::Server::recv). Every request then costs a
//! context switch on the connection's thread (asleep in `recv(2)` until the
//! client sends) plus a hand-off to the answering thread, and on a small
//! device serving a small model that is most of what a request costs.
//!
//! Here nobody reads on the caller's behalf: the threads that call `recv`
//! do the reading themselves. Every connection sits in one epoll set with
//! `EPOLLONESHOT`; `recv` waits on that set for *one* ready connection
//! (the kernel wakes one waiter per event), reads that connection's request
//! head — and its body, when small — and returns the request. Because the
//! registration is one-shot, no other thread hears of the connection while
//! its request is in flight; it is armed again once the answer is written
//! and the body consumed, or handed straight to the next `recv` when the
//! client already sent its next request (pipelining). Under load a thread
//! answers request after request with three system calls each (read, write,
//! re-arm) and never sleeps; idle, it sleeps in `epoll_wait` exactly where
//! the upstream connection thread slept in `recv(2)`.
//!
//! Behaviour kept from upstream: the same request parsing (request line,
//! headers, `Expect: 100-continue`, chunked bodies, HTTP/1.0 and
//! `Connection: close`), the same [`Request`] API, answers in request order
//! (a connection has at most one request in flight). Different, on purpose:
//!
//! - every size read from the network has a limit ([`EventedLimits`]): the
//!   request head, the body buffered before the request is returned, the
//!   body drained after the answer, the number of open connections; every
//!   wait for the client has a timeout;
//! - a connection whose request had a chunked body, or whose body was left
//!   unread and not drained (too long, too slow, or an `Expect:
//!   100-continue` body the client was never asked for), is closed after
//!   the answer instead of being read on from an unknown position;
//! - a client that stops sending mid-body still has its request returned
//!   (the handler finds the body short and can answer, e.g. 408);
//! - an HTTP version above 1.1 is answered 505 and the connection closed.
//!
//! Idle keep-alive connections are kept until their client closes them
//! (TCP keepalive, set on the listener, notices clients that vanished);
//! `max_connections` bounds how many. At that bound a new connection is not
//! refused while one is parked that has waited a second or more for its
//! next request: the one that has waited longest is closed to make room
//! (a head that trickles in byte by byte does not count as activity), so
//! clients that connect and say nothing cannot lock the others out.
//!
//! Not supported here (the threaded server still is): TLS and Unix sockets.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::{epoll, eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};

use crate::common::{HTTPVersion, Header};
use crate::request::new_request;
use crate::{Request, Response, StatusCode};

/// Bounds on what a client can make the server hold.
#[derive(Clone, Debug)]
pub struct EventedLimits {
    /// The longest request head (request line and headers) read; a longer
    /// one is answered 431 and the connection closed. Default 16 KiB.
    pub max_head_bytes: usize,
    /// A body of up to this many bytes (by `Content-Length`) is read in full
    /// before `recv` returns the request, so a client sending slowly holds
    /// a little memory, never a thread. A larger body, or a chunked one, is
    /// read by whoever handles the request, as upstream. Default 64 KiB.
    pub max_buffered_body: usize,
    /// The most connections open at once. At this bound a new connection
    /// closes the parked connection that has waited longest for its next
    /// request, if that one has waited at least `evict_after`; otherwise the
    /// new one is closed as soon as it is accepted. Default 1024.
    pub max_connections: usize,
    /// See `max_connections`: how long a connection must have waited for
    /// its next request (since it was accepted or its last answer was
    /// written; bytes of a head trickling in do not count) before a new
    /// connection may take its place. `Duration::MAX`: never. Default 1 s.
    pub evict_after: Duration,
    /// How long reading a streamed body or writing an answer may wait for
    /// the client before failing (the connection is then closed). Default 30 s.
    pub io_timeout: Duration,
    /// The most of a body left unread by the handler that is drained after
    /// the answer, so the connection can serve the client's next request
    /// (tiny_http drains when the request is dropped); a longer rest closes
    /// the connection instead. Default 8 MiB.
    pub max_drain_bytes: usize,
}

impl Default for EventedLimits {
    fn default() -> Self {
        EventedLimits {
            max_head_bytes: 16 * 1024,
            max_buffered_body: 64 * 1024,
            max_connections: 1024,
            evict_after: Duration::from_secs(1),
            io_timeout: Duration::from_secs(30),
            max_drain_bytes: 8 * 1024 * 1024,
        }
    }
}

const LISTENER: u64 = 0;
const WAKER: u64 = 1;
const FIRST_CONN: u64 = 2;
/// Read-buffer capacity kept by an idle connection; more is given back.
const IDLE_BUFFER: usize = 4096;
/// An answer is written out once this much of it is buffered.
const WRITE_CHUNK: usize = 64 * 1024;

/// One client connection and what was read from it but not yet used.
struct Conn {
    /// Shared only so the epoll set can be told about it outside the slots'
    /// lock (see [`Evented::park`]).
    stream: Arc<TcpStream>,
    token: u64,
    remote: Option<SocketAddr>,
    /// Read buffer; `buf[pos..end]` is read and not yet used.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Since when it waits for its next request: accepted, or its last
    /// answer written. Bytes of a head that trickles in do not refresh it,
    /// so a client sending one byte a second is the oldest waiter there is.
    waiting_since: Instant,
}

impl Conn {
    fn unread(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    /// Moves unread bytes to the front; gives back a large buffer once
    /// nothing is left in it.
    fn compact(&mut self) {
        self.buf.copy_within(self.pos..self.end, 0);
        self.end -= self.pos;
        self.pos = 0;
        if self.end == 0 && self.buf.len() > IDLE_BUFFER {
            self.buf = Vec::new();
        }
    }

    /// Reads what the socket has, growing the buffer up to `cap` bytes.
    /// `Ok(0)`: the client closed (or `cap` is reached, which callers rule out).
    fn read_more(&mut self, cap: usize) -> io::Result<usize> {
        if self.end == self.buf.len() {
            self.compact();
        }
        if self.end == self.buf.len() {
            let grown = (self.buf.len() * 2).clamp(IDLE_BUFFER, cap.max(IDLE_BUFFER));
            self.buf.resize(grown, 0);
        }
        let n = (&*self.stream).read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }
}

enum Slot {
    Free,
    /// Armed in the epoll set, waiting for its client.
    Parked(Conn),
    /// Taken by a thread (reading it, or its request is in flight).
    Busy,
}

struct Slots {
    slots: Vec<Slot>,
    free: Vec<usize>,
}

enum Ready {
    /// A connection with its next request already buffered.
    Conn(Conn),
    /// [`Evented::unblock`] was called.
    Unblock,
}

pub(crate) struct Evented {
    epoll: OwnedFd,
    listener: TcpListener,
    waker: OwnedFd,
    slots: Mutex<Slots>,
    ready: Mutex<VecDeque<Ready>>,
    /// `ready.len()`, read without the lock by every `recv`.
    ready_len: AtomicUsize,
    open: AtomicUsize,
    closed: AtomicBool,
    limits: EventedLimits,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a single push, pop or slot update.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn oneshot_in() -> epoll::EventFlags {
    epoll::EventFlags::IN | epoll::EventFlags::ONESHOT | epoll::EventFlags::RDHUP
}

fn timespec(d: Duration) -> Timespec {
    Timespec { tv_sec: d.as_secs().min(i64::MAX as u64) as _, tv_nsec: d.subsec_nanos() as _ }
}

impl Evented {
    pub(crate) fn new(listener: TcpListener, mut limits: EventedLimits) -> io::Result<Arc<Evented>> {
        // tiny_http reads bodies up to 1 KiB as it builds the request: they
        // must be in the buffer by then, or that read would block.
        limits.max_buffered_body = limits.max_buffered_body.max(1024);
        limits.max_head_bytes = limits.max_head_bytes.max(256);
        listener.set_nonblocking(true)?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let waker = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        epoll::add(&epoll, &listener, epoll::EventData::new_u64(LISTENER), oneshot_in())?;
        epoll::add(&epoll, &waker, epoll::EventData::new_u64(WAKER), oneshot_in())?;
        Ok(Arc::new(Evented {
            epoll,
            listener,
            waker,
            slots: Mutex::new(Slots { slots: Vec::new(), free: Vec::new() }),
            ready: Mutex::new(VecDeque::new()),
            ready_len: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            limits,
        }))
    }

    /// Makes one thread waiting in `recv` return `Ok(None)`.
    pub(crate) fn unblock(&self) {
        self.push_ready(Ready::Unblock);
    }

    fn push_ready(&self, item: Ready) {
        let mut ready = lock(&self.ready);
        ready.push_back(item);
        self.ready_len.store(ready.len(), Ordering::Release);
        drop(ready);
        self.wake();
    }

    /// Stops: every `recv` returns an error from now on.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        // An eventfd counter only saturates after 2^64 - 2 writes; a failed
        // write means it is already readable, which is all a wake-up needs.
        let _ = rustix::io::write(&self.waker, &1u64.to_ne_bytes());
    }

    /// The next request, waiting until `deadline` (`None`: no limit). `Ok(None)`
    /// when the deadline passed or [`unblock`](Self::unblock) was called.
    pub(crate) fn recv(self: &Arc<Self>, deadline: Option<Instant>) -> io::Result<Option<Request>> {
        // One event per wait: the kernel then wakes one waiter per ready
        // connection, and no thread holds events it is not handling.
        let mut events = [epoll::Event { flags: epoll::EventFlags::empty(), data: epoll::EventData::new_u64(0) }];
        loop {
            if self.closed.load(Ordering::Acquire) {
                self.wake(); // the next waiter learns it too
                return Err(io::Error::new(ErrorKind::Other, "server closed"));
            }
            if let Some(ready) = self.pop_ready() {
                match ready {
                    Ready::Unblock => return Ok(None),
                    Ready::Conn(conn) => match self.serve(conn) {
                        Some(rq) => return Ok(Some(rq)),
                        None => continue,
                    },
                }
            }
            let timeout = match deadline {
                None => None,
                Some(d) => Some(timespec(d.saturating_duration_since(Instant::now()))),
            };
            let got = match epoll::wait(&self.epoll, &mut events[..], timeout.as_ref()) {
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let Some(event) = events[..got.min(1)].first() else {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(None);
                }
                continue;
            };
            match event.data.u64() {
                LISTENER => self.accept_some(),
                WAKER => {
                    let mut counter = [0u8; 8];
                    let _ = rustix::io::read(&self.waker, &mut counter);
                    self.rearm_waker();
                }
                token => {
                    if let Some(conn) = self.take_parked(token) {
                        if let Some(rq) = self.serve(conn) {
                            return Ok(Some(rq));
                        }
                    }
                }
            }
        }
    }

    fn pop_ready(&self) -> Option<Ready> {
        if self.ready_len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut ready = lock(&self.ready);
        let item = ready.pop_front();
        self.ready_len.store(ready.len(), Ordering::Release);
        if item.is_some() && !ready.is_empty() {
            // One wake-up reaches one waiter: pass the baton for the rest.
            drop(ready);
            self.wake();
        }
        item
    }

    fn rearm_waker(&self) {
        if let Err(e) = epoll::modify(&self.epoll, &self.waker, epoll::EventData::new_u64(WAKER), oneshot_in()) {
            log::error!("cannot re-arm the server's waker: {}", e);
        }
    }

    fn rearm_listener(&self) {
        if let Err(e) = epoll::modify(&self.epoll, &self.listener, epoll::EventData::new_u64(LISTENER), oneshot_in()) {
            log::error!("cannot re-arm the listener: {}", e);
        }
    }

    fn accept_some(&self) {
        // A bounded batch, so one thread does not accept forever while
        // requests wait; the listener is level-triggered and fires again.
        for _ in 0..64 {
            match self.listener.accept() {
                Ok((stream, remote)) => self.register(stream, Some(remote)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::ConnectionAborted) => continue,
                Err(e) => {
                    // Out of file descriptors or memory: the pending connection
                    // stays in the backlog, and the listener stays readable.
                    // Pause briefly rather than spin on it.
                    log::error!("error accepting a connection: {}", e);
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
        self.rearm_listener();
    }

    fn register(&self, stream: TcpStream, remote: Option<SocketAddr>) {
        if self.open.load(Ordering::Acquire) >= self.limits.max_connections && !self.evict_longest_waiting() {
            log::warn!("{} connections open already; closing a new one from {:?}", self.limits.max_connections, remote);
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("cannot make a connection non-blocking ({}); closing it", e);
            return;
        }
        let stream = Arc::new(stream);
        let token = {
            let mut slots = lock(&self.slots);
            let index = match slots.free.pop() {
                Some(i) => i,
                None => {
                    slots.slots.push(Slot::Free);
                    slots.slots.len() - 1
                }
            };
            let token = index as u64 + FIRST_CONN;
            // Parked before it is watched, so the thread that gets its first
            // event finds it.
            slots.slots[index] = Slot::Parked(Conn {
                stream: stream.clone(),
                token,
                remote,
                buf: Vec::new(),
                pos: 0,
                end: 0,
                waiting_since: Instant::now(),
            });
            token
        };
        self.open.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = epoll::add(&self.epoll, &*stream, epoll::EventData::new_u64(token), oneshot_in()) {
            log::warn!("cannot watch a new connection ({}); closing it", e);
            // Never watched, so nobody else can have taken it.
            if let Some(conn) = self.take_parked(token) {
                self.close_conn(conn);
            }
        }
    }

    /// Makes room at `max_connections`: closes the parked connection that has
    /// waited longest for its next request (idle keep-alive, or a head that
    /// trickles in), if it waited at least `evict_after`. Without this,
    /// `max_connections` clients that connect and send nothing (or a byte
    /// now and then) would lock every other client out for as long as they
    /// like. An honest idle client evicted this way reconnects.
    fn evict_longest_waiting(&self) -> bool {
        let victim = {
            let mut slots = lock(&self.slots);
            let oldest = slots
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, slot)| match slot {
                    Slot::Parked(c) if c.waiting_since.elapsed() >= self.limits.evict_after => Some((c.waiting_since, i)),
                    _ => None,
                })
                .min();
            match oldest {
                Some((_, i)) => match std::mem::replace(&mut slots.slots[i], Slot::Busy) {
                    Slot::Parked(conn) => Some(conn),
                    other => {
                        slots.slots[i] = other;
                        None
                    }
                },
                None => None,
            }
        };
        match victim {
            Some(conn) => {
                log::debug!("{} connections open: closing the one waiting longest, from {:?}", self.limits.max_connections, conn.remote);
                self.close_conn(conn);
                true
            }
            None => false,
        }
    }

    fn take_parked(&self, token: u64) -> Option<Conn> {
        let mut slots = lock(&self.slots);
        let slot = slots.slots.get_mut(token.checked_sub(FIRST_CONN)? as usize)?;
        match std::mem::replace(slot, Slot::Busy) {
            Slot::Parked(conn) => Some(conn),
            other => {
                // One-shot: a connection is only reported while parked.
                *slot = other;
                None
            }
        }
    }

    /// Waits for the connection's next request: armed again in the epoll set.
    fn park(&self, conn: Conn) {
        let stream = conn.stream.clone();
        let token = conn.token;
        // Parked first: once armed, another thread may get its event at once.
        // The epoll call is made outside the lock (it is a system call, and
        // every thread takes this lock once per request); `stream` keeps the
        // socket open meanwhile even if that thread closes the connection.
        lock(&self.slots).slots[(token - FIRST_CONN) as usize] = Slot::Parked(conn);
        if let Err(e) = epoll::modify(&self.epoll, &*stream, epoll::EventData::new_u64(token), oneshot_in()) {
            log::warn!("cannot watch a connection again ({}); closing it", e);
            // Not armed, so still parked.
            if let Some(conn) = self.take_parked(token) {
                self.close_conn(conn);
            }
        }
    }

    fn close_conn(&self, conn: Conn) {
        let index = (conn.token - FIRST_CONN) as usize;
        // Closing the socket (its last handle) removes it from the epoll set.
        drop(conn);
        let mut slots = lock(&self.slots);
        slots.slots[index] = Slot::Free;
        slots.free.push(index);
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Sends a bodiless error status and closes: after a request we could
    /// not parse, we do not know where the next one would start.
    fn refuse(&self, conn: Conn, status: u16, version: HTTPVersion) {
        let mut out = Vec::with_capacity(128);
        if Response::empty(StatusCode(status)).raw_print(&mut out, version, &[], false, None).is_ok() {
            let _ = write_all(&conn.stream, &out, self.limits.io_timeout);
        }
        self.close_conn(conn);
    }

    /// Reads from `conn` until it holds a request to return; parks or
    /// closes it otherwise.
    fn serve(self: &Arc<Self>, mut conn: Conn) -> Option<Request> {
        // The head, once complete, parsed once while its body arrives.
        let mut head: Option<Head> = None;
        loop {
            if head.is_none() {
                match parse_head(conn.unread(), self.limits.max_head_bytes) {
                    HeadStatus::Complete(h) => head = Some(h),
                    HeadStatus::Partial => {}
                    HeadStatus::TooLong => {
                        self.refuse(conn, 431, HTTPVersion(1, 1));
                        return None;
                    }
                    HeadStatus::Refused(status, version) => {
                        self.refuse(conn, status, version);
                        return None;
                    }
                }
            }
            let body_ready = head.as_ref().is_some_and(|h| match h.buffered_body_len(&self.limits) {
                Some(n) => conn.unread().len() >= h.len + n,
                None => true, // streamed by the handler
            });
            if body_ready {
                if let Some(h) = head.take() {
                    return self.dispatch(conn, h);
                }
            }
            if conn.unread().len() >= self.limits.max_head_bytes + self.limits.max_buffered_body {
                // Cannot happen (a complete head with a body this small is
                // dispatched above); refuse rather than grow without end.
                self.refuse(conn, 431, HTTPVersion(1, 1));
                return None;
            }
            match conn.read_more(self.limits.max_head_bytes + self.limits.max_buffered_body) {
                Ok(0) => {
                    // The client stopped sending. Mid-head: nothing to answer.
                    // Mid-body: the handler gets the request and finds the
                    // body cut short (and can say so); the connection closes.
                    if let Some(h) = head {
                        return self.dispatch(conn, h);
                    }
                    self.close_conn(conn);
                    return None;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.park(conn);
                    return None;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close_conn(conn);
                    return None;
                }
            }
        }
    }

    fn dispatch(self: &Arc<Self>, mut conn: Conn, head: Head) -> Option<Request> {
        conn.pos += head.len;
        if head.version > HTTPVersion(1, 1) {
            self.refuse(conn, 505, HTTPVersion(1, 1));
            return None;
        }
        let remote = conn.remote;
        let exchange = Arc::new(Exchange {
            server: self.clone(),
            conn: Mutex::new(Some(conn)),
            keep_alive: head.keep_alive && !head.chunked,
            body_left: AtomicUsize::new(head.content_length.unwrap_or(0)),
            failed: AtomicBool::new(false),
            answered: AtomicBool::new(false),
            expects_continue: head.expects_continue,
        });
        let reader = BodyReader { exchange: exchange.clone(), read_before_answer: false, drained: 0 };
        let writer = AnswerWriter { exchange, out: Vec::new() };
        match new_request(false, head.method, head.path, head.version, head.headers, remote, reader, writer) {
            Ok(rq) => Some(rq),
            // Unknown `Expect` values are refused (417) in `parse_head`,
            // and the bodies tiny_http reads here are buffered already; a
            // failure is a client gone, and the dropped exchange closes it.
            Err(e) => {
                log::debug!("could not build a request: {:?}", e);
                None
            }
        }
    }
}

impl Drop for Evented {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// Writes all of `data`, waiting (up to `timeout` per stall) while the
/// socket's send buffer is full.
fn write_all(stream: &TcpStream, mut data: &[u8], timeout: Duration) -> io::Result<()> {
    while !data.is_empty() {
        match (&*stream).write(data) {
            Ok(0) => return Err(io::Error::new(ErrorKind::WriteZero, "the client stopped reading")),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait_for(stream, PollFlags::OUT, timeout)?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until `stream` is ready for `flags`, or fails with `TimedOut`.
fn wait_for(stream: &TcpStream, flags: PollFlags, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(ErrorKind::TimedOut, "the client made no progress"));
        }
        let mut fds = [PollFd::new(stream, flags)];
        match poll(&mut fds, Some(&timespec(left))) {
            Ok(n) if n > 0 => return Ok(()),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

// ------------------------------------------------------------- one request

/// A request in flight on a connection: shared by the request's body
/// reader and its answer writer. When both are gone, the connection goes
/// back to the server — parked, handed to the next `recv`, or closed.
struct Exchange {
    server: Arc<Evented>,
    conn: Mutex<Option<Conn>>,
    keep_alive: bool,
    /// Bytes of a `Content-Length` body not yet read.
    body_left: AtomicUsize,
    /// A read or write failed or timed out: the connection is closed.
    failed: AtomicBool,
    /// The answer is written (its writer is gone): what the body reader
    /// reads from now on is tiny_http draining an unread body. It drains at
    /// most `max_drain_bytes`, and nothing at all when the client asked
    /// `Expect: 100-continue` and was answered without being told to
    /// continue — it will rightly never send the body.
    answered: AtomicBool,
    expects_continue: bool,
}

impl Exchange {
    fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.get_mut().unwrap_or_else(|p| p.into_inner()).take() else { return };
        let reusable = self.keep_alive
            && !*self.failed.get_mut()
            && *self.body_left.get_mut() == 0
            && !self.server.closed.load(Ordering::Acquire);
        if !reusable {
            self.server.close_conn(conn);
            return;
        }
        conn.compact();
        conn.waiting_since = Instant::now();
        if conn.unread().is_empty() {
            self.server.park(conn);
        } else {
            self.server.push_ready(Ready::Conn(conn));
        }
    }
}

/// The request's raw body: what was buffered with the head, then the
/// socket (waiting up to `io_timeout` for the client each time).
struct BodyReader {
    exchange: Arc<Exchange>,
    /// The handler read the body (for `Expect: 100-continue`: tiny_http
    /// sent "100 Continue" first).
    read_before_answer: bool,
    /// Bytes read after the answer.
    drained: usize,
}

impl Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let ex = &*self.exchange;
        let mut guard = lock(&ex.conn);
        let Some(conn) = guard.as_mut() else { return Ok(0) };
        let n = if !conn.unread().is_empty() {
            let n = conn.unread().len().min(out.len());
            out[..n].copy_from_slice(&conn.unread()[..n]);
            conn.pos += n;
            n
        } else if ex.answered.load(Ordering::Acquire)
            && ((ex.expects_continue && !self.read_before_answer)
                || self.drained >= ex.server.limits.max_drain_bytes)
        {
            // Not worth waiting for (see `Exchange::answered`): the exchange
            // closes the connection instead.
            ex.fail();
            return Ok(0);
        } else {
            loop {
                match (&*conn.stream).read(out) {
                    Ok(n) => {
                        if n == 0 && !out.is_empty() {
                            ex.fail();
                        }
                        break n;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if let Err(e) = wait_for(&conn.stream, PollFlags::IN, ex.server.limits.io_timeout) {
                            ex.fail();
                            return Err(e);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        ex.fail();
                        return Err(e);
                    }
                }
            }
        };
        if ex.answered.load(Ordering::Acquire) {
            self.drained += n;
        } else {
            self.read_before_answer = true;
        }
        let _ = ex.body_left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| Some(left.saturating_sub(n)));
        Ok(n)
    }
}

/// The answer, written to the socket when flushed (tiny_http flushes once
/// at the end of a response) or when it grows past [`WRITE_CHUNK`].
struct AnswerWriter {
    exchange: Arc<Exchange>,
    out: Vec<u8>,
}

impl AnswerWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let ex = &*self.exchange;
        let result = match lock(&ex.conn).as_ref() {
            Some(conn) => write_all(&conn.stream, &self.out, ex.server.limits.io_timeout),
            None => Err(io::Error::new(ErrorKind::NotConnected, "connection gone")),
        };
        self.out.clear();
        if result.is_err() {
            ex.fail();
        }
        result
    }
}

impl Write for AnswerWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // Written even after a failed read: a client that stopped sending
        // (half-closed) may still read its answer (e.g. 408).
        self.out.extend_from_slice(data);
        if self.out.len() >= WRITE_CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

impl Drop for AnswerWriter {
    fn drop(&mut self) {
        let _ = self.send();
        self.exchange.answered.store(true, Ordering::Release);
    }
}

// ------------------------------------------------------------- the head

struct Head {
    /// Bytes of the head, blank line included.
    len: usize,
    method: crate::Method,
    path: String,
    version: HTTPVersion,
    headers: Vec<Header>,
    content_length: Option<usize>,
    chunked: bool,
    expects_continue: bool,
    keep_alive: bool,
}

impl Head {
    /// How much body must be buffered before the request is returned;
    /// `None` when the handler reads the body itself.
    fn buffered_body_len(&self, limits: &EventedLimits) -> Option<usize> {
        if self.chunked || self.expects_continue {
            return None;
        }
        match self.content_length {
            Some(n) if n <= limits.max_buffered_body => Some(n),
            Some(_) => None,
            None => Some(0),
        }
    }
}

enum HeadStatus {
    Complete(Head),
    Partial,
    TooLong,
    /// Answered with this status, then the connection is closed.
    Refused(u16, HTTPVersion),
}

fn find_blank_line(data: &[u8]) -> Option<usize> {
    data.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn parse_head(data: &[u8], max: usize) -> HeadStatus {
    let Some(len) = find_blank_line(&data[..data.len().min(max)]) else {
        return if data.len() >= max { HeadStatus::TooLong } else { HeadStatus::Partial };
    };
    let Ok(text) = std::str::from_utf8(&data[..len - 4]) else {
        return HeadStatus::Refused(400, HTTPVersion(1, 1));
    };
    if !text.is_ascii() {
        return HeadStatus::Refused(400, HTTPVersion(1, 1));
    }
    let mut lines = text.split("\r\n");
    let Ok((method, path, version)) = crate::client::parse_request_line(lines.next().unwrap_or("").trim()) else {
        return HeadStatus::Refused(400, HTTPVersion(1, 1));
    };
    let mut headers = Vec::new();
    for line in lines {
        match Header::from_str(line.trim()) {
            Ok(h) => headers.push(h),
            Err(_) => return HeadStatus::Refused(400, version),
        }
    }
    let find = |name: &'static str| headers.iter().find(|h| h.field.equiv(name)).map(|h| h.value.as_str());
    let chunked = find("Transfer-Encoding").is_some();
    // As upstream: an unparsable Content-Length counts as none.
    let content_length = if chunked { None } else { find("Content-Length").and_then(|v| v.trim().parse().ok()) };
    let expects_continue = match find("Expect") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("100-continue") => true,
        Some(_) => return HeadStatus::Refused(417, version),
    };
    let connection = find("Connection").map(|v| v.to_ascii_lowercase());
    // Same rules as upstream's `ClientConnection`.
    let keep_alive = match connection {
        Some(ref v) if v.contains("close") || v.contains("upgrade") => false,
        Some(ref v) => v.contains("keep-alive") || version != HTTPVersion(1, 0),
        None => version != HTTPVersion(1, 0),
    };
    HeadStatus::Complete(Head {
        len,
        method,
        path,
        version,
        headers,
        content_length,
        chunked,
        expects_continue,
        keep_alive,
    })
}
