//! Turning configuration into open aggregates: engines, member checks, format and assembly.

use crate::config::{AggregateConfig, EngineKind, IoConfig};
use crate::core::label::{self, Label};
use crate::daemon::aggregate::{Aggregate, AggregateError, EngineFactory, FormatSpec, Progress};
use crate::io::buf::BufArena;
use crate::io::disk::{self, DiskError, MemberFile};
use crate::io::engine::Engine;
use crate::io::sync_engine::SyncEngine;
use crate::io::uring::UringEngine;
use std::fs::File;
use std::sync::Arc;

/// Errors while opening or formatting an aggregate.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    #[error("refusing to format {aggregate}: {details}; pass --force to overwrite")]
    Labelled { aggregate: String, details: String },
}

/// An engine factory over open member files.
pub fn engine_factory(files: Arc<Vec<File>>, io: &IoConfig, arena: Arc<BufArena>) -> EngineFactory {
    let kind = io.engine;
    let entries = io.ring_entries;
    Arc::new(move || -> std::io::Result<Box<dyn Engine>> {
        Ok(match kind {
            EngineKind::IoUring => {
                let keep = Some(arena.clone() as Arc<dyn Send + Sync>);
                // SAFETY: the arena is kept alive by the engine (`keep`) and its region never moves.
                match unsafe { UringEngine::new(files.clone(), entries, &[arena.region()], keep) } {
                    Ok(e) => Box::new(e),
                    // Registering buffers pins memory; under a low RLIMIT_MEMLOCK (not root) it
                    // fails, and plain reads and writes still work.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOMEM | libc::EPERM)) => {
                        tracing::warn!(error = %e, "cannot register I/O buffers with io_uring; using unregistered buffers");
                        // SAFETY: no regions are registered.
                        Box::new(unsafe { UringEngine::new(files.clone(), entries, &[], None)? })
                    }
                    Err(e) => return Err(e),
                }
            }
            EngineKind::Sync => Box::new(SyncEngine::new(files.clone())),
        })
    })
}

/// Open every member of an aggregate (O_DIRECT), in order.
pub fn open_members(cfg: &AggregateConfig) -> Result<Vec<MemberFile>, DiskError> {
    cfg.members().iter().map(|p| disk::open_member(p)).collect()
}

/// Format the aggregate described by `cfg`. Refuses members that are mounted, held, too small,
/// or already labelled (unless `force`).
pub fn format(
    cfg: &AggregateConfig,
    io: &IoConfig,
    force: bool,
    progress: Progress,
) -> Result<Label, SetupError> {
    for p in cfg.members() {
        disk::check_not_in_use(&p)?;
    }
    let members = open_members(cfg)?;
    let chunk = cfg.chunk_kib * 1024;
    let need = label::DATA_OFFSET_BYTES + chunk;
    if let Some(m) = members.iter().find(|m| m.size_bytes < need) {
        return Err(DiskError::TooSmall {
            path: m.path.clone(),
            size: m.size_bytes,
            need,
        }
        .into());
    }
    let paths: Vec<String> = members
        .iter()
        .map(|m| m.path.display().to_string())
        .collect();
    let sizes: Vec<u64> = members.iter().map(|m| m.size_bytes).collect();
    let arena = BufArena::new(16 << 20);
    let files = Arc::new(members.into_iter().map(|m| m.file).collect::<Vec<_>>());
    let factory = engine_factory(files, io, arena.clone());
    if !force {
        let labels = Aggregate::read_labels(&factory, &paths, &arena)?;
        let found: Vec<String> = labels
            .iter()
            .filter_map(|(p, l)| {
                l.as_ref().ok().map(|l| {
                    format!(
                        "{p} is member {} of aggregate {} ({}, home {})",
                        l.member_index,
                        l.aggregate_name,
                        label::uuid_string(&l.aggregate_uuid),
                        l.home_node
                    )
                })
            })
            .collect();
        if !found.is_empty() {
            return Err(SetupError::Labelled {
                aggregate: cfg.name.clone(),
                details: found.join("; "),
            });
        }
    }
    let spec = FormatSpec {
        name: cfg.name.clone(),
        home_node: cfg.home.clone(),
        chunk_bytes: chunk,
        member_bytes: sizes,
        uuid: *uuid::Uuid::new_v4().as_bytes(),
    };
    Ok(Aggregate::format(&factory, &arena, &spec, progress)?)
}

/// Assemble the aggregate described by `cfg`; resync parity first if it was not closed cleanly.
pub fn open(
    cfg: &AggregateConfig,
    io: &IoConfig,
    progress: Progress,
) -> Result<Aggregate, SetupError> {
    open_with_state(cfg, io, progress).map(|(a, _)| a)
}

/// [`open`], also saying whether the aggregate had not been closed cleanly.
pub fn open_with_state(
    cfg: &AggregateConfig,
    io: &IoConfig,
    progress: Progress,
) -> Result<(Aggregate, bool), SetupError> {
    open_with_state_and(cfg, io, progress, &mut |_, _| Ok(()))
}

/// [`open_with_state`], with `before_dirty` as for [`Aggregate::assemble_with`].
pub fn open_with_state_and(
    cfg: &AggregateConfig,
    io: &IoConfig,
    progress: Progress,
    before_dirty: &mut dyn FnMut(bool, [u8; 16]) -> Result<(), String>,
) -> Result<(Aggregate, bool), SetupError> {
    let members = open_members(cfg)?;
    for m in members.iter().filter(|m| !m.direct) {
        tracing::warn!(member = %m.path.display(), "filesystem refuses O_DIRECT: member opened buffered");
    }
    let align = members
        .iter()
        .map(|m| m.logical_block_bytes)
        .max()
        .unwrap_or(512);
    let paths: Vec<String> = members
        .iter()
        .map(|m| m.path.display().to_string())
        .collect();
    let arena = BufArena::new(io.arena_mib << 20);
    let files = Arc::new(members.into_iter().map(|m| m.file).collect::<Vec<_>>());
    let factory = engine_factory(files, io, arena.clone());
    let (agg, dirty) = Aggregate::assemble_with(
        paths,
        factory,
        arena,
        align,
        io.max_request_kib * 1024,
        before_dirty,
    )?;
    // With an NVRAM log, every stripe written since the last clean point is named by a log
    // record, and replay rewrites it with its parity recomputed: no full resync is needed.
    let log_covers = cfg
        .nvram
        .as_ref()
        .is_some_and(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0));
    if dirty && log_covers {
        tracing::info!(aggregate = %cfg.name, "not closed cleanly: the NVRAM log replay repairs the stripes it names");
    } else if dirty {
        if agg.failed_member().is_some() {
            tracing::error!(aggregate = %cfg.name, "not closed cleanly and degraded: parity of stripes written last cannot be checked");
        } else {
            tracing::warn!(aggregate = %cfg.name, "not closed cleanly: recomputing parity");
            agg.resync_parity(progress)?;
        }
    }
    Ok((agg, dirty))
}
