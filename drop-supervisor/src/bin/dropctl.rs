//! `dropctl`: the operator's client of the DROP control API (HTTP/JSON on a Unix socket).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use drop_supervisor::config::DEFAULT_SOCKET;
use drop_supervisor::control::api::StatusInfo;
use drop_supervisor::control::client::{Client, ClientError};
use drop_supervisor::host::tune::{ApplyOutcome, ApplyReport, CheckReport, KeyState, Policy};
use drop_supervisor::runtime::worker::pool::{Phase, PoolStatus};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the daemon answered with an error, or an operation failed (e.g. a key could not be applied,
     a plugin was not applied by `plugin reload`)
  2  usage error
  3  the daemon is not reachable on the socket
  4  `tune check`: at least one key drifts from the profile
  5  `node drain`: not drained within --wait (the node still drains)";

/// Control a DROP node (drop-supervisor) over its Unix socket.
#[derive(Debug, Parser)]
#[command(name = "dropctl", version = drop_supervisor::VERSION, after_help = EXIT_CODES)]
struct Cli {
    /// Control socket. Default: $DROP_SOCKET, else /run/drop/drop.sock.
    #[arg(long, global = true, env = "DROP_SOCKET", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the daemon's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Node identity, version, uptime and pid of the daemon; in cluster mode also its namespace:
    /// leader, floating IP, every member with its pools, services with their health.
    Status,
    /// Host tuning (sysctl profile).
    #[command(subcommand)]
    Tune(TuneCommand),
    /// Flows: YAML declarations of pools (applied, persisted, reconciled).
    #[command(subcommand)]
    Flow(FlowCommand),
    /// Pools of workers on this node.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Function bundles (`image:` in flows).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Plugins: flows that packages install as folders under `[plugins] dir`
    /// (/usr/lib/drop/plugins/NAME/ with a flow.yaml and its executables).
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Send PAYLOAD to one worker of POOL and print its reply (`-` reads stdin).
    Call { pool: String, payload: String },
    /// Queue PAYLOAD for one worker of POOL (`--all`: every worker) without waiting for replies.
    Cast {
        pool: String,
        payload: String,
        #[arg(long)]
        all: bool,
    },
    /// Cluster members as this node sees them.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Namespaces: named groups of nodes with a leader, a VIP and their flows.
    #[command(subcommand)]
    Ns(NsCommand),
    /// Floating IPs: who holds each namespace's address, and its health check.
    #[command(subcommand)]
    Vip(VipCommand),
    /// systemd services kept at their count across the namespace.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// The XDP L4 balancer on this node: VIP:ports, backends, counters.
    #[command(subcommand)]
    Lb(LbCommand),
    /// Cluster set-up helpers that need no daemon.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Print the dropctl(1) man page (roff) to stdout.
    Man,
    /// A pool's worker log (stderr); `-f` follows it.
    Logs {
        pool: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// The node's event log: leader changes, VIP moves, restarts, failures, placements,
    /// membership and drains; `-f` keeps printing them as they happen.
    Events {
        #[arg(short, long)]
        follow: bool,
        /// Every reachable member's newest events, merged by time (not with -f).
        #[arg(long, conflicts_with = "follow")]
        cluster: bool,
        /// How many of the newest events to print first.
        #[arg(short = 'n', long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=2000))]
        lines: u64,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Every member: state (alive / suspect / dead / left), namespace, leader, version.
    Ls,
    /// Drain this node: no new gateway calls (they go to other nodes), no leadership, floating
    /// IP or service instances; waits until calls in flight finished and all of that moved.
    /// Kept across restarts until `undrain`.
    Drain {
        /// Give up waiting after this many seconds (0: do not wait); the node keeps draining.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// End the drain: the node takes work again.
    Undrain,
    /// Whether this node drains, and what it still holds.
    DrainStatus,
}

#[derive(Debug, Subcommand)]
enum NsCommand {
    /// Create a namespace of the named nodes (names or ids, comma-separated).
    Create {
        name: String,
        /// Floating IP of the namespace.
        #[arg(long)]
        vip: Option<String>,
        #[arg(long, value_delimiter = ',', value_name = "NODE")]
        nodes: Vec<String>,
    },
    /// Namespaces with their leader and quorum.
    Ls,
    /// One namespace: members, leader (and its changes), flows and where they run.
    Show { name: String },
    /// Move this node into a namespace (pools of flows in both keep running).
    Join { name: String },
    /// Take this node out of its namespace (its flows stop here).
    Leave,
    /// Remove a namespace and its flows everywhere.
    Rm { name: String },
}

/// `service set`'s arguments.
#[derive(Debug, clap::Args)]
struct ServiceSet {
    name: String,
    #[arg(long)]
    count: u32,
    /// An installed unit file; its text is replicated and written on each node that runs it.
    #[arg(long, value_name = "FILE", conflicts_with = "exec")]
    unit: Option<PathBuf>,
    /// Memory limit of each instance (64M, 1G, bytes).
    #[arg(long)]
    memory: Option<String>,
    /// CPU limit of each instance, in cores (0.5 = half a core).
    #[arg(long)]
    cpu: Option<f64>,
    /// Most tasks (processes and threads) of each instance.
    #[arg(long)]
    tasks: Option<u64>,
    /// The user the command runs as.
    #[arg(long)]
    user: Option<String>,
    /// K=V, repeatable.
    #[arg(long, value_name = "K=V")]
    env: Vec<String>,
    /// systemd's Restart= (default on-failure).
    #[arg(long)]
    restart: Option<String>,
    #[arg(long)]
    ns: Option<String>,
    /// Balance this port of the namespace's VIP over the nodes running an instance.
    #[arg(long)]
    port: Option<u16>,
    /// tcp (default) or udp, with --port.
    #[arg(long, requires = "port")]
    proto: Option<String>,
    /// How the VIP holder hands frames to the instances' nodes, with --port: mac (default; all
    /// on the holder's segment) or ipip (encapsulated, so they may be routed).
    #[arg(long, requires = "port", value_parser = ["mac", "ipip"])]
    forward: Option<String>,
    /// The command and its arguments: everything after --exec (so it comes last).
    #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "CMD")]
    exec: Option<Vec<String>>,
}

#[derive(Debug, Subcommand)]
enum LbCommand {
    /// Every VIP:port with its backends (node, weight, packets) and counters.
    Ls,
    /// One VIP:port (by port).
    Show { port: u16 },
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// Declare a service (or change it): COUNT instances of an installed unit file (--unit)
    /// or of a command run as a transient unit (--exec, the rest of the line).
    Set(Box<ServiceSet>),
    /// Services of the namespace: count, active instances, where they run.
    Ls {
        #[arg(long)]
        ns: Option<String>,
    },
    /// One service: every instance with its node, state, since when and restarts.
    Show {
        name: String,
        #[arg(long)]
        ns: Option<String>,
    },
    /// Remove a service: every instance stops.
    Rm {
        name: String,
        #[arg(long)]
        ns: Option<String>,
    },
    /// What the instances wrote to their nodes' journals, merged by time (-f: keep following).
    Logs {
        name: String,
        #[arg(long)]
        ns: Option<String>,
        #[arg(long, default_value_t = 100)]
        lines: u32,
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
enum VipCommand {
    /// Every namespace's floating IP: address, holder, its MAC.
    Ls,
    /// One namespace's floating IP: holder, MAC, since when, and this node's GARPs sent,
    /// conflicts seen and health.
    Show { namespace: String },
    /// Set the namespace's health check: a node whose check fails neither takes nor keeps the
    /// address. One of --pool, --command, --unit (or --none to remove the check).
    Check {
        namespace: String,
        /// A pool of this node must be running (with --payload: must answer a call with it).
        #[arg(long, conflicts_with_all = ["command", "none"])]
        pool: Option<String>,
        #[arg(long, requires = "pool")]
        payload: Option<String>,
        /// A program with its arguments (split like a shell would, no shell run) that must exit 0.
        #[arg(long, conflicts_with_all = ["none", "unit"])]
        command: Option<String>,
        /// A systemd unit of this node (e.g. haproxy.service, or a service instance) that must
        /// be active.
        #[arg(long, conflicts_with_all = ["none", "pool"])]
        unit: Option<String>,
        /// Remove the check: every member is healthy.
        #[arg(long)]
        none: bool,
        /// Successes in a row that make an unhealthy node healthy.
        #[arg(long, default_value_t = 2)]
        rise: u32,
        /// Failures in a row that make a healthy node unhealthy.
        #[arg(long, default_value_t = 2)]
        fall: u32,
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Print a new random cluster key (AES-256, base64) for `cluster.key_file`.
    Keygen,
}

#[derive(Debug, Subcommand)]
enum FlowCommand {
    /// Apply a flow file: start, restart or stop pools so that they match it. In a cluster the
    /// flow goes to the namespace (default: this node's) and every member runs its share.
    Apply {
        file: PathBuf,
        /// Namespace (cluster mode).
        #[arg(long)]
        ns: Option<String>,
    },
    /// Remove a flow: its pools stop.
    Rm {
        name: String,
        /// Namespace (cluster mode).
        #[arg(long)]
        ns: Option<String>,
    },
    /// List applied flows.
    Ls,
    /// Show a flow and its source.
    Show { name: String },
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// List pools with their state, size and counters.
    Ls,
    /// Show one pool in detail.
    Show { name: String },
    /// Stop a pool and start it again from its flow (also a `failed` one).
    Restart { name: String },
    /// Change a pool's size at run time (in-flight requests are never dropped).
    Scale {
        name: String,
        #[arg(long)]
        min: u32,
        #[arg(long)]
        max: u32,
    },
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Every plugin: its folder, flow, pools and state (applied, or error / conflict and why),
    /// as of the daemon's start or the last reload.
    Ls,
    /// Look at the plugins folder again: apply new and changed plugins' flows, stop those of
    /// plugins that are gone, leave unchanged ones alone. Exits 1 when a plugin is not applied.
    Reload,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Install a function bundle from a directory or a .tar/.tar.gz/.tgz.
    Import {
        name: String,
        source: PathBuf,
        /// Replace an existing image of that name.
        #[arg(long)]
        replace: bool,
    },
    /// List installed images.
    Ls,
    /// Remove an image.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
enum TuneCommand {
    /// Show, key by key, the wanted value, the host's value and ok / drift / absent-in-kernel.
    Check {
        /// Only these keys (comma-separated or repeated).
        #[arg(long, value_delimiter = ',', value_name = "KEY")]
        only: Vec<String>,
    },
    /// Write the profile, read every key back, report what changed. Never lowers a capacity key.
    Apply {
        /// Only these keys (comma-separated or repeated).
        #[arg(long, value_delimiter = ',', value_name = "KEY")]
        only: Vec<String>,
    },
}

const EXIT_FAILED: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_DRIFT: u8 = 4;
const EXIT_NOT_DRAINED: u8 = 5;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Generated from the same definitions as the parser; need no daemon.
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "dropctl",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Cluster(ClusterCommand::Keygen) => {
            println!("{}", drop_supervisor::cluster::membership::generate_key());
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            let man = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            return match man.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dropctl: {e}");
                    ExitCode::from(EXIT_FAILED)
                }
            };
        }
        _ => {}
    }
    let client = Client::new(&cli.socket);
    match run(&client, cli.json, &cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // The whole chain: "talking to drop-supervisor at …: connection reset by peer".
            let mut line = format!("dropctl: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                let text = c.to_string();
                if !line.contains(&text) {
                    line.push_str(&format!(": {text}"));
                }
                cause = c.source();
            }
            eprintln!("{line}");
            ExitCode::from(match e {
                ClientError::Unreachable { .. } => EXIT_UNREACHABLE,
                _ => EXIT_FAILED,
            })
        }
    }
}

fn run(client: &Client, json: bool, command: &Command) -> Result<u8, ClientError> {
    match command {
        Command::Status => {
            let mut s: serde_json::Value = client.get("/v1/status")?;
            // In cluster mode, the namespace as a whole too.
            let overview = match client.get::<serde_json::Value>("/v1/overview") {
                Ok(v) => Some(v),
                Err(ClientError::Api(e)) if e.code == "not_clustered" => None,
                Err(e) => return Err(e),
            };
            if json {
                if let Some(o) = overview {
                    s["overview"] = o;
                }
                print_json(&s);
            } else {
                print_status(&serde_json::from_value(s).map_err(|e| bad(&e))?);
                if let Some(o) = &overview {
                    print_overview(o);
                }
            }
            Ok(0)
        }
        Command::Tune(TuneCommand::Check { only }) => {
            let path = if only.is_empty() {
                "/v1/tune/check".to_string()
            } else {
                format!("/v1/tune/check?only={}", only.join(","))
            };
            let raw: serde_json::Value = client.get(&path)?;
            let report: CheckReport = serde_json::from_value(raw.clone()).map_err(|e| bad(&e))?;
            if json {
                print_json(&raw)
            } else {
                print_check(&report)
            }
            Ok(if report.in_tune() { 0 } else { EXIT_DRIFT })
        }
        Command::Tune(TuneCommand::Apply { only }) => {
            let raw: serde_json::Value =
                client.post("/v1/tune/apply", &serde_json::json!({ "only": only }))?;
            let report: ApplyReport = serde_json::from_value(raw.clone()).map_err(|e| bad(&e))?;
            if json {
                print_json(&raw)
            } else {
                print_apply(&report)
            }
            Ok(if report.count(ApplyOutcome::Failed) == 0 {
                0
            } else {
                EXIT_FAILED
            })
        }
        Command::Completions { .. } | Command::Man | Command::Cluster(_) => Ok(0), // in main
        Command::Node(NodeCommand::Drain { wait }) => drain(client, json, *wait),
        Command::Node(NodeCommand::Undrain) => {
            let v: serde_json::Value = client.post("/v1/undrain", &serde_json::json!({}))?;
            if json {
                print_json(&v);
            } else {
                println!("{} undrained: taking work again", text(&v["node"]));
            }
            Ok(0)
        }
        Command::Node(NodeCommand::DrainStatus) => {
            let v: serde_json::Value = client.get("/v1/drain")?;
            if json {
                print_json(&v);
            } else {
                println!("{}", drain_line(&v));
            }
            Ok(0)
        }
        Command::Node(NodeCommand::Ls) => {
            let v: serde_json::Value = client.get("/v1/nodes")?;
            if json {
                print_json(&v);
            } else {
                print_nodes(&v);
            }
            Ok(0)
        }
        Command::Ns(cmd) => namespace(client, json, cmd),
        Command::Vip(cmd) => vip(client, json, cmd),
        Command::Service(cmd) => service(client, json, cmd),
        Command::Lb(cmd) => lb(client, json, cmd),
        Command::Flow(cmd) => flow(client, json, cmd),
        Command::Pool(cmd) => pool(client, json, cmd),
        Command::Image(cmd) => image(client, json, cmd),
        Command::Plugin(cmd) => plugin(client, json, cmd),
        Command::Call { pool, payload } => {
            let payload = if payload == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .map_err(|e| io_error(client, e))?;
                s.strip_suffix('\n').map(str::to_string).unwrap_or(s)
            } else {
                payload.clone()
            };
            let v: serde_json::Value = client.post(
                &format!("/v1/pools/{pool}/call"),
                &serde_json::json!({ "payload": payload }),
            )?;
            if json {
                print_json(&v);
            } else {
                println!("{}", v["reply"].as_str().unwrap_or_default());
            }
            Ok(0)
        }
        Command::Cast { pool, payload, all } => {
            let v: serde_json::Value = client.post(
                &format!("/v1/pools/{pool}/cast"),
                &serde_json::json!({ "payload": payload, "all": all }),
            )?;
            if json {
                print_json(&v);
            } else {
                println!(
                    "queued for {}{pool}",
                    if *all { "every worker of " } else { "" }
                );
            }
            Ok(0)
        }
        Command::Events {
            follow,
            cluster,
            lines,
        } => events(client, json, *follow, *cluster, *lines),
        Command::Logs { pool, follow } => {
            let mut v: serde_json::Value = client.get(&format!("/v1/pools/{pool}/logs"))?;
            loop {
                print!("{}", v["text"].as_str().unwrap_or_default());
                let _ = std::io::Write::flush(&mut std::io::stdout());
                if !follow {
                    return Ok(0);
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
                let next = v["next_offset"].as_u64().unwrap_or(0);
                v = client.get(&format!("/v1/pools/{pool}/logs?offset={next}"))?;
            }
        }
    }
}

fn io_error(client: &Client, source: std::io::Error) -> ClientError {
    ClientError::Io {
        socket: client.socket().to_path_buf(),
        source,
    }
}

/// `plugin ls`: one line per plugin, the state (with why it is not applied) last.
fn print_plugins(v: &serde_json::Value) {
    if v["enabled"] == false {
        println!("plugins are off on this node ([plugins] enabled = false)");
        return;
    }
    if let Some(e) = v["error"].as_str() {
        println!("last pass: {e}");
    }
    let plugins = v["plugins"].as_array().cloned().unwrap_or_default();
    if plugins.is_empty() {
        println!("no plugins in {}", text(&v["dir"]));
        return;
    }
    println!(
        "{:<20} {:<20} {:<24} {:<40} STATE",
        "PLUGIN", "FLOW", "POOLS", "DIR"
    );
    for p in &plugins {
        let pools: Vec<String> = p["pools"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        let state = match p["message"].as_str() {
            Some(m) => format!("{}: {m}", text(&p["state"])),
            None => text(&p["state"]),
        };
        println!(
            "{:<20} {:<20} {:<24} {:<40} {state}",
            text(&p["name"]),
            text(&p["flow"]),
            if pools.is_empty() {
                "-".to_string()
            } else {
                pools.join(",")
            },
            text(&p["dir"]),
        );
    }
}

fn plugin(client: &Client, json: bool, cmd: &PluginCommand) -> Result<u8, ClientError> {
    match cmd {
        PluginCommand::Ls => {
            let v: serde_json::Value = client.get("/v1/plugins")?;
            if json {
                print_json(&v);
            } else {
                print_plugins(&v);
            }
            Ok(0)
        }
        PluginCommand::Reload => {
            let v: serde_json::Value = client.post("/v1/plugins/reload", &serde_json::json!({}))?;
            if json {
                print_json(&v);
            } else {
                for name in v["applied"].as_array().into_iter().flatten() {
                    println!("applied    {}", text(name));
                }
                for name in v["unchanged"].as_array().into_iter().flatten() {
                    println!("unchanged  {}", text(name));
                }
                for r in v["removed"].as_array().into_iter().flatten() {
                    println!(
                        "removed    {}: flow {} stopped ({})",
                        text(&r["plugin"]),
                        text(&r["flow"]),
                        text(&r["reason"])
                    );
                }
                println!();
                print_plugins(&v);
            }
            let not_applied = v["plugins"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["state"] != "applied");
            Ok(if not_applied || v["error"].is_string() {
                EXIT_FAILED
            } else {
                0
            })
        }
    }
}

fn flow(client: &Client, json: bool, cmd: &FlowCommand) -> Result<u8, ClientError> {
    match cmd {
        FlowCommand::Apply { file, ns } => {
            let source = std::fs::read_to_string(file).map_err(|e| io_error(client, e))?;
            let abs = std::path::absolute(file).unwrap_or_else(|_| file.clone());
            let mut body =
                serde_json::json!({ "file": abs.display().to_string(), "source": source });
            if let Some(ns) = ns {
                body["ns"] = serde_json::json!(ns);
            }
            let v: serde_json::Value = client.post("/v1/flows", &body)?;
            if json {
                print_json(&v);
            } else if let Some(ns) = v["namespace"].as_str() {
                println!(
                    "flow {} {} namespace {ns}",
                    v["flow"].as_str().unwrap_or("?"),
                    if v["changed"] == true {
                        "stored in"
                    } else {
                        "unchanged in"
                    }
                );
            } else {
                println!("flow {} applied", v["flow"].as_str().unwrap_or("?"));
                for what in ["started", "restarted", "retried", "unchanged", "stopped"] {
                    for p in v[what].as_array().into_iter().flatten() {
                        let note = if what == "retried" {
                            " (had failed; started again)"
                        } else {
                            ""
                        };
                        println!("  {what:<9} {}{note}", p.as_str().unwrap_or("?"));
                    }
                }
            }
            Ok(0)
        }
        FlowCommand::Rm { name, ns } => {
            let path = match ns {
                Some(ns) => format!("/v1/flows/{name}?ns={ns}"),
                None => format!("/v1/flows/{name}"),
            };
            let v: serde_json::Value = client.delete(&path)?;
            if json {
                print_json(&v);
            } else {
                println!("flow {name} removed");
                for p in v["stopped"].as_array().into_iter().flatten() {
                    println!("  stopped   {}", p.as_str().unwrap_or("?"));
                }
            }
            Ok(0)
        }
        FlowCommand::Ls => {
            let v: serde_json::Value = client.get("/v1/flows")?;
            if json {
                print_json(&v);
            } else {
                println!("{:<24} {:<8} POOLS", "FLOW", "PRIORITY");
                for f in v.as_array().into_iter().flatten() {
                    let pools: Vec<&str> = f["pools"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| p.as_str())
                        .collect();
                    let origin = match f["plugin"].as_str() {
                        Some(p) => format!("  (plugin {p})"),
                        None => String::new(),
                    };
                    println!(
                        "{:<24} {:<8} {}{origin}",
                        f["name"].as_str().unwrap_or("?"),
                        f["priority"],
                        pools.join(", ")
                    );
                }
            }
            Ok(0)
        }
        FlowCommand::Show { name } => {
            let v: serde_json::Value = client.get(&format!("/v1/flows/{name}"))?;
            if json {
                print_json(&v);
            } else {
                println!("flow       {}", text(&v["name"]));
                println!(
                    "priority   {}{}",
                    text(&v["priority"]),
                    v["replicas"]
                        .as_u64()
                        .map_or(String::new(), |r| format!(" (replicas {r})"))
                );
                println!(
                    "{:<20} {:<7} {:>4} {:>4} {:<16} COMMAND",
                    "POOL", "MODE", "MIN", "MAX", "IMAGE"
                );
                for p in v["pools"].as_array().into_iter().flatten() {
                    let argv: Vec<String> = p["argv"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(text)
                        .collect();
                    println!(
                        "{:<20} {:<7} {:>4} {:>4} {:<16} {}",
                        text(&p["name"]),
                        text(&p["mode"]),
                        text(&p["min"]),
                        text(&p["max"]),
                        text(&p["image"]),
                        argv.join(" ")
                    );
                }
                println!(
                    "--- source ---\n{}",
                    v["source"].as_str().unwrap_or_default()
                );
            }
            Ok(0)
        }
    }
}

/// `pool show` as sections a person reads: state, workers, queue, counters, latency, and
/// what the workers last printed on stderr.
fn print_pool(v: &serde_json::Value) -> Result<(), ClientError> {
    let p: PoolStatus = serde_json::from_value(v.clone()).map_err(|e| bad(&e))?;
    let s = &p.stats;
    let state = match &p.phase {
        Phase::Running => "running".to_string(),
        Phase::Stopped => "stopped".to_string(),
        Phase::Failed(why) => format!("failed: {why}"),
    };
    let pids: Vec<String> = p.pids.iter().map(u32::to_string).collect();
    println!("pool       {}", p.name);
    println!("state      {state}");
    println!(
        "workers    {} (min {}, max {}; idle {}, busy {}, starting {})",
        p.workers, p.min, p.max, p.idle, p.busy, p.starting
    );
    println!(
        "pids       {}",
        if pids.is_empty() {
            "-".to_string()
        } else {
            pids.join(" ")
        }
    );
    println!("queue      {} waiting", p.queue_depth);
    println!(
        "requests   ok {}, error {}, timeout {}, rejected {}, running {}",
        s.ok, s.error, s.timeout, s.rejected, s.running
    );
    println!(
        "workers    restarts {}, out of step {}, cache hits {}",
        s.restarts, s.out_of_step, s.cache_hits
    );
    match (s.quantile_us(0.5), s.quantile_us(0.99)) {
        (Some(p50), Some(p99)) => println!(
            "latency    p50 <= {p50} us, p99 <= {p99} us over {} requests",
            s.latency_count
        ),
        _ => println!("latency    - (no requests yet)"),
    }
    let tail: Vec<&str> = v["stderr_tail"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.as_str())
        .collect();
    if !tail.is_empty() {
        println!("stderr     (last lines; `dropctl logs {}` for all)", p.name);
        for line in tail {
            println!("  {line}");
        }
    }
    Ok(())
}

fn pool(client: &Client, json: bool, cmd: &PoolCommand) -> Result<u8, ClientError> {
    match cmd {
        PoolCommand::Ls => {
            let v: serde_json::Value = client.get("/v1/pools")?;
            if json {
                print_json(&v);
                return Ok(0);
            }
            println!(
                "{:<20} {:<8} {:>7} {:>5} {:>5} {:>8} {:>6} {:>7} {:>8} {:>8}",
                "POOL",
                "STATE",
                "WORKERS",
                "BUSY",
                "QUEUE",
                "OK",
                "ERROR",
                "TIMEOUT",
                "REJECTED",
                "RESTARTS"
            );
            for p in v.as_array().into_iter().flatten() {
                let s = &p["stats"];
                println!(
                    "{:<20} {:<8} {:>7} {:>5} {:>5} {:>8} {:>6} {:>7} {:>8} {:>8}",
                    p["name"].as_str().unwrap_or("?"),
                    p["phase"]["state"].as_str().unwrap_or("?"),
                    format!("{}/{}", p["workers"], p["max"]),
                    p["busy"].to_string(),
                    p["queue_depth"].to_string(),
                    s["ok"].to_string(),
                    s["error"].to_string(),
                    s["timeout"].to_string(),
                    s["rejected"].to_string(),
                    s["restarts"].to_string()
                );
            }
            Ok(0)
        }
        PoolCommand::Show { name } => {
            let v: serde_json::Value = client.get(&format!("/v1/pools/{name}"))?;
            if json {
                print_json(&v);
            } else {
                print_pool(&v)?;
            }
            Ok(0)
        }
        PoolCommand::Restart { name } => {
            let v: serde_json::Value =
                client.post(&format!("/v1/pools/{name}/restart"), &serde_json::json!({}))?;
            if json {
                print_json(&v);
            } else {
                println!(
                    "pool {name} restarted: {} ({} workers)",
                    v["phase"]["state"].as_str().unwrap_or("?"),
                    v["workers"]
                );
            }
            Ok(0)
        }
        PoolCommand::Scale { name, min, max } => {
            let v: serde_json::Value = client.post(
                &format!("/v1/pools/{name}/scale"),
                &serde_json::json!({ "min": min, "max": max }),
            )?;
            if json {
                print_json(&v);
            } else {
                println!(
                    "pool {name}: min {min}, max {max} (now {} workers)",
                    v["workers"]
                );
            }
            Ok(0)
        }
    }
}

fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `dropctl node drain`: asks once, then reports progress until drained or `wait` passes.
fn drain(client: &Client, json: bool, wait: u64) -> Result<u8, ClientError> {
    let mut v: serde_json::Value = client.post("/v1/drain", &serde_json::json!({}))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
    let mut last = String::new();
    loop {
        let line = drain_line(&v);
        if !json && line != last {
            println!("{line}");
            last = line;
        }
        if v["drained"] == true || std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        v = client.get("/v1/drain")?;
    }
    if json {
        print_json(&v);
    }
    Ok(if v["drained"] == true {
        0
    } else {
        EXIT_NOT_DRAINED
    })
}

/// What a drain still waits for, in one line.
fn drain_line(v: &serde_json::Value) -> String {
    let node = text(&v["node"]);
    if v["draining"] != true {
        return format!("{node} is not draining");
    }
    if v["drained"] == true {
        return format!("{node} is drained");
    }
    let mut waits = Vec::new();
    if v["announced"] != true {
        waits.push("the cluster to hear of it".to_string());
    }
    if let Some(l) = v["leads"].as_array().filter(|l| !l.is_empty()) {
        waits.push(format!(
            "leadership of {} to move",
            names(&serde_json::json!(l))
        ));
    }
    if !v["holds_vip"].is_null() {
        waits.push(format!("floating IP {} to move", text(&v["holds_vip"])));
    }
    if v["in_flight"].as_u64().unwrap_or(0) > 0 {
        waits.push(format!("{} calls in flight", v["in_flight"]));
    }
    if v["service_instances"].as_u64().unwrap_or(0) > 0 {
        waits.push(format!(
            "{} service instances to move",
            v["service_instances"]
        ));
    }
    format!("{node} is draining; waiting for {}", waits.join(", "))
}

fn print_nodes(v: &serde_json::Value) {
    println!(
        "{:<16} {:<9} {:<22} {:<14} {:<6} {:<8} ID",
        "NODE", "STATE", "ADDRESS", "NAMESPACE", "LEADER", "VERSION"
    );
    for n in v.as_array().into_iter().flatten() {
        let state = if n["draining"] == true {
            format!("{}/drain", text(&n["state"]))
        } else {
            text(&n["state"])
        };
        println!(
            "{:<16} {:<9} {:<22} {:<14} {:<6} {:<8} {}",
            text(&n["name"]),
            state,
            text(&n["addr"]),
            text(&n["namespace"]),
            if n["leader"] == true { "yes" } else { "" },
            text(&n["version"]),
            text(&n["id"])
        );
    }
}

fn names(v: &serde_json::Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|m| text(m.get("name").unwrap_or(m)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn namespace(client: &Client, json: bool, cmd: &NsCommand) -> Result<u8, ClientError> {
    let v: serde_json::Value = match cmd {
        NsCommand::Create { name, vip, nodes } => client.post(
            "/v1/namespaces",
            &serde_json::json!({ "name": name, "vip": vip, "nodes": nodes }),
        )?,
        NsCommand::Ls => client.get("/v1/namespaces")?,
        NsCommand::Show { name } => client.get(&format!("/v1/namespaces/{name}"))?,
        NsCommand::Join { name } => client.post(
            &format!("/v1/namespaces/{name}/join"),
            &serde_json::json!({}),
        )?,
        NsCommand::Leave => client.post("/v1/leave", &serde_json::json!({}))?,
        NsCommand::Rm { name } => client.delete(&format!("/v1/namespaces/{name}"))?,
    };
    if json {
        print_json(&v);
        return Ok(0);
    }
    match cmd {
        NsCommand::Ls => {
            println!(
                "{:<16} {:<16} {:<14} {:<7} MEMBERS",
                "NAMESPACE", "VIP", "LEADER", "QUORUM"
            );
            for n in v.as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:<16} {:<14} {:<7} {}",
                    text(&n["name"]),
                    text(&n["vip"]),
                    text(&n["leader"]),
                    if n["quorum"] == true { "yes" } else { "no" },
                    names(&n["members"])
                );
            }
        }
        NsCommand::Show { .. } | NsCommand::Create { .. } | NsCommand::Join { .. } => {
            println!("namespace {}  vip {}", text(&v["name"]), text(&v["vip"]));
            println!(
                "leader    {}  (quorum: {})",
                text(&v["leader"]),
                if v["quorum"] == true { "yes" } else { "no" }
            );
            println!("members");
            for m in v["members"].as_array().into_iter().flatten() {
                println!(
                    "  {:<16} {:<8} {}",
                    text(&m["name"]),
                    text(&m["state"]),
                    text(&m["id"])
                );
            }
            println!("flows");
            for f in v["flows"].as_array().into_iter().flatten() {
                println!(
                    "  {:<20} priority {} replicas {:<4} on {}",
                    text(&f["name"]),
                    text(&f["priority"]),
                    text(&f["replicas"]),
                    names(&f["nodes"])
                );
            }
            let history = v["history"].as_array().cloned().unwrap_or_default();
            if !history.is_empty() {
                println!("leader changes seen by this node");
                for h in history {
                    println!(
                        "  {}  {} -> {}",
                        text(&h["at_unix_ms"]),
                        text(&h["from"]),
                        text(&h["to"])
                    );
                }
            }
        }
        NsCommand::Leave => println!("left namespace {}", text(&v["left"])),
        NsCommand::Rm { name } => println!("namespace {name} removed"),
    }
    Ok(0)
}

fn lb(client: &Client, json: bool, cmd: &LbCommand) -> Result<u8, ClientError> {
    let v: serde_json::Value = client.get("/v1/lb")?;
    let vips: Vec<serde_json::Value> = v["vips"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| match cmd {
            LbCommand::Ls => true,
            LbCommand::Show { port } => e["port"] == *port,
        })
        .collect();
    if json {
        match cmd {
            LbCommand::Ls => print_json(&v),
            LbCommand::Show { .. } => print_json(&vips.first().cloned().unwrap_or_default()),
        }
        return Ok(0);
    }
    println!(
        "interface {}  mode {}  flows {}{}",
        text(&v["interface"]),
        text(&v["mode"]),
        text(&v["flows"]),
        if v["error"].is_null() {
            String::new()
        } else {
            format!("  error: {}", text(&v["error"]))
        }
    );
    for e in &vips {
        println!(
            "{}:{}/{}  forward {}  packets {}  bytes {}  new flows {}  table hits {}  no backend {}",
            text(&e["vip"]),
            text(&e["port"]),
            text(&e["proto"]),
            text(&e["forward"]),
            text(&e["packets"]),
            text(&e["bytes"]),
            text(&e["new_flows"]),
            text(&e["conn_hits"]),
            text(&e["no_backend"])
        );
        for b in e["backends"].as_array().into_iter().flatten() {
            println!(
                "  {:<16} {:<15} weight {}  packets {}{}",
                text(&b["node"]),
                text(&b["addr"]),
                text(&b["weight"]),
                text(&b["packets"]),
                match b["via"].as_str() {
                    Some(via) => format!("  via {via}"),
                    None => String::new(),
                }
            );
        }
    }
    Ok(0)
}

fn ns_query(ns: &Option<String>) -> String {
    ns.as_ref().map(|n| format!("?ns={n}")).unwrap_or_default()
}

fn service(client: &Client, json: bool, cmd: &ServiceCommand) -> Result<u8, ClientError> {
    let v: serde_json::Value = match cmd {
        ServiceCommand::Set(set) => {
            let ServiceSet {
                name,
                count,
                unit,
                memory,
                cpu,
                tasks,
                user,
                env,
                restart,
                ns,
                port,
                proto,
                forward,
                exec,
            } = &**set;
            let unit = match unit {
                Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                    ClientError::Local(format!("cannot read {}: {e}", path.display()))
                })?),
                None => None,
            };
            let mut vars = std::collections::BTreeMap::new();
            for kv in env {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| ClientError::Local(format!("--env {kv:?}: expected K=V")))?;
                vars.insert(k.to_string(), v.to_string());
            }
            let body = drop_supervisor::services::spec::ServiceRequest {
                count: *count,
                unit,
                exec: exec.clone(),
                memory: memory.clone(),
                cpu: *cpu,
                tasks: *tasks,
                user: user.clone(),
                env: vars,
                restart: restart.clone(),
                ns: ns.clone(),
                port: *port,
                proto: proto.clone(),
                forward: forward.clone(),
            };
            client.put(
                &format!("/v1/services/{name}"),
                &serde_json::to_value(&body).map_err(|e| bad(&e))?,
            )?
        }
        ServiceCommand::Ls { ns } => client.get(&format!("/v1/services{}", ns_query(ns)))?,
        ServiceCommand::Show { name, ns } => {
            client.get(&format!("/v1/services/{name}{}", ns_query(ns)))?
        }
        ServiceCommand::Rm { name, ns } => {
            client.delete(&format!("/v1/services/{name}{}", ns_query(ns)))?
        }
        ServiceCommand::Logs {
            name,
            ns,
            lines,
            follow,
        } => return service_logs(client, json, name, ns, *lines, *follow),
    };
    if json {
        print_json(&v);
        return Ok(0);
    }
    match cmd {
        ServiceCommand::Ls { .. } => {
            println!(
                "{:<20} {:<6} {:>6} {:>6}  NODES",
                "SERVICE", "KIND", "COUNT", "ACTIVE"
            );
            for s in v.as_array().into_iter().flatten() {
                let mut nodes: Vec<String> = s["instances"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|i| i["surplus"] != true)
                    .map(|i| text(&i["node"]))
                    .collect();
                nodes.sort();
                nodes.dedup();
                println!(
                    "{:<20} {:<6} {:>6} {:>6}  {}",
                    text(&s["name"]),
                    text(&s["kind"]),
                    text(&s["count"]),
                    text(&s["active"]),
                    nodes.join(",")
                );
            }
        }
        ServiceCommand::Show { .. } => {
            println!(
                "service {}/{}  {}  count {}  active {}",
                text(&v["namespace"]),
                text(&v["name"]),
                text(&v["kind"]),
                text(&v["count"]),
                text(&v["active"])
            );
            println!(
                "{:>5}  {:<16} {:<12} {:<14} {:>8}",
                "#", "NODE", "STATE", "SUB", "RESTARTS"
            );
            for i in v["instances"].as_array().into_iter().flatten() {
                println!(
                    "{:>5}  {:<16} {:<12} {:<14} {:>8}{}",
                    text(&i["index"]),
                    text(&i["node"]),
                    text(&i["active"]),
                    text(&i["sub"]),
                    text(&i["restarts"]),
                    if i["surplus"] == true {
                        "  (surplus, stops once its replacement is active)"
                    } else {
                        ""
                    }
                );
            }
            if let Some(f) = v["failures"].as_object().filter(|f| !f.is_empty()) {
                let list: Vec<String> = f.iter().map(|(n, c)| format!("{n}: {c}")).collect();
                println!("failures  {}", list.join(", "));
            }
        }
        _ => print_json(&v),
    }
    Ok(0)
}

