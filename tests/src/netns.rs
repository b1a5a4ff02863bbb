//! Network namespaces as test hosts: a [`Netns`] guard, and a [`Bridge`] of several hosts on one
//! switch.
//!
//! Names are unique per process and call (`drop<pid>x<n>`), because `/run/netns` is shared by
//! everything on the machine. Every guard deletes what it created when dropped, also while a
//! panic unwinds. Every command runs with a time limit. Addresses are private (10.201.0.0/24)
//! and exist only inside namespaces made here; never send traffic anywhere else.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use std::{fmt, thread};

use anyhow::{Context as _, bail, ensure};
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where `ip netns add` puts its namespace files.
pub const NETNS_DIR: &str = "/run/netns";

/// Time limit of a harness command (`ip ...`); a ping sets its own with `-c`/`-W`.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A named network namespace (`ip netns add NAME`) with `lo` up. Dropping it runs
/// `ip netns del NAME`, which also removes the interfaces inside it (and their veth peers).
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates `drop<pid>x<n>` and brings `lo` up.
    pub fn new() -> anyhow::Result<Netns> {
        let name = crate::unique_name("drop");
        check(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on, `Drop` cleans up even if the rest fails.
        let netns = Netns {
            path: Path::new(NETNS_DIR).join(&name),
            name,
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The name given to `ip netns add`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, the bind-mounted namespace file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a new OS thread that has joined this namespace (`setns(CLONE_NEWNET)` only
    /// moves the calling thread), waits for it and returns its result. Sockets opened and
    /// interface names resolved inside `f` belong to this namespace. A panic in `f` is resumed
    /// on the calling thread.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let file =
            File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(scope, move || -> anyhow::Result<T> {
                    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("setns into {}", self.name))?;
                    Ok(f())
                })
                .context("spawning a thread for the namespace")?;
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Like [`Netns::run`], on a thread that outlives the call (servers, sinks): joins this
    /// namespace, runs `f`, and hands its result to whoever joins the handle.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> thread::JoinHandle<anyhow::Result<T>> {
        let (path, name) = (self.path.clone(), self.name.clone());
        thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                let file =
                    File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into {name}"))?;
                f()
            })
            .expect("spawning a thread")
    }

    /// `nsenter --net=/run/netns/NAME -- PROGRAM`: a command that runs inside the namespace.
    /// Unlike `ip netns exec`, `nsenter --net` keeps the host's mounts (`ip netns exec` mounts a
    /// fresh /sys, which hides the bpffs at /sys/fs/bpf).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program args...` inside the namespace (bounded by [`COMMAND_TIMEOUT`]) and returns
    /// its stdout; a non-zero exit is an error carrying stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        check(self.command(program).args(args))
    }

    /// `ip -n NAME ARGS...`, returning stdout.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        check(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `ip -j ARGS...` inside the namespace, parsed.
    pub fn ip_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = check(Command::new("ip").args(["-n", &self.name, "-j"]).args(args))?;
        serde_json::from_str(&out)
            .with_context(|| format!("parsing `ip -j {}`: {out}", args.join(" ")))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = check(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!(
                "warning: could not delete network namespace {}: {err:#}",
                self.name
            );
        }
    }
}

/// Runs `cmd` (stdin closed, output captured) and kills it after `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let shown = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {shown}"))?;
    let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    let (done_tx, done_rx) = mpsc::channel();
    // The waiter reaps the child, so `pid` stays ours until it has exited.
    let waiter = thread::spawn(move || done_tx.send(child.wait_with_output()));
    let result = match done_rx.recv_timeout(timeout) {
        Ok(output) => output.with_context(|| format!("waiting for {shown}")),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = done_rx.recv();
            Err(anyhow::anyhow!(
                "{shown} did not finish within {timeout:?}; killed"
            ))
        }
    };
    let _ = waiter.join();
    result
}

