//! The L4 balancer `drop_lb`, packet by packet: hand-made frames through `BPF_PROG_TEST_RUN`,
//! each checked for its verdict and the exact bytes the program leaves (Katran's way of
//! testing its XDP program), plus the counters and the connection table behind them.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use drop_common::lb::{FlowKey, LbStat};
use drop_net::{Balancer, Forwarding, LbBackend, LbVip, XdpError, XdpMode, XdpVerdict};
use drop_tests::netns::Bridge;
use drop_tests::{Outcome, Test, require_command, require_root};

pub const TESTS: &[Test] = &[
    Test {
        name: "lb_fixtures_verdicts_and_exact_bytes",
        run: fixtures,
    },
    Test {
        name: "lb_end_to_end_dsr_backend_change_failover_and_pinned_restart",
        run: end_to_end,
    },
    Test {
        name: "lb_ipip_to_routed_backends_through_a_router",
        run: ipip_routed,
    },
    Test {
        name: "lb_ipv6_vip_end_to_end_dsr_and_backend_removal",
        run: ipv6_end_to_end,
    },
    Test {
        name: "lb_service_port_balanced_on_the_namespace_vip",
        run: service_port,
    },
    Test {
        name: "lb_pins_of_another_layout_are_replaced",
        run: foreign_pins,
    },
];

const TCP: u8 = 6;
const UDP: u8 = 17;
const CLIENT: [u8; 4] = [192, 168, 7, 9];
const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x01];
/// The balancer's own interface: frames to a VIP arrive addressed to it.
const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x01];

const VIP_A: [u8; 4] = [10, 100, 0, 1];
const VIP_B: [u8; 4] = [10, 100, 0, 2];
const VIP_C: [u8; 4] = [10, 100, 0, 3];
const VIP_D: [u8; 4] = [10, 100, 0, 4];
const VIP_M: [u8; 4] = [10, 100, 0, 5];
const IPIP_SRC: [u8; 4] = [10, 0, 0, 254];

fn backend(n: u8, weight: u32) -> LbBackend {
    LbBackend {
        id: u64::from(n) * 7919,
        addr: Ipv4Addr::new(10, 0, 0, n),
        mac: [0x02, 0xbe, 0, 0, 0, n],
        weight,
    }
}

/// RFC 1071 sum over `data` (an odd length padded with zero), folded, not inverted.
fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

