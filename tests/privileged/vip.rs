//! The floating IP on real parts: five `drop-supervisor`s in network namespaces on a bridge, a
//! sixth namespace as the client, a UDP and a TCP echo on every node that answers from the
//! address it was reached on. Holders are read from the kernel (`ip addr`, netlink), never from
//! the daemons' own reports; the client's neighbour table shows the gratuitous ARP.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use drop_tests::cluster::{ClusterFixture, ClusterSpec, poll, wait_for, wait_until};
use drop_tests::netns::check;
use drop_tests::vip::{EchoServers, Sampler, holds, neigh_mac, tcp_ask, udp_ask};
use drop_tests::{Outcome, Test, paths, require_command, require_root};

pub const TESTS: &[Test] = &[
    Test {
        name: "vip_failover_on_sigkill_link_cut_and_both_with_garp",
        run: failover_kill_link_both,
    },
    Test {
        name: "vip_partition_2_3_holder_in_minority_never_two_holders",
        run: partition_2_3,
    },
    Test {
        name: "vip_health_check_moves_it_and_recovery_does_not_move_it_back",
        run: health_moves,
    },
    Test {
        name: "vip_restart_stop_and_leave_leave_no_address",
        run: no_address_left,
    },
    Test {
        name: "vip_ipv6_address_moves_with_an_unsolicited_neighbour_advertisement",
        run: ipv6_moves,
    },
    Test {
        name: "drain_hands_off_vip_and_leadership_forwards_calls_and_undrains",
        run: drain_hands_off,
    },
];

const NS: &str = "v";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 200);
const NODES: usize = 5;
/// The host without a daemon that asks through the VIP.
const CLIENT: usize = NODES;
/// A holder appears, or moves after a failure.
const MOVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The client's neighbour entry follows a move (GARP) within this, with no traffic of its own.
const GARP_TIMEOUT: Duration = Duration::from_secs(1);
/// How long to keep watching that nothing moves back.
const SETTLE: Duration = Duration::from_secs(2);

fn preconditions() -> Option<Outcome> {
    require_root()
        .or_else(|| require_command("ip"))
        .or_else(|| require_command("nsenter"))
}

fn require_binaries() -> anyhow::Result<()> {
    for bin in ["drop-supervisor", "dropctl"] {
        let path = paths::bin(bin);
        ensure!(
            path.is_file(),
            "{} not found: build it first (cargo build -p drop-supervisor --bins)",
            path.display()
        );
    }
    Ok(())
}

/// Five nodes and a client, all alive, namespace `v` with the VIP over all five, one holder.
/// Returns the fixture and the holder's index.
fn setup(extra_config: &str) -> anyhow::Result<(ClusterFixture, usize)> {
    require_binaries()?;
    let fx = ClusterFixture::start(ClusterSpec {
        spare_hosts: 1,
        extra_config: extra_config.to_string(),
        ..ClusterSpec::new(NODES)
    })?;
    let names: Vec<String> = (0..NODES).map(|i| fx.node(i).name().to_string()).collect();
    fx.wait_all_alive(Duration::from_secs(20))?;
    fx.node(0).dropctl(&[
        "ns",
        "create",
        NS,
        "--vip",
        &VIP.to_string(),
        "--nodes",
        &names.join(","),
    ])?;
    let holder = wait_holder(&fx, &(0..NODES).collect::<Vec<_>>(), None)?;
    Ok((fx, holder))
}

/// Indices of the hosts (of `among`) whose `eth0` has the VIP now.
fn holders(fx: &ClusterFixture, among: &[usize]) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for &i in among {
        if holds(fx.bridge().host(i).netns(), VIP)? {
            out.push(i);
        }
    }
    Ok(out)
}

