//! Who leads a namespace, as seen from one node.
//!
//! Every node evaluates [`elect`] on its own view of the cluster (who is alive, who claims the
//! role in its node metadata, whom it believed last time); there is no voting round. The rules
//! are chosen so that nodes sharing a view agree, and so that the role moves as rarely as
//! possible:
//!
//! - nobody leads without a quorum (a strict majority of the declared members alive), so the
//!   minority side of a partition steps down instead of fighting over the floating IP;
//! - a live claimant keeps the role (stickiness): a node with a smaller id that comes back does
//!   not take over. Two claimants only exist briefly after a partition heals; the older claim
//!   (the leader that has sat longer; then the smaller id) wins and the other steps down once it
//!   sees the winning claim;
//! - while a fresh claim is still travelling, a node sticks to the leader it believed in before;
//! - otherwise the smallest eligible id leads, a choice every node can make alone;
//! - a draining node is not eligible (its claim no longer counts, so it hands the role over)
//!   unless every live member is draining.
//!
//! Pure: no I/O, no clock.

use std::collections::{BTreeMap, BTreeSet};

use super::state::NodeId;

/// Whether a strict majority of `members` is in `alive`. An empty member set has no quorum.
pub fn has_quorum(members: &BTreeSet<NodeId>, alive: &BTreeSet<NodeId>) -> bool {
    let up = members.intersection(alive).count();
    up * 2 > members.len()
}

/// One node's view of a namespace, the input of [`elect`].
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// The namespace's declared members, alive or not.
    pub members: &'a BTreeSet<NodeId>,
    /// The nodes this node sees alive (may include non-members).
    pub alive: &'a BTreeSet<NodeId>,
    /// The nodes whose metadata says "I lead this namespace", with since when (their clock,
    /// milliseconds).
    pub claims: &'a BTreeMap<NodeId, u64>,
    /// Whom this node believed to be leader at its last evaluation.
    pub previous: Option<NodeId>,
    /// Nodes that are draining.
    pub draining: &'a BTreeSet<NodeId>,
}

/// The leader of the namespace in `view`, or `None` without a quorum.
pub fn elect(view: &View<'_>) -> Option<NodeId> {
    if !has_quorum(view.members, view.alive) {
        return None;
    }
    let live: BTreeSet<NodeId> = view.members.intersection(view.alive).copied().collect();
    let eligible: BTreeSet<NodeId> = match live.difference(view.draining).copied().collect() {
        rest if BTreeSet::is_empty(&rest) => live,
        rest => rest,
    };
    let oldest_claim = view
        .claims
        .iter()
        .filter(|(id, _)| eligible.contains(id))
        .min_by_key(|(id, since)| (**since, **id));
    if let Some((&claimant, _)) = oldest_claim {
        return Some(claimant);
    }
    if let Some(previous) = view.previous.filter(|p| eligible.contains(p)) {
        return Some(previous);
    }
    eligible.first().copied()
}

/// How the leader changed between two evaluations, for logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Elected(NodeId),
    SteppedDown { was: NodeId },
    Moved { from: NodeId, to: NodeId },
    Unchanged,
}

