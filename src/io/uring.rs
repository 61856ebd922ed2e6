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
    Read {
        ptr: *mut u8,
        len: usize,
    },
    Write {
        ptr: *const u8,
        len: usize,
        dsync: bool,
    },
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
                .map(|&(p, l)| libc::iovec {
                    iov_base: p as *mut libc::c_void,
                    iov_len: l,
                })
                .collect();
            // SAFETY: the caller guarantees the regions outlive the ring and do not move.
            unsafe { ring.submitter().register_buffers(&iov)? };
        }
        let cq_entries = ring.params().cq_entries() as usize;
        Ok(UringEngine {
            ring,
            _files: files,
            _keep: keep,
            regions: regions.to_vec(),
            cq_entries,
        })
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
                    Some(bi) => opcode::WriteFixed::new(fd, p, n, bi)
                        .offset(off)
                        .rw_flags(flags)
                        .build(),
                    None => opcode::Write::new(fd, p, n)
                        .offset(off)
                        .rw_flags(flags)
                        .build(),
                }
            }
            Kind::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
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
                let sqe = self
                    .entry(member, offset, kind, done[i])
                    .user_data(i as u64);
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
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    submit_failures += 1;
                    if submit_failures > 1000 {
                        // Buffers are in the kernel's hands and we cannot wait for them: the only
                        // safe way out is to stop the process before they are freed.
                        eprintln!(
                            "io_uring submit keeps failing with in-flight I/O: {e}; aborting"
                        );
                        std::process::abort();
                    }
                }
            }
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
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
                            format!(
                                "short read at member offset {}",
                                items[i].1 + done[i] as u64
                            ),
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
        results
            .into_iter()
            .map(|r| r.expect("every op completes"))
            .collect()
    }
}

