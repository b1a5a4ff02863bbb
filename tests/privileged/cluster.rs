//! The cluster on real hosts (one daemon per network namespace, [`ClusterFixture`]): joining and
//! agreeing on a namespace leader, placing flows by priority, a leader SIGKILLed, a 2|3
//! partition and its healing, a node with the wrong key kept out, a restart that comes back
//! from persisted state, a node moved between namespaces without restarting what stays,
//! `replicas` and `?every`, `dall`/`done` subscriptions across nodes, and a call to a lost node
//! failing fast with `503 peer_lost`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use drop_tests::cluster::{
    ClusterFixture, ClusterSpec, KeyChoice, POLL_INTERVAL, on_each, poll, wait_for, wait_until,
};
use drop_tests::{Outcome, Test, paths, require_command, require_root};
use serde_json::Value;

pub const TESTS: &[Test] = &[
    Test {
        name: "cluster_fixture_hosts_partition_and_teardown",
        run: fixture_hosts_partition_and_teardown,
    },
    Test {
        name: "cluster_join_and_converge",
        run: join_and_converge,
    },
    Test {
        name: "cluster_multicast_discovery",
        run: multicast_discovery,
    },
    Test {
        name: "cluster_flows_placed",
        run: flows_placed,
    },
    Test {
        name: "cluster_sigkill_leader",
        run: sigkill_leader,
    },
    Test {
        name: "cluster_partition_2_3",
        run: partition_2_3,
    },
    Test {
        name: "cluster_wrong_key_refused",
        run: wrong_key_refused,
    },
    Test {
        name: "cluster_restart_keeps_state",
        run: restart_keeps_state,
    },
    Test {
        name: "cluster_namespace_move_keeps_pools",
        run: namespace_move_keeps_pools,
    },
    Test {
        name: "cluster_replicas_and_every",
        run: replicas_and_every,
    },
    Test {
        name: "cluster_subscriptions_across_nodes",
        run: subscriptions_across_nodes,
    },
    Test {
        name: "cluster_lost_node_fails_calls_fast",
        run: lost_node_fails_calls_fast,
    },
];

/// The namespace every test creates, and its VIP (inside the fixture's subnet).
const NS: &str = "t";
const VIP: &str = "10.201.0.100";
/// Flows (and their one pool each): priority 0 runs on every member, priority 1 on the leader.
const P0_FLOW: &str = "p0flow";
const P0_POOL: &str = "p0echo";
const P1_FLOW: &str = "p1flow";
const P1_POOL: &str = "p1echo";
const LATE_FLOW: &str = "lateflow";
const LATE_POOL: &str = "lateecho";

/// Five nodes seeing each other (seeds, then gossip).
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);
/// A leader elected (or re-elected) once members agree on who is alive.
const ELECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A crashed or cut-off node declared dead with the `fast` profile.
const DETECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A flow's pools started where the placement says.
const PLACE_TIMEOUT: Duration = Duration::from_secs(20);
/// Both halves of a partition merged again after the heal.
const HEAL_TIMEOUT: Duration = Duration::from_secs(30);

fn preconditions() -> Option<Outcome> {
    require_root()
        .or_else(|| require_command("ip"))
        .or_else(|| require_command("nsenter"))
        .or_else(|| require_command("find"))
}

/// The daemon, its client and the echo worker must have been built (`cargo xtask test` builds
/// them); a missing one is a broken build, not an unmet precondition.
fn require_binaries() -> anyhow::Result<()> {
    for bin in ["drop-supervisor", "dropctl", "drop-echo-worker"] {
        let path = paths::bin(bin);
        ensure!(
            path.is_file(),
            "{} not found: build it first (cargo build -p drop-supervisor --bins)",
            path.display()
        );
    }
    Ok(())
}

/// Runs `body` on `fx`; on failure prints the tail of every daemon's log before returning the
/// error (the fixture is torn down by the caller's drop).
fn with_logs(
    fx: &mut ClusterFixture,
    body: impl FnOnce(&mut ClusterFixture) -> anyhow::Result<()>,
) -> anyhow::Result<Outcome> {
    match body(fx) {
        Ok(()) => Ok(Outcome::Pass),
        Err(e) => {
            println!("  daemon logs (last 25 lines each):\n{}", fx.log_tails(25));
            Err(e)
        }
    }
}

/// Runs `body` on five clustered nodes (see [`five_nodes`]), or skips when a precondition is
/// missing; the daemons' logs are printed if it fails.
fn on_five_nodes(
    spare_hosts: usize,
    body: impl FnOnce(&mut ClusterFixture) -> anyhow::Result<()>,
) -> anyhow::Result<Outcome> {
    if let Some(skip) = preconditions() {
        return Ok(skip);
    }
    let mut fx = five_nodes(spare_hosts)?;
    with_logs(&mut fx, body)
}

/// Five clustered nodes; node 4 finds its seeds in `drop-hosts`.
fn five_nodes(spare_hosts: usize) -> anyhow::Result<ClusterFixture> {
    require_binaries()?;
    ClusterFixture::start(ClusterSpec {
        spare_hosts,
        seeds_from_hosts_file: vec![4],
        ..ClusterSpec::new(5)
    })
}

fn all_names(fx: &ClusterFixture, nodes: &[usize]) -> BTreeSet<String> {
    nodes
        .iter()
        .map(|&i| fx.node(i).name().to_string())
        .collect()
}

// ---- reading the control API -------------------------------------------------------------

/// `node ls` as name → state.
fn member_states(fx: &ClusterFixture, i: usize) -> anyhow::Result<BTreeMap<String, String>> {
    let v = fx.node(i).dropctl(&["node", "ls"])?;
    let list = v.as_array().context("`node ls` is not a JSON array")?;
    list.iter()
        .map(|m| {
            Ok((
                str_field(m, "name")?.to_string(),
                str_field(m, "state")?.to_string(),
            ))
        })
        .collect()
}

/// The names `node i` lists as `state`.
fn members_in_state(
    fx: &ClusterFixture,
    i: usize,
    state: &str,
) -> anyhow::Result<BTreeSet<String>> {
    Ok(member_states(fx, i)?
        .into_iter()
        .filter(|(_, s)| s == state)
        .map(|(n, _)| n)
        .collect())
}

/// Node `i`'s `ns ls` entry for `ns`, if listed.
fn ns_entry(fx: &ClusterFixture, i: usize, ns: &str) -> anyhow::Result<Option<Value>> {
    let v = fx.node(i).dropctl(&["ns", "ls"])?;
    let list = v.as_array().context("`ns ls` is not a JSON array")?;
    Ok(list.iter().find(|e| e["name"] == ns).cloned())
}

/// `(leader, quorum)` of `ns` as node `i` sees it; an error if `ns` is not listed.
fn leader_view(fx: &ClusterFixture, i: usize, ns: &str) -> anyhow::Result<(Option<String>, bool)> {
    let entry = ns_entry(fx, i, ns)?
        .with_context(|| format!("{} does not list namespace {ns}", fx.node(i).name()))?;
    let leader = match &entry["leader"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => bail!("`leader` is neither a name nor null: {other}"),
    };
    let quorum = entry["quorum"]
        .as_bool()
        .with_context(|| format!("`quorum` is not a bool in {entry}"))?;
    Ok((leader, quorum))
}

/// Names of the pools node `i` runs.
fn pools(fx: &ClusterFixture, i: usize) -> anyhow::Result<BTreeSet<String>> {
    Ok(pool_list(fx, i)?.into_keys().collect())
}

