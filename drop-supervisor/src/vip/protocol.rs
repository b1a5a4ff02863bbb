//! Who may hold a namespace's floating address: a lease protocol among the namespace's members,
//! separate from memberlist so that it can run at tens of milliseconds.
//!
//! Every member sends a heartbeat to every other member each [`Params::heartbeat`]. The holder's
//! heartbeats claim the address for a term; the others answer each of them at once with an ack.
//! The rules:
//!
//! - **The holder's lease.** The holder keeps the address only while a strict majority of the
//!   declared members (itself included) acked a heartbeat it *sent* less than [`Params::lease`]
//!   ago. When that stops being true it removes the address at once, whether it is cut off,
//!   its link is down, or the others are gone.
//! - **The followers' promise.** A member that acked a holder at time `a` does not vote for
//!   anyone before `a + lease + heartbeat`, and neither does a member in its first `lease +
//!   heartbeat` after starting (it may have acked someone just before a restart). By the time a
//!   majority has voted for a new holder, every majority that could still renew the old
//!   holder's lease contains a voter whose last ack is older than the lease: the old holder has
//!   already released. The extra heartbeat covers the time the release itself takes. Members
//!   stand only `dead_after` (one more heartbeat) after their last ack, so voters are free by
//!   the time the first candidate asks.
//! - **Elections.** When no holder has been heard for `dead_after` (or the holder resigned), the
//!   healthy members that hear a majority of the namespace stand in a fixed order: the hint (the
//!   cluster's namespace leader) first, then by id, each one [`Params::heartbeat`] × 2 after the
//!   one before, so usually exactly one stands. A candidate asks for votes in a fresh term; one
//!   vote per member and term; a majority makes it the holder.
//! - **Health.** An unhealthy member never stands, and a holder that turns unhealthy releases the
//!   address and says so (a resignation lifts the followers' promise: the address is already
//!   gone, so the next member may take it without waiting).
//! - **Terms.** A holder that hears a holder of a higher term releases. Followers follow the
//!   holder of the highest term they hear; a member whose elections failed (a minority) follows
//!   the majority's holder as soon as it hears it, whatever its own term counter says.
//!
//! Pure: no I/O and no clock; the caller passes `now` and carries out the [`Output`]s.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How many `dead_after`s the others leave a healthy, heard hint to take the address first.
const HINT_WAITS: u32 = 3;

/// A member's id (the node's UUID).
pub type Id = uuid::Uuid;

/// Timing of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// How often every member sends a heartbeat.
    pub heartbeat: Duration,
    /// A holder not heard for this long is gone; also the followers' promise.
    pub dead_after: Duration,
    /// The holder's lease, counted from the sending of an acked heartbeat. Less than
    /// `dead_after` by a margin that covers removing the address.
    pub lease: Duration,
}

impl Params {
    /// From a heartbeat interval and a number of heartbeats a holder may miss: the lease is
    /// `missed - 2` heartbeats, `dead_after` is `missed` heartbeats.
    pub fn new(heartbeat: Duration, missed: u32) -> Params {
        let missed = missed.max(3);
        Params {
            heartbeat,
            dead_after: heartbeat * missed,
            lease: heartbeat * (missed - 2),
        }
    }

    /// The `fast` profile: heartbeats every 20 ms, a holder gone after 6 missed ones (120 ms).
    pub fn fast() -> Params {
        Params::new(Duration::from_millis(20), 6)
    }

    /// The `lan` profile: heartbeats every 100 ms, a holder gone after 10 missed ones (1 s).
    pub fn lan() -> Params {
        Params::new(Duration::from_millis(100), 10)
    }
}

/// What members say to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Msg {
    /// Every member, every heartbeat. `holder` is set by the holder of `term`.
    Beat {
        term: u64,
        holder: bool,
        seq: u64,
        healthy: bool,
    },
    /// A follower's answer to the holder's beat `seq` of `term`.
    Ack { term: u64, seq: u64 },
    /// A candidate asks for a vote in `term`.
    VoteRequest { term: u64, seq: u64 },
    /// The answer.
    Vote { term: u64, seq: u64, granted: bool },
    /// The holder of `term` removed the address (health, shutdown).
    Resign { term: u64 },
}

