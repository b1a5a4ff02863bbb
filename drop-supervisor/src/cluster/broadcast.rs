//! Our side of memberlist's user broadcasts: which queued messages ride along in a gossip round.
//!
//! Each round memberlist asks the delegate for messages that fit in the space left in a UDP
//! packet. Gossip reaches every node with high probability after about `log(n)` rounds, so a
//! message is sent a bounded number of times ([`retransmit_limit`]) and then forgotten;
//! anti-entropy repairs whatever gossip missed. Messages sent the fewest times go first, so a
//! new update is never starved by old ones, and a newer message for the same key replaces the
//! queued one, since only the latest value of a key matters.
//!
//! The space offered varies: memberlist fills packets with its own messages first (a burst of
//! joins can leave a few dozen bytes), so a message that does not fit this round waits for the
//! next one. The caller never queues a message larger than a whole packet's room (such writes
//! go over TCP instead).
//!
//! Pure: no I/O, no clock.

use std::collections::HashMap;

/// How many times a message is gossiped in a cluster of `num_nodes`:
/// `mult * ceil(log10(num_nodes + 1))`, at least 1 when `mult > 0`.
pub fn retransmit_limit(mult: u32, num_nodes: usize) -> u32 {
    // ceil(log10(x)) is the smallest k with 10^k >= x.
    let x = num_nodes.saturating_add(1);
    let mut k = 0u32;
    let mut p = 1usize;
    while p < x {
        p = p.saturating_mul(10);
        k += 1;
    }
    mult.saturating_mul(k).max(u32::from(mult > 0))
}

#[derive(Debug)]
struct Entry {
    msg: Vec<u8>,
    transmits: u32,
    /// Queue order: a larger number is newer.
    seq: u64,
}

/// Messages waiting to be gossiped, at most one per key.
#[derive(Debug)]
pub struct BroadcastQueue {
    retransmit_mult: u32,
    entries: HashMap<String, Entry>,
    next_seq: u64,
}

impl BroadcastQueue {
    /// A queue whose messages are sent [`retransmit_limit`]`(retransmit_mult, n)` times each
    /// (once when `retransmit_mult` is 0).
    pub fn new(retransmit_mult: u32) -> Self {
        BroadcastQueue {
            retransmit_mult,
            entries: HashMap::new(),
            next_seq: 0,
        }
    }

    /// Queues `msg` under `key`, replacing (and restarting the count of) a message queued there.
    pub fn queue(&mut self, key: impl Into<String>, msg: Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(
            key.into(),
            Entry {
                msg,
                transmits: 0,
                seq,
            },
        );
    }