fn ip_header(src: [u8; 4], dst: [u8; 4], proto: u8, payload: usize, frag: u16) -> Vec<u8> {
    let total = (20 + payload) as u16;
    let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = !(sum16(&h, 0) as u16);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// A TCP (a bare SYN) or UDP segment carrying `payload`, its checksum over `pseudo` (the IP
/// version's pseudo-header) and the segment.
fn segment(proto: u8, sport: u16, dport: u16, payload: &[u8], pseudo: &[u8]) -> Vec<u8> {
    let mut seg = Vec::new();
    seg.extend_from_slice(&sport.to_be_bytes());
    seg.extend_from_slice(&dport.to_be_bytes());
    if proto == TCP {
        seg.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        seg.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        seg.extend_from_slice(&[0, 0]);
    }
    seg.extend_from_slice(payload);
    let c = !(sum16(&seg, sum16(pseudo, 0)) as u16);
    let at = if proto == TCP { 16 } else { 6 };
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    seg
}

/// The segment length a TCP SYN or UDP header with `payload` has.
fn segment_len(proto: u8, payload: &[u8]) -> usize {
    payload.len() + if proto == TCP { 20 } else { 8 }
}

fn l4(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(segment_len(proto, payload) as u16).to_be_bytes());
    segment(proto, sport, dport, payload, &pseudo)
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A client's TCP or UDP frame to `dst:dport`.
fn packet(proto: u8, sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let seg = l4(CLIENT, dst, proto, sport, dport, payload);
    let mut ip = ip_header(CLIENT, dst, proto, seg.len(), 0x4000);
    ip.extend_from_slice(&seg);
    eth(LB_MAC, CLIENT_MAC, 0x0800, &ip)
}

const CLIENT6: [u8; 16] = [0xfd, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
const VIP6_A: [u8; 16] = [0xfd, 0, 0, 0x64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// A client's TCP or UDP frame over IPv6 to `[dst]:dport`, after a chain of `ext` extension
/// headers (next-header values; each 8 bytes long).
fn packet6(
    proto: u8,
    sport: u16,
    dst: [u8; 16],
    dport: u16,
    payload: &[u8],
    ext: &[u8],
) -> Vec<u8> {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&CLIENT6);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&(segment_len(proto, payload) as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    let seg = segment(proto, sport, dport, payload, &pseudo);
    // Extension headers: each names the next; the last names the transport.
    let mut chain = Vec::new();
    for (i, _) in ext.iter().enumerate() {
        let next = ext.get(i + 1).copied().unwrap_or(proto);
        chain.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
    }
    let first = ext.first().copied().unwrap_or(proto);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&((chain.len() + seg.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[first, 64]);
    ip.extend_from_slice(&CLIENT6);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(&chain);
    ip.extend_from_slice(&seg);
    eth(LB_MAC, CLIENT_MAC, 0x86dd, &ip)
}

fn vip6(addr: [u8; 16], port: u16, proto: u8) -> LbVip {
    LbVip {
        addr: Ipv6Addr::from(addr).into(),
        port,
        proto,
    }
}

/// `frame` as the MAC rewrite leaves it: to `mac`, from the balancer's MAC; nothing else.
fn rewritten(frame: &[u8], mac: [u8; 6]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[..6].copy_from_slice(&mac);
    f[6..12].copy_from_slice(&LB_MAC);
    f
}

/// `frame` in IPIP to `b`: Ethernet to its next hop, an outer header built here on its own.
fn encapsulated(frame: &[u8], b: &LbBackend) -> Vec<u8> {
    encapsulated_from(frame, b, IPIP_SRC)
}

/// [`encapsulated`] with outer source `src`.
fn encapsulated_from(frame: &[u8], b: &LbBackend, src: [u8; 4]) -> Vec<u8> {
    let inner = &frame[14..];
    let total = (inner.len() + 20) as u16;
    let mut outer = vec![0x45, inner[1], 0, 0, 0, 0, 0, 0, 64, 4, 0, 0];
    outer[2..4].copy_from_slice(&total.to_be_bytes());
    outer.extend_from_slice(&src);
    outer.extend_from_slice(&b.addr.octets());
    let c = !(sum16(&outer, 0) as u16);
    outer[10..12].copy_from_slice(&c.to_be_bytes());
    outer.extend_from_slice(inner);
    eth(b.mac, LB_MAC, 0x0800, &outer)
}

/// The ICMP "fragmentation needed" answer to `frame` naming `mtu`: to its sender from the
/// balancer, from the VIP, quoting its IP header and 8 more bytes (RFC 792, RFC 1191).
fn too_big_answer(frame: &[u8], mtu: u16) -> Vec<u8> {
    let (ip, quoted) = (&frame[14..34], &frame[14..42]);
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let c = !(sum16(&icmp, 0) as u16);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut h = vec![0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0];
    h.extend_from_slice(&ip[16..20]);
    h.extend_from_slice(&ip[12..16]);
    let c = !(sum16(&h, 0) as u16);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(&icmp);
    eth(CLIENT_MAC, LB_MAC, 0x0800, &h)
}

fn flow(proto: u8, sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    FlowKey {
        src: CLIENT,
        dst,
        sport,
        dport,
        proto,
        _pad: [0; 3],
    }
}

fn vip(addr: [u8; 4], port: u16, proto: u8) -> LbVip {
    LbVip {
        addr: Ipv4Addr::from(addr).into(),
        port,
        proto,
    }
}

struct Fixtures {
    count: usize,
}

impl Fixtures {
    /// One case: `input` gives `verdict` and exactly `output`.
    fn case(
        &mut self,
        lb: &Balancer,
        name: &str,
        input: &[u8],
        verdict: XdpVerdict,
        output: &[u8],
    ) -> anyhow::Result<()> {
        let run = lb.test_run(input, 1).with_context(|| name.to_string())?;
        ensure!(
            run.verdict == verdict,
            "{name}: verdict {:?}, expected {verdict:?}",
            run.verdict
        );
        ensure!(
            run.frame == output,
            "{name}: output differs\n  got      {:02x?}\n  expected {:02x?}",
            run.frame,
            output
        );
        self.count += 1;
        println!(
            "  ok {:>2} {name}: {verdict:?}, {} bytes",
            self.count,
            output.len()
        );
        Ok(())
    }

    /// A case whose frame must pass untouched.
    fn passes(&mut self, lb: &Balancer, name: &str, input: &[u8]) -> anyhow::Result<()> {
        self.case(lb, name, input, XdpVerdict::Pass, input)
    }
}

fn fixtures() -> anyhow::Result<Outcome> {
    if let Some(skip) = require_root() {
        return Ok(skip);
    }
    let mut lb = match Balancer::load() {
        Ok(lb) => lb,
        Err(XdpError::NotBuilt) => return Ok(Outcome::Skip(XdpError::NotBuilt.to_string())),
        Err(e) => return Err(e).context("loading drop_lb"),
    };
    let (b1, b2, b3) = (backend(11, 1), backend(12, 1), backend(13, 1));
    let routed = LbBackend {
        id: 21,
        addr: Ipv4Addr::new(10, 9, 0, 21),
        mac: [0x02, 0x4e, 0, 0, 0, 0xfe],
        weight: 1,
    };
    lb.set_vip(vip(VIP_A, 80, TCP), Forwarding::MacRewrite, &[b1])?;
    lb.set_vip(vip(VIP_A, 53, UDP), Forwarding::MacRewrite, &[b2])?;
    lb.set_vip(
        vip(VIP_B, 443, TCP),
        Forwarding::Ipip {
            source: Ipv4Addr::from(IPIP_SRC),
        },
        &[routed],
    )?;
    lb.set_vip(vip(VIP_C, 80, TCP), Forwarding::MacRewrite, &[])?;
    lb.set_vip(vip(VIP_M, 80, TCP), Forwarding::MacRewrite, &[b1, b2, b3])?;
    let mut fx = Fixtures { count: 0 };

    // TCP and UDP to a VIP: a new flow, then the connection table.
    let syn = packet(TCP, 40001, VIP_A, 80, b"");
    fx.case(
        &lb,
        "tcp_syn_new_flow_mac_rewrite",
        &syn,
        XdpVerdict::Tx,
        &rewritten(&syn, b1.mac),
    )?;
    ensure!(
        lb.vip_counters(vip(VIP_A, 80, TCP))?.new_flows == 1,
        "new flow not counted"
    );
    fx.case(
        &lb,
        "tcp_same_flow_conn_table_hit",
        &syn,
        XdpVerdict::Tx,
        &rewritten(&syn, b1.mac),
    )?;
    let data = packet(TCP, 40001, VIP_A, 80, b"GET / HTTP/1.1\r\n\r\n");
    fx.case(
        &lb,
        "tcp_data_segment_same_backend",
        &data,
        XdpVerdict::Tx,
        &rewritten(&data, b1.mac),
    )?;
    let c = lb.vip_counters(vip(VIP_A, 80, TCP))?;
    ensure!(
        c.new_flows == 1 && c.conn_hits == 2 && c.packets == 3,
        "VIP A counters {c:?}"
    );
    ensure!(
        lb.flow(&flow(TCP, 40001, VIP_A, 80))? == Some(b1.addr),
        "connection table lacks the flow"
    );
    let udp = packet(UDP, 5353, VIP_A, 53, b"query");
    fx.case(
        &lb,
        "udp_new_flow_mac_rewrite",
        &udp,
        XdpVerdict::Tx,
        &rewritten(&udp, b2.mac),
    )?;
    fx.case(
        &lb,
        "udp_conn_table_hit",
        &udp,
        XdpVerdict::Tx,
        &rewritten(&udp, b2.mac),
    )?;
    let big = packet(TCP, 40002, VIP_A, 80, &[0xab; 1460]);
    fx.case(
        &lb,
        "tcp_full_size_frame",
        &big,
        XdpVerdict::Tx,
        &rewritten(&big, b1.mac),
    )?;

    // Checksums are neither checked nor changed.
    let mut bad_ip = packet(TCP, 40003, VIP_A, 80, b"x");
    bad_ip[24] ^= 0xff;
    fx.case(
        &lb,
        "wrong_ip_checksum_forwarded_untouched",
        &bad_ip,
        XdpVerdict::Tx,
        &rewritten(&bad_ip, b1.mac),
    )?;
    let mut bad_tcp = packet(TCP, 40004, VIP_A, 80, b"x");
    bad_tcp[14 + 20 + 16] ^= 0xff;
    fx.case(
        &lb,
        "wrong_tcp_checksum_forwarded_untouched",
        &bad_tcp,
        XdpVerdict::Tx,
        &rewritten(&bad_tcp, b1.mac),
    )?;

    // Not for a VIP: passes untouched.
    fx.passes(
        &lb,
        "non_vip_address",
        &packet(TCP, 40005, [10, 100, 0, 99], 80, b""),
    )?;
    fx.passes(
        &lb,
        "vip_address_other_port",
        &packet(TCP, 40006, VIP_A, 8080, b""),
    )?;
    fx.passes(
        &lb,
        "vip_port_other_protocol",
        &packet(UDP, 40007, VIP_A, 80, b""),
    )?;
    let arp = eth(
        [0xff; 6],
        CLIENT_MAC,
        0x0806,
        &[
            0, 1, 8, 0, 6, 4, 0, 1, 2, 0xc1, 0, 0, 0, 1, 192, 168, 7, 9, 0, 0, 0, 0, 0, 0, 10, 100,
            0, 1,
        ],
    );
    fx.passes(&lb, "arp_request_for_the_vip", &arp)?;
    let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
    v6.extend_from_slice(&[0xfd; 32]);
    v6.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 8, 0, 0]);
    fx.passes(
        &lb,
        "ipv6_to_no_vip_passes",
        &eth(LB_MAC, CLIENT_MAC, 0x86dd, &v6),
    )?;
    let mut vlan = packet(TCP, 40008, VIP_A, 80, b"");
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
    fx.passes(&lb, "vlan_tagged_frame", &vlan)?;
    let icmp = {
        let mut ip = ip_header(CLIENT, VIP_A, 1, 8, 0);
        ip.extend_from_slice(&[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
        eth(LB_MAC, CLIENT_MAC, 0x0800, &ip)
    };
    fx.passes(&lb, "icmp_echo_to_the_vip", &icmp)?;

    // Fragments, options, malformed and truncated headers: passed to the kernel untouched.
    let first_frag = {
        let seg = l4(CLIENT, VIP_A, TCP, 40009, 80, b"abcd");
        let mut ip = ip_header(CLIENT, VIP_A, TCP, seg.len(), 0x2000);
        ip.extend_from_slice(&seg);
        eth(LB_MAC, CLIENT_MAC, 0x0800, &ip)
    };
    fx.passes(&lb, "first_fragment_more_fragments_set", &first_frag)?;
    let later_frag = {
        let mut ip = ip_header(CLIENT, VIP_A, TCP, 8, 0x0003);
        ip.extend_from_slice(&[1; 8]);
        eth(LB_MAC, CLIENT_MAC, 0x0800, &ip)
    };
    fx.passes(&lb, "later_fragment_with_offset", &later_frag)?;
    let options = {
        let seg = l4(CLIENT, VIP_A, TCP, 40010, 80, b"");
        let mut ip = ip_header(CLIENT, VIP_A, TCP, seg.len() + 4, 0);
        ip[0] = 0x46;
        ip.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
        ip.extend_from_slice(&seg);
        eth(LB_MAC, CLIENT_MAC, 0x0800, &ip)
    };
    fx.passes(&lb, "ip_options_present", &options)?;
    let mut not_v4 = packet(TCP, 40011, VIP_A, 80, b"");
    not_v4[14] = 0x65;
    fx.passes(&lb, "ipv4_ethertype_but_version_6", &not_v4)?;
    let mut short_ihl = packet(TCP, 40012, VIP_A, 80, b"");
    short_ihl[14] = 0x44;
    fx.passes(&lb, "ihl_below_five", &short_ihl)?;
    let full = packet(TCP, 40013, VIP_A, 80, b"");
    fx.passes(&lb, "truncated_ip_header", &full[..14 + 12])?;
    fx.passes(&lb, "truncated_before_the_ports", &full[..14 + 20 + 2])?;
    fx.passes(&lb, "ethernet_header_only", &full[..14])?;

    // IPIP to a routed backend: exact outer header.
    let tls = packet(TCP, 40014, VIP_B, 443, b"hello");
    fx.case(
        &lb,
        "ipip_encapsulation_new_flow",
        &tls,
        XdpVerdict::Tx,
        &encapsulated(&tls, &routed),
    )?;
    fx.case(
        &lb,
        "ipip_encapsulation_conn_table_hit",
        &tls,
        XdpVerdict::Tx,
        &encapsulated(&tls, &routed),
    )?;
    let mut tos = packet(UDP, 40015, VIP_B, 443, b"");
    // UDP to a TCP VIP passes; the TOS copy is checked on TCP below.
    fx.passes(&lb, "ipip_vip_other_protocol", &tos)?;
    tos = packet(TCP, 40016, VIP_B, 443, b"");
    tos[15] = 0xb8; // DSCP EF (the IP checksum is now stale: left alone, copied as is)
    fx.case(
        &lb,
        "ipip_outer_copies_tos",
        &tos,
        XdpVerdict::Tx,
        &encapsulated(&tos, &routed),
    )?;

    // Too big for IPIP on this MTU: with DF the sender gets ICMP "fragmentation needed"
    // (built here on its own), without DF the frame is dropped; a packet that just fits goes.
    lb.set_ipip_mtu(200)?;
    let big = packet(TCP, 40040, VIP_B, 443, &[0x42; 141]); // IP total 181: 201 with IPIP
    fx.case(
        &lb,
        "ipip_too_big_with_df_answers_icmp_fragmentation_needed",
        &big,
        XdpVerdict::Tx,
        &too_big_answer(&big, 180),
    )?;
    let mut big_no_df = big.clone();
    big_no_df[20] = 0; // DF clear (the IP checksum is now stale: nobody reads it)
    fx.case(
        &lb,
        "ipip_too_big_without_df_dropped",
        &big_no_df,
        XdpVerdict::Drop,
        &big_no_df,
    )?;
    let fits = packet(TCP, 40041, VIP_B, 443, &[0x42; 140]); // IP total 180: 200 with IPIP
    fx.case(
        &lb,
        "ipip_exactly_the_mtu_encapsulated",
        &fits,
        XdpVerdict::Tx,
        &encapsulated(&fits, &routed),
    )?;
    ensure!(
        (
            lb.stat(LbStat::TooBigIcmp)?,
            lb.stat(LbStat::TooBigDropped)?
        ) == (1, 1),
        "too-big counters"
    );
    lb.set_ipip_mtu(0)?;

    // On a routed backend: the IPIP frame of an IPIP VIP from a member loses its outer header
    // (the Ethernet header moves up) and goes to the kernel; any other IPIP frame passes as
    // it came.
    lb.set_decap_sources(&[Ipv4Addr::from(IPIP_SRC)].into())?;
    let arrived = encapsulated(&tls, &routed);
    fx.case(
        &lb,
        "ipip_decapsulated_on_the_backend",
        &arrived,
        XdpVerdict::Pass,
        &eth(routed.mac, LB_MAC, 0x0800, &tls[14..]),
    )?;
    ensure!(
        lb.stat(LbStat::Decapsulated)? == 1,
        "decapsulation not counted"
    );
    fx.passes(
        &lb,
        "ipip_from_a_non_member_passes_untouched",
        &encapsulated_from(&tls, &routed, [192, 0, 2, 66]),
    )?;
    fx.passes(
        &lb,
        "ipip_to_a_mac_rewrite_vip_passes_untouched",
        &encapsulated(&packet(TCP, 40030, VIP_A, 80, b""), &routed),
    )?;
    fx.passes(
        &lb,
        "ipip_to_a_non_vip_passes_untouched",
        &encapsulated(&packet(TCP, 40031, [10, 100, 9, 9], 443, b""), &routed),
    )?;
    let mut inner_fragment = packet(TCP, 40032, VIP_B, 443, b"");
    inner_fragment[20] = 0x20; // more fragments
    fx.passes(
        &lb,
        "ipip_inner_fragment_passes_untouched",
        &encapsulated(&inner_fragment, &routed),
    )?;
    fx.passes(
        &lb,
        "ipip_truncated_inner_header_passes_untouched",
        &arrived[..14 + 20 + 12],
    )?;
    ensure!(
        lb.stat(LbStat::Decapsulated)? == 1,
        "a frame that passed was counted as taken apart"
    );

    // The balancer node is itself the backend: the kernel gets the frame (with IPIP too: the
    // loader gives it this interface's MAC).
    let local_ipip = LbBackend {
        id: 98,
        addr: Ipv4Addr::new(10, 0, 0, 98),
        mac: LB_MAC,
        weight: 1,
    };
    lb.set_vip(
        vip(VIP_B, 8443, TCP),
        Forwarding::Ipip {
            source: Ipv4Addr::from(IPIP_SRC),
        },
        &[local_ipip],
    )?;
    fx.passes(
        &lb,
        "ipip_backend_is_this_node_passes_to_the_kernel",
        &packet(TCP, 40021, VIP_B, 8443, b""),
    )?;
    let local = LbBackend {
        id: 99,
        addr: Ipv4Addr::new(10, 0, 0, 99),
        mac: LB_MAC,
        weight: 1,
    };
    lb.set_vip(vip(VIP_A, 8443, TCP), Forwarding::MacRewrite, &[local])?;
    fx.passes(
        &lb,
        "backend_is_this_node_passes_to_the_kernel",
        &packet(TCP, 40020, VIP_A, 8443, b""),
    )?;
    ensure!(lb.stat(LbStat::Local)? == 2, "local deliveries not counted");

    // A VIP without backends drops, and says so.
    let none = packet(TCP, 40017, VIP_C, 80, b"");
    fx.case(
        &lb,
        "vip_without_backend_dropped",
        &none,
        XdpVerdict::Drop,
        &none,
    )?;
    ensure!(
        lb.vip_counters(vip(VIP_C, 80, TCP))?.no_backend == 1,
        "no-backend drop not counted"
    );

    // Drain: established flows stay on a weight-0 backend, new flows go elsewhere.
    let (d1, d2) = (backend(31, 1), backend(32, 1));
    lb.set_vip(vip(VIP_D, 80, TCP), Forwarding::MacRewrite, &[d2])?;
    let old = packet(TCP, 40018, VIP_D, 80, b"");
    lb.test_run(&old, 1)?; // established on d2
    lb.set_vip(
        vip(VIP_D, 80, TCP),
        Forwarding::MacRewrite,
        &[d1, LbBackend { weight: 0, ..d2 }],
    )?;
    fx.case(
        &lb,
        "drained_backend_keeps_established_flow",
        &old,
        XdpVerdict::Tx,
        &rewritten(&old, d2.mac),
    )?;
    let new = packet(TCP, 40019, VIP_D, 80, b"");
    fx.case(
        &lb,
        "drained_backend_gets_no_new_flow",
        &new,
        XdpVerdict::Tx,
        &rewritten(&new, d1.mac),
    )?;

    // Maglev over three backends: flows spread, and a removed backend's flows move while the
    // others stay.
    let macs = [b1.mac, b2.mac, b3.mac];
    let mut chosen = Vec::new();
    for sport in 50_000..50_300u16 {
        let p = packet(TCP, sport, VIP_M, 80, b"");
        let run = lb.test_run(&p, 1)?;
        ensure!(
            run.verdict == XdpVerdict::Tx,
            "flow {sport}: {:?}",
            run.verdict
        );
        let to: [u8; 6] = run.frame[..6].try_into()?;
        let i = macs
            .iter()
            .position(|m| *m == to)
            .context("sent to an unknown MAC")?;
        ensure!(
            run.frame == rewritten(&p, to),
            "flow {sport}: more than the MACs changed"
        );
        chosen.push(i);
    }
    let shares: Vec<usize> = (0..3)
        .map(|i| chosen.iter().filter(|c| **c == i).count())
        .collect();
    ensure!(
        shares.iter().all(|s| *s >= 60),
        "300 flows over 3 backends: {shares:?}"
    );
    lb.set_vip(vip(VIP_M, 80, TCP), Forwarding::MacRewrite, &[b1, b3])?;
    let mut moved = 0;
    for (k, sport) in (50_000..50_300u16).enumerate() {
        let p = packet(TCP, sport, VIP_M, 80, b"");
        let run = lb.test_run(&p, 1)?;
        let to: [u8; 6] = run.frame[..6].try_into()?;
        if chosen[k] == 1 {
            ensure!(
                to != b2.mac,
                "flow {sport} still sent to the removed backend"
            );
            moved += 1;
        } else {
            ensure!(
                to == macs[chosen[k]],
                "flow {sport} moved although its backend stayed"
            );
        }
    }
    let p = packet(
        TCP,
        50_000 + chosen.iter().position(|c| *c == 1).unwrap_or(0) as u16,
        VIP_M,
        80,
        b"",
    );
    let to: [u8; 6] = lb.test_run(&p, 1)?.frame[..6].try_into()?;
    fx.case(
        &lb,
        "removed_backend_flow_rehashed",
        &p,
        XdpVerdict::Tx,
        &rewritten(&p, to),
    )?;
    println!(
        "  300 flows over 3 backends: {shares:?}; b2 removed: its {moved} flows moved, the other {} stayed",
        300 - moved
    );

    // IPv6 VIPs: the same rules, their own connection table; extension headers and fragments
    // pass; IPIP is refused for them.
    lb.set_vip(vip6(VIP6_A, 80, TCP), Forwarding::MacRewrite, &[b1])?;
    lb.set_vip(vip6(VIP6_A, 53, UDP), Forwarding::MacRewrite, &[b2])?;
    let syn6 = packet6(TCP, 40060, VIP6_A, 80, b"", &[]);
    fx.case(
        &lb,
        "ipv6_tcp_syn_new_flow_mac_rewrite",
        &syn6,
        XdpVerdict::Tx,
        &rewritten(&syn6, b1.mac),
    )?;
    fx.case(
        &lb,
        "ipv6_tcp_conn_table_hit",
        &syn6,
        XdpVerdict::Tx,
        &rewritten(&syn6, b1.mac),
    )?;
    let c6 = lb.vip_counters(vip6(VIP6_A, 80, TCP))?;
    ensure!(
        (c6.new_flows, c6.conn_hits) == (1, 1),
        "IPv6 counters {c6:?}"
    );
    let dns6 = packet6(UDP, 40061, VIP6_A, 53, b"q", &[]);
    fx.case(
        &lb,
        "ipv6_udp_new_flow",
        &dns6,
        XdpVerdict::Tx,
        &rewritten(&dns6, b2.mac),
    )?;
    fx.passes(
        &lb,
        "ipv6_hop_by_hop_header_passes",
        &packet6(TCP, 40062, VIP6_A, 80, b"", &[0]),
    )?;
    fx.passes(
        &lb,
        "ipv6_fragment_header_passes",
        &packet6(UDP, 40063, VIP6_A, 53, b"q", &[44]),
    )?;
    fx.passes(&lb, "ipv6_truncated_before_the_ports", &syn6[..14 + 40 + 2])?;
    fx.passes(
        &lb,
        "ipv6_vip_other_port_passes",
        &packet6(TCP, 40064, VIP6_A, 81, b"", &[]),
    )?;
    lb.set_standby(Ipv6Addr::from(VIP6_A).into(), true)?;
    fx.passes(&lb, "ipv6_standby_vip_passes", &syn6)?;
    lb.set_standby(Ipv6Addr::from(VIP6_A).into(), false)?;
    ensure!(
        lb.set_vip(
            vip6(VIP6_A, 443, TCP),
            Forwarding::Ipip {
                source: Ipv4Addr::from(IPIP_SRC)
            },
            &[b1]
        )
        .is_err(),
        "IPIP accepted for an IPv6 VIP"
    );

    // Another node holds VIP_A: its frames (the holder's, to this node as a backend) go to the
    // kernel, the connection table untouched; holding it again, the same flow goes to b1.
    lb.set_standby(Ipv4Addr::from(VIP_A).into(), true)?;
    fx.passes(&lb, "standby_vip_passes_to_the_kernel", &syn)?;
    ensure!(lb.stat(LbStat::Standby)? == 2, "standby not counted");
    lb.set_standby(Ipv4Addr::from(VIP_A).into(), false)?;
    fx.case(
        &lb,
        "held_again_vip_keeps_its_flows",
        &syn,
        XdpVerdict::Tx,
        &rewritten(&syn, b1.mac),
    )?;

    let passed = lb.stat(LbStat::NotVip)?
        + lb.stat(LbStat::NotIpv4)?
        + lb.stat(LbStat::Fragment)?
        + lb.stat(LbStat::Options)?
        + lb.stat(LbStat::Truncated)?;
    println!(
        "  {} fixtures; counters: frames {}, forwarded {}, passed {passed}, no backend {}; {} flows in the table",
        fx.count,
        lb.stat(LbStat::Frames)?,
        lb.stat(LbStat::Forwarded)?,
        lb.stat(LbStat::NoBackend)?,
        lb.flow_count()?
    );
    ensure!(fx.count >= 25, "only {} fixtures", fx.count);
    Ok(Outcome::Pass)
}

// ---- end to end: a client, two balancer nodes, three backends in network namespaces -------

const E2E_VIP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 200);
const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;

/// A backend's echo servers on the VIP: TCP answers every line with `<name> <line>`, UDP every
/// datagram with `<name>`. They stop when `stop` is set.
fn serve(name: String, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    serve_on(E2E_VIP.into(), name, stop)
}

/// [`serve`] on VIP `vip`.
fn serve_on(vip: IpAddr, name: String, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let tcp = TcpListener::bind((vip, TCP_PORT))?;
    tcp.set_nonblocking(true)?;
    let udp = UdpSocket::bind((vip, UDP_PORT))?;
    udp.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((conn, _)) = tcp.accept() {
            let (name, stop) = (name.clone(), stop.clone());
            std::thread::spawn(move || {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                let mut w = match conn.try_clone() {
                    Ok(w) => w,
                    Err(_) => return,
                };
                let mut r = BufReader::new(conn);
                let mut line = String::new();
                while !stop.load(Ordering::Relaxed) {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) => return,
                        Ok(_) => {
                            if w.write_all(format!("{name} {line}").as_bytes()).is_err() {
                                return;
                            }
                        }
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => return,
                    }
                }
            });
        }
        if let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(name.as_bytes(), from);
        }
    }
    Ok(())
}

