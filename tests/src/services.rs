//! Services on real parts: a [`ClusterFixture`] whose every node has its own throw-away systemd
//! ([`SystemdSandbox`]), reached by its supervisor over that systemd's bus, and a way to read
//! (and sample over time) which service instances are active in each of them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use drop_supervisor::host::systemd::{Systemd, SystemdBus};

use crate::cluster::{ClusterFixture, ClusterSpec};
use crate::systemd::SystemdSandbox;

/// What a node's systemd runs of DROP's services: service name → active instance indexes.
pub type Active = BTreeMap<String, BTreeSet<u32>>;

/// Five (or `n`) nodes, each with its systemd. Dropping it stops the daemons first, then the
/// systemds (with whatever units are left in them), then removes everything.
pub struct ServiceCluster {
    // Field order is drop order: daemons before their systemds.
    pub fx: ClusterFixture,
    pub sds: Vec<SystemdSandbox>,
    rt: tokio::runtime::Runtime,
    buses: Vec<SystemdBus>,
}

impl std::fmt::Debug for ServiceCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceCluster")
            .field("nodes", &self.sds.len())
            .finish()
    }
}

impl ServiceCluster {
    /// Starts `n` systemds (in parallel), then the cluster with `[services]` pointing each
    /// node at its own one.
    pub fn start(n: usize, profile: &str, extra_config: &str) -> anyhow::Result<ServiceCluster> {
        let started = Instant::now();
        let handles: Vec<JoinHandle<anyhow::Result<SystemdSandbox>>> = (0..n)
            .map(|_| std::thread::spawn(SystemdSandbox::start))
            .collect();
        let mut sds = Vec::with_capacity(n);
        let mut first_err = None;
        for h in handles {
            match h.join() {
                Ok(Ok(sd)) => sds.push(sd),
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(_) => {
                    first_err = first_err.or(Some(anyhow::anyhow!("sandbox thread panicked")))
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e.context("starting the systemds"));
        }
        eprintln!(
            "  {n} systemds running after {:.2} s",
            started.elapsed().as_secs_f64()
        );
        let node_config = sds
            .iter()
            .map(|sd| {
                format!(
                    "[services]\nbus = {:?}\nunit_dir = {:?}\njournal_dir = {:?}\n",
                    sd.bus_address(),
                    sd.unit_dir().display().to_string(),
                    sd.host_path("/run/log/journal").display().to_string(),
                )
            })
            .collect();
        let fx = ClusterFixture::start(ClusterSpec {
            profile: profile.to_string(),
            extra_config: extra_config.to_string(),
            node_config,
            ..ClusterSpec::new(n)
        })?;
        ServiceCluster::assemble(fx, sds)
    }

    /// Like [`ServiceCluster::start`], but every node's systemd runs inside that node's network
    /// namespace (so do its units, as on a real machine), `node_extra[i]` is appended to node
    /// `i`'s config, `spare` hosts without a daemon join the bridge (clients), and gateways
    /// listen on all addresses. The daemons start first and reach their systemd once it is up;
    /// this returns once every node reports its systemd reachable.
    pub fn start_in_netns(
        n: usize,
        spare: usize,
        profile: &str,
        extra_config: &str,
        node_extra: &[String],
    ) -> anyhow::Result<ServiceCluster> {
        let states: Vec<std::path::PathBuf> =
            (0..n).map(|_| crate::systemd::new_state_dir()).collect();
        let node_config = states
            .iter()
            .enumerate()
            .map(|(i, st)| {
                format!(
                    "[services]\nbus = {:?}\nunit_dir = {:?}\njournal_dir = {:?}\n{}",
                    crate::systemd::bus_address_of(st),
                    st.join("run/systemd/system").display().to_string(),
                    st.join("run/log/journal").display().to_string(),
                    node_extra.get(i).map_or("", String::as_str)
                )
            })
            .collect();
        let fx = ClusterFixture::start(ClusterSpec {
            profile: profile.to_string(),
            extra_config: extra_config.to_string(),
            node_config,
            spare_hosts: spare,
            gateway_any: true,
            ..ClusterSpec::new(n)
        })?;
        let started = Instant::now();
        let handles: Vec<JoinHandle<anyhow::Result<SystemdSandbox>>> = states
            .into_iter()
            .enumerate()
            .map(|(i, st)| {
                let netns = fx.node(i).host().netns().path().to_path_buf();
                std::thread::spawn(move || {
                    SystemdSandbox::start_with(crate::systemd::SandboxOptions {
                        state_dir: Some(st),
                        netns: Some(netns),
                        ..Default::default()
                    })
                })
            })
            .collect();
        let mut sds = Vec::with_capacity(n);
        for h in handles {
            sds.push(
                h.join()
                    .map_err(|_| anyhow::anyhow!("sandbox thread panicked"))?
                    .context("starting a systemd in a node's namespace")?,
            );
        }
        eprintln!(
            "  {n} systemds running in their nodes' namespaces after {:.2} s",
            started.elapsed().as_secs_f64()
        );
        let sc = ServiceCluster::assemble(fx, sds)?;
        crate::cluster::wait_for(
            Duration::from_secs(30),
            "every node's systemd reachable in `node ls`",
            || {
                for i in 0..n {
                    let v = sc.dropctl(i, &["node", "ls"])?;
                    let ok = v
                        .as_array()
                        .context("node ls")?
                        .iter()
                        .filter(|m| m["systemd"] == true)
                        .count();
                    ensure!(
                        ok == n,
                        "{} sees {ok} of {n} systemds reachable",
                        sc.fx.node(i).name()
                    );
                }
                Ok(())
            },
        )?;
        Ok(sc)
    }

    /// The cluster with a bus connection of the harness to every systemd.
    fn assemble(fx: ClusterFixture, sds: Vec<SystemdSandbox>) -> anyhow::Result<ServiceCluster> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let buses = rt.block_on(async {
            let mut v = Vec::new();
            for sd in &sds {
                v.push(SystemdBus::with_connection(sd.connect().await?));
            }
            anyhow::Ok(v)
        })?;
        Ok(ServiceCluster { fx, sds, rt, buses })
    }