    /// The messages for one gossip round: fewest transmits first (older first among equals),
    /// each costing `len + overhead` of `limit`. A message that does not fit is skipped for this
    /// round; one that could never fit (`len + overhead > limit`) is dropped, for the caller to
    /// send over TCP instead. Messages that reach the retransmit limit for `num_nodes` leave.
    pub fn take(&mut self, num_nodes: usize, limit: usize, overhead: usize) -> Vec<Vec<u8>> {
        let max = retransmit_limit(self.retransmit_mult, num_nodes);

        let mut order: Vec<(&String, &Entry)> = self.entries.iter().collect();
        order.sort_by_key(|(_, e)| (e.transmits, e.seq));
        let mut used = 0usize;
        let mut sent = Vec::new();
        for (key, e) in order {
            let cost = e.msg.len() + overhead;
            if used.saturating_add(cost) <= limit {
                used += cost;
                sent.push(key.clone());
            }
        }

        let mut out = Vec::with_capacity(sent.len());
        for key in sent {
            let Some(e) = self.entries.get_mut(&key) else {
                continue;
            };
            e.transmits += 1;
            if e.transmits >= max {
                out.extend(self.entries.remove(&key).map(|e| e.msg));
            } else {
                out.push(e.msg.clone());
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, len: usize) -> Vec<u8> {
        vec![tag; len]
    }

    #[test]
    fn retransmit_limit_grows_with_log10_of_the_cluster() {
        assert_eq!(retransmit_limit(4, 0), 1);
        assert_eq!(retransmit_limit(4, 1), 4);
        assert_eq!(retransmit_limit(4, 9), 4);
        assert_eq!(retransmit_limit(4, 10), 8);
        assert_eq!(retransmit_limit(4, 99), 8);
        assert_eq!(retransmit_limit(4, 100), 12);
        assert_eq!(retransmit_limit(1, 1), 1);
        assert_eq!(retransmit_limit(0, 50), 0);
        assert_eq!(retransmit_limit(u32::MAX, usize::MAX), u32::MAX);
    }

    #[test]
    fn a_newer_message_replaces_the_queued_one_and_restarts_its_count() {
        let mut q = BroadcastQueue::new(2); // limit 2 for one node
        q.queue("k", msg(1, 4));
        assert_eq!(q.take(1, 100, 0), vec![msg(1, 4)]);
        q.queue("k", msg(2, 4));
        assert_eq!(q.len(), 1);
        assert_eq!(q.take(1, 100, 0), vec![msg(2, 4)]);
        assert_eq!(q.take(1, 100, 0), vec![msg(2, 4)]);
        assert!(q.is_empty());
    }

    #[test]
    fn fewest_transmits_go_first_then_the_oldest() {
        let mut q = BroadcastQueue::new(10);
        q.queue("a", msg(1, 10));
        q.queue("b", msg(2, 10));
        // Room for one message per round.
        assert_eq!(q.take(1, 10, 0), vec![msg(1, 10)]);
        q.queue("c", msg(3, 10));
        // b (0 transmits, older) before c (0, newer) before a (1).
        assert_eq!(q.take(1, 10, 0), vec![msg(2, 10)]);
        assert_eq!(q.take(1, 10, 0), vec![msg(3, 10)]);
        assert_eq!(q.take(1, 10, 0), vec![msg(1, 10)]);
        assert_eq!(q.take(1, 30, 0), vec![msg(2, 10), msg(3, 10), msg(1, 10)]);
    }

    #[test]
    fn packing_skips_what_does_not_fit_and_keeps_going() {
        let mut q = BroadcastQueue::new(10);
        q.queue("a", msg(1, 6));
        q.queue("b", msg(2, 8));
        q.queue("c", msg(3, 2));
        // Each costs len + 2: a 8, b 10 (would reach 18), c 4 (reaches 12).
        assert_eq!(q.take(1, 12, 2), vec![msg(1, 6), msg(3, 2)]);
        assert_eq!(q.len(), 3);
        // b now has the fewest transmits and goes first.
        assert_eq!(q.take(1, 12, 2), vec![msg(2, 8)]);
    }

    #[test]
    fn messages_expire_after_the_retransmit_limit() {
        let mut q = BroadcastQueue::new(1);
        q.queue("a", msg(1, 1));
        // 10 nodes: limit 2.
        assert_eq!(q.take(10, 100, 0).len(), 1);
        assert_eq!(q.len(), 1);
        assert_eq!(q.take(10, 100, 0).len(), 1);
        assert!(q.is_empty());
        assert!(q.take(10, 100, 0).is_empty());

        // Multiplier 0: sent once.
        let mut q = BroadcastQueue::new(0);
        q.queue("a", msg(1, 1));
        assert_eq!(q.take(10, 100, 0).len(), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn a_message_that_does_not_fit_this_round_waits_for_a_roomier_one() {
        let mut q = BroadcastQueue::new(3);
        q.queue("big", msg(1, 99));
        q.queue("small", msg(2, 1));
        // A round with little room (memberlist's own messages took the rest): only the small one.
        assert_eq!(q.take(1, 20, 2), vec![msg(2, 1)]);
        assert_eq!(q.len(), 2);
        // The big one is still there and goes when there is room; exactly at the limit fits.
        assert_eq!(q.take(1, 101, 2), vec![msg(1, 99)]);
    }
}
