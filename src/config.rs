//! The node's configuration: one TOML file parsed once into a validated [`Config`].
//!
//! ```toml
//! node = "a"                      # this node's name
//!
//! [io]
//! engine = "io_uring"             # or "sync" (pread/pwrite; for comparison and debugging)
//! ring_entries = 256              # submission queue slots per ring
//! arena_mib = 128                 # registered buffer memory shared by the rings
//! max_request_kib = 4096          # largest request served in one piece
//! workers = 64                    # NBD worker threads per export (one ring each)
//!
//! [[aggregate]]
//! name = "aggr0"
//! home = "a"                      # the node that serves it when both are up
//! data = ["/dev/sdb", "/dev/sdc", "/dev/sdd", "/dev/sde"]
//! parity = "/dev/sdf"
//! chunk_kib = 64
//! nvram = "/var/lib/hapair/aggr0.nvlog"   # where this node keeps the aggregate's write log:
//!                                 # its own log when home = node, else the partner's mirror
//! nvram_mib = 64                  # log size (the same on both nodes)
//! cp_interval_ms = 1000           # consistency point at least this often
//! nvram_flush = "client"          # when a file log's device cache is flushed: on the client's
//!                                 # NBD FLUSH/FUA ("client", like any disk) or "every-commit"
//!
//! [[export]]
//! name = "aggr0"
//! aggregate = "aggr0"
//! listen = "192.0.2.10:10809"     # TCP address (the aggregate's service address)
//! unix = "/run/hapair/aggr0.sock" # optional Unix socket
//! service_addrs = ["192.0.2.10/24"]  # addresses that move with the export at takeover
//! service_interface = "eth0"
//!
//! [pair]                          # optional: without it the node runs alone
//! partner = "b"
//! interconnect_listen = "198.51.100.1:7700"      # where this node accepts the interconnect
//! partner_interconnect = ["198.51.100.2:7700"]   # the partner's interconnect address(es)
//! key_file = "/etc/hapair/interconnect.key"      # pre-shared key, at least 16 bytes
//! control_socket = "/run/hapair/hapaird.sock"
//! heartbeat_ms = 200
//! interconnect_timeout_ms = 1000
//! mailbox_timeout_ms = 3000         # at least 4 x heartbeat_ms (self-fence after half of it)
//! countdown_ms = 30000
//! auto_giveback = false
//! holddown_ms = 300000            # no operator takeover this soon after a giveback
//! ```
//!
//! In a pair, both nodes list both aggregates: the one whose `home` is this node is served
//! here; the partner's is opened here only during a takeover, and its `nvram` is where this
//! node keeps the mirror of the partner's log.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why a configuration was refused. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {key}: {why}")]
    Invalid {
        file: PathBuf,
        key: String,
        why: String,
    },
}

/// Which I/O engine drives the members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum EngineKind {
    /// io_uring: one ring per worker thread, registered files and buffers.
    #[serde(rename = "io_uring")]
    IoUring,
    /// Plain pread/pwrite.
    #[serde(rename = "sync")]
    Sync,
}

/// `[io]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoConfig {
    #[serde(default = "default_engine")]
    pub engine: EngineKind,
    #[serde(default = "default_ring_entries")]
    pub ring_entries: u32,
    #[serde(default = "default_arena_mib")]
    pub arena_mib: usize,
    #[serde(default = "default_max_request_kib")]
    pub max_request_kib: u32,
    #[serde(default = "default_workers")]
    pub workers: usize,
}

fn default_engine() -> EngineKind {
    EngineKind::IoUring
}
fn default_ring_entries() -> u32 {
    256
}
fn default_arena_mib() -> usize {
    128
}
fn default_max_request_kib() -> u32 {
    4096
}
fn default_workers() -> usize {
    64
}

impl Default for IoConfig {
    fn default() -> IoConfig {
        IoConfig {
            engine: default_engine(),
            ring_entries: default_ring_entries(),
            arena_mib: default_arena_mib(),
            max_request_kib: default_max_request_kib(),
            workers: default_workers(),
        }
    }
}

