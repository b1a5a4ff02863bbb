//! A pool: an elastic set of worker processes of one function, with a bounded queue.
//!
//! The hot path (`call`) runs on the caller's own thread: it takes an idle worker, writes the
//! request line and reads the reply line through blocking pipes, and puts the worker back. No
//! request is handed to another thread, because on these machines every hop between cores costs
//! about 25 µs. Everything slow — starting, restarting with backoff, growing and shrinking —
//! happens in the pool's manager task on the tokio runtime.
//!
//! A caller that must not wait (the gateway's event loop) uses [`Pool::submit`] instead: with an
//! idle worker it runs the request at once, as `call` does; otherwise the request joins the same
//! bounded queue as a job without a thread, and the pool's executor threads (at most one per
//! worker) run queued jobs as workers free up and answer each through its callback. A job whose
//! deadline passes while it waits is answered with a timeout by an executor.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::deadline::Watch;
use super::process::{self, Launch, kill_group, readable_bytes};
use super::protocol::{LineBuffer, LineLimit, decode_line, encode_async, encode_line, split_async};
use super::stats::{PoolStats, StatsSnapshot};
use crate::error::ApiError;
use crate::runtime::flow::Mode;

thread_local! {
    /// (pool, worker id) this thread called last.
    static LAST_WORKER: std::cell::Cell<(usize, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Restart policy of a pool's workers.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    /// Backoff before the second restart in a row (the first is immediate); doubles up to `max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A worker that ran this long without failing resets the backoff.
    pub reset_after: Duration,
    /// More than `intensity` restarts within `period` put the pool in the `failed` state.
    pub intensity: u32,
    pub period: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
            intensity: 5,
            period: Duration::from_secs(60),
        }
    }
}

/// How a pool is run; built from a flow's pool spec.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    /// sync: one request per worker at a time; async: `<id>::` framed, up to `concurrency` in
    /// flight per worker; stream: no requests, every output line is an event.
    pub mode: Mode,
    /// Requests in flight per async worker.
    pub concurrency: u32,
    /// argv, environment, cwd, credentials, cgroup placement of every worker.
    pub launch: Launch,
    pub min: u32,
    pub max: u32,
    /// Waiting requests beyond which callers get `Overloaded` at once.
    pub queue: u32,
    pub timeout: Duration,
    pub line_max: usize,
    pub restart: RestartPolicy,
    /// Grow when more than this many requests wait per worker.
    pub grow_threshold: u32,
    /// Shrink toward `min` after the pool had idle workers for this long.
    pub idle_shrink_after: Duration,
    /// Result cache for pure functions: replies kept for `ttl`, at most `size` of them.
    pub cache: Option<(Duration, usize)>,
    /// Each worker in its own cgroup `<group>/w<id>` inside the pool's group: a worker that
    /// ends for any reason (timeout, crash, retirement) takes every process it started with it.
    pub cgroups: Option<WorkerCgroups>,
    /// How the gateway frames requests for this pool: the original DROP's JSON envelope
    /// (`gateway::envelope`). The pool itself only carries it.
    pub envelope: bool,
}

/// Where a pool's workers get their own cgroups.
#[derive(Debug, Clone)]
pub struct WorkerCgroups {
    pub cgroups: Arc<dyn crate::runtime::cgroup::Cgroups>,
    /// The pool's group (already created, with the pool's limits).
    pub group: String,
}

impl WorkerCgroups {
    fn worker(&self, id: u64) -> String {
        format!("{}/w{id}", self.group)
    }
}

/// Kills and removes a worker's cgroup (off the async threads: killing waits until it is empty).
fn clean_worker_cgroup(cfg: &PoolConfig, id: u64) {
    let Some(wc) = cfg.cgroups.clone() else {
        return;
    };
    let pool = cfg.name.clone();
    tokio::task::spawn_blocking(move || {
        let name = wc.worker(id);
        if let Err(e) = wc
            .cgroups
            .kill_all(&name)
            .and_then(|()| wc.cgroups.remove(&name))
        {
            warn!(%pool, worker = id, error = %e, "cannot clean up the worker's cgroup");
        }
    });
}

/// Replies keyed by request payload, with a time to live and a size bound (oldest entries go
/// first).
#[derive(Debug)]
struct ReplyCache {
    ttl: Duration,
    size: usize,
    entries: HashMap<Vec<u8>, (Vec<u8>, Instant)>,
    order: VecDeque<Vec<u8>>,
}

