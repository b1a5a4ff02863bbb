//! `cargo xtask bench lb`: what `drop_lb` costs per packet, by `BPF_PROG_TEST_RUN` (the kernel
//! times the program alone, no driver): a frame whose flow is in the connection table, a new
//! flow (table miss, Maglev ring, table insert), and a frame for no VIP (parse and pass).
//!
//! End to end, in network namespaces on one bridge (a client, the balancer node, three
//! backends holding the VIP on `lo`), side by side in one run: UDP datagrams from 64 client
//! ports to the VIP for a few seconds, forwarded by plain kernel routing (ECMP over the three,
//! L4 hash), by an nftables direct-routing rule at the balancer's ingress (`ether daddr set …
//! fwd`; IPVS is not built into our kernel), and by `drop_lb` in generic and native XDP mode;
//! and the client sending straight to the backends as the baseline. The figures: datagrams
//! delivered per second and CPU per delivered datagram (all CPUs, /proc/stat), and that CPU
//! minus the baseline's — what the balancer hop costs; and the CPU of the balancer's own
//! receive path per delivered datagram: its eth0 polls with threaded NAPI, so one kernel
//! thread receives, forwards (routing, nftables or XDP) and hands each frame to the wire, and
//! that thread's time on CPU (/proc/PID/schedstat) is the balancer's cost alone. The bridge's
//! port of the balancer polls in a thread of its own (the switch's work); every host's MAC is
//! a static bridge entry (no flooding); the client computes its UDP checksums itself (a frame
//! native XDP sends on as raw bytes keeps no checksum offload); for native mode the bridge's
//! port runs a pass-everything XDP program, since a veth hands XDP_TX frames to its peer's
//! XDP receive path.
//!
//! Prints progress on stderr and a markdown report on stdout. Root only. Usage:
//! `lb [--repeat N] [--flows N] [--secs S] [--no-e2e]`.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use drop_net::{Balancer, Forwarding, LbBackend, LbVip, XdpMode, XdpVerdict};
use drop_tests::netns::{Bridge, Netns};

