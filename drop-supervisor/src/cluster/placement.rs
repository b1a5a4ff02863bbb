//! Which nodes of a namespace run which flow.
//!
//! Every node computes the same placement from the same inputs (the namespace's flows, its alive
//! members with their capacity, the leader) and then starts only its own share, so nothing has
//! to be assigned centrally or acknowledged. That makes determinism the whole contract: the
//! answer depends on the inputs as sets, never on slice order, hash seeds or the clock.
//!
//! - `replicas: Some(n)`: `n` distinct nodes (fewer if there are fewer candidates), spread by
//!   capacity. Flows are taken by name; each replica goes to the node with the most capacity
//!   left after the replica flows already placed, ties broken by a fixed hash of flow and node
//!   so that equal nodes do not all attract the same flows.
//! - otherwise priority 0: every candidate; any other priority: the leader alone, or nobody
//!   while the namespace has no leader among the candidates.
//!
//! Pure: no I/O, no clock.

use std::collections::{BTreeMap, BTreeSet};

use super::state::NodeId;

/// An alive member of the namespace that can run flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: NodeId,
    /// How much replica `cost` the node takes; 0 is allowed (the node is picked last).
    pub capacity: u32,
}

/// What placement needs to know about a flow.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowSpec {
    pub name: String,
    /// 0 runs everywhere, anything else on the leader only (unless `replicas` is set).
    pub priority: u8,
    /// Run on this many nodes, chosen by capacity; overrides `priority`.
    pub replicas: Option<u32>,
    /// Capacity one replica uses on its node.
    pub cost: u32,
}

/// Flow name → the nodes that run it. Every flow in `flows` has an entry, possibly empty.
pub fn place(
    flows: &[FlowSpec],
    candidates: &[Candidate],
    leader: Option<NodeId>,
) -> BTreeMap<String, BTreeSet<NodeId>> {
    // One entry per node (the largest capacity if a node is listed twice), in id order.
    let mut capacity: BTreeMap<NodeId, i64> = BTreeMap::new();
    for c in candidates {
        let cap = capacity.entry(c.id).or_insert(0);
        *cap = (*cap).max(i64::from(c.capacity));
    }
    let everyone: BTreeSet<NodeId> = capacity.keys().copied().collect();
    let leader_only: BTreeSet<NodeId> = leader
        .filter(|l| everyone.contains(l))
        .into_iter()
        .collect();

    // Sorting the whole spec (name first) fixes the order even for duplicate names.
    let mut sorted: Vec<&FlowSpec> = flows.iter().collect();
    sorted.sort();

    let mut load: BTreeMap<NodeId, i64> = everyone.iter().map(|&id| (id, 0)).collect();
    let mut placement = BTreeMap::new();
    for flow in sorted {
        let nodes = match flow.replicas {
            Some(n) => spread(flow, n, &capacity, &mut load),
            None if flow.priority == 0 => everyone.clone(),
            None => leader_only.clone(),
        };
        placement.insert(flow.name.clone(), nodes);
    }
    placement
}

/// Picks `n` distinct nodes for `flow`, most free capacity first, and charges them its cost.
fn spread(
    flow: &FlowSpec,
    n: u32,
    capacity: &BTreeMap<NodeId, i64>,
    load: &mut BTreeMap<NodeId, i64>,
) -> BTreeSet<NodeId> {
    let mut chosen = BTreeSet::new();
    let want = usize::try_from(n).unwrap_or(usize::MAX).min(capacity.len());
    while chosen.len() < want {
        let best = capacity
            .iter()
            .filter(|(id, _)| !chosen.contains(*id))
            .map(|(&id, &cap)| (cap.saturating_sub(load[&id]), id))
            // Most free first; then the smaller hash; the id only settles a hash collision.
            .min_by_key(|&(free, id)| (std::cmp::Reverse(free), tie_hash(&flow.name, id), id))
            .map(|(_, id)| id);
        let Some(id) = best else { break };
        chosen.insert(id);
        let l = load.entry(id).or_insert(0);
        *l = l.saturating_add(i64::from(flow.cost));
    }
    chosen
}