impl ReplyCache {
    fn new(ttl: Duration, size: usize) -> ReplyCache {
        ReplyCache {
            ttl,
            size: size.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&mut self, key: &[u8], now: Instant) -> Option<Vec<u8>> {
        match self.entries.get(key) {
            Some((reply, at)) if now.duration_since(*at) < self.ttl => Some(reply.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&mut self, key: &[u8], reply: &[u8], now: Instant) {
        if self
            .entries
            .insert(key.to_vec(), (reply.to_vec(), now))
            .is_none()
        {
            self.order.push_back(key.to_vec());
        }
        while self.entries.len() > self.size {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        // Keys removed on expiry may still sit in `order`; keep it from growing without bound.
        if self.order.len() > 2 * self.size {
            let entries = &self.entries;
            self.order.retain(|k| entries.contains_key(k));
        }
    }
}

/// Why a call failed. Each maps to one gateway answer (DESIGN.md §5).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Queue full: 429.
    #[error("pool {0} is overloaded (queue full)")]
    Overloaded(String),
    /// Deadline passed, waiting or in the worker: 504.
    #[error("pool {0}: request timed out")]
    Timeout(String),
    /// The worker died, printed out of step or too long a line: 503.
    #[error("pool {pool}: worker failed: {reason}")]
    Worker { pool: String, reason: String },
    /// The pool is failed or stopping: 503.
    #[error("pool {pool} is unavailable: {reason}")]
    Unavailable { pool: String, reason: String },
    /// The payload is longer than the pool's line limit: 413.
    #[error("payload of {len} bytes exceeds the line limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
}

/// A call error as the edges answer it: each has its own status.
impl From<&CallError> for ApiError {
    fn from(err: &CallError) -> ApiError {
        let msg = err.to_string();
        match err {
            CallError::Overloaded(_) => ApiError::new(429, "overloaded", msg),
            CallError::Timeout(_) => ApiError::new(504, "timeout", msg),
            CallError::Worker { .. } => ApiError::new(503, "worker_error", msg),
            CallError::Unavailable { .. } => ApiError::new(503, "unavailable", msg),
            CallError::TooLarge { .. } => ApiError::new(413, "payload_too_large", msg),
        }
    }
}

/// Lifecycle of a pool as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum Phase {
    Running,
    /// Too many restarts in the restart period; no more restarts until the flow is applied again.
    Failed(String),
    Stopped,
}

/// Where a submitted request's answer goes: called exactly once, on whichever thread ran it.
pub type Done = Box<dyn FnOnce(Result<Vec<u8>, CallError>) + Send>;

/// A submitted request waiting for a worker, with no thread waiting for it.
struct Job {
    payload: Vec<u8>,
    started: Instant,
    deadline: Instant,
    done: Done,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("len", &self.payload.len())
            .field("deadline", &self.deadline)
            .finish()
    }
}

/// An executor with nothing to do for this long ends.
const EXECUTOR_IDLE: Duration = Duration::from_secs(10);

/// One worker as the pool sees it.
#[derive(Debug)]
struct Slot {
    id: u64,
    pid: u32,
    started: Instant,
    watch: Arc<Watch>,
    /// Taken by exactly one caller at a time (the one that took the slot from `idle`).
    io: Mutex<Io>,
    /// Retired: never handed out again; its process is being killed.
    retired: AtomicBool,
    /// Async: requests in flight, and where their replies go.
    inflight: AtomicU32,
    pending: Mutex<Pending>,
}

/// Async requests in flight on one worker: id → where the reply goes.
type Pending = HashMap<u64, SyncSender<Result<Vec<u8>, CallError>>>;

fn lock_pending(slot: &Slot) -> MutexGuard<'_, Pending> {
    slot.pending.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct Io {
    stdin: File,
    /// `None` for async and stream workers: their reader thread owns stdout.
    stdout: Option<File>,
    lines: LineBuffer,
    out: Vec<u8>,
}

#[derive(Debug)]
struct State {
    idle: Vec<Arc<Slot>>,
    /// Every live worker by id.
    workers: HashMap<u64, Arc<Slot>>,
    /// Workers being started (counted toward the size).
    starting: u32,
    waiting: u32,
    /// Of those, cast_all deliveries waiting for one particular worker.
    waiting_specific: u32,
    /// Submitted requests waiting for a worker, oldest first (they count toward the queue).
    jobs: VecDeque<Job>,
    /// Threads running queued jobs, and how many of them wait for work.
    executors: u32,
    idle_executors: u32,
    phase: Phase,
    /// When the pool last had no idle worker (for shrinking).
    last_busy: Instant,
}

impl State {
    /// Requests waiting for a worker: blocked callers and queued jobs.
    fn queued(&self) -> u32 {
        self.waiting
            .saturating_add(u32::try_from(self.jobs.len()).unwrap_or(u32::MAX))
    }

    /// An idle worker is free for a queued job: blocked callers (other than `cast_all`
    /// deliveries waiting for one particular worker) are served first.
    fn free_for_job(&self) -> bool {
        self.idle.len() > (self.waiting - self.waiting_specific) as usize
    }
}

#[derive(Debug)]
struct Inner {
    config: PoolConfig,
    state: Mutex<State>,
    freed: Condvar,
    /// Executors wait here for a job and a free worker.
    work: Condvar,
    stats: PoolStats,
    events: mpsc::UnboundedSender<Event>,
    next_id: AtomicU64,
    /// Ids of async requests.
    next_request: AtomicU64,
    /// Current size limits (`dropctl pool scale` changes them at run time).
    min: AtomicU32,
    max: AtomicU32,
    cache: Option<Mutex<ReplyCache>>,
    /// Receives every reply (the pool's output lines) for subscribers.
    output: std::sync::RwLock<Option<HookSlot>>,
}

/// Holds the output hook (closures have no `Debug`).
#[derive(Clone)]
struct HookSlot(OutputHook);

impl std::fmt::Debug for HookSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputHook")
    }
}

/// Called with every output line of a pool (replies, stream events).
pub type OutputHook = Arc<dyn Fn(&[u8]) + Send + Sync>;

#[derive(Debug)]
enum Event {
    /// A worker process ended (`expected`: retired by the pool).
    Exited {
        id: u64,
        status: String,
    },
    /// A worker could not be started at all.
    StartFailed {
        id: u64,
        reason: String,
    },
    /// Callers are waiting: consider growing.
    Pressure,
    /// Size limits changed: start workers up to `min`.
    Scale,
    Stop,
}