/// `pool ls` on node `i`: pool name → its entry (state, pids, `stats`, ...).
fn pool_list(fx: &ClusterFixture, i: usize) -> anyhow::Result<BTreeMap<String, Value>> {
    let v = fx.node(i).dropctl(&["pool", "ls"])?;
    let list = v.as_array().context("`pool ls` is not a JSON array")?;
    list.iter()
        .map(|p| Ok((str_field(p, "name")?.to_string(), p.clone())))
        .collect()
}

/// `stats.ok` of a `pool ls` / `pool show` entry: requests and events handled.
fn ok_count(pool: &Value) -> anyhow::Result<u64> {
    pool["stats"]["ok"]
        .as_u64()
        .with_context(|| format!("`stats.ok` is not a number in {pool}"))
}

/// The worker pids of `pool` on node `i`, from `pool show`.
fn pool_pids(fx: &ClusterFixture, i: usize, pool: &str) -> anyhow::Result<BTreeSet<u64>> {
    let v = fx.node(i).dropctl(&["pool", "show", pool])?;
    v["pids"]
        .as_array()
        .with_context(|| format!("`pool show {pool}` has no `pids` array: {v}"))?
        .iter()
        .map(|p| p.as_u64().with_context(|| format!("pid {p} in {v}")))
        .collect()
}

/// A member as `node ls` shows it: its namespace and the pools of its registry entry.
type NodeView = (Option<String>, BTreeSet<String>);

/// `node ls` on node `i` as name → [`NodeView`].
fn node_views(fx: &ClusterFixture, i: usize) -> anyhow::Result<BTreeMap<String, NodeView>> {
    let v = fx.node(i).dropctl(&["node", "ls"])?;
    let list = v.as_array().context("`node ls` is not a JSON array")?;
    list.iter()
        .map(|m| {
            let ns = match &m["namespace"] {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => bail!("`namespace` is neither a name nor null: {other}"),
            };
            let pools = m["pools"]
                .as_array()
                .with_context(|| format!("no `pools` array in {m}"))?
                .iter()
                .map(|p| p.as_str().map(str::to_string).context("pool name"))
                .collect::<anyhow::Result<_>>()?;
            Ok((str_field(m, "name")?.to_string(), (ns, pools)))
        })
        .collect()
}

/// `ns show NS` on node `i`: flow name → the names of the nodes it is placed on.
fn placements(
    fx: &ClusterFixture,
    i: usize,
    ns: &str,
) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let v = fx.node(i).dropctl(&["ns", "show", ns])?;
    let flows = v["flows"]
        .as_array()
        .with_context(|| format!("`ns show {ns}` has no `flows` array: {v}"))?;
    flows
        .iter()
        .map(|f| {
            let nodes = f["nodes"]
                .as_array()
                .with_context(|| format!("flow without a `nodes` array: {f}"))?
                .iter()
                .map(|n| n.as_str().map(str::to_string).context("node name"))
                .collect::<anyhow::Result<BTreeSet<String>>>()?;
            Ok((str_field(f, "name")?.to_string(), nodes))
        })
        .collect()
}

/// A `members` array: names, or objects with a `name` (`ns ls` and `ns show` give either).
fn member_names(v: &Value) -> anyhow::Result<BTreeSet<String>> {
    v.as_array()
        .with_context(|| format!("`members` is not an array: {v}"))?
        .iter()
        .map(|m| match m {
            Value::String(name) => Ok(name.clone()),
            _ => Ok(str_field(m, "name")?.to_string()),
        })
        .collect()
}

fn str_field<'v>(v: &'v Value, key: &str) -> anyhow::Result<&'v str> {
    v[key]
        .as_str()
        .with_context(|| format!("`{key}` is not a string in {v}"))
}

// ---- conditions over several nodes -------------------------------------------------------

/// Every node of `nodes` lists exactly `expected` as alive.
fn all_see_alive(
    fx: &ClusterFixture,
    nodes: &[usize],
    expected: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let views = on_each(nodes, |&i| members_in_state(fx, i, "alive"));
    let mut wrong = Vec::new();
    for (&i, view) in nodes.iter().zip(views) {
        let view = view?;
        if &view != expected {
            wrong.push(format!("{} sees alive {view:?}", fx.node(i).name()));
        }
    }
    ensure!(
        wrong.is_empty(),
        "expected alive {expected:?}; {}",
        wrong.join("; ")
    );
    Ok(())
}

/// The leader every node of `nodes` names for `ns`, with quorum; an error describing each view
/// unless they all agree.
fn agreed_leader(fx: &ClusterFixture, nodes: &[usize], ns: &str) -> anyhow::Result<String> {
    let views: Vec<(String, (Option<String>, bool))> = on_each(nodes, |&i| {
        Ok((fx.node(i).name().to_string(), leader_view(fx, i, ns)?))
    })
    .into_iter()
    .collect::<anyhow::Result<_>>()?;
    let leaders: BTreeSet<Option<&String>> = views.iter().map(|(_, (l, _))| l.as_ref()).collect();
    match (leaders.len(), leaders.first()) {
        (1, Some(Some(leader))) if views.iter().all(|(_, (_, q))| *q) => Ok((*leader).clone()),
        _ => bail!("no agreed leader with quorum: {views:?}"),
    }
}

/// Which of `nodes` run `pool`.
fn running(fx: &ClusterFixture, nodes: &[usize], pool: &str) -> anyhow::Result<BTreeSet<String>> {
    let sets = on_each(nodes, |&i| pools(fx, i));
    let mut out = BTreeSet::new();
    for (&i, set) in nodes.iter().zip(sets) {
        if set?.contains(pool) {
            out.insert(fx.node(i).name().to_string());
        }
    }
    Ok(out)
}

/// POSTs `body` to `pool` through node `via`'s gateway until it answers 200 with `body` back.
fn echoes_via(fx: &ClusterFixture, via: usize, pool: &str, body: &str) -> anyhow::Result<()> {
    let node = fx.node(via);
    wait_for(
        PLACE_TIMEOUT,
        &format!("{pool} answering through {}'s gateway", node.name()),
        || {
            let (status, reply) = node.post(pool, body.as_bytes())?;
            ensure!(
                status == 200 && reply == body.as_bytes(),
                "{status} {:?}",
                String::from_utf8_lossy(&reply)
            );
            Ok(())
        },
    )
}

// ---- shared set-up steps -----------------------------------------------------------------

/// Waits until all `fx.nodes` (the first five) see each other alive.
fn converge(fx: &ClusterFixture) -> anyhow::Result<Duration> {
    let nodes: Vec<usize> = (0..5).collect();
    let expected = all_names(fx, &nodes);
    let started = Instant::now();
    wait_for(JOIN_TIMEOUT, "all 5 nodes alive in every `node ls`", || {
        all_see_alive(fx, &nodes, &expected)
    })?;
    Ok(started.elapsed())
}

/// `ns create` on node 0 naming all five, then waits until every node lists it with one agreed
/// leader; returns the leader's index.
fn create_namespace(fx: &ClusterFixture) -> anyhow::Result<usize> {
    create_ns(fx, NS, VIP, &[0, 1, 2, 3, 4])
}

/// `ns create NS --vip VIP --nodes MEMBERS` on node 0, then waits until all five nodes list it
/// with one agreed leader (with quorum); returns the leader's index.
fn create_ns(fx: &ClusterFixture, ns: &str, vip: &str, members: &[usize]) -> anyhow::Result<usize> {
    let nodes: Vec<usize> = (0..5).collect();
    let names: Vec<String> = all_names(fx, members).into_iter().collect();
    let created = fx.node(0).dropctl(&[
        "ns",
        "create",
        ns,
        "--vip",
        vip,
        "--nodes",
        &names.join(","),
    ])?;
    ensure!(
        created["name"] == ns,
        "`ns create` answered {created}, expected name {ns}"
    );
    let started = Instant::now();
    let leader = wait_for(
        ELECT_TIMEOUT,
        &format!("every node listing {ns} with the same leader"),
        || agreed_leader(fx, &nodes, ns),
    )?;
    println!(
        "  namespace {ns} ({}): leader {leader}, agreed by all 5 after {:.2} s",
        names.join(","),
        started.elapsed().as_secs_f64()
    );
    fx.index_of(&leader)
}

