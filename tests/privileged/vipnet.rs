//! The floating-IP seam of drop-net (`Netlink`, the real `VipNet`) against the real kernel, in
//! bridged network namespaces: marked addresses come and go idempotently, a gratuitous ARP (or
//! an unsolicited neighbour advertisement) moves a client's neighbour entry to the new holder,
//! and the conflict watch sees another holder but never ourselves.
//!
//! Each `Netlink` is created on a thread inside its host's namespace (`Netns::run`) and then
//! used from the test's own thread: it keeps working in the namespace it was created in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use drop_net::{ADDRESS_PROTO, Mac, NetError, Netlink, Vip, VipNet};
use drop_tests::netns::{Bridge, COMMAND_TIMEOUT, Host, run_bounded};
use drop_tests::{Outcome, Test, require_command, require_root};

pub const TESTS: &[Test] = &[
    Test {
        name: "vipnet_add_remove_idempotent_and_marked",
        run: add_remove_idempotent_and_marked,
    },
    Test {
        name: "vipnet_garp_moves_the_neighbour_entry",
        run: garp_moves_the_neighbour_entry,
    },
    Test {
        name: "vipnet_conflict_seen",
        run: conflict_seen,
    },
    Test {
        name: "vipnet_ipv6_na_moves_the_neighbour_entry",
        run: ipv6_na_moves_the_neighbour_entry,
    },
];

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 0x100);
/// How long an announcement may take to reach a neighbour table or a watch.
const WITHIN: Duration = Duration::from_secs(1);
/// How long we wait to be sure something does *not* happen.
const QUIET: Duration = Duration::from_millis(300);

fn preconditions() -> Option<Outcome> {
    require_root()
        .or_else(|| require_command("ip"))
        .or_else(|| require_command("nsenter"))
}

fn vip(addr: impl Into<IpAddr>) -> Vip {
    let addr = addr.into();
    Vip {
        ifname: Bridge::IFNAME.to_owned(),
        addr,
        prefix: if addr.is_ipv4() { 32 } else { 128 },
    }
}

/// A `Netlink` working in `host`'s namespace.
fn netlink(host: &Host) -> anyhow::Result<Netlink> {
    host.netns()
        .run(Netlink::new)?
        .with_context(|| format!("Netlink::new in {}", host.netns().name()))
}

fn mac(host: &Host) -> Mac {
    Mac(host.mac().0)
}

/// The `addr_info` entries of `ip -j addr show dev eth0` in `host` for `addr`.
fn ip_addr_entries(host: &Host, addr: IpAddr) -> anyhow::Result<Vec<serde_json::Value>> {
    let links = host
        .netns()
        .ip_json(&["-d", "addr", "show", "dev", host.ifname()])?;
    Ok(links[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["local"].as_str() == Some(addr.to_string().as_str()))
        .cloned()
        .collect())
}

/// The MAC in `host`'s neighbour entry for `addr`, if it has one with a MAC.
fn neighbour(host: &Host, addr: IpAddr) -> anyhow::Result<Option<String>> {
    let entries = host.netns().ip_json(&[
        "neigh",
        "show",
        "to",
        &addr.to_string(),
        "dev",
        host.ifname(),
    ])?;
    Ok(entries[0]["lladdr"].as_str().map(str::to_owned))
}