/// Waits until exactly one of `among` holds the VIP (other than `not`), and every running
/// member's `vip show` names it; returns it.
fn wait_holder(fx: &ClusterFixture, among: &[usize], not: Option<usize>) -> anyhow::Result<usize> {
    let h = poll(
        MOVE_TIMEOUT,
        Duration::from_millis(10),
        "exactly one holder of the VIP",
        || match holders(fx, among)?[..] {
            [h] if Some(h) != not => Ok(h),
            ref other => bail!("holders now: {other:?}"),
        },
    )?
    .value;
    let name = fx.node(h).name().to_string();
    wait_until(
        Duration::from_secs(5),
        "every running member naming the holder",
        || {
            for i in among.iter().copied().filter(|i| fx.node(*i).is_running()) {
                let v = fx.node(i).dropctl(&["vip", "show", NS])?;
                if v["holder"] != name.as_str() {
                    bail!(
                        "{} says holder {}, the kernel says {name}",
                        fx.node(i).name(),
                        v["holder"]
                    );
                }
            }
            Ok(true)
        },
    )?;
    Ok(h)
}

fn mac_of(fx: &ClusterFixture, i: usize) -> String {
    fx.bridge().host(i).mac().to_string()
}

/// The client asks over UDP and TCP; both answers must come from `expect` (and UDP from the VIP).
fn client_reaches(fx: &ClusterFixture, expect: usize) -> anyhow::Result<()> {
    let client = fx.bridge().host(CLIENT).netns();
    let name = fx.node(expect).name();
    let (who, from) = wait_for(
        Duration::from_secs(5),
        "a UDP answer through the VIP",
        || udp_ask(client, VIP, Duration::from_millis(200))?.context("no UDP answer"),
    )?;
    ensure!(who == name, "UDP answered by {who}, expected {name}");
    ensure!(
        from.ip() == IpAddr::V4(VIP),
        "UDP answer came from {from}, not the VIP"
    );
    let who = wait_for(
        Duration::from_secs(5),
        "a TCP answer through the VIP",
        || tcp_ask(client, VIP, Duration::from_millis(300))?.context("no TCP answer"),
    )?;
    ensure!(who == name, "TCP answered by {who}, expected {name}");
    Ok(())
}

/// After a move to `to`, the client's neighbour entry for the VIP shows `to`'s MAC within
/// [`GARP_TIMEOUT`], while the client sends nothing (only the gratuitous ARP can do that).
fn neighbour_follows(fx: &ClusterFixture, to: usize) -> anyhow::Result<Duration> {
    let client = fx.bridge().host(CLIENT).netns();
    let want = mac_of(fx, to);
    let p = poll(
        GARP_TIMEOUT,
        Duration::from_millis(10),
        "the client's neighbour entry to follow",
        || match neigh_mac(client, IpAddr::V4(VIP))? {
            Some(m) if m == want => Ok(()),
            other => bail!("neighbour entry {other:?}, want {want}"),
        },
    )?;
    Ok(p.ok_at.elapsed())
}

/// `drop-supervisor --release-vip` inside host `i`: what the unit's `ExecStopPost=` runs after
/// the daemon died (tested under systemd in systemd.rs).
fn exec_stop_post(fx: &ClusterFixture, i: usize) -> anyhow::Result<String> {
    let out = check(
        fx.bridge()
            .host(i)
            .netns()
            .command(paths::bin("drop-supervisor").to_str().context("path")?)
            .arg("--release-vip"),
    )?;
    Ok(out.trim().to_string())
}

/// `GET /metrics` from node `i`'s gateway (from inside its namespace).
fn metrics_of(fx: &ClusterFixture, i: usize) -> anyhow::Result<String> {
    http_get(fx, i, "/metrics")
}

/// `GET path` from node `i`'s gateway (from inside its namespace): the whole answer.
fn http_get(fx: &ClusterFixture, i: usize, path: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let addr = fx.node(i).gateway();
    fx.bridge()
        .host(i)
        .netns()
        .run(|| -> anyhow::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })?
}

fn link(fx: &ClusterFixture, i: usize, up: bool) -> anyhow::Result<()> {
    fx.bridge()
        .host(i)
        .netns()
        .ip(&["link", "set", "eth0", if up { "up" } else { "down" }])?;
    Ok(())
}