/// What the caller must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Send(Id, Msg),
    /// To every other member.
    Broadcast(Msg),
    /// Add the address and announce it: this member holds it from now on.
    Acquire {
        term: u64,
    },
    /// Remove the address now.
    Release {
        why: ReleaseReason,
    },
}

/// Why a holder let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// A majority stopped acking (cut off, link down, the others gone).
    LeaseLapsed,
    /// Another member holds it in a higher term.
    Superseded,
    /// The health check failed.
    Unhealthy,
    /// Shutting down, or no longer a member.
    Resigned,
}

impl ReleaseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::LeaseLapsed => "lease lapsed",
            ReleaseReason::Superseded => "superseded",
            ReleaseReason::Unhealthy => "unhealthy",
            ReleaseReason::Resigned => "resigned",
        }
    }
}

/// This member's part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Follower,
    Candidate {
        term: u64,
        seq: u64,
        sent: Instant,
        votes: BTreeSet<Id>,
    },
    Holder {
        term: u64,
        since: Instant,
    },
}

/// What this member knows of another.
#[derive(Debug, Clone, Copy)]
struct Peer {
    heard: Instant,
    healthy: bool,
}

/// The protocol state of one member.
#[derive(Debug)]
pub struct Machine {
    me: Id,
    params: Params,
    started: Instant,
    members: BTreeSet<Id>,
    healthy: bool,
    hint: Option<Id>,
    /// The highest term seen anywhere (elections use the next one).
    term: u64,
    /// The term this member last voted in.
    voted: u64,
    role: Role,
    /// The holder this member follows: (id, term, last heard).
    holder: Option<(Id, u64, Instant)>,
    /// When the address was last known to be free (a holder gone or resigned, or start-up).
    free_since: Option<Instant>,
    /// When this member last acked a holder (the promise runs from here).
    last_ack: Option<Instant>,
    peers: BTreeMap<Id, Peer>,
    seq: u64,
    /// The holder's beats: seq → when sent (only the recent ones).
    sent: VecDeque<(u64, Instant)>,
    /// The holder's acks: member → send time of the newest beat it acked.
    acked: BTreeMap<Id, Instant>,
    next_beat: Instant,
}

impl Machine {
    pub fn new(me: Id, params: Params, now: Instant) -> Machine {
        Machine {
            me,
            params,
            started: now,
            members: BTreeSet::from([me]),
            healthy: true,
            hint: None,
            term: 0,
            voted: 0,
            role: Role::Follower,
            holder: None,
            free_since: None,
            last_ack: None,
            peers: BTreeMap::new(),
            seq: 0,
            sent: VecDeque::new(),
            acked: BTreeMap::new(),
            next_beat: now,
        }
    }

    pub fn me(&self) -> Id {
        self.me
    }

    pub fn params(&self) -> Params {
        self.params
    }

    pub fn role(&self) -> &Role {
        &self.role
    }