/// Classifies the step from `before` to `after`.
pub fn change(before: Option<NodeId>, after: Option<NodeId>) -> Change {
    match (before, after) {
        (None, Some(to)) => Change::Elected(to),
        (Some(was), None) => Change::SteppedDown { was },
        (Some(from), Some(to)) if from != to => Change::Moved { from, to },
        _ => Change::Unchanged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(v: u128) -> NodeId {
        NodeId::from_u128(v)
    }

    fn set(ids: &[u128]) -> BTreeSet<NodeId> {
        ids.iter().copied().map(n).collect()
    }

    fn elect_with(
        members: &[u128],
        alive: &[u128],
        claims: &[u128],
        previous: Option<u128>,
    ) -> Option<NodeId> {
        elect(&View {
            members: &set(members),
            alive: &set(alive),
            claims: &claims.iter().map(|&c| (n(c), 0)).collect(),
            previous: previous.map(n),
            draining: &BTreeSet::new(),
        })
    }

    #[test]
    fn quorum_needs_a_strict_majority_of_members() {
        let q = |members: &[u128], alive: &[u128]| has_quorum(&set(members), &set(alive));
        assert!(q(&[1], &[1]));
        assert!(!q(&[1, 2], &[1]));
        assert!(q(&[1, 2, 3], &[1, 2]));
        assert!(!q(&[1, 2, 3, 4], &[1, 2]));
        assert!(q(&[1, 2, 3, 4, 5], &[1, 2, 3]));
        assert!(!q(&[1, 2, 3, 4, 5], &[1, 2]));
    }

    #[test]
    fn empty_members_have_no_quorum_and_no_leader() {
        assert!(!has_quorum(&set(&[]), &set(&[1, 2])));
        assert_eq!(elect_with(&[], &[1, 2], &[1], Some(1)), None);
    }

    #[test]
    fn alive_non_members_do_not_count_and_cannot_lead() {
        assert!(!has_quorum(&set(&[1, 2, 3]), &set(&[1, 8, 9])));
        assert_eq!(
            elect_with(&[2, 3, 4], &[1, 2, 3], &[1], Some(1)),
            Some(n(2))
        );
    }

    #[test]
    fn a_claiming_leader_keeps_the_role_when_a_smaller_id_returns() {
        // Node 3 led while node 1 was away; node 1 comes back.
        assert_eq!(
            elect_with(&[1, 2, 3], &[1, 2, 3], &[3], Some(3)),
            Some(n(3))
        );
        // Even a node that never saw 3 lead follows the claim.
        assert_eq!(elect_with(&[1, 2, 3], &[1, 2, 3], &[3], None), Some(n(3)));
    }

    #[test]
    fn a_draining_leader_hands_over_and_drains_take_nothing_unless_all_drain() {
        let members = set(&[1, 2, 3]);
        let claims: BTreeMap<NodeId, u64> = [(n(1), 5)].into_iter().collect();
        let view = |draining: &BTreeSet<NodeId>, previous| {
            elect(&View {
                members: &members,
                alive: &members,
                claims: &claims,
                previous,
                draining,
            })
        };
        // 1 claims and is not draining: it keeps the role.
        assert_eq!(view(&BTreeSet::new(), Some(n(1))), Some(n(1)));
        // 1 drains: its claim and the memory of it no longer count; the smallest other leads.
        assert_eq!(view(&set(&[1]), Some(n(1))), Some(n(2)));
        // 1 and 2 drain: 3.
        assert_eq!(view(&set(&[1, 2]), Some(n(1))), Some(n(3)));
        // Everyone drains: the namespace still has a leader (the claimant).
        assert_eq!(view(&set(&[1, 2, 3]), Some(n(1))), Some(n(1)));
    }

    #[test]
    fn previous_leader_is_kept_while_its_claim_travels() {
        assert_eq!(elect_with(&[1, 2, 3], &[1, 2, 3], &[], Some(2)), Some(n(2)));
    }

    #[test]
    fn dead_claimant_gives_way_to_the_smallest_eligible() {
        assert_eq!(
            elect_with(&[1, 2, 3, 4], &[2, 3, 4], &[1], Some(1)),
            Some(n(2))
        );
        assert_eq!(elect_with(&[1, 2, 3], &[1, 3], &[2], Some(2)), Some(n(1)));
    }

    #[test]
    fn the_older_claim_wins_then_the_smaller_id() {
        let members = set(&[1, 2, 3]);
        let claims = BTreeMap::from([(n(1), 900), (n(3), 100)]);
        let view = View {
            members: &members,
            alive: &members,
            claims: &claims,
            previous: None,
            draining: &BTreeSet::new(),
        };
        assert_eq!(elect(&view), Some(n(3)));
    }

    #[test]
    fn two_claimants_resolve_to_the_smaller_id() {
        assert_eq!(
            elect_with(&[1, 2, 3], &[1, 2, 3], &[2, 3], Some(3)),
            Some(n(2))
        );
    }

    #[test]
    fn partition_minority_steps_down_majority_elects_and_heal_agrees() {
        let members = [1, 2, 3, 4, 5];
        // Node 1 led before the split {1, 2} | {3, 4, 5}.
        let minority = elect_with(&members, &[1, 2], &[1], Some(1));
        assert_eq!(minority, None);
        assert_eq!(
            change(Some(n(1)), minority),
            Change::SteppedDown { was: n(1) }
        );

        // The majority no longer sees node 1 alive, so its stale claim does not count.
        let majority = elect_with(&members, &[3, 4, 5], &[1], Some(1));
        assert_eq!(majority, Some(n(3)));
        assert_eq!(
            change(Some(n(1)), majority),
            Change::Moved {
                from: n(1),
                to: n(3)
            }
        );

        // Healed: node 3 claims, node 1 stepped down; both sides, with their own memories, agree.
        let all = [1, 2, 3, 4, 5];
        let old_minority = elect_with(&members, &all, &[3], None);
        let old_majority = elect_with(&members, &all, &[3], Some(3));
        assert_eq!(old_minority, Some(n(3)));
        assert_eq!(old_majority, Some(n(3)));

        // Healed before node 1's step-down propagated: both claims visible, both sides pick 1,
        // and node 3 steps down when it sees this.
        assert_eq!(elect_with(&members, &all, &[1, 3], Some(1)), Some(n(1)));
        assert_eq!(elect_with(&members, &all, &[1, 3], Some(3)), Some(n(1)));
    }

    #[test]
    fn change_classifies_every_step() {
        assert_eq!(change(None, None), Change::Unchanged);
        assert_eq!(change(Some(n(1)), Some(n(1))), Change::Unchanged);
        assert_eq!(change(None, Some(n(2))), Change::Elected(n(2)));
        assert_eq!(change(Some(n(2)), None), Change::SteppedDown { was: n(2) });
        assert_eq!(
            change(Some(n(1)), Some(n(2))),
            Change::Moved {
                from: n(1),
                to: n(2)
            }
        );
    }

    fn subset() -> impl Strategy<Value = BTreeSet<NodeId>> {
        prop::collection::btree_set(0u128..8, 0..8).prop_map(|s| s.into_iter().map(n).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn nodes_sharing_a_view_agree_on_an_alive_member(
            members in subset(),
            alive in subset(),
            claimants in subset(),
            since in prop::collection::vec(0u64..4, 8),
            previous in prop::collection::vec(prop::option::of(0u128..8), 8),
        ) {
            let claims: BTreeMap<NodeId, u64> =
                claimants.iter().zip(&since).map(|(id, t)| (*id, *t)).collect();
            let empty = BTreeSet::new();
            let view = |previous: Option<u128>| View {
                members: &members, alive: &alive, claims: &claims, previous: previous.map(n),
                draining: &empty,
            };
            let eligible: BTreeSet<NodeId> = members.intersection(&alive).copied().collect();
            let quorum = has_quorum(&members, &alive);

            // Every node with its own memory of the last leader.
            let answers: Vec<Option<NodeId>> = previous.iter().map(|&p| elect(&view(p))).collect();
            for answer in &answers {
                prop_assert_eq!(answer.is_some(), quorum);
                if let Some(leader) = answer {
                    prop_assert!(eligible.contains(leader));
                }
            }
            // A live claim settles it whatever each node remembers; without one, nodes agree
            // as soon as their memories agree on who (if anyone eligible) led last.
            let memories: BTreeSet<Option<NodeId>> = previous
                .iter()
                .map(|p| p.map(n).filter(|p| eligible.contains(p)))
                .collect();
            if claims.keys().any(|c| eligible.contains(c)) || memories.len() == 1 {
                prop_assert!(answers.windows(2).all(|w| w[0] == w[1]));
            }
        }
    }
}
