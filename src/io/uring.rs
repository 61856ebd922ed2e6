//! The io_uring engine: one ring per engine (one engine per worker thread), members as
//! registered files, the buffer arena as registered buffers, a whole batch submitted at once.

use super::engine::{Engine, IoOp, OpBuf};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// A memory region registered with the ring: `(start address, length)`.
pub type Region = (usize, usize);

/// An io_uring engine over the members' open files.
pub struct UringEngine {
    ring: IoUring,
    /// Kept open for as long as the ring refers to them as registered files.
    _files: Arc<Vec<File>>,
    /// Keeps the registered memory alive for as long as the ring.
    _keep: Option<Arc<dyn Send + Sync>>,
    /// Registered buffer regions; index = buf_index.
    regions: Vec<Region>,
    cq_entries: usize,
}

/// What one entry of a batch does, with the raw pointer of its buffer.
#[derive(Clone, Copy)]
enum Kind {
    Read { ptr: *mut u8, len: usize },
    Write { ptr: *const u8, len: usize, dsync: bool },
    Fsync,
}

impl Kind {
    fn len(&self) -> usize {
        match *self {
            Kind::Read { len, .. } | Kind::Write { len, .. } => len,
            Kind::Fsync => 0,
        }
    }
}

impl UringEngine {
    /// Build a ring of `entries` submission slots with `files` registered (index = member) and
    /// `regions` registered as fixed buffers.
    ///
    /// # Safety
    /// Every region must stay allocated and must not move for the life of the engine: the kernel
    /// pins and may access those pages through any fixed-buffer operation.
    pub unsafe fn new(
        files: Arc<Vec<File>>,
        entries: u32,
        regions: &[Region],
        keep: Option<Arc<dyn Send + Sync>>,
    ) -> io::Result<UringEngine> {
        let ring = IoUring::new(entries)?;
        let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        ring.submitter().register_files(&fds)?;
        if !regions.is_empty() {
            let iov: Vec<libc::iovec> = regions
                .iter()
                .map(|&(p, l)| libc::iovec { iov_base: p as *mut libc::c_void, iov_len: l })
                .collect();
            // SAFETY: the caller guarantees the regions outlive the ring and do not move.
            unsafe { ring.submitter().register_buffers(&iov)? };
        }
        let cq_entries = ring.params().cq_entries() as usize;
        Ok(UringEngine { ring, _files: files, _keep: keep, regions: regions.to_vec(), cq_entries })
    }

    /// The registered region containing `[ptr, ptr+len)`, if any.
    fn fixed_index(&self, ptr: usize, len: usize) -> Option<u16> {
        self.regions
            .iter()
            .position(|&(s, l)| ptr >= s && ptr + len <= s + l)
            .map(|i| i as u16)
    }

    fn entry(&self, member: usize, offset: u64, kind: Kind, done: usize) -> squeue::Entry {
        let fd = types::Fixed(member as u32);
        let off = offset + done as u64;
        match kind {
            Kind::Read { ptr, len } => {
                // SAFETY: done < len, so the pointer stays inside the op's buffer.
                let p = unsafe { ptr.add(done) };
                let n = (len - done) as u32;
                match self.fixed_index(ptr as usize, len) {
                    Some(bi) => opcode::ReadFixed::new(fd, p, n, bi).offset(off).build(),
                    None => opcode::Read::new(fd, p, n).offset(off).build(),
                }
            }
            Kind::Write { ptr, len, dsync } => {
                // SAFETY: done < len, so the pointer stays inside the op's buffer.
                let p = unsafe { ptr.add(done) };
                let n = (len - done) as u32;
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                match self.fixed_index(ptr as usize, len) {
                    Some(bi) => {
                        opcode::WriteFixed::new(fd, p, n, bi).offset(off).rw_flags(flags).build()
                    }
                    None => opcode::Write::new(fd, p, n).offset(off).rw_flags(flags).build(),
                }
            }
            Kind::Fsync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
        }
    }

