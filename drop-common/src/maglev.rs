//! Consistent hashing for the L4 balancer (DESIGN §7): the flow hash the XDP program computes
//! per packet, and the Maglev lookup table user space fills for it (Eisenbud et al., NSDI
//! 2016, §3.4).
//!
//! A table of `M` slots (`M` prime, much larger than the number of backends) maps
//! `flow_hash % M` to a backend. Every backend owns an almost equal share of the slots, and when
//! one backend goes away only its own slots (and very few others) change owner, so established
//! flows mostly stay where they are even before the connection table is consulted.
//!
//! No allocation and no I/O: the table and the per-backend cursor are the caller's slices, so
//! this builds for the BPF target as well as for the host.

/// Mixes 64 bits (the finaliser of SplitMix64): every input bit affects every output bit.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The hash of one flow (IPv4 5-tuple), the same in the XDP program and in user space.
#[inline(always)]
pub const fn flow_hash(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let a = ((u32::from_be_bytes(src) as u64) << 32) | u32::from_be_bytes(dst) as u64;
    let b = ((sport as u64) << 32) | ((dport as u64) << 16) | proto as u64;
    let h = mix64(a ^ mix64(b ^ 0x6a09_e667_f3bc_c909));
    (h ^ (h >> 32)) as u32
}

/// Why a table could not be filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaglevError {
    /// No backend: nothing to map to.
    NoBackends,
    /// The table size is not a prime (the permutations would not visit every slot).
    SizeNotPrime(usize),
    /// More backends than the table has slots, or than a slot can name (`u16`).
    TooManyBackends(usize),
    /// The cursor slice is shorter than the backend list.
    ScratchTooSmall,
}

