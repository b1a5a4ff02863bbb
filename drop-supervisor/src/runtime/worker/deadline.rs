//! Request deadlines without a system call on the hot path: a caller stores its deadline in the
//! worker's slot (one atomic store) before writing the request and clears it after the reply;
//! one scanner thread looks at every busy slot every few milliseconds and kills the process
//! group of any worker past its deadline. The caller's blocking read then ends (EOF) and it
//! reports a timeout. Precision is the scan period.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::process::kill_group;

/// How often busy workers are checked.
pub const SCAN_PERIOD: Duration = Duration::from_millis(5);

/// The part of a worker the scanner watches.
#[derive(Debug)]
pub struct Watch {
    pub pid: u32,
    /// Nanoseconds since the scanner's epoch; 0 when no request is in flight.
    deadline: AtomicU64,
    /// Set when the scanner killed the worker for a passed deadline.
    timed_out: AtomicBool,
}

impl Watch {
    pub fn new(pid: u32) -> Arc<Watch> {
        let watch = Arc::new(Watch {
            pid,
            deadline: AtomicU64::new(0),
            timed_out: AtomicBool::new(false),
        });
        scanner().register(&watch);
        watch
    }

    pub fn arm(&self, deadline: Instant) {
        let ns = u64::try_from(
            deadline
                .saturating_duration_since(scanner().epoch)
                .as_nanos(),
        )
        .unwrap_or(u64::MAX);
        self.deadline.store(ns.max(1), Ordering::Release);
    }

    pub fn disarm(&self) {
        self.deadline.store(0, Ordering::Release);
    }

    pub fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
struct Scanner {
    epoch: Instant,
    watches: Mutex<Vec<Weak<Watch>>>,
}

impl Scanner {
    fn register(&self, watch: &Arc<Watch>) {
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        w.push(Arc::downgrade(watch));
    }

    fn scan(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        watches.retain(|weak| {
            let Some(watch) = weak.upgrade() else {
                return false;
            };
            let deadline = watch.deadline.load(Ordering::Acquire);
            if deadline != 0 && now > deadline && !watch.timed_out.swap(true, Ordering::AcqRel) {
                kill_group(watch.pid);
            }
            true
        });
    }
}

fn scanner() -> &'static Scanner {
    static SCANNER: OnceLock<&'static Scanner> = OnceLock::new();
    SCANNER.get_or_init(|| {
        let s: &'static Scanner = Box::leak(Box::new(Scanner {
            epoch: Instant::now(),
            watches: Mutex::new(Vec::new()),
        }));
        std::thread::Builder::new()
            .name("drop-deadlines".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(SCAN_PERIOD);
                    s.scan();
                }
            })
            .expect("cannot start the deadline scanner thread");
        s
    })
}
