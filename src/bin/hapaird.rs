//! hapaird: the hapair node daemon.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hapair::config::Config;
use hapair::daemon::node::{progress_printer, Node};
use hapair::daemon::setup;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// High-availability block storage node: RAID-4 over io_uring, exported over NBD.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Initialise the aggregates of a configuration file (all, or the one named).
    Format {
        /// Node configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Only this aggregate.
        #[arg(long)]
        aggregate: Option<String>,
        /// Overwrite members that already carry a hapair label.
        #[arg(long)]
        force: bool,
    },
    /// Serve this node's aggregates over NBD until SIGINT or SIGTERM, then drain and stop.
    Run {
        /// Node configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Remove this node's service addresses from its interfaces (for systemd's ExecStopPost:
    /// a daemon that died must not leave addresses that block the partner's takeover).
    ReleaseAddresses {
        /// Node configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a configuration file and print what it describes. In a pair, systemd's
    /// watchdog is checked against the pair's timers too: the `WatchdogSec=` of `--unit`, else
    /// `$WATCHDOG_USEC` if set (as `hapaird run` sees it under systemd).
    CheckConfig {
        /// Node configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The systemd unit that runs hapaird (e.g. /etc/systemd/system/hapaird.service), for
        /// its WatchdogSec= (drop-ins are not read).
        #[arg(long, value_name = "FILE")]
        unit: Option<PathBuf>,
    },
    /// Bring up a pair of nodes on file-backed members in DIR (each home to one aggregate, an
    /// interconnect and service addresses on loopback), print the export URIs, and write
    /// DIR/demo.json for scripts. Ctrl-C stops both cleanly.
    Demo {
        /// Directory for the member files, configuration and demo.json (on a filesystem that
        /// takes O_DIRECT, such as ext4 or xfs).
        #[arg(long, default_value = "/var/tmp/hapair-demo")]
        dir: PathBuf,
        /// Size of each member (five per node), in MiB.
        #[arg(long, default_value_t = 128)]
        member_mib: u64,
        /// TCP port of the exports on their service addresses 127.0.0.10 (node a) and
        /// 127.0.0.11 (node b); 0 picks a free one.
        #[arg(long, default_value_t = 10809)]
        port: u16,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn wait_for_signal() -> Result<i32> {
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
        .context("installing signal handlers")?;
    Ok(signals.forever().next().unwrap_or(libc::SIGTERM))
}

fn format(config: &Path, only: Option<&str>, force: bool) -> Result<()> {
    let cfg = Config::load(config)?;
    let targets: Vec<_> = cfg
        .aggregate
        .iter()
        .filter(|a| only.is_none_or(|n| n == a.name))
        .collect();
    if targets.is_empty() {
        bail!(
            "{}: no aggregate named {:?}",
            config.display(),
            only.unwrap_or("")
        );
    }
    for a in targets {
        let mut p = progress_printer(format!("format {}", a.name));
        let label = setup::format(a, &cfg.io, force, &mut p)?;
        println!(
            "formatted aggregate {} ({}): {} data + 1 parity, chunk {} KiB, {} MiB usable",
            a.name,
            hapair::core::label::uuid_string(&label.aggregate_uuid),
            a.data.len(),
            a.chunk_kib,
            (label.data_bytes * a.data.len() as u64) >> 20
        );
    }
    Ok(())
}

fn serve(cfg: Config, on_ready: impl FnOnce(&Node) -> Result<()>) -> Result<()> {
    let node = Node::start(cfg)?;
    if node.served.is_empty() {
        bail!(
            "node {} has no export to serve (no aggregate with home = {:?} has an export)",
            node.config.node,
            node.config.node
        );
    }
    on_ready(&node)?;
    let sig = wait_for_signal()?;
    tracing::info!(signal = sig, "stopping: draining exports");
    node.stop(Duration::from_secs(10));
    Ok(())
}

fn run_pair(cfg: Config) -> Result<()> {
    let node = cfg.node.clone();
    let rt = hapair::daemon::pair::PairRuntime::start(cfg)
        .map_err(|e| anyhow::anyhow!("node {node}: {e}"))?;
    let sig = wait_for_signal()?;
    tracing::info!(signal = sig, "stopping");
    rt.stop();
    Ok(())
}

fn free_port(ip: [u8; 4]) -> Result<u16> {
    Ok(
        std::net::TcpListener::bind((std::net::Ipv4Addr::from(ip), 0))?
            .local_addr()?
            .port(),
    )
}

/// The demo pair: two nodes, each home to a 4+1 aggregate on file-backed members in DIR, an
/// interconnect on loopback, and one loopback service address per node's export.
fn demo(dir: &Path, member_mib: u64, port: u16) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let port = if port == 0 {
        free_port([127, 0, 0, 10])?
    } else {
        port
    };
    let ic_port = free_port([127, 0, 0, 1])?;
    let key = dir.join("interconnect.key");
    if !key.exists() {
        let k: [u8; 32] = rand::random();
        std::fs::write(
            &key,
            k.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        )?;
    }
    let mut files = Vec::new();
    for node in ["a", "b"] {
        std::fs::create_dir_all(dir.join(node))?;
        for m in ["d0", "d1", "d2", "d3", "p"] {
            let p = dir.join(format!("disk-{node}-{m}.img"));
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)?;
            if f.metadata()?.len() < member_mib << 20 {
                f.set_len(member_mib << 20)?;
            }
            files.push(p);
        }
    }
    let q = |p: &Path| format!("\"{}\"", p.display());
    let members = |node: &str| -> (String, String) {
        let d = ["d0", "d1", "d2", "d3"]
            .iter()
            .map(|m| q(&dir.join(format!("disk-{node}-{m}.img"))))
            .collect::<Vec<_>>()
            .join(", ");
        (d, q(&dir.join(format!("disk-{node}-p.img"))))
    };
    let svc = |node: &str| {
        if node == "a" {
            "127.0.0.10"
        } else {
            "127.0.0.11"
        }
    };
    let mut cfgs = Vec::new();
    for (node, partner) in [("a", "b"), ("b", "a")] {
        let mut text = format!(
            "# written by hapaird demo\nnode = \"{node}\"\n\n[io]\nengine = \"io_uring\"\narena_mib = 32\nworkers = 64\n\n\
             [pair]\npartner = \"{partner}\"\ninterconnect_listen = \"127.0.0.1:{ic_port}\"\npartner_interconnect = [\"127.0.0.1:{ic_port}\"]\n\
             key_file = {}\ncontrol_socket = {}\nheartbeat_ms = 100\ninterconnect_timeout_ms = 2000\nmailbox_timeout_ms = 4000\ncountdown_ms = 10000\n",
            q(&key),
            q(&dir.join(format!("{node}.sock"))),
        );
        for owner in ["a", "b"] {
            let (d, p) = members(owner);
            let log = if owner == node {
                format!("aggr-{owner}.nvlog")
            } else {
                format!("aggr-{owner}.mirror")
            };
            text += &format!(
                "\n[[aggregate]]\nname = \"aggr-{owner}\"\nhome = \"{owner}\"\ndata = [{d}]\nparity = {p}\nchunk_kib = 64\nnvram = {}\nnvram_mib = 32\ncp_interval_ms = 500\n",
                q(&dir.join(node).join(log))
            );
            text += &format!(
                "\n[[export]]\nname = \"aggr-{owner}\"\naggregate = \"aggr-{owner}\"\nlisten = \"{}:{port}\"\nservice_addrs = [\"{}/32\"]\nservice_interface = \"lo\"\n",
                svc(owner),
                svc(owner)
            );
        }
        let path = dir.join(format!("{node}.toml"));
        std::fs::write(&path, text)?;
        cfgs.push(path);
    }
    for cfg_path in &cfgs[..1] {
        let cfg = Config::load(cfg_path)?;
        for a in &cfg.aggregate {
            match setup::format(
                a,
                &cfg.io,
                false,
                &mut progress_printer(format!("format {}", a.name)),
            ) {
                Ok(_) => eprintln!("formatted new aggregate {} in {}", a.name, dir.display()),
                Err(setup::SetupError::Labelled { .. }) => {
                    eprintln!("reusing aggregate {} in {}", a.name, dir.display())
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for (node, cfg_path) in ["a", "b"].iter().zip(&cfgs) {
        let log = std::fs::File::create(dir.join(format!("{node}.log")))?;
        let mut cmd = std::process::Command::new(&exe);
        // The nodes stop with the demo, even when the demo itself is killed.
        // SAFETY: prctl is async-signal-safe and touches only the child being started.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .args(["run", "--config"])
            .arg(cfg_path)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {node}"))?;
        children.push((node.to_string(), child));
    }
    let stop_children = |children: &mut Vec<(String, std::process::Child)>| {
        for (_, c) in children.iter() {
            // SAFETY: signalling our own children.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for (n, c) in children.iter_mut() {
            let st = c.wait();
            eprintln!("node {n} stopped: {st:?}");
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for node in ["a", "b"] {
        while std::net::TcpStream::connect((svc(node), port)).is_err() {
            if std::time::Instant::now() > deadline {
                stop_children(&mut children);
                bail!(
                    "node {node} did not serve its export within 60 s: see {}",
                    dir.join(format!("{node}.log")).display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let json_path = dir.join("demo.json");
    let nodes: Vec<serde_json::Value> = ["a", "b"]
        .iter()
        .zip(&cfgs)
        .zip(&children)
        .map(|((node, cfg_path), (_, child))| {
            serde_json::json!({
                "name": node,
                "pid": child.id(),
                "config": cfg_path,
                "control_socket": dir.join(format!("{node}.sock")),
                "log": dir.join(format!("{node}.log")),
                "exports": [{
                    "name": format!("aggr-{node}"),
                    "aggregate": format!("aggr-{node}"),
                    "uri": format!("nbd://{}:{port}/aggr-{node}", svc(node)),
                    "service_addr": svc(node),
                }],
            })
        })
        .collect();
    let doc = serde_json::json!({ "nodes": nodes, "interconnect": format!("127.0.0.1:{ic_port}") });
    let tmp = dir.join("demo.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)?;
    std::fs::rename(&tmp, &json_path)?;
    for node in ["a", "b"] {
        println!("nbd://{}:{port}/aggr-{node}", svc(node));
    }
    eprintln!("hapair demo: a pair of nodes, each serving its aggregate:");
    eprintln!(
        "  node a: nbd://{}:{port}/aggr-a   control: takeoverctl --socket {} status",
        svc("a"),
        dir.join("a.sock").display()
    );
    eprintln!(
        "  node b: nbd://{}:{port}/aggr-b   control: takeoverctl --socket {} status",
        svc("b"),
        dir.join("b.sock").display()
    );
    eprintln!(
        "  try: takeoverctl --socket {} takeover --of b   (then: giveback)",
        dir.join("a.sock").display()
    );
    eprintln!(
        "  logs: {}/a.log, {}/b.log; details in {}; Ctrl-C stops both",
        dir.display(),
        dir.display(),
        json_path.display()
    );
    let _ = wait_for_signal()?;
    stop_children(&mut children);
    let _ = std::fs::remove_file(&json_path);
    Ok(())
}

fn check_config(config: &Path, unit: Option<&Path>) -> Result<()> {
    let c = Config::load(config)?;
    // The watchdog the daemon would run with: the unit's, else the environment's.
    let watchdog = match unit {
        Some(u) => {
            let text = std::fs::read_to_string(u)
                .with_context(|| format!("reading unit {}", u.display()))?;
            hapair::config::unit_watchdog_usec(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", u.display()))?
                .map(|usec| (usec, format!("WatchdogSec= of {}", u.display())))
        }
        None => std::env::var("WATCHDOG_USEC")
            .ok()
            .map(|v| {
                v.parse::<u64>()
                    .with_context(|| format!("WATCHDOG_USEC={v:?} is not a number"))
            })
            .transpose()?
            .filter(|u| *u > 0)
            .map(|usec| (usec, "$WATCHDOG_USEC".to_string())),
    };
    if let (Some(p), Some((usec, from))) = (&c.pair, &watchdog) {
        p.check_watchdog(*usec)
            .map_err(|e| anyhow::anyhow!("{}: {e} (watchdog from {from})", config.display()))?;
    }
    println!(
        "{}: ok: node {}, {} aggregate(s), {} export(s)",
        config.display(),
        c.node,
        c.aggregate.len(),
        c.export.len()
    );
    if let Some(p) = &c.pair {
        match &watchdog {
            Some((usec, from)) => println!(
                "watchdog {} ms ({from}) fits: at least 2 x heartbeat_ms ({} ms), at most the self-fence bound ({} ms, half of mailbox_timeout_ms)",
                usec.div_ceil(1000),
                2 * p.heartbeat_ms,
                p.self_fence_bound_ms()
            ),
            None => println!(
                "watchdog not checked: give --unit FILE (WatchdogSec= must lie in {}..={} ms)",
                2 * p.heartbeat_ms,
                p.self_fence_bound_ms()
            ),
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    let r = match cli.cmd {
        Cmd::Format {
            config,
            aggregate,
            force,
        } => format(&config, aggregate.as_deref(), force),
        Cmd::Run { config } => Config::load(&config).map_err(Into::into).and_then(|c| {
            if c.pair.is_some() {
                run_pair(c)
            } else {
                serve(c, |_| Ok(()))
            }
        }),
        Cmd::ReleaseAddresses { config } => {
            Config::load(&config).map_err(Into::into).and_then(|c| {
                if c.pair.is_none() {
                    return Ok(());
                }
                let node =
                    hapair::daemon::pair::PairNode::new(c).map_err(|e| anyhow::anyhow!(e))?;
                for w in [
                    hapair::daemon::pair::Whose::Own,
                    hapair::daemon::pair::Whose::Partner,
                ] {
                    node.release_ips(w).map_err(|e| anyhow::anyhow!(e))?;
                }
                Ok(())
            })
        }
        Cmd::CheckConfig { config, unit } => check_config(&config, unit.as_deref()),
        Cmd::Demo {
            dir,
            member_mib,
            port,
        } => demo(&dir, member_mib, port),
    };
    if let Err(e) = r {
        eprintln!("hapaird: error: {e:#}");
        std::process::exit(1);
    }
}
