//! The frames of the floating address, as bytes: the gratuitous ARP request and the unsolicited
//! IPv6 neighbour advertisement DROP sends when it takes an address over, and the parsing of the
//! frames another holder of the address would send. Pure code, unit-tested without a kernel.
//!
//! Frames start at the Ethernet header, as an `AF_PACKET`/`SOCK_RAW` socket sends and receives
//! them (no VLAN tag: the kernel strips it before packet sockets see the frame).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Mac;

/// Length of an Ethernet header without VLAN tag.
pub(super) const ETH_HLEN: usize = 14;
/// `ETH_P_ARP`.
pub(super) const ETHERTYPE_ARP: u16 = 0x0806;
/// `ETH_P_IPV6`.
pub(super) const ETHERTYPE_IPV6: u16 = 0x86dd;
/// An ARP packet for IPv4 over Ethernet is 28 bytes; with its Ethernet header 42 (shorter than
/// Ethernet's 60-byte minimum: a real NIC pads it, a veth does not need to).
pub(super) const ARP_FRAME_LEN: usize = ETH_HLEN + 28;
/// Ethernet + IPv6 header + NA (24 bytes) + target link-layer address option (8 bytes).
pub(super) const NA_FRAME_LEN: usize = ETH_HLEN + IPV6_HLEN + NA_LEN + 8;

const BROADCAST: Mac = Mac([0xff; 6]);
const ARP_HTYPE_ETHERNET: u16 = 1;
const ARP_PTYPE_IPV4: u16 = 0x0800;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

const IPV6_HLEN: usize = 40;
const IPPROTO_ICMPV6: u8 = 58;
/// Hop limit of every neighbour-discovery packet; receivers drop any other value (RFC 4861).
const ND_HOP_LIMIT: u8 = 255;
const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
/// Fixed part of a neighbour advertisement: type, code, checksum, flags, target.
const NA_LEN: usize = 24;
/// Same size for a solicitation (type, code, checksum, reserved, target).
const NS_LEN: usize = 24;
/// "Override" flag of a neighbour advertisement: replace the cached link-layer address.
const NA_FLAG_OVERRIDE: u8 = 0x20;
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;
/// ff02::1, all nodes on the link.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The gratuitous ARP request announcing that `vip` is at `mac`: broadcast, sender IP = target
/// IP = `vip`, target MAC all zero (what `arping -U` and keepalived send). Receivers that have a
/// neighbour entry for `vip` replace its MAC.
pub(super) fn arp_announcement(mac: Mac, vip: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    let mut frame = [0u8; ARP_FRAME_LEN];
    ethernet_header(&mut frame, BROADCAST, mac, ETHERTYPE_ARP);
    let arp = &mut frame[ETH_HLEN..];
    arp[0..2].copy_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    arp[2..4].copy_from_slice(&ARP_PTYPE_IPV4.to_be_bytes());
    arp[4] = 6; // hardware address length
    arp[5] = 4; // protocol address length
    arp[6..8].copy_from_slice(&ARP_REQUEST.to_be_bytes());
    arp[8..14].copy_from_slice(&mac.0);
    arp[14..18].copy_from_slice(&vip.octets());
    // arp[18..24]: target MAC, unknown, left zero.
    arp[24..28].copy_from_slice(&vip.octets());
    frame
}