fn run(
    extra_config: &str,
    body: impl FnOnce(&ClusterFixture, usize) -> anyhow::Result<()>,
) -> anyhow::Result<Outcome> {
    if let Some(skip) = preconditions() {
        return Ok(skip);
    }
    let (fx, holder) = setup(extra_config)?;
    let all: Vec<(&drop_tests::netns::Netns, String)> = (0..NODES)
        .map(|i| (fx.bridge().host(i).netns(), fx.node(i).name().to_string()))
        .collect();
    let _echo = EchoServers::start(&all, VIP)?;
    match body(&fx, holder) {
        Ok(()) => Ok(Outcome::Pass),
        Err(e) => {
            println!("  daemon logs (last 30 lines each):\n{}", fx.log_tails(30));
            Err(e)
        }
    }
}

fn failover_kill_link_both() -> anyhow::Result<Outcome> {
    run("", |fx, first| {
        let all: Vec<usize> = (0..NODES).collect();
        client_reaches(fx, first)?;
        let show = fx.node(first).dropctl(&["vip", "show", NS])?;
        ensure!(show["holder_mac"] == mac_of(fx, first), "vip show: {show}");
        ensure!(
            show["this_node"]["garps_sent"].as_u64().unwrap_or(0) >= 5,
            "the holder sent a burst: {show}"
        );
        let ns = fx.node(first).dropctl(&["ns", "show", NS])?;
        ensure!(
            ns["vip_status"]["role"] == "holder" && ns["leader"] == fx.node(first).name(),
            "ns show on the holder: {ns}"
        );
        let metrics = metrics_of(fx, first)?;
        let series = format!("drop_vip_holder{{namespace=\"{NS}\",address=\"{VIP}/32\"}} 1");
        ensure!(
            metrics.contains(&series),
            "no `{series}` in /metrics:\n{metrics}"
        );
        ensure!(
            metrics.contains("drop_vip_garps_sent_total{"),
            "no GARP counter in /metrics"
        );
        // The status page's data: the namespace, its leader and this node holding the VIP.
        let page = http_get(fx, first, "/ui/state")?;
        let state: serde_json::Value =
            serde_json::from_str(page.split_once("\r\n\r\n").map_or("", |(_, b)| b))
                .with_context(|| format!("/ui/state: {page}"))?;
        ensure!(
            state["vip"]["role"] == "holder"
                && state["cluster"]["namespaces"][0]["name"] == NS
                && state["cluster"]["nodes"].as_array().map_or(0, Vec::len) == NODES,
            "/ui/state on the holder: {state}"
        );

        // 1. SIGKILL of the holder's daemon (its address removed as ExecStopPost= would).
        let killed_at = Instant::now();
        fx.node(first).sigkill()?;
        let released = exec_stop_post(fx, first)?;
        ensure!(
            released.contains("removed"),
            "--release-vip printed {released:?}"
        );
        let second = wait_holder(fx, &all, Some(first))?;
        let moved = killed_at.elapsed();
        let garp = neighbour_follows(fx, second)?;
        client_reaches(fx, second)?;
        println!(
            "  sigkill: {} -> {} held after {:.0} ms; client's neighbour entry followed",
            fx.node(first).name(),
            fx.node(second).name(),
            moved.as_secs_f64() * 1e3
        );
        let _ = garp;
        fx.node(first).restart()?;
        std::thread::sleep(SETTLE);
        ensure!(
            holders(fx, &all)? == vec![second],
            "a restarted node takes nothing back"
        );

        // 2. The holder's link cut: it must let go by itself (lease), another takes over.
        let cut_at = Instant::now();
        link(fx, second, false)?;
        let others: Vec<usize> = all.iter().copied().filter(|i| *i != second).collect();
        let third = wait_holder(fx, &others, None)?;
        let moved = cut_at.elapsed();
        wait_until(
            Duration::from_secs(2),
            "the cut-off holder releasing",
            || Ok(!holds(fx.bridge().host(second).netns(), VIP)?),
        )?;
        neighbour_follows(fx, third)?;
        client_reaches(fx, third)?;
        println!(
            "  link cut: {} -> {} held after {:.0} ms",
            fx.node(second).name(),
            fx.node(third).name(),
            moved.as_secs_f64() * 1e3
        );
        link(fx, second, true)?;
        std::thread::sleep(SETTLE);
        ensure!(
            holders(fx, &all)? == vec![third],
            "the link coming back moves nothing"
        );

        // 3. Both: link cut and daemon killed.
        let both_at = Instant::now();
        link(fx, third, false)?;
        fx.node(third).sigkill()?;
        exec_stop_post(fx, third)?;
        let rest: Vec<usize> = all.iter().copied().filter(|i| *i != third).collect();
        let fourth = wait_holder(fx, &rest, None)?;
        let moved = both_at.elapsed();
        neighbour_follows(fx, fourth)?;
        client_reaches(fx, fourth)?;
        println!(
            "  link cut + sigkill: {} -> {} held after {:.0} ms",
            fx.node(third).name(),
            fx.node(fourth).name(),
            moved.as_secs_f64() * 1e3
        );
        link(fx, third, true)?;
        fx.node(third).restart()?;
        std::thread::sleep(SETTLE);
        ensure!(
            holders(fx, &all)? == vec![fourth],
            "exactly one holder at the end"
        );
        Ok(())
    })
}