/// Handle to a running pool; cheap to clone.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// What `dropctl pool show` prints.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PoolStatus {
    pub name: String,
    pub phase: Phase,
    pub workers: u32,
    pub idle: u32,
    pub busy: u32,
    pub starting: u32,
    pub queue_depth: u32,
    pub min: u32,
    pub max: u32,
    pub pids: Vec<u32>,
    pub stats: StatsSnapshot,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    /// Starts the pool's manager on the current tokio runtime; `min` workers are started at once.
    pub fn start(
        config: PoolConfig,
        stderr: Arc<dyn Fn() -> std::io::Result<OwnedFd> + Send + Sync>,
    ) -> Pool {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                idle: Vec::new(),
                workers: HashMap::new(),
                starting: 0,
                waiting: 0,
                waiting_specific: 0,
                jobs: VecDeque::new(),
                executors: 0,
                idle_executors: 0,
                phase: Phase::Running,
                last_busy: Instant::now(),
            }),
            freed: Condvar::new(),
            work: Condvar::new(),
            stats: PoolStats::default(),
            events: tx,
            next_id: AtomicU64::new(1),
            next_request: AtomicU64::new(1),
            min: AtomicU32::new(config.min),
            max: AtomicU32::new(config.max),
            cache: config
                .cache
                .map(|(ttl, size)| Mutex::new(ReplyCache::new(ttl, size))),
            output: std::sync::RwLock::new(None),
            config,
        });
        let pool = Pool { inner };
        tokio::spawn(manage(pool.clone(), rx, stderr));
        pool
    }

    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// Sends `payload` to one worker and waits for its reply (blocking: call from a thread that
    /// may block, never from an async task).
    pub fn call(&self, payload: &[u8]) -> Result<Vec<u8>, CallError> {
        let started = Instant::now();
        if let Some(answer) = self.answer_early(payload, started) {
            return answer;
        }
        let cfg = &self.inner.config;
        let deadline = started + cfg.timeout;
        let result = self.running(|| match cfg.mode {
            Mode::Sync => self.call_until(payload, deadline),
            Mode::Async => self.call_async(payload, deadline),
            Mode::Stream => Err(CallError::Unavailable {
                pool: self.name().into(),
                reason: "a stream pool takes no requests; subscribe to it".into(),
            }),
        });
        self.finish(payload, started, result)
    }

    /// Runs `f` counted in the `running` number.
    fn running<T>(&self, f: impl FnOnce() -> T) -> T {
        let running = &self.inner.stats.running;
        running.fetch_add(1, Relaxed);
        let out = f();
        running.fetch_sub(1, Relaxed);
        out
    }

    /// Runs `payload` like [`Pool::call`] without making the caller wait for a worker; the
    /// answer goes to `done`, exactly once. With an idle worker (and nothing queued before it)
    /// the request runs at once on this thread, which first calls `before_blocking` — the
    /// function may be slow. Otherwise it is queued, or refused with `Overloaded` when the
    /// queue is full, and an executor runs it when a worker frees up. Async pools run it at
    /// once on this thread (after `before_blocking`), as `call` does.
    pub fn submit(&self, payload: Vec<u8>, done: Done, before_blocking: &mut dyn FnMut()) {
        let started = Instant::now();
        if let Some(answer) = self.answer_early(&payload, started) {
            return done(answer);
        }
        let cfg = &self.inner.config;
        if cfg.mode != Mode::Sync {
            before_blocking();
            return done(self.call(&payload));
        }
        let deadline = started + cfg.timeout;
        let mut st = lock(&self.inner.state);
        if let Err(e) = self.check_running(&st) {
            drop(st);
            return done(self.finish(&payload, started, Err(e)));
        }
        if st.jobs.is_empty()
            && st.free_for_job()
            && let Some(slot) = self.take_idle(&mut st)
        {
            drop(st);
            before_blocking();
            let result = self.running(|| match self.run_on(slot, &payload, deadline) {
                Ran::Done(result) => result,
                // The worker was out of step and nothing was sent: wait like a caller.
                Ran::Retry => self.call_until(&payload, deadline),
            });
            return done(self.finish(&payload, started, result));
        }
        if st.queued() >= cfg.queue {
            drop(st);
            return done(self.finish(
                &payload,
                started,
                Err(CallError::Overloaded(self.name().into())),
            ));
        }
        let first = st.jobs.is_empty();
        st.jobs.push_back(Job {
            payload,
            started,
            deadline,
            done,
        });
        st.last_busy = started;
        self.kick(&mut st);
        drop(st);
        if first {
            let _ = self.inner.events.send(Event::Pressure);
        }
    }

    /// Answers that need no worker: a payload over the line limit, or a cached reply.
    fn answer_early(&self, payload: &[u8], started: Instant) -> Option<Result<Vec<u8>, CallError>> {
        let cfg = &self.inner.config;
        // +1: the newline; the token expansion is checked on the encoded line later.
        if payload.len() + 1 > cfg.line_max {
            return Some(Err(CallError::TooLarge {
                len: payload.len(),
                max: cfg.line_max,
            }));
        }
        let cache = self.inner.cache.as_ref()?;
        let hit = cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(payload, started)?;
        let stats = &self.inner.stats;
        stats.cache_hits.fetch_add(1, Relaxed);
        stats.ok.fetch_add(1, Relaxed);
        stats.observe(started.elapsed());
        self.publish(&hit);
        Some(Ok(hit))
    }

    /// Counts a finished request, caches and publishes its reply; returns it unchanged.
    fn finish(
        &self,
        payload: &[u8],
        started: Instant,
        result: Result<Vec<u8>, CallError>,
    ) -> Result<Vec<u8>, CallError> {
        let stats = &self.inner.stats;
        match &result {
            Ok(reply) => {
                stats.ok.fetch_add(1, Relaxed);
                stats.observe(started.elapsed());
                if let Some(cache) = &self.inner.cache {
                    cache.lock().unwrap_or_else(|e| e.into_inner()).put(
                        payload,
                        reply,
                        Instant::now(),
                    );
                }
                self.publish(reply);
            }
            Err(CallError::Overloaded(_)) => {
                stats.rejected.fetch_add(1, Relaxed);
            }
            Err(CallError::Timeout(_)) => {
                stats.timeout.fetch_add(1, Relaxed);
                stats.observe(started.elapsed());
            }
            Err(_) => {
                stats.error.fetch_add(1, Relaxed);
            }
        }
        result
    }

    /// `Unavailable` unless the pool is running.
    fn check_running(&self, st: &State) -> Result<(), CallError> {
        let reason = match &st.phase {
            Phase::Running => return Ok(()),
            Phase::Failed(reason) => format!("failed: {reason}"),
            Phase::Stopped => "stopped".to_string(),
        };
        Err(CallError::Unavailable {
            pool: self.name().into(),
            reason,
        })
    }

    /// Makes sure queued jobs will run: wakes a waiting executor, or starts one while there are
    /// fewer executors than workers (at least one, which also answers jobs whose deadline
    /// passes while no worker is left).
    fn kick(&self, st: &mut State) {
        if st.jobs.is_empty() {
            return;
        }
        if st.idle_executors > 0 {
            self.inner.work.notify_one();
            return;
        }
        let limit = (u32::try_from(st.workers.len()).unwrap_or(u32::MAX) + st.starting).max(1);
        if st.executors >= limit {
            return;
        }
        st.executors += 1;
        let pool = self.clone();
        let spawned = std::thread::Builder::new()
            .name("drop-exec".into())
            .stack_size(256 * 1024)
            .spawn(move || pool.execute());
        if let Err(e) = spawned {
            st.executors -= 1;
            warn!(pool = %self.name(), error = %e, "cannot start an executor thread");
        }
    }

    /// An executor: runs queued jobs on free workers, oldest first, and answers jobs whose
    /// deadline passed while they waited. Ends when the pool stops (answering what is left)
    /// or after [`EXECUTOR_IDLE`] without work.
    fn execute(&self) {
        let inner = &self.inner;
        let mut st = lock(&inner.state);
        loop {
            if let Err(e) = self.check_running(&st) {
                let jobs: Vec<Job> = st.jobs.drain(..).collect();
                st.executors -= 1;
                drop(st);
                for job in jobs {
                    (job.done)(self.finish(&job.payload, job.started, Err(e.clone())));
                }
                return;
            }
            let now = Instant::now();
            if st.jobs.front().is_some_and(|j| j.deadline <= now) {
                let mut expired = Vec::new();
                while st.jobs.front().is_some_and(|j| j.deadline <= now) {
                    expired.extend(st.jobs.pop_front());
                }
                drop(st);
                for job in expired {
                    let timeout = Err(CallError::Timeout(self.name().into()));
                    (job.done)(self.finish(&job.payload, job.started, timeout));
                }
                st = lock(&inner.state);
                continue;
            }
            if !st.jobs.is_empty() && st.free_for_job() {
                let slot = self.take_idle(&mut st).expect("an idle worker");
                let job = st.jobs.pop_front().expect("a job");
                // More jobs and more free workers: another executor takes the next one.
                if st.free_for_job() {
                    self.kick(&mut st);
                }
                drop(st);
                match self.running(|| self.run_on(slot, &job.payload, job.deadline)) {
                    Ran::Done(result) => {
                        (job.done)(self.finish(&job.payload, job.started, result));
                        st = lock(&inner.state);
                    }
                    Ran::Retry => {
                        st = lock(&inner.state);
                        st.jobs.push_front(job);
                    }
                }
                continue;
            }
            // Nothing to run now: wait for a job or a free worker, at most until the oldest
            // job's deadline.
            let limit = st
                .jobs
                .front()
                .map_or(EXECUTOR_IDLE, |j| j.deadline.saturating_duration_since(now));
            st.idle_executors += 1;
            let (guard, waited) = inner
                .work
                .wait_timeout(st, limit)
                .unwrap_or_else(|e| e.into_inner());
            st = guard;
            st.idle_executors -= 1;
            if waited.timed_out() && st.jobs.is_empty() {
                st.executors -= 1;
                return;
            }
        }
    }

    /// Sets (or clears) the receiver of this pool's output lines.
    pub fn set_output(&self, hook: Option<OutputHook>) {
        *self.inner.output.write().unwrap_or_else(|e| e.into_inner()) = hook.map(HookSlot);
    }

    fn publish(&self, line: &[u8]) {
        let hook = self
            .inner
            .output
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(HookSlot(hook)) = hook {
            hook(line);
        }
    }

    /// Counts a delivery refused before it reached the pool (full delivery queue).
    pub fn count_rejected(&self) {
        self.inner.stats.rejected.fetch_add(1, Relaxed);
    }

    /// Sends `payload` to every current worker (`cast_all`), one after another; each result
    /// in worker order.
    pub fn call_all(&self, payload: &[u8]) -> Vec<Result<Vec<u8>, CallError>> {
        // A pool still starting has not got its workers yet: wait (up to its timeout) until it
        // has its minimum size, so that "every worker" is not an empty set by accident.
        let deadline = Instant::now() + self.inner.config.timeout;
        let ids: Vec<u64> = {
            let mut st = lock(&self.inner.state);
            let want = self.inner.min.load(Relaxed).max(1) as usize;
            while st.phase == Phase::Running && st.workers.len() < want {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                st = self.wait_freed(st, deadline - now);
            }
            let mut ids: Vec<u64> = st.workers.keys().copied().collect();
            ids.sort_unstable();
            ids
        };
        if ids.is_empty() {
            self.inner.stats.error.fetch_add(1, Relaxed);
            return vec![Err(CallError::Unavailable {
                pool: self.name().into(),
                reason: "no workers".into(),
            })];
        }
        if self.inner.config.mode == Mode::Async {
            let workers: Vec<Arc<Slot>> = {
                let st = lock(&self.inner.state);
                ids.iter()
                    .filter_map(|id| st.workers.get(id).cloned())
                    .collect()
            };
            return workers
                .iter()
                .map(|slot| {
                    let deadline = Instant::now() + self.inner.config.timeout;
                    slot.inflight.fetch_add(1, Relaxed);
                    let r = self.call_async_on(slot, payload, deadline);
                    self.release_async(slot);
                    if let Ok(reply) = &r {
                        self.inner.stats.ok.fetch_add(1, Relaxed);
                        self.publish(reply);
                    }
                    r
                })
                .collect();
        }
        ids.into_iter()
            .map(|id| {
                let started = Instant::now();
                let deadline = started + self.inner.config.timeout;
                let slot = self.acquire_worker(id, deadline)?;
                let result = match self.exchange(&slot, payload, deadline) {
                    Ok((reply, clean)) => {
                        if clean {
                            self.release(slot);
                        } else {
                            self.retire(&slot, "printed more than one line for one request");
                        }
                        Ok(reply)
                    }
                    Err(Exchange::StaleOutput) => {
                        self.retire(&slot, "printed a line with no request in flight");
                        Err(CallError::Worker {
                            pool: self.name().into(),
                            reason: "out of step".into(),
                        })
                    }
                    Err(Exchange::Failed(e)) => {
                        self.retire(&slot, "failed during cast_all");
                        Err(e)
                    }
                };
                if let Ok(reply) = &result {
                    self.inner.stats.ok.fetch_add(1, Relaxed);
                    self.inner.stats.observe(started.elapsed());
                    self.publish(reply);
                }
                result
            })
            .collect()
    }

    /// Takes the worker `id` once it is idle.
    fn acquire_worker(&self, id: u64, deadline: Instant) -> Result<Arc<Slot>, CallError> {
        let mut st = lock(&self.inner.state);
        loop {
            if st.phase != Phase::Running {
                return Err(CallError::Unavailable {
                    pool: self.name().into(),
                    reason: "not running".into(),
                });
            }
            if let Some(i) = st.idle.iter().position(|s| s.id == id) {
                return Ok(st.idle.swap_remove(i));
            }
            if !st.workers.contains_key(&id) {
                return Err(CallError::Worker {
                    pool: self.name().into(),
                    reason: format!("worker {id} is gone"),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                // A wake-up meant for a waiter must not die with this one: pass it on.
                if st.waiting > 0 {
                    self.inner.freed.notify_one();
                }
                return Err(CallError::Timeout(self.name().into()));
            }
            st.waiting += 1;
            st.waiting_specific += 1;
            st = self.wait_freed(st, deadline - now);
            st.waiting -= 1;
            st.waiting_specific -= 1;
        }
    }

    /// Takes the async worker with the fewest requests in flight below `concurrency`.
    fn acquire_async(&self, deadline: Instant) -> Result<Arc<Slot>, CallError> {
        let limit = self.inner.config.concurrency.max(1);
        self.wait_for_worker(deadline, |st| {
            let slot = st
                .workers
                .values()
                .filter(|s| !s.retired.load(Relaxed) && s.inflight.load(Relaxed) < limit)
                .min_by_key(|s| s.inflight.load(Relaxed))
                .cloned()?;
            slot.inflight.fetch_add(1, Relaxed);
            st.last_busy = Instant::now();
            Some(slot)
        })
    }

    fn release_async(&self, slot: &Slot) {
        slot.inflight.fetch_sub(1, Relaxed);
        let st = lock(&self.inner.state);
        let (waiting, specific) = (st.waiting > 0, st.waiting_specific > 0);
        drop(st);
        if specific {
            self.inner.freed.notify_all();
        } else if waiting {
            self.inner.freed.notify_one();
        }
    }

    /// One request on an async worker: `<id>::payload` out, `<id>::reply` back, in any order.
    fn call_async(&self, payload: &[u8], deadline: Instant) -> Result<Vec<u8>, CallError> {
        let slot = self.acquire_async(deadline)?;
        let result = self.call_async_on(&slot, payload, deadline);
        self.release_async(&slot);
        result
    }

    fn call_async_on(
        &self,
        slot: &Slot,
        payload: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, CallError> {
        let id = self.inner.next_request.fetch_add(1, Relaxed);
        let (tx, rx) = sync_channel(1);
        lock_pending(slot).insert(id, tx);
        let written = {
            let mut io = slot.io.lock().unwrap_or_else(|e| e.into_inner());
            let io = &mut *io;
            io.out.clear();
            encode_async(id, payload, &mut io.out);
            if io.out.len() > io.lines.max() {
                Err(CallError::TooLarge {
                    len: payload.len(),
                    max: io.lines.max(),
                })
            } else {
                io.stdin.write_all(&io.out).map_err(|e| CallError::Worker {
                    pool: self.name().into(),
                    reason: format!("writing the request: {e}"),
                })
            }
        };
        if let Err(e) = written {
            lock_pending(slot).remove(&id);
            return Err(e);
        }
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                // The worker keeps its other requests; a late reply to this one is dropped.
                lock_pending(slot).remove(&id);
                Err(CallError::Timeout(self.name().into()))
            }
            Err(RecvTimeoutError::Disconnected) => Err(CallError::Worker {
                pool: self.name().into(),
                reason: "worker exited".into(),
            }),
        }
    }

    fn call_until(&self, payload: &[u8], deadline: Instant) -> Result<Vec<u8>, CallError> {
        loop {
            let slot = self.acquire(deadline)?;
            if let Ran::Done(result) = self.run_on(slot, payload, deadline) {
                return result;
            }
        }
    }

    /// One request on a worker taken from `idle`; puts the worker back or retires it.
    fn run_on(&self, slot: Arc<Slot>, payload: &[u8], deadline: Instant) -> Ran {
        match self.exchange(&slot, payload, deadline) {
            Ok((reply, clean)) => {
                if clean {
                    self.release(slot);
                } else {
                    self.inner.stats.out_of_step.fetch_add(1, Relaxed);
                    self.retire(&slot, "printed more than one line for one request");
                }
                Ran::Done(Ok(reply))
            }
            Err(Exchange::StaleOutput) => {
                // Output nobody asked for: this worker is out of step. Nothing was sent, so
                // the request is safe to give to another worker.
                self.inner.stats.out_of_step.fetch_add(1, Relaxed);
                self.retire(&slot, "printed a line with no request in flight");
                Ran::Retry
            }
            Err(Exchange::Failed(err)) => {
                if matches!(err, CallError::Worker { .. }) && slot.watch.timed_out() {
                    self.retire(&slot, "timed out");
                    return Ran::Done(Err(CallError::Timeout(self.name().to_string())));
                }
                if let CallError::Worker { reason, .. } = &err {
                    if reason.contains("line") {
                        self.inner.stats.out_of_step.fetch_add(1, Relaxed);
                    }
                    self.retire(&slot, reason);
                }
                Ran::Done(Err(err))
            }
        }
    }

    /// Takes an idle sync worker, preferring the one this thread used last: the two then stay
    /// on one core, as a caller and its worker do in the floor benchmark; a different worker
    /// each time costs a wake-up on the other core (~25 µs) per request.
    fn acquire(&self, deadline: Instant) -> Result<Arc<Slot>, CallError> {
        self.wait_for_worker(deadline, |st| self.take_idle(st))
    }

    fn take_idle(&self, st: &mut State) -> Option<Arc<Slot>> {
        let preferred = LAST_WORKER.with(|last| {
            let (pool, id) = last.get();
            (pool == self.key()).then_some(id)
        });
        let pick = preferred.and_then(|id| st.idle.iter().rposition(|s| s.id == id));
        let slot = match pick {
            Some(i) => st.idle.swap_remove(i),
            None => st.idle.pop()?,
        };
        if st.idle.is_empty() {
            st.last_busy = Instant::now();
        }
        LAST_WORKER.with(|last| last.set((self.key(), slot.id)));
        Some(slot)
    }

    /// The waiting part every acquisition shares: `pick` takes a worker from the state if one
    /// is free; otherwise the caller waits in the bounded queue until `deadline`, or gets
    /// `Overloaded` at once when the queue is full.
    fn wait_for_worker(
        &self,
        deadline: Instant,
        mut pick: impl FnMut(&mut State) -> Option<Arc<Slot>>,
    ) -> Result<Arc<Slot>, CallError> {
        let inner = &self.inner;
        let mut st = lock(&inner.state);
        let mut signalled = false;
        loop {
            self.check_running(&st)?;
            if let Some(slot) = pick(&mut st) {
                return Ok(slot);
            }
            if st.queued() >= inner.config.queue {
                return Err(CallError::Overloaded(self.name().into()));
            }
            let now = Instant::now();
            if now >= deadline {
                // A wake-up meant for a waiter must not die with this one: pass it on.
                if st.waiting > 0 {
                    inner.freed.notify_one();
                }
                return Err(CallError::Timeout(self.name().into()));
            }
            if !signalled {
                let _ = inner.events.send(Event::Pressure);
                signalled = true;
            }
            st.waiting += 1;
            st.last_busy = now;
            st = self.wait_freed(st, deadline - now);
            st.waiting -= 1;
        }
    }

    fn release(&self, slot: Arc<Slot>) {
        let mut st = lock(&self.inner.state);
        if slot.retired.load(Relaxed) || st.phase == Phase::Stopped {
            return;
        }
        // Scaled down while this request ran: the worker goes now that its request is done.
        if st.workers.len() as u32 > self.inner.max.load(Relaxed) {
            drop(st);
            slot.retired.store(true, Relaxed);
            // The shrink notice goes first: the exit that follows the kill must not look like a crash.
            let _ = self.inner.events.send(Event::Exited {
                id: slot.id,
                status: SHRINK.into(),
            });
            kill_group(slot.pid);
            return;
        }
        st.idle.push(slot);
        let (waiting, specific) = (st.waiting > 0, st.waiting_specific > 0);
        if st.free_for_job() {
            self.kick(&mut st);
        }
        drop(st);
        // One waiter takes the freed worker; waking them all would be a thundering herd (64
        // connection threads on 2 workers). Only a cast_all waiting for this particular worker
        // needs everyone to look.
        if specific {
            self.inner.freed.notify_all();
        } else if waiting {
            self.inner.freed.notify_one();
        }
    }

    /// Sleeps until a worker may have become free (or `limit` passes); the caller re-checks.
    fn wait_freed<'a>(&self, st: MutexGuard<'a, State>, limit: Duration) -> MutexGuard<'a, State> {
        self.inner
            .freed
            .wait_timeout(st, limit)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// Identifies this pool in the thread-local worker preference.
    fn key(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    fn retire(&self, slot: &Slot, reason: &str) {
        if !slot.retired.swap(true, Relaxed) {
            debug!(pool = %self.name(), worker = slot.id, pid = slot.pid, reason, "retiring worker");
            kill_group(slot.pid);
        }
    }

    /// One request/reply on `slot`. `Ok((reply, clean))`: `clean` is false when the worker
    /// printed more than the one reply line.
    fn exchange(
        &self,
        slot: &Slot,
        payload: &[u8],
        deadline: Instant,
    ) -> Result<(Vec<u8>, bool), Exchange> {
        let pool = self.name();
        let failed = |reason: String| {
            Exchange::Failed(CallError::Worker {
                pool: pool.to_string(),
                reason,
            })
        };
        let mut io = slot.io.lock().unwrap_or_else(|e| e.into_inner());
        let io = &mut *io;
        let Some(stdout) = io.stdout.as_ref() else {
            return Err(Exchange::Failed(CallError::Unavailable {
                pool: pool.into(),
                reason: "not a sync worker".into(),
            }));
        };
        if io.lines.pending() > 0 || readable_bytes(stdout).unwrap_or(0) > 0 {
            return Err(Exchange::StaleOutput);
        }
        io.out.clear();
        encode_line(payload, &mut io.out);
        if io.out.len() > io.lines.max() {
            return Err(Exchange::Failed(CallError::TooLarge {
                len: payload.len(),
                max: io.lines.max(),
            }));
        }
        slot.watch.arm(deadline);
        let result = (|| {
            io.stdin
                .write_all(&io.out)
                .map_err(|e| failed(format!("writing the request: {e}")))?;
            loop {
                if let Some(line) = io.lines.next_line() {
                    let reply = decode_line(line);
                    return Ok((reply, io.lines.pending() == 0));
                }
                const CHUNK: usize = 16 * 1024;
                let spare = io.lines.spare(CHUNK);
                let Some(stdout) = io.stdout.as_mut() else {
                    return Err(failed("no stdout".into()));
                };
                let n = match stdout.read(spare) {
                    Ok(n) => n,
                    // A signal, not the end of the reply: read again.
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        io.lines.filled(CHUNK, 0);
                        return Err(failed(format!("reading the reply: {e}")));
                    }
                };
                if io.lines.filled(CHUNK, n) == LineLimit::Exceeded {
                    return Err(failed(format!(
                        "reply line longer than {} bytes",
                        io.lines.max()
                    )));
                }
                if n == 0 {
                    return Err(failed("exited before replying".into()));
                }
            }
        })();
        slot.watch.disarm();
        result
    }

    /// Changes the size limits at run time. Requests in flight are never dropped: surplus idle
    /// workers stop now, busy ones when their request is done; the manager starts workers up to
    /// the new `min`.
    pub fn scale(&self, min: u32, max: u32) -> Result<(), String> {
        if max == 0 || min > max {
            return Err(format!(
                "need 0 <= min <= max and max >= 1, got min {min}, max {max}"
            ));
        }
        self.inner.min.store(min, Relaxed);
        self.inner.max.store(max, Relaxed);
        let surplus: Vec<Arc<Slot>> = {
            let mut st = lock(&self.inner.state);
            let excess = (st.workers.len() as u32).saturating_sub(max) as usize;
            let take = excess.min(st.idle.len());
            st.idle.drain(..take).collect()
        };
        for slot in surplus {
            slot.retired.store(true, Relaxed);
            let _ = self.inner.events.send(Event::Exited {
                id: slot.id,
                status: SHRINK.into(),
            });
            kill_group(slot.pid);
        }
        let _ = self.inner.events.send(Event::Scale);
        Ok(())
    }

    /// Live numbers and sizes.
    pub fn status(&self) -> PoolStatus {
        let st = lock(&self.inner.state);
        let workers = u32::try_from(st.workers.len()).unwrap_or(u32::MAX);
        let idle = u32::try_from(st.idle.len()).unwrap_or(u32::MAX);
        let mut pids: Vec<u32> = st.workers.values().map(|s| s.pid).collect();
        pids.sort_unstable();
        PoolStatus {
            name: self.name().to_string(),
            phase: st.phase.clone(),
            workers,
            idle,
            busy: workers.saturating_sub(idle),
            starting: st.starting,
            queue_depth: st.queued(),
            min: self.inner.min.load(Relaxed),
            max: self.inner.max.load(Relaxed),
            pids,
            stats: self.inner.stats.snapshot(),
        }
    }

    /// Stops the pool: no new calls, every worker killed. Returns at once; the manager finishes
    /// the work. Calls in progress fail.
    pub fn stop(&self) {
        let mut st = lock(&self.inner.state);
        st.phase = Phase::Stopped;
        st.idle.clear();
        for slot in st.workers.values() {
            slot.retired.store(true, Relaxed);
            kill_group(slot.pid);
        }
        drop(st);
        self.inner.freed.notify_all();
        self.inner.work.notify_all();
        let _ = self.inner.events.send(Event::Stop);
    }

    fn is_empty(&self) -> bool {
        let st = lock(&self.inner.state);
        st.workers.is_empty() && st.starting == 0
    }

    /// Waits (async) until every worker of a stopped pool has exited, at most `limit`.
    pub async fn stopped(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            if self.is_empty() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

enum Exchange {
    StaleOutput,
    Failed(CallError),
}

/// How a request on one worker ended: answered, or to be tried on another worker.
enum Ran {
    Done(Result<Vec<u8>, CallError>),
    Retry,
}

/// Restart bookkeeping of the manager.
#[derive(Debug, Default)]
struct Restarts {
    /// Failures in a row (reset by a worker that ran `reset_after`).
    consecutive: u32,
    /// Times of recent restarts, for the intensity limit.
    recent: VecDeque<Instant>,
}

impl Restarts {
    /// Records a failure of a worker that ran `ran`; returns the delay before its replacement,
    /// or `None` when the restart intensity is exceeded.
    fn on_failure(
        &mut self,
        policy: &RestartPolicy,
        ran: Duration,
        now: Instant,
    ) -> Option<Duration> {
        if ran >= policy.reset_after {
            self.consecutive = 0;
        }
        self.consecutive += 1;
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.period)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        if self.recent.len() > policy.intensity as usize {
            return None;
        }
        Some(backoff(policy, self.consecutive))
    }
}

