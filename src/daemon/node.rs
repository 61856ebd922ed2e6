//! A node serving its aggregates over NBD: what `hapaird run` and `hapaird demo` start.

use crate::config::Config;
use crate::daemon::aggregate::Aggregate;
use crate::daemon::backend::Backend;
use crate::daemon::journal::{Journal, JournalConfig, JournalError, ReplaySummary};
use crate::daemon::nbd_server::{DrainReport, Export, NbdServer, ServerConfig};
use crate::daemon::setup::{self, SetupError};
use crate::io::nvram::NvramRegion;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Prints progress of a long operation to stderr, at most every half second and at the end.
pub fn progress_printer(what: String) -> impl FnMut(u64, u64) {
    let mut last: Option<Instant> = None;
    move |done, total| {
        let now = Instant::now();
        if done == total || last.is_none_or(|l| now - l >= Duration::from_millis(500)) {
            last = Some(now);
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            eprintln!("{what}: {pct:3}% ({done}/{total})");
        }
    }
}

/// One export being served.
pub struct Served {
    pub export: String,
    pub aggregate: String,
    pub server: NbdServer,
    pub tcp: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
}

impl Served {
    /// The NBD URI a client uses.
    pub fn uri(&self) -> String {
        match (&self.tcp, &self.unix) {
            (Some(a), _) => format!("nbd://{a}/{}", self.export),
            (None, Some(u)) => format!("nbd+unix:///{}?socket={}", self.export, u.display()),
            (None, None) => String::new(),
        }
    }
}

/// A running node: its open aggregates and the exports that serve them.
pub struct Node {
    pub config: Config,
    pub aggregates: Vec<Arc<Aggregate>>,
    /// NVRAM journals of the aggregates that have one, with what their replay did.
    pub journals: Vec<(Arc<Journal>, ReplaySummary)>,
    pub served: Vec<Served>,
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("aggregate {aggregate}: {source}")]
    Setup {
        aggregate: String,
        source: SetupError,
    },
    #[error("aggregate {aggregate}: {source}")]
    Journal {
        aggregate: String,
        source: JournalError,
    },
    #[error("export {export}: cannot listen on {addr}: {source}")]
    Listen {
        export: String,
        addr: String,
        source: std::io::Error,
    },
}

impl Node {
    /// Open every aggregate whose home is this node and serve its exports.
    pub fn start(config: Config) -> Result<Node, NodeError> {
        let mut aggregates = Vec::new();
        for a in config.aggregate.iter().filter(|a| a.home == config.node) {
            let mut p = progress_printer(format!("parity resync of {}", a.name));
            let agg = setup::open(a, &config.io, &mut p).map_err(|source| NodeError::Setup {
                aggregate: a.name.clone(),
                source,
            })?;
            let st = agg.status();
            tracing::info!(
                aggregate = %st.name, uuid = %st.uuid, size_bytes = st.size_bytes,
                data_members = st.data_members, chunk_bytes = st.chunk_bytes,
                failed_member = ?st.failed_member, engine = ?config.io.engine,
                "aggregate assembled"
            );
            aggregates.push(Arc::new(agg));
        }
        let mut journals = Vec::new();
        for agg in &aggregates {
            let a = config.aggregate(agg.name()).expect("configured");
            let Some(path) = &a.nvram else { continue };
            let je = |source: JournalError| NodeError::Journal {
                aggregate: a.name.clone(),
                source,
            };
            let region = NvramRegion::open(path, a.nvram_mib << 20).map_err(|e| je(e.into()))?;
            let cfg = JournalConfig {
                cp_interval: Duration::from_millis(a.cp_interval_ms),
                flush_every_commit: a.nvram_flush == crate::config::NvramFlush::EveryCommit,
                ..JournalConfig::default()
            };
            let (j, summary) = Journal::open(agg.clone(), region, cfg).map_err(je)?;
            tracing::info!(aggregate = %a.name, nvram = %path.display(), "{}; replay: {summary:?}", j.persistence());
            journals.push((j, summary));
        }
        let mut served = Vec::new();
        for e in &config.export {
            let Some(agg) = aggregates.iter().find(|a| a.name() == e.aggregate) else {
                continue;
            };
            let backend: Arc<dyn Backend> = match journals
                .iter()
                .find(|(j, _)| j.aggregate().name() == e.aggregate)
            {
                Some((j, _)) => j.clone(),
                None => agg.clone(),
            };
            let cfg = ServerConfig {
                tcp: e.listen,
                unix: e.unix.clone(),
                workers: config.io.workers,
                max_request_bytes: config.io.max_request_kib * 1024,
                ..ServerConfig::default()
            };
            let export = Export {
                name: e.name.clone(),
                description: if e.description.is_empty() {
                    format!("hapair aggregate {} (home {})", agg.name(), config.node)
                } else {
                    e.description.clone()
                },
                backend,
                read_only: false,
            };
            let addr = format!("{:?} {:?}", e.listen, e.unix);
            let server =
                NbdServer::start(cfg, vec![export]).map_err(|source| NodeError::Listen {
                    export: e.name.clone(),
                    addr,
                    source,
                })?;
            let s = Served {
                export: e.name.clone(),
                aggregate: e.aggregate.clone(),
                tcp: server.local_addr(),
                unix: e.unix.clone(),
                server,
            };
            tracing::info!(export = %s.export, uri = %s.uri(), "serving");
            served.push(s);
        }
        Ok(Node {
            config,
            aggregates,
            journals,
            served,
        })
    }

    /// Graceful stop: drain every export (answer what was read, read nothing new), then flush
    /// and close the aggregates cleanly.
    pub fn stop(self, drain_timeout: Duration) -> Vec<(String, DrainReport)> {
        let deadline = Instant::now() + drain_timeout;
        let mut reports = Vec::new();
        for s in &self.served {
            let r = s.server.drain(deadline);
            tracing::info!(export = %s.export, report = ?r, "drained");
            reports.push((s.export.clone(), r));
        }
        for s in &self.served {
            s.server.shutdown();
        }
        drop(self.served);
        let mut cp_failed = Vec::new();
        for (j, _) in &self.journals {
            match j.close() {
                Ok(seq) => {
                    tracing::info!(aggregate = %j.aggregate().name(), up_to_seq = seq, "final consistency point")
                }
                Err(e) => {
                    tracing::error!(aggregate = %j.aggregate().name(), error = %e, "final consistency point failed: the log will be replayed at next start");
                    cp_failed.push(j.aggregate().name().to_string());
                }
            }
        }
        for a in &self.aggregates {
            if cp_failed.iter().any(|n| n == a.name()) {
                // Left dirty: a clean label says the log holds nothing the members lack.
                tracing::error!(aggregate = %a.name(), "not closed: its log holds writes the members lack");
                continue;
            }
            match a.close() {
                Ok(()) => tracing::info!(aggregate = %a.name(), "closed cleanly"),
                Err(e) => {
                    tracing::error!(aggregate = %a.name(), error = %e, "close failed: it will be resynced at next start")
                }
            }
        }
        reports
    }
}