/// Whether `n` is prime (trial division; table sizes are at most a few hundred thousand).
pub const fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Fills `table` (size `M`, prime) with indices into `backends`, whose entries are stable
/// backend ids (e.g. a hash of the node id): Maglev's population, each backend taking turns to
/// claim the next free slot of its own permutation `(offset + j·skip) mod M`. `next` is scratch
/// space of at least `backends.len()` entries.
pub fn fill(backends: &[u64], table: &mut [u16], next: &mut [u32]) -> Result<(), MaglevError> {
    let m = table.len();
    let n = backends.len();
    if n == 0 {
        return Err(MaglevError::NoBackends);
    }
    if !is_prime(m) {
        return Err(MaglevError::SizeNotPrime(m));
    }
    if n > m || n > u16::MAX as usize {
        return Err(MaglevError::TooManyBackends(n));
    }
    if next.len() < n {
        return Err(MaglevError::ScratchTooSmall);
    }
    const EMPTY: u16 = u16::MAX;
    table.iter_mut().for_each(|s| *s = EMPTY);
    next[..n].iter_mut().for_each(|c| *c = 0);
    let m64 = m as u64;
    let slot = |i: usize, j: u32| -> usize {
        let offset = mix64(backends[i] ^ 0x243f_6a88_85a3_08d3) % m64;
        let skip = mix64(backends[i] ^ 0x1319_8a2e_0370_7344) % (m64 - 1) + 1;
        ((offset + u64::from(j) * skip) % m64) as usize
    };
    let mut filled = 0;
    loop {
        for (i, cursor) in next[..n].iter_mut().enumerate() {
            let mut c = slot(i, *cursor);
            while table[c] != EMPTY {
                *cursor += 1;
                c = slot(i, *cursor);
            }
            table[c] = i as u16;
            *cursor += 1;
            filled += 1;
            if filled == m {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;

    const M: usize = 65_537;

    fn ids(n: u64) -> Vec<u64> {
        (0..n).map(|i| mix64(i + 1000)).collect()
    }

    fn build(backends: &[u64]) -> Vec<u16> {
        let mut table = vec![0u16; M];
        let mut next = vec![0u32; backends.len()];
        fill(backends, &mut table, &mut next).unwrap();
        table
    }

    #[test]
    fn every_slot_is_owned_and_the_shares_are_nearly_equal() {
        for n in [1u64, 2, 3, 5, 7, 16, 100] {
            let b = ids(n);
            let t = build(&b);
            let mut counts = vec![0usize; b.len()];
            for s in &t {
                counts[*s as usize] += 1;
            }
            let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
            // Maglev's bound: shares differ by at most about one in a hundred at M ≫ N.
            assert!(max - min <= M / 100 + 1, "n={n}: min {min} max {max}");
        }
    }

    #[test]
    fn a_backend_going_away_moves_its_own_slots_and_few_others() {
        let b = ids(10);
        let before = build(&b);
        let mut fewer = b.clone();
        fewer.remove(3);
        let after = build(&fewer);
        // Map the new indices back to backend ids and count slots that changed owner although
        // their owner is still there.
        let mut moved_needlessly = 0;
        for (x, y) in before.iter().zip(&after) {
            let was = b[*x as usize];
            let now = fewer[*y as usize];
            if was != b[3] && was != now {
                moved_needlessly += 1;
            }
        }
        // The paper measures a few percent at most; allow 5 %.
        assert!(
            moved_needlessly * 100 <= M * 5,
            "{moved_needlessly} of {M} slots moved"
        );
    }

    #[test]
    fn the_table_is_deterministic_and_independent_of_nothing_but_the_ids() {
        let b = ids(7);
        assert_eq!(build(&b), build(&b));
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut table = [0u16; 13];
        let mut next = [0u32; 4];
        assert_eq!(
            fill(&[], &mut table, &mut next),
            Err(MaglevError::NoBackends)
        );
        let mut twelve = [0u16; 12];
        assert_eq!(
            fill(&[1, 2], &mut twelve, &mut next),
            Err(MaglevError::SizeNotPrime(12))
        );
        assert_eq!(
            fill(&[1, 2, 3, 4, 5], &mut table, &mut next),
            Err(MaglevError::ScratchTooSmall)
        );
        let many: Vec<u64> = (0..14).collect();
        let mut next14 = [0u32; 14];
        assert_eq!(
            fill(&many, &mut table, &mut next14),
            Err(MaglevError::TooManyBackends(14))
        );
        assert!(is_prime(65_537) && is_prime(2) && !is_prime(1) && !is_prime(65_535));
    }

    #[test]
    fn flow_hashes_spread_and_depend_on_every_field() {
        let base = flow_hash([10, 0, 0, 1], [10, 0, 0, 100], 40000, 80, 6);
        assert_ne!(
            base,
            flow_hash([10, 0, 0, 2], [10, 0, 0, 100], 40000, 80, 6)
        );
        assert_ne!(
            base,
            flow_hash([10, 0, 0, 1], [10, 0, 0, 101], 40000, 80, 6)
        );
        assert_ne!(
            base,
            flow_hash([10, 0, 0, 1], [10, 0, 0, 100], 40001, 80, 6)
        );
        assert_ne!(
            base,
            flow_hash([10, 0, 0, 1], [10, 0, 0, 100], 40000, 81, 6)
        );
        assert_ne!(
            base,
            flow_hash([10, 0, 0, 1], [10, 0, 0, 100], 40000, 80, 17)
        );
        // 10 000 client ports over a table of 8 backends: every backend gets 12.5 % ± 2 %.
        let t = build(&ids(8));
        let mut counts = [0usize; 8];
        for port in 10_000u16..20_000 {
            let h = flow_hash([192, 168, 1, 7], [10, 0, 0, 100], port, 443, 6);
            counts[t[h as usize % M] as usize] += 1;
        }
        for c in counts {
            assert!((1050..=1450).contains(&c), "{counts:?}");
        }
    }

    /// Maglev's population written the way the paper's pseudo-code reads (NSDI 2016, §3.4,
    /// "Pseudocode 1"): every backend's whole permutation computed up front, then the backends
    /// take turns, each skipping slots already taken. Only `offset` and `skip` are shared with
    /// [`fill`] (they are the inputs both must agree on); the loop is independent.
    fn reference(backends: &[u64], m: usize) -> Vec<u16> {
        let m64 = m as u64;
        let permutation: Vec<Vec<usize>> = backends
            .iter()
            .map(|b| {
                let offset = mix64(b ^ 0x243f_6a88_85a3_08d3) % m64;
                let skip = mix64(b ^ 0x1319_8a2e_0370_7344) % (m64 - 1) + 1;
                (0..m64)
                    .map(|j| ((offset + j * skip) % m64) as usize)
                    .collect()
            })
            .collect();
        let mut next = vec![0usize; backends.len()];
        let mut entry: Vec<Option<u16>> = vec![None; m];
        let mut n = 0;
        'fill: loop {
            for i in 0..backends.len() {
                let mut c = permutation[i][next[i]];
                while entry[c].is_some() {
                    next[i] += 1;
                    c = permutation[i][next[i]];
                }
                entry[c] = Some(i as u16);
                next[i] += 1;
                n += 1;
                if n == m {
                    break 'fill;
                }
            }
        }
        entry
            .into_iter()
            .map(|e| e.expect("every slot filled"))
            .collect()
    }

    #[test]
    fn fill_matches_the_papers_pseudocode() {
        for (n, m) in [(1u64, 13usize), (3, 13), (5, 251), (10, 4099), (37, 65_537)] {
            let b = ids(n);
            let mut table = vec![0u16; m];
            let mut next = vec![0u32; b.len()];
            fill(&b, &mut table, &mut next).unwrap();
            assert_eq!(table, reference(&b, m), "n={n} m={m}");
        }
    }
}