/// A client connection to the VIP and the backend that answered it.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    backend: String,
}

fn ask(c: &mut Conn, what: &str) -> anyhow::Result<String> {
    c.writer.write_all(format!("{what}\n").as_bytes())?;
    let mut line = String::new();
    c.reader.read_line(&mut line)?;
    ensure!(!line.is_empty(), "connection closed");
    let (who, rest) = line.trim_end().split_once(' ').context("reply")?;
    ensure!(rest == what, "reply {line:?}");
    Ok(who.to_string())
}

fn connect(n: usize) -> anyhow::Result<Vec<Conn>> {
    connect_to(E2E_VIP.into(), n)
}

/// [`connect`] to VIP `vip`.
fn connect_to(vip: IpAddr, n: usize) -> anyhow::Result<Vec<Conn>> {
    let mut out = Vec::new();
    for i in 0..n {
        let s =
            TcpStream::connect_timeout(&SocketAddr::from((vip, TCP_PORT)), Duration::from_secs(2))
                .with_context(|| format!("connection {i} to the VIP"))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut c = Conn {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            backend: String::new(),
        };
        c.backend = ask(&mut c, "hello")?;
        out.push(c);
    }
    Ok(out)
}

/// What the network-namespace tests need: root, `ip` and `sysctl`, and `drop_lb` loaded.
/// `Err` is the skip, with its reason.
fn netns_balancer() -> anyhow::Result<Result<Balancer, Outcome>> {
    if let Some(skip) = require_root()
        .or_else(|| require_command("ip"))
        .or_else(|| require_command("sysctl"))
    {
        return Ok(Err(skip));
    }
    match Balancer::load() {
        Ok(lb) => Ok(Ok(lb)),
        Err(XdpError::NotBuilt) => Ok(Err(Outcome::Skip(XdpError::NotBuilt.to_string()))),
        Err(e) => Err(e).context("loading drop_lb"),
    }
}