/// A flow of one pool of `drop-echo-worker`.
fn echo_flow(flow: &str, pool: &str, priority: u8) -> String {
    format!(
        "name: {flow}\npriority: {priority}\nfunc:\n  - name: {pool}\n    cmd: {}\n    num: 1\n",
        paths::bin("drop-echo-worker").display()
    )
}

/// Writes a flow file into node `via`'s folder and applies it there with `--ns`.
fn apply_flow(
    fx: &ClusterFixture,
    via: usize,
    flow: &str,
    pool: &str,
    priority: u8,
) -> anyhow::Result<()> {
    apply_yaml(fx, via, flow, &echo_flow(flow, pool, priority), NS)
}

/// Writes `yaml` to `<flow>.yaml` in node `via`'s folder and applies it there to `ns`.
fn apply_yaml(
    fx: &ClusterFixture,
    via: usize,
    flow: &str,
    yaml: &str,
    ns: &str,
) -> anyhow::Result<()> {
    let file = fx.node(via).dir().join(format!("{flow}.yaml"));
    std::fs::write(&file, yaml).with_context(|| format!("writing {}", file.display()))?;
    apply_file(fx, via, &file, ns)
}

/// `flow apply FILE --ns NS` on node `via`.
fn apply_file(fx: &ClusterFixture, via: usize, file: &Path, ns: &str) -> anyhow::Result<()> {
    fx.node(via).dropctl(&[
        "flow",
        "apply",
        file.to_str().context("flow path is not UTF-8")?,
        "--ns",
        ns,
    ])?;
    Ok(())
}