/// The delay before the `n`-th restart in a row: none for the first, then `initial` doubling up
/// to `max`.
pub fn backoff(policy: &RestartPolicy, n: u32) -> Duration {
    if n <= 1 {
        return Duration::ZERO;
    }
    let factor = 1u32.checked_shl(n - 2).unwrap_or(u32::MAX);
    policy
        .backoff_initial
        .saturating_mul(factor)
        .min(policy.backoff_max)
}

/// Status of a worker stopped by shrinking (not a failure).
const SHRINK: &str = "shrink";

type StderrFactory = Arc<dyn Fn() -> std::io::Result<OwnedFd> + Send + Sync>;

async fn manage(pool: Pool, mut events: mpsc::UnboundedReceiver<Event>, stderr: StderrFactory) {
    let inner = &pool.inner;
    let cfg = &inner.config;
    let mut restarts = Restarts::default();
    let mut pending_restarts: u32 = 0;
    let (respawn_tx, mut respawn_rx) = mpsc::unbounded_channel::<()>();
    for _ in 0..inner.min.load(Relaxed) {
        spawn_worker(&pool, &stderr);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            event = events.recv() => match event {
                None | Some(Event::Stop) => {
                    if lock(&inner.state).phase == Phase::Stopped {
                        drain_until_empty(&pool, &mut events).await;
                        return;
                    }
                }
                Some(Event::Pressure) => grow(&pool, &stderr, pending_restarts),
                Some(Event::Scale) => {
                    let size = { let st = lock(&inner.state); st.workers.len() as u32 + st.starting } + pending_restarts;
                    for _ in size..inner.min.load(Relaxed) {
                        spawn_worker(&pool, &stderr);
                    }
                }
                Some(ev @ (Event::Exited { .. } | Event::StartFailed { .. })) => {
                    let (id, status, ran) = match ev {
                        Event::Exited { id, status } => {
                            let (slot, phase) = {
                                let mut st = lock(&inner.state);
                                let slot = st.workers.remove(&id);
                                st.idle.retain(|s| s.id != id);
                                (slot, st.phase.clone())
                            };
                            let Some(slot) = slot else { continue };
                            // Whatever the worker left running in its group goes with it.
                            clean_worker_cgroup(cfg, id);
                            if phase != Phase::Running || status == SHRINK {
                                continue;
                            }
                            (id, status, slot.started.elapsed())
                        }
                        Event::StartFailed { id, reason } => {
                            clean_worker_cgroup(cfg, id);
                            (id, format!("failed to start: {reason}"), Duration::ZERO)
                        }
                        _ => continue,
                    };
                    if lock(&inner.state).phase != Phase::Running {
                        continue;
                    }
                    inner.stats.restarts.fetch_add(1, Relaxed);
                    match restarts.on_failure(&cfg.restart, ran, Instant::now()) {
                        Some(delay) => {
                            info!(pool = %cfg.name, worker = id, %status, ran_ms = ran.as_millis() as u64, delay_ms = delay.as_millis() as u64, "worker ended; restarting");
                            crate::events::record(
                                crate::events::Kind::Restart,
                                &cfg.name,
                                format!("worker {id} {status} after {} ms; restarting in {} ms", ran.as_millis(), delay.as_millis()),
                            );
                            pending_restarts += 1;
                            let tx = respawn_tx.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = tx.send(());
                            });
                        }
                        None => {
                            let reason = format!(
                                "more than {} restarts within {:?}; last: worker {id} {status}",
                                cfg.restart.intensity, cfg.restart.period
                            );
                            warn!(pool = %cfg.name, %reason, "pool failed");
                            crate::events::record(
                                crate::events::Kind::Failure,
                                &cfg.name,
                                format!("pool failed: {reason}"),
                            );
                            let mut st = lock(&inner.state);
                            st.phase = Phase::Failed(reason);
                            drop(st);
                            inner.freed.notify_all();
                            inner.work.notify_all();
                        }
                    }
                }
            },
            Some(()) = respawn_rx.recv() => {
                pending_restarts = pending_restarts.saturating_sub(1);
                let st = lock(&inner.state);
                let size = st.workers.len() as u32 + st.starting;
                let running = st.phase == Phase::Running;
                drop(st);
                // Replace up to `min`, or at least one worker while callers wait.
                let waiting = lock(&inner.state).queued();
                let (min, max) = (inner.min.load(Relaxed), inner.max.load(Relaxed));
                if running && (size < min || (waiting > 0 && size < max)) {
                    spawn_worker(&pool, &stderr);
                }
            },
            _ = tick.tick() => {
                grow(&pool, &stderr, pending_restarts);
                shrink(&pool);
            }
        }
    }
}