/// The end-to-end tests' two VIP:ports on `addr`: TCP [`TCP_PORT`] and UDP [`UDP_PORT`].
fn e2e_vips(addr: impl Into<IpAddr>) -> (LbVip, LbVip) {
    let addr = addr.into();
    (
        LbVip {
            addr,
            port: TCP_PORT,
            proto: TCP,
        },
        LbVip {
            addr,
            port: UDP_PORT,
            proto: UDP,
        },
    )
}

type Spread = std::collections::BTreeMap<String, usize>;

/// From `from` (inside the client's namespace), `n` UDP datagrams to `vip`, each from a port of
/// its own: which backend answered how many. Every answer must come from the VIP (direct server
/// return) and all three backends must have answered.
fn udp_spread(from: IpAddr, vip: IpAddr, n: usize) -> anyhow::Result<Spread> {
    let mut seen = Spread::new();
    for _ in 0..n {
        let s = UdpSocket::bind((from, 0))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send_to(b"q", (vip, UDP_PORT))?;
        let mut buf = [0u8; 64];
        let (len, src) = s.recv_from(&mut buf).context("no UDP answer")?;
        ensure!(src.ip() == vip, "UDP answer from {src}");
        *seen
            .entry(String::from_utf8_lossy(&buf[..len]).to_string())
            .or_default() += 1;
    }
    ensure!(seen.len() == 3, "UDP reached {seen:?}");
    Ok(seen)
}

/// Which backend holds how many of `conns`.
fn tcp_spread(conns: &[Conn]) -> Spread {
    let mut m = Spread::new();
    for c in conns {
        *m.entry(c.backend.clone()).or_default() += 1;
    }
    m
}

/// After backend `removed` was taken out: every connection asked once more. Those of the
/// others must still be answered by their own backend; only `removed`'s may break.
/// (kept, ended).
fn after_removal(conns: &mut [Conn], removed: &str) -> anyhow::Result<(usize, usize)> {
    let (mut kept, mut lost) = (0, 0);
    for c in conns.iter_mut() {
        match ask(c, "again") {
            Ok(who) if who == c.backend => kept += 1,
            Ok(who) => anyhow::bail!("a connection of {} was answered by {who}", c.backend),
            Err(_) => {
                ensure!(c.backend == removed, "a connection to {} broke", c.backend);
                lost += 1;
            }
        }
    }
    ensure!(kept > 0, "no connection kept");
    Ok((kept, lost))
}