    /// What node `i`'s systemd runs now.
    pub fn active(&self, i: usize) -> anyhow::Result<Active> {
        self.rt.block_on(active_on(&self.buses[i]))
    }

    /// Every unit of ours node `i`'s systemd has loaded, whatever its state.
    pub fn loaded(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let list = self
            .rt
            .block_on(self.buses[i].list(drop_supervisor::services::spec::UNIT_PREFIX))?;
        Ok(list.into_iter().map(|u| u.state.unit).collect())
    }

    /// `MainPID` of an active unit on node `i`.
    pub fn main_pid(&self, i: usize, unit: &str) -> anyhow::Result<u32> {
        self.rt.block_on(async {
            let conn = self.sds[i].connect().await?;
            let m = crate::systemd::manager(&conn).await?;
            let h = crate::systemd::UnitHandle::new(&conn, m.get_unit(unit).await?).await?;
            Ok(h.service.main_pid().await?)
        })
    }

    /// Active instances of `service` per node, over `nodes`.
    pub fn spread(&self, nodes: &[usize], service: &str) -> anyhow::Result<Vec<usize>> {
        nodes
            .iter()
            .map(|&i| Ok(self.active(i)?.get(service).map_or(0, BTreeSet::len)))
            .collect()
    }

    /// A thread that reads every node's systemd every `every` and keeps the totals.
    pub fn sampler(&self, every: Duration) -> Sampler {
        Sampler::start(
            self.sds.iter().map(SystemdSandbox::bus_address).collect(),
            every,
        )
    }

    /// Waits until every node sees all alive, then creates namespace `ns` of all of them
    /// (through node 0) and waits until every node sees its leader with quorum.
    pub fn create_namespace(&self, ns: &str, timeout: Duration) -> anyhow::Result<()> {
        self.create_namespace_with(ns, None, timeout)
    }

