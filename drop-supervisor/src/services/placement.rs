//! Where a service's instances run: the leader's pure, sticky placement (DESIGN §6).
//!
//! Spread first (no node gets more than `ceil(count / eligible)` instances of one service),
//! then capacity (the node with the most room left), then the node id, so that every leader
//! computes the same answer from the same inputs. Sticky: an instance stays where it is while
//! its node is eligible and within the spread bound, so a membership change moves only the
//! instances it must.

use std::collections::BTreeMap;

/// A node that may run instances of the service being placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eligible<Id> {
    pub id: Id,
    /// The node's advertised capacity (instances of all services and pools it takes).
    pub capacity: u32,
    /// Instances of other services already placed on it.
    pub load: u32,
}

/// Instance slots `0..count` → node. `previous` is the stored assignment (shorter, longer, or
/// naming nodes that are gone). With no eligible node, the previous assignment is kept as it is:
/// nothing is moved to nowhere.
///
/// `max_per_node` caps instances per node (a service with a port runs one per node, since its
/// instances would share the port): slots beyond what the eligible nodes can take stay `None`.
pub fn place<Id: Ord + Copy>(
    count: u32,
    previous: &[Option<Id>],
    eligible: &[Eligible<Id>],
    max_per_node: Option<usize>,
) -> Vec<Option<Id>> {
    let count = count as usize;
    if eligible.is_empty() {
        let mut kept: Vec<Option<Id>> = previous.iter().take(count).copied().collect();
        kept.resize(count, None);
        return kept;
    }
    let bound = count
        .div_ceil(eligible.len())
        .min(max_per_node.unwrap_or(usize::MAX));
    let by_id: BTreeMap<Id, Eligible<Id>> = eligible.iter().map(|e| (e.id, *e)).collect();
    let mut here: BTreeMap<Id, usize> = eligible.iter().map(|e| (e.id, 0)).collect();
    let mut slots: Vec<Option<Id>> = vec![None; count];
    for (slot, prev) in slots.iter_mut().zip(previous) {
        if let Some(id) = prev
            && let Some(n) = here.get_mut(id)
            && *n < bound
        {
            *n += 1;
            *slot = Some(*id);
        }
    }
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        let best = by_id
            .values()
            .filter(|e| here[&e.id] < bound)
            .min_by_key(|e| {
                let n = here[&e.id];
                let room = i64::from(e.capacity) - i64::from(e.load) - n as i64;
                (n, std::cmp::Reverse(room), e.id)
            })
            .map(|e| e.id);
        if let Some(id) = best {
            *here.get_mut(&id).expect("eligible") += 1;
            *slot = Some(id);
        }
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nodes(ids: &[u8]) -> Vec<Eligible<u8>> {
        ids.iter()
            .map(|&id| Eligible {
                id,
                capacity: 100,
                load: 0,
            })
            .collect()
    }

    fn per_node(slots: &[Option<u8>]) -> BTreeMap<u8, usize> {
        let mut m = BTreeMap::new();
        for s in slots.iter().flatten() {
            *m.entry(*s).or_default() += 1;
        }
        m
    }

    #[test]
    fn spreads_then_fills_by_room() {
        let s = place(3, &[], &nodes(&[1, 2, 3, 4, 5]), None);
        assert_eq!(per_node(&s).values().max(), Some(&1));
        let s = place(7, &[], &nodes(&[1, 2, 3, 4, 5]), None);
        assert_eq!(s.len(), 7);
        assert!(per_node(&s).values().all(|n| (1..=2).contains(n)), "{s:?}");
        // Node 2 is the busiest: it is the one left with a single instance... or fewer.
        let mut busy = nodes(&[1, 2, 3]);
        busy[1].load = 90;
        let s = place(2, &[], &busy, None);
        assert!(!s.contains(&Some(2)), "{s:?}");
    }

    #[test]
    fn a_lost_node_moves_only_its_instances() {
        let all = nodes(&[1, 2, 3, 4, 5]);
        let before = place(7, &[], &all, None);
        let lost = before[0].unwrap();
        let rest: Vec<_> = all.iter().copied().filter(|e| e.id != lost).collect();
        let after = place(7, &before, &rest, None);
        for (b, a) in before.iter().zip(&after) {
            if *b != Some(lost) {
                assert_eq!(a, b, "{before:?} → {after:?}");
            } else {
                assert_ne!(*a, Some(lost));
                assert!(a.is_some());
            }
        }
        // The node returns: nothing moves back.
        assert_eq!(place(7, &after, &all, None), after);
    }

    #[test]
    fn no_eligible_node_keeps_what_was_there() {
        let prev = vec![Some(1u8), Some(2)];
        assert_eq!(place(3, &prev, &[], None), vec![Some(1), Some(2), None]);
        assert_eq!(place(1, &prev, &[], None), vec![Some(1)]);
    }

    #[test]
    fn one_per_node_leaves_the_rest_unplaced() {
        let all = nodes(&[1, 2, 3]);
        let s = place(5, &[], &all, Some(1));
        assert_eq!(s.iter().flatten().count(), 3);
        assert_eq!(per_node(&s).values().max(), Some(&1));
        assert_eq!(&s[3..], &[None, None]);
        // A fourth node takes the next slot.
        let more = place(5, &s, &nodes(&[1, 2, 3, 4]), Some(1));
        assert_eq!(&more[..3], &s[..3]);
        assert_eq!(more.iter().flatten().count(), 4);
    }

    #[test]
    fn count_changes_keep_the_lower_slots() {
        let all = nodes(&[1, 2, 3]);
        let three = place(3, &[], &all, None);
        let five = place(5, &three, &all, None);
        assert_eq!(&five[..3], &three[..]);
        let two = place(2, &five, &all, None);
        assert_eq!(&two[..], &three[..2]);
    }

    proptest! {
        #[test]
        fn always_complete_bounded_and_deterministic(
            count in 0u32..40,
            ids in proptest::collection::btree_set(0u8..12, 1..8),
            prev in proptest::collection::vec(proptest::option::of(0u8..14), 0..40),
        ) {
            let ids: Vec<u8> = ids.into_iter().collect();
            let el = nodes(&ids);
            let s = place(count, &prev, &el, None);
            prop_assert_eq!(s.len(), count as usize);
            prop_assert!(s.iter().all(|x| x.is_some_and(|id| ids.contains(&id))));
            let bound = (count as usize).div_ceil(ids.len());
            prop_assert!(per_node(&s).values().all(|n| *n <= bound));
            prop_assert_eq!(place(count, &prev, &el, None), s.clone());
            // Sticky: a previous slot on an eligible node within the bound stays.
            let again = place(count, &s, &el, None);
            prop_assert_eq!(again, s);
        }
    }
}
