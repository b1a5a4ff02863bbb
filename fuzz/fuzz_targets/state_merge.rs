//! Replicated-state deltas as they arrive from peers (JSON lists of entries): decoding never
//! panics, and merging two deltas in either order gives the same map (last writer wins).
#![no_main]

use libfuzzer_sys::fuzz_target;

use drop_supervisor::cluster::state::{Entry, StateMap};

fuzz_target!(|data: &[u8]| {
    let half = data.len() / 2;
    let decode = |bytes: &[u8]| serde_json::from_slice::<Vec<(String, Entry)>>(bytes).ok();
    let (Some(a), Some(b)) = (decode(&data[..half]), decode(&data[half..])) else {
        return;
    };
    let mut ab = StateMap::new();
    ab.apply(a.clone());
    ab.apply(b.clone());
    let mut ba = StateMap::new();
    ba.apply(b);
    ba.apply(a);
    assert_eq!(ab.digest(), ba.digest());
    for (key, _) in ab.digest() {
        assert_eq!(ab.entry(&key), ba.entry(&key), "{key}");
    }
});
