//! The network-namespace harness itself: guards clean up (also on panic), bridged hosts reach
//! each other with the planned addresses and MACs, and nothing is left behind.

use std::os::unix::fs::MetadataExt as _;
use std::panic::{self, AssertUnwindSafe, catch_unwind};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context as _, ensure};
use drop_tests::netns::{Bridge, Netns, check, current_netns_inode};
use drop_tests::{Outcome, Test, require_command, require_root};

pub const TESTS: &[Test] = &[
    Test {
        name: "netns_guard_removes_namespace_also_on_panic",
        run: guard_removes_namespace,
    },
    Test {
        name: "netns_bridge_hosts_reach_each_other",
        run: bridge_hosts_reach_each_other,
    },
];

fn preconditions() -> Option<Outcome> {
    require_root()
        .or_else(|| require_command("ip"))
        .or_else(|| require_command("nsenter"))
}

/// Names `ip netns list` shows (first word of each line).
fn netns_names() -> anyhow::Result<Vec<String>> {
    let out = check(Command::new("ip").args(["netns", "list"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn ensure_gone(name: &str) -> anyhow::Result<()> {
    let path = std::path::Path::new(drop_tests::netns::NETNS_DIR).join(name);
    ensure!(
        !path.exists(),
        "expected {} to be gone after drop, it still exists",
        path.display()
    );
    let names = netns_names()?;
    ensure!(
        !names.iter().any(|n| n == name),
        "expected {name} absent from `ip netns list`, got {names:?}"
    );
    Ok(())
}

const DELIBERATE: &str = "deliberate panic (netns cleanup test)";

/// Runs `f` with a panic hook that prints one line instead of a backtrace for [`DELIBERATE`];
/// other panics reach the previous hook. The tests run one at a time, so swapping the global hook
/// affects no one else.
fn quiet_panics<T>(f: impl FnOnce() -> T) -> T {
    let previous = Arc::new(panic::take_hook());
    let inner = Arc::clone(&previous);
    panic::set_hook(Box::new(move |info| {
        if info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|m| m == DELIBERATE)
        {
            eprintln!("(expected) {DELIBERATE}");
        } else {
            inner(info);
        }
    }));
    let result = f();
    drop(panic::take_hook());
    panic::set_hook(Box::new(move |info| previous(info)));
    result
}

fn guard_removes_namespace() -> anyhow::Result<Outcome> {
    if let Some(skip) = preconditions() {
        return Ok(skip);
    }

    // Normal life: exists, the closure really runs inside, deleted on drop.
    let netns = Netns::new()?;
    let name = netns.name().to_owned();
    ensure!(
        name.starts_with("drop"),
        "expected a name starting with `drop`, got {name}"
    );
    ensure!(
        netns.path().exists(),
        "expected {} to exist",
        netns.path().display()
    );
    let ns_inode = std::fs::metadata(netns.path())?.ino();
    let outside = current_netns_inode()?;
    let (inside, answer) = netns.run(|| current_netns_inode().map(|ino| (ino, 42)))??;
    ensure!(
        inside == ns_inode,
        "closure ran in netns inode {inside}, expected {ns_inode} ({name})"
    );
    ensure!(
        outside != ns_inode,
        "the calling thread must stay outside, but is in {name}"
    );
    ensure!(
        current_netns_inode()? == outside,
        "the calling thread changed namespace"
    );
    ensure!(answer == 42, "closure result: expected 42, got {answer}");
    let lo = netns.ip_json(&["link", "show", "lo"])?;
    let flags = &lo[0]["flags"];
    ensure!(
        flags
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "UP")),
        "expected lo UP, flags: {flags}"
    );
    drop(netns);
    ensure_gone(&name)?;

    // A panic inside the closure reaches the caller, and the guard still deletes the namespace.
    let netns = Netns::new()?;
    let name = netns.name().to_owned();
    let caught = quiet_panics(|| {
        catch_unwind(AssertUnwindSafe(move || {
            let netns = netns;
            netns.run(|| panic!("{DELIBERATE}"))
        }))
    });
    let panic = caught
        .err()
        .context("expected the closure's panic to reach the caller")?;
    let msg = panic
        .downcast_ref::<String>()
        .map_or("(not a String payload)", String::as_str);
    ensure!(msg == DELIBERATE, "expected our panic message, got {msg:?}");
    ensure_gone(&name)?;
    Ok(Outcome::Pass)
}

fn bridge_hosts_reach_each_other() -> anyhow::Result<Outcome> {
    if let Some(skip) = preconditions().or_else(|| require_command("ping")) {
        return Ok(skip);
    }
    let bridge = Bridge::new(3)?;
    let mut names: Vec<String> = vec![bridge.hub().name().to_owned()];
    let mut ports = Vec::new();

    for (i, host) in bridge.hosts().iter().enumerate() {
        names.push(host.netns().name().to_owned());
        ports.push(host.hub_port().to_owned());
        let want_addr = format!("10.201.0.{}", 10 + i);
        let want_mac = format!("02:00:00:00:00:{:02x}", i + 1);
        ensure!(
            host.addr().to_string() == want_addr,
            "host {i}: addr {} != {want_addr}",
            host.addr()
        );
        ensure!(
            host.mac().to_string() == want_mac,
            "host {i}: mac {} != {want_mac}",
            host.mac()
        );

        let link = host
            .netns()
            .ip_json(&["addr", "show", "dev", host.ifname()])?;
        let link = &link[0];
        let mac = link["address"].as_str().unwrap_or_default();
        ensure!(
            mac == want_mac,
            "host {i}: kernel MAC of {}: expected {want_mac}, got {mac}",
            host.ifname()
        );
        let addrs: Vec<String> = link["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["family"] == "inet")
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]))
            .collect();
        ensure!(
            addrs == [format!("{want_addr}/24")],
            "host {i}: IPv4 addresses: expected [{want_addr}/24], got {addrs:?}"
        );
        let master = bridge
            .hub()
            .ip_json(&["link", "show", "dev", host.hub_port()])?;
        ensure!(
            master[0]["master"] == "br0",
            "port {}: expected master br0, got {}",
            host.hub_port(),
            master[0]["master"]
        );
    }

    for (i, from) in bridge.hosts().iter().enumerate() {
        for (j, to) in bridge.hosts().iter().enumerate() {
            if i == j {
                continue;
            }
            ensure!(
                from.ping(to.addr(), 2)?,
                "host {i} ({}) got no ping reply from host {j} ({})",
                from.addr(),
                to.addr()
            );
            // The reply came from the right MAC: the neighbour entry says so.
            let neigh = from.netns().ip_json(&[
                "neigh",
                "show",
                "dev",
                from.ifname(),
                "to",
                &to.addr().to_string(),
            ])?;
            let lladdr = neigh[0]["lladdr"].as_str().unwrap_or("none");
            ensure!(
                lladdr == to.mac().to_string(),
                "host {i}: neighbour {} has lladdr {lladdr}, expected {}",
                to.addr(),
                to.mac()
            );
        }
    }

    drop(bridge);
    for name in &names {
        ensure_gone(name)?;
    }
    let root_links = check(Command::new("ip").args(["-j", "link", "show"]))?;
    let root_links: serde_json::Value = serde_json::from_str(&root_links)?;
    let leftovers: Vec<&str> = root_links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| ports.iter().any(|p| p == n))
        .collect();
    ensure!(
        leftovers.is_empty(),
        "expected no hub ports {ports:?} in the root namespace, found {leftovers:?}"
    );
    Ok(Outcome::Pass)
}
