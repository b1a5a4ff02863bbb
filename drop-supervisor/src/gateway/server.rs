//! The gateway's connections: one epoll shard per CPU the process may run on, one polling
//! thread at a time in each, no thread per connection.
//!
//! Connections are registered edge-triggered, once. A connection is `busy` from the moment a
//! request is framed until its answer is out; only then is the next one read, so answers keep
//! the order of requests. The thread that got the event reads and frames one request and hands
//! it to the gateway with a [`Responder`]; an event for a busy connection is remembered and
//! raised again when its answer is out. The answer may be written by any thread — the poller
//! itself, or a pool executor that ran a queued request. A request that waits for a worker
//! holds no thread at all, and answering re-arms nothing: the common request costs no
//! `epoll_ctl`.
//!
//! Connections are spread over the shards round robin as they are accepted. In each shard one
//! thread, the leader, waits in `epoll_wait` and handles its batch; the others stand by.
//! Work that may block (a request run at once on an idle worker, a call forwarded to another
//! node) runs on the leader itself, which keeps its turn: on one core a request then costs the
//! worker's round trip and nothing else, no wake-up of another thread. The leader publishes the
//! rest of its batch first; a standby thread, ticking every [`TICK`] while the leader runs
//! something, takes the turn and that rest over once the leader has run for [`TAKEOVER`], so a
//! slow function delays other connections by a few milliseconds at most, once. The old leader
//! stands by when its request is done. A standby thread that sees nothing run for a second
//! sleeps until it is woken; standby threads beyond one end after [`POLLER_IDLE`].
//!
//! A response that does not fit the socket's buffer is finished by the leader (`EPOLLOUT`);
//! bytes of a pipelined next request stay buffered and are served after the answer is out.
//! Connections idle for [`IDLE_TIMEOUT`] are closed.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::error::ApiError;
use crate::http::{self, Request};

/// Requests are refused past this body size before any pool is looked at.
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Connections served at once; more get `503 busy`.
pub const MAX_CONNECTIONS: usize = 1024;
/// A keep-alive connection idle this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A leader that has run one request (or forwarded call) this long loses its turn to a
/// standby thread.
pub const TAKEOVER: Duration = Duration::from_millis(2);
/// How often a standby thread looks at a leader that runs something.
pub const TICK: Duration = Duration::from_millis(2);
/// Ticks without the leader running anything before a standby thread sleeps untimed.
const QUIET_TICKS: u32 = 500;
/// A standby thread beyond the first that waited this long ends.
pub const POLLER_IDLE: Duration = Duration::from_secs(10);
/// At most this many gateway threads (each one past the first two is running a request).
const MAX_POLLERS: usize = MAX_CONNECTIONS + 2;
const LISTENER: u64 = 0;
const WAKE: u64 = 1;
const BATCH: usize = 32;
/// At most this many shards, whatever the CPU count.
const MAX_SHARDS: usize = 16;
const CONN_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
const READ_CHUNK: usize = 16 * 1024;

/// What the gateway does with a request. `before_blocking` must be called before anything
/// that may block the calling thread.
pub trait Serve: Send + Sync + 'static {
    fn serve(&self, req: Request, responder: Responder, before_blocking: &mut dyn FnMut());
}

/// The shards, the connections and the listener, shared by every thread.
struct Shared {
    shards: Vec<Shard>,
    wake: OwnedFd,
    listener: Mutex<Option<TcpListener>>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    stopping: AtomicBool,
    /// Milliseconds since `epoch` of the last idle-connection sweep.
    last_sweep: AtomicU64,
    epoch: Instant,
    serve: Box<dyn Serve>,
}

/// One epoll set with its own leader: connections are spread over one shard per CPU this
/// process may run on, so each CPU has a thread that reads requests and runs them.
struct Shard {
    epoll: OwnedFd,
    /// Who polls; standby threads wait on `turn_cv`.
    turn: Mutex<Turn>,
    turn_cv: Condvar,
}

/// The leader and the standby threads of a shard.
struct Turn {
    /// A leader holds the turn.
    taken: bool,
    /// Bumped by every takeover: a leader whose epoch is gone has lost the turn.
    epoch: u64,
    /// Since when the leader runs something (`None` while it polls).
    running_since: Option<Instant>,
    /// The leader's batch not yet handled, published while it runs something.
    rest: Vec<libc::epoll_event>,
    /// Threads standing by, and how many of them sleep without a timeout.
    standby: usize,
    sleeping: usize,
    threads: usize,
}

struct Conn {
    id: u64,
    /// The shard whose epoll set watches it.
    shard: usize,
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
            .field("shards", &self.shared.shards.len())
            .finish()
    }
}