const VIP: [u8; 4] = [10, 100, 0, 1];
const IPIP_VIP: [u8; 4] = [10, 100, 0, 2];

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
    let mut secs = 5u64;
    let mut e2e = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--repeat" => repeat = it.next().context("--repeat N")?.parse()?,
            "--flows" => flows = it.next().context("--flows N")?.parse()?,
            "--secs" => secs = it.next().context("--secs S")?.parse()?,
            "--no-e2e" => e2e = false,
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
        addr: Ipv4Addr::from(VIP).into(),
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

    // IPIP: a table hit encapsulated; and on a backend, the outer header taken off.
    let ipip_vip = LbVip {
        addr: Ipv4Addr::from(IPIP_VIP).into(),
        port: 80,
        proto: 6,
    };
    let source = Ipv4Addr::new(10, 0, 0, 254);
    lb.set_vip(ipip_vip, Forwarding::Ipip { source }, &backends)?;
    lb.set_decap_sources(&[source].into())?;
    let ipip_frame = frame(40002, IPIP_VIP);
    let first = lb.test_run(&ipip_frame, 1)?;
    ensure!(first.verdict == XdpVerdict::Tx, "IPIP not forwarded");
    let ipip = lb.test_run(&ipip_frame, repeat)?;
    eprintln!("  IPIP hit: {} ns", ipip.duration_ns);
    let decap = lb.test_run(&first.frame, repeat)?;
    ensure!(
        decap.verdict == XdpVerdict::Pass && decap.frame.len() == ipip_frame.len(),
        "the IPIP frame was not taken apart"
    );
    eprintln!("  decapsulation: {} ns", decap.duration_ns);

    // IPv6: a table hit.
    let vip6 = LbVip {
        addr: std::net::Ipv6Addr::new(0xfd00, 0, 0, 0x64, 0, 0, 0, 1).into(),
        port: 80,
        proto: 6,
    };
    lb.set_vip(vip6, Forwarding::MacRewrite, &backends)?;
    let frame6 = {
        let mut f = vec![2, 0x1b, 0, 0, 0, 1, 2, 0xc1, 0, 0, 0, 1, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
        f.extend_from_slice(&[0xfd, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
        if let std::net::IpAddr::V6(a) = vip6.addr {
            f.extend_from_slice(&a.octets());
        }
        f.extend_from_slice(&[
            0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 2, 0xff, 0xff,
        ]);
        f.extend_from_slice(&[0, 0, 0, 0]);
        f
    };
    ensure!(
        lb.test_run(&frame6, 1)?.verdict == XdpVerdict::Tx,
        "IPv6 not forwarded"
    );
    let hit6 = lb.test_run(&frame6, repeat)?;
    eprintln!("  IPv6 hit: {} ns", hit6.duration_ns);

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
    writeln!(
        out,
        "| connection-table hit, IPIP (outer header, XDP_TX) | {repeat} | {} | — |",
        ipip.duration_ns
    )?;
    writeln!(
        out,
        "| connection-table hit, IPv6 (MAC rewrite, XDP_TX) | {repeat} | {} | — |",
        hit6.duration_ns
    )?;
    writeln!(
        out,
        "| on a backend: IPIP taken apart (XDP_PASS) | {repeat} | {} | — |",
        decap.duration_ns
    )?;
    drop(lb);
    if e2e {
        let rows = end_to_end(Duration::from_secs(secs))?;
        writeln!(
            out,
            "\nEnd to end, UDP from 64 client ports for {secs} s per setup (2 vCPU; sender, balancer and backends share them):\n"
        )?;
        writeln!(
            out,
            "| setup | delivered datagrams/s | CPU per datagram µs | balancer hop µs (minus direct) | balancer's receive thread µs per datagram |"
        )?;
        writeln!(out, "|---|---:|---:|---:|---:|")?;
        let direct = rows
            .iter()
            .find(|r| r.name.starts_with("direct"))
            .map(|r| r.cpu_us);
        for r in &rows {
            let hop = match (direct, r.name.starts_with("direct")) {
                (_, true) => "—".to_string(),
                (Some(d), false) if r.delivered > 0 => format!("{:.2}", r.cpu_us - d),
                _ => "n/a".to_string(),
            };
            let thread = r
                .balancer_ns
                .map_or_else(|| "—".to_string(), |ns| format!("{:.2}", ns / 1000.0));
            if r.delivered == 0 {
                writeln!(out, "| {} | 0 | — | {} | — |", r.name, r.note)?;
            } else {
                writeln!(
                    out,
                    "| {} | {:.0} | {:.2} | {hop} | {thread} |",
                    r.name, r.rate, r.cpu_us
                )?;
            }
        }
    }
    print!("{out}");
    Ok(())
}

const E2E_VIP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 200);
const E2E_PORT: u16 = 7001;

struct Row {
    name: String,
    delivered: u64,
    rate: f64,
    cpu_us: f64,
    /// CPU of the balancer's receive thread per delivered datagram, ns.
    balancer_ns: Option<f64>,
    note: String,
}

/// Threads whose name starts with `prefix` (threaded NAPI: `napi/<dev>-<id>`).
fn threads_named(prefix: &str) -> anyhow::Result<std::collections::BTreeSet<u32>> {
    let mut out = std::collections::BTreeSet::new();
    for e in std::fs::read_dir("/proc")? {
        let e = e?;
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with(prefix)) {
            out.insert(pid);
        }
    }
    Ok(out)
}

