//! Floating-IP test pieces: echo servers on every host that answer from the address they were
//! reached on, a client that asks through the VIP, a reader of the client's neighbour table, and
//! a sampler that records which hosts hold the VIP every few milliseconds.
//!
//! Every thread here joins one of the fixture's network namespaces and is stopped and joined
//! when its guard drops (also during a panic). Traffic stays inside those namespaces.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sched::CloneFlags;
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

/// Port of the echo servers, TCP and UDP.
pub const ECHO_PORT: u16 = 7000;

fn enter(netns: &Netns) -> anyhow::Result<()> {
    let file =
        File::open(netns.path()).with_context(|| format!("opening {}", netns.path().display()))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
    Ok(())
}

/// A UDP and a TCP echo server per host; each answers with its host's name. The UDP socket is
/// bound to the VIP itself (`IP_FREEBIND`: before the address exists), so a reply always comes
/// from the VIP; TCP answers from the address the connection was made to by nature.
#[derive(Debug)]
pub struct EchoServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServers {
    /// Starts servers for `hosts` (namespace, name) answering on `vip`:[`ECHO_PORT`].
    pub fn start(hosts: &[(&Netns, String)], vip: Ipv4Addr) -> anyhow::Result<EchoServers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut servers = EchoServers {
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for (netns, name) in hosts {
            // Bind in the namespace, serve on a thread that stays there.
            let (tx, rx) = std::sync::mpsc::channel();
            let path = netns.path().to_path_buf();
            let name = name.clone();
            let stop = stop.clone();
            let ns_name = netns.name().to_string();
            let handle = std::thread::Builder::new()
                .name(format!("echo-{ns_name}"))
                .spawn(move || {
                    let setup = (|| -> anyhow::Result<(UdpSocket, TcpListener)> {
                        let file = File::open(&path)?;
                        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)?;
                        let udp = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                        udp.set_freebind_v4(true)?;
                        udp.bind(&SocketAddr::V4(SocketAddrV4::new(vip, ECHO_PORT)).into())?;
                        let udp: UdpSocket = udp.into();
                        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
                        let tcp = TcpListener::bind(("0.0.0.0", ECHO_PORT))?;
                        tcp.set_nonblocking(true)?;
                        Ok((udp, tcp))
                    })();
                    let (udp, tcp) = match setup {
                        Ok(s) => {
                            let _ = tx.send(Ok(()));
                            s
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let mut buf = [0u8; 512];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = udp.recv_from(&mut buf) {
                            let mut reply = name.as_bytes().to_vec();
                            reply.push(b' ');
                            reply.extend_from_slice(&buf[..n]);
                            let _ = udp.send_to(&reply, from);
                        }
                        while let Ok((mut conn, _)) = tcp.accept() {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.write_all(name.as_bytes());
                        }
                    }
                })
                .context("spawning an echo thread")?;
            servers.threads.push(handle);
            rx.recv()
                .context("echo thread ended during set-up")?
                .with_context(|| format!("echo server in {ns_name}"))?;
        }
        Ok(servers)
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One UDP question to `vip` from inside `client`: the answering host's name and the address
/// the answer came from, or `None` within `timeout`.
pub fn udp_ask(
    client: &Netns,
    vip: Ipv4Addr,
    timeout: Duration,
) -> anyhow::Result<Option<(String, SocketAddr)>> {
    client.run(|| -> anyhow::Result<Option<(String, SocketAddr)>> {
        let sock = UdpSocket::bind(("0.0.0.0", 0))?;
        sock.set_read_timeout(Some(timeout))?;
        let token = format!("{:?}", Instant::now());
        sock.send_to(token.as_bytes(), (vip, ECHO_PORT))?;
        let mut buf = [0u8; 512];
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    if let Some((name, rest)) = text.split_once(' ')
                        && rest == token
                    {
                        return Ok(Some((name.to_string(), from)));
                    }
                }
                Err(_) => return Ok(None),
            }
        }
        Ok(None)
    })?
}

/// One TCP connection to `vip` from inside `client`: the answering host's name, or `None`.
pub fn tcp_ask(client: &Netns, vip: Ipv4Addr, timeout: Duration) -> anyhow::Result<Option<String>> {
    client.run(|| -> anyhow::Result<Option<String>> {
        let Ok(mut conn) = TcpStream::connect_timeout(&SocketAddr::from((vip, ECHO_PORT)), timeout)
        else {
            return Ok(None);
        };
        conn.set_read_timeout(Some(timeout))?;
        let mut name = String::new();
        match conn.read_to_string(&mut name) {
            Ok(_) if !name.is_empty() => Ok(Some(name)),
            _ => Ok(None),
        }
    })?
}