/// `[[aggregate]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    pub name: String,
    pub home: String,
    pub data: Vec<PathBuf>,
    pub parity: PathBuf,
    #[serde(default = "default_chunk_kib")]
    pub chunk_kib: u64,
    /// NVRAM log file (or DAX device file). Without it writes go straight to the members.
    pub nvram: Option<PathBuf>,
    #[serde(default = "default_nvram_mib")]
    pub nvram_mib: u64,
    #[serde(default = "default_cp_interval_ms")]
    pub cp_interval_ms: u64,
    /// When the device cache under a file NVRAM log is flushed (a DAX log has none).
    #[serde(default)]
    pub nvram_flush: NvramFlush,
}

/// `nvram_flush`: every group commit writes the log back to its device before the writes are
/// acknowledged; this says when the device's volatile cache is flushed too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NvramFlush {
    /// When a client asks (NBD FLUSH, or a write with FUA): the contract of any disk.
    #[default]
    Client,
    /// On every group commit: acknowledged writes survive a power loss without a FLUSH.
    EveryCommit,
}

fn default_nvram_mib() -> u64 {
    64
}
fn default_cp_interval_ms() -> u64 {
    1000
}

fn default_chunk_kib() -> u64 {
    64
}

impl AggregateConfig {
    /// Members in order: data members, then parity.
    pub fn members(&self) -> Vec<PathBuf> {
        self.data
            .iter()
            .cloned()
            .chain([self.parity.clone()])
            .collect()
    }
}

/// `[[export]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub name: String,
    pub aggregate: String,
    #[serde(default)]
    pub description: String,
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    /// Addresses (with prefix length) that move with this export at takeover.
    #[serde(default)]
    pub service_addrs: Vec<String>,
    /// Interface the service addresses live on.
    pub service_interface: Option<String>,
}

/// `[pair]`: the partner and the interconnect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairConfig {
    pub partner: String,
    pub interconnect_listen: Option<SocketAddr>,
    #[serde(default)]
    pub partner_interconnect: Vec<SocketAddr>,
    pub key_file: PathBuf,
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_ic_timeout_ms")]
    pub interconnect_timeout_ms: u64,
    #[serde(default = "default_mailbox_timeout_ms")]
    pub mailbox_timeout_ms: u64,
    #[serde(default = "default_countdown_ms")]
    pub countdown_ms: u64,
    #[serde(default)]
    pub auto_giveback: bool,
    /// After a giveback, operator takeovers are refused for this long (ping-pong guard).
    #[serde(default = "default_holddown_ms")]
    pub holddown_ms: u64,
    /// TEST ONLY: take over without any fence. Never in production.
    #[serde(default)]
    pub unsafe_skip_fence: bool,
    /// Where the members have SCSI-3 persistent reservations: how a takeover removes the
    /// partner's key. `"preempt-and-abort"` (default: the partner's queued writes are aborted
    /// too) or `"preempt"` (for targets that cannot abort, e.g. LIO behind tcm_loop; LIO over
    /// iSCSI aborts fine).
    #[serde(default)]
    pub fence_preempt: crate::core::fence::PreemptAction,
}

impl PairConfig {
    /// How long this node may go without writing its mailbox slot to a majority of members
    /// before it halts itself: half of `mailbox_timeout_ms` (the partner waits the whole of it
    /// before a takeover).
    pub fn self_fence_bound_ms(&self) -> u64 {
        self.mailbox_timeout_ms / 2
    }