/// Time on CPU of `pids` (their /proc/PID/schedstat), ns.
fn cpu_ns(pids: &std::collections::BTreeSet<u32>) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/schedstat")).ok())
        .filter_map(|t| {
            t.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// `echo 1 > /sys/class/net/DEV/threaded` in `ns` (through `ip netns exec`, which mounts that
/// namespace's /sys): the device's NAPI polls in a kernel thread of its own, whose CPU time is
/// then the device's receive path alone.
fn threaded_napi(ns: &Netns, dev: &str) -> anyhow::Result<()> {
    drop_tests::netns::check(std::process::Command::new("ip").args([
        "netns",
        "exec",
        ns.name(),
        "sh",
        "-c",
        &format!("echo 1 > /sys/class/net/{dev}/threaded"),
    ]))?;
    Ok(())
}

/// Busy jiffies of all CPUs (user, nice, system, irq, softirq, steal).
fn busy_jiffies() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    ensure!(v.len() >= 8, "/proc/stat: {line}");
    Ok(v[0] + v[1] + v[2] + v[5] + v[6] + v[7])
}

/// Sends from 64 ports to `to` for `secs` as fast as one thread can.
fn blast(client: &Netns, to: Ipv4Addr, secs: Duration) -> anyhow::Result<u64> {
    client.run(|| -> anyhow::Result<u64> {
        let socks: Vec<UdpSocket> = (0..64)
            .map(|_| UdpSocket::bind("0.0.0.0:0"))
            .collect::<Result<_, _>>()?;
        let payload = [0x5a_u8; 64];
        let end = Instant::now() + secs;
        let mut sent = 0u64;
        while Instant::now() < end {
            for s in &socks {
                if s.send_to(&payload, (to, E2E_PORT)).is_ok() {
                    sent += 1;
                }
            }
        }
        Ok(sent)
    })?
}

fn end_to_end(secs: Duration) -> anyhow::Result<Vec<Row>> {
    let bridge = Bridge::new(5)?;
    let (client, lb_host) = (bridge.host(0), bridge.host(1));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut sinks = Vec::new();
    let backends: Vec<LbBackend> = (2..5)
        .map(|i| LbBackend {
            id: i as u64,
            addr: bridge.host(i).addr(),
            mac: bridge.host(i).mac().0,
            weight: 1,
        })
        .collect();
    for i in 2..5 {
        let h = bridge.host(i);
        h.netns()
            .ip(&["addr", "add", &format!("{E2E_VIP}/32"), "dev", "lo"])?;
        for kv in [
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
        ] {
            h.netns().exec("sysctl", &["-qw", kv])?;
        }
        let (stop, count) = (stop.clone(), count.clone());
        sinks.push(h.netns().spawn(move || {
            let s = UdpSocket::bind(("0.0.0.0", E2E_PORT))?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if s.recv(&mut buf).is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        }));
    }
    for kv in [
        "net.ipv4.conf.all.accept_redirects=0",
        "net.ipv4.conf.eth0.accept_redirects=0",
    ] {
        client.netns().exec("sysctl", &["-qw", kv])?;
    }
    // The client fills in its UDP checksums itself: a veth otherwise leaves them to an
    // "offload" that only the skb remembers, and a frame that native XDP sends on as raw bytes
    // would reach the backends with a partial checksum (and be dropped there).
    client
        .netns()
        .exec("ethtool", &["-K", "eth0", "tx", "off"])?;
    // The balancer's eth0 and its peer on the bridge poll with NAPI (GRO on), each in a thread
    // of its own: the balancer thread's CPU is what the balancer spends per datagram (receive,
    // forward, hand to the wire), the peer's is the switch's. Native XDP_TX on a veth also
    // needs the peer's NAPI.
    let before = threads_named("napi/eth0-")?;
    // (A veth takes the NAPI path only for frames it could aggregate: from a sender without
    // TSO.)
    lb_host
        .netns()
        .exec("ethtool", &["-K", "eth0", "gro", "on", "tso", "off"])?;
    bridge.hub().exec(
        "ethtool",
        &["-K", lb_host.hub_port(), "gro", "on", "tso", "off"],
    )?;
    threaded_napi(lb_host.netns(), "eth0")?;
    threaded_napi(bridge.hub(), lb_host.hub_port())?;
    let lb_threads = || -> anyhow::Result<std::collections::BTreeSet<u32>> {
        let now = threads_named("napi/eth0-")?;
        Ok(now.difference(&before).copied().collect())
    };
    ensure!(
        !lb_threads()?.is_empty(),
        "no NAPI thread for the balancer's eth0"
    );
    // Every host's MAC is a static entry of the bridge: the backends only receive, and a bridge
    // that never hears from them would flood every datagram to every port.
    for h in bridge.hosts() {
        bridge.hub().exec(
            "bridge",
            &[
                "fdb",
                "replace",
                &h.mac().to_string(),
                "dev",
                h.hub_port(),
                "master",
                "static",
            ],
        )?;
    }
    let via = lb_host.addr().to_string();
    let vip32 = format!("{E2E_VIP}/32");
    let measure = |name: &str, to: Ipv4Addr, rows: &mut Vec<Row>| -> anyhow::Result<()> {
        std::thread::sleep(Duration::from_millis(200));
        let threads = lb_threads()?;
        let c0 = count.load(Ordering::Relaxed);
        let j0 = busy_jiffies()?;
        let n0 = cpu_ns(&threads);
        let t0 = Instant::now();
        let sent = blast(client.netns(), to, secs)?;
        std::thread::sleep(Duration::from_millis(100));
        let elapsed = t0.elapsed().as_secs_f64();
        let jiffies = busy_jiffies()? - j0;
        let napi_ns = cpu_ns(&threads) - n0;
        let delivered = count.load(Ordering::Relaxed) - c0;
        let cpu_s = jiffies as f64 / 100.0;
        let row = Row {
            name: name.to_string(),
            delivered,
            rate: delivered as f64 / elapsed,
            cpu_us: if delivered > 0 {
                cpu_s * 1e6 / delivered as f64
            } else {
                0.0
            },
            balancer_ns: (delivered > 0 && to == E2E_VIP)
                .then(|| napi_ns as f64 / delivered as f64),
            note: format!("{sent} sent, none delivered"),
        };
        eprintln!(
            "  {name}: {sent} sent, {delivered} delivered ({:.0}/s), {:.2} µs CPU each, balancer thread {:.0} ns each",
            row.rate,
            row.cpu_us,
            row.balancer_ns.unwrap_or(0.0)
        );
        rows.push(row);
        Ok(())
    };
    let mut rows = Vec::new();
    measure(
        "direct to the backends (baseline, no balancer hop)",
        backends[0].addr,
        &mut rows,
    )?;

    // Plain kernel routing: ECMP over the three, hashed on L4.
    client.netns().ip(&["route", "add", &vip32, "via", &via])?;
    for kv in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.fib_multipath_hash_policy=1",
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.eth0.send_redirects=0",
    ] {
        lb_host.netns().exec("sysctl", &["-qw", kv])?;
    }
    let mut route = vec!["route", "add", vip32.as_str()];
    let hops: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    for h in &hops {
        route.extend(["nexthop", "via", h.as_str()]);
    }
    lb_host.netns().ip(&route)?;
    measure("kernel routing (ECMP, L4 hash)", E2E_VIP, &mut rows)?;
    lb_host.netns().ip(&["route", "del", &vip32])?;
    lb_host
        .netns()
        .exec("sysctl", &["-qw", "net.ipv4.ip_forward=0"])?;

    // nftables direct routing at ingress: the destination MAC by a hash of the flow, out again.
    let macs: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{i} : {}", drop_net::Mac(b.mac)))
        .collect();
    let ruleset = format!(
        "table netdev droplb {{\n chain in {{\n  type filter hook ingress device \"eth0\" priority 0; policy accept;\n  ip daddr {E2E_VIP} udp dport {E2E_PORT} ether daddr set jhash ip saddr . udp sport mod 3 map {{ {} }} fwd to \"eth0\"\n }}\n}}\n",
        macs.join(", ")
    );
    let file = std::env::temp_dir().join(format!("droplb-{}.nft", std::process::id()));
    std::fs::write(&file, &ruleset)?;
    let nft = lb_host
        .netns()
        .exec("nft", &["-f", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    match nft {
        Ok(_) => {
            measure(
                "nftables DR (netdev ingress, jhash → MAC, fwd)",
                E2E_VIP,
                &mut rows,
            )?;
            lb_host
                .netns()
                .exec("nft", &["delete", "table", "netdev", "droplb"])?;
        }
        Err(e) => eprintln!("  nftables DR not measured: {e:#}"),
    }

    // drop_lb. For native mode the peer on the bridge runs a pass-everything XDP program
    // (`drop_count`) natively too: a veth hands XDP_TX frames to its peer's XDP receive path.
    for mode in [XdpMode::Generic, XdpMode::Native] {
        let mut peer_pass = None;
        if mode == XdpMode::Native {
            let mut c = drop_net::XdpCounter::load()?;
            let port = lb_host.hub_port().to_string();
            bridge.hub().run(|| c.attach(&port, XdpMode::Native))??;
            peer_pass = Some(c);
        }
        let mut lb = Balancer::load()?;
        lb.set_vip(
            LbVip {
                addr: E2E_VIP.into(),
                port: E2E_PORT,
                proto: 17,
            },
            Forwarding::MacRewrite,
            &backends,
        )?;
        match lb_host.netns().run(|| lb.attach("eth0", mode))? {
            Ok(_) => {
                measure(&format!("drop_lb, {mode} XDP"), E2E_VIP, &mut rows)?;
                let _ = lb_host.netns().run(|| lb.detach());
            }
            Err(e) => eprintln!("  drop_lb {mode} not measured: {e}"),
        }
        if let Some(mut c) = peer_pass {
            let _ = bridge.hub().run(|| c.detach());
        }
    }
    stop.store(true, Ordering::Relaxed);
    for s in sinks {
        let _ = s.join();
    }
    Ok(rows)
}
