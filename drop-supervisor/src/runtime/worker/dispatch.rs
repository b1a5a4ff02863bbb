//! Fire-and-forget deliveries (`cast`, `cast_all`, subscription events): a bounded queue served
//! by a few threads that do the blocking pool calls. A full queue refuses at once — deliveries
//! never pile up without bound, also in a subscription loop such as ping ↔ pong.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use tracing::debug;

use super::pool::Pool;

#[derive(Debug)]
pub enum Job {
    /// One worker of the pool.
    One { pool: Pool, payload: Vec<u8> },
    /// Every worker of the pool.
    All { pool: Pool, payload: Vec<u8> },
}

#[derive(Debug, Clone)]
pub struct Dispatcher {
    tx: SyncSender<Job>,
}

/// The queue is full: the delivery was dropped (and counted as rejected on its pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("delivery queue full")]
pub struct Full;

impl Dispatcher {
    pub fn new(threads: usize, capacity: usize) -> Dispatcher {
        let (tx, rx) = sync_channel::<Job>(capacity);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("drop-cast-{i}"))
                .spawn(move || serve(&rx))
                .expect("cannot start a delivery thread");
        }
        Dispatcher { tx }
    }

    pub fn submit(&self, job: Job) -> Result<(), Full> {
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                let (Job::One { pool, .. } | Job::All { pool, .. }) = &job;
                pool.count_rejected();
                Err(Full)
            }
        }
    }
}

fn serve(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        match job {
            Job::One { pool, payload } => {
                if let Err(e) = pool.call(&payload) {
                    debug!(pool = %pool.name(), error = %e, "cast failed");
                }
            }
            Job::All { pool, payload } => {
                for result in pool.call_all(&payload) {
                    if let Err(e) = result {
                        debug!(pool = %pool.name(), error = %e, "cast_all delivery failed");
                    }
                }
            }
        }
    }
}