/// Applies the priority-0 and priority-1 flows on node 2 and waits until the p0 pool runs on
/// all five and the p1 pool on the leader alone.
fn place_flows(fx: &ClusterFixture, leader: usize) -> anyhow::Result<()> {
    let nodes: Vec<usize> = (0..5).collect();
    apply_flow(fx, 2, P0_FLOW, P0_POOL, 0)?;
    apply_flow(fx, 2, P1_FLOW, P1_POOL, 1)?;
    let all = all_names(fx, &nodes);
    let started = Instant::now();
    wait_for(PLACE_TIMEOUT, &format!("{P0_POOL} on all 5 nodes"), || {
        let on = running(fx, &nodes, P0_POOL)?;
        ensure!(on == all, "{P0_POOL} runs on {on:?}");
        Ok(())
    })?;
    let leader_name = fx.node(leader).name().to_string();
    wait_for(
        PLACE_TIMEOUT,
        &format!("{P1_POOL} on the leader {leader_name} only"),
        || {
            let on = running(fx, &nodes, P1_POOL)?;
            ensure!(
                on == BTreeSet::from([leader_name.clone()]),
                "{P1_POOL} runs on {on:?}"
            );
            Ok(())
        },
    )?;
    println!(
        "  flows placed after {:.2} s: {P0_POOL} on all 5, {P1_POOL} on {leader_name}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Five nodes converged, namespace created, both flows placed; the leader's index.
fn cluster_with_flows(fx: &ClusterFixture) -> anyhow::Result<usize> {
    converge(fx)?;
    let leader = create_namespace(fx)?;
    place_flows(fx, leader)?;
    Ok(leader)
}

// ---- the tests ---------------------------------------------------------------------------

/// The fixture itself, without `[cluster]`: every daemon starts in its own namespace and
/// answers on its socket, its gateway is reachable from another host, a partition cuts exactly
/// the chosen hosts off and `heal` undoes it, SIGKILL/SIGTERM/restart work, and dropping the
/// fixture leaves no namespace, cgroup, process or folder behind.
fn fixture_hosts_partition_and_teardown() -> anyhow::Result<Outcome> {
    if let Some(skip) = preconditions().or_else(|| require_command("ping")) {
        return Ok(skip);
    }
    require_binaries()?;
    let mut fx = ClusterFixture::start(ClusterSpec {
        cluster: false,
        ..ClusterSpec::new(3)
    })?;
    let mut worker_pids = Vec::new();
    let result = with_logs(&mut fx, |fx| {
        for node in fx.nodes() {
            let status = node.status()?;
            ensure!(
                status["name"] == node.name(),
                "{} answered status {status}",
                node.name()
            );
        }
        // A standalone flow on n1 answers through n1's gateway, posted from n0's namespace.
        let file = fx.node(1).dir().join("solo.yaml");
        std::fs::write(&file, echo_flow("solo", "solo", 0))?;
        fx.node(1)
            .dropctl(&["flow", "apply", file.to_str().context("utf-8")?])?;
        let gw1 = fx.node(1).gateway();
        wait_for(
            PLACE_TIMEOUT,
            "solo answering on n1's gateway from n0",
            || {
                let (status, body) = fx.node(0).post_to(gw1, "solo", b"hi")?;
                ensure!(status == 200 && body == b"hi", "{status} {body:?}");
                Ok(())
            },
        )?;
        worker_pids = worker_pids_of(fx.node(1).pid().context("n1 runs")?);
        ensure!(!worker_pids.is_empty(), "n1 has no worker process");

        let (h0, h1, h2) = (fx.node(0).host(), fx.node(1).host(), fx.node(2).host());
        ensure!(h0.ping(h1.addr(), 1)?, "n0 reaches n1 before the partition");
        fx.partition(&[0])?;
        ensure!(
            !h0.ping(h1.addr(), 1)?,
            "n0 still reaches n1 across the partition"
        );
        ensure!(
            h1.ping(h2.addr(), 1)?,
            "n1 lost n2 although both are on br0"
        );
        ensure!(
            fx.node(0).post_to(gw1, "solo", b"x").is_err(),
            "n0 reached n1's gateway across the partition"
        );
        fx.heal()?;
        ensure!(
            h0.ping(h1.addr(), 3)?,
            "n0 does not reach n1 after the heal"
        );

        fx.node(2).stop()?;
        ensure!(!fx.node(2).is_running(), "n2 stopped");
        fx.node(2).restart()?;
        ensure!(
            fx.node(2).status()?["name"] == "n2",
            "n2 answers after restart"
        );
        // SIGKILL leaves n1's worker orphaned; the teardown must still remove it.
        fx.node(1).sigkill()?;
        ensure!(
            fx.node(1).dropctl(&["status"]).is_err(),
            "n1 answers after SIGKILL"
        );
        Ok(())
    });
    let mut footprint = fx.footprint();
    footprint.pids.extend(worker_pids.iter().copied());
    drop(fx);
    result?;
    let left = footprint.leftovers()?;
    ensure!(left.is_empty(), "left behind by the fixture: {left:?}");
    println!(
        "  3 hosts: daemons, gateway across hosts, partition/heal, stop/restart/SIGKILL; teardown left nothing ({} namespaces, {} cgroup subtrees, {} pids checked)",
        footprint.netns.len(),
        footprint.cgroup_subtrees.len(),
        footprint.pids.len()
    );
    Ok(Outcome::Pass)
}

/// Descendants of `pid` (its workers), from /proc/*/stat's ppid.
fn worker_pids_of(pid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().nth(1))
                    .and_then(|pp| pp.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// Three nodes without any seed find each other through signed multicast announcements on
/// the bridge alone.
fn multicast_discovery() -> anyhow::Result<Outcome> {
    if let Some(skip) = preconditions() {
        return Ok(skip);
    }
    require_binaries()?;
    let mut fx = ClusterFixture::start(ClusterSpec {
        multicast: true,
        ..ClusterSpec::new(3)
    })?;
    with_logs(&mut fx, |fx| {
        for node in fx.nodes() {
            let config = std::fs::read_to_string(node.dir().join("drop.toml"))?;
            ensure!(
                !config.contains("seeds") && config.contains("multicast"),
                "{} is configured with seeds or without multicast:\n{config}",
                node.name()
            );
        }
        let nodes: Vec<usize> = (0..3).collect();
        let expected = all_names(fx, &nodes);
        let started = Instant::now();
        wait_for(JOIN_TIMEOUT, "all 3 nodes alive in every `node ls`", || {
            all_see_alive(fx, &nodes, &expected)
        })?;
        println!(
            "  3 nodes without seeds found each other by multicast in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    })
}

fn join_and_converge() -> anyhow::Result<Outcome> {
    on_five_nodes(0, |fx| {
        let hosts_file = fx.node(4).state_dir().join("drop-hosts");
        ensure!(
            hosts_file.is_file(),
            "n4 is seeded through {}",
            hosts_file.display()
        );
        let took = converge(fx)?;
        println!(
            "  5 nodes alive in every `node ls` after {:.2} s (n4 seeded via drop-hosts)",
            took.as_secs_f64()
        );
        // Distinct identities.
        let ids: BTreeSet<String> = fx
            .nodes()
            .map(|n| Ok(str_field(&n.status()?, "node_id")?.to_string()))
            .collect::<anyhow::Result<_>>()?;
        ensure!(ids.len() == 5, "node ids are not distinct: {ids:?}");
        create_namespace(fx)?;
        // Every node lists the same members.
        let nodes: Vec<usize> = (0..5).collect();
        let all = all_names(fx, &nodes);
        for i in nodes {
            let entry = ns_entry(fx, i, NS)?.context("listed")?;
            let members = member_names(&entry["members"])?;
            ensure!(
                members == all,
                "{} lists members {members:?}",
                fx.node(i).name()
            );
            ensure!(
                entry["vip"] == VIP,
                "{} lists vip {}",
                fx.node(i).name(),
                entry["vip"]
            );
        }
        Ok(())
    })
}

fn flows_placed() -> anyhow::Result<Outcome> {
    on_five_nodes(0, |fx| {
        let leader = cluster_with_flows(fx)?;
        let leader_name = fx.node(leader).name().to_string();
        let nodes: Vec<usize> = (0..5).collect();
        // The replicated placement says the same as the pools.
        wait_for(PLACE_TIMEOUT, "`ns show` placements on n0", || {
            let p = placements(fx, 0, NS)?;
            ensure!(
                p.get(P0_FLOW) == Some(&all_names(fx, &nodes)),
                "{P0_FLOW} placed on {:?}",
                p.get(P0_FLOW)
            );
            ensure!(
                p.get(P1_FLOW) == Some(&BTreeSet::from([leader_name.clone()])),
                "{P1_FLOW} placed on {:?}",
                p.get(P1_FLOW)
            );
            Ok(())
        })?;
        // Any gateway serves the leader-only pool by forwarding.
        let via = (0..5).find(|&i| i != leader).context("a non-leader")?;
        echoes_via(fx, via, P1_POOL, "through a non-leader")?;
        echoes_via(fx, leader, P1_POOL, "on the leader")?;
        echoes_via(fx, via, P0_POOL, "p0 locally")?;
        println!(
            "  {P1_POOL} answered through {}'s gateway (leader {leader_name})",
            fx.node(via).name()
        );
        Ok(())
    })
}

fn sigkill_leader() -> anyhow::Result<Outcome> {
    on_five_nodes(0, |fx| {
        let old = cluster_with_flows(fx)?;
        let old_name = fx.node(old).name().to_string();
        let survivors: Vec<usize> = (0..5).filter(|&i| i != old).collect();

        let killed_at = Instant::now();
        fx.node(old).sigkill()?;
        // A tight interval: this is the measured figure.
        let polled = poll(
            DETECT_TIMEOUT + ELECT_TIMEOUT,
            Duration::from_millis(25),
            "the 4 survivors agreeing on a new leader",
            || {
                let leader = agreed_leader(fx, &survivors, NS)?;
                ensure!(leader != old_name, "all still name the killed {old_name}");
                Ok(leader)
            },
        )?;
        let new_name = polled.value;
        let upper = polled.ok_at.duration_since(killed_at).as_secs_f64();
        let lower = polled
            .last_miss_at
            .map_or(0.0, |t| t.duration_since(killed_at).as_secs_f64());
        println!("  leader failover: {upper:.2} s");
        println!(
            "  ({old_name} SIGKILLed → all 4 survivors name {new_name}; not yet at {lower:.2} s, agreed by {upper:.2} s)"
        );

        wait_for(
            DETECT_TIMEOUT,
            &format!("{old_name} dead on every survivor"),
            || {
                for (&i, states) in survivors
                    .iter()
                    .zip(on_each(&survivors, |&i| member_states(fx, i)))
                {
                    let states = states?;
                    let s = states.get(&old_name).map(String::as_str);
                    ensure!(
                        matches!(s, Some("dead") | None),
                        "{} sees {old_name} as {s:?}",
                        fx.node(i).name()
                    );
                }
                Ok(())
            },
        )?;
        wait_for(
            PLACE_TIMEOUT,
            &format!("{P1_POOL} on the new leader {new_name} only"),
            || {
                let on = running(fx, &survivors, P1_POOL)?;
                ensure!(
                    on == BTreeSet::from([new_name.clone()]),
                    "{P1_POOL} runs on {on:?}"
                );
                Ok(())
            },
        )?;
        let new = fx.index_of(&new_name)?;
        let via = survivors
            .iter()
            .copied()
            .find(|&i| i != new)
            .context("a non-leader")?;
        echoes_via(fx, via, P1_POOL, "after failover")?;
        Ok(())
    })
}

fn partition_2_3() -> anyhow::Result<Outcome> {
    on_five_nodes(0, |fx| {
        let old = cluster_with_flows(fx)?;
        let old_name = fx.node(old).name().to_string();
        let other = (0..5).find(|&i| i != old).context("a second node")?;
        let minority = [old, other];
        let majority: Vec<usize> = (0..5).filter(|i| !minority.contains(i)).collect();
        let majority_names = all_names(fx, &majority);

        let cut_at = Instant::now();
        fx.partition(&minority)?;
        // One loop watches both sides, so that a time when both claim a leader shows too.
        let mut elected: Option<(String, f64)> = None;
        let mut lost: Option<f64> = None;
        let mut old_still_leads: Option<f64> = None;
        let mut old_stepped_down: Option<f64> = None;
        wait_for(
            DETECT_TIMEOUT + ELECT_TIMEOUT,
            "the majority electing a new leader among themselves and the minority reporting no leader and no quorum",
            || {
                let now = cut_at.elapsed().as_secs_f64();
                if elected.is_none()
                    && let Ok(leader) = agreed_leader(fx, &majority, NS)
                    && majority_names.contains(&leader)
                {
                    elected = Some((leader, now));
                }
                let views = on_each(&minority, |&i| leader_view(fx, i, NS));
                if old_stepped_down.is_none()
                    && let Some(Ok((l, _))) = views.first()
                    && l.as_deref() != Some(old_name.as_str())
                {
                    old_stepped_down = Some(now);
                }
                if lost.is_none() && views.iter().all(|v| matches!(v, Ok((None, false)))) {
                    lost = Some(now);
                }
                if elected.is_some()
                    && let Some(Ok((Some(l), true))) = views.first()
                    && *l == old_name
                {
                    old_still_leads = Some(now);
                }
                if elected.is_some() && lost.is_some() {
                    return Ok(());
                }
                let shown: Vec<String> = minority
                    .iter()
                    .zip(&views)
                    .map(|(&i, v)| match v {
                        Ok(v) => format!("{} reports (leader, quorum) = {v:?}", fx.node(i).name()),
                        Err(e) => format!("{}: {e:#}", fx.node(i).name()),
                    })
                    .collect();
                bail!(
                    "majority elected: {elected:?}; minority: {}",
                    shown.join("; ")
                )
            },
        )?;
        let (new_name, elected_s) = elected.context("checked above")?;
        let lost_s = lost.context("checked above")?;
        echoes_via(fx, majority[0], P1_POOL, "majority side")?;
        // Without quorum, the old leader gives up the leader-only pool.
        wait_for(
            PLACE_TIMEOUT,
            &format!("{P1_POOL} stopped on the minority"),
            || {
                let on = running(fx, &minority, P1_POOL)?;
                ensure!(on.is_empty(), "{P1_POOL} runs on {on:?}");
                Ok(())
            },
        )?;
        println!(
            "  partition {{{old_name}, {}}} | {majority_names:?}: majority elected {new_name} after {elected_s:.2} s, minority without leader and quorum after {lost_s:.2} s",
            fx.node(other).name()
        );
        let stepped = old_stepped_down.context("checked above")?;
        println!(
            "  the old leader {old_name} stopped acting as leader (lease) after {stepped:.2} s"
        );
        ensure!(
            stepped <= elected_s,
            "the old leader {old_name} still acted as leader at {stepped:.2} s, after the majority elected {new_name} at {elected_s:.2} s"
        );
        if let Some(t) = old_still_leads {
            println!(
                "  two leaders: {old_name} still claimed leadership with quorum at {t:.2} s, {:.2} s after the majority elected {new_name}",
                t - elected_s
            );
        }

        let healed_at = Instant::now();
        fx.heal()?;
        let nodes: Vec<usize> = (0..5).collect();
        let all = all_names(fx, &nodes);
        wait_for(HEAL_TIMEOUT, "all 5 alive again in every `node ls`", || {
            all_see_alive(fx, &nodes, &all)
        })?;
        let leader = wait_for(HEAL_TIMEOUT, "all 5 agreeing on one leader", || {
            agreed_leader(fx, &nodes, NS)
        })?;
        wait_for(
            PLACE_TIMEOUT,
            &format!("{P1_POOL} on exactly one node, the leader {leader}"),
            || {
                let on = running(fx, &nodes, P1_POOL)?;
                ensure!(
                    on == BTreeSet::from([leader.clone()]),
                    "{P1_POOL} runs on {on:?}"
                );
                // The leader must not have moved meanwhile.
                let now = agreed_leader(fx, &nodes, NS)?;
                ensure!(now == leader, "leader moved from {leader} to {now}");
                Ok(())
            },
        )?;
        println!(
            "  healed: converged on leader {leader} with {P1_POOL} on it alone after {:.2} s",
            healed_at.elapsed().as_secs_f64()
        );
        Ok(())
    })
}

fn wrong_key_refused() -> anyhow::Result<Outcome> {
    on_five_nodes(1, |fx| {
        converge(fx)?;
        let intruder = fx.start_extra(5, KeyChoice::Own, &[0])?;
        let name = fx.node(intruder).name().to_string();
        ensure!(
            fx.node(intruder).status()?["name"] == name.as_str(),
            "{name} answers status"
        );
        let nodes: Vec<usize> = (0..5).collect();
        let watch = Duration::from_secs(5);
        let until = Instant::now() + watch;
        while Instant::now() < until {
            let seen = member_states(fx, 0)?;
            ensure!(
                !seen.contains_key(&name),
                "n0 lists {name}, which has another key: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for (&i, states) in nodes.iter().zip(on_each(&nodes, |&i| member_states(fx, i))) {
            let states = states?;
            ensure!(
                !states.contains_key(&name),
                "{} lists {name}: {states:?}",
                fx.node(i).name()
            );
        }
        all_see_alive(fx, &nodes, &all_names(fx, &nodes))?;
        let own_view = member_states(fx, intruder)?;
        ensure!(
            own_view.keys().eq([&name]),
            "{name} should see only itself, sees {own_view:?}"
        );
        ensure!(fx.node(intruder).is_running(), "{name} is still running");
        println!(
            "  {name} (own key, seeded with n0) stayed out for {watch:?} and sees only itself"
        );
        Ok(())
    })
}

fn restart_keeps_state() -> anyhow::Result<Outcome> {
    on_five_nodes(0, |fx| {
        let leader = cluster_with_flows(fx)?;
        // A non-leader other than n0 (where the late flow is applied).
        let down = (1..5).find(|&i| i != leader).context("a non-leader")?;
        let down_name = fx.node(down).name().to_string();
        let up: Vec<usize> = (0..5).filter(|&i| i != down).collect();

        fx.node(down).sigkill()?;
        apply_flow(fx, 0, LATE_FLOW, LATE_POOL, 0)?;
        wait_for(
            PLACE_TIMEOUT,
            &format!("{LATE_POOL} on the 4 running nodes"),
            || {
                let on = running(fx, &up, LATE_POOL)?;
                ensure!(on == all_names(fx, &up), "{LATE_POOL} runs on {on:?}");
                Ok(())
            },
        )?;

        let restarted_at = Instant::now();
        fx.node(down).restart()?;
        // Straight from the persisted state, before any convergence is waited for.
        fx.node(down).status()?;
        let listed = ns_entry(fx, down, NS)?;
        ensure!(
            listed.is_some(),
            "{down_name} does not list {NS} right after its restart"
        );
        let flows = placements(fx, down, NS)?;
        ensure!(
            flows.contains_key(P0_FLOW) && flows.contains_key(P1_FLOW),
            "{down_name} lacks the flows it had before the crash right after its restart: {:?}",
            flows.keys().collect::<Vec<_>>()
        );
        let had_late = flows.contains_key(LATE_FLOW);
        let first_look = restarted_at.elapsed().as_secs_f64();

        wait_for(
            JOIN_TIMEOUT,
            &format!("{down_name} catching up with {LATE_FLOW} and running its share"),
            || {
                let flows = placements(fx, down, NS)?;
                ensure!(
                    flows.contains_key(LATE_FLOW),
                    "{down_name} knows flows {:?}",
                    flows.keys().collect::<Vec<_>>()
                );
                let mine = pools(fx, down)?;
                ensure!(
                    mine.contains(P0_POOL) && mine.contains(LATE_POOL) && !mine.contains(P1_POOL),
                    "{down_name} runs {mine:?}"
                );
                Ok(())
            },
        )?;
        let nodes: Vec<usize> = (0..5).collect();
        wait_for(
            JOIN_TIMEOUT,
            &format!("{down_name} alive again everywhere"),
            || all_see_alive(fx, &nodes, &all_names(fx, &nodes)),
        )?;
        let leader_now = agreed_leader(fx, &nodes, NS)?;
        println!(
            "  {down_name} restarted: {NS} and its flows listed {first_look:.2} s after the restart ({LATE_FLOW} {}), caught up after {:.2} s; leader {leader_now}",
            if had_late { "already there" } else { "not yet" },
            restarted_at.elapsed().as_secs_f64()
        );
        Ok(())
    })
}

// ---- namespaces, replicas, `?every`, subscriptions, a lost node ----------------------------

/// Namespaces of [`namespace_move_keeps_pools`] and their VIPs.
const NS_A: &str = "a";
const VIP_A: &str = "10.201.0.101";
const NS_B: &str = "b";
const VIP_B: &str = "10.201.0.102";
/// The flow applied, with the same text, to both namespaces, and the flow only `a` has.
const SHARED_FLOW: &str = "sharedflow";
const SHARED_POOL: &str = "sharedecho";
const A_FLOW: &str = "aflow";
const A_POOL: &str = "aecho";
/// A `replicas: 2` flow.
const REP_FLOW: &str = "repflow";
const REP_POOL: &str = "repecho";
/// A leader-only source and the async pools subscribed to it on every node.
const SRC_FLOW: &str = "srcflow";
const SRC_POOL: &str = "src";
const SUB_FLOW: &str = "subflow";
const DALL_POOL: &str = "evall_async";
const DONE_POOL: &str = "evone_async";
/// Events posted to the source.
const EVENTS: u64 = 4;
/// Subscription events delivered (over the peer transport where the subscriber is elsewhere).
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// A leader-only pool whose worker answers after 30 s, and a fast leader-only one.
const SLOW_FLOW: &str = "slowflow";
const SLOW_POOL: &str = "slow";
const SLOW_SECS: u64 = 30;
const FAST_FLOW: &str = "fastflow";
const FAST_POOL: &str = "fastecho";
/// How long after the partition the call to the lost leader may take to fail.
const LOST_CALL_LIMIT: Duration = Duration::from_secs(10);

/// Members of `ns` as node `i` sees them; `None` if it does not list `ns`.
fn ns_members(fx: &ClusterFixture, i: usize, ns: &str) -> anyhow::Result<Option<BTreeSet<String>>> {
    ns_entry(fx, i, ns)?
        .map(|e| member_names(&e["members"]))
        .transpose()
}

/// Waits until exactly `on` (of the five) run `pool`.
fn wait_running(fx: &ClusterFixture, pool: &str, on: &BTreeSet<String>) -> anyhow::Result<()> {
    let nodes: Vec<usize> = (0..5).collect();
    wait_for(PLACE_TIMEOUT, &format!("{pool} running on {on:?}"), || {
        let now = running(fx, &nodes, pool)?;
        ensure!(&now == on, "{pool} runs on {now:?}");
        Ok(())
    })
}

/// `POST /api/v1/<pool>?every` through node `via`'s gateway: the `replies` of a 200 answer.
fn call_every(
    fx: &ClusterFixture,
    via: usize,
    pool: &str,
    body: &str,
) -> anyhow::Result<Vec<Value>> {
    let (status, reply) = fx
        .node(via)
        .post(&format!("{pool}?every"), body.as_bytes())?;
    let text = String::from_utf8_lossy(&reply);
    ensure!(status == 200, "{pool}?every answered {status}: {text}");
    let v: Value = serde_json::from_slice(&reply)
        .with_context(|| format!("{pool}?every answered no JSON: {text}"))?;
    v["replies"]
        .as_array()
        .cloned()
        .with_context(|| format!("{pool}?every: no `replies` array in {v}"))
}

/// Checks that `replies` holds one `200` echo of `body` from each of `from` (node names; the
/// instance of the node asked may be labelled `local`, standing for `via`).
fn check_every(
    replies: &[Value],
    body: &str,
    via: &str,
    from: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let mut labels = BTreeSet::new();
    for r in replies {
        ensure!(
            r["status"] == 200 && r["reply"] == body,
            "an instance did not echo {body:?} with 200: {r}"
        );
        let node = str_field(r, "node")?;
        let node = if node == "local" { via } else { node };
        ensure!(
            labels.insert(node.to_string()),
            "{node} answered twice: {replies:?}"
        );
    }
    ensure!(
        &labels == from && replies.len() == from.len(),
        "expected one reply from each of {from:?}, got {} from {labels:?}: {replies:?}",
        replies.len()
    );
    Ok(())
}

/// Two namespaces: `a` = n0,n1,n2 and `b` = n3,n4, one flow text applied to both and one only to
/// `a`. `ns join b` on n2 moves it (in every node's view) without restarting what both have:
/// the shared pool keeps its workers, the a-only pool stops, the daemon keeps its pid. `ns
/// leave` stops all of n2's flows; `ns rm b` removes `b` everywhere and stops n3's and n4's.
fn namespace_move_keeps_pools() -> anyhow::Result<Outcome> {
    on_five_nodes(0, |fx| {
        converge(fx)?;
        let nodes: Vec<usize> = (0..5).collect();
        create_ns(fx, NS_A, VIP_A, &[0, 1, 2])?;
        create_ns(fx, NS_B, VIP_B, &[3, 4])?;
        let shared = fx.node(0).dir().join(format!("{SHARED_FLOW}.yaml"));
        std::fs::write(&shared, echo_flow(SHARED_FLOW, SHARED_POOL, 0))?;
        apply_file(fx, 0, &shared, NS_A)?;
        apply_file(fx, 0, &shared, NS_B)?;
        apply_yaml(fx, 0, A_FLOW, &echo_flow(A_FLOW, A_POOL, 0), NS_A)?;
        wait_running(fx, SHARED_POOL, &all_names(fx, &nodes))?;
        wait_running(fx, A_POOL, &all_names(fx, &[0, 1, 2]))?;

        let mover = 2;
        let name = fx.node(mover).name().to_string();
        let pids = pool_pids(fx, mover, SHARED_POOL)?;
        ensure!(!pids.is_empty(), "{SHARED_POOL} on {name} has no worker");
        let daemon_pid = fx.node(mover).pid().context("the daemon runs")?;
        ensure!(
            fx.node(mover).status()?["pid"] == daemon_pid,
            "{name}'s status names another pid than {daemon_pid}"
        );

        let joined_at = Instant::now();
        let answer = fx.node(mover).dropctl(&["ns", "join", NS_B])?;
        ensure!(answer["name"] == NS_B, "`ns join {NS_B}` answered {answer}");
        wait_for(
            PLACE_TIMEOUT,
            &format!("{name} in {NS_B} in every node's view, {A_POOL} stopped on it"),
            || {
                for (&i, seen) in nodes.iter().zip(on_each(&nodes, |&i| {
                    Ok((
                        node_views(fx, i)?,
                        ns_members(fx, i, NS_A)?,
                        ns_members(fx, i, NS_B)?,
                    ))
                })) {
                    let (views, a, b) = seen?;
                    let who = fx.node(i).name();
                    let ns = views.get(&name).and_then(|(ns, _)| ns.as_deref());
                    ensure!(ns == Some(NS_B), "{who}: `node ls` puts {name} in {ns:?}");
                    ensure!(
                        a.is_some_and(|a| !a.contains(&name)),
                        "{who}: members of {NS_A} still include {name}"
                    );
                    ensure!(
                        b.is_some_and(|b| b.contains(&name)),
                        "{who}: members of {NS_B} lack {name}"
                    );
                }
                let mine = pools(fx, mover)?;
                ensure!(
                    !mine.contains(A_POOL) && mine.contains(SHARED_POOL),
                    "{name} runs {mine:?}"
                );
                Ok(())
            },
        )?;
        let moved_s = joined_at.elapsed().as_secs_f64();
        // Over more than one reconcile tick: still the same workers, never restarted.
        let watch_until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < watch_until {
            let now = pool_pids(fx, mover, SHARED_POOL)?;
            ensure!(
                now == pids,
                "{SHARED_POOL} on {name}: workers {pids:?} before `ns join {NS_B}`, {now:?} after"
            );
            std::thread::sleep(POLL_INTERVAL);
        }
        ensure!(
            fx.node(mover).pid() == Some(daemon_pid)
                && fx.node(mover).status()?["pid"] == daemon_pid,
            "{name}'s daemon is no longer pid {daemon_pid}"
        );
        // The placements agree: `b` places the shared flow on n2, `a` no longer does.
        let p_b = placements(fx, 0, NS_B)?;
        ensure!(
            p_b.get(SHARED_FLOW) == Some(&all_names(fx, &[2, 3, 4])),
            "{NS_B}: {SHARED_FLOW} placed on {:?}",
            p_b.get(SHARED_FLOW)
        );
        let p_a = placements(fx, 0, NS_A)?;
        for flow in [SHARED_FLOW, A_FLOW] {
            ensure!(
                p_a.get(flow) == Some(&all_names(fx, &[0, 1])),
                "{NS_A}: {flow} placed on {:?}",
                p_a.get(flow)
            );
        }
        echoes_via(fx, mover, SHARED_POOL, "after the move")?;
        println!(
            "  {name} joined {NS_B} after {moved_s:.2} s: {A_POOL} stopped, {SHARED_POOL} kept workers {pids:?}, daemon pid {daemon_pid}"
        );

        fx.node(mover).dropctl(&["ns", "leave"])?;
        wait_for(
            PLACE_TIMEOUT,
            &format!("{name} in no namespace and running no pool"),
            || {
                let mine = pools(fx, mover)?;
                ensure!(mine.is_empty(), "{name} runs {mine:?}");
                for (&i, views) in nodes.iter().zip(on_each(&nodes, |&i| node_views(fx, i))) {
                    let ns = views?.get(&name).and_then(|(ns, _)| ns.clone());
                    ensure!(
                        ns.is_none(),
                        "{}: `node ls` puts {name} in {ns:?}",
                        fx.node(i).name()
                    );
                }
                Ok(())
            },
        )?;

        fx.node(0).dropctl(&["ns", "rm", NS_B])?;
        wait_for(
            PLACE_TIMEOUT,
            &format!("{NS_B} gone everywhere, n3 and n4 running no pool"),
            || {
                for (&i, entry) in nodes
                    .iter()
                    .zip(on_each(&nodes, |&i| ns_entry(fx, i, NS_B)))
                {
                    ensure!(entry?.is_none(), "{} still lists {NS_B}", fx.node(i).name());
                }
                for i in [3, 4] {
                    let left = pools(fx, i)?;
                    ensure!(left.is_empty(), "{} runs {left:?}", fx.node(i).name());
                }
                Ok(())
            },
        )?;
        // `a` is untouched.
        wait_running(fx, SHARED_POOL, &all_names(fx, &[0, 1]))?;
        wait_running(fx, A_POOL, &all_names(fx, &[0, 1]))?;
        println!("  {name} left: no pools; {NS_B} removed: gone on all 5, n3 and n4 idle");
        Ok(())
    })
}

/// A `replicas: 2` flow on exactly two nodes, where `ns show` says; `?every` on a priority-0
/// pool answers once per node, and on the replicated pool once per replica.
fn replicas_and_every() -> anyhow::Result<Outcome> {
    on_five_nodes(0, |fx| {
        converge(fx)?;
        create_namespace(fx)?;
        let nodes: Vec<usize> = (0..5).collect();
        let all = all_names(fx, &nodes);
        apply_flow(fx, 2, P0_FLOW, P0_POOL, 0)?;
        let rep = echo_flow(REP_FLOW, REP_POOL, 0).replace("func:", "replicas: 2\nfunc:");
        apply_yaml(fx, 0, REP_FLOW, &rep, NS)?;
        wait_running(fx, P0_POOL, &all)?;
        let placed = wait_for(
            PLACE_TIMEOUT,
            &format!("{REP_POOL} on 2 nodes, as every `ns show` places it"),
            || {
                let on = running(fx, &nodes, REP_POOL)?;
                ensure!(on.len() == 2, "{REP_POOL} runs on {on:?}");
                for (&i, p) in nodes
                    .iter()
                    .zip(on_each(&nodes, |&i| placements(fx, i, NS)))
                {
                    let p = p?;
                    ensure!(
                        p.get(REP_FLOW) == Some(&on),
                        "{} places {REP_FLOW} on {:?}, it runs on {on:?}",
                        fx.node(i).name(),
                        p.get(REP_FLOW)
                    );
                }
                Ok(on)
            },
        )?;
        // Still there a reconcile tick later.
        std::thread::sleep(Duration::from_millis(1200));
        let on = running(fx, &nodes, REP_POOL)?;
        ensure!(on == placed, "{REP_POOL} moved from {placed:?} to {on:?}");

        let via = 1;
        let via_name = fx.node(via).name().to_string();
        let took = wait_until(PLACE_TIMEOUT, "5 instances answering ?every", || {
            Ok(call_every(fx, via, P0_POOL, "warm-up")?.len() == 5)
        })?;
        let replies = call_every(fx, via, P0_POOL, "to every one")?;
        check_every(&replies, "to every one", &via_name, &all)?;
        // Through a node without a replica: only the two.
        let outside = (0..5)
            .find(|&i| !placed.contains(fx.node(i).name()))
            .context("a node without a replica")?;
        let outside_name = fx.node(outside).name().to_string();
        let replies = call_every(fx, outside, REP_POOL, "replicas")?;
        check_every(&replies, "replicas", &outside_name, &placed)?;
        println!(
            "  {REP_POOL} on {placed:?}; {P0_POOL}?every through {via_name}: 5 echoes (all 5 known after {:.2} s); {REP_POOL}?every through {outside_name}: 2 echoes",
            took.as_secs_f64()
        );
        Ok(())
    })
}

/// A flow of two async echo pools subscribed to [`SRC_POOL`]: one `dall`, one `done`.
fn subscriber_flow() -> String {
    let echo = paths::bin("drop-echo-worker");
    let echo = echo.display();
    format!(
        "name: {SUB_FLOW}\npriority: 0\nfunc:\n  - name: {DALL_POOL}\n    cmd: {echo}\n    num: 1\n    sub:\n      - name: {SRC_POOL}\n        type: dall\n  - name: {DONE_POOL}\n    cmd: {echo}\n    num: 1\n    sub:\n      - name: {SRC_POOL}\n        type: done\n"
    )
}

/// Events of a leader-only source posted through a non-leader's gateway reach every node's
/// `dall` subscriber once each, and the `done` subscribers exactly once in all.
fn subscriptions_across_nodes() -> anyhow::Result<Outcome> {
    on_five_nodes(0, |fx| {
        converge(fx)?;
        let leader = create_namespace(fx)?;
        let leader_name = fx.node(leader).name().to_string();
        let nodes: Vec<usize> = (0..5).collect();
        let all = all_names(fx, &nodes);
        apply_yaml(fx, 0, SUB_FLOW, &subscriber_flow(), NS)?;
        apply_yaml(fx, 0, SRC_FLOW, &echo_flow(SRC_FLOW, SRC_POOL, 1), NS)?;
        wait_running(fx, DALL_POOL, &all)?;
        wait_running(fx, DONE_POOL, &all)?;
        wait_running(fx, SRC_POOL, &BTreeSet::from([leader_name.clone()]))?;
        // The leader's forwarding table knows every subscriber before the first event.
        wait_for(
            PLACE_TIMEOUT,
            &format!("{leader_name}'s `node ls` listing both subscribers on all 5"),
            || {
                let views = node_views(fx, leader)?;
                for n in &all {
                    let pools = views.get(n).map(|(_, p)| p.clone()).unwrap_or_default();
                    ensure!(
                        pools.contains(DALL_POOL) && pools.contains(DONE_POOL),
                        "{n} registered {pools:?}"
                    );
                }
                Ok(())
            },
        )?;
        let via = (0..5).find(|&i| i != leader).context("a non-leader")?;
        wait_until(
            PLACE_TIMEOUT,
            &format!(
                "{}'s `node ls` listing {SRC_POOL} on {leader_name}",
                fx.node(via).name()
            ),
            || {
                let views = node_views(fx, via)?;
                Ok(views
                    .get(&leader_name)
                    .is_some_and(|(_, p)| p.contains(SRC_POOL)))
            },
        )?;
        // Each event posted exactly once (no retry that could send one twice).
        for k in 0..EVENTS {
            let body = format!("event-{k}");
            let (status, reply) = fx.node(via).post(SRC_POOL, body.as_bytes())?;
            ensure!(
                status == 200 && reply == body.as_bytes(),
                "{SRC_POOL} answered {status} {:?} to {body}",
                String::from_utf8_lossy(&reply)
            );
        }
        let posted_at = Instant::now();
        let counts = |fx: &ClusterFixture| -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
            let mut dall = Vec::new();
            let mut done = Vec::new();
            for list in on_each(&nodes, |&i| pool_list(fx, i)) {
                let list = list?;
                let get = |pool: &str| {
                    list.get(pool)
                        .with_context(|| format!("{pool} not running"))
                        .and_then(ok_count)
                };
                dall.push(get(DALL_POOL)?);
                done.push(get(DONE_POOL)?);
            }
            Ok((dall, done))
        };
        let exact = |dall: &[u64], done: &[u64]| -> anyhow::Result<()> {
            ensure!(
                dall.iter().all(|&n| n == EVENTS) && done.iter().sum::<u64>() == EVENTS,
                "ok counts per node n0..n4: {DALL_POOL} {dall:?} (want {EVENTS} each), {DONE_POOL} {done:?} (want {EVENTS} in all)"
            );
            Ok(())
        };
        let (_, done) = wait_for(
            EVENT_TIMEOUT,
            &format!("{EVENTS} events in every {DALL_POOL} and in the {DONE_POOL}s together"),
            || {
                let (dall, done) = counts(fx)?;
                exact(&dall, &done)?;
                Ok((dall, done))
            },
        )?;
        let delivered_s = posted_at.elapsed().as_secs_f64();
        // Nothing more arrives late (no duplicates).
        std::thread::sleep(Duration::from_millis(1000));
        let (dall, done_later) = counts(fx)?;
        exact(&dall, &done_later)?;
        println!(
            "  {EVENTS} events to {SRC_POOL} (on {leader_name}) through {}: every {DALL_POOL} handled {EVENTS}, {DONE_POOL} per node {done:?}, all delivered {delivered_s:.2} s after the last post",
            fx.node(via).name()
        );
        Ok(())
    })
}

/// A leader-only flow whose worker answers after [`SLOW_SECS`] (timeout 60 s).
fn slow_flow() -> String {
    format!(
        "name: {SLOW_FLOW}\npriority: 1\nfunc:\n  - name: {SLOW_POOL}\n    cmd: 'while read -r l; do sleep {SLOW_SECS}; echo \"$l\"; done'\n    shell: true\n    num: 1\n    timeout: 60000\n"
    )
}

/// A call forwarded to the leader fails with `503 peer_lost` soon after the leader is cut off,
/// not when its worker would have answered; once a new leader runs the leader-only pools, a new
/// call through the same gateway is answered.
fn lost_node_fails_calls_fast() -> anyhow::Result<Outcome> {
    on_five_nodes(0, |fx| {
        converge(fx)?;
        let leader = create_namespace(fx)?;
        let leader_name = fx.node(leader).name().to_string();
        apply_yaml(fx, 0, SLOW_FLOW, &slow_flow(), NS)?;
        apply_flow(fx, 0, FAST_FLOW, FAST_POOL, 1)?;
        let only_leader = BTreeSet::from([leader_name.clone()]);
        wait_running(fx, SLOW_POOL, &only_leader)?;
        wait_running(fx, FAST_POOL, &only_leader)?;
        let via = (0..5).find(|&i| i != leader).context("a non-leader")?;
        let via_name = fx.node(via).name().to_string();
        echoes_via(fx, via, FAST_POOL, "before")?;
        wait_until(
            PLACE_TIMEOUT,
            &format!("{via_name} knowing {SLOW_POOL} on {leader_name}"),
            || {
                let views = node_views(fx, via)?;
                Ok(views
                    .get(&leader_name)
                    .is_some_and(|(_, p)| p.contains(SLOW_POOL)))
            },
        )?;

        let node = fx.node(via);
        let gateway = node.gateway();
        let (cut_at, result, returned_at) = std::thread::scope(|scope| {
            let call = scope.spawn(move || {
                let r = node.post_within(
                    gateway,
                    SLOW_POOL,
                    b"slow",
                    Duration::from_secs(SLOW_SECS) - LOST_CALL_LIMIT,
                );
                (r, Instant::now())
            });
            let busy = wait_until(
                PLACE_TIMEOUT,
                &format!("{SLOW_POOL} on {leader_name} busy with the call"),
                || {
                    let list = pool_list(fx, leader)?;
                    Ok(list.get(SLOW_POOL).is_some_and(|p| p["busy"] == 1))
                },
            );
            let cut = busy.and_then(|_| {
                fx.partition(&[leader])?;
                Ok(Instant::now())
            });
            let (r, at) = call
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            anyhow::Ok((cut?, r, at))
        })?;
        let failed_after = returned_at.saturating_duration_since(cut_at);
        let (status, body) = result.with_context(|| {
            format!(
                "the call through {via_name} got no answer {:.2} s after {leader_name} was cut off",
                failed_after.as_secs_f64()
            )
        })?;
        let text = String::from_utf8_lossy(&body);
        println!(
            "  call of {SLOW_POOL} through {via_name}: {status} {:.2} s after {leader_name} was cut off: {text}",
            failed_after.as_secs_f64()
        );
        ensure!(
            status == 503,
            "the call to the lost {leader_name} answered {status}: {text}"
        );
        let code: Value = serde_json::from_slice(&body)
            .with_context(|| format!("a 503 without a JSON error: {text}"))?;
        ensure!(
            code["error"]["code"] == "peer_lost",
            "expected code peer_lost, got {text}"
        );
        ensure!(
            failed_after < LOST_CALL_LIMIT,
            "the call failed only {:.2} s after the partition (limit {LOST_CALL_LIMIT:?})",
            failed_after.as_secs_f64()
        );

        let majority: Vec<usize> = (0..5).filter(|&i| i != leader).collect();
        let new_name = wait_for(
            DETECT_TIMEOUT + ELECT_TIMEOUT,
            "the 4 others agreeing on a new leader",
            || {
                let l = agreed_leader(fx, &majority, NS)?;
                ensure!(l != leader_name, "all still name {leader_name}");
                Ok(l)
            },
        )?;
        wait_for(
            PLACE_TIMEOUT,
            &format!("{FAST_POOL} and {SLOW_POOL} on {new_name} alone among the 4"),
            || {
                for pool in [FAST_POOL, SLOW_POOL] {
                    let on = running(fx, &majority, pool)?;
                    ensure!(
                        on == BTreeSet::from([new_name.clone()]),
                        "{pool} runs on {on:?}"
                    );
                }
                Ok(())
            },
        )?;
        echoes_via(fx, via, FAST_POOL, "after the move")?;
        println!(
            "  new leader {new_name}; {FAST_POOL} answered through {via_name} {:.2} s after the partition",
            cut_at.elapsed().as_secs_f64()
        );
        Ok(())
    })
}
