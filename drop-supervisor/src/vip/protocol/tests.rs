//! The protocol in a simulated network: members exchange messages with a delay, links can be
//! cut, members can die and come back; the address is "held" by whoever got `Acquire` without a
//! `Release` since.

use super::*;
use proptest::prelude::*;

/// Links differ: 1 to 3 ms one way, so that members see the same event at different times.
fn delay(from: usize, to: usize) -> Duration {
    Duration::from_millis(1 + ((from * 7 + to * 3) % 3) as u64)
}
const STEP: Duration = Duration::from_millis(1);

fn id(i: usize) -> Id {
    Id::from_u128(i as u128 + 1)
}

struct Sim {
    now: Instant,
    start: Instant,
    nodes: Vec<Option<Machine>>,
    held: Vec<bool>,
    /// Messages in flight: (deliver at, from, to, msg).
    wire: Vec<(Instant, usize, usize, Msg)>,
    /// `cut[i][j]`: i cannot reach j.
    cut: Vec<Vec<bool>>,
    /// Most members holding at one instant, ever.
    max_holders: usize,
    acquired: Vec<(Duration, usize)>,
    released: Vec<(Duration, usize, ReleaseReason)>,
}

impl Sim {
    fn new(n: usize, params: Params) -> Sim {
        let now = Instant::now();
        let members: BTreeSet<Id> = (0..n).map(id).collect();
        let nodes = (0..n)
            .map(|i| {
                let mut m = Machine::new(id(i), params, now);
                m.set_members(members.clone());
                Some(m)
            })
            .collect();
        Sim {
            now,
            start: now,
            nodes,
            held: vec![false; n],
            wire: Vec::new(),
            cut: vec![vec![false; n]; n],
            max_holders: 0,
            acquired: Vec::new(),
            released: Vec::new(),
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn apply(&mut self, i: usize, outs: Vec<Output>) {
        let n = self.nodes.len();
        for o in outs {
            match o {
                Output::Send(to, msg) => {
                    let j = (0..n).find(|j| id(*j) == to).unwrap();
                    self.wire.push((self.now + delay(i, j), i, j, msg));
                }
                Output::Broadcast(msg) => {
                    for j in (0..n).filter(|j| *j != i) {
                        self.wire.push((self.now + delay(i, j), i, j, msg));
                    }
                }
                Output::Acquire { .. } => {
                    self.held[i] = true;
                    self.acquired.push((self.elapsed(), i));
                }
                Output::Release { why } => {
                    self.held[i] = false;
                    self.released.push((self.elapsed(), i, why));
                }
            }
        }
        self.max_holders = self
            .max_holders
            .max(self.held.iter().filter(|h| **h).count());
    }

    fn step(&mut self) {
        self.now += STEP;
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = self.wire.drain(..).partition(|(at, ..)| *at <= now);
        self.wire = later;
        for (_, from, to, msg) in due {
            if self.cut[from][to] {
                continue;
            }
            if let Some(m) = self.nodes[to].as_mut() {
                let outs = m.on_message(now, id(from), msg);
                self.apply(to, outs);
            }
        }
        for i in 0..self.nodes.len() {
            if let Some(m) = self.nodes[i].as_mut() {
                let outs = m.tick(now);
                self.apply(i, outs);
            }
        }
    }

    fn run(&mut self, d: Duration) {
        let until = self.now + d;
        while self.now < until {
            self.step();
        }
    }

    /// Runs until `pred` holds, at most `d`; returns how long it took.
    fn run_until(&mut self, d: Duration, pred: impl Fn(&Sim) -> bool) -> Option<Duration> {
        let from = self.now;
        while self.now - from < d {
            if pred(self) {
                return Some(self.now - from);
            }
            self.step();
        }
        pred(self).then(|| self.now - from)
    }

    fn holders(&self) -> Vec<usize> {
        (0..self.held.len()).filter(|i| self.held[*i]).collect()
    }

    /// A crash: the machine and whatever it held are gone (the address with it, as the
    /// `ExecStopPost=` release does), messages to it are lost.
    fn kill(&mut self, i: usize) {
        self.nodes[i] = None;
        self.held[i] = false;
    }

    fn restart(&mut self, i: usize, params: Params) {
        let members: BTreeSet<Id> = (0..self.nodes.len()).map(id).collect();
        let mut m = Machine::new(id(i), params, self.now);
        m.set_members(members);
        self.nodes[i] = Some(m);
    }

    /// Cuts every link between the two groups, both ways.
    fn partition(&mut self, a: &[usize], b: &[usize]) {
        for &i in a {
            for &j in b {
                self.cut[i][j] = true;
                self.cut[j][i] = true;
            }
        }
    }

    fn isolate(&mut self, i: usize) {
        let others: Vec<usize> = (0..self.nodes.len()).filter(|j| *j != i).collect();
        self.partition(&[i], &others);
    }

    fn heal(&mut self) {
        for row in &mut self.cut {
            row.iter_mut().for_each(|c| *c = false);
        }
    }

    fn set_healthy(&mut self, i: usize, healthy: bool) {
        let now = self.now;
        let outs = self.nodes[i].as_mut().unwrap().set_healthy(now, healthy);
        self.apply(i, outs);
    }
}

fn one_holder(sim: &Sim) -> Option<usize> {
    match sim.holders()[..] {
        [h] => Some(h),
        _ => None,
    }
}

#[test]
fn five_members_elect_exactly_one_holder_after_the_startup_wait() {
    let p = Params::fast();
    let mut sim = Sim::new(5, p);
    let took = sim.run_until(Duration::from_secs(2), |s| one_holder(s).is_some());
    let took = took.expect("a holder");
    // Nobody may stand before the start-up promise ran out.
    assert!(took >= p.dead_after, "took {took:?}");
    assert!(took < p.dead_after * 2, "took {took:?}");
    sim.run(Duration::from_secs(1));
    // Smallest id first, and it keeps it.
    assert_eq!(sim.holders(), vec![0]);
    assert_eq!(sim.max_holders, 1);
    for m in sim.nodes.iter().flatten() {
        assert_eq!(m.holder(sim.now), Some(id(0)));
    }
}

#[test]
fn the_hint_stands_first_even_when_it_starts_late() {
    let p = Params::fast();
    let mut sim = Sim::new(3, p);
    for m in sim.nodes.iter_mut().flatten() {
        m.set_hint(Some(id(2)));
    }
    // The hint starts 80 ms after the others: they are out of their start-up wait first.
    sim.run(Duration::from_millis(80));
    sim.restart(2, p);
    sim.nodes[2].as_mut().unwrap().set_hint(Some(id(2)));
    sim.run(Duration::from_millis(600));
    assert_eq!(sim.holders(), vec![2]);
    assert_eq!(sim.max_holders, 1);
}

#[test]
fn others_take_over_when_the_hint_never_stands() {
    let p = Params::fast();
    let mut sim = Sim::new(3, p);
    for m in sim.nodes.iter_mut().flatten() {
        m.set_hint(Some(id(2)));
    }
    // The hint's beats reach the others (heard, healthy), but it hears nobody, so it never
    // has a majority to stand with. The others wait for it a while, then go ahead.
    for j in 0..2 {
        sim.cut[j][2] = true;
    }
    sim.run(Duration::from_secs(1));
    assert_eq!(sim.holders().len(), 1);
    assert_ne!(sim.holders(), vec![2]);
}

#[test]
fn the_hint_stands_first() {
    let p = Params::fast();
    let mut sim = Sim::new(3, p);
    for m in sim.nodes.iter_mut().flatten() {
        m.set_hint(Some(id(2)));
    }
    sim.run(Duration::from_millis(500));
    assert_eq!(sim.holders(), vec![2]);
}

#[test]
fn a_killed_holder_is_replaced_within_dead_after_and_a_few_beats() {
    let p = Params::fast();
    let mut sim = Sim::new(5, p);
    sim.run(Duration::from_millis(500));
    assert_eq!(sim.holders(), vec![0]);
    sim.kill(0);
    let took = sim
        .run_until(Duration::from_secs(2), |s| one_holder(s).is_some())
        .expect("a new holder");
    assert!(took <= p.dead_after + p.heartbeat * 3, "took {took:?}");
    assert_eq!(sim.holders(), vec![1]);
    assert_eq!(sim.max_holders, 1);
}

#[test]
fn a_cut_off_holder_releases_before_anyone_acquires() {
    let p = Params::fast();
    let mut sim = Sim::new(5, p);
    sim.run(Duration::from_millis(500));
    sim.isolate(0);
    let cut_at = sim.elapsed();
    sim.run_until(Duration::from_secs(2), |s| s.holders() == vec![1])
        .expect("node 1 takes over");
    assert_eq!(sim.max_holders, 1, "never two holders");
    let released = sim
        .released
        .iter()
        .find(|(_, i, _)| *i == 0)
        .expect("the cut-off holder released");
    assert_eq!(released.2, ReleaseReason::LeaseLapsed);
    let acquired = sim.acquired.iter().rev().find(|(_, i)| *i == 1).unwrap();
    assert!(released.0 < acquired.0, "{released:?} before {acquired:?}");
    assert!(released.0 - cut_at <= p.lease + p.heartbeat);
    // Healed: the old holder follows, nobody moves.
    sim.heal();
    sim.run(Duration::from_secs(1));
    assert_eq!(sim.holders(), vec![1]);
    for m in sim.nodes.iter().flatten() {
        assert_eq!(m.holder(sim.now), Some(id(1)));
    }
}

#[test]
fn partition_two_three_with_the_holder_in_the_minority() {
    let p = Params::fast();
    let mut sim = Sim::new(5, p);
    sim.run(Duration::from_millis(500));
    assert_eq!(sim.holders(), vec![0]);
    sim.partition(&[0, 1], &[2, 3, 4]);
    sim.run(Duration::from_secs(2));
    assert_eq!(sim.holders(), vec![2], "the majority's smallest id holds");
    assert_eq!(sim.max_holders, 1);
    // The minority tried and failed to elect without a majority: nobody there holds.
    sim.heal();
    sim.run(Duration::from_secs(1));
    assert_eq!(sim.holders(), vec![2], "healing does not move it back");
    assert_eq!(sim.max_holders, 1);
}

#[test]
fn partition_with_the_hint_in_the_minority_elects_at_once() {
    let p = Params::fast();
    let mut sim = Sim::new(5, p);
    for m in sim.nodes.iter_mut().flatten() {
        m.set_hint(Some(id(4)));
    }
    sim.run(Duration::from_millis(800));
    assert_eq!(sim.holders(), vec![4]);
    sim.partition(&[4, 0], &[1, 2, 3]);
    let took = sim
        .run_until(Duration::from_secs(2), |s| s.holders() == vec![1])
        .expect("node 1 takes over");
    assert!(took <= p.dead_after + p.heartbeat * 3, "took {took:?}");
    // One election, not a string of split votes.
    assert!(sim.nodes[1].as_ref().unwrap().term() <= 2);
}

#[test]
fn partition_with_the_holder_in_the_majority_keeps_it() {
    let p = Params::fast();
    let mut sim = Sim::new(5, p);
    sim.run(Duration::from_millis(500));
    sim.partition(&[3, 4], &[0, 1, 2]);
    sim.run(Duration::from_secs(2));
    assert_eq!(sim.holders(), vec![0]);
    assert!(sim.released.is_empty());
}

#[test]
fn an_unhealthy_holder_resigns_and_the_next_takes_over_without_waiting_for_dead_after() {
    let p = Params::lan();
    let mut sim = Sim::new(3, p);
    sim.run(Duration::from_secs(3));
    assert_eq!(sim.holders(), vec![0]);
    sim.set_healthy(0, false);
    assert!(sim.holders().is_empty());
    let took = sim
        .run_until(Duration::from_secs(5), |s| one_holder(s).is_some())
        .unwrap();
    assert_eq!(sim.holders(), vec![1]);
    assert!(took < p.dead_after, "took {took:?}");
    // Recovering does not move it back.
    sim.set_healthy(0, true);
    sim.run(Duration::from_secs(3));
    assert_eq!(sim.holders(), vec![1]);
    assert_eq!(sim.released.len(), 1);
    assert_eq!(sim.released[0].2, ReleaseReason::Unhealthy);
}

#[test]
fn unhealthy_members_never_stand() {
    let p = Params::fast();
    let mut sim = Sim::new(3, p);
    sim.set_healthy(0, false);
    sim.run(Duration::from_millis(500));
    assert_eq!(sim.holders(), vec![1]);
    sim.set_healthy(1, false);
    sim.set_healthy(2, false);
    sim.run(Duration::from_millis(500));
    assert!(sim.holders().is_empty(), "no healthy member, no holder");
}

#[test]
fn a_minority_alone_never_holds() {
    let p = Params::fast();
    let mut sim = Sim::new(5, p);
    sim.kill(2);
    sim.kill(3);
    sim.kill(4);
    sim.run(Duration::from_secs(2));
    assert!(sim.holders().is_empty());
}

#[test]
fn a_single_member_holds_after_the_startup_wait() {
    let p = Params::fast();
    let mut sim = Sim::new(1, p);
    sim.run(Duration::from_millis(300));
    assert_eq!(sim.holders(), vec![0]);
    assert!(sim.nodes[0].as_ref().unwrap().lease_until().is_none());
}

#[test]
fn a_restarted_member_does_not_vote_before_its_promise_ran_out() {
    let p = Params::fast();
    let mut sim = Sim::new(3, p);
    sim.run(Duration::from_millis(500));
    sim.kill(1);
    sim.restart(1, p);
    sim.run(Duration::from_millis(500));
    // Holder 0 kept it throughout; node 1 follows it again.
    assert_eq!(sim.holders(), vec![0]);
    assert_eq!(sim.nodes[1].as_ref().unwrap().holder(sim.now), Some(id(0)));
    assert!(sim.released.is_empty());
}

#[test]
fn params_keep_a_margin_between_lease_and_promise() {
    for p in [
        Params::fast(),
        Params::lan(),
        Params::new(Duration::from_millis(5), 1),
    ] {
        assert!(p.lease + p.heartbeat <= p.dead_after, "{p:?}");
    }
}

#[derive(Debug, Clone)]
enum Event {
    Kill(usize),
    Restart(usize),
    Isolate(usize),
    Split(usize),
    Heal,
    Health(usize, bool),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (0..5usize).prop_map(Event::Kill),
        (0..5usize).prop_map(Event::Restart),
        (0..5usize).prop_map(Event::Isolate),
        (1..5usize).prop_map(Event::Split),
        Just(Event::Heal),
        (0..5usize, any::<bool>()).prop_map(|(i, h)| Event::Health(i, h)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever happens (crashes, restarts, partitions, health), two members never hold the
    /// address at the same instant, and once things are quiet a healthy majority has a holder.
    #[test]
    fn never_two_holders(events in proptest::collection::vec((event(), 20u64..400), 1..12)) {
        let p = Params::fast();
        let mut sim = Sim::new(5, p);
        sim.run(Duration::from_millis(300));
        for (ev, wait_ms) in events {
            match ev {
                Event::Kill(i) => sim.kill(i),
                Event::Restart(i) => if sim.nodes[i].is_none() { sim.restart(i, p) },
                Event::Isolate(i) => sim.isolate(i),
                Event::Split(k) => {
                    let a: Vec<usize> = (0..k).collect();
                    let b: Vec<usize> = (k..5).collect();
                    sim.partition(&a, &b);
                }
                Event::Heal => sim.heal(),
                Event::Health(i, h) => if sim.nodes[i].is_some() { sim.set_healthy(i, h) },
            }
            sim.run(Duration::from_millis(wait_ms));
            prop_assert!(sim.max_holders <= 1, "two holders at once: {:?} {:?}", sim.acquired, sim.released);
        }
        // Quiet: everyone back, healthy, connected.
        sim.heal();
        for i in 0..5 {
            if sim.nodes[i].is_none() { sim.restart(i, p) }
            sim.set_healthy(i, true);
        }
        sim.run(Duration::from_secs(1));
        prop_assert_eq!(sim.holders().len(), 1);
        prop_assert!(sim.max_holders <= 1);
    }
}