    pub fn is_holder(&self) -> bool {
        matches!(self.role, Role::Holder { .. })
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    /// The holder as this member sees it now: itself, or the holder it heard within
    /// `dead_after`.
    pub fn holder(&self, now: Instant) -> Option<Id> {
        match self.role {
            Role::Holder { .. } => Some(self.me),
            _ => self
                .holder
                .filter(|(_, _, heard)| {
                    now.saturating_duration_since(*heard) < self.params.dead_after
                })
                .map(|(id, _, _)| id),
        }
    }

    /// Members heard within `dead_after` (not counting this one).
    pub fn heard(&self, now: Instant) -> BTreeSet<Id> {
        self.peers
            .iter()
            .filter(|(id, p)| {
                self.members.contains(id)
                    && now.saturating_duration_since(p.heard) < self.params.dead_after
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Declared members, this one included (the caller makes sure of that).
    pub fn set_members(&mut self, members: BTreeSet<Id>) {
        self.members = members;
        self.members.insert(self.me);
        self.peers.retain(|id, _| self.members.contains(id));
        self.acked.retain(|id, _| self.members.contains(id));
    }

    /// The cluster's namespace leader, preferred when nobody holds the address.
    pub fn set_hint(&mut self, hint: Option<Id>) {
        self.hint = hint;
    }

    /// The health check's verdict. A holder that turns unhealthy resigns.
    pub fn set_healthy(&mut self, now: Instant, healthy: bool) -> Vec<Output> {
        self.healthy = healthy;
        if !healthy && self.is_holder() {
            return self.step_down(now, ReleaseReason::Unhealthy);
        }
        Vec::new()
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    fn majority(&self, count: usize) -> bool {
        count * 2 > self.members.len()
    }

    /// Whether this member has not acked a holder (nor voted, nor started) for `wait`.
    fn quiet_for(&self, now: Instant, wait: Duration) -> bool {
        let since_start = now.saturating_duration_since(self.started) >= wait;
        let since_ack = self
            .last_ack
            .is_none_or(|a| now.saturating_duration_since(a) >= wait);
        since_start && since_ack
    }

    /// The followers' promise: no vote within `lease + heartbeat` of an ack (or of the start).
    /// That is longer than any lease the ack can keep alive, by a heartbeat for the release,
    /// and one heartbeat shorter than the wait before standing, so that the members are free
    /// to vote by the time the first candidate asks.
    fn may_vote(&self, now: Instant) -> bool {
        self.quiet_for(now, self.params.lease + self.params.heartbeat)
    }

    /// A candidate waits the whole `dead_after` after its last ack (or its start).
    fn may_stand(&self, now: Instant) -> bool {
        self.quiet_for(now, self.params.dead_after)
    }

    /// Releases (if holding) and tells the others; used for shutdown, health and leaving.
    pub fn step_down(&mut self, now: Instant, why: ReleaseReason) -> Vec<Output> {
        let Role::Holder { term, .. } = self.role else {
            self.role = Role::Follower;
            return Vec::new();
        };
        self.role = Role::Follower;
        self.holder = None;
        self.free_since = Some(now);
        self.acked.clear();
        self.sent.clear();
        vec![
            Output::Release { why },
            Output::Broadcast(Msg::Resign { term }),
        ]
    }

    /// A message from another member. Messages from non-members are ignored.
    pub fn on_message(&mut self, now: Instant, from: Id, msg: Msg) -> Vec<Output> {
        if from == self.me || !self.members.contains(&from) {
            return Vec::new();
        }
        let mut out = Vec::new();
        match msg {
            Msg::Beat {
                term,
                holder,
                seq,
                healthy,
            } => {
                self.peers.insert(
                    from,
                    Peer {
                        heard: now,
                        healthy,
                    },
                );
                self.term = self.term.max(term);
                if holder {
                    self.on_holder_beat(now, from, term, seq, &mut out);
                }
            }
            Msg::Ack { term, seq } => {
                self.peers.entry(from).and_modify(|p| p.heard = now);
                if let Role::Holder { term: mine, .. } = self.role
                    && term == mine
                    && let Some(sent) = self.sent_at(seq)
                {
                    let e = self.acked.entry(from).or_insert(sent);
                    *e = (*e).max(sent);
                }
            }
            Msg::VoteRequest { term, seq } => {
                self.term = self.term.max(term);
                let granted = term > self.voted
                    && !self.is_holder()
                    && self.holder(now).is_none()
                    && self.may_vote(now);
                if granted {
                    self.voted = term;
                    // A vote is a promise like an ack: no other vote (nor candidacy) for a while.
                    self.last_ack = Some(now);
                    if matches!(self.role, Role::Candidate { .. }) {
                        self.role = Role::Follower;
                    }
                }
                out.push(Output::Send(from, Msg::Vote { term, seq, granted }));
            }
            Msg::Vote {
                term,
                seq: _,
                granted,
            } => {
                if let Role::Candidate {
                    term: mine,
                    sent,
                    ref mut votes,
                    ..
                } = self.role
                    && term == mine
                    && granted
                {
                    votes.insert(from);
                    let count = votes.len();
                    // A vote counts for the lease like an ack of the request.
                    self.acked.insert(from, sent);
                    if self.majority(count) {
                        self.become_holder(now, term, &mut out);
                    }
                }
            }
            Msg::Resign { term } => {
                if let Some((h, t, _)) = self.holder
                    && h == from
                    && t == term
                {
                    // The address is gone already: the promise is lifted.
                    self.holder = None;
                    self.last_ack = None;
                    self.free_since = Some(now);
                }
            }
        }
        out
    }

    fn on_holder_beat(
        &mut self,
        now: Instant,
        from: Id,
        term: u64,
        seq: u64,
        out: &mut Vec<Output>,
    ) {
        match self.role {
            Role::Holder { term: mine, .. } => {
                // Two holders: the higher term wins; in one term (cannot happen with one vote
                // per member and term, but be safe) the smaller id.
                if term > mine || (term == mine && from < self.me) {
                    out.extend(self.step_down(now, ReleaseReason::Superseded));
                    // Fall through to following it below.
                } else {
                    return;
                }
            }
            Role::Candidate { .. } => self.role = Role::Follower,
            Role::Follower => {}
        }
        let current = self
            .holder
            .filter(|(_, _, heard)| now.saturating_duration_since(*heard) < self.params.dead_after);
        let follow = match current {
            None => true,
            Some((h, t, _)) => h == from || term > t || (term == t && from < h),
        };
        if !follow {
            return;
        }
        self.holder = Some((from, term, now));
        self.free_since = None;
        self.last_ack = Some(now);
        out.push(Output::Send(from, Msg::Ack { term, seq }));
    }

    fn sent_at(&self, seq: u64) -> Option<Instant> {
        self.sent.iter().find(|(s, _)| *s == seq).map(|(_, t)| *t)
    }

    fn become_holder(&mut self, now: Instant, term: u64, out: &mut Vec<Output>) {
        self.role = Role::Holder { term, since: now };
        self.holder = None;
        self.free_since = None;
        out.push(Output::Acquire { term });
        // Tell everyone at once rather than at the next tick.
        self.next_beat = now;
        out.extend(self.beat(now));
    }

    fn beat(&mut self, now: Instant) -> Vec<Output> {
        if now < self.next_beat {
            return Vec::new();
        }
        self.next_beat = now + self.params.heartbeat;
        self.seq += 1;
        let (term, holder) = match self.role {
            Role::Holder { term, .. } => {
                self.sent.push_back((self.seq, now));
                while self
                    .sent
                    .front()
                    .is_some_and(|(_, t)| now.saturating_duration_since(*t) > self.params.lease)
                {
                    self.sent.pop_front();
                }
                (term, true)
            }
            _ => (self.term, false),
        };
        vec![Output::Broadcast(Msg::Beat {
            term,
            holder,
            seq: self.seq,
            healthy: self.healthy,
        })]
    }

    /// Members (this one included) whose ack keeps the lease now.
    fn lease_count(&self, now: Instant) -> usize {
        1 + self
            .acked
            .iter()
            .filter(|(id, sent)| {
                **id != self.me
                    && self.members.contains(id)
                    && now.saturating_duration_since(**sent) < self.params.lease
            })
            .count()
    }

    /// When the lease ends if no further ack arrives (holders only).
    pub fn lease_until(&self) -> Option<Instant> {
        if !self.is_holder() {
            return None;
        }
        let mut sends: Vec<Instant> = self
            .acked
            .iter()
            .filter(|(id, _)| **id != self.me && self.members.contains(id))
            .map(|(_, t)| *t)
            .collect();
        sends.sort_unstable_by(|a, b| b.cmp(a));
        // The newest `need - 1` acks (besides this member's own) keep a majority.
        let need = self.members.len() / 2 + 1;
        if need <= 1 {
            return None; // alone in the namespace: a majority of one
        }
        sends.get(need - 2).map(|t| *t + self.params.lease)
    }

    /// When this member may stand, if at all: its place in the order of candidates, each
    /// `2 × heartbeat` after the one before, counted from when the address became free. While
    /// the hint (the cluster's leader) is heard and healthy, the others count from
    /// [`HINT_WAITS`] × `dead_after` later, so that the address and the leadership stay
    /// together (at start-up the hint may still be in its own start-up wait when the others
    /// are out of theirs), and a hint that cannot win does not block the namespace.
    fn turn(&self, now: Instant, free: Instant) -> Option<Instant> {
        if !self.healthy {
            return None;
        }
        let heard = self.heard(now);
        if !self.majority(heard.len() + 1) {
            return None;
        }
        let hint_waits = self.hint.is_some_and(|hint| {
            hint != self.me
                && heard.contains(&hint)
                && self.peers.get(&hint).is_some_and(|p| p.healthy)
        });
        let mut eligible: Vec<Id> = heard
            .into_iter()
            .filter(|id| self.peers.get(id).is_some_and(|p| p.healthy))
            .collect();
        eligible.push(self.me);
        eligible.sort_by_key(|id| (Some(*id) != self.hint, *id));
        let rank = eligible.iter().position(|id| *id == self.me)?;
        let base = if hint_waits {
            free + self.params.dead_after * HINT_WAITS
        } else {
            free
        };
        Some(base + self.params.heartbeat * 2 * u32::try_from(rank).unwrap_or(u32::MAX))
    }

    /// Time passes: heartbeats, the lease, elections. Call at [`Machine::next_wake`] at the latest.
    pub fn tick(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        match self.role.clone() {
            Role::Holder { .. } => {
                if !self.majority(self.lease_count(now)) {
                    out.extend(self.step_down(now, ReleaseReason::LeaseLapsed));
                }
            }
            Role::Candidate { sent, .. } => {
                // No majority within a few heartbeats: give up; a later round uses a new term.
                if now.saturating_duration_since(sent) >= self.params.heartbeat * 3 {
                    self.role = Role::Follower;
                    self.free_since = Some(now);
                }
            }
            Role::Follower => {
                if let Some((_, _, heard)) = self.holder
                    && now.saturating_duration_since(heard) >= self.params.dead_after
                {
                    self.holder = None;
                    self.free_since = Some(heard + self.params.dead_after);
                }
                if self.holder.is_none() {
                    let free = *self.free_since.get_or_insert(now);
                    if let Some(turn) = self.turn(now, free)
                        && now >= turn
                        && self.may_stand(now)
                    {
                        self.stand(now, &mut out);
                    }
                }
            }
        }
        out.extend(self.beat(now));
        out
    }

    fn stand(&mut self, now: Instant, out: &mut Vec<Output>) {
        self.term = self.term.max(self.voted) + 1;
        self.voted = self.term;
        self.seq += 1;
        self.acked.clear();
        self.sent.clear();
        let votes = BTreeSet::from([self.me]);
        let term = self.term;
        if self.majority(votes.len()) {
            self.become_holder(now, term, out);
            return;
        }
        self.role = Role::Candidate {
            term,
            seq: self.seq,
            sent: now,
            votes,
        };
        out.push(Output::Broadcast(Msg::VoteRequest {
            term,
            seq: self.seq,
        }));
    }

    /// The latest time [`Machine::tick`] must run again.
    pub fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = self.next_beat;
        if let Some(until) = self.lease_until() {
            wake = wake.min(until);
        }
        if let Some((_, _, heard)) = self.holder {
            wake = wake.min(heard + self.params.dead_after);
        }
        wake.max(now)
    }
}

#[cfg(test)]
mod tests;
