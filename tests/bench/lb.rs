//! `cargo xtask bench lb`: what `drop_lb` costs per packet, by `BPF_PROG_TEST_RUN` (the kernel
//! times the program alone, no driver): a frame whose flow is in the connection table, a new
//! flow (table miss, Maglev ring, table insert), and a frame for no VIP (parse and pass).
//!
//! Prints progress on stderr and a markdown report on stdout. Root only. Usage:
//! `lb [--repeat N] [--flows N]`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use drop_net::{Balancer, Forwarding, LbBackend, LbVip, XdpVerdict};

const VIP: [u8; 4] = [10, 100, 0, 1];

fn frame(sport: u16, dst: [u8; 4]) -> Vec<u8> {
    let mut f = vec![2, 0x1b, 0, 0, 0, 1, 2, 0xc1, 0, 0, 0, 1, 8, 0];
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 192, 168, 7, 9];
    ip.extend_from_slice(&dst);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&80u16.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut repeat = 1_000_000u32;
    let mut flows = 20_000u16;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--repeat" => repeat = it.next().context("--repeat N")?.parse()?,
            "--flows" => flows = it.next().context("--flows N")?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument {other:?}; usage: lb [--repeat N] [--flows N]"),
        }
    }
    ensure!(nix::unistd::Uid::effective().is_root(), "needs root (BPF)");
    let mut lb = Balancer::load().context("loading drop_lb (cargo xtask build-ebpf first)")?;
    let backends: Vec<LbBackend> = (1..=3u8)
        .map(|n| LbBackend {
            id: u64::from(n),
            addr: Ipv4Addr::new(10, 0, 0, n),
            mac: [2, 0xbe, 0, 0, 0, n],
            weight: 1,
        })
        .collect();
    let vip = LbVip {
        addr: Ipv4Addr::from(VIP),
        port: 80,
        proto: 6,
    };
    let t = Instant::now();
    lb.set_vip(vip, Forwarding::MacRewrite, &backends)?;
    let program_ms = t.elapsed().as_secs_f64() * 1e3;

    // Connection-table hit: the first run records the flow, the rest find it.
    let hit_frame = frame(40000, VIP);
    ensure!(
        lb.test_run(&hit_frame, 1)?.verdict == XdpVerdict::Tx,
        "not forwarded"
    );
    let hit = lb.test_run(&hit_frame, repeat)?;
    eprintln!("  hit: {} ns over {repeat} runs", hit.duration_ns);

    // New flows: one run each (miss, ring, insert).
    let mut total = 0u64;
    for sport in 1..=flows {
        let r = lb.test_run(&frame(sport, VIP), 1)?;
        ensure!(r.verdict == XdpVerdict::Tx, "flow {sport} not forwarded");
        total += r.duration_ns;
    }
    let new_flow = total as f64 / f64::from(flows);
    eprintln!("  new flow: {new_flow:.0} ns mean over {flows} flows");

    // Not for a VIP: parsed, looked up, passed.
    let pass = lb.test_run(&frame(40001, [10, 100, 0, 99]), repeat)?;
    ensure!(
        pass.verdict == XdpVerdict::Pass,
        "a non-VIP frame was not passed"
    );
    eprintln!("  non-VIP: {} ns", pass.duration_ns);

    let mut out = String::new();
    writeln!(
        out,
        "drop_lb per packet by BPF_PROG_TEST_RUN (the program alone, on one CPU; 3 backends, ring of 65,537; writing the ring took {program_ms:.0} ms)\n"
    )?;
    writeln!(out, "| case | runs | ns per packet | target |")?;
    writeln!(out, "|---|---:|---:|---|")?;
    writeln!(
        out,
        "| connection-table hit (MAC rewrite, XDP_TX) | {repeat} | {} | ≤ 100 ns: {} |",
        hit.duration_ns,
        if hit.duration_ns <= 100 {
            "met"
        } else {
            "NOT met"
        }
    )?;
    writeln!(
        out,
        "| new flow (table miss → Maglev ring → table insert) | {flows} | {new_flow:.0} | — |"
    )?;
    writeln!(
        out,
        "| not a VIP (parse, lookup, XDP_PASS) | {repeat} | {} | — |",
        pass.duration_ns
    )?;
    print!("{out}");
    Ok(())
}