    /// [`Self::create_namespace`] with a floating IP.
    pub fn create_namespace_with(
        &self,
        ns: &str,
        vip: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let n = self.sds.len();
        self.wait_all_alive(timeout)?;
        let names: Vec<String> = (0..n).map(|i| self.fx.node(i).name().to_string()).collect();
        let nodes = names.join(",");
        let mut args = vec!["ns", "create", ns, "--nodes", &nodes];
        if let Some(v) = vip {
            args.extend(["--vip", v]);
        }
        self.dropctl(0, &args)?;
        self.wait_quorum(ns, timeout)
    }

    /// Every node lists all nodes alive.
    pub fn wait_all_alive(&self, timeout: Duration) -> anyhow::Result<()> {
        let n = self.sds.len();
        crate::cluster::wait_for(timeout, "every node alive everywhere", || {
            for i in 0..n {
                let v = self.dropctl(i, &["node", "ls"])?;
                let alive = v
                    .as_array()
                    .context("node ls")?
                    .iter()
                    .filter(|m| m["state"] == "alive")
                    .count();
                ensure!(
                    alive == n,
                    "{} sees {alive} of {n} alive",
                    self.fx.node(i).name()
                );
            }
            Ok(())
        })
    }

    /// Every node sees a leader of `ns` with quorum.
    pub fn wait_quorum(&self, ns: &str, timeout: Duration) -> anyhow::Result<()> {
        crate::cluster::wait_for(timeout, "a leader with quorum on every node", || {
            for i in 0..self.sds.len() {
                let v = self.dropctl(i, &["ns", "show", ns])?;
                ensure!(v["leader"].is_string() && v["quorum"] == true, "{v}");
            }
            Ok(())
        })
    }

    /// Active instances of `service` over `nodes`, read as fast as the buses answer.
    pub fn total(&self, nodes: &[usize], service: &str) -> anyhow::Result<usize> {
        Ok(self.spread(nodes, service)?.iter().sum())
    }

    /// `dropctl service …` on node `i`.
    pub fn dropctl(&self, i: usize, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        self.fx.node(i).dropctl(args)
    }
}

async fn active_on(bus: &SystemdBus) -> anyhow::Result<Active> {
    let mut out = Active::new();
    for u in bus
        .list(drop_supervisor::services::spec::UNIT_PREFIX)
        .await?
    {
        if u.state.active != "active" {
            continue;
        }
        if let Some((_, name, index)) = drop_supervisor::services::spec::parse_unit(&u.state.unit) {
            out.entry(name).or_default().insert(index);
        }
    }
    Ok(out)
}

/// One reading of every node: when, and per node what is active.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Duration,
    pub nodes: Vec<Active>,
}

impl Sample {
    /// Active instances of `service` over all nodes (surplus copies included).
    pub fn total(&self, service: &str) -> usize {
        self.nodes
            .iter()
            .map(|a| a.get(service).map_or(0, BTreeSet::len))
            .sum()
    }
}

/// See [`ServiceCluster::sampler`].
#[derive(Debug)]
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<Vec<Sample>>>>,
    started: Instant,
}

impl Sampler {
    fn start(addresses: Vec<String>, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut buses = Vec::new();
                for a in &addresses {
                    let conn = zbus::connection::Builder::address(a.as_str())
                        .build()
                        .await
                        .with_context(|| format!("connecting to {a}"))?;
                    buses.push(SystemdBus::with_connection(conn));
                }
                let mut samples = Vec::new();
                while !flag.load(Ordering::Relaxed) {
                    let at = started.elapsed();
                    let mut nodes = Vec::with_capacity(buses.len());
                    for b in &buses {
                        nodes.push(active_on(b).await?);
                    }
                    samples.push(Sample { at, nodes });
                    tokio::time::sleep(every).await;
                }
                anyhow::Ok(samples)
            })
        });
        Sampler {
            stop,
            thread: Some(thread),
            started,
        }
    }

    /// Time since the sampler started (the samples' clock).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops and returns every sample.
    pub fn finish(mut self) -> anyhow::Result<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self
            .thread
            .take()
            .context("finished twice")?
            .join()
            .map_err(|_| anyhow::anyhow!("the sampler panicked"))??;
        ensure!(!samples.is_empty(), "no sample taken");
        Ok(samples)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