    /// Check systemd's watchdog (`WatchdogSec=` of the unit; `$WATCHDOG_USEC` in the daemon)
    /// against the pair's timers. The HA loop pings it every `WatchdogSec / 2`, on its tick.
    /// - Longer than the self-fence bound: a node whose HA loop hangs stops its mailbox
    ///   heartbeat (and cannot self-fence: that runs on the loop's tick), but systemd kills it
    ///   only after the partner may already have taken over while it still serves.
    /// - Shorter than twice `heartbeat_ms`: the pings, sent on the loop's tick
    ///   (`heartbeat_ms / 4`), leave no room for one slow turn of the loop, and systemd kills
    ///   a healthy node (a takeover for nothing).
    ///
    /// `0` (no watchdog) passes. The error names both values and the fix.
    pub fn check_watchdog(&self, watchdog_usec: u64) -> Result<(), String> {
        if watchdog_usec == 0 {
            return Ok(());
        }
        let wd_ms = watchdog_usec.div_ceil(1000);
        let bound = self.self_fence_bound_ms();
        if wd_ms > bound {
            return Err(format!(
                "systemd WatchdogSec={wd_ms}ms (WATCHDOG_USEC={watchdog_usec}) is longer than this node's self-fence bound of {bound} ms (half of pair.mailbox_timeout_ms = {} ms): a node whose HA loop hangs would be killed only after its partner may have taken it over. Set WatchdogSec={bound}ms or less in the unit (systemctl edit hapaird), or raise pair.mailbox_timeout_ms to at least {} on both nodes",
                self.mailbox_timeout_ms,
                2 * wd_ms
            ));
        }
        let least = 2 * self.heartbeat_ms;
        if wd_ms < least {
            return Err(format!(
                "systemd WatchdogSec={wd_ms}ms (WATCHDOG_USEC={watchdog_usec}) is shorter than 2 x pair.heartbeat_ms ({least} ms): the HA loop pings the watchdog on its tick and systemd would kill a healthy node. Set WatchdogSec={least}ms or more in the unit (at most {bound}ms, half of pair.mailbox_timeout_ms), or lower pair.heartbeat_ms"
            ));
        }
        Ok(())
    }
}

/// A systemd time span (systemd.time(7)) in microseconds: `1500ms`, `2s`, `1min 30s`, `1.5s`,
/// a bare number of seconds; `infinity` and `0` are None (no watchdog).
pub fn parse_systemd_timespan_usec(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t == "infinity" {
        return Ok(None);
    }
    if t.is_empty() {
        return Err("empty time span".into());
    }
    let mut total: f64 = 0.0;
    let mut rest = t;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let n_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..n_len]
            .parse()
            .map_err(|_| format!("bad time span {t:?}: expected a number at {rest:?}"))?;
        rest = rest[n_len..].trim_start();
        let u_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let mult = match &rest[..u_len] {
            "us" | "usec" => 1.0,
            "ms" | "msec" => 1e3,
            "" | "s" | "sec" | "second" | "seconds" => 1e6,
            "m" | "min" | "minute" | "minutes" => 60e6,
            "h" | "hr" | "hour" | "hours" => 3600e6,
            u => return Err(format!("bad time span {t:?}: unknown unit {u:?}")),
        };
        rest = &rest[u_len..];
        total += n * mult;
    }
    let usec = total.round() as u64;
    Ok((usec > 0).then_some(usec))
}

/// The `WatchdogSec=` of a unit file's text (the last assignment wins, as in systemd; drop-ins
/// are not read): Ok(None) when absent, empty, `0` or `infinity`.
pub fn unit_watchdog_usec(unit_text: &str) -> Result<Option<u64>, String> {
    let mut last = None;
    for line in unit_text.lines() {
        if let Some(v) = line.trim().strip_prefix("WatchdogSec=") {
            last = Some(v.trim().to_string());
        }
    }
    match last.as_deref() {
        None | Some("") => Ok(None),
        Some(v) => parse_systemd_timespan_usec(v).map_err(|e| format!("WatchdogSec: {e}")),
    }
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/hapair/hapaird.sock")
}
fn default_heartbeat_ms() -> u64 {
    200
}
fn default_ic_timeout_ms() -> u64 {
    1000
}
fn default_mailbox_timeout_ms() -> u64 {
    3000
}
fn default_holddown_ms() -> u64 {
    300_000
}
fn default_countdown_ms() -> u64 {
    30_000
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: String,
    #[serde(default)]
    pub io: IoConfig,
    #[serde(default)]
    pub aggregate: Vec<AggregateConfig>,
    #[serde(default)]
    pub export: Vec<ExportConfig>,
    pub pair: Option<PairConfig>,
}