fn partition_2_3() -> anyhow::Result<Outcome> {
    run("", |fx, holder| {
        let all: Vec<usize> = (0..NODES).collect();
        client_reaches(fx, holder)?;
        let buddy = (holder + 1) % NODES;
        let minority = [holder, buddy];
        let majority: Vec<usize> = all
            .iter()
            .copied()
            .filter(|i| !minority.contains(i))
            .collect();
        let hosts: Vec<&drop_tests::netns::Netns> =
            (0..NODES).map(|i| fx.bridge().host(i).netns()).collect();
        let sampler = Sampler::start(&hosts, VIP, Duration::from_millis(20))?;
        std::thread::sleep(Duration::from_millis(300));
        let cut_at = Instant::now();
        fx.partition(&minority)?;
        let new = wait_holder(fx, &majority, None)?;
        println!(
            "  partition {:?} | {majority:?}: {} holds after {:.0} ms",
            minority,
            fx.node(new).name(),
            cut_at.elapsed().as_secs_f64() * 1e3
        );
        std::thread::sleep(SETTLE);
        ensure!(
            holders(fx, &all)? == vec![new],
            "the minority's holder let go"
        );
        client_reaches(fx, new)?;
        fx.heal()?;
        std::thread::sleep(SETTLE * 2);
        ensure!(
            holders(fx, &all)? == vec![new],
            "after healing exactly one holder, the majority's"
        );
        // The healed side is told again: the client's entry points at the holder.
        neighbour_follows(fx, new)?;
        client_reaches(fx, new)?;
        let (overlap, at) = sampler.largest_overlap();
        let ticks = sampler.holders().len();
        drop(sampler);
        println!(
            "  {ticks} samples every 20 ms on all five nodes: largest overlap of two holders {} ms{}",
            overlap.as_millis(),
            at.map(|k| format!(" (from sample {k})"))
                .unwrap_or_default()
        );
        ensure!(overlap.is_zero(), "two holders at once for {overlap:?}");
        ensure!(ticks > 100, "the sampler took only {ticks} samples");
        Ok(())
    })
}