/// `dropctl events`: the newest `lines` events, then (with `follow`) each new one as the
/// daemon reports it (a long poll: the daemon answers as soon as there is one).
fn events(
    client: &Client,
    json: bool,
    follow: bool,
    cluster: bool,
    lines: u64,
) -> Result<u8, ClientError> {
    use drop_supervisor::events::Page;
    if cluster {
        let v: serde_json::Value = client.get(&format!("/v1/events?cluster=true&limit={lines}"))?;
        if json {
            print_json(&v);
            return Ok(0);
        }
        let events: Vec<drop_supervisor::events::Event> =
            serde_json::from_value(v["events"].clone()).map_err(|e| bad(&e))?;
        for e in &events {
            print_event(e);
        }
        if let Some(u) = v["unreachable"].as_object() {
            for (node, why) in u {
                eprintln!("(no events from {node}: {})", text(why));
            }
        }
        return Ok(0);
    }
    // The newest `lines`: where the log ends now, then from `lines` before it.
    let head: Page = get_as(client, "/v1/events?since=0&limit=1")?;
    let mut since = head.newest.saturating_sub(lines);
    loop {
        let wait = if follow { 20 } else { 0 };
        let page: Page = get_as(
            client,
            &format!("/v1/events?since={since}&limit=2000&wait={wait}"),
        )?;
        if page.missed > 0 && since > 0 {
            eprintln!(
                "({} events were dropped from the log before they were read)",
                page.missed
            );
        }
        for e in &page.events {
            if json {
                println!("{}", serde_json::to_string(e).expect("events serialise"));
            } else {
                print_event(e);
            }
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        since = page.next;
        if !follow {
            return Ok(0);
        }
    }
}

fn get_as<T: serde::de::DeserializeOwned>(client: &Client, path: &str) -> Result<T, ClientError> {
    let v: serde_json::Value = client.get(path)?;
    serde_json::from_value(v).map_err(|e| bad(&e))
}

fn print_event(e: &drop_supervisor::events::Event) {
    println!(
        "{}  {:<8} {:<10} {:<14} {}",
        utc_time(e.at_unix_ms),
        e.node,
        e.kind.as_str(),
        e.subject,
        e.text
    );
}

/// `2026-12-06 19:40:01.123Z` for a Unix time in ms (the proleptic Gregorian calendar).
fn utc_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

fn service_logs(
    client: &Client,
    json: bool,
    name: &str,
    ns: &Option<String>,
    lines: u32,
    follow: bool,
) -> Result<u8, ClientError> {
    let mut q = format!("lines={lines}");
    if let Some(n) = ns {
        q.push_str(&format!("&ns={n}"));
    }
    let mut seen: Option<String> = None;
    loop {
        let v: serde_json::Value = client.get(&format!("/v1/services/{name}/logs?{q}"))?;
        if json && !follow {
            print_json(&v);
            return Ok(0);
        }
        let all: Vec<String> = v["lines"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        // Print only what follows the last line printed.
        let start = seen
            .as_ref()
            .and_then(|last| all.iter().rposition(|l| l == last).map(|i| i + 1))
            .unwrap_or(0);
        for l in &all[start..] {
            println!("{l}");
        }
        if seen.is_none()
            && let Some(e) = v["unreachable"].as_object().filter(|e| !e.is_empty())
        {
            for (node, why) in e {
                eprintln!("(no lines from {node}: {})", text(why));
            }
        }
        if let Some(l) = all.last() {
            seen = Some(l.clone());
        }
        if !follow {
            return Ok(0);
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn vip(client: &Client, json: bool, cmd: &VipCommand) -> Result<u8, ClientError> {
    let v: serde_json::Value = match cmd {
        VipCommand::Ls => client.get("/v1/vip")?,
        VipCommand::Show { namespace } => client.get(&format!("/v1/vip/{namespace}"))?,
        VipCommand::Check {
            namespace,
            pool,
            payload,
            command,
            unit,
            none,
            rise,
            fall,
            interval_ms,
            timeout_ms,
        } => {
            let path = format!("/v1/namespaces/{namespace}/health");
            if *none {
                client.delete(&path)?
            } else {
                let mut body = serde_json::json!({
                    "rise": rise, "fall": fall, "interval_ms": interval_ms, "timeout_ms": timeout_ms,
                });
                if let Some(p) = pool {
                    body["pool"] = p.clone().into();
                    if let Some(pl) = payload {
                        body["payload"] = pl.clone().into();
                    }
                } else if let Some(c) = command {
                    let argv = shell_words::split(c).map_err(|e| ClientError::BadResponse {
                        status: 0,
                        detail: format!("--command: {e}"),
                    })?;
                    body["command"] = argv.into();
                } else if let Some(u) = unit {
                    body["unit"] = u.clone().into();
                } else {
                    eprintln!("dropctl: give --pool, --command, --unit or --none");
                    return Ok(2);
                }
                let raw = serde_json::to_vec(&body).expect("JSON values serialise");
                client.put_bytes(&path, raw)?
            }
        }
    };
    if json {
        print_json(&v);
        return Ok(0);
    }
    match cmd {
        VipCommand::Ls => {
            println!(
                "{:<16} {:<18} {:<14} {:<18} HEALTH CHECK",
                "NAMESPACE", "ADDRESS", "HOLDER", "MAC"
            );
            for n in v.as_array().into_iter().flatten() {
                let check = if n["health_check"].is_null() {
                    "-"
                } else {
                    "yes"
                };
                println!(
                    "{:<16} {:<18} {:<14} {:<18} {check}",
                    text(&n["namespace"]),
                    text(&n["address"]),
                    text(&n["holder"]),
                    text(&n["holder_mac"]),
                );
            }
        }
        VipCommand::Show { .. } => {
            println!("namespace   {}", text(&v["namespace"]));
            println!("address     {}", text(&v["address"]));
            println!(
                "holder      {}  mac {}",
                text(&v["holder"]),
                text(&v["holder_mac"])
            );
            let me = &v["this_node"];
            if me.is_null() {
                println!("(this node is not a member: no local counters)");
            } else {
                println!(
                    "since       {} (Unix ms, as this node saw it)",
                    text(&me["since_unix_ms"])
                );
                println!("interface   {}", text(&me["interface"]));
                println!(
                    "this node   {}  term {}",
                    text(&me["role"]),
                    text(&me["term"])
                );
                println!(
                    "garps sent  {}  conflicts seen {} (last from {})",
                    text(&me["garps_sent"]),
                    text(&me["conflicts_seen"]),
                    text(&me["last_conflict_mac"])
                );
                let h = &me["health"];
                println!(
                    "health      {}  check: {}{}",
                    if h["healthy"] == true {
                        "healthy"
                    } else {
                        "UNHEALTHY"
                    },
                    text(&h["check"]),
                    h["detail"]
                        .as_str()
                        .map(|d| format!("  ({d})"))
                        .unwrap_or_default()
                );
                println!(
                    "moves seen  {}  last release: {}",
                    text(&me["moves"]),
                    text(&me["last_release"])
                );
                if let Some(e) = me["error"].as_str() {
                    println!("error       {e}");
                }
            }
        }
        VipCommand::Check { namespace, .. } => {
            if v["health"].is_null() {
                println!(
                    "namespace {namespace}: no health check; every member may hold the address"
                );
            } else {
                println!("namespace {namespace}: health check {}", v["health"]);
            }
        }
    }
    Ok(0)
}

fn bad(e: &serde_json::Error) -> ClientError {
    ClientError::BadResponse {
        status: 200,
        detail: e.to_string(),
    }
}

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values serialise")
    );
}

fn print_status(s: &StatusInfo) {
    let (h, m, sec) = (
        s.uptime_secs / 3600,
        s.uptime_secs / 60 % 60,
        s.uptime_secs % 60,
    );
    println!("node     {}", s.name);
    println!("node id  {}", s.node_id);
    println!("version  {}", s.version);
    println!("pid      {}", s.pid);
    println!("uptime   {h}h {m:02}m {sec:02}s");
    println!(
        "config   {}",
        s.config_path
            .as_ref()
            .map_or("(built-in defaults)".into(), |p| p.display().to_string())
    );
    println!("state    {}", s.state_dir.display());
    println!("socket   {}", s.socket.display());
    println!("gateway  {}", s.gateway.as_deref().unwrap_or("off"));
    println!("pools    {}", s.pools);
}

/// The namespace part of `dropctl status`.
fn print_overview(o: &serde_json::Value) {
    if o["node"]["draining"] == true {
        println!("draining yes (dropctl node undrain ends it)");
    }
    let ns = &o["namespace"];
    if ns.is_null() {
        println!("\nnamespace (none: this node is in no namespace)");
        return;
    }
    println!();
    println!("namespace {}", text(&ns["name"]));
    println!(
        "leader    {}{}",
        text(&ns["leader"]),
        if ns["quorum"] == true {
            ""
        } else {
            "  (NO QUORUM)"
        }
    );
    if !ns["vip"].is_null() {
        println!(
            "vip       {} held by {}",
            text(&ns["vip"]),
            text(&ns["vip_holder"])
        );
    }
    println!();
    println!(
        "{:<16} {:<9} {:<8} {:<6} POOLS (state workers ok/error)",
        "NODE", "STATE", "VERSION", "DRAIN"
    );
    for m in ns["members"].as_array().into_iter().flatten() {
        let pools = match m["pools"].as_array() {
            Some(p) if !p.is_empty() => p
                .iter()
                .map(|p| {
                    format!(
                        "{} {} {} {}/{}",
                        text(&p["name"]),
                        text(&p["state"]),
                        p["workers"],
                        p["ok"],
                        p["error"]
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            Some(_) => "-".to_string(),
            None => format!("(unreachable: {})", text(&m["unreachable"])),
        };
        println!(
            "{:<16} {:<9} {:<8} {:<6} {pools}",
            text(&m["name"]),
            text(&m["state"]),
            text(&m["version"]),
            if m["draining"] == true { "yes" } else { "" },
        );
    }
    let services = ns["services"].as_array().cloned().unwrap_or_default();
    if !services.is_empty() {
        println!();
        println!("{:<24} {:>6} {:>6}  HEALTH", "SERVICE", "COUNT", "ACTIVE");
        for sv in services {
            let (count, active) = (
                sv["count"].as_u64().unwrap_or(0),
                sv["active"].as_u64().unwrap_or(0),
            );
            println!(
                "{:<24} {count:>6} {active:>6}  {}",
                text(&sv["name"]),
                if active >= count { "ok" } else { "DEGRADED" }
            );
        }
    }
}

fn print_check(r: &CheckReport) {
    println!("{:<34} {:<24} {:<24} STATE", "KEY", "WANTED", "ACTUAL");
    for k in &r.keys {
        let wanted = match k.policy {
            Policy::Minimum => format!(">= {}", k.wanted),
            Policy::Exact => k.wanted.clone(),
        };
        let state = match k.state {
            KeyState::Ok => "ok".to_string(),
            KeyState::Drift => "drift".to_string(),
            KeyState::AbsentInKernel => "absent-in-kernel".to_string(),
            KeyState::Unreadable => format!("unreadable: {}", k.error.as_deref().unwrap_or("?")),
        };
        println!(
            "{:<34} {:<24} {:<24} {state}",
            k.key,
            wanted,
            k.actual.as_deref().unwrap_or("-")
        );
    }
    println!(
        "{} keys under {}: {} ok, {} drift, {} absent-in-kernel, {} unreadable",
        r.keys.len(),
        r.sysctl_root.display(),
        r.count(KeyState::Ok),
        r.count(KeyState::Drift),
        r.count(KeyState::AbsentInKernel),
        r.count(KeyState::Unreadable)
    );
}

fn print_apply(r: &ApplyReport) {
    for k in r
        .keys
        .iter()
        .filter(|k| k.outcome != ApplyOutcome::Unchanged)
    {
        let before = k.before.as_deref().unwrap_or("-");
        let after = k.after.as_deref().unwrap_or("-");
        match k.outcome {
            ApplyOutcome::Changed => println!("changed  {:<34} {before} -> {after}", k.key),
            ApplyOutcome::AbsentInKernel => println!(
                "absent   {:<34} (the running kernel has no such key)",
                k.key
            ),
            ApplyOutcome::Failed => {
                println!(
                    "FAILED   {:<34} {}",
                    k.key,
                    k.error.as_deref().unwrap_or("unknown error")
                )
            }
            ApplyOutcome::Unchanged => {}
        }
    }
    println!(
        "{} keys under {}: {} changed, {} unchanged, {} absent-in-kernel, {} failed",
        r.keys.len(),
        r.sysctl_root.display(),
        r.count(ApplyOutcome::Changed),
        r.count(ApplyOutcome::Unchanged),
        r.count(ApplyOutcome::AbsentInKernel),
        r.count(ApplyOutcome::Failed)
    );
}

/// The bundle as a tarball: a folder is packed by the system `tar` (as the caller), a tarball
/// (`.tar`, `.tar.gz`, `.tgz`) is sent as it is.
fn bundle_bytes(source: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind};
    let meta = std::fs::metadata(source)
        .map_err(|e| Error::new(e.kind(), format!("{}: {e}", source.display())))?;
    if meta.is_dir() {
        let out = std::process::Command::new("tar")
            .arg("-C")
            .arg(source)
            .args(["-cf", "-", "."])
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| Error::new(e.kind(), format!("running tar: {e}")))?;
        if !out.status.success() {
            return Err(Error::other(format!(
                "tar could not pack {}: {}",
                source.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        return Ok(out.stdout);
    }
    let name = source.to_string_lossy();
    if [".tar", ".tar.gz", ".tgz"]
        .iter()
        .any(|s| name.ends_with(s))
    {
        return std::fs::read(source)
            .map_err(|e| Error::new(e.kind(), format!("{}: {e}", source.display())));
    }
    Err(Error::new(
        ErrorKind::InvalidInput,
        format!(
            "{}: neither a folder nor a .tar / .tar.gz / .tgz file",
            source.display()
        ),
    ))
}

fn image(client: &Client, json: bool, cmd: &ImageCommand) -> Result<u8, ClientError> {
    let v: serde_json::Value = match cmd {
        ImageCommand::Import {
            name,
            source,
            replace,
        } => {
            // dropctl reads the bundle with the caller's own rights and sends its bytes: the
            // daemon never opens a path on anyone's behalf.
            let bytes = bundle_bytes(source).map_err(|e| ClientError::Local(e.to_string()))?;
            client.put_bytes(&format!("/v1/images/{name}?replace={replace}"), bytes)?
        }
        ImageCommand::Ls => client.get("/v1/images")?,
        ImageCommand::Rm { name } => client.delete(&format!("/v1/images/{name}"))?,
    };
    if json {
        print_json(&v);
        return Ok(0);
    }
    match cmd {
        ImageCommand::Import { name, .. } => {
            println!(
                "image {name} installed at {} ({} files, {} bytes)",
                v["path"].as_str().unwrap_or("?"),
                v["files"],
                v["bytes"]
            );
        }
        ImageCommand::Ls => {
            println!("{:<32} {:>8} {:>12} PATH", "IMAGE", "FILES", "BYTES");
            for i in v.as_array().into_iter().flatten() {
                println!(
                    "{:<32} {:>8} {:>12} {}",
                    i["name"].as_str().unwrap_or("?"),
                    i["files"].to_string(),
                    i["bytes"].to_string(),
                    i["path"].as_str().unwrap_or("?")
                );
            }
        }
        ImageCommand::Rm { name } => println!("image {name} removed"),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_time_formats_known_instants() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00.000Z");
        // 2000-02-29 (a leap day in a century leap year) 12:34:56.789
        assert_eq!(utc_time(951_827_696_789), "2000-02-29 12:34:56.789Z");
        assert_eq!(utc_time(1_796_515_200_000), "2026-12-06 00:00:00.000Z");
    }
}
