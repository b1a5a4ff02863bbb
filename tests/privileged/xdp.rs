//! The XDP counter: exact counts on hand-made frames (BPF_PROG_TEST_RUN), and on real UDP
//! traffic between two namespaces in generic and native mode, without losing a datagram.

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use drop_net::{Count, Destination, Protocol, Stats, XdpCounter, XdpError, XdpMode, XdpVerdict};
use drop_tests::netns::{Bridge, Netns};
use drop_tests::{Outcome, Test, require_command, require_root};

pub const TESTS: &[Test] = &[
    Test {
        name: "xdp_test_run_counts_and_passes",
        run: test_run_counts_and_passes,
    },
    Test {
        name: "xdp_attach_veth_counts_traffic",
        run: attach_veth_counts_traffic,
    },
];

/// Loads the counter, or the reason to skip: not root, or the object was not built into drop-net.
fn load_or_skip() -> anyhow::Result<Result<XdpCounter, Outcome>> {
    if let Some(skip) = require_root() {
        return Ok(Err(skip));
    }
    match XdpCounter::load() {
        Ok(counter) => Ok(Ok(counter)),
        Err(XdpError::NotBuilt) => Ok(Err(Outcome::Skip(format!("{}", XdpError::NotBuilt)))),
        Err(err) => Err(err).context("loading the XDP counter"),
    }
}

// Hand-made frames. Checksums are filled in although the program does not read them.

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const SRC_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 10);

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4(proto: u8, dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + l4.len()).expect("small test frame");
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]); // id 1, DF, TTL 64, checksum 0
    h.extend_from_slice(&SRC_IP.octets());
    h.extend_from_slice(&dst.octets());
    let sum = checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(l4);
    ethernet(0x0800, &h)
}

fn udp(dst: Ipv4Addr, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("small test frame");
    let mut u = Vec::new();
    u.extend_from_slice(&40000u16.to_be_bytes());
    u.extend_from_slice(&dst_port.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]); // no checksum (allowed for UDP over IPv4)
    u.extend_from_slice(payload);
    ipv4(17, dst, &u)
}

fn tcp_syn(dst: Ipv4Addr, dst_port: u16) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&40001u16.to_be_bytes());
    t.extend_from_slice(&dst_port.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]); // seq 1, SYN
    ipv4(6, dst, &t)
}