fn end_to_end() -> anyhow::Result<Outcome> {
    let mut lb_a = match netns_balancer()? {
        Ok(lb) => lb,
        Err(skip) => return Ok(skip),
    };
    // Balancer B pins its maps and link, as the daemon does.
    let pins =
        PinGuard(std::path::Path::new("/sys/fs/bpf").join(drop_tests::unique_name("droplb")));
    let mut lb_b = Balancer::open(&pins.0)?;
    // 0 client, 1 and 2 balancer nodes, 3..5 backends.
    let bridge = Bridge::new(6)?;
    let client = bridge.host(0);
    let backends: Vec<LbBackend> = (3..6)
        .map(|i| {
            let h = bridge.host(i);
            LbBackend {
                id: 1000 + i as u64,
                addr: h.addr(),
                mac: h.mac().0,
                weight: 1,
            }
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut servers = Vec::new();
    for i in 3..6 {
        let h = bridge.host(i);
        // DSR: the VIP on lo, never answered for in ARP (the tuning profile's keys).
        h.netns()
            .ip(&["addr", "add", &format!("{E2E_VIP}/32"), "dev", "lo"])?;
        for (k, v) in [
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
            ("net.ipv4.conf.eth0.arp_ignore", "1"),
            ("net.ipv4.conf.eth0.arp_announce", "2"),
        ] {
            h.netns().exec("sysctl", &["-qw", &format!("{k}={v}")])?;
        }
        servers.push(h.netns().spawn({
            let (name, stop) = (format!("b{i}"), stop.clone());
            move || serve(name, stop)
        }));
    }
    let (tcp_vip, udp_vip) = e2e_vips(E2E_VIP);
    for lb in [&mut lb_a, &mut lb_b] {
        lb.set_vip(tcp_vip, Forwarding::MacRewrite, &backends)?;
        lb.set_vip(udp_vip, Forwarding::MacRewrite, &backends)?;
    }
    let mode = bridge
        .host(1)
        .netns()
        .run(|| lb_a.attach("eth0", XdpMode::Generic))??;
    // The client reaches the VIP through balancer A (where the VIP's holder would be).
    client.netns().ip(&[
        "route",
        "add",
        &format!("{E2E_VIP}/32"),
        "via",
        &bridge.host(1).addr().to_string(),
    ])?;
    std::thread::sleep(Duration::from_millis(200));

    let result = client.netns().run(|| -> anyhow::Result<String> {
        // UDP: 60 datagrams from 60 ports, answered straight from the backends.
        let udp = udp_spread(client.addr().into(), E2E_VIP.into(), 60)?;
        // TCP: 30 connections spread over the three.
        let spread = tcp_spread(&connect(30)?);
        ensure!(spread.len() == 3, "TCP reached {spread:?}");
        Ok(format!("UDP {udp:?}, TCP {spread:?}"))
    })??;
    println!("  {mode} XDP on balancer A; 60 datagrams and 30 connections: {result}");
    let udp = lb_a.vip_counters(udp_vip)?;
    ensure!(
        udp.packets == 60,
        "balancer A saw {} UDP packets for 60 requests (replies must bypass it)",
        udp.packets
    );

    // Long-lived connections; one backend taken out: the others' still answer.
    let mut conns = client.netns().run(|| connect(30))??;
    lb_a.set_vip(tcp_vip, Forwarding::MacRewrite, &backends[1..])?;
    lb_b.set_vip(tcp_vip, Forwarding::MacRewrite, &backends[1..])?;
    let removed_name = "b3".to_string();
    let (kept, lost) = client
        .netns()
        .run(|| after_removal(&mut conns, &removed_name))??;
    println!("  b3 taken out: {kept} connections on b4/b5 kept working, {lost} on b3 ended");
    conns.retain(|c| c.backend != removed_name);

    // Back in: new flows spread over three again.
    lb_a.set_vip(tcp_vip, Forwarding::MacRewrite, &backends)?;
    lb_b.set_vip(tcp_vip, Forwarding::MacRewrite, &backends)?;
    let (fresh_spread, mut fresh) = client.netns().run(|| -> anyhow::Result<_> {
        let fresh = connect(30)?;
        Ok((tcp_spread(&fresh), fresh))
    })??;
    ensure!(
        fresh_spread.len() == 3,
        "after b3 came back, new flows reached {fresh_spread:?}"
    );
    println!("  b3 back: 30 new connections spread {fresh_spread:?}");

    // Failover: balancer B (same backends, so the same ring) takes the VIP; every established
    // connection keeps its backend.
    bridge
        .host(2)
        .netns()
        .run(|| lb_b.attach("eth0", XdpMode::Generic))??;
    client.netns().ip(&[
        "route",
        "replace",
        &format!("{E2E_VIP}/32"),
        "via",
        &bridge.host(2).addr().to_string(),
    ])?;
    bridge.host(1).netns().run(|| lb_a.detach())??;
    std::thread::sleep(Duration::from_millis(100));
    let survived = client.netns().run(|| {
        let mut ok = 0;
        for c in conns.iter_mut().chain(fresh.iter_mut()) {
            let who = ask(c, "after failover")?;
            ensure!(who == c.backend, "moved from {} to {who}", c.backend);
            ok += 1;
        }
        anyhow::Ok(ok)
    })??;
    let b = lb_b.vip_counters(tcp_vip)?;
    ensure!(b.packets > 0, "balancer B forwarded nothing");
    println!(
        "  balancer A → B: all {survived} established connections kept their backend (B: {} packets, {} new flows from its ring, {} table hits)",
        b.packets, b.new_flows, b.conn_hits
    );

    // B's process goes away (a supervisor crash): the pinned link keeps forwarding.
    drop(lb_b);
    let during = client.netns().run(|| {
        let mut ok = 0;
        for c in conns.iter_mut().chain(fresh.iter_mut()) {
            ensure!(
                ask(c, "while B is down")? == c.backend,
                "moved while B was down"
            );
            ok += 1;
        }
        anyhow::Ok(ok)
    })??;
    // A new B reads its state back from the pins and takes the link over in one step.
    let mut lb_b = Balancer::open(&pins.0)?;
    let restored = lb_b.vips();
    ensure!(restored.len() == 2, "restored VIPs {restored:?}");
    let flows = lb_b.flow_count()?;
    bridge
        .host(2)
        .netns()
        .run(|| lb_b.attach("eth0", XdpMode::Generic))??;
    lb_b.set_vip(tcp_vip, Forwarding::MacRewrite, &backends)?;
    let after = client.netns().run(|| {
        let mut ok = 0;
        for c in conns.iter_mut().chain(fresh.iter_mut()) {
            ensure!(
                ask(c, "after the restart")? == c.backend,
                "moved by the restart"
            );
            ok += 1;
        }
        anyhow::Ok(ok)
    })??;
    println!(
        "  B's process dropped: {during} connections kept answering on the pinned link; reopened: {} VIPs and {flows} flows read back, {after} connections unchanged",
        restored.len()
    );
    // The supervisor dies holding the VIP and `--release-vip` (ExecStopPost) puts the pinned
    // VIPs in standby: the still-attached program passes the VIP's frames to the kernel.
    drop(lb_b);
    let put = Balancer::standby_pinned(&pins.0)?;
    ensure!(
        put == vec![IpAddr::from(E2E_VIP)],
        "put in standby: {put:?}"
    );
    let again = Balancer::open(&pins.0)?;
    ensure!(
        again.standby().contains(&E2E_VIP.into()),
        "standby not kept"
    );
    let standby_before = again.stat(LbStat::Standby)?;
    client.netns().run(|| -> anyhow::Result<()> {
        let s = UdpSocket::bind((client.addr(), 0))?;
        s.send_to(b"q", (E2E_VIP, UDP_PORT))?;
        Ok(())
    })??;
    std::thread::sleep(Duration::from_millis(100));
    let passed = again.stat(LbStat::Standby)? - standby_before;
    ensure!(passed == 1, "{passed} frames passed in standby, expected 1");
    println!("  standby_pinned: the attached program now passes the VIP's frames to the kernel");
    drop(again);

    // Clean removal: no program left on the interface, no pin left.
    ensure!(Balancer::remove_pinned(&pins.0)?, "nothing was pinned");
    let link = bridge
        .host(2)
        .netns()
        .ip_json(&["link", "show", "dev", "eth0"])?;
    ensure!(
        link[0].get("xdp").is_none(),
        "an XDP program is still attached: {link}"
    );
    ensure!(!pins.0.exists(), "pins left");
    println!("  removed: no XDP program on B's eth0, no pin left");

    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
    }
    Ok(Outcome::Pass)
}

// ---- IPv6: the same as end to end, on an IPv6 VIP ----------------------------------------------

const E2E_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 0xc8);

/// Host `i`'s IPv6 address on the bridge.
fn addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 0x10 + i as u16)
}

/// A client, a balancer and three backends holding an IPv6 VIP on `lo`: TCP and UDP to the
/// VIP reach all three and are answered straight from them; a backend taken out ends only its
/// own connections.
fn ipv6_end_to_end() -> anyhow::Result<Outcome> {
    let mut lb = match netns_balancer()? {
        Ok(lb) => lb,
        Err(skip) => return Ok(skip),
    };
    let bridge = Bridge::new(5)?;
    let (client, balancer) = (bridge.host(0), bridge.host(1));
    for (i, h) in bridge.hosts().iter().enumerate() {
        h.netns().ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", addr6(i)),
            "dev",
            "eth0",
            "nodad",
        ])?;
    }
    // IPv6 is up once no address is tentative any more (the link-local ones run DAD).
    drop_tests::cluster::wait_for(Duration::from_secs(5), "IPv6 addresses past DAD", || {
        for h in bridge.hosts() {
            let t = h.netns().ip(&["-6", "addr", "show", "tentative"])?;
            ensure!(t.trim().is_empty(), "tentative: {t}");
        }
        Ok(())
    })?;
    let vip: IpAddr = E2E_VIP6.into();
    let stop = Arc::new(AtomicBool::new(false));
    let mut servers = Vec::new();
    let mut backends = Vec::new();
    for i in 2..5 {
        let h = bridge.host(i);
        h.netns().ip(&[
            "-6",
            "addr",
            "add",
            &format!("{E2E_VIP6}/128"),
            "dev",
            "lo",
            "nodad",
        ])?;
        backends.push(LbBackend {
            id: 3000 + i as u64,
            addr: h.addr(),
            mac: h.mac().0,
            weight: 1,
        });
        servers.push(h.netns().spawn({
            let (name, stop) = (format!("b{i}"), stop.clone());
            move || serve_on(vip, name, stop)
        }));
    }
    let (tcp_vip, udp_vip) = e2e_vips(vip);
    lb.set_vip(tcp_vip, Forwarding::MacRewrite, &backends)?;
    lb.set_vip(udp_vip, Forwarding::MacRewrite, &backends)?;
    let mode = balancer
        .netns()
        .run(|| lb.attach("eth0", XdpMode::Generic))??;
    client.netns().ip(&[
        "-6",
        "route",
        "add",
        &format!("{E2E_VIP6}/128"),
        "via",
        &addr6(1).to_string(),
    ])?;
    std::thread::sleep(Duration::from_millis(200));
    let (result, mut conns) = client.netns().run(|| -> anyhow::Result<_> {
        let udp = udp_spread(addr6(0).into(), vip, 60)?;
        let conns = connect_to(vip, 30)?;
        let spread = tcp_spread(&conns);
        ensure!(spread.len() == 3, "TCP reached {spread:?}");
        Ok((format!("UDP {udp:?}, TCP {spread:?}"), conns))
    })??;
    let udp = lb.vip_counters(udp_vip)?;
    println!(
        "  {mode} XDP, IPv6 VIP {E2E_VIP6}: 60 datagrams and 30 connections: {result}; the balancer saw {} UDP packets",
        udp.packets
    );
    ensure!(
        udp.packets == 60,
        "balancer saw {} UDP packets for 60 requests (replies must bypass it)",
        udp.packets
    );
    // b2 taken out: only its connections end.
    lb.set_vip(tcp_vip, Forwarding::MacRewrite, &backends[1..])?;
    let (kept, lost) = client.netns().run(|| after_removal(&mut conns, "b2"))??;
    println!("  b2 taken out: {kept} connections on b3/b4 kept working, {lost} on b2 ended");
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
    }
    Ok(Outcome::Pass)
}