    /// Submit every entry and wait for all of them. Returns only when nothing is in flight:
    /// the buffers the entries point at are borrowed by the caller for exactly that long.
    fn execute(&mut self, items: &[(usize, u64, Kind)]) -> Vec<io::Result<()>> {
        let n = items.len();
        let mut done = vec![0usize; n];
        let mut results: Vec<Option<io::Result<()>>> = (0..n).map(|_| None).collect();
        let mut queue: VecDeque<usize> = (0..n).collect();
        let mut inflight = 0usize;
        let mut submit_failures = 0u32;
        loop {
            // Queue as much as fits, never more than the completion queue can hold.
            while let Some(&i) = queue.front() {
                if inflight >= self.cq_entries {
                    break;
                }
                let (member, offset, kind) = items[i];
                let sqe = self.entry(member, offset, kind, done[i]).user_data(i as u64);
                // SAFETY: the buffer behind the entry is borrowed by our caller until this
                // function returns, and it returns only after the entry's completion is reaped.
                if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                    break;
                }
                queue.pop_front();
                inflight += 1;
            }
            if inflight == 0 && queue.is_empty() {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => submit_failures = 0,
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
                Err(e) => {
                    submit_failures += 1;
                    if submit_failures > 1000 {
                        // Buffers are in the kernel's hands and we cannot wait for them: the only
                        // safe way out is to stop the process before they are freed.
                        eprintln!("io_uring submit keeps failing with in-flight I/O: {e}; aborting");
                        std::process::abort();
                    }
                }
            }
            let cqes: Vec<(u64, i32)> =
                self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (ud, res) in cqes {
                let i = ud as usize;
                inflight -= 1;
                let len = items[i].2.len();
                if res < 0 {
                    let errno = -res;
                    if errno == libc::EINTR || errno == libc::EAGAIN {
                        queue.push_back(i);
                    } else {
                        results[i] = Some(Err(io::Error::from_raw_os_error(errno)));
                    }
                } else if len == 0 {
                    results[i] = Some(Ok(()));
                } else if res == 0 {
                    results[i] = Some(Err(match items[i].2 {
                        Kind::Read { .. } => io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("short read at member offset {}", items[i].1 + done[i] as u64),
                        ),
                        _ => io::Error::new(io::ErrorKind::WriteZero, "write made no progress"),
                    }));
                } else {
                    done[i] += res as usize;
                    if done[i] < len {
                        queue.push_back(i);
                    } else {
                        results[i] = Some(Ok(()));
                    }
                }
            }
        }
        results.into_iter().map(|r| r.expect("every op completes")).collect()
    }
}

impl Engine for UringEngine {
    fn run(&mut self, ops: &mut [IoOp<'_>]) -> Vec<io::Result<()>> {
        let items: Vec<(usize, u64, Kind)> = ops
            .iter_mut()
            .map(|op| {
                let kind = match &mut op.buf {
                    OpBuf::Read(b) => Kind::Read { ptr: b.as_mut_ptr(), len: b.len() },
                    OpBuf::Write(b) => Kind::Write { ptr: b.as_ptr(), len: b.len(), dsync: op.dsync },
                };
                (op.member, op.offset, kind)
            })
            .collect();
        // Zero-length ops complete at once without touching the ring.
        let live: Vec<usize> = (0..items.len()).filter(|&i| items[i].2.len() > 0).collect();
        let live_items: Vec<_> = live.iter().map(|&i| items[i]).collect();
        let mut out: Vec<io::Result<()>> = (0..items.len()).map(|_| Ok(())).collect();
        for (k, r) in live.into_iter().zip(self.execute(&live_items)) {
            out[k] = r;
        }
        out
    }

    fn flush(&mut self, members: &[usize]) -> Vec<io::Result<()>> {
        let items: Vec<_> = members.iter().map(|&m| (m, 0, Kind::Fsync)).collect();
        self.execute(&items)
    }

    fn kind(&self) -> &'static str {
        "io_uring"
    }
}

// SAFETY: the ring and the raw pointers in it are only used by the thread that owns the engine
// at a time; no pointer outlives a call to `execute`.
unsafe impl Send for UringEngine {}
