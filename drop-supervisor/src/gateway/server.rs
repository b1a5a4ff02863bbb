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
//! Within the [`Limits`]: a connection slot per accepted connection (global and per client
//! address, `503 busy` beyond), a request head must be complete within `head_timeout` of its
//! first byte and its body within `body_timeout` of the head (`408` and close), a body is
//! checked against its target's limit and the body budget as soon as its head is read (`413`,
//! `503 busy`), and no more is read from a socket than the request being read can need.
//! Connections idle for `idle_timeout` are closed.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::limits::{Admission, BodyTicket, ConnTicket, Limits};
use crate::error::ApiError;
use crate::http::{self, HttpError, Request};

/// A leader that has run one request (or forwarded call) this long loses its turn to a
/// standby thread.
pub const TAKEOVER: Duration = Duration::from_millis(2);
/// How often a standby thread looks at a leader that runs something.
pub const TICK: Duration = Duration::from_millis(2);
/// Ticks without the leader running anything before a standby thread sleeps untimed.
const QUIET_TICKS: u32 = 500;
/// A standby thread beyond the first that waited this long ends.
pub const POLLER_IDLE: Duration = Duration::from_secs(10);
const LISTENER: u64 = 0;
const WAKE: u64 = 1;
const BATCH: usize = 32;
/// At most this many shards, whatever the CPU count.
const MAX_SHARDS: usize = 16;
const CONN_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
const READ_CHUNK: usize = 16 * 1024;
/// How long a refused client's remaining bytes are read away before its connection closes.
const LINGER: Duration = Duration::from_secs(2);

/// What the gateway does with a request. `before_blocking` must be called before anything
/// that may block the calling thread.
pub trait Serve: Send + Sync + 'static {
    fn serve(&self, req: Request, responder: Responder, before_blocking: &mut dyn FnMut());
    /// The largest body `req` (its head read, its body not yet) may carry; a longer one is
    /// refused from its `Content-Length`, before any of it is buffered.
    fn body_limit(&self, req: &Request) -> usize;
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
    /// Connection slots (global and per client address) and the body budget.
    admission: Arc<Admission>,
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
    /// When the first byte of the request being read arrived (for the head deadline).
    started: Option<Instant>,
    /// A request whose head is read and whose body is still arriving.
    pending: Option<Pending>,
    /// The connection's slot; given back when it closes.
    ticket: Option<ConnTicket>,
    /// Response bytes not yet sent.
    out: Vec<u8>,
    /// A request is being answered: nothing more is read until its answer is out.
    busy: bool,
    /// An event came while busy: raise it again once the answer is out.
    missed: bool,
    /// Close once `out` is sent.
    close_after: bool,
    /// After the answer, read and discard what the client still sends (a refused body) instead
    /// of closing at once: closing with unread bytes resets the connection, and the client
    /// could lose the answer.
    linger: bool,
    /// Until when a refused client's bytes are discarded before the connection closes.
    draining: Option<Instant>,
    closed: bool,
    /// Last time a request was read or an answer finished (for the idle timeout).
    last_active: Instant,
}