// ---- IPIP: backends on another subnet, behind a router ----------------------------------------

/// `Ip: ForwDatagrams` of the calling namespace's `/proc/net/snmp`: datagrams it routed.
fn forwarded_datagrams(ns: &drop_tests::netns::Netns) -> anyhow::Result<u64> {
    let text = ns.exec("cat", &["/proc/net/snmp"])?;
    let mut lines = text.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (
        lines.next().context("Ip: names")?,
        lines.next().context("Ip: values")?,
    );
    let at = names
        .split_whitespace()
        .position(|n| n == "ForwDatagrams")
        .context("no ForwDatagrams")?;
    Ok(values
        .split_whitespace()
        .nth(at)
        .context("ForwDatagrams value")?
        .parse()?)
}

/// A client and the balancer on 10.201.0.0/24, three backends on 10.202.0.0/24, and the hub
/// between them as the router. The balancer resolves the router as every backend's next hop
/// (`Netlink::next_hop`), encapsulates, the router forwards the IPIP frames, each backend's own
/// `drop_lb` takes the header off, and the answers go back through the router to the client
/// without the balancer.
fn ipip_routed() -> anyhow::Result<Outcome> {
    let mut lb = match netns_balancer()? {
        Ok(lb) => lb,
        Err(skip) => return Ok(skip),
    };
    let bridge = Bridge::new(5)?;
    let (client, balancer, router) = (bridge.host(0), bridge.host(1), bridge.hub());
    // The hub routes between the two subnets (its own namespace's setting).
    router.ip(&["addr", "add", "10.201.0.1/24", "dev", Bridge::BRIDGE])?;
    router.ip(&["addr", "add", "10.202.0.1/24", "dev", Bridge::BRIDGE])?;
    router.exec(
        "sysctl",
        &[
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.br0.send_redirects=0",
        ],
    )?;
    let router_mac = router.ip_json(&["link", "show", "dev", Bridge::BRIDGE])?[0]["address"]
        .as_str()
        .context("br0's MAC")?
        .to_string();
    balancer
        .netns()
        .ip(&["route", "add", "10.202.0.0/24", "via", "10.201.0.1"])?;
    let source = balancer.addr();
    let (tcp_vip, udp_vip) = e2e_vips(E2E_VIP);
    let forwarding = Forwarding::Ipip { source };
    let stop = Arc::new(AtomicBool::new(false));
    let mut servers = Vec::new();
    let mut backend_lbs = Vec::new();
    let mut addrs = Vec::new();
    for i in 2..5 {
        let h = bridge.host(i);
        let ns = h.netns();
        let addr = Ipv4Addr::new(10, 202, 0, 10 + i as u8);
        ns.ip(&["addr", "flush", "dev", "eth0"])?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ns.ip(&["route", "add", "default", "via", "10.202.0.1"])?;
        ns.ip(&["addr", "add", &format!("{E2E_VIP}/32"), "dev", "lo"])?;
        for (k, v) in [
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
        ] {
            ns.exec("sysctl", &["-qw", &format!("{k}={v}")])?;
        }
        // Each backend's own drop_lb knows the VIPs and takes IPIP frames from the balancer
        // apart.
        let mut b = Balancer::load()?;
        b.set_vip(tcp_vip, forwarding, &[])?;
        b.set_vip(udp_vip, forwarding, &[])?;
        b.set_decap_sources(&[source].into())?;
        ns.run(|| b.attach("eth0", XdpMode::Generic))??;
        backend_lbs.push(b);
        addrs.push(addr);
        servers.push(ns.spawn({
            let (name, stop) = (format!("b{i}"), stop.clone());
            move || serve(name, stop)
        }));
    }

    // The balancer's next hops, as the daemon resolves them: the router for the backends
    // (resolved on demand), the address itself on the segment, `lo` for its own.
    let mut net = balancer.netns().run(drop_net::Netlink::new)??;
    let started = std::time::Instant::now();
    let mut backends = Vec::new();
    for (k, addr) in addrs.iter().enumerate() {
        let hop = loop {
            let hop = net.next_hop(*addr)?;
            if hop.mac.is_some() || started.elapsed() > Duration::from_secs(3) {
                break hop;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        ensure!(
            hop.ifname == "eth0" && hop.via == Ipv4Addr::new(10, 201, 0, 1) && !hop.local,
            "next hop to {addr}: {hop:?}"
        );
        let mac = hop
            .mac
            .with_context(|| format!("router not resolved: {hop:?}"))?;
        ensure!(
            mac.to_string() == router_mac,
            "next hop MAC {mac}, router {router_mac}"
        );
        backends.push(LbBackend {
            id: 2000 + k as u64,
            addr: *addr,
            mac: mac.0,
            weight: 1,
        });
    }
    println!(
        "  next hop of 3 routed backends: 10.201.0.1 ({router_mac}), resolved in {} ms",
        started.elapsed().as_millis()
    );
    let on_link = net.next_hop(client.addr())?;
    ensure!(
        on_link.via == client.addr() && !on_link.local,
        "on-link hop {on_link:?}"
    );
    let own = net.next_hop(source)?;
    ensure!(own.local, "own address not local: {own:?}");

    lb.set_vip(tcp_vip, forwarding, &backends)?;
    lb.set_vip(udp_vip, forwarding, &backends)?;
    balancer
        .netns()
        .run(|| lb.attach("eth0", XdpMode::Generic))??;
    client.netns().ip(&[
        "route",
        "add",
        &format!("{E2E_VIP}/32"),
        "via",
        &balancer.addr().to_string(),
    ])?;
    client
        .netns()
        .ip(&["route", "add", "10.202.0.0/24", "via", "10.201.0.1"])?;
    let routed_before = forwarded_datagrams(router)?;
    std::thread::sleep(Duration::from_millis(200));

    let result = client.netns().run(|| -> anyhow::Result<String> {
        let udp = udp_spread(client.addr().into(), E2E_VIP.into(), 60)?;
        let mut conns = connect(30)?;
        let spread = tcp_spread(&conns);
        ensure!(spread.len() == 3, "TCP reached {spread:?}");
        for c in conns.iter_mut() {
            ensure!(ask(c, "again")? == c.backend, "a connection moved");
        }
        Ok(format!("UDP {udp:?}, TCP {spread:?}"))
    })??;
    let routed = forwarded_datagrams(router)? - routed_before;

    // A full-size TCP segment does not fit the 1500-byte MTU with IPIP's 20 bytes: the balancer
    // answers ICMP "fragmentation needed" (MTU 1480), the client's TCP sends smaller segments,
    // and a 4,000-byte line gets through. (The client sends wire-sized frames: no TSO/GSO.)
    client
        .netns()
        .exec("ethtool", &["-K", "eth0", "tso", "off", "gso", "off"])?;
    lb.set_ipip_mtu(1500)?;
    let long_line: String = "x".repeat(4000);
    let echoed = client.netns().run(|| -> anyhow::Result<String> {
        let mut c = connect(1)?.pop().context("a connection")?;
        ask(&mut c, &long_line)
    })??;
    let icmp = lb.stat(LbStat::TooBigIcmp)?;
    let cached = client
        .netns()
        .ip(&["route", "get", &E2E_VIP.to_string()])?
        .replace('\n', " ");
    println!(
        "  a 4,000-byte line through IPIP on MTU 1500: answered by {echoed} after {icmp} ICMP \"fragmentation needed\"; the client's route: {}",
        cached.trim()
    );
    ensure!(icmp >= 1, "no ICMP fragmentation needed was sent");
    ensure!(
        cached.contains("mtu 1480"),
        "the client did not learn MTU 1480: {cached}"
    );

    let udp = lb.vip_counters(udp_vip)?;
    let mut decapsulated = Vec::new();
    for b in &backend_lbs {
        decapsulated.push(b.stat(LbStat::Decapsulated)?);
    }
    println!(
        "  IPIP through the router: 60 datagrams and 30 connections: {result}; the router forwarded {routed} datagrams; the backends took {decapsulated:?} frames apart; the balancer saw {} UDP packets",
        udp.packets
    );
    ensure!(
        udp.packets == 60,
        "balancer saw {} UDP packets for 60 requests (replies must bypass it)",
        udp.packets
    );
    ensure!(
        decapsulated.iter().all(|d| *d > 0),
        "a backend took nothing apart: {decapsulated:?}"
    );
    // Every request (60 datagrams, and the 30 connections' segments) and every answer crossed
    // the router.
    ensure!(
        routed >= 120,
        "the router forwarded only {routed} datagrams"
    );

    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
    }
    Ok(Outcome::Pass)
}

/// `bpf(BPF_MAP_CREATE)` of a hash map and `bpf(BPF_OBJ_PIN)` of it at `path`: a map as
/// another build might have pinned it.
fn pin_hash_map(path: &std::path::Path, key: u32, value: u32, entries: u32) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    let mut attr = [0u8; 128];
    for (at, v) in [(0, BPF_MAP_TYPE_HASH), (4, key), (8, value), (12, entries)] {
        attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }
    // SAFETY: `attr` is a zeroed `union bpf_attr` of the map-create layout, 128 bytes long.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), attr.len()) };
    ensure!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut pin = [0u8; 128];
    pin[..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    pin[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    // SAFETY: as above, of the object-pin layout; `c_path` outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_ptr(), pin.len()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: our own descriptor; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
    ensure!(r == 0, "BPF_OBJ_PIN {}: {err}", path.display());
    Ok(())
}

/// A pin folder holding a VIP map of another layout (a value 4 bytes longer, as a later build
/// might have): `open` cannot take it over, `open_or_replace` removes it and starts afresh,
/// and the fresh balancer works.
fn foreign_pins() -> anyhow::Result<Outcome> {
    if let Some(skip) = require_root() {
        return Ok(skip);
    }
    if let Err(XdpError::NotBuilt) = Balancer::load() {
        return Ok(Outcome::Skip(XdpError::NotBuilt.to_string()));
    }
    let pins =
        PinGuard(std::path::Path::new("/sys/fs/bpf").join(drop_tests::unique_name("droplb")));
    std::fs::create_dir_all(&pins.0)?;
    pin_hash_map(&pins.0.join(drop_common::lb::VIPS_MAP), 8, 20, 16)?;
    let refused = Balancer::open(&pins.0);
    ensure!(refused.is_err(), "a foreign VIP map was taken over");
    println!(
        "  open refused the foreign pins: {:#}",
        anyhow::Error::from(refused.err().context("error")?)
    );
    let (mut lb, replaced) = Balancer::open_or_replace(&pins.0)?;
    ensure!(replaced, "not reported as started afresh");
    lb.set_vip(
        vip(VIP_A, 80, TCP),
        Forwarding::MacRewrite,
        &[backend(11, 1)],
    )?;
    let syn = packet(TCP, 40050, VIP_A, 80, b"");
    let run = lb.test_run(&syn, 1)?;
    ensure!(
        run.verdict == XdpVerdict::Tx && run.frame == rewritten(&syn, backend(11, 1).mac),
        "the fresh balancer did not forward: {:?}",
        run.verdict
    );
    drop(lb);
    let (again, replaced) = Balancer::open_or_replace(&pins.0)?;
    ensure!(
        !replaced && again.vips().len() == 1,
        "its own pins were not taken over"
    );
    println!("  open_or_replace started afresh, forwarded, and its own pins were then taken over");
    Ok(Outcome::Pass)
}

/// Removes a test's balancer pins on every exit path.
struct PinGuard(std::path::PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Err(e) = Balancer::remove_pinned(&self.0) {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

// ---- the daemon: a service with a port, balanced on its namespace's VIP ---------------------

/// A line server on port `PORT` (7000 by default; any address, so the VIP on lo too)
/// answering `instance <DROP_INSTANCE> <line>`.
const SERVER: &str = r#"import os, socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(os.environ.get("PORT", "7000"))))
s.listen(64)
me = os.environ.get("DROP_INSTANCE", "?").encode()
def serve(c):
    f = c.makefile("rwb")
    for line in f:
        f.write(b"instance " + me + b" " + line)
        f.flush()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// `n` connections to `vip:port`, each sending one line to the line server ([`SERVER`]): the
/// instances that answered.
fn instances_answering(
    vip: Ipv4Addr,
    port: u16,
    n: usize,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        let s = TcpStream::connect_timeout(&SocketAddr::from((vip, port)), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut reader = BufReader::new(s.try_clone()?);
        let mut w = s;
        w.write_all(b"hi\n")?;
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let words: Vec<&str> = line.split_whitespace().collect();
        ensure!(
            words.len() == 3 && words[0] == "instance" && words[2] == "hi",
            "answer {line:?}"
        );
        seen.insert(words[1].to_string());
    }
    Ok(seen)
}

/// The VIP:port entry of `lb ls --json` for `port`.
fn vip_entry(lb: &serde_json::Value, port: u16) -> Option<serde_json::Value> {
    lb["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|e| e["port"] == port))
        .cloned()
}

/// The weights of a VIP:port entry's backends, in order.
fn weights(entry: &serde_json::Value) -> Vec<u64> {
    entry["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| b["weight"].as_u64().unwrap_or(0))
        .collect()
}

fn service_port() -> anyhow::Result<Outcome> {
    if let Some(skip) = require_root()
        .or_else(drop_tests::systemd::SystemdSandbox::unavailable)
        .or_else(|| require_command("sysctl"))
    {
        return Ok(skip);
    }
    if let Err(XdpError::NotBuilt) = Balancer::load() {
        return Ok(Outcome::Skip(XdpError::NotBuilt.to_string()));
    }
    let pins: Vec<PinGuard> = (0..3)
        .map(|_| {
            PinGuard(std::path::Path::new("/sys/fs/bpf").join(drop_tests::unique_name("droplb")))
        })
        .collect();
    let node_extra: Vec<String> = pins
        .iter()
        .map(|p| {
            format!(
                "[balancer]\nenabled = true\ninterface = \"eth0\"\nmode = \"generic\"\npin_dir = {:?}\n",
                p.0.display().to_string()
            )
        })
        .collect();
    let sc =
        drop_tests::services::ServiceCluster::start_in_netns(3, 1, "fast", "[vip]\n", &node_extra)?;
    let client = sc.fx.bridge().host(3);
    let result = (|| -> anyhow::Result<()> {
        for i in 0..3 {
            let netns = sc.fx.node(i).host().netns();
            for (k, v) in [
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
            ] {
                netns.exec("sysctl", &["-qw", &format!("{k}={v}")])?;
            }
        }
        let vip = "10.201.0.100";
        sc.create_namespace_with("t", Some(vip), Duration::from_secs(30))?;
        sc.dropctl(
            0,
            &[
                "service",
                "set",
                "web",
                "--count",
                "3",
                "--port",
                "7000",
                "--exec",
                "/usr/bin/python3",
                "-c",
                SERVER,
            ],
        )?;
        // The holder's balancer serves VIP:7000 with the three nodes.
        let holder = drop_tests::cluster::wait_for(
            Duration::from_secs(40),
            "VIP:7000 programmed with 3 backends on the holder",
            || {
                let v = sc.dropctl(0, &["vip", "show", "t"])?;
                let name = v["holder"].as_str().context("no holder yet")?.to_string();
                let i = (0..3)
                    .find(|&i| sc.fx.node(i).name() == name)
                    .context("holder")?;
                let lb = sc.dropctl(i, &["lb", "ls"])?;
                let entry =
                    vip_entry(&lb, 7000).with_context(|| format!("no VIP:7000 yet: {lb}"))?;
                let weights = weights(&entry);
                let gw = vip_entry(&lb, 8081)
                    .with_context(|| format!("no VIP:8081 (the gateway port) yet: {lb}"))?;
                ensure!(
                    gw["backends"].as_array().is_some_and(|b| b.len() == 3),
                    "gateway port backends {gw}"
                );
                if weights != [1, 1, 1] {
                    let show = sc.dropctl(i, &["service", "show", "web"])?;
                    let nodes = sc.dropctl(i, &["node", "ls"])?;
                    anyhow::bail!("backends {entry}; service {show}; nodes {nodes}");
                }
                Ok(i)
            },
        )?;
        // From a client on the segment, through the VIP, to every instance.
        let vip_addr: Ipv4Addr = vip.parse()?;
        let answers = drop_tests::cluster::wait_for(
            Duration::from_secs(20),
            "answers from all three instances",
            || {
                client
                    .netns()
                    .run(|| -> anyhow::Result<std::collections::BTreeSet<String>> {
                        let seen = instances_answering(vip_addr, 7000, 40)?;
                        if seen.len() != 3 {
                            let mut dbg = String::new();
                            for i in 0..3 {
                                dbg.push_str(&format!(
                                    "\n n{i}: lb {} lo {}",
                                    sc.dropctl(i, &["lb", "ls"])
                                        .map(|v| v.to_string())
                                        .unwrap_or_default(),
                                    sc.fx
                                        .node(i)
                                        .host()
                                        .netns()
                                        .ip(&["-4", "addr", "show", "dev", "lo"])
                                        .unwrap_or_default()
                                        .replace('\n', " ")
                                ));
                            }
                            dbg.push_str(&format!(
                                "\n service {}",
                                sc.dropctl(0, &["service", "show", "web"])
                                    .map(|v| v.to_string())
                                    .unwrap_or_default()
                            ));
                            anyhow::bail!("instances answering: {seen:?}{dbg}");
                        }
                        Ok(seen)
                    })?
            },
        )?;
        // The namespace's gateway port, balanced by default over the three gateways.
        let gateways =
            client
                .netns()
                .run(|| -> anyhow::Result<std::collections::BTreeSet<String>> {
                    let mut seen = std::collections::BTreeSet::new();
                    for _ in 0..30 {
                        let mut s = TcpStream::connect_timeout(
                            &SocketAddr::from((vip_addr, 8081)),
                            Duration::from_secs(2),
                        )?;
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        let r = drop_supervisor::http::roundtrip(&mut s, "GET", "/ui/state", None)?;
                        ensure!(
                            r.status == 200,
                            "GET /ui/state through the VIP: {}",
                            r.status
                        );
                        let v: serde_json::Value = serde_json::from_slice(&r.body)?;
                        seen.insert(v["node"]["name"].as_str().unwrap_or("?").to_string());
                    }
                    Ok(seen)
                })??;
        ensure!(
            gateways.len() >= 2,
            "the gateway port reached only {gateways:?}"
        );
        println!("  VIP:8081 (the gateway port, by default): 30 requests answered by {gateways:?}");

        // The same, forwarded by IPIP: the holder encapsulates to each node's address through
        // its next hop (here the node itself, on the segment), and each node's drop_lb takes
        // the header off.
        sc.dropctl(
            0,
            &[
                "service",
                "set",
                "tunnelled",
                "--count",
                "3",
                "--port",
                "7100",
                "--forward",
                "ipip",
                "--env",
                "PORT=7100",
                "--exec",
                "/usr/bin/python3",
                "-c",
                SERVER,
            ],
        )?;
        let ipip_entry = drop_tests::cluster::wait_for(
            Duration::from_secs(40),
            "VIP:7100 programmed by IPIP with 3 backends on the holder",
            || {
                let lb = sc.dropctl(holder, &["lb", "ls"])?;
                let entry =
                    vip_entry(&lb, 7100).with_context(|| format!("no VIP:7100 yet: {lb}"))?;
                ensure!(entry["forward"] == "ipip", "{entry}");
                ensure!(weights(&entry) == [1, 1, 1], "{entry}");
                Ok(entry)
            },
        )?;
        let ipip_answers = drop_tests::cluster::wait_for(
            Duration::from_secs(20),
            "answers from all three instances through IPIP",
            || {
                let seen = client
                    .netns()
                    .run(|| instances_answering(vip_addr, 7100, 40))??;
                ensure!(seen.len() == 3, "instances answering: {seen:?}");
                Ok(seen)
            },
        )?;
        let mut taken_apart = Vec::new();
        for i in (0..3).filter(|&i| i != holder) {
            let lb = sc.dropctl(i, &["lb", "ls"])?;
            taken_apart.push(lb["decapsulated"].as_u64().unwrap_or(0));
        }
        ensure!(
            taken_apart.iter().all(|n| *n > 0),
            "a backend took no IPIP frame apart: {taken_apart:?}"
        );
        let vias: Vec<String> = ipip_entry["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                format!(
                    "{} via {}",
                    b["node"].as_str().unwrap_or("?"),
                    b["via"].as_str().unwrap_or("itself")
                )
            })
            .collect();
        println!(
            "  VIP:7100 forwarded by IPIP ({vias:?}): 40 connections answered by instances {ipip_answers:?}; the other two nodes took {taken_apart:?} frames apart"
        );
        let lb = sc.dropctl(holder, &["lb", "ls"])?;
        let entry = vip_entry(&lb, 7000).unwrap_or_default();
        let forwarded: u64 = entry["packets"].as_u64().unwrap_or(0);
        ensure!(forwarded > 0, "the holder forwarded nothing: {entry}");
        // The other nodes have the VIP:ports programmed in standby and balanced nothing: what
        // the holder sent them went to their kernels (not back and forth between two rings).
        for i in (0..3).filter(|&i| i != holder) {
            let lb = sc.dropctl(i, &["lb", "ls"])?;
            ensure!(
                lb["standby"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|a| a == vip)),
                "n{i} not in standby: {lb}"
            );
            let theirs: u64 = lb["vips"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| e["packets"].as_u64().unwrap_or(0))
                .sum();
            ensure!(
                theirs == 0,
                "n{i}, not the holder, forwarded {theirs} frames: {lb}"
            );
        }
        // The same in the metrics: the holder has no VIP in standby, the others one.
        for i in 0..3 {
            let addr = SocketAddr::from((sc.fx.node(i).host().addr(), 8081));
            let text = client.netns().run(|| -> anyhow::Result<String> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let r = drop_supervisor::http::roundtrip(&mut s, "GET", "/metrics", None)?;
                ensure!(r.status == 200, "GET /metrics: {}", r.status);
                Ok(String::from_utf8_lossy(&r.body).into_owned())
            })??;
            let want = format!("drop_lb_standby {}\n", u8::from(i != holder));
            ensure!(text.contains(&want), "n{i}'s metrics lack {want:?}");
        }
        println!(
            "  holder {} ({} mode on {}) forwards VIP:7000 to instances {answers:?}: {forwarded} frames forwarded, {} new flows",
            sc.fx.node(holder).name(),
            lb["mode"],
            lb["interface"],
            entry["new_flows"]
        );

        // The holder's supervisor stops: the VIP moves; established connections to instances
        // on the other nodes keep their instance (the new holder computed the same ring, minus
        // the node that left).
        let mut conns = client.netns().run(
            || -> anyhow::Result<Vec<(BufReader<TcpStream>, TcpStream, String)>> {
                let mut v = Vec::new();
                for _ in 0..30 {
                    let s = TcpStream::connect_timeout(
                        &SocketAddr::from((vip_addr, 7000)),
                        Duration::from_secs(2),
                    )?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    let mut r = BufReader::new(s.try_clone()?);
                    let mut w = s;
                    w.write_all(b"a\n")?;
                    let mut line = String::new();
                    r.read_line(&mut line)?;
                    let who = line
                        .split_whitespace()
                        .nth(1)
                        .context("answer")?
                        .to_string();
                    v.push((r, w, who));
                }
                Ok(v)
            },
        )??;
        let show = sc.dropctl(holder, &["service", "show", "web"])?;
        let on_holder: std::collections::BTreeSet<String> = show["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["node"] == sc.fx.node(holder).name())
            .filter_map(|i| i["index"].as_u64().map(|n| n.to_string()))
            .collect();
        sc.fx.node(holder).stop()?;
        let other = (0..3).find(|&i| i != holder).context("another node")?;
        let new_holder = drop_tests::cluster::wait_for(
            Duration::from_secs(20),
            "a new holder serving VIP:7000",
            || {
                let v = sc.dropctl(other, &["vip", "show", "t"])?;
                let name = v["holder"].as_str().context("no holder")?.to_string();
                let i = (0..3)
                    .find(|&i| sc.fx.node(i).name() == name)
                    .context("holder")?;
                ensure!(i != holder, "still the old holder");
                let lb = sc.dropctl(i, &["lb", "ls"])?;
                ensure!(vip_entry(&lb, 7000).is_some(), "{lb}");
                ensure!(
                    lb["standby"]
                        .as_array()
                        .is_some_and(|s| !s.iter().any(|a| a == vip)),
                    "the new holder is still in standby: {lb}"
                );
                Ok(i)
            },
        )?;
        let (kept, moved, lost) = client.netns().run(|| {
            let (mut kept, mut moved, mut lost) = (0, 0, 0);
            for (r, w, who) in conns.iter_mut().filter(|c| !on_holder.contains(&c.2)) {
                let mut line = String::new();
                let ok = w.write_all(b"b\n").is_ok() && r.read_line(&mut line).is_ok_and(|n| n > 0);
                match line.split_whitespace().nth(1) {
                    Some(now) if ok && now == who.as_str() => kept += 1,
                    Some(_) if ok => moved += 1,
                    _ => lost += 1,
                }
            }
            (kept, moved, lost)
        })?;
        println!(
            "  holder {} stopped, {} took the VIP: of the connections to instances on the other nodes {kept} kept their instance, {moved} moved, {lost} broke",
            sc.fx.node(holder).name(),
            sc.fx.node(new_holder).name()
        );
        ensure!(
            kept > 0 && moved == 0,
            "connections moved to another instance on failover"
        );
        Ok(())
    })();
    if result.is_err() {
        println!("  daemon logs:\n{}", sc.fx.log_tails(30));
    }
    drop(sc);
    drop(pins);
    result.map(|()| Outcome::Pass)
}