/// FNV-1a 64 over the flow name, a separator and the node id: fixed across runs and builds,
/// unlike std's seeded hasher.
fn tie_hash(flow: &str, node: NodeId) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    flow.as_bytes()
        .iter()
        .chain(&[0])
        .chain(node.0.as_bytes())
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The flows `me` has to run.
pub fn local_share(placement: &BTreeMap<String, BTreeSet<NodeId>>, me: NodeId) -> BTreeSet<String> {
    placement
        .iter()
        .filter(|(_, nodes)| nodes.contains(&me))
        .map(|(name, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(v: u128) -> NodeId {
        NodeId::from_u128(v)
    }

    fn ids(v: &[u128]) -> BTreeSet<NodeId> {
        v.iter().copied().map(n).collect()
    }

    fn node(id: u128, capacity: u32) -> Candidate {
        Candidate {
            id: n(id),
            capacity,
        }
    }

    fn flow(name: &str, priority: u8, replicas: Option<u32>, cost: u32) -> FlowSpec {
        FlowSpec {
            name: name.into(),
            priority,
            replicas,
            cost,
        }
    }

    #[test]
    fn priority_0_runs_on_every_candidate() {
        let p = place(
            &[flow("a", 0, None, 1)],
            &[node(1, 1), node(2, 0), node(3, 5)],
            Some(n(2)),
        );
        assert_eq!(p["a"], ids(&[1, 2, 3]));
    }

    #[test]
    fn priority_1_runs_on_the_leader_only() {
        let candidates = [node(1, 1), node(2, 1), node(3, 1)];
        let p = place(&[flow("a", 1, None, 1)], &candidates, Some(n(2)));
        assert_eq!(p["a"], ids(&[2]));
    }

    #[test]
    fn priority_1_without_a_leader_among_candidates_runs_nowhere() {
        let flows = [flow("a", 1, None, 1), flow("b", 0, None, 1)];
        let candidates = [node(1, 1), node(2, 1)];
        for leader in [None, Some(n(9))] {
            let p = place(&flows, &candidates, leader);
            assert_eq!(p["a"], BTreeSet::new());
            assert_eq!(p["b"], ids(&[1, 2]));
        }
    }

    #[test]
    fn every_flow_has_an_entry_even_without_candidates() {
        let flows = [
            flow("a", 0, None, 1),
            flow("b", 1, None, 1),
            flow("c", 0, Some(2), 1),
        ];
        let p = place(&flows, &[], Some(n(1)));
        assert_eq!(p.len(), 3);
        assert!(p.values().all(BTreeSet::is_empty));
    }

    #[test]
    fn replicas_beyond_the_candidates_take_them_all() {
        let p = place(
            &[flow("a", 1, Some(10), 3)],
            &[node(1, 0), node(2, 1), node(3, 9)],
            None,
        );
        assert_eq!(p["a"], ids(&[1, 2, 3]));
        let p = place(&[flow("a", 0, Some(0), 3)], &[node(1, 1)], None);
        assert_eq!(p["a"], BTreeSet::new());
    }

    #[test]
    fn replicas_follow_capacity() {
        // Node 3 has room for ten single-cost replicas, the others for one each.
        let flows: Vec<FlowSpec> = (0..12)
            .map(|i| flow(&format!("f{i:02}"), 0, Some(1), 1))
            .collect();
        let candidates = [node(1, 1), node(2, 1), node(3, 10)];
        let p = place(&flows, &candidates, None);
        let shares: Vec<usize> = [1, 2, 3].map(|i| local_share(&p, n(i)).len()).to_vec();
        assert_eq!(shares.iter().sum::<usize>(), 12);
        assert!(shares[2] >= 9, "{shares:?}");
        assert!(p.values().all(|s| s.len() == 1));
    }

    #[test]
    fn one_flow_never_uses_a_node_twice() {
        let p = place(
            &[flow("a", 0, Some(2), 1)],
            &[node(1, 100), node(2, 0)],
            None,
        );
        assert_eq!(p["a"], ids(&[1, 2]));
    }

    #[test]
    fn removing_a_node_without_a_replica_of_a_flow_keeps_that_flow() {
        let flows = [flow("a", 0, Some(1), 5), flow("z", 0, Some(1), 1)];
        let before = place(&flows, &[node(1, 10), node(2, 3), node(3, 11)], None);
        assert_eq!((&before["a"], &before["z"]), (&ids(&[3]), &ids(&[1])));
        // Node 2 holds nothing: nothing moves.
        assert_eq!(place(&flows, &[node(1, 10), node(3, 11)], None), before);
        // Node 3 holds `a` only: `a` moves, `z` stays where it was.
        let after = place(&flows, &[node(1, 10), node(2, 3)], None);
        assert_eq!((&after["a"], &after["z"]), (&ids(&[1]), &ids(&[1])));
    }

    #[test]
    fn local_share_lists_my_flows() {
        let flows = [flow("all", 0, None, 1), flow("lead", 1, None, 1)];
        let p = place(&flows, &[node(1, 1), node(2, 1)], Some(n(2)));
        assert_eq!(local_share(&p, n(1)), BTreeSet::from(["all".to_string()]));
        assert_eq!(
            local_share(&p, n(2)),
            BTreeSet::from(["all".into(), "lead".into()])
        );
        assert_eq!(local_share(&p, n(7)), BTreeSet::new());
    }

    #[test]
    fn placement_is_deterministic_and_ties_are_spread() {
        let flows: Vec<FlowSpec> = (0..40)
            .map(|i| flow(&format!("f{i}"), 0, Some(1), 0))
            .collect();
        let candidates: Vec<Candidate> = (1..=4).map(|i| node(i, 1)).collect();
        let p = place(&flows, &candidates, None);
        assert_eq!(p, place(&flows, &candidates, None));
        // Zero-cost flows leave every node tied: the hash alone decides, and must not favour one.
        for i in 1..=4 {
            assert!(!local_share(&p, n(i)).is_empty(), "node {i} got nothing");
        }
    }

    fn flows() -> impl Strategy<Value = Vec<FlowSpec>> {
        let one = ("[a-e]{1,2}", 0u8..3, prop::option::of(0u32..5), 0u32..4).prop_map(
            |(name, priority, replicas, cost)| FlowSpec {
                name,
                priority,
                replicas,
                cost,
            },
        );
        prop::collection::vec(one, 0..10)
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::btree_map(0u128..10, 0u32..6, 0..7).prop_map(|m| {
            m.into_iter()
                .map(|(id, capacity)| node(id, capacity))
                .collect()
        })
    }

    fn and_shuffled<T: Clone + std::fmt::Debug>(
        s: impl Strategy<Value = Vec<T>>,
    ) -> impl Strategy<Value = (Vec<T>, Vec<T>)> {
        s.prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn placement_ignores_input_order(
            (flows, shuffled_flows) in and_shuffled(flows()),
            (cands, shuffled_cands) in and_shuffled(candidates()),
            leader in prop::option::of(0u128..10),
        ) {
            let leader = leader.map(n);
            let p = place(&flows, &cands, leader);
            prop_assert_eq!(&p, &place(&shuffled_flows, &shuffled_cands, leader));

            let everyone: BTreeSet<NodeId> = cands.iter().map(|c| c.id).collect();
            for f in &flows {
                let nodes = &p[&f.name];
                prop_assert!(nodes.is_subset(&everyone));
            }
            // Replica counts hold where the name is unique (duplicates: the largest spec wins).
            let unique = |f: &&FlowSpec| flows.iter().filter(|g| g.name == f.name).count() == 1;
            for f in flows.iter().filter(unique) {
                if let Some(r) = f.replicas {
                    prop_assert_eq!(p[&f.name].len(), (r as usize).min(everyone.len()));
                }
            }
        }
    }
}