fn health_moves() -> anyhow::Result<Outcome> {
    run("", |fx, first| {
        let all: Vec<usize> = (0..NODES).collect();
        // The client has a neighbour entry for the VIP (the announcement updates it).
        client_reaches(fx, first)?;
        // Each node is unhealthy while `<dir>/<its name>.down` exists.
        let dir = tempfile::Builder::new().prefix("dvip").tempdir()?;
        // The check runs as the worker user: it must be able to look inside.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let script = format!("test ! -e {}/$DROP_NODE.down", dir.path().display());
        let command = format!("sh -c '{script}'");
        fx.node(0).dropctl(&[
            "vip",
            "check",
            NS,
            "--command",
            &command,
            "--rise",
            "2",
            "--fall",
            "2",
            "--interval-ms",
            "100",
        ])?;
        wait_until(
            Duration::from_secs(5),
            "every member healthy with the check",
            || {
                for i in 0..NODES {
                    let v = fx.node(i).dropctl(&["vip", "show", NS])?;
                    let h = &v["this_node"]["health"];
                    if h["healthy"] != true || h["check"].is_null() {
                        bail!("{}: {h}", fx.node(i).name());
                    }
                }
                Ok(true)
            },
        )?;
        ensure!(
            holders(fx, &all)? == vec![first],
            "setting a passing check moves nothing"
        );
        let down = dir.path().join(format!("{}.down", fx.node(first).name()));
        std::fs::write(&down, "")?;
        let failed_at = Instant::now();
        let second = wait_holder(fx, &all, Some(first))?;
        println!(
            "  check failing on {}: {} holds after {:.0} ms (fall 2 × 100 ms)",
            fx.node(first).name(),
            fx.node(second).name(),
            failed_at.elapsed().as_secs_f64() * 1e3
        );
        neighbour_follows(fx, second)?;
        client_reaches(fx, second)?;
        let v = fx.node(first).dropctl(&["vip", "show", NS])?;
        ensure!(
            v["this_node"]["health"]["healthy"] == false,
            "vip show on the failing node: {v}"
        );
        let ns = fx.node(first).dropctl(&["ns", "show", NS])?;
        ensure!(
            ns["leader"] == fx.node(second).name(),
            "the namespace leader follows the VIP: {}",
            ns["leader"]
        );
        // Recovering: healthy again, and nothing moves back.
        std::fs::remove_file(&down)?;
        wait_until(Duration::from_secs(5), "the node healthy again", || {
            let v = fx.node(first).dropctl(&["vip", "show", NS])?;
            Ok(v["this_node"]["health"]["healthy"] == true)
        })?;
        std::thread::sleep(SETTLE);
        ensure!(
            holders(fx, &all)? == vec![second],
            "recovery does not move the VIP back"
        );
        // No healthy node at all: nobody holds it.
        for i in 0..NODES {
            std::fs::write(dir.path().join(format!("{}.down", fx.node(i).name())), "")?;
        }
        wait_until(
            Duration::from_secs(5),
            "no holder while no node is healthy",
            || Ok(holders(fx, &all)?.is_empty()),
        )?;
        // Checks removed: a holder again.
        fx.node(0).dropctl(&["vip", "check", NS, "--none"])?;
        wait_holder(fx, &all, None)?;
        Ok(())
    })
}

