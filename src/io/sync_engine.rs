//! A plain pread/pwrite engine: the reference the io_uring engine is tested against.

use super::engine::{Engine, IoOp, OpBuf};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Runs each op in turn with positional reads and writes.
pub struct SyncEngine {
    files: Arc<Vec<File>>,
}

impl SyncEngine {
    /// An engine over the members' open files.
    pub fn new(files: Arc<Vec<File>>) -> SyncEngine {
        SyncEngine { files }
    }
}

impl Engine for SyncEngine {
    fn run(&mut self, ops: &mut [IoOp<'_>]) -> Vec<io::Result<()>> {
        ops.iter_mut()
            .map(|op| {
                let f = &self.files[op.member];
                match &mut op.buf {
                    OpBuf::Read(b) => f.read_exact_at(b, op.offset),
                    OpBuf::Write(b) => {
                        f.write_all_at(b, op.offset)?;
                        if op.dsync {
                            f.sync_data()?;
                        }
                        Ok(())
                    }
                }
            })
            .collect()
    }

    fn flush(&mut self, members: &[usize]) -> Vec<io::Result<()>> {
        members.iter().map(|&m| self.files[m].sync_data()).collect()
    }

    fn kind(&self) -> &'static str {
        "sync"
    }
}
