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
    /// Check a configuration file and print what it describes.
    CheckConfig {
        /// Node configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Bring up a working export on file-backed members in DIR, print its URI, and write
    /// DIR/demo.json for scripts. Ctrl-C stops it cleanly.
    Demo {
        /// Directory for the member files, configuration and demo.json (on a filesystem that
        /// takes O_DIRECT, such as ext4 or xfs).
        #[arg(long, default_value = "/var/tmp/hapair-demo")]
        dir: PathBuf,
        /// Size of each of the five members, in MiB.
        #[arg(long, default_value_t = 256)]
        member_mib: u64,
        /// TCP port of the export on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 10809)]
        port: u16,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn wait_for_signal() -> Result<i32> {
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
        .context("installing signal handlers")?;
    Ok(signals.forever().next().unwrap_or(libc::SIGTERM))
}

fn format(config: &Path, only: Option<&str>, force: bool) -> Result<()> {
    let cfg = Config::load(config)?;
    let targets: Vec<_> = cfg.aggregate.iter().filter(|a| only.is_none_or(|n| n == a.name)).collect();
    if targets.is_empty() {
        bail!("{}: no aggregate named {:?}", config.display(), only.unwrap_or(""));
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
            label.data_bytes * a.data.len() as u64 >> 20
        );
    }
    Ok(())
}

fn serve(cfg: Config, on_ready: impl FnOnce(&Node) -> Result<()>) -> Result<()> {
    let node = Node::start(cfg)?;
    if node.served.is_empty() {
        bail!("node {} has no export to serve (no aggregate with home = {:?} has an export)", node.config.node, node.config.node);
    }
    on_ready(&node)?;
    let sig = wait_for_signal()?;
    tracing::info!(signal = sig, "stopping: draining exports");
    node.stop(Duration::from_secs(10));
    Ok(())
}

fn demo(dir: &Path, member_mib: u64, port: u16) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let names = ["d0", "d1", "d2", "d3", "p"];
    for n in names {
        let p = dir.join(format!("{n}.img"));
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p)?;
        if f.metadata()?.len() < member_mib << 20 {
            f.set_len(member_mib << 20)?;
        }
    }
    let member = |n: &str| format!("\"{}\"", dir.join(format!("{n}.img")).display());
    let unix = dir.join("aggr0.sock");
    let text = format!(
        "# written by hapaird demo\nnode = \"a\"\n\n[io]\nengine = \"io_uring\"\narena_mib = 64\n\n\
         [[aggregate]]\nname = \"aggr0\"\nhome = \"a\"\ndata = [{}]\nparity = {}\nchunk_kib = 64\n\
         nvram = \"{}\"\nnvram_mib = 64\n\n\
         [[export]]\nname = \"aggr0\"\naggregate = \"aggr0\"\nlisten = \"127.0.0.1:{port}\"\nunix = \"{}\"\n",
        names[..4].iter().map(|n| member(n)).collect::<Vec<_>>().join(", "),
        member("p"),
        dir.join("aggr0.nvlog").display(),
        unix.display()
    );
    let cfg_path = dir.join("a.toml");
    std::fs::write(&cfg_path, text)?;
    let cfg = Config::load(&cfg_path)?;
    let a = &cfg.aggregate[0];
    match setup::format(a, &cfg.io, false, &mut progress_printer("format aggr0".into())) {
        Ok(_) => eprintln!("formatted new aggregate aggr0 on {}", dir.display()),
        Err(setup::SetupError::Labelled { .. }) => eprintln!("reusing aggregate aggr0 on {}", dir.display()),
        Err(e) => return Err(e.into()),
    }
    let _ = std::fs::remove_file(&unix);
    let json_path = dir.join("demo.json");
    serve(cfg, |node| {
        let s = &node.served[0];
        let doc = serde_json::json!({
            "nodes": [{
                "name": node.config.node,
                "pid": std::process::id(),
                "config": cfg_path,
                "exports": [{
                    "name": s.export,
                    "aggregate": s.aggregate,
                    "uri": s.uri(),
                    "unix_uri": format!("nbd+unix:///{}?socket={}", s.export, unix.display()),
                    "tcp": s.tcp.map(|a| a.to_string()),
                    "unix": unix,
                }],
                "aggregates": node.aggregates.iter().map(|a| a.status()).collect::<Vec<_>>(),
            }]
        });
        let tmp = dir.join("demo.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)?;
        std::fs::rename(&tmp, &json_path)?;
        println!("{}", s.uri());
        eprintln!("hapair demo: export aggr0 at {} (and {}); try: nbdinfo {}", s.uri(), unix.display(), s.uri());
        eprintln!("details in {}; Ctrl-C stops", json_path.display());
        Ok(())
    })?;
    let _ = std::fs::remove_file(&json_path);
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    let r = match cli.cmd {
        Cmd::Format { config, aggregate, force } => format(&config, aggregate.as_deref(), force),
        Cmd::Run { config } => Config::load(&config).map_err(Into::into).and_then(|c| serve(c, |_| Ok(()))),
        Cmd::CheckConfig { config } => Config::load(&config).map(|c| {
            println!("{}: ok: node {}, {} aggregate(s), {} export(s)", config.display(), c.node, c.aggregate.len(), c.export.len());
        }).map_err(Into::into),
        Cmd::Demo { dir, member_mib, port } => demo(&dir, member_mib, port),
    };
    if let Err(e) = r {
        eprintln!("hapaird: error: {e:#}");
        std::process::exit(1);
    }
}
