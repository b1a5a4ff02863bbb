//! The gateway's connections: one epoll set shared by a few polling threads, no thread per
//! connection.
//!
//! Connections are registered edge-triggered, once. A connection is `busy` from the moment a
//! request is framed until its answer is out; only then is the next one read, so answers keep
//! the order of requests. The thread that got the event reads and frames one request and hands
//! it to the gateway with a [`Responder`]; an event for a busy connection is remembered and
//! raised again when its answer is out. One thread at a time waits in
//! `epoll_wait` (the others wait for their turn), so events that arrive while it works are
//! taken together in its next batch instead of waking one sleeping thread each. The answer may be written by any
//! thread — the poller itself, or a pool executor that ran a queued request — and writing it
//! re-arms the connection. A request that waits for a worker therefore holds no thread at all.
//!
//! Work that may block (a request run at once on an idle worker, a call forwarded to another
//! node) runs on the polling thread; before it blocks, the thread gives back the other events of
//! its batch (re-arming them), hands its turn to the next thread and, if none is left, starts
//! another. Threads beyond [`MIN_POLLERS`] end after [`POLLER_IDLE`] without events.
//!
//! A response that does not fit the socket's buffer is finished by the pollers (`EPOLLOUT`);
//! bytes of a pipelined next request stay buffered and are served after the answer is out.
//! Answering re-arms nothing: the common request costs no `epoll_ctl`. Connections idle for [`IDLE_TIMEOUT`] are closed.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::api::ApiError;
use crate::http::{self, Request};

/// Requests are refused past this body size before any pool is looked at.
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Connections served at once; more get `503 busy`.
pub const MAX_CONNECTIONS: usize = 1024;
/// A keep-alive connection idle this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Threads that keep polling when there is nothing to do.
pub const MIN_POLLERS: usize = 2;
/// A polling thread beyond [`MIN_POLLERS`] with no event for this long ends.
pub const POLLER_IDLE: Duration = Duration::from_secs(10);
/// At most this many polling threads (each blocked one is serving a request).
const MAX_POLLERS: usize = MAX_CONNECTIONS + MIN_POLLERS;
const LISTENER: u64 = 0;
const WAKE: u64 = 1;
const BATCH: usize = 32;
const CONN_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
const READ_CHUNK: usize = 16 * 1024;

/// What the gateway does with a request. `before_blocking` must be called before anything
/// that may block the calling thread.
pub trait Serve: Send + Sync + 'static {
    fn serve(&self, req: Request, responder: Responder, before_blocking: &mut dyn FnMut());
}

/// The epoll set, the connections and the thread accounting, shared by every poller.
struct Shared {
    epoll: OwnedFd,
    wake: OwnedFd,
    listener: Mutex<Option<TcpListener>>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Held by the one thread that polls; the others wait here for their turn.
    turn: Mutex<()>,
    /// Threads in the poll loop (not blocked serving a request), and all polling threads.
    polling: AtomicUsize,
    threads: AtomicUsize,
    stopping: AtomicBool,
    /// Milliseconds since `epoch` of the last idle-connection sweep.
    last_sweep: AtomicU64,
    epoch: Instant,
    serve: Box<dyn Serve>,
}

struct Conn {
    id: u64,
    stream: TcpStream,
    st: Mutex<ConnState>,
}

struct ConnState {
    /// Bytes read and not yet framed (the start of a request, or a pipelined next one).
    buf: Vec<u8>,
    /// Response bytes not yet sent.
    out: Vec<u8>,
    /// A request is being answered: nothing more is read until its answer is out.
    busy: bool,
    /// An event came while busy: raise it again once the answer is out.
    missed: bool,
    /// Close once `out` is sent.
    close_after: bool,
    closed: bool,
    /// Last time a request was read or an answer finished (for the idle timeout).
    last_active: Instant,
}

/// Where one request's answer goes; usable from any thread, once.
pub struct Responder {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("conn", &self.conn.id)
            .finish()
    }
}

impl Responder {
    /// The connection ends after this answer whatever the request asked (the gateway stops):
    /// the answer should say `Connection: close`.
    pub fn closing(&self) -> bool {
        self.shared.stopping.load(Ordering::Acquire)
    }