/// The unsolicited neighbour advertisement announcing that `vip` is at `mac`: from `vip` to
/// all nodes (ff02::1, Ethernet 33:33:00:00:00:01), hop limit 255, flags Override only (not
/// Solicited, not Router), with a target link-layer address option. Receivers that have a
/// neighbour entry for `vip` replace its MAC (RFC 4861 §7.2.6).
pub(super) fn neighbour_advertisement(mac: Mac, vip: Ipv6Addr) -> [u8; NA_FRAME_LEN] {
    let mut frame = [0u8; NA_FRAME_LEN];
    ethernet_header(&mut frame, multicast_mac(ALL_NODES), mac, ETHERTYPE_IPV6);
    let icmp_len = NA_FRAME_LEN - ETH_HLEN - IPV6_HLEN;
    let ip = &mut frame[ETH_HLEN..ETH_HLEN + IPV6_HLEN];
    ip[0] = 0x60; // version 6, traffic class and flow label 0
    ip[4..6].copy_from_slice(&u16::try_from(icmp_len).unwrap_or(0).to_be_bytes());
    ip[6] = IPPROTO_ICMPV6;
    ip[7] = ND_HOP_LIMIT;
    ip[8..24].copy_from_slice(&vip.octets());
    ip[24..40].copy_from_slice(&ALL_NODES.octets());
    let icmp = &mut frame[ETH_HLEN + IPV6_HLEN..];
    icmp[0] = ICMPV6_NEIGHBOUR_ADVERTISEMENT;
    // icmp[1]: code 0; icmp[2..4]: checksum, below.
    icmp[4] = NA_FLAG_OVERRIDE;
    icmp[8..24].copy_from_slice(&vip.octets());
    icmp[24] = ND_OPT_TARGET_LL;
    icmp[25] = 1; // option length in units of 8 bytes
    icmp[26..32].copy_from_slice(&mac.0);
    let checksum = icmpv6_checksum(vip, ALL_NODES, icmp);
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
    frame
}

/// The sender MAC of `frame` if it says that someone other than `ours` holds `vip`:
/// - IPv4: an ARP request or reply whose sender IP is `vip` (a gratuitous ARP, or an answer
///   for the address);
/// - IPv6: a neighbour advertisement whose target is `vip`, or a neighbour solicitation sent
///   from `vip`; the MAC is the one in the link-layer address option, else the Ethernet source.
///
/// Anything else (other addresses, our own MAC, malformed or foreign frames) gives `None`.
pub(super) fn conflict(frame: &[u8], vip: IpAddr, ours: Mac) -> Option<Mac> {
    let sender = match vip {
        IpAddr::V4(vip) => arp_sender(frame, vip),
        IpAddr::V6(vip) => nd_sender(frame, vip),
    }?;
    (sender != ours).then_some(sender)
}

/// Sender MAC of an ARP request or reply whose sender IP is `vip`.
fn arp_sender(frame: &[u8], vip: Ipv4Addr) -> Option<Mac> {
    if frame.len() < ARP_FRAME_LEN || be16(frame, 12) != ETHERTYPE_ARP {
        return None;
    }
    let arp = &frame[ETH_HLEN..];
    let well_formed = be16(arp, 0) == ARP_HTYPE_ETHERNET
        && be16(arp, 2) == ARP_PTYPE_IPV4
        && arp[4] == 6
        && arp[5] == 4
        && matches!(be16(arp, 6), ARP_REQUEST | ARP_REPLY);
    if !well_formed || arp[14..18] != vip.octets() {
        return None;
    }
    Some(mac_at(arp, 8))
}