/// A request between its head and the end of its body.
struct Pending {
    req: Request,
    /// Bytes of `buf` the head takes.
    head_len: usize,
    content_length: usize,
    /// When the head was complete (for the body deadline).
    since: Instant,
    /// Room in the body budget, held until the body is complete.
    _budget: Option<BodyTicket>,
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

/// A running server; [`Server::stop`] ends it. Clones share it.
#[derive(Clone)]
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
    /// Serves `listener` within `limits`: per shard, a leader and a thread standing by to begin
    /// with.
    pub fn start(
        listener: TcpListener,
        serve: Box<dyn Serve>,
        limits: Limits,
    ) -> std::io::Result<Server> {
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
            admission: Admission::new(limits),
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

    /// Takes no new connection: the ones already queued are taken and served first, then the
    /// listening socket closes, so a new caller is refused (not reset) and goes elsewhere. Open
    /// connections are served as before.
    pub fn pause_accepting(&self) {
        let Some(listener) = lock(&self.shared.listener).take() else {
            return;
        };
        let _ = self.shared.shards[0].ctl(libc::EPOLL_CTL_DEL, listener.as_raw_fd(), 0, LISTENER);
        loop {
            match listener.accept() {
                Ok((stream, peer)) => self.shared.register(stream, peer.ip()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// Connections with a request being read or served (idle keep-alive ones not counted).
    pub fn connections_at_work(&self) -> usize {
        let conns: Vec<Arc<Conn>> = lock(&self.shared.conns).values().cloned().collect();
        conns
            .iter()
            .filter(|c| {
                let st = c.lock();
                st.busy || !st.buf.is_empty() || !st.out.is_empty()
            })
            .count()
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
            // Each thread past the first two of a shard is running a request: at most one
            // per connection.
            && turn.threads < self.admission.limits().max_connections + 2
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
                Ok((stream, peer)) => self.register(stream, peer.ip()),
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

    fn register(self: &Arc<Self>, stream: TcpStream, client: std::net::IpAddr) {
        let _ = stream.set_nodelay(true);
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let mut conns = lock(&self.conns);
        let ticket = match self.admission.open(client) {
            Ok(ticket) => ticket,
            Err(err) => {
                drop(conns);
                // Answered without reading the request: reading is the work the cap refuses.
                let _ = (&stream).write_all(&http::encode_json_response(
                    err.status,
                    &err.to_json(),
                    true,
                ));
                return;
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Round robin over the shards.
        let shard = (id as usize) % self.shards.len();
        let conn = Arc::new(Conn {
            id,
            shard,
            stream,
            st: Mutex::new(ConnState {
                buf: Vec::new(),
                started: None,
                pending: None,
                ticket: Some(ticket),
                out: Vec::new(),
                busy: false,
                missed: false,
                close_after: false,
                linger: false,
                draining: None,
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
        if st.draining.is_some() {
            // A refused client still sending: discard until it is done (or the sweep ends it).
            // At most 1 MiB per event, so one client cannot keep the leader busy; the rest on
            // the next event (re-raised below, as no new edge may come).
            for _ in 0..64 {
                st.buf.clear();
                match read_some(&conn.stream, &mut st.buf, READ_CHUNK) {
                    Ok((false, true)) => {}
                    Ok((false, false)) => {
                        st.buf.clear();
                        return true;
                    }
                    _ => {
                        self.close(&conn, st);
                        return true;
                    }
                }
            }
            st.buf.clear();
            drop(st);
            self.retrigger(&conn);
            return true;
        }
        // Read no further than the request being read can need: its head, then its head and
        // announced body (checked against the limits in between). What stays in the socket
        // is read once this request is answered.
        let framed = loop {
            // (One byte past the head limit, so that a head over it is seen at once.)
            let cap = st
                .pending
                .as_ref()
                .map_or(http::MAX_HEAD + 1, |p| p.head_len + p.content_length);
            let (eof, full) = match read_some(&conn.stream, &mut st.buf, cap) {
                Ok(r) => r,
                Err(()) => {
                    self.close(&conn, st);
                    return true;
                }
            };
            if st.started.is_none() && !st.buf.is_empty() {
                st.started = Some(Instant::now());
            }
            match self.frame(&mut st) {
                // The cap stopped the read before the socket was empty: the rest is a
                // pipelined request, read after this answer (no new edge will announce it).
                Ok(Some(req)) => {
                    st.missed |= full;
                    break Ok(req);
                }
                // The head just completed (the cap grows to the body): read on.
                Ok(None) if full && !eof => {}
                Ok(None) => {
                    st.last_active = Instant::now();
                    if eof {
                        self.close(&conn, st);
                    }
                    return true;
                }
                Err(err) => break Err(err),
            }
        };
        let req = match framed {
            Ok(req) => req,
            Err(err) => {
                // The stream is out of step (or the request refused before its body): answer,
                // then close.
                debug!(error = %err, "gateway request refused");
                st.busy = true;
                st.linger = true;
                drop(st);
                let out = http::encode_json_response(err.status, &err.to_json(), true);
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

    /// The next complete request off `st.buf`, `None` while more bytes are needed, or the
    /// error to answer. A head is checked as soon as it is complete: a body longer than the
    /// target allows (413) or than the body budget has room for (503 busy) is refused before
    /// any of it is buffered.
    fn frame(&self, st: &mut ConnState) -> Result<Option<Request>, ApiError> {
        if st.pending.is_none() {
            let Some((head_len, req, content_length)) =
                http::parse_head(&st.buf).map_err(|e| ApiError::from(&e))?
            else {
                if st.buf.len() > http::MAX_HEAD {
                    return Err(ApiError::from(&HttpError::HeadTooLarge));
                }
                return Ok(None);
            };
            let limits = self.admission.limits();
            let limit = if content_length == 0 {
                0
            } else {
                self.serve.body_limit(&req).min(limits.max_body)
            };
            if content_length > limit as u64 {
                return Err(ApiError::new(
                    413,
                    "payload_too_large",
                    format!(
                        "request body of {content_length} bytes is larger than the limit of \
                         {limit} bytes for {}",
                        req.path
                    ),
                ));
            }
            let content_length = content_length as usize;
            let budget = if content_length > 0 {
                Some(self.admission.reserve_body(content_length)?)
            } else {
                None
            };
            st.pending = Some(Pending {
                req,
                head_len,
                content_length,
                since: Instant::now(),
                _budget: budget,
            });
        }
        let p = st.pending.as_ref().expect("set above");
        let total = p.head_len + p.content_length;
        if st.buf.len() < total {
            return Ok(None);
        }
        let Pending {
            mut req, head_len, ..
        } = st.pending.take().expect("set above");
        req.body = st.buf[head_len..total].to_vec();
        st.buf.drain(..total);
        st.started = None;
        Ok(Some(req))
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
            if st.linger && st.draining.is_none() {
                // The answer is out; tell the client we are done and discard what it still
                // sends for a moment, so that it reads the answer instead of a reset.
                let _ = conn.stream.shutdown(Shutdown::Write);
                st.draining = Some(Instant::now() + LINGER);
                st.buf = Vec::new();
                drop(st);
                self.retrigger(conn);
                return;
            }
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
        st.pending = None;
        st.ticket = None;
        drop(st);
        let _ =
            self.shards[conn.shard].ctl(libc::EPOLL_CTL_DEL, conn.stream.as_raw_fd(), 0, conn.id);
        let _ = conn.stream.shutdown(Shutdown::Both);
        lock(&self.conns).remove(&conn.id);
    }

    /// At most once a second: answers `408` to a request whose head or body is late and closes
    /// connections idle for too long. The deadlines are for the whole head (from its first
    /// byte) and the whole body (from the end of the head), so trickling bytes buys nothing.
    fn sweep_idle(self: &Arc<Self>) {
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
        let limits = self.admission.limits();
        let conns: Vec<Arc<Conn>> = lock(&self.conns).values().cloned().collect();
        for conn in conns {
            // A connection another thread is handling is not idle.
            let Ok(mut st) = conn.st.try_lock() else {
                continue;
            };
            if st.busy || !st.out.is_empty() || st.closed {
                continue;
            }
            if st.draining.is_some_and(|until| Instant::now() >= until) {
                self.close(&conn, st);
                continue;
            }
            if st.draining.is_some() {
                continue;
            }
            let late = match (&st.pending, st.started) {
                (Some(p), _) if p.since.elapsed() >= limits.body_timeout => Some(format!(
                    "the request body did not arrive within {} s",
                    limits.body_timeout.as_secs_f64()
                )),
                (None, Some(t)) if t.elapsed() >= limits.head_timeout => Some(format!(
                    "the request head did not arrive within {} s",
                    limits.head_timeout.as_secs_f64()
                )),
                _ => None,
            };
            if let Some(why) = late {
                st.busy = true;
                st.pending = None;
                drop(st);
                let err = ApiError::new(408, "timeout", why);
                let out = http::encode_json_response(err.status, &err.to_json(), true);
                self.responder(conn).respond(out, true);
            } else if st.pending.is_none()
                && st.started.is_none()
                && st.last_active.elapsed() >= limits.idle_timeout
            {
                self.close(&conn, st);
            }
        }
    }
}

/// Reads into `buf` until the socket is empty or `buf` holds `cap` bytes. `Ok((eof, full))`:
/// the peer closed its side; `cap` was reached (more may wait in the socket). `Err`: the
/// connection is broken.
fn read_some(mut stream: &TcpStream, buf: &mut Vec<u8>, cap: usize) -> Result<(bool, bool), ()> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; READ_CHUNK]);
    }
    // Edge-triggered: read until the socket is empty (a short read says so) or the cap.
    SCRATCH.with_borrow_mut(|scratch| {
        loop {
            let room = cap.saturating_sub(buf.len()).min(scratch.len());
            if room == 0 {
                return Ok((false, true));
            }
            match stream.read(&mut scratch[..room]) {
                Ok(0) => return Ok((true, false)),
                Ok(n) => {
                    buf.extend_from_slice(&scratch[..n]);
                    if n < room {
                        return Ok((false, false));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok((false, false)),
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