fn icmp_echo(dst: Ipv4Addr) -> Vec<u8> {
    let mut i = vec![8, 0, 0, 0, 0, 1, 0, 1, b'd', b'r', b'o', b'p'];
    let sum = checksum(&i);
    i[2..4].copy_from_slice(&sum.to_be_bytes());
    ipv4(1, dst, &i)
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    a.extend_from_slice(&SRC_MAC);
    a.extend_from_slice(&SRC_IP.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    ethernet(0x0806, &a)
}

fn test_run_counts_and_passes() -> anyhow::Result<Outcome> {
    let counter = match load_or_skip()? {
        Ok(counter) => counter,
        Err(skip) => return Ok(skip),
    };
    let udp_dst = Ipv4Addr::new(10, 201, 0, 99);
    let tcp_dst = Ipv4Addr::new(10, 201, 0, 98);
    let udp_frame = udp(udp_dst, 5353, b"hello drop");
    let tcp_frame = tcp_syn(tcp_dst, 8080);
    let icmp_frame = icmp_echo(udp_dst);
    let arp_frame = arp_request(udp_dst);
    // Ethernet header and the first 10 bytes of the IPv4 header: no addresses yet.
    let truncated = udp_frame[..14 + 10].to_vec();

    let empty = counter.stats()?;
    ensure!(
        empty == Stats::default(),
        "a fresh counter: expected zero stats, got {empty:?}"
    );
    ensure!(
        counter.destinations()?.is_empty(),
        "a fresh counter has destinations: {:?}",
        counter.destinations()?
    );

    // (frame, repeat): the UDP frame twice, the TCP frame once with repeat 5.
    let runs: [(&str, &[u8], u32); 6] = [
        ("udp", &udp_frame, 1),
        ("udp again", &udp_frame, 1),
        ("tcp x5", &tcp_frame, 5),
        ("icmp", &icmp_frame, 1),
        ("arp", &arp_frame, 1),
        ("truncated ipv4", &truncated, 1),
    ];
    for (what, frame, repeat) in runs {
        let run = counter
            .test_run(frame, repeat)
            .with_context(|| format!("test run: {what}"))?;
        ensure!(
            run.verdict == XdpVerdict::Pass,
            "{what}: expected verdict Pass, got {:?}",
            run.verdict
        );
    }
    let short = counter.test_run(&udp_frame[..13], 1);
    ensure!(
        matches!(short, Err(XdpError::FrameTooShort { len: 13 })),
        "a 13-byte frame: expected FrameTooShort {{ len: 13 }}, got {short:?}"
    );

    let len = |f: &[u8]| f.len() as u64;
    let mut want = vec![
        (
            Destination {
                addr: udp_dst,
                port: 5353,
                proto: Protocol::Udp,
            },
            Count {
                packets: 2,
                bytes: 2 * len(&udp_frame),
            },
        ),
        (
            Destination {
                addr: tcp_dst,
                port: 8080,
                proto: Protocol::Tcp,
            },
            Count {
                packets: 5,
                bytes: 5 * len(&tcp_frame),
            },
        ),
        (
            Destination {
                addr: udp_dst,
                port: 0,
                proto: Protocol::Icmp,
            },
            Count {
                packets: 1,
                bytes: len(&icmp_frame),
            },
        ),
    ];
    want.sort_by_key(|(dst, _)| *dst);
    let got = counter.destinations()?;
    ensure!(
        got == want,
        "destinations:\n expected {want:?}\n      got {got:?}"
    );

    let stats = counter.stats()?;
    let want_stats = Stats {
        frames: 10,
        ipv4: 8,
        other: 2,
        map_full: 0,
    };
    ensure!(
        stats == want_stats,
        "stats: expected {want_stats:?}, got {stats:?}"
    );
    Ok(Outcome::Pass)
}

const DATAGRAMS: usize = 50;
const PORT: u16 = 9000;
/// Ethernet 14 + IPv4 20 + UDP 8 + the 8-byte payload `drop-NNN`.
const FRAME_LEN: u64 = 14 + 20 + 8 + 8;

fn attach_veth_counts_traffic() -> anyhow::Result<Outcome> {
    for cmd in ["ip", "nsenter"] {
        if let Some(skip) = require_command(cmd) {
            return Ok(skip);
        }
    }
    if let Err(skip) = load_or_skip()? {
        return Ok(skip);
    }
    // Generic mode detaches explicitly; native mode relies on dropping the counter.
    for mode in [XdpMode::Generic, XdpMode::Native] {
        attach_and_count(mode).with_context(|| format!("{mode} mode"))?;
    }
    Ok(Outcome::Pass)
}

/// What the receiving namespace saw.
struct Received {
    payloads: Vec<String>,
    destinations: Vec<(Destination, Count)>,
    stats: Stats,
}

fn attach_and_count(mode: XdpMode) -> anyhow::Result<()> {
    let bridge = Bridge::new(2)?;
    let (sender, receiver) = (bridge.host(0), bridge.host(1));
    let mut counter = XdpCounter::load()?;
    let (ready_tx, ready_rx) = mpsc::channel();

    let received = thread::scope(|scope| -> anyhow::Result<Received> {
        let counter = &mut counter;
        let rx_thread = scope.spawn(move || {
            receiver
                .netns()
                .run(move || receive(counter, mode, receiver.addr(), ready_tx))
        });
        // Wait for attach + bind; if the receiver failed instead, its error is the answer.
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let result = rx_thread
                .join()
                .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?;
            result??;
            bail!("the receiver never became ready");
        }
        let attached = xdp_attachment(receiver.netns(), receiver.ifname())?;
        let want_mode = if mode == XdpMode::Native { 1 } else { 2 }; // XDP_ATTACHED_DRV / _SKB
        ensure!(
            attached.as_ref().is_some_and(|x| x["mode"] == want_mode),
            "while attached: expected `ip -d link` xdp mode {want_mode}, got {attached:?}"
        );
        sender.netns().run(|| send(receiver.addr()))??;
        rx_thread
            .join()
            .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??
    })?;

    if mode != XdpMode::Generic {
        ensure!(
            counter.attached().is_some(),
            "native: expected the counter still attached before drop"
        );
        drop(counter);
    } else {
        ensure!(
            counter.attached().is_none(),
            "generic: expected detached, got {:?}",
            counter.attached()
        );
    }

    let mut got = received.payloads.clone();
    got.sort();
    got.dedup();
    ensure!(
        got.len() == DATAGRAMS,
        "receiver got {} distinct datagrams, expected {DATAGRAMS}",
        got.len()
    );

    let dst = Destination {
        addr: receiver.addr(),
        port: PORT,
        proto: Protocol::Udp,
    };
    let count = received
        .destinations
        .iter()
        .find(|(d, _)| *d == dst)
        .map(|(_, c)| *c);
    let want = Count {
        packets: DATAGRAMS as u64,
        bytes: DATAGRAMS as u64 * FRAME_LEN,
    };
    ensure!(
        count == Some(want),
        "counter for {dst}: expected {want:?}, got {count:?} (all: {:?})",
        received.destinations
    );
    let s = received.stats;
    ensure!(
        s.frames == s.ipv4 + s.other,
        "stats: frames {} != ipv4 {} + other {}",
        s.frames,
        s.ipv4,
        s.other
    );
    ensure!(
        s.ipv4 >= DATAGRAMS as u64 && s.map_full == 0,
        "stats: expected ipv4 >= {DATAGRAMS}, map_full 0, got {s:?}"
    );

    let attached = xdp_attachment(receiver.netns(), receiver.ifname())?;
    ensure!(
        attached.is_none(),
        "after detach: expected no xdp in `ip -j -d link`, got {attached:?}"
    );
    let text = receiver
        .netns()
        .ip(&["-d", "link", "show", "dev", receiver.ifname()])?;
    ensure!(
        !text.contains("prog/xdp"),
        "after detach: `ip -d link show` still lists a program:\n{text}"
    );
    Ok(())
}