impl Engine for UringEngine {
    fn run(&mut self, ops: &mut [IoOp<'_>]) -> Vec<io::Result<()>> {
        let items: Vec<(usize, u64, Kind)> = ops
            .iter_mut()
            .map(|op| {
                let kind = match &mut op.buf {
                    OpBuf::Read(b) => Kind::Read {
                        ptr: b.as_mut_ptr(),
                        len: b.len(),
                    },
                    OpBuf::Write(b) => Kind::Write {
                        ptr: b.as_ptr(),
                        len: b.len(),
                        dsync: op.dsync,
                    },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::buf::{BufArena, IoBuf};
    use crate::io::disk::open_member;
    use crate::io::sync_engine::SyncEngine;
    use rand::{Rng, SeedableRng};

    fn members(dir: &std::path::Path, tag: &str, n: usize, size: usize) -> Arc<Vec<File>> {
        Arc::new(
            (0..n)
                .map(|i| {
                    let p = dir.join(format!("{tag}{i}"));
                    std::fs::write(&p, vec![0u8; size]).unwrap();
                    let m = open_member(&p).unwrap();
                    assert!(m.direct, "/var/tmp must take O_DIRECT for this test");
                    m.file
                })
                .collect(),
        )
    }

    /// The io_uring engine against the pread/pwrite engine: the same random batches of reads
    /// and writes (fixed and unregistered buffers, dsync or not) give the same bytes.
    #[test]
    fn uring_matches_sync_engine() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let size = 4 << 20;
        let arena = BufArena::new(8 << 20);
        let ua = members(dir.path(), "u", 3, size);
        let sa = members(dir.path(), "s", 3, size);
        // SAFETY: the arena is kept alive by the engine (keep) and never moves.
        let mut u = unsafe {
            UringEngine::new(
                ua,
                8,
                &[arena.region()],
                Some(arena.clone() as Arc<dyn Send + Sync>),
            )
            .unwrap()
        };
        let mut s = SyncEngine::new(sa);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for round in 0..200 {
            // A batch larger than the ring (8 entries) exercises queueing.
            let count = rng.gen_range(1..24);
            let mut specs = Vec::new();
            for _ in 0..count {
                let member = rng.gen_range(0..3);
                let blocks = rng.gen_range(1..64u64);
                let offset = rng.gen_range(0..(size as u64 / 4096 - blocks)) * 4096;
                let write = rng.gen_bool(0.5);
                let fixed = rng.gen_bool(0.5);
                let seed: u8 = rng.gen();
                specs.push((member, offset, (blocks * 4096) as usize, write, fixed, seed));
            }
            // Writes of one batch must not overlap each other or a read (their order is free).
            let mut taken: Vec<(usize, u64, u64)> = Vec::new();
            specs.retain(|&(m, o, l, _, _, _)| {
                let clash = taken
                    .iter()
                    .any(|&(tm, to, tl)| tm == m && o < to + tl && to < o + l as u64);
                if !clash {
                    taken.push((m, o, l as u64));
                }
                !clash
            });
            let mk = |fixed: bool, len: usize| {
                if fixed {
                    arena.alloc(len)
                } else {
                    IoBuf::new(len)
                }
            };
            let mut ubufs: Vec<IoBuf> = specs.iter().map(|s| mk(s.4, s.2)).collect();
            let mut sbufs: Vec<IoBuf> = specs.iter().map(|s| IoBuf::new(s.2)).collect();
            for (i, s) in specs.iter().enumerate() {
                if s.3 {
                    for (k, b) in ubufs[i].iter_mut().enumerate() {
                        *b = (k as u8).wrapping_mul(s.5) ^ round as u8;
                    }
                    sbufs[i].copy_from_slice(&ubufs[i]);
                }
            }
            fn ops<'a>(
                bufs: &'a mut [IoBuf],
                specs: &[(usize, u64, usize, bool, bool, u8)],
            ) -> Vec<IoOp<'a>> {
                bufs.iter_mut()
                    .zip(specs.iter())
                    .map(|(b, s)| IoOp {
                        member: s.0,
                        offset: s.1,
                        buf: if s.3 {
                            OpBuf::Write(&b[..])
                        } else {
                            OpBuf::Read(&mut b[..])
                        },
                        dsync: s.5 % 3 == 0,
                    })
                    .collect()
            }
            let ur = u.run(&mut ops(&mut ubufs, &specs));
            let sr = s.run(&mut ops(&mut sbufs, &specs));
            assert!(ur.iter().all(|r| r.is_ok()), "round {round}: {ur:?}");
            assert!(sr.iter().all(|r| r.is_ok()), "round {round}: {sr:?}");
            for i in 0..specs.len() {
                assert!(ubufs[i][..] == sbufs[i][..], "round {round} op {i} differs");
            }
        }
        assert!(u.flush(&[0, 1, 2]).iter().all(|r| r.is_ok()));
        for i in 0..3 {
            let a = std::fs::read(dir.path().join(format!("u{i}"))).unwrap();
            let b = std::fs::read(dir.path().join(format!("s{i}"))).unwrap();
            assert!(a == b, "member {i} contents differ");
        }
    }

    #[test]
    fn reads_past_the_end_fail_on_both_engines() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let files = members(dir.path(), "e", 1, 1 << 20);
        // SAFETY: no registered regions.
        let mut u = unsafe { UringEngine::new(files.clone(), 4, &[], None).unwrap() };
        let mut s = SyncEngine::new(files);
        for e in [&mut u as &mut dyn Engine, &mut s] {
            let mut b = IoBuf::new(8192);
            let r = e.run(&mut [IoOp {
                member: 0,
                offset: (1 << 20) - 4096,
                buf: OpBuf::Read(&mut b[..]),
                dsync: false,
            }]);
            assert_eq!(
                r[0].as_ref().unwrap_err().kind(),
                io::ErrorKind::UnexpectedEof,
                "{}",
                e.kind()
            );
            let r = e.run(&mut [IoOp {
                member: 0,
                offset: 1,
                buf: OpBuf::Read(&mut b[..]),
                dsync: false,
            }]);
            assert_eq!(
                r[0].as_ref().unwrap_err().raw_os_error(),
                Some(libc::EINVAL),
                "{}: misaligned O_DIRECT",
                e.kind()
            );
        }
    }
}
