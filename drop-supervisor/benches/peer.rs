//! `cargo xtask bench peer`: what the sealed peer transport adds to one node-to-node call — the
//! caller sealing the request, the callee opening it (replay window included) and sealing the
//! reply, the caller opening the reply — for a few payload sizes, against the HMAC signature
//! it replaced (sign + verify of the request only). Single thread, in process: the crypto
//! alone; the network part of a forwarded call is unchanged.

use std::hint::black_box;
use std::time::{Duration, Instant};

use drop_supervisor::cluster::peer::PeerKey;
use drop_supervisor::cluster::seal::{Opener, Sealer};

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fn per_call(mut f: impl FnMut(), min: Duration) -> f64 {
    // Warm up, then run until `min` has passed.
    for _ in 0..1000 {
        f();
    }
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < min {
        for _ in 0..1000 {
            f();
        }
        n += 1000;
    }
    started.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn main() {
    let min = Duration::from_millis(
        std::env::args()
            .skip_while(|a| a != "--ms")
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000),
    );
    let base = [7u8; 32];
    let key = PeerKey::derive(KEY).expect("the fixed key derives");
    let to = "10.0.0.2:7947".parse().expect("an address");
    println!(
        "| payload | sealed call (seal, open, seal reply, open reply) µs | HMAC sign + verify (before) µs |"
    );
    println!("|---:|---:|---:|");
    for size in [64usize, 1024, 16 * 1024, 256 * 1024] {
        let body = vec![0x5au8; size];
        let sealer = Sealer::new(&base);
        let opener = Opener::new(&base);
        let mut now = 1_800_000_000_000u64;
        let sealed = per_call(
            || {
                now += 1;
                let req = sealer.seal(to, "POST", "/api/v1/echo", &body, now);
                let opened = opener
                    .open(Some(&req.header), &req.body, "10.0.0.2:7947", now)
                    .expect("opens");
                let reply = opened.reply.seal(200, "text/plain", &opened.body);
                black_box(req.reply.open(&reply).expect("reply opens"));
            },
            min,
        );
        let hmac = per_call(
            || {
                let sig = key.sign(now, "POST", "/api/v1/echo", &body);
                black_box(
                    key.verify(Some(&sig), "POST", "/api/v1/echo", &body, now)
                        .is_ok(),
                );
            },
            min,
        );
        println!("| {size} B | {sealed:.2} | {hmac:.2} |");
    }
}