/// In the receiver's namespace: attach, bind, signal ready, receive up to DATAGRAMS (5 s at
/// most), read the counters, detach (generic mode only).
fn receive(
    counter: &mut XdpCounter,
    mode: XdpMode,
    addr: Ipv4Addr,
    ready: mpsc::Sender<()>,
) -> anyhow::Result<Received> {
    counter.attach(Bridge::IFNAME, mode)?;
    let socket = UdpSocket::bind((addr, PORT)).with_context(|| format!("binding {addr}:{PORT}"))?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    ready.send(()).context("signalling ready")?;

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut payloads = Vec::new();
    let mut buf = [0u8; 64];
    while payloads.len() < DATAGRAMS && Instant::now() < deadline {
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => payloads.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("receiving"),
        }
    }
    let received = Received {
        payloads,
        destinations: counter.destinations()?,
        stats: counter.stats()?,
    };
    if mode == XdpMode::Generic {
        counter.detach()?;
    }
    Ok(received)
}

/// In the sender's namespace: DATAGRAMS datagrams `drop-000`.. to addr:PORT, 2 ms apart.
fn send(to: Ipv4Addr) -> anyhow::Result<()> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    for i in 0..DATAGRAMS {
        socket
            .send_to(format!("drop-{i:03}").as_bytes(), (to, PORT))
            .with_context(|| format!("sending datagram {i}"))?;
        thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// The `xdp` object of `ip -j -d link show dev IFNAME` in `netns`, if a program is attached.
fn xdp_attachment(netns: &Netns, ifname: &str) -> anyhow::Result<Option<serde_json::Value>> {
    let link = netns.ip_json(&["-d", "link", "show", "dev", ifname])?;
    Ok(link[0].get("xdp").cloned())
}