fn no_address_left() -> anyhow::Result<Outcome> {
    run("", |fx, first| {
        let all: Vec<usize> = (0..NODES).collect();
        // SIGKILL without ExecStopPost=: the dead daemon's address stays until it starts again,
        // and the restarted daemon removes it before anything else.
        fx.node(first).sigkill()?;
        ensure!(
            holds(fx.bridge().host(first).netns(), VIP)?,
            "a SIGKILLed holder cannot release"
        );
        let others: Vec<usize> = all.iter().copied().filter(|i| *i != first).collect();
        let second = wait_holder(fx, &others, None)?;
        fx.node(first).restart()?;
        ensure!(
            !holds(fx.bridge().host(first).netns(), VIP)?,
            "the restarted daemon removed the leftover address by the time it is ready"
        );
        std::thread::sleep(SETTLE);
        ensure!(
            holders(fx, &all)? == vec![second],
            "one holder after the restart"
        );

        // SIGTERM of the holder: the address is gone when it has exited; the next takes it
        // without waiting for the holder to be declared dead (it resigned).
        fx.node(second).stop()?;
        let stopped_at = Instant::now();
        ensure!(
            !holds(fx.bridge().host(second).netns(), VIP)?,
            "SIGTERM released the address"
        );
        let rest: Vec<usize> = all.iter().copied().filter(|i| *i != second).collect();
        let third = wait_holder(fx, &rest, None)?;
        println!(
            "  SIGTERM of {}: {} holds {:.0} ms after the exit",
            fx.node(second).name(),
            fx.node(third).name(),
            stopped_at.elapsed().as_secs_f64() * 1e3
        );
        fx.node(second).restart()?;

        // The holder leaves the namespace: it removes the address, another takes it.
        fx.node(third).dropctl(&["ns", "leave"])?;
        let members: Vec<usize> = all.iter().copied().filter(|i| *i != third).collect();
        let fourth = wait_holder(fx, &members, None)?;
        wait_until(
            Duration::from_secs(5),
            "the node that left holding nothing",
            || Ok(!holds(fx.bridge().host(third).netns(), VIP)?),
        )?;
        ensure!(
            holders(fx, &all)? == vec![fourth],
            "one holder after a member left"
        );

        // Every daemon stopped: no address anywhere.
        for i in 0..NODES {
            if fx.node(i).is_running() {
                fx.node(i).stop()?;
            }
        }
        let left = holders(fx, &all)?;
        ensure!(
            left.is_empty(),
            "addresses left after every daemon stopped: {left:?}"
        );
        let marked: BTreeSet<usize> = all
            .iter()
            .copied()
            .filter(|i| {
                Command::new("ip")
                    .args([
                        "-n",
                        fx.bridge().host(*i).netns().name(),
                        "-4",
                        "addr",
                        "show",
                        "dev",
                        "eth0",
                    ])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains(&VIP.to_string()))
                    .unwrap_or(true)
            })
            .collect();
        ensure!(
            marked.is_empty(),
            "`ip addr` still shows the VIP on {marked:?}"
        );
        Ok(())
    })
}

const VIP6: &str = "fd00:201::200";

/// Whether `addr`/128 is on host `i`'s eth0.
fn holds6(fx: &ClusterFixture, i: usize) -> anyhow::Result<bool> {
    let v = fx
        .bridge()
        .host(i)
        .netns()
        .ip_json(&["-6", "addr", "show", "dev", "eth0"])?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|i| {
            i.get("addr_info")
                .and_then(|a| a.as_array())
                .cloned()
                .unwrap_or_default()
        })
        .any(|a| a.get("local").and_then(|l| l.as_str()) == Some(VIP6)))
}

fn holders6(fx: &ClusterFixture) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for i in 0..NODES {
        if holds6(fx, i)? {
            out.push(i);
        }
    }
    Ok(out)
}

