//! The interface between the aggregate and the kernel: run a batch of member reads and writes.

use std::io;

/// The buffer of one operation: read into it, or write from it.
pub enum OpBuf<'a> {
    /// Fill this buffer from the member.
    Read(&'a mut [u8]),
    /// Write this buffer to the member.
    Write(&'a [u8]),
}

impl OpBuf<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            OpBuf::Read(b) => b.len(),
            OpBuf::Write(b) => b.len(),
        }
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One read or write of a member at a byte offset.
pub struct IoOp<'a> {
    /// Member index (the engine's file table order).
    pub member: usize,
    /// Byte offset on the member.
    pub offset: u64,
    /// The data.
    pub buf: OpBuf<'a>,
    /// For writes: durable before completion (RWF_DSYNC), for FUA.
    pub dsync: bool,
}

/// Executes batches of member I/O. One engine serves one thread at a time.
///
/// `run` submits every op of the batch at once (they may run in any order and in parallel) and
/// returns only when every one has completed, with one result per op in batch order. Short
/// transfers are continued until the whole buffer is done; a read that hits the end of the
/// member fails with `UnexpectedEof`, a write that makes no progress with `WriteZero`.
pub trait Engine: Send {
    /// Run a batch of operations.
    fn run(&mut self, ops: &mut [IoOp<'_>]) -> Vec<io::Result<()>>;
    /// fdatasync each of `members`, in parallel; one result per member.
    fn flush(&mut self, members: &[usize]) -> Vec<io::Result<()>>;
    /// A short name for logs and status ("io_uring", "sync").
    fn kind(&self) -> &'static str;
}