/// Polls `check` every 10 ms until it gives `Some`, for at most `limit`.
fn within<T>(
    limit: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<Option<(T, Duration)>> {
    let start = Instant::now();
    loop {
        if let Some(found) = check()? {
            return Ok(Some((found, start.elapsed())));
        }
        if start.elapsed() >= limit {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// One ping from `host` to `addr` (IPv4 or IPv6): whether a reply came back.
fn ping(host: &Host, addr: IpAddr) -> anyhow::Result<bool> {
    let mut cmd = host.netns().command("ping");
    if addr.is_ipv6() {
        cmd.arg("-6");
    }
    cmd.args(["-c", "1", "-W", "1", "-q", &addr.to_string()]);
    Ok(run_bounded(&mut cmd, COMMAND_TIMEOUT)?.status.success())
}

fn add_remove_idempotent_and_marked() -> anyhow::Result<Outcome> {
    if let Some(skip) = preconditions() {
        return Ok(skip);
    }
    let bridge = Bridge::new(2)?;
    let host = bridge.host(0);
    let mut net = netlink(host)?;
    let v4 = vip(VIP4);
    let v6 = vip(VIP6);

    ensure!(net.add(&v4)?, "first add of {v4}: expected true (added)");
    ensure!(
        !net.add(&v4)?,
        "second add of {v4}: expected false (already there)"
    );
    ensure!(net.present(&v4)?, "{v4} not present after add");
    ensure!(
        !net.present(&Vip {
            prefix: 24,
            ..v4.clone()
        })?,
        "present() must compare the prefix too"
    );
    let shown = ip_addr_entries(host, VIP4.into())?;
    ensure!(
        shown.len() == 1 && shown[0]["prefixlen"] == 32,
        "`ip -j addr` shows {VIP4}: expected one /32 entry, got {shown:?}"
    );
    // iproute2 prints IFA_PROTO only from 6.3 on (this machine's 6.1 neither prints nor parses
    // it); where it does, it must be our mark.
    if let Some(proto) = shown[0].get("protocol") {
        ensure!(
            proto.as_str() == Some(&ADDRESS_PROTO.to_string())
                || proto.as_u64() == Some(u64::from(ADDRESS_PROTO)),
            "`ip -j addr` shows protocol {proto} for {VIP4}, expected {ADDRESS_PROTO}"
        );
    }

    // IPv6: added without duplicate address detection, usable at once.
    ensure!(net.add(&v6)?, "first add of {v6}: expected true");
    ensure!(!net.add(&v6)?, "second add of {v6}: expected false");
    let shown6 = ip_addr_entries(host, VIP6.into())?;
    ensure!(
        shown6.len() == 1 && shown6[0]["nodad"] == true && shown6[0].get("tentative").is_none(),
        "`ip -j addr` shows {VIP6}: expected one nodad, non-tentative entry, got {shown6:?}"
    );

    // An address added by hand carries no mark.
    let unmarked = Vip {
        addr: Ipv4Addr::new(10, 201, 0, 101).into(),
        ..v4.clone()
    };
    host.netns()
        .ip(&["addr", "add", "10.201.0.101/32", "dev", host.ifname()])?;
    ensure!(net.present(&unmarked)?, "{unmarked} (unmarked) not present");
    let mut marked = net.marked()?;
    marked.sort_by_key(|v| v.addr);
    ensure!(
        marked == [v4.clone(), v6.clone()],
        "marked(): expected exactly [{v4}, {v6}] (not the host's own {}, not the hand-added \
         {unmarked}, not the link-local address), got {marked:?}",
        host.addr()
    );
    // The other host's namespace is another world.
    let mut other = netlink(bridge.host(1))?;
    ensure!(
        other.marked()?.is_empty(),
        "host 1 sees marked addresses of host 0"
    );
    ensure!(!other.present(&v4)?, "host 1 sees host 0's {v4} as present");

    ensure!(net.remove(&v4)?, "first remove of {v4}: expected true");
    ensure!(
        !net.remove(&v4)?,
        "second remove of {v4}: expected false (absent)"
    );
    ensure!(!net.present(&v4)?, "{v4} still present after remove");
    ensure!(
        ip_addr_entries(host, VIP4.into())?.is_empty(),
        "`ip -j addr` still shows {VIP4} after remove"
    );
    ensure!(net.remove(&v6)?, "first remove of {v6}: expected true");
    ensure!(!net.remove(&v6)?, "second remove of {v6}: expected false");
    ensure!(
        net.marked()?.is_empty(),
        "marked() after removing both: expected nothing"
    );
    ensure!(
        net.present(&unmarked)?,
        "the hand-added {unmarked} must survive everything above"
    );

    let peer = bridge.host(1).addr();
    let dev = net.interface_towards(peer.into())?;
    ensure!(
        dev == "eth0",
        "interface_towards({peer}): expected eth0, got {dev}"
    );
    let outside = Ipv4Addr::new(192, 0, 2, 1);
    match net.interface_towards(outside.into()) {
        Err(NetError::NoRoute(addr)) if addr == IpAddr::from(outside) => {}
        other => bail!("interface_towards({outside}) without a default route: {other:?}"),
    }
    let own = net.mac("eth0")?;
    ensure!(
        own == mac(host),
        "mac(eth0): expected {}, got {own}",
        host.mac()
    );
    match net.mac("lo") {
        Err(NetError::NotEthernet(name)) if name == "lo" => {}
        other => bail!("mac(lo): expected NotEthernet, got {other:?}"),
    }

    let nowhere = Vip {
        ifname: "nosuch0".to_owned(),
        ..v4.clone()
    };
    for (what, result) in [
        ("add", net.add(&nowhere).map(|_| ())),
        ("remove", net.remove(&nowhere).map(|_| ())),
        ("present", net.present(&nowhere).map(|_| ())),
        ("announce", net.announce(&nowhere, own)),
        ("watch", net.watch(&nowhere, own)),
        ("mac", net.mac("nosuch0").map(|_| ())),
    ] {
        match result {
            Err(NetError::NoSuchInterface(name)) if name == "nosuch0" => {}
            other => bail!("{what} on nosuch0: expected NoSuchInterface, got {other:?}"),
        }
    }
    let err = net.add(&nowhere).unwrap_err().to_string();
    ensure!(
        err.contains("nosuch0"),
        "the error must name the interface: {err}"
    );
    Ok(Outcome::Pass)
}

fn garp_moves_the_neighbour_entry() -> anyhow::Result<Outcome> {
    if let Some(skip) = preconditions().or_else(|| require_command("ping")) {
        return Ok(skip);
    }
    let bridge = Bridge::new(3)?;
    let (old, new, client) = (bridge.host(0), bridge.host(1), bridge.host(2));
    let (mut net_old, mut net_new) = (netlink(old)?, netlink(new)?);
    let v4 = vip(VIP4);

    ensure!(net_old.add(&v4)?, "host 0: adding {v4}");
    ensure!(
        ping(client, VIP4.into())?,
        "host 2 got no reply from {VIP4} on host 0"
    );
    let before = neighbour(client, VIP4.into())?;
    ensure!(
        before.as_deref() == Some(&*old.mac().to_string()),
        "host 2's neighbour entry for {VIP4} after the ping: expected host 0's {}, got {before:?}",
        old.mac()
    );

    ensure!(net_old.remove(&v4)?, "host 0: removing {v4}");
    ensure!(net_new.add(&v4)?, "host 1: adding {v4}");
    // Control: adding the address alone tells the client nothing.
    thread::sleep(QUIET);
    let unannounced = neighbour(client, VIP4.into())?;
    ensure!(
        unannounced == before,
        "host 2's entry changed before any announcement: {unannounced:?}"
    );

    let new_mac = net_new.mac("eth0")?;
    net_new.announce(&v4, new_mac)?;
    let want = new.mac().to_string();
    let moved = within(WITHIN, || {
        Ok(neighbour(client, VIP4.into())?.filter(|mac| *mac == want))
    })?;
    let Some((_, took)) = moved else {
        bail!(
            "host 2's neighbour entry for {VIP4} did not move to host 1's {want} within \
             {WITHIN:?} of the gratuitous ARP: {:?}",
            neighbour(client, VIP4.into())?
        );
    };
    eprintln!("    neighbour entry moved {took:?} after the gratuitous ARP");
    ensure!(
        ping(client, VIP4.into())?,
        "host 2 got no reply from {VIP4} on host 1"
    );
    Ok(Outcome::Pass)
}

fn conflict_seen() -> anyhow::Result<Outcome> {
    if let Some(skip) = preconditions() {
        return Ok(skip);
    }
    let bridge = Bridge::new(2)?;
    let (holder, intruder) = (bridge.host(0), bridge.host(1));
    let (mut net0, mut net1) = (netlink(holder)?, netlink(intruder)?);
    let v4 = vip(VIP4);
    let ours = net0.mac("eth0")?;
    let theirs = net1.mac("eth0")?;

    ensure!(
        net0.conflicts()?.is_empty(),
        "conflicts() before any watch: expected nothing"
    );
    ensure!(net0.add(&v4)?, "host 0: adding {v4}");
    net0.watch(&v4, ours)?;
    // Our own announcements loop back to the watch socket: never a conflict.
    for _ in 0..3 {
        net0.announce(&v4, ours)?;
    }
    thread::sleep(QUIET);
    let own = net0.conflicts()?;
    ensure!(
        own.is_empty(),
        "host 0's own announcements reported as conflicts: {own:?}"
    );

    ensure!(net1.add(&v4)?, "host 1: adding {v4}");
    net1.announce(&v4, theirs)?;
    net0.announce(&v4, ours)?;
    net1.announce(&v4, theirs)?;
    let seen = within(WITHIN, || {
        let found = net0.conflicts()?;
        Ok((!found.is_empty()).then_some(found))
    })?;
    let Some((mut found, took)) = seen else {
        bail!("host 0 saw no conflict within {WITHIN:?} of host 1's gratuitous ARP");
    };
    eprintln!("    conflict seen {took:?} after host 1's gratuitous ARP");
    thread::sleep(QUIET);
    for mac in net0.conflicts()? {
        if !found.contains(&mac) {
            found.push(mac);
        }
    }
    ensure!(
        found == [theirs],
        "conflicts(): expected exactly host 1's {theirs}, got {found:?} (ours is {ours})"
    );
    ensure!(
        net0.conflicts()?.is_empty(),
        "conflicts() must drain: a second call right away gave something"
    );

    // Watching another address: announcements of the first one are no longer conflicts.
    let other = vip(Ipv4Addr::new(10, 201, 0, 101));
    net0.watch(&other, ours)?;
    net1.announce(&v4, theirs)?;
    thread::sleep(QUIET);
    let after = net0.conflicts()?;
    ensure!(
        after.is_empty(),
        "watching {other}: announcements for {v4} reported as conflicts: {after:?}"
    );
    Ok(Outcome::Pass)
}

fn ipv6_na_moves_the_neighbour_entry() -> anyhow::Result<Outcome> {
    if let Some(skip) = preconditions().or_else(|| require_command("ping")) {
        return Ok(skip);
    }
    let bridge = Bridge::new(3)?;
    for (i, host) in bridge.hosts().iter().enumerate() {
        let addr = format!("fd00:201::{}/64", 10 + i);
        host.netns()
            .ip(&["addr", "add", &addr, "dev", host.ifname(), "nodad"])?;
    }
    let (old, new, client) = (bridge.host(0), bridge.host(1), bridge.host(2));
    let (mut net_old, mut net_new) = (netlink(old)?, netlink(new)?);
    let v6 = vip(VIP6);
    let old_mac = net_old.mac("eth0")?;

    ensure!(net_old.add(&v6)?, "host 0: adding {v6}");
    net_old.watch(&v6, old_mac)?;
    ensure!(
        ping(client, VIP6.into())?,
        "host 2 got no reply from {VIP6} on host 0"
    );
    let before = neighbour(client, VIP6.into())?;
    ensure!(
        before.as_deref() == Some(&*old.mac().to_string()),
        "host 2's neighbour entry for {VIP6} after the ping: expected host 0's {}, got {before:?}",
        old.mac()
    );
    // The client's solicitation and host 0's own answers are not conflicts.
    let quiet = net_old.conflicts()?;
    ensure!(
        quiet.is_empty(),
        "host 0's watch reported conflicts from ordinary neighbour discovery: {quiet:?}"
    );

    ensure!(net_old.remove(&v6)?, "host 0: removing {v6}");
    ensure!(net_new.add(&v6)?, "host 1: adding {v6}");
    thread::sleep(QUIET);
    let unannounced = neighbour(client, VIP6.into())?;
    ensure!(
        unannounced == before,
        "host 2's entry changed before any announcement: {unannounced:?}"
    );

    let new_mac = net_new.mac("eth0")?;
    net_new.announce(&v6, new_mac)?;
    let want = new.mac().to_string();
    let moved = within(WITHIN, || {
        Ok(neighbour(client, VIP6.into())?.filter(|mac| *mac == want))
    })?;
    let Some((_, took)) = moved else {
        bail!(
            "host 2's neighbour entry for {VIP6} did not move to host 1's {want} within \
             {WITHIN:?} of the neighbour advertisement: {:?}",
            neighbour(client, VIP6.into())?
        );
    };
    eprintln!("    neighbour entry moved {took:?} after the neighbour advertisement");
    // Host 0 still watches the link: host 1's advertisement is a conflict.
    let seen = within(WITHIN, || {
        let found = net_old.conflicts()?;
        Ok((!found.is_empty()).then_some(found))
    })?;
    ensure!(
        seen.as_ref().map(|(found, _)| found.as_slice()) == Some(&[new_mac][..]),
        "host 0's watch: expected exactly host 1's {new_mac} as a conflict, got {seen:?}"
    );
    ensure!(
        ping(client, VIP6.into())?,
        "host 2 got no reply from {VIP6} on host 1"
    );
    Ok(Outcome::Pass)
}