/// The same floating IP as an IPv6 address: added with NODAD, announced with an unsolicited
/// neighbour advertisement; the client's neighbour entry follows a move without its own traffic.
fn ipv6_moves() -> anyhow::Result<Outcome> {
    if let Some(skip) = preconditions().or_else(|| require_command("ping")) {
        return Ok(skip);
    }
    require_binaries()?;
    let fx = ClusterFixture::start(ClusterSpec {
        spare_hosts: 1,
        ..ClusterSpec::new(NODES)
    })?;
    let fx = &fx;
    let result = (|| -> anyhow::Result<()> {
        for i in 0..=NODES {
            fx.bridge().host(i).netns().ip(&[
                "-6",
                "addr",
                "add",
                &format!("fd00:201::{}/64", 10 + i),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        let names: Vec<String> = (0..NODES).map(|i| fx.node(i).name().to_string()).collect();
        fx.wait_all_alive(Duration::from_secs(20))?;
        fx.node(0).dropctl(&[
            "ns",
            "create",
            NS,
            "--vip",
            VIP6,
            "--nodes",
            &names.join(","),
        ])?;
        let first = poll(
            MOVE_TIMEOUT,
            Duration::from_millis(10),
            "one IPv6 holder",
            || match holders6(fx)?[..] {
                [h] => Ok(h),
                ref other => bail!("holders {other:?}"),
            },
        )?
        .value;
        let client = fx.bridge().host(CLIENT).netns();
        ensure!(
            client
                .command("ping")
                .args(["-6", "-c", "1", "-W", "2", VIP6])
                .stdout(std::process::Stdio::null())
                .status()?
                .success(),
            "the client cannot reach the IPv6 VIP on {}",
            fx.node(first).name()
        );
        let v6: IpAddr = VIP6.parse()?;
        ensure!(
            neigh_mac(client, v6)?.as_deref() == Some(mac_of(fx, first).as_str()),
            "the client's entry is not the holder's MAC"
        );
        fx.node(first).sigkill()?;
        exec_stop_post(fx, first)?;
        let second = poll(
            MOVE_TIMEOUT,
            Duration::from_millis(10),
            "a new IPv6 holder",
            || match holders6(fx)?[..] {
                [h] if h != first => Ok(h),
                ref other => bail!("holders {other:?}"),
            },
        )?
        .value;
        let want = mac_of(fx, second);
        let check_started = Instant::now();
        let followed = poll(
            GARP_TIMEOUT,
            Duration::from_millis(10),
            "the IPv6 neighbour entry to follow",
            || match neigh_mac(client, v6)? {
                Some(m) if m == want => Ok(()),
                other => bail!("entry {other:?}, want {want}"),
            },
        )?;
        ensure!(
            client
                .command("ping")
                .args(["-6", "-c", "1", "-W", "2", VIP6])
                .stdout(std::process::Stdio::null())
                .status()?
                .success(),
            "the client cannot reach the IPv6 VIP after the move"
        );
        println!(
            "  IPv6 VIP {VIP6}: {} -> {}, the client's neighbour entry followed (NA) {:.0} ms after the check began",
            fx.node(first).name(),
            fx.node(second).name(),
            (followed.ok_at - check_started).as_secs_f64() * 1e3
        );
        Ok(())
    })();
    match result {
        Ok(()) => Ok(Outcome::Pass),
        Err(e) => {
            println!("  daemon logs (last 30 lines each):\n{}", fx.log_tails(30));
            Err(e)
        }
    }
}

/// `dropctl node drain` on the holder: the VIP and the leadership move to another node, the
/// drain reports done, `node ls` shows it, calls to its gateway are answered by the pools of
/// other nodes (its own pool takes none), and after `undrain` it serves its own calls again.
fn drain_hands_off() -> anyhow::Result<Outcome> {
    if let Some(skip) = preconditions() {
        return Ok(skip);
    }
    let (fx, holder) = setup("")?;
    let flow = fx.node(0).dir().join("echo.yaml");
    std::fs::write(
        &flow,
        format!(
            "name: echo\npriority: 0\nfunc:\n  - name: echo\n    cmd: {}\n    num: 1\n",
            paths::bin("drop-echo-worker").display()
        ),
    )?;
    fx.node(0)
        .dropctl(&["flow", "apply", flow.to_str().context("utf-8")?, "--ns", NS])?;
    let h = fx.node(holder);
    wait_for(
        Duration::from_secs(20),
        "echo answering on the holder",
        || Ok(h.post("echo", b"x").ok().filter(|r| r.0 == 200)),
    )?;
    // Every node runs echo and the others know it: calls can be handed over.
    wait_until(
        Duration::from_secs(20),
        "echo on every node in node ls",
        || {
            let nodes = h.dropctl(&["node", "ls"])?;
            Ok(nodes
                .as_array()
                .context("node ls")?
                .iter()
                .filter(|n| {
                    n["pools"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|x| x == "echo"))
                })
                .count()
                == NODES)
        },
    )?;
    // `status` summarises the namespace, every member's pools asked of the member itself.
    let st = h.dropctl(&["status"])?;
    let ns = &st["overview"]["namespace"];
    ensure!(ns["name"] == NS && ns["quorum"] == true, "{st}");
    ensure!(ns["vip_holder"] == h.name(), "{st}");
    let members = ns["members"].as_array().context("members")?;
    ensure!(members.len() == NODES, "{st}");
    for m in members {
        ensure!(
            m["pools"].as_array().is_some_and(|p| p
                .iter()
                .any(|p| p["name"] == "echo" && p["state"] == "running")),
            "member without a running echo in status: {m}"
        );
    }
    let ok_here = |fx: &ClusterFixture| -> anyhow::Result<u64> {
        let pools = fx.node(holder).dropctl(&["pool", "ls"])?;
        Ok(pools[0]["stats"]["ok"].as_u64().unwrap_or(0))
    };

    let started = Instant::now();
    let out = h.dropctl_output(&["node", "drain", "--wait", "20"])?;
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.code() == Some(0),
        "drain: {out:?}\n{}",
        fx.log_tails(20)
    );
    let v: serde_json::Value = serde_json::from_str(&text).context("drain --json")?;
    ensure!(v["drained"] == true, "{v}");
    println!("  drain of the holder (n{holder}) reported done after {took:?}");
    let others: Vec<usize> = (0..NODES).filter(|i| *i != holder).collect();
    let new_holder = wait_holder(&fx, &(0..NODES).collect::<Vec<_>>(), Some(holder))?;
    ensure!(new_holder != holder);
    wait_until(
        Duration::from_secs(5),
        "the leadership following the VIP",
        || {
            let ns = fx.node(new_holder).dropctl(&["ns", "show", NS])?;
            Ok(ns["leader"] == fx.node(new_holder).name())
        },
    )?;
    let nodes = fx.node(others[0]).dropctl(&["node", "ls"])?;
    let me = nodes
        .as_array()
        .context("node ls")?
        .iter()
        .find(|n| n["name"] == h.name())
        .context("drained node in node ls")?;
    ensure!(me["draining"] == true, "{me}");

    // Calls to the drained node's gateway are answered, by the other nodes' pools.
    let before = ok_here(&fx)?;
    for i in 0..20 {
        let (status, body) = h.post("echo", format!("c{i}").as_bytes())?;
        ensure!(
            status == 200 && body == format!("c{i}").as_bytes(),
            "{status} {body:?}"
        );
    }
    let after = ok_here(&fx)?;
    ensure!(
        after == before,
        "the drained node's own pool answered {} of 20 calls",
        after - before
    );
    println!("  20 calls to the drained node's gateway: all answered, 0 by its own pool");

    // Restarted while drained: still drained, and it does not take the VIP back.
    h.stop()?;
    h.restart()?;
    std::thread::sleep(SETTLE);
    ensure!(
        h.dropctl(&["node", "drain-status"])?["draining"] == true,
        "drain kept across a restart"
    );
    ensure!(
        holders(&fx, &[holder])?.is_empty(),
        "a drained node took the VIP"
    );

    let out = h.dropctl_output(&["node", "undrain"])?;
    ensure!(out.status.code() == Some(0), "undrain: {out:?}");
    wait_until(
        Duration::from_secs(10),
        "the undrained node's own pool answering",
        || {
            let before = ok_here(&fx)?;
            let (status, _) = h.post("echo", b"back")?;
            Ok(status == 200 && ok_here(&fx)? > before)
        },
    )?;
    let merged = h.dropctl(&["events", "--cluster", "-n", "500"])?;
    ensure!(
        merged["unreachable"]
            .as_object()
            .is_some_and(|u| u.is_empty()),
        "{}",
        merged["unreachable"]
    );
    let events = merged["events"].as_array().context("events")?;
    let from: BTreeSet<&str> = events.iter().filter_map(|e| e["node"].as_str()).collect();
    ensure!(from.len() == NODES, "events from {from:?} only");
    let texts: Vec<String> = events
        .iter()
        .map(|e| format!("{} {}", e["node"], e["text"]))
        .collect();
    for want in ["draining", "undrained", "floating IP"] {
        ensure!(
            texts.iter().any(|t| t.contains(want)),
            "{want:?} missing from the merged events:\n{}",
            texts.join("\n")
        );
    }
    // The new holder recorded taking the address.
    let new_name = fx.node(new_holder).name().to_string();
    ensure!(
        texts
            .iter()
            .any(|t| t.contains(&new_name) && t.contains(&format!("held by {new_name}"))),
        "no event of {new_name} taking the VIP"
    );
    Ok(Outcome::Pass)
}