    /// Sends `response` (a complete HTTP response); `close` ends the connection after it.
    pub fn respond(self, response: Vec<u8>, close: bool) {
        let Responder { shared, conn } = self;
        let mut st = conn.lock();
        st.busy = false;
        if st.closed {
            return;
        }
        if st.out.is_empty() {
            st.out = response;
        } else {
            st.out.extend_from_slice(&response);
        }
        st.close_after |= close || shared.stopping.load(Ordering::Acquire);
        shared.after_output(&conn, st);
    }
}

/// A running server; [`Server::stop`] ends it.
pub struct Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("threads", &self.shared.threads.load(Ordering::Relaxed))
            .finish()
    }
}

fn os_err(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl Server {
    /// Serves `listener` with [`MIN_POLLERS`] threads to begin with.
    pub fn start(listener: TcpListener, serve: Box<dyn Serve>) -> std::io::Result<Server> {
        listener.set_nonblocking(true)?;
        // SAFETY: plain system calls; the returned descriptors are checked and owned at once.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(os_err("epoll_create1"));
        }
        // SAFETY: `epoll` is a fresh descriptor nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        // SAFETY: as above.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(os_err("eventfd"));
        }
        // SAFETY: `wake` is a fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let shared = Arc::new(Shared {
            epoll,
            wake,
            listener: Mutex::new(None),
            conns: Mutex::new(HashMap::new()),
            turn: Mutex::new(()),
            next_id: AtomicU64::new(2),
            polling: AtomicUsize::new(0),
            threads: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            last_sweep: AtomicU64::new(0),
            epoch: Instant::now(),
            serve,
        });
        // The wake descriptor is level-triggered and never read: once written, every poller
        // sees it.
        shared.ctl(
            libc::EPOLL_CTL_ADD,
            shared.wake.as_raw_fd(),
            libc::EPOLLIN as u32,
            WAKE,
        )?;
        shared.ctl(
            libc::EPOLL_CTL_ADD,
            listener.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
            LISTENER,
        )?;
        *lock(&shared.listener) = Some(listener);
        for _ in 0..MIN_POLLERS {
            shared.polling.fetch_add(1, Ordering::AcqRel);
            if let Err(e) = Shared::spawn_poller(&shared) {
                shared.polling.fetch_sub(1, Ordering::AcqRel);
                shared.stop();
                return Err(e);
            }
        }
        Ok(Server { shared })
    }

    /// Stops accepting; idle connections close now, busy ones after their current answer.
    pub fn stop(&self) {
        self.shared.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Conn {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        lock(&self.st)
    }
}