async fn drain_until_empty(pool: &Pool, events: &mut mpsc::UnboundedReceiver<Event>) {
    loop {
        if pool.is_empty() {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(Event::Exited { id, .. })) => {
                lock(&pool.inner.state).workers.remove(&id);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

fn grow(pool: &Pool, stderr: &StderrFactory, pending_restarts: u32) {
    let cfg = &pool.inner.config;
    let st = lock(&pool.inner.state);
    if st.phase != Phase::Running {
        return;
    }
    let size = st.workers.len() as u32 + st.starting + pending_restarts;
    let queued = st.queued();
    let want_more =
        queued > cfg.grow_threshold.saturating_mul(size.max(1)) || (size == 0 && queued > 0);
    drop(st);
    if want_more && size < pool.inner.max.load(Relaxed) {
        spawn_worker(pool, stderr);
    }
}

fn shrink(pool: &Pool) {
    let cfg = &pool.inner.config;
    let mut st = lock(&pool.inner.state);
    if st.phase != Phase::Running || st.last_busy.elapsed() < cfg.idle_shrink_after {
        return;
    }
    if st.workers.len() as u32 > pool.inner.min.load(Relaxed)
        && let Some(slot) = st.idle.first().cloned()
    {
        st.idle.remove(0);
        st.last_busy = Instant::now();
        drop(st);
        slot.retired.store(true, Relaxed);
        debug!(pool = %cfg.name, worker = slot.id, "shrinking: idle worker stopped");
        let _ = pool.inner.events.send(Event::Exited {
            id: slot.id,
            status: SHRINK.into(),
        });
        kill_group(slot.pid);
    }
}

fn spawn_worker(pool: &Pool, stderr: &StderrFactory) {
    let inner = &pool.inner;
    let cfg = &inner.config;
    let id = inner.next_id.fetch_add(1, Relaxed);
    {
        let mut st = lock(&inner.state);
        // A restart scheduled before the pool stopped must not start anything (nor re-create
        // the cgroup the stop just removed).
        if st.phase != Phase::Running {
            return;
        }
        st.starting += 1;
    }
    let mut launch = cfg.launch.clone();
    launch.env = process::environment(&cfg.name, id, &cfg.launch.env);
    if let Some(wc) = &cfg.cgroups {
        let name = wc.worker(id);
        let placed = wc
            .cgroups
            .create(&name, &crate::runtime::cgroup::Limits::default())
            .and_then(|()| wc.cgroups.attach_paths(&name));
        match placed {
            Ok(paths) => launch.cgroup_procs = paths,
            Err(e) => {
                lock(&inner.state).starting -= 1;
                let _ = inner.events.send(Event::StartFailed {
                    id,
                    reason: format!("worker cgroup: {e}"),
                });
                return;
            }
        }
    }
    let started = stderr()
        .map_err(|e| e.to_string())
        .and_then(|fd| process::spawn(&launch, fd).map_err(|e| format!("{e:#}")));
    let mut st = lock(&inner.state);
    st.starting -= 1;
    match started {
        Ok(p) => {
            let (sync_stdout, reader_stdout) = match cfg.mode {
                Mode::Sync => (Some(p.stdout), None),
                Mode::Async | Mode::Stream => (None, Some(p.stdout)),
            };
            let slot = Arc::new(Slot {
                id,
                pid: p.pid,
                started: Instant::now(),
                watch: Watch::new(p.pid),
                io: Mutex::new(Io {
                    stdin: p.stdin,
                    stdout: sync_stdout,
                    lines: LineBuffer::new(cfg.line_max),
                    out: Vec::new(),
                }),
                retired: AtomicBool::new(false),
                inflight: AtomicU32::new(0),
                pending: Mutex::new(HashMap::new()),
            });
            if st.phase != Phase::Running {
                kill_group(p.pid);
            } else {
                st.workers.insert(id, slot.clone());
                if cfg.mode == Mode::Sync {
                    st.idle.push(slot.clone());
                    pool.kick(&mut st);
                }
            }
            if let Some(stdout) = reader_stdout {
                let (pool, slot) = (pool.clone(), slot.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("drop-read-{id}"))
                    .stack_size(128 * 1024)
                    .spawn(move || match pool.inner.config.mode {
                        Mode::Stream => stream_reader(&pool, &slot, stdout),
                        _ => async_reader(&pool, &slot, stdout),
                    });
                if let Err(e) = spawned {
                    warn!(pool = %cfg.name, worker = id, error = %e, "cannot start a reader thread; stopping the worker");
                    kill_group(p.pid);
                }
            }
            drop(st);
            // All: an async worker can take several of the waiting callers at once.
            inner.freed.notify_all();
            let events = inner.events.clone();
            let mut child = p.child;
            tokio::spawn(async move {
                let status = match child.wait().await {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                };
                let _ = events.send(Event::Exited { id, status });
            });
        }
        Err(reason) => {
            drop(st);
            warn!(pool = %cfg.name, worker = id, %reason, "cannot start worker");
            // Counted like a crash, so that a command that can never start ends in `failed`.
            let _ = inner.events.send(Event::StartFailed { id, reason });
        }
    }
}

/// Reads an async worker's replies and hands each to the caller waiting for its id.
fn async_reader(pool: &Pool, slot: &Arc<Slot>, mut stdout: File) {
    let mut lines = LineBuffer::new(pool.inner.config.line_max);
    let reason = loop {
        const CHUNK: usize = 16 * 1024;
        let n = match stdout.read(lines.spare(CHUNK)) {
            Ok(0) | Err(_) => break "worker exited".to_string(),
            Ok(n) => n,
        };
        if lines.filled(CHUNK, n) == LineLimit::Exceeded {
            pool.inner.stats.out_of_step.fetch_add(1, Relaxed);
            pool.retire(slot, "reply line too long");
            break format!("reply line longer than {} bytes", lines.max());
        }
        let mut bad = None;
        while let Some(line) = lines.next_line() {
            match split_async(line) {
                Some((id, reply)) => {
                    let waiter = lock_pending(slot).remove(&id);
                    if let Some(tx) = waiter {
                        let _ = tx.send(Ok(decode_line(reply)));
                    }
                }
                None => {
                    bad = Some(String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned());
                    break;
                }
            }
        }
        if let Some(line) = bad {
            pool.inner.stats.out_of_step.fetch_add(1, Relaxed);
            pool.retire(slot, "async reply without an id");
            break format!("printed a line without `<id>::`: {line:?}");
        }
    };
    let waiters: Vec<_> = lock_pending(slot).drain().collect();
    for (_, tx) in waiters {
        let _ = tx.send(Err(CallError::Worker {
            pool: pool.name().into(),
            reason: reason.clone(),
        }));
    }
}

/// Reads a stream worker: every line is an event for subscribers. A worker silent for the
/// pool's timeout is killed by the deadline scanner (and restarted by the manager).
fn stream_reader(pool: &Pool, slot: &Arc<Slot>, mut stdout: File) {
    let cfg = &pool.inner.config;
    let mut lines = LineBuffer::new(cfg.line_max);
    loop {
        slot.watch.arm(Instant::now() + cfg.timeout);
        const CHUNK: usize = 16 * 1024;
        let n = match stdout.read(lines.spare(CHUNK)) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if lines.filled(CHUNK, n) == LineLimit::Exceeded {
            pool.inner.stats.out_of_step.fetch_add(1, Relaxed);
            pool.retire(slot, "event line too long");
            break;
        }
        while let Some(line) = lines.next_line() {
            let event = decode_line(line);
            pool.inner.stats.ok.fetch_add(1, Relaxed);
            pool.publish(&event);
        }
    }
    slot.watch.disarm();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_errors_map_to_distinct_statuses() {
        let cases = [
            (CallError::Overloaded("p".into()), 429),
            (CallError::Timeout("p".into()), 504),
            (
                CallError::Worker {
                    pool: "p".into(),
                    reason: "x".into(),
                },
                503,
            ),
            (
                CallError::Unavailable {
                    pool: "p".into(),
                    reason: "x".into(),
                },
                503,
            ),
            (CallError::TooLarge { len: 9, max: 1 }, 413),
        ];
        for (err, status) in cases {
            assert_eq!(ApiError::from(&err).status, status, "{err}");
        }
    }
}