/// Runs `cmd` bounded by [`COMMAND_TIMEOUT`]; its stdout if it exits 0, else an error with its
/// status and stderr.
pub fn check(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = run_bounded(cmd, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{shown} printed non-UTF-8"))
}

/// The network namespace the calling thread is in, as the inode of its namespace file, for
/// comparing with [`Netns::path`] (`stat -L -c %i /proc/thread-self/ns/net`).
pub fn current_netns_inode() -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata("/proc/thread-self/ns/net")
        .context("stat /proc/thread-self/ns/net")?
        .ino())
}

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Hosts on one switch: a hub namespace with bridge `br0`, and `n` host namespaces, each with
/// an `eth0` (a veth whose peer is a port of `br0`), address 10.201.0.(10+i)/24 and MAC
/// 02:00:00:00:00:(i+1). Dropping it deletes the hosts, then the hub.
#[derive(Debug)]
pub struct Bridge {
    // Field order is drop order: the hosts (and with them the veth pairs) go first.
    hosts: Vec<Host>,
    hub: Netns,
}

/// One host of a [`Bridge`].
#[derive(Debug)]
pub struct Host {
    netns: Netns,
    addr: Ipv4Addr,
    mac: Mac,
    hub_port: String,
}

impl Bridge {
    /// Name of the bridge in the hub namespace.
    pub const BRIDGE: &str = "br0";
    /// Name of each host's interface.
    pub const IFNAME: &str = "eth0";
    /// Prefix length of the hosts' addresses.
    pub const PREFIX_LEN: u8 = 24;

    /// Builds the hub and `n` hosts (`n` at most 240). Whatever was built is torn down again if
    /// a step fails.
    pub fn new(n: usize) -> anyhow::Result<Bridge> {
        ensure!(
            n <= 240,
            "at most 240 hosts fit the address and MAC plan, asked for {n}"
        );
        let hub = Netns::new()?;
        // No STP: ports forward as soon as they are up.
        hub.ip(&[
            "link",
            "add",
            Self::BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
        ])?;
        hub.ip(&["link", "set", Self::BRIDGE, "up"])?;
        let mut bridge = Bridge {
            hosts: Vec::with_capacity(n),
            hub,
        };
        for i in 0..n {
            let host = Host::attach(&bridge.hub, i)?;
            bridge.hosts.push(host);
        }
        Ok(bridge)
    }

    /// The namespace holding `br0` and the hosts' peers.
    pub fn hub(&self) -> &Netns {
        &self.hub
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `i` (panics if out of range, like indexing).
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }
}

impl Host {
    fn attach(hub: &Netns, i: usize) -> anyhow::Result<Host> {
        let index = u8::try_from(i).context("host index")?;
        let netns = Netns::new()?;
        let addr = Ipv4Addr::new(10, 201, 0, 10 + index);
        let mac = Mac([0x02, 0, 0, 0, 0, index + 1]);
        let hub_port = crate::unique_name("dp");
        // Both ends are created directly inside their namespaces, so nothing ever appears in the
        // root namespace and nothing clashes with its own eth0.
        check(
            Command::new("ip")
                .args(["link", "add", Bridge::IFNAME, "netns", netns.name()])
                .args([
                    "address",
                    &mac.to_string(),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &hub_port,
                    "netns",
                    hub.name(),
                ]),
        )?;
        hub.ip(&["link", "set", &hub_port, "master", Bridge::BRIDGE, "up"])?;
        let cidr = format!("{addr}/{}", Bridge::PREFIX_LEN);
        netns.ip(&["addr", "add", &cidr, "dev", Bridge::IFNAME])?;
        netns.ip(&["link", "set", Bridge::IFNAME, "up"])?;
        Ok(Host {
            netns,
            addr,
            mac,
            hub_port,
        })
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// 10.201.0.(10+i).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// 02:00:00:00:00:(i+1).
    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// The host's interface, `eth0`.
    pub fn ifname(&self) -> &str {
        Bridge::IFNAME
    }

    /// The veth peer of `eth0` in the hub namespace, a port of `br0`.
    pub fn hub_port(&self) -> &str {
        &self.hub_port
    }

    /// `ping -c count -i 0.2 -W 1 -q addr` from this host: `Ok(true)` if a reply came back.
    pub fn ping(&self, addr: Ipv4Addr, count: u32) -> anyhow::Result<bool> {
        let count = count.max(1).to_string();
        let mut cmd = self.netns.command("ping");
        cmd.args([
            "-c",
            &count,
            "-i",
            "0.2",
            "-W",
            "1",
            "-q",
            &addr.to_string(),
        ]);
        Ok(run_bounded(&mut cmd, COMMAND_TIMEOUT)?.status.success())
    }
}