impl Shared {
    fn ctl(&self, op: i32, fd: RawFd, events: u32, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` lives across the call; the kernel copies it.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(os_err("epoll_ctl"));
        }
        Ok(())
    }

    /// Raises a connection's event again if it is readable or writable now (a modification
    /// re-checks readiness), for work that no new edge would announce.
    fn retrigger(&self, conn: &Conn) {
        if let Err(e) = self.ctl(
            libc::EPOLL_CTL_MOD,
            conn.stream.as_raw_fd(),
            CONN_EVENTS,
            conn.id,
        ) {
            debug!(error = %e, "cannot re-arm a gateway connection");
        }
    }

    fn spawn_poller(shared: &Arc<Shared>) -> std::io::Result<()> {
        shared.threads.fetch_add(1, Ordering::AcqRel);
        let me = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("drop-gw-poll".into())
            .stack_size(256 * 1024)
            .spawn(move || me.poll_loop());
        if spawned.is_err() {
            shared.threads.fetch_sub(1, Ordering::AcqRel);
        }
        spawned.map(|_| ())
    }

    fn stop(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                (&raw const one).cast(),
                size_of::<u64>(),
            )
        };
        if let Some(listener) = lock(&self.listener).take() {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, listener.as_raw_fd(), 0, LISTENER);
        }
        let conns: Vec<Arc<Conn>> = lock(&self.conns).values().cloned().collect();
        for conn in conns {
            let st = conn.lock();
            if !st.busy && st.out.is_empty() {
                self.close(&conn, st);
            }
        }
    }

    fn poll_loop(self: Arc<Self>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        let mut idle_since = Instant::now();
        // Kept from one batch to the next: giving it back wakes a waiting thread for nothing.
        let mut turn = None;
        loop {
            if turn.is_none() {
                turn = Some(lock(&self.turn));
            }
            if self.stopping.load(Ordering::Acquire) {
                break;
            }
            // SAFETY: `events` outlives the call and holds BATCH entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    BATCH as i32,
                    1000,
                )
            };
            if n < 0 {
                if std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                    warn!(error = %os_err("epoll_wait"), "gateway poller");
                    std::thread::sleep(Duration::from_millis(20));
                }
                continue;
            }
            self.sweep_idle();
            if n == 0 {
                if idle_since.elapsed() >= POLLER_IDLE && self.leave_if_spare() {
                    return;
                }
                continue;
            }
            idle_since = Instant::now();
            let batch = &events[..n as usize];
            for (i, ev) in batch.iter().enumerate() {
                let handed_off = match ev.u64 {
                    WAKE => break,
                    LISTENER => {
                        self.accept_all();
                        false
                    }
                    id => self.on_ready(id, &batch[i + 1..], &mut turn),
                };
                if handed_off {
                    break;
                }
            }
        }
        self.polling.fetch_sub(1, Ordering::AcqRel);
        self.threads.fetch_sub(1, Ordering::AcqRel);
    }

    /// Ends this poller if more than [`MIN_POLLERS`] are polling.
    fn leave_if_spare(&self) -> bool {
        let mut polling = self.polling.load(Ordering::Acquire);
        while polling > MIN_POLLERS {
            match self.polling.compare_exchange(
                polling,
                polling - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.threads.fetch_sub(1, Ordering::AcqRel);
                    return true;
                }
                Err(now) => polling = now,
            }
        }
        false
    }

    /// About to block: gives the rest of the batch back, hands the turn to poll to the next
    /// thread and makes sure there is one.
    fn enter_blocking(
        self: &Arc<Self>,
        rest: &[libc::epoll_event],
        turn: &mut Option<MutexGuard<'_, ()>>,
    ) {
        for ev in rest {
            match ev.u64 {
                WAKE => {}
                LISTENER => {
                    if let Some(l) = lock(&self.listener).as_ref() {
                        let _ = self.ctl(
                            libc::EPOLL_CTL_MOD,
                            l.as_raw_fd(),
                            (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
                            LISTENER,
                        );
                    }
                }
                id => {
                    if let Some(conn) = lock(&self.conns).get(&id).cloned() {
                        self.retrigger(&conn);
                    }
                }
            }
        }
        drop(turn.take());
        if self.polling.fetch_sub(1, Ordering::AcqRel) == 1
            && self.threads.load(Ordering::Acquire) < MAX_POLLERS
            && !self.stopping.load(Ordering::Acquire)
        {
            self.polling.fetch_add(1, Ordering::AcqRel);
            if let Err(e) = Shared::spawn_poller(self) {
                self.polling.fetch_sub(1, Ordering::AcqRel);
                warn!(error = %e, "cannot start a gateway poller");
            }
        }
    }

    fn accept_all(self: &Arc<Self>) {
        let listener = lock(&self.listener);
        let Some(l) = listener.as_ref() else { return };
        loop {
            match l.accept() {
                Ok((stream, _)) => self.register(stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, typically: try again on the next event.
                    warn!(error = %e, "gateway accept failed");
                    std::thread::sleep(Duration::from_millis(20));
                    break;
                }
            }
        }
        let _ = self.ctl(
            libc::EPOLL_CTL_MOD,
            l.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
            LISTENER,
        );
    }

    fn register(self: &Arc<Self>, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let mut conns = lock(&self.conns);
        if conns.len() >= MAX_CONNECTIONS {
            drop(conns);
            let err = ApiError::new(
                503,
                "busy",
                format!("more than {MAX_CONNECTIONS} gateway connections"),
            );
            let _ = (&stream).write_all(&http::encode_json_response(
                err.status,
                &err.to_json(),
                true,
            ));
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            stream,
            st: Mutex::new(ConnState {
                buf: Vec::new(),
                out: Vec::new(),
                busy: false,
                missed: false,
                close_after: false,
                closed: false,
                last_active: Instant::now(),
            }),
        });
        if let Err(e) = self.ctl(
            libc::EPOLL_CTL_ADD,
            conn.stream.as_raw_fd(),
            CONN_EVENTS,
            id,
        ) {
            warn!(error = %e, "cannot watch a gateway connection");
            return;
        }
        conns.insert(id, conn);
    }

    /// One ready connection. Returns true when the rest of the batch was handed off.
    fn on_ready(
        self: &Arc<Self>,
        id: u64,
        rest: &[libc::epoll_event],
        turn: &mut Option<MutexGuard<'_, ()>>,
    ) -> bool {
        let Some(conn) = lock(&self.conns).get(&id).cloned() else {
            return false;
        };
        let mut st = conn.lock();
        if st.closed {
            return false;
        }
        if st.busy {
            st.missed = true;
            return false;
        }
        if !st.out.is_empty() {
            // The rest of an answer: send it, then serve what is buffered.
            self.after_output(&conn, st);
            return false;
        }
        let eof = match read_some(&conn.stream, &mut st.buf) {
            Ok(eof) => eof,
            Err(()) => {
                self.close(&conn, st);
                return false;
            }
        };
        let req = match http::take_request(&mut st.buf, MAX_BODY) {
            Ok(Some(req)) => req,
            Ok(None) => {
                st.last_active = Instant::now();
                if eof {
                    self.close(&conn, st);
                }
                return false;
            }
            Err(e) => {
                debug!(error = %e, "malformed gateway request");
                st.busy = true;
                drop(st);
                let body = ApiError::from(&e).to_json();
                let out = http::encode_json_response(e.status(), &body, true);
                self.responder(conn).respond(out, true);
                return false;
            }
        };
        st.busy = true;
        drop(st);
        let mut handed_off = false;
        let mut before_blocking = || {
            if !handed_off {
                handed_off = true;
                self.enter_blocking(rest, turn);
            }
        };
        self.serve
            .serve(req, self.responder(conn), &mut before_blocking);
        if handed_off {
            self.polling.fetch_add(1, Ordering::AcqRel);
        }
        handed_off
    }

    fn responder(self: &Arc<Self>, conn: Arc<Conn>) -> Responder {
        Responder {
            shared: self.clone(),
            conn,
        }
    }

    /// After output was queued: send what the socket takes, then close, wait for room, or
    /// arm for the next request (at once when one is already buffered).
    fn after_output(&self, conn: &Conn, mut st: MutexGuard<'_, ConnState>) {
        match write_some(&conn.stream, &mut st.out) {
            Ok(()) => {}
            Err(()) => return self.close(conn, st),
        }
        if !st.out.is_empty() {
            // EPOLLOUT comes when the socket has room again.
            return;
        }
        if st.close_after {
            return self.close(conn, st);
        }
        st.last_active = Instant::now();
        // A pipelined request already read, or an event that came while busy: no new edge
        // will announce it.
        let again = st.missed || !st.buf.is_empty();
        st.missed = false;
        drop(st);
        if again {
            self.retrigger(conn);
        }
    }

    fn close(&self, conn: &Conn, mut st: MutexGuard<'_, ConnState>) {
        if st.closed {
            return;
        }
        st.closed = true;
        st.buf = Vec::new();
        st.out = Vec::new();
        drop(st);
        let _ = self.ctl(libc::EPOLL_CTL_DEL, conn.stream.as_raw_fd(), 0, conn.id);
        let _ = conn.stream.shutdown(Shutdown::Both);
        lock(&self.conns).remove(&conn.id);
    }

    /// At most once a second: closes connections idle for [`IDLE_TIMEOUT`].
    fn sweep_idle(&self) {
        let now_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < 1000
            || self
                .last_sweep
                .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let conns: Vec<Arc<Conn>> = lock(&self.conns).values().cloned().collect();
        for conn in conns {
            // A connection another thread is handling is not idle.
            let Ok(st) = conn.st.try_lock() else { continue };
            if !st.busy && st.out.is_empty() && st.last_active.elapsed() >= IDLE_TIMEOUT {
                self.close(&conn, st);
            }
        }
    }
}

/// One read into `buf`. `Ok(true)`: the peer closed its side. `Err`: the connection is broken.
fn read_some(mut stream: &TcpStream, buf: &mut Vec<u8>) -> Result<bool, ()> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; READ_CHUNK]);
    }
    // Edge-triggered: read until the socket is empty (a short read says so), or past what
    // any request may be (framing then refuses it).
    SCRATCH.with_borrow_mut(|scratch| {
        loop {
            match stream.read(scratch) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    buf.extend_from_slice(&scratch[..n]);
                    if n < scratch.len() || buf.len() > MAX_BODY + http::MAX_HEAD {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(_) => return Err(()),
            }
        }
    })
}

/// Sends as much of `out` as the socket takes now; removes what was sent.
fn write_some(mut stream: &TcpStream, out: &mut Vec<u8>) -> Result<(), ()> {
    let mut sent = 0;
    while sent < out.len() {
        match stream.write(&out[sent..]) {
            Ok(0) => return Err(()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => return Err(()),
        }
    }
    out.drain(..sent);
    Ok(())
}
