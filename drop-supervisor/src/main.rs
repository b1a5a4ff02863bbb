//! `drop-supervisor`: the DROP node daemon. Parses arguments, installs logging, runs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use drop_supervisor::{config::Config, daemon, host::logging};

/// The DROP node daemon: runs functions and services on this node and serves the control API
/// on a Unix socket (see `dropctl`).
#[derive(Debug, Parser)]
#[command(name = "drop-supervisor", version = drop_supervisor::VERSION)]
struct Args {
    /// Config file (TOML). Default: /etc/drop/drop.toml if it exists, else built-in defaults.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the config file and exit: 0 when valid, 1 with the error otherwise.
    #[arg(long)]
    check_config: bool,
    /// Remove every floating IP a daemon of this host added (addresses carrying DROP's mark) and
    /// exit; for the unit's `ExecStopPost=`, after a crash or SIGKILL. Needs no config.
    #[arg(long)]
    release_vip: bool,
}

fn main() -> ExitCode {
    let started = Instant::now();
    let args = Args::parse();
    match run(args, started) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging may not be up yet (config errors), so the chain goes to stderr as well.
            tracing::error!("{e:#}");
            eprintln!("drop-supervisor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args, started: Instant) -> anyhow::Result<()> {
    if args.release_vip {
        let gone = daemon::release_vip().context("releasing floating IPs")?;
        for v in &gone {
            println!("removed {}/{} from {}", v.addr, v.prefix, v.ifname);
        }
        if gone.is_empty() {
            println!("no floating IP to remove");
        }
        // The balancer this daemon left attached stops balancing: another node holds the VIP
        // now. Its pin folder from the config, else the default.
        let pins = Config::load(args.config.as_deref())
            .map(|c| c.balancer_pin_dir)
            .unwrap_or_else(|_| PathBuf::from(drop_supervisor::config::DEFAULT_BALANCER_PIN_DIR));
        match drop_net::Balancer::standby_pinned(&pins) {
            Ok(addrs) if !addrs.is_empty() => {
                println!("balancer in {}: {addrs:?} in standby", pins.display());
            }
            Ok(_) => {}
            Err(e) => eprintln!("balancer in {}: cannot set standby: {e}", pins.display()),
        }
        return Ok(());
    }
    let config = Config::load(args.config.as_deref())?;
    if args.check_config {
        println!(
            "config ok: {}",
            config
                .path
                .as_ref()
                .map_or("(defaults)".into(), |p| p.display().to_string())
        );
        return Ok(());
    }
    logging::init(&config.log_level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("drop-supervisor")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon::run(config, started))?;
    Ok(())
}