/// The MAC of `ip` in `netns`'s neighbour table (`ip -j neigh show IP`), if it has an entry
/// with one.
pub fn neigh_mac(netns: &Netns, ip: IpAddr) -> anyhow::Result<Option<String>> {
    let v = netns.ip_json(&["neigh", "show", &ip.to_string()])?;
    Ok(v.as_array()
        .and_then(|a| a.first())
        .and_then(|e| e.get("lladdr"))
        .and_then(|m| m.as_str())
        .map(str::to_string))
}

/// Whether `vip`/32 is on `netns`'s `eth0` right now.
pub fn holds(netns: &Netns, vip: Ipv4Addr) -> anyhow::Result<bool> {
    let v = netns.ip_json(&["-4", "addr", "show", "dev", "eth0"])?;
    let found = v
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|i| {
            i.get("addr_info")
                .and_then(|a| a.as_array())
                .cloned()
                .unwrap_or_default()
        })
        .any(|a| a.get("local").and_then(|l| l.as_str()) == Some(vip.to_string().as_str()));
    Ok(found)
}

/// Samples, every `every`, which of `hosts` hold the VIP (through netlink, one thread per
/// host on a common schedule, so tick `k` of every host is the same instant within a
/// millisecond or so).
#[derive(Debug)]
pub struct Sampler {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    ticks: Arc<Mutex<Vec<Vec<bool>>>>,
    every: Duration,
    started: Instant,
}

impl Sampler {
    pub fn start(hosts: &[&Netns], vip: Ipv4Addr, every: Duration) -> anyhow::Result<Sampler> {
        let stop = Arc::new(AtomicBool::new(false));
        let ticks: Arc<Mutex<Vec<Vec<bool>>>> = Arc::new(Mutex::new(vec![Vec::new(); hosts.len()]));
        let started = Instant::now() + Duration::from_millis(100);
        let mut sampler = Sampler {
            stop: stop.clone(),
            threads: Vec::new(),
            ticks: ticks.clone(),
            every,
            started,
        };
        for (i, netns) in hosts.iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            let path = netns.path().to_path_buf();
            let stop = stop.clone();
            let ticks = ticks.clone();
            let handle = std::thread::spawn(move || {
                let setup = (|| -> anyhow::Result<drop_net::Netlink> {
                    let file = File::open(&path)?;
                    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)?;
                    Ok(drop_net::Netlink::new()?)
                })();
                let mut net = match setup {
                    Ok(n) => {
                        let _ = tx.send(Ok(()));
                        n
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let vip = drop_net::Vip {
                    ifname: "eth0".into(),
                    addr: IpAddr::V4(vip),
                    prefix: 32,
                };
                let mut k: u32 = 0;
                while !stop.load(Ordering::Relaxed) {
                    let at = started + every * k;
                    if let Some(wait) = at.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let present = drop_net::VipNet::present(&mut net, &vip).unwrap_or(false);
                    let mut t = ticks.lock().unwrap_or_else(|e| e.into_inner());
                    // A late sample (the thread stalled) still lands on its own tick.
                    let slot = &mut t[i];
                    while slot.len() < k as usize {
                        let last = slot.last().copied().unwrap_or(false);
                        slot.push(last);
                    }
                    slot.push(present);
                    k += 1;
                }
            });
            sampler.threads.push(handle);
            rx.recv().context("sampler thread ended during set-up")??;
        }
        Ok(sampler)
    }

    /// The tick of `at`.
    pub fn tick_of(&self, at: Instant) -> usize {
        (at.saturating_duration_since(self.started).as_nanos() / self.every.as_nanos().max(1))
            as usize
    }

    /// Holders per tick so far: for each tick, the indices of the hosts that held it.
    pub fn holders(&self) -> Vec<Vec<usize>> {
        let t = self.ticks.lock().unwrap_or_else(|e| e.into_inner());
        let n = t.iter().map(Vec::len).min().unwrap_or(0);
        (0..n)
            .map(|k| (0..t.len()).filter(|i| t[*i][k]).collect())
            .collect()
    }

    /// The longest run of ticks with two or more holders, as a duration, and the tick it began.
    pub fn largest_overlap(&self) -> (Duration, Option<usize>) {
        let mut best = (0usize, None);
        let mut run = 0usize;
        for (k, h) in self.holders().iter().enumerate() {
            if h.len() >= 2 {
                run += 1;
                if run > best.0 {
                    best = (run, Some(k + 1 - run));
                }
            } else {
                run = 0;
            }
        }
        (
            self.every * u32::try_from(best.0).unwrap_or(u32::MAX),
            best.1,
        )
    }

    pub fn every(&self) -> Duration {
        self.every
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Joins `netns` for the calling thread (for harness threads that live there).
pub fn join_netns(netns: &Netns) -> anyhow::Result<()> {
    enter(netns)
}