impl Config {
    /// Read, parse and validate a configuration file.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Config::parse(&text, file)
    }

    /// Parse and validate configuration text; `file` is used in messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key: String, why: String| ConfigError::Invalid {
            file: file.to_owned(),
            key,
            why,
        };
        let name_ok = |s: &str, max: usize| {
            !s.is_empty()
                && s.len() <= max
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if !name_ok(&self.node, 31) {
            return Err(bad(
                "node".into(),
                format!("{:?}: 1-31 of [A-Za-z0-9-_.]", self.node),
            ));
        }
        if self.io.ring_entries == 0
            || !self.io.ring_entries.is_power_of_two()
            || self.io.ring_entries > 4096
        {
            return Err(bad(
                "io.ring_entries".into(),
                format!("{} is not a power of two in 1..=4096", self.io.ring_entries),
            ));
        }
        let mrk = self.io.max_request_kib;
        if !(4..=32768).contains(&mrk) || !mrk.is_power_of_two() {
            return Err(bad(
                "io.max_request_kib".into(),
                format!("{mrk} is not a power of two in 4..=32768"),
            ));
        }
        if self.io.workers == 0 || self.io.workers > 1024 {
            return Err(bad(
                "io.workers".into(),
                format!("{} is not in 1..=1024", self.io.workers),
            ));
        }
        if self.io.arena_mib > 65536 {
            return Err(bad(
                "io.arena_mib".into(),
                format!("{} MiB is more than 64 GiB", self.io.arena_mib),
            ));
        }
        // Members and logs by the file they name: `/dev/disk/by-id/...` and `/dev/sdb` are the
        // same disk. Paths that do not exist (yet) are compared as written.
        let mut seen_paths: std::collections::HashMap<PathBuf, (String, PathBuf)> =
            std::collections::HashMap::new();
        for (i, a) in self.aggregate.iter().enumerate() {
            let key = |k: &str| format!("aggregate[{i}] ({}).{k}", a.name);
            if !name_ok(&a.name, 63) {
                return Err(bad(
                    key("name"),
                    format!("{:?}: 1-63 of [A-Za-z0-9-_.]", a.name),
                ));
            }
            if self.aggregate[..i].iter().any(|b| b.name == a.name) {
                return Err(bad(key("name"), "duplicate aggregate name".into()));
            }
            if !name_ok(&a.home, 31) {
                return Err(bad(key("home"), format!("{:?} is not a node name", a.home)));
            }
            if a.data.is_empty() {
                return Err(bad(key("data"), "needs at least one data member".into()));
            }
            if a.chunk_kib < 4 || !a.chunk_kib.is_power_of_two() || a.chunk_kib > 16384 {
                return Err(bad(
                    key("chunk_kib"),
                    format!("{} is not a power of two in 4..=16384", a.chunk_kib),
                ));
            }
            if !(1..=65536).contains(&a.nvram_mib) {
                return Err(bad(
                    key("nvram_mib"),
                    format!("{} is not in 1..=65536", a.nvram_mib),
                ));
            }
            if !(10..=600_000).contains(&a.cp_interval_ms) {
                return Err(bad(
                    key("cp_interval_ms"),
                    format!("{} is not in 10..=600000", a.cp_interval_ms),
                ));
            }
            for p in a.members() {
                if let Some((other, as_written)) =
                    seen_paths.insert(same_file(&p), (a.name.clone(), p.clone()))
                {
                    return Err(bad(
                        key("data/parity"),
                        format!(
                            "{} is listed twice (also in {other}{})",
                            p.display(),
                            also_as(&p, &as_written)
                        ),
                    ));
                }
            }
        }
        // A log must be nobody else's log and no member: two aggregates' logs (this node's own
        // and its mirror of the partner's) in one file overwrite each other.
        let mut seen_logs: std::collections::HashMap<PathBuf, (String, PathBuf)> =
            std::collections::HashMap::new();
        for (i, a) in self.aggregate.iter().enumerate() {
            let Some(n) = &a.nvram else { continue };
            let key = format!("aggregate[{i}] ({}).nvram", a.name);
            let id = same_file(n);
            if let Some((member_of, as_written)) = seen_paths.get(&id) {
                return Err(bad(
                    key,
                    format!(
                        "{} is also a member of {member_of}{}",
                        n.display(),
                        also_as(n, as_written)
                    ),
                ));
            }
            if let Some((other, as_written)) = seen_logs.insert(id, (a.name.clone(), n.clone())) {
                return Err(bad(
                    key,
                    format!(
                        "{} is also the nvram of {other}{}: every aggregate needs its own log file",
                        n.display(),
                        also_as(n, &as_written)
                    ),
                ));
            }
        }
        for (i, e) in self.export.iter().enumerate() {
            let key = |k: &str| format!("export[{i}] ({}).{k}", e.name);
            if e.name.len() > 4096 || e.name.contains('\0') {
                return Err(bad(key("name"), "not a valid NBD export name".into()));
            }
            if self.export[..i].iter().any(|f| f.name == e.name) {
                return Err(bad(key("name"), "duplicate export name".into()));
            }
            if !self.aggregate.iter().any(|a| a.name == e.aggregate) {
                return Err(bad(
                    key("aggregate"),
                    format!("no aggregate named {:?}", e.aggregate),
                ));
            }
            // Each export has its own listener: a second one on the same address fails to bind,
            // at the latest when a takeover serves both aggregates' exports on one node.
            if let Some(l) = e.listen {
                if let Some((j, f)) = self.export[..i]
                    .iter()
                    .enumerate()
                    .find(|(_, f)| f.listen.is_some_and(|m| listen_overlap(l, m)))
                {
                    return Err(bad(
                        key("listen"),
                        format!(
                            "{l} is also the address of export[{j}] ({}){}",
                            f.name,
                            match f.listen {
                                Some(m) if m != l => format!(" ({m})"),
                                _ => String::new(),
                            }
                        ),
                    ));
                }
            }
            if let Some(u) = &e.unix {
                if let Some((j, f)) = self.export[..i].iter().enumerate().find(|(_, f)| {
                    f.unix
                        .as_ref()
                        .is_some_and(|v| same_file(v) == same_file(u))
                }) {
                    return Err(bad(
                        key("unix"),
                        format!(
                            "{} is also the socket of export[{j}] ({})",
                            u.display(),
                            f.name
                        ),
                    ));
                }
            }
            if e.listen.is_none() && e.unix.is_none() {
                return Err(bad(
                    key("listen"),
                    "an export needs listen, unix, or both".into(),
                ));
            }
            for a in &e.service_addrs {
                if a.parse::<crate::core::netlink::IpPrefix>().is_err() {
                    return Err(bad(
                        key("service_addrs"),
                        format!("{a:?} is not ADDRESS/PREFIX"),
                    ));
                }
            }
            if !e.service_addrs.is_empty() && e.service_interface.is_none() {
                return Err(bad(
                    key("service_interface"),
                    "service_addrs need a service_interface".into(),
                ));
            }
        }
        if let Some(p) = &self.pair {
            if !name_ok(&p.partner, 31) || p.partner == self.node {
                return Err(bad(
                    "pair.partner".into(),
                    format!(
                        "{:?} is not a partner name (and must differ from node)",
                        p.partner
                    ),
                ));
            }
            if crate::core::fence::node_key(&p.partner) == crate::core::fence::node_key(&self.node)
            {
                return Err(bad(
                    "pair.partner".into(),
                    format!(
                        "{:?} and {:?} derive the same reservation key: rename one",
                        p.partner, self.node
                    ),
                ));
            }
            let me_first = self.node < p.partner;
            if me_first && p.partner_interconnect.is_empty() {
                return Err(bad(
                    "pair.partner_interconnect".into(),
                    "node that sorts first dials the partner: list its address(es)".into(),
                ));
            }
            if !me_first && p.interconnect_listen.is_none() {
                return Err(bad(
                    "pair.interconnect_listen".into(),
                    "node that sorts second accepts the interconnect: give its address".into(),
                ));
            }
            if !(10..=10_000).contains(&p.heartbeat_ms)
                || p.interconnect_timeout_ms < 2 * p.heartbeat_ms
            {
                return Err(bad(
                    "pair.heartbeat_ms".into(),
                    "heartbeat_ms in 10..=10000 and interconnect_timeout_ms at least twice it"
                        .into(),
                ));
            }
            // The node fences itself after half of mailbox_timeout_ms without a heartbeat on a
            // majority of members (the partner waits the whole of it before a takeover). That
            // half must span at least two heartbeat writes, or one slow mailbox write halts a
            // healthy node; and the partner needs a few reads to see the counter stop.
            if p.mailbox_timeout_ms < 4 * p.heartbeat_ms {
                return Err(bad(
                    "pair.mailbox_timeout_ms".into(),
                    format!(
                        "{} is less than 4 x heartbeat_ms ({}): the self-fence bound (half of it) must span at least two mailbox heartbeats",
                        p.mailbox_timeout_ms,
                        4 * p.heartbeat_ms
                    ),
                ));
            }
            if !(1..=crate::core::control::MAX_COUNTDOWN_MS).contains(&p.countdown_ms) {
                return Err(bad(
                    "pair.countdown_ms".into(),
                    format!(
                        "{} is not in 1..={}: the node taken over needs time for its graceful shutdown",
                        p.countdown_ms,
                        crate::core::control::MAX_COUNTDOWN_MS
                    ),
                ));
            }
            for (i, a) in self.aggregate.iter().enumerate() {
                if a.home != self.node && a.home != p.partner {
                    return Err(bad(
                        format!("aggregate[{i}] ({}).home", a.name),
                        format!("{:?} is neither {} nor {}", a.home, self.node, p.partner),
                    ));
                }
                if a.nvram.is_none() {
                    return Err(bad(
                        format!("aggregate[{i}] ({}).nvram", a.name),
                        "in a pair every aggregate needs its log (own) or mirror (partner's)"
                            .into(),
                    ));
                }
            }
            for who in [&self.node, &p.partner] {
                let n = self.aggregate.iter().filter(|a| &a.home == who).count();
                if n != 1 {
                    return Err(bad(
                        "aggregate".into(),
                        format!(
                            "a pair needs exactly one aggregate with home = {who:?} (found {n})"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The aggregate named `name`.
    pub fn aggregate(&self, name: &str) -> Option<&AggregateConfig> {
        self.aggregate.iter().find(|a| a.name == name)
    }
}

/// What a path names, for comparing configured paths: the canonical path when it exists
/// (symbolic links such as `/dev/disk/by-id/...` resolved), else the path as written.
fn same_file(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// " (as /dev/sdb)" when a clash was written differently the other time.
fn also_as(p: &Path, other: &Path) -> String {
    if p == other {
        String::new()
    } else {
        format!(" as {}", other.display())
    }
}

/// Two listen addresses that cannot both be bound: equal, or one port on the wildcard
/// address and a specific address of the same family.
fn listen_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node = "a"
[io]
engine = "sync"
[[aggregate]]
name = "aggr0"
home = "a"
data = ["/dev/loop0", "/dev/loop1"]
parity = "/dev/loop2"
[[export]]
name = "aggr0"
aggregate = "aggr0"
listen = "127.0.0.1:10809"
"#;

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD, Path::new("t.toml")).unwrap();
        assert_eq!(c.io.engine, EngineKind::Sync);
        assert_eq!(c.io.ring_entries, 256);
        assert_eq!(c.aggregate[0].chunk_kib, 64);
        assert_eq!(c.aggregate[0].members().len(), 3);
        assert_eq!(c.export[0].listen.unwrap().port(), 10809);
    }

    #[test]
    fn bad_configs_name_the_key_and_file() {
        let cases = [
            (
                GOOD.replace("engine = \"sync\"", "engine = \"aio\""),
                "engine",
            ),
            (
                GOOD.replace("node = \"a\"", "node = \"a\"\ncolour = 1"),
                "colour",
            ),
            (
                GOOD.replace("[io]", "[io]\nring_entries = 100"),
                "io.ring_entries",
            ),
            (
                GOOD.replace("home = \"a\"", "home = \"a\"\nchunk_kib = 6"),
                "chunk_kib",
            ),
            (
                GOOD.replace("parity = \"/dev/loop2\"", "parity = \"/dev/loop1\""),
                "listed twice",
            ),
            (
                GOOD.replace("aggregate = \"aggr0\"", "aggregate = \"nope\""),
                "no aggregate named",
            ),
            (
                GOOD.replace("listen = \"127.0.0.1:10809\"", "listen = \"localhost\""),
                "listen",
            ),
            (
                GOOD.replace("data = [\"/dev/loop0\", \"/dev/loop1\"]", "data = []"),
                "at least one data member",
            ),
            (GOOD.replace("node = \"a\"", "node = \"a b\""), "node"),
            (
                GOOD.replace("listen = \"127.0.0.1:10809\"", ""),
                "needs listen",
            ),
        ];
        for (text, want) in cases {
            let e = Config::parse(&text, Path::new("/etc/hapair/a.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("/etc/hapair/a.toml"), "{e}");
            assert!(e.contains(want), "want {want:?} in {e}");
        }
        let e = Config::load(Path::new("/nonexistent/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }

    const PAIR: &str = r#"
node = "a"
[pair]
partner = "b"
partner_interconnect = ["192.0.2.2:7700"]
key_file = "/k"
heartbeat_ms = 200
mailbox_timeout_ms = 3000
countdown_ms = 30000
[[aggregate]]
name = "x"
home = "a"
data = ["/d0"]
parity = "/p0"
nvram = "/n0"
[[aggregate]]
name = "y"
home = "b"
data = ["/d1"]
parity = "/p1"
nvram = "/n1"
[[export]]
name = "x"
aggregate = "x"
listen = "192.0.2.10:10809"
[[export]]
name = "y"
aggregate = "y"
listen = "192.0.2.11:10809"
"#;

    fn refused(text: &str) -> String {
        Config::parse(text, Path::new("/etc/hapair/a.toml"))
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{text}"))
            .to_string()
    }

    #[test]
    fn the_watchdog_must_fit_between_heartbeat_and_self_fence_bound() {
        let cfg = Config::parse(PAIR, Path::new("/etc/hapair/a.toml")).unwrap();
        let p = cfg.pair.unwrap();
        assert_eq!((p.heartbeat_ms, p.mailbox_timeout_ms), (200, 3000));
        // 400 ms ..= 1500 ms fit; 0 is no watchdog.
        for usec in [0, 400_000, 1_000_000, 1_500_000] {
            assert_eq!(p.check_watchdog(usec), Ok(()), "{usec}");
        }
        let e = p.check_watchdog(1_500_001).unwrap_err();
        assert!(
            e.contains("WatchdogSec=1501ms") && e.contains("1500 ms"),
            "{e}"
        );
        assert!(
            e.contains("raise pair.mailbox_timeout_ms to at least 3002"),
            "{e}"
        );
        let e = p.check_watchdog(399_000).unwrap_err();
        assert!(
            e.contains("WatchdogSec=399ms") && e.contains("2 x pair.heartbeat_ms"),
            "{e}"
        );
        assert!(p.check_watchdog(100_000).unwrap_err().contains("(400 ms)"));
    }

    #[test]
    fn systemd_time_spans_and_unit_watchdog() {
        let us = |t: &str| parse_systemd_timespan_usec(t).unwrap();
        assert_eq!(us("1500ms"), Some(1_500_000));
        assert_eq!(us("2s"), Some(2_000_000));
        assert_eq!(us("2"), Some(2_000_000));
        assert_eq!(us("1.5s"), Some(1_500_000));
        assert_eq!(us("1min 30s"), Some(90_000_000));
        assert_eq!(us("250us"), Some(250));
        assert_eq!(us("0"), None);
        assert_eq!(us("infinity"), None);
        assert!(parse_systemd_timespan_usec("3 parsecs").is_err());
        assert_eq!(
            unit_watchdog_usec("[Service]\nWatchdogSec=5s\nWatchdogSec=1500ms\n"),
            Ok(Some(1_500_000)),
            "the last one wins"
        );
        assert_eq!(unit_watchdog_usec("[Service]\nType=notify\n"), Ok(None));
        assert_eq!(unit_watchdog_usec("WatchdogSec=\n"), Ok(None));
    }

    #[test]
    fn pair_timers_that_check_config_refuses() {
        Config::parse(PAIR, Path::new("t.toml")).unwrap();
        let e = refused(&PAIR.replace("countdown_ms = 30000", "countdown_ms = 0"));
        assert!(
            e.starts_with("/etc/hapair/a.toml: pair.countdown_ms: 0 is not in 1..="),
            "{e}"
        );
        // 4 x heartbeat is the least: 799 is refused, 800 taken.
        let e = refused(&PAIR.replace("mailbox_timeout_ms = 3000", "mailbox_timeout_ms = 799"));
        assert!(
            e.starts_with("/etc/hapair/a.toml: pair.mailbox_timeout_ms: 799 is less than 4 x heartbeat_ms (800)"),
            "{e}"
        );
        Config::parse(
            &PAIR.replace("mailbox_timeout_ms = 3000", "mailbox_timeout_ms = 800"),
            Path::new("t.toml"),
        )
        .unwrap();
    }

    #[test]
    fn one_file_is_one_log_or_one_member() {
        // The same log file for this node's own log and its mirror of the partner's.
        let e = refused(&PAIR.replace("nvram = \"/n1\"", "nvram = \"/n0\""));
        assert!(
            e.contains("aggregate[1] (y).nvram: /n0 is also the nvram of x"),
            "{e}"
        );
        // A log on a member, of either aggregate.
        let e = refused(&PAIR.replace("nvram = \"/n1\"", "nvram = \"/d0\""));
        assert!(
            e.contains("aggregate[1] (y).nvram: /d0 is also a member of x"),
            "{e}"
        );
        // Through a symbolic link (as /dev/disk/by-id/... names /dev/sdb): the same file.
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("sdb");
        std::fs::write(&disk, b"").unwrap();
        let by_id = dir.path().join("by-id-wwn-0x5000");
        std::os::unix::fs::symlink(&disk, &by_id).unwrap();
        let t = PAIR
            .replace("\"/d0\"", &format!("{:?}", disk.display().to_string()))
            .replace("\"/d1\"", &format!("{:?}", by_id.display().to_string()));
        let e = refused(&t);
        assert!(
            e.contains("aggregate[1] (y).data/parity:")
                && e.contains("is listed twice (also in x as"),
            "{e}"
        );
        let t = PAIR
            .replace("\"/d0\"", &format!("{:?}", disk.display().to_string()))
            .replace("\"/n1\"", &format!("{:?}", by_id.display().to_string()));
        let e = refused(&t);
        assert!(
            e.contains("aggregate[1] (y).nvram:") && e.contains("is also a member of x"),
            "{e}"
        );
    }

    #[test]
    fn two_exports_cannot_listen_on_one_address() {
        let e = refused(&PAIR.replace("192.0.2.11:10809", "192.0.2.10:10809"));
        assert!(
            e.contains(
                "export[1] (y).listen: 192.0.2.10:10809 is also the address of export[0] (x)"
            ),
            "{e}"
        );
        let e = refused(&PAIR.replace("192.0.2.11:10809", "0.0.0.0:10809"));
        assert!(e.contains("export[1] (y).listen"), "{e}");
        // Another port on the same address is fine.
        Config::parse(
            &PAIR.replace("192.0.2.11:10809", "192.0.2.10:10810"),
            Path::new("t.toml"),
        )
        .unwrap();
    }
}