/// Link-layer address of a neighbour advertisement for `vip`, or of a solicitation from `vip`.
fn nd_sender(frame: &[u8], vip: Ipv6Addr) -> Option<Mac> {
    if frame.len() < ETH_HLEN + IPV6_HLEN || be16(frame, 12) != ETHERTYPE_IPV6 {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    if ip[0] >> 4 != 6 || ip[6] != IPPROTO_ICMPV6 || ip[7] != ND_HOP_LIMIT {
        return None;
    }
    let payload_len = usize::from(be16(ip, 4));
    let icmp = ip[IPV6_HLEN..].get(..payload_len)?;
    let (fixed, option) = match *icmp.first()? {
        ICMPV6_NEIGHBOUR_ADVERTISEMENT if icmp.len() >= NA_LEN && icmp[8..24] == vip.octets() => {
            (NA_LEN, ND_OPT_TARGET_LL)
        }
        ICMPV6_NEIGHBOUR_SOLICITATION if icmp.len() >= NS_LEN && ip[8..24] == vip.octets() => {
            (NS_LEN, ND_OPT_SOURCE_LL)
        }
        _ => return None,
    };
    if icmp[1] != 0 {
        return None;
    }
    Some(nd_option_mac(&icmp[fixed..], option).unwrap_or_else(|| mac_at(frame, 6)))
}

/// The MAC in the first neighbour-discovery option of type `kind`, if any. Stops at a malformed
/// option (length 0 or past the end).
fn nd_option_mac(mut options: &[u8], kind: u8) -> Option<Mac> {
    while options.len() >= 2 {
        let len = usize::from(options[1]) * 8;
        if len == 0 || len > options.len() {
            return None;
        }
        if options[0] == kind && len >= 8 {
            return Some(mac_at(options, 2));
        }
        options = &options[len..];
    }
    None
}

/// The Internet checksum of an ICMPv6 message (its checksum field zero or, to verify, filled
/// in: then the result is 0) with the IPv6 pseudo-header of RFC 8200 §8.1.
pub(super) fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> u16 {
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let mut pseudo = [0u8; 40];
    pseudo[0..16].copy_from_slice(&src.octets());
    pseudo[16..32].copy_from_slice(&dst.octets());
    pseudo[32..36].copy_from_slice(&len.to_be_bytes());
    pseudo[39] = IPPROTO_ICMPV6;
    let sum = ones_complement_sum(&pseudo, 0);
    let sum = ones_complement_sum(message, sum);
    !fold(sum)
}

/// Adds `bytes` as big-endian 16-bit words (a last odd byte padded with zero) to `sum`.
fn ones_complement_sum(bytes: &[u8], mut sum: u64) -> u64 {
    let mut words = bytes.chunks_exact(2);
    for word in &mut words {
        sum += u64::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

/// Folds the carries of a one's-complement sum into 16 bits.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap_or(u16::MAX)
}

/// The Ethernet multicast address of an IPv6 multicast group: 33:33 and its last 32 bits.
fn multicast_mac(group: Ipv6Addr) -> Mac {
    let o = group.octets();
    Mac([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

fn ethernet_header(frame: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    frame[0..6].copy_from_slice(&dst.0);
    frame[6..12].copy_from_slice(&src.0);
    frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// Big-endian u16 at `at`; callers have checked the length.
fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// The 6 bytes at `at` as a MAC; callers have checked the length.
fn mac_at(bytes: &[u8], at: usize) -> Mac {
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&bytes[at..at + 6]);
    Mac(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: Mac = Mac([0x02, 0, 0, 0, 0, 0x01]);
    const THEIRS: Mac = Mac([0x02, 0, 0, 0, 0, 0x02]);
    const VIP4: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 100);
    const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 0x100);

    #[test]
    fn arp_announcement_is_the_42_bytes_of_arping_u() {
        #[rustfmt::skip]
        let expected: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // Ethernet destination: broadcast
            0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // Ethernet source: ours
            0x08, 0x06,                         // ARP
            0x00, 0x01,                         // hardware type Ethernet
            0x08, 0x00,                         // protocol type IPv4
            6, 4,                               // address lengths
            0x00, 0x01,                         // request
            0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // sender MAC
            10, 201, 0, 100,                    // sender IP = VIP
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // target MAC unknown
            10, 201, 0, 100,                    // target IP = VIP
        ];
        assert_eq!(arp_announcement(OURS, VIP4), expected);
    }

    /// An ARP packet as the kernel would send it; `op` 1 = request, 2 = reply.
    fn arp(op: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&(if op == 1 { BROADCAST } else { tha }).0);
        frame.extend_from_slice(&sha.0);
        frame.extend_from_slice(&[0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4]);
        frame.extend_from_slice(&op.to_be_bytes());
        frame.extend_from_slice(&sha.0);
        frame.extend_from_slice(&spa.octets());
        frame.extend_from_slice(&tha.0);
        frame.extend_from_slice(&tpa.octets());
        frame
    }

    #[test]
    fn arp_reply_and_gratuitous_arp_from_another_mac_are_conflicts() {
        let client = Ipv4Addr::new(10, 201, 0, 12);
        let reply = arp(2, THEIRS, VIP4, OURS, client);
        assert_eq!(conflict(&reply, VIP4.into(), OURS), Some(THEIRS));
        let garp = arp_announcement(THEIRS, VIP4);
        assert_eq!(conflict(&garp, VIP4.into(), OURS), Some(THEIRS));
        // The reply form of a gratuitous ARP (`arping -A`: target MAC broadcast).
        let garp_reply = arp(2, THEIRS, VIP4, BROADCAST, VIP4);
        assert_eq!(conflict(&garp_reply, VIP4.into(), OURS), Some(THEIRS));
        // Padded to Ethernet's minimum, as a real NIC delivers it.
        let mut padded = reply.clone();
        padded.resize(60, 0);
        assert_eq!(conflict(&padded, VIP4.into(), OURS), Some(THEIRS));
    }

    #[test]
    fn own_mac_other_addresses_and_questions_are_not_conflicts() {
        // Our own announcement, looping back to the packet socket.
        let own = arp_announcement(OURS, VIP4);
        assert_eq!(conflict(&own, VIP4.into(), OURS), None);
        // Another host announcing another address.
        let other = arp_announcement(THEIRS, Ipv4Addr::new(10, 201, 0, 101));
        assert_eq!(conflict(&other, VIP4.into(), OURS), None);
        // A client asking who has the VIP: the VIP is the target, not the sender.
        let who_has = arp(1, THEIRS, Ipv4Addr::new(10, 201, 0, 12), Mac([0; 6]), VIP4);
        assert_eq!(conflict(&who_has, VIP4.into(), OURS), None);
        // An ARP probe (RFC 5227): sender IP 0.0.0.0.
        let probe = arp(1, THEIRS, Ipv4Addr::UNSPECIFIED, Mac([0; 6]), VIP4);
        assert_eq!(conflict(&probe, VIP4.into(), OURS), None);
    }

    #[test]
    fn malformed_or_foreign_frames_are_not_conflicts() {
        let garp = arp_announcement(THEIRS, VIP4);
        assert_eq!(conflict(&garp[..41], VIP4.into(), OURS), None);
        let mut not_arp = garp;
        not_arp[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(conflict(&not_arp, VIP4.into(), OURS), None);
        let mut bad_op = garp;
        bad_op[21] = 3; // RARP request
        assert_eq!(conflict(&bad_op, VIP4.into(), OURS), None);
        // An IPv4 frame is never an IPv6 conflict, and the other way round.
        assert_eq!(conflict(&garp, VIP6.into(), OURS), None);
        let na = neighbour_advertisement(THEIRS, VIP6);
        assert_eq!(conflict(&na, VIP4.into(), OURS), None);
        assert_eq!(conflict(&[], VIP4.into(), OURS), None);
        assert_eq!(conflict(&[], VIP6.into(), OURS), None);
    }

    #[test]
    fn neighbour_advertisement_layout_and_checksum() {
        let frame = neighbour_advertisement(OURS, VIP6);
        assert_eq!(frame.len(), 86);
        assert_eq!(frame[0..6], [0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(frame[6..12], OURS.0);
        assert_eq!(frame[12..14], [0x86, 0xdd]);
        let ip = &frame[ETH_HLEN..];
        assert_eq!(ip[0..4], [0x60, 0, 0, 0]);
        assert_eq!(be16(ip, 4), 32, "payload length");
        assert_eq!((ip[6], ip[7]), (58, 255), "next header, hop limit");
        assert_eq!(ip[8..24], VIP6.octets());
        assert_eq!(ip[24..40], ALL_NODES.octets());
        let icmp = &ip[IPV6_HLEN..];
        assert_eq!((icmp[0], icmp[1]), (136, 0));
        assert_eq!(icmp[4..8], [0x20, 0, 0, 0], "Override only");
        assert_eq!(icmp[8..24], VIP6.octets());
        assert_eq!(icmp[24..32], [2, 1, 0x02, 0, 0, 0, 0, 0x01]);
        // Filled in, the checksum verifies (the sum over everything is 0xffff).
        assert_eq!(icmpv6_checksum(VIP6, ALL_NODES, icmp), 0);
        // And is the value an independent implementation (a few lines of Python) computes.
        assert_eq!(be16(icmp, 2), 0x549b);
    }

    #[test]
    fn checksum_of_odd_length_and_carries() {
        // RFC 1071 example words, with an odd trailing byte.
        assert_eq!(
            fold(ones_complement_sum(&[0xff, 0xff, 0xff, 0xff], 0)),
            0xffff
        );
        assert_eq!(ones_complement_sum(&[0x12], 0), 0x1200);
        assert_eq!(fold(0x1_0001), 2);
    }

    /// A neighbour-discovery message from `src` to `dst` with `body` after type and code,
    /// checksum filled in.
    fn nd(src_mac: Mac, src: Ipv6Addr, dst: Ipv6Addr, kind: u8, body: &[u8]) -> Vec<u8> {
        let mut icmp = vec![kind, 0, 0, 0];
        icmp.extend_from_slice(body);
        let checksum = icmpv6_checksum(src, dst, &icmp);
        icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
        let mut frame = Vec::new();
        frame.extend_from_slice(&multicast_mac(dst).0);
        frame.extend_from_slice(&src_mac.0);
        frame.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        frame.extend_from_slice(&u16::try_from(icmp.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&[58, 255]);
        frame.extend_from_slice(&src.octets());
        frame.extend_from_slice(&dst.octets());
        frame.extend_from_slice(&icmp);
        frame
    }

    #[test]
    fn neighbour_advertisement_for_the_vip_from_another_mac_is_a_conflict() {
        let na = neighbour_advertisement(THEIRS, VIP6);
        assert_eq!(conflict(&na, VIP6.into(), OURS), Some(THEIRS));
        assert_eq!(
            conflict(&neighbour_advertisement(OURS, VIP6), VIP6.into(), OURS),
            None
        );
        let other = neighbour_advertisement(THEIRS, Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 1));
        assert_eq!(conflict(&other, VIP6.into(), OURS), None);

        // A solicited answer without the option: the Ethernet source counts.
        let mut body = vec![0x60, 0, 0, 0];
        body.extend_from_slice(&VIP6.octets());
        let client = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 0x12);
        let answer = nd(THEIRS, VIP6, client, 136, &body);
        assert_eq!(conflict(&answer, VIP6.into(), OURS), Some(THEIRS));

        // A solicitation sent from the VIP with a source link-layer option.
        let mut body = vec![0, 0, 0, 0];
        body.extend_from_slice(&client.octets());
        body.extend_from_slice(&[1, 1]);
        body.extend_from_slice(&THEIRS.0);
        let from_vip = nd(Mac([0x02, 0, 0, 0, 0, 0x09]), VIP6, client, 135, &body);
        assert_eq!(conflict(&from_vip, VIP6.into(), OURS), Some(THEIRS));
        // A solicitation *for* the VIP (from a client) is not.
        let mut body = vec![0, 0, 0, 0];
        body.extend_from_slice(&VIP6.octets());
        let for_vip = nd(THEIRS, client, VIP6, 135, &body);
        assert_eq!(conflict(&for_vip, VIP6.into(), OURS), None);
    }

    #[test]
    fn malformed_nd_options_and_hop_limits_are_handled() {
        let mut na = neighbour_advertisement(THEIRS, VIP6).to_vec();
        // Hop limit below 255: not a valid neighbour-discovery packet.
        na[ETH_HLEN + 7] = 64;
        assert_eq!(conflict(&na, VIP6.into(), OURS), None);
        na[ETH_HLEN + 7] = 255;
        // An option of length 0 ends the option walk; the Ethernet source is used.
        na[ETH_HLEN + IPV6_HLEN + 25] = 0;
        assert_eq!(nd_option_mac(&na[ETH_HLEN + IPV6_HLEN + NA_LEN..], 2), None);
        assert_eq!(conflict(&na, VIP6.into(), OURS), Some(THEIRS));
        // A payload length past the end of the frame.
        na[ETH_HLEN + 5] = 200;
        assert_eq!(conflict(&na, VIP6.into(), OURS), None);
    }
}