fn os_err(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl Server {
    /// Serves `listener`: per shard, a leader and a thread standing by to begin with.
    pub fn start(listener: TcpListener, serve: Box<dyn Serve>) -> std::io::Result<Server> {
        listener.set_nonblocking(true)?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = (0..cpus.clamp(1, MAX_SHARDS))
            .map(|_| Shard::new())
            .collect::<std::io::Result<Vec<_>>>()?;
        // SAFETY: plain system call; the returned descriptor is checked and owned at once.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(os_err("eventfd"));
        }
        // SAFETY: `wake` is a fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let shared = Arc::new(Shared {
            shards,
            wake,
            listener: Mutex::new(None),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(2),
            stopping: AtomicBool::new(false),
            last_sweep: AtomicU64::new(0),
            epoch: Instant::now(),
            serve,
        });
        // The wake descriptor is level-triggered and never read: once written, every poller
        // sees it. The first shard accepts.
        for shard in &shared.shards {
            shard.ctl(
                libc::EPOLL_CTL_ADD,
                shared.wake.as_raw_fd(),
                libc::EPOLLIN as u32,
                WAKE,
            )?;
        }
        shared.shards[0].ctl(
            libc::EPOLL_CTL_ADD,
            listener.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
            LISTENER,
        )?;
        *lock(&shared.listener) = Some(listener);
        // Per shard, a leader and one thread standing by.
        for i in 0..shared.shards.len() {
            for _ in 0..2 {
                let spawned = Shared::spawn_poller(&shared, i, &mut lock(&shared.shards[i].turn));
                if let Err(e) = spawned {
                    shared.stop();
                    return Err(e);
                }
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

impl Shard {
    fn new() -> std::io::Result<Shard> {
        // SAFETY: plain system call; the returned descriptor is checked and owned at once.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(os_err("epoll_create1"));
        }
        Ok(Shard {
            // SAFETY: `epoll` is a fresh descriptor nobody else owns.
            epoll: unsafe { OwnedFd::from_raw_fd(epoll) },
            turn: Mutex::new(Turn {
                taken: false,
                epoch: 0,
                running_since: None,
                rest: Vec::new(),
                standby: 0,
                sleeping: 0,
                threads: 0,
            }),
            turn_cv: Condvar::new(),
        })
    }

    fn ctl(&self, op: i32, fd: RawFd, events: u32, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` lives across the call; the kernel copies it.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(os_err("epoll_ctl"));
        }
        Ok(())
    }
}

impl Shared {
    /// Raises a connection's event again if it is readable or writable now (a modification
    /// re-checks readiness), for work that no new edge would announce.
    fn retrigger(&self, conn: &Conn) {
        if let Err(e) = self.shards[conn.shard].ctl(
            libc::EPOLL_CTL_MOD,
            conn.stream.as_raw_fd(),
            CONN_EVENTS,
            conn.id,
        ) {
            debug!(error = %e, "cannot re-arm a gateway connection");
        }
    }

    fn spawn_poller(shared: &Arc<Shared>, shard: usize, turn: &mut Turn) -> std::io::Result<()> {
        let me = shared.clone();
        std::thread::Builder::new()
            .name("drop-gw-poll".into())
            .stack_size(256 * 1024)
            .spawn(move || me.poll_loop(shard))?;
        turn.threads += 1;
        Ok(())
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
            let _ = self.shards[0].ctl(libc::EPOLL_CTL_DEL, listener.as_raw_fd(), 0, LISTENER);
        }
        for shard in &self.shards {
            drop(lock(&shard.turn));
            shard.turn_cv.notify_all();
        }
        let conns: Vec<Arc<Conn>> = lock(&self.conns).values().cloned().collect();
        for conn in conns {
            let st = conn.lock();
            if !st.busy && st.out.is_empty() {
                self.close(&conn, st);
            }
        }
    }

    fn poll_loop(self: Arc<Self>, shard: usize) {
        let sh = &self.shards[shard];
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        // Each round: wait for the turn, then lead until the turn is lost or the server stops.
        while let Some((epoch, rest)) = self.wait_turn(shard) {
            if !self.handle_batch(shard, &rest, epoch) {
                continue;
            }
            loop {
                if self.stopping.load(Ordering::Acquire) {
                    let mut turn = lock(&sh.turn);
                    turn.taken = false;
                    turn.threads -= 1;
                    drop(turn);
                    sh.turn_cv.notify_all();
                    return;
                }
                // SAFETY: `events` outlives the call and holds BATCH entries.
                let n = unsafe {
                    libc::epoll_wait(
                        sh.epoll.as_raw_fd(),
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
                if !self.handle_batch(shard, &events[..n as usize], epoch) {
                    break;
                }
            }
        }
    }

    /// Handles a batch as the leader of `epoch`. False when the turn was taken over while a
    /// request ran: the rest of the batch is the new leader's.
    fn handle_batch(
        self: &Arc<Self>,
        shard: usize,
        batch: &[libc::epoll_event],
        epoch: u64,
    ) -> bool {
        for (i, ev) in batch.iter().enumerate() {
            match ev.u64 {
                WAKE => {}
                LISTENER => self.accept_all(),
                id => {
                    if !self.on_ready(shard, id, &batch[i + 1..], epoch) {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Waits until this thread leads: the turn is free, or the leader has run something for
    /// [`TAKEOVER`] (then its unhandled events come along). `None`: the thread ends (the server
    /// stops, or it is a spare standby that waited [`POLLER_IDLE`]).
    fn wait_turn(&self, shard: usize) -> Option<(u64, Vec<libc::epoll_event>)> {
        let sh = &self.shards[shard];
        let mut turn = lock(&sh.turn);
        let waiting_since = Instant::now();
        let mut quiet = 0;
        loop {
            if self.stopping.load(Ordering::Acquire) {
                turn.threads -= 1;
                return None;
            }
            if !turn.taken {
                turn.taken = true;
                return Some((turn.epoch, Vec::new()));
            }
            if turn.running_since.is_some_and(|t| t.elapsed() >= TAKEOVER) {
                turn.epoch += 1;
                turn.running_since = None;
                let rest = std::mem::take(&mut turn.rest);
                debug!(
                    events = rest.len(),
                    "gateway: a request runs long; another thread polls"
                );
                return Some((turn.epoch, rest));
            }
            if turn.standby > 0 && waiting_since.elapsed() >= POLLER_IDLE {
                turn.threads -= 1;
                return None;
            }
            turn.standby += 1;
            if turn.running_since.is_some() || quiet < QUIET_TICKS {
                turn = sh
                    .turn_cv
                    .wait_timeout(turn, TICK)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                quiet = if turn.running_since.is_some() {
                    0
                } else {
                    quiet + 1
                };
            } else {
                turn.sleeping += 1;
                turn = sh
                    .turn_cv
                    .wait_timeout(turn, POLLER_IDLE)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                turn.sleeping -= 1;
                quiet = 0;
            }
            turn.standby -= 1;
        }
    }

    /// The leader is about to run something that may block: publishes the rest of its batch
    /// for a takeover and makes sure a thread stands by to watch.
    fn start_running(self: &Arc<Self>, shard: usize, rest: &[libc::epoll_event]) {
        let sh = &self.shards[shard];
        let mut turn = lock(&sh.turn);
        turn.running_since = Some(Instant::now());
        turn.rest.clear();
        turn.rest.extend_from_slice(rest);
        if turn.sleeping > 0 {
            sh.turn_cv.notify_one();
        } else if turn.standby == 0
            && turn.threads < MAX_POLLERS
            && !self.stopping.load(Ordering::Acquire)
            && let Err(e) = Shared::spawn_poller(self, shard, &mut turn)
        {
            warn!(error = %e, "cannot start a gateway thread");
        }
    }

    /// The leader's request is done. False when its turn was taken over meanwhile.
    fn stop_running(&self, shard: usize, epoch: u64) -> bool {
        let mut turn = lock(&self.shards[shard].turn);
        if turn.epoch != epoch {
            return false;
        }
        turn.running_since = None;
        turn.rest.clear();
        true
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
        let _ = self.shards[0].ctl(
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
            let err = busy_error();
            let _ = (&stream).write_all(&http::encode_json_response(
                err.status,
                &err.to_json(),
                true,
            ));
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Round robin over the shards.
        let shard = (id as usize) % self.shards.len();
        let conn = Arc::new(Conn {
            id,
            shard,
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
        if let Err(e) = self.shards[shard].ctl(
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

    /// One ready connection, handled by the leader of `epoch`. False when the turn was taken
    /// over while its request ran.
    fn on_ready(
        self: &Arc<Self>,
        shard: usize,
        id: u64,
        rest: &[libc::epoll_event],
        epoch: u64,
    ) -> bool {
        let Some(conn) = lock(&self.conns).get(&id).cloned() else {
            return true;
        };
        let mut st = conn.lock();
        if st.closed {
            return true;
        }
        if st.busy {
            st.missed = true;
            return true;
        }
        if !st.out.is_empty() {
            // The rest of an answer: send it, then serve what is buffered.
            self.after_output(&conn, st);
            return true;
        }
        let eof = match read_some(&conn.stream, &mut st.buf) {
            Ok(eof) => eof,
            Err(()) => {
                self.close(&conn, st);
                return true;
            }
        };
        let req = match http::take_request(&mut st.buf, MAX_BODY) {
            Ok(Some(req)) => req,
            Ok(None) => {
                st.last_active = Instant::now();
                if eof {
                    self.close(&conn, st);
                }
                return true;
            }
            Err(e) => {
                debug!(error = %e, "malformed gateway request");
                st.busy = true;
                drop(st);
                let body = ApiError::from(&e).to_json();
                let out = http::encode_json_response(e.status(), &body, true);
                self.responder(conn).respond(out, true);
                return true;
            }
        };
        st.busy = true;
        drop(st);
        let mut running = false;
        let mut before_blocking = || {
            if !running {
                running = true;
                self.start_running(shard, rest);
            }
        };
        self.serve
            .serve(req, self.responder(conn), &mut before_blocking);
        !running || self.stop_running(shard, epoch)
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
        let _ =
            self.shards[conn.shard].ctl(libc::EPOLL_CTL_DEL, conn.stream.as_raw_fd(), 0, conn.id);
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

/// The answer to a connection past [`MAX_CONNECTIONS`] (either server), before it is closed.
pub(super) fn busy_error() -> ApiError {
    ApiError::new(
        503,
        "busy",
        format!("more than {MAX_CONNECTIONS} gateway connections"),
    )
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
