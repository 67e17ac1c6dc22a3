//! A bounded multi-producer, multi-consumer queue: the one place where the
//! server decides to shed load.
//!
//! std's `sync_channel` has a single consumer, and the server has several
//! workers; a mutex around a `VecDeque` plus a condvar is all it takes, and at
//! the rates one device sees (tens of thousands of requests a second) the lock
//! is held for nanoseconds.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

pub(crate) struct BoundedQueue<T> {
    state: Mutex<State<T>>,
    nonempty: Condvar,
    capacity: usize,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
    /// Consumers inside `pop_or_wake`'s wait. A notify is a system call
    /// even when nobody waits (std's futex condvar), and the work queue is
    /// pushed once per request under load while nobody ever waits on it.
    waiting: usize,
}

/// Why a push was refused; the item comes back so the caller can answer it.
pub(crate) enum PushError<T> {
    Full(T),
    Closed(T),
}

/// What [`BoundedQueue::pop_or_wake`] got.
pub(crate) enum Timed<T> {
    Item(T),
    /// The deadline passed with nothing to pop.
    Expired,
    /// Woken by [`BoundedQueue::wake_all`] (or spuriously) with nothing to pop:
    /// the caller re-checks its own conditions.
    Woken,
    Closed,
}

impl<T> BoundedQueue<T> {
    pub fn new(capacity: usize) -> BoundedQueue<T> {
        BoundedQueue {
            state: Mutex::new(State { items: VecDeque::with_capacity(capacity.min(1024)), closed: false, waiting: 0 }),
            nonempty: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock cannot leave the deque half-updated
        // (push/pop are single calls), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn try_push(&self, item: T) -> Result<(), PushError<T>> {
        let mut s = self.lock();
        if s.closed {
            return Err(PushError::Closed(item));
        }
        if s.items.len() >= self.capacity {
            return Err(PushError::Full(item));
        }
        s.items.push_back(item);
        let wake = s.waiting > 0;
        drop(s);
        if wake {
            self.nonempty.notify_one();
        }
        Ok(())
    }

    /// Puts an item taken from the queue back at its head, even when that
    /// overfills it: it was admitted already.
    pub fn push_front(&self, item: T) {
        self.lock().items.push_front(item);
        self.nonempty.notify_one();
    }

    /// Pops an item, or waits once (until `deadline`) for one to arrive or for
    /// a [`wake_all`](Self::wake_all).
    pub fn pop_or_wake(&self, deadline: Instant) -> Timed<T> {
        let mut s = self.lock();
        if let Some(item) = s.items.pop_front() {
            return Timed::Item(item);
        }
        if s.closed {
            return Timed::Closed;
        }
        let now = Instant::now();
        if now >= deadline {
            return Timed::Expired;
        }
        s.waiting += 1;
        s = self
            .nonempty
            .wait_timeout(s, deadline - now)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
        s.waiting -= 1;
        match s.items.pop_front() {
            Some(item) => Timed::Item(item),
            None if s.closed => Timed::Closed,
            None if Instant::now() >= deadline => Timed::Expired,
            None => Timed::Woken,
        }
    }

    pub fn try_pop(&self) -> Option<T> {
        self.lock().items.pop_front()
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Refuses further pushes and wakes every waiting consumer. Items already
    /// queued can still be popped (so they get an answer).
    pub fn close(&self) {
        self.lock().closed = true;
        self.nonempty.notify_all();
    }

    /// Wakes every waiting consumer without closing (used to re-check conditions).
    pub fn wake_all(&self) {
        self.nonempty.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn refuses_when_full_and_returns_the_item() {
        let q = BoundedQueue::new(2);
        assert!(q.try_push(1).is_ok());
        assert!(q.try_push(2).is_ok());
        match q.try_push(3) {
            Err(PushError::Full(3)) => {}
            _ => panic!("expected Full(3)"),
        }
        assert_eq!(q.try_pop(), Some(1));
        q.close();
        assert!(matches!(q.try_push(4), Err(PushError::Closed(4))));
        assert_eq!(q.try_pop(), Some(2));
        assert_eq!(q.try_pop(), None);
    }

    #[test]
    fn pop_until_times_out() {
        let q: BoundedQueue<u8> = BoundedQueue::new(1);
        let t = Instant::now();
        let deadline = t + Duration::from_millis(5);
        loop {
            match q.pop_or_wake(deadline) {
                Timed::Expired => break,
                Timed::Woken => continue,
                _ => panic!("nothing was pushed"),
            }
        }
        assert!(t.elapsed() >= Duration::from_millis(5));
    }
}
