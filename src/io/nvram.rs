//! NVRAM mapping: the byte regions that hold this node's write log and the mirror of the
//! partner's (formats in `core::nvlog`).
//!
//! Three kinds of backing, detected at open and reported as the operator reads them:
//! - a file on a DAX filesystem (pmem): mapped `MAP_SHARED_VALIDATE | MAP_SYNC`, made durable by
//!   flushing the cache lines (clwb, else clflushopt, else clflush) and a store fence;
//! - a file on a disk filesystem (ext4, xfs, ...): the region lives in this process's memory and
//!   the file is its copy on the device. A group commit writes its dirty ranges to the file with
//!   direct I/O ([`Persister::write_back`]: no page cache, no device cache flush);
//!   [`Persister::flush_device`] (`fdatasync`) then empties the device's volatile write cache,
//!   when a client asks with NBD FLUSH or FUA, or on every commit if so configured. That is the
//!   contract every disk gives: a written block survives a process or kernel crash, and a power
//!   loss once flushed. (Not a shared mapping of the file: writing back pages that other threads
//!   have mapped costs a TLB shootdown per commit, measured at ~200 us on this VM.) Where the
//!   filesystem refuses O_DIRECT, a shared mapping written back with `sync_file_range`;
//! - a file on tmpfs (/dev/shm): survives a process kill (the page cache holds it), not a
//!   machine crash.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use memmap2::MmapMut;
use thiserror::Error;

/// `mmap` flags from the kernel ABI (include/uapi/asm-generic/mman-common.h, linux/mman.h).
const MAP_SHARED_VALIDATE: libc::c_int = 0x03;
const MAP_SYNC: libc::c_int = 0x80000;

/// `statfs.f_type` magics (include/uapi/linux/magic.h).
const EXT4_SUPER_MAGIC: u64 = 0xEF53;
const XFS_SUPER_MAGIC: u64 = 0x5846_5342;
const BTRFS_SUPER_MAGIC: u64 = 0x9123_683E;
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// Cache line flushed at a time.
const CACHE_LINE: usize = 64;

/// The filesystem a region file lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Ext4,
    Xfs,
    Btrfs,
    Tmpfs,
    Other(u64),
}

impl FsKind {
    fn from_magic(magic: u64) -> FsKind {
        match magic {
            EXT4_SUPER_MAGIC => FsKind::Ext4,
            XFS_SUPER_MAGIC => FsKind::Xfs,
            BTRFS_SUPER_MAGIC => FsKind::Btrfs,
            TMPFS_MAGIC => FsKind::Tmpfs,
            m => FsKind::Other(m),
        }
    }
}

impl fmt::Display for FsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsKind::Ext4 => f.write_str("ext4"),
            FsKind::Xfs => f.write_str("xfs"),
            FsKind::Btrfs => f.write_str("btrfs"),
            FsKind::Tmpfs => f.write_str("tmpfs"),
            FsKind::Other(m) => write!(f, "filesystem {m:#x}"),
        }
    }
}

/// How a region is made durable, and so what it survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// DAX with MAP_SYNC: stores are durable after a cache-line flush and a fence.
    DaxMapSync { fs: FsKind },
    /// A file on a disk filesystem: written to the device per commit, durable through a power
    /// loss once the device cache is flushed.
    DiskFile { fs: FsKind, direct: bool },
    /// tmpfs: survives a process kill only.
    Tmpfs,
}

impl Persistence {
    /// Whether an acknowledged write in this region survives a machine crash or power loss.
    pub fn survives_machine_crash(&self) -> bool {
        !matches!(self, Persistence::Tmpfs)
    }
}

impl fmt::Display for Persistence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Persistence::DaxMapSync { .. } => f.write_str("NVRAM: DAX, MAP_SYNC"),
            Persistence::DiskFile { fs, direct: true } => {
                write!(f, "NVRAM: file on {fs}, direct I/O")
            }
            Persistence::DiskFile { fs, direct: false } => {
                write!(f, "NVRAM: file on {fs}, page cache")
            }
            Persistence::Tmpfs => f.write_str("NVRAM: file on tmpfs: survives a process kill only"),
        }
    }
}

#[derive(Debug, Error)]
pub enum NvramError {
    #[error("open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("statfs {path}")]
    Statfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {actual} bytes, expected {expected}: refusing to resize an existing log")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("size {path} to {bytes} bytes")]
    Resize {
        path: PathBuf,
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mmap {path}")]
    Map {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write back {path} bytes {start}..{end}")]
    WriteBack {
        path: PathBuf,
        start: usize,
        end: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("flush the device cache under {path} (fdatasync)")]
    FlushDevice {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("range {start}..{end} is outside the {len}-byte region {path}")]
    OutOfRange {
        path: PathBuf,
        start: usize,
        end: usize,
        len: usize,
    },
}

enum Mapping {
    /// Our own MAP_SYNC mapping of `len` bytes at `ptr`, unmapped on drop.
    Sync { ptr: NonNull<u8>, len: usize },
    /// A shared mapping of the file (tmpfs, or a filesystem without O_DIRECT).
    Page(MmapMut),
    /// Anonymous memory holding the region; the file (opened O_DIRECT) is written from it.
    Anon { ptr: NonNull<u8>, len: usize },
}

/// Anonymous, page-aligned, zeroed memory of `len` bytes.
fn map_anon(len: usize) -> Result<NonNull<u8>, std::io::Error> {
    // SAFETY: a fresh private anonymous mapping chosen by the kernel; checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned null"))
}

/// Direct I/O granularity for the log file: offsets and lengths are rounded out to this.
const DIRECT_ALIGN: usize = 4096;

/// One mapped NVRAM region.
pub struct NvramRegion {
    path: PathBuf,
    persistence: Persistence,
    map: Mapping,
    /// Kept open for the life of the mapping: write-back and device flushes go through it.
    file: Arc<File>,
}

// SAFETY: the region owns its mapping exclusively; `Sync` hands out only `&[u8]`.
unsafe impl Send for NvramRegion {}
// SAFETY: shared access only reads through `&[u8]`; writes need `&mut self`.
unsafe impl Sync for NvramRegion {}

fn fs_kind(file: &File, path: &Path) -> Result<FsKind, NvramError> {
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the duration of the call and `st` is a valid out pointer.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    if rc != 0 {
        return Err(NvramError::Statfs {
            path: path.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between libcs.
    Ok(FsKind::from_magic(st.f_type as u64))
}

/// An ordinary shared mapping of the whole file.
fn page_map(file: &File, path: &Path) -> Result<Mapping, NvramError> {
    // SAFETY: the file is a private NVRAM region of this daemon; nothing else truncates it
    // while mapped (a truncation would make accesses fault).
    let m = unsafe { MmapMut::map_mut(file) }.map_err(|source| NvramError::Map {
        path: path.to_owned(),
        source,
    })?;
    Ok(Mapping::Page(m))
}

/// The region file opened again with O_DIRECT, if the filesystem takes direct I/O.
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    match f {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::info!(path = %path.display(), error = %e, "NVRAM file refuses O_DIRECT: using a shared mapping");
            None
        }
    }
}

/// Try a MAP_SYNC mapping; `None` when the file does not support it (not DAX).
fn map_sync(file: &File, len: usize) -> Option<NonNull<u8>> {
    // SAFETY: a fresh shared mapping chosen by the kernel (null hint) of a file we hold open;
    // it aliases no Rust object. The result is checked against MAP_FAILED below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            MAP_SHARED_VALIDATE | MAP_SYNC,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        // EOPNOTSUPP (not DAX) or EINVAL (kernel without MAP_SYNC): not DAX: the region is written back with syscalls instead.
        return None;
    }
    NonNull::new(p.cast::<u8>())
}

impl NvramRegion {
    /// Open (creating if absent) the region file `path` of exactly `bytes` bytes and map it.
    /// A new or empty file is sized to `bytes`; an existing file of another size is refused.
    pub fn open(path: &Path, bytes: u64) -> Result<NvramRegion, NvramError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| NvramError::Open {
                path: path.to_owned(),
                source,
            })?;
        let actual = file
            .metadata()
            .map_err(|source| NvramError::Open {
                path: path.to_owned(),
                source,
            })?
            .len();
        if actual == 0 {
            // Write every block now: writing into a sparse file would allocate blocks (a metadata
            // journal commit) on every group commit; of written blocks it is a plain data write.
            let resize = |source| NvramError::Resize {
                path: path.to_owned(),
                bytes,
                source,
            };
            let zeros = vec![0u8; 1 << 20];
            let mut done = 0u64;
            while done < bytes {
                let n = (bytes - done).min(zeros.len() as u64) as usize;
                std::os::unix::fs::FileExt::write_all_at(&file, &zeros[..n], done)
                    .map_err(resize)?;
                done += n as u64;
            }
            file.sync_all().map_err(resize)?;
        } else if actual != bytes {
            return Err(NvramError::SizeMismatch {
                path: path.to_owned(),
                expected: bytes,
                actual,
            });
        }
        let len = usize::try_from(bytes).expect("region fits the address space");
        let fs = fs_kind(&file, path)?;
        let (map, persistence, file) = match map_sync(&file, len) {
            Some(ptr) => (
                Mapping::Sync { ptr, len },
                Persistence::DaxMapSync { fs },
                file,
            ),
            None if fs != FsKind::Tmpfs && len % DIRECT_ALIGN == 0 => match open_direct(path) {
                Some(direct) => {
                    let map_err = |source| NvramError::Map {
                        path: path.to_owned(),
                        source,
                    };
                    let ptr = map_anon(len).map_err(map_err)?;
                    // SAFETY: ptr..ptr+len is the fresh anonymous mapping, owned by nobody yet.
                    let mem = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len) };
                    let loaded = std::os::unix::fs::FileExt::read_exact_at(&file, mem, 0);
                    let map = Mapping::Anon { ptr, len };
                    loaded.map_err(|source| NvramError::Open {
                        path: path.to_owned(),
                        source,
                    })?;
                    (map, Persistence::DiskFile { fs, direct: true }, direct)
                }
                None => (
                    page_map(&file, path)?,
                    Persistence::DiskFile { fs, direct: false },
                    file,
                ),
            },
            None => {
                let p = if fs == FsKind::Tmpfs {
                    Persistence::Tmpfs
                } else {
                    Persistence::DiskFile { fs, direct: false }
                };
                (page_map(&file, path)?, p, file)
            }
        };
        tracing::info!(path = %path.display(), bytes, "{persistence}");
        Ok(NvramRegion {
            path: path.to_owned(),
            persistence,
            map,
            file: Arc::new(file),
        })
    }

    pub fn persistence(&self) -> Persistence {
        self.persistence
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn len(&self) -> usize {
        self.bytes().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.map {
            // SAFETY: ptr..ptr+len is our live mapping, readable; `&self` excludes writers.
            Mapping::Sync { ptr, len } | Mapping::Anon { ptr, len } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr(), *len)
            },
            Mapping::Page(m) => m,
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.map {
            // SAFETY: ptr..ptr+len is our live mapping, writable; `&mut self` is exclusive.
            Mapping::Sync { ptr, len } | Mapping::Anon { ptr, len } => unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr(), *len)
            },
            Mapping::Page(m) => m,
        }
    }

    /// Make `ranges` of the region durable through a power loss (written back and the device
    /// cache flushed).
    pub fn persist(&self, ranges: &[Range<usize>]) -> Result<(), NvramError> {
        // SAFETY: the persister's region is `self`, alive for the call.
        unsafe { self.persister().persist(ranges) }
    }

    /// Write `ranges` to the device without flushing its cache (see the module notes); on DAX
    /// the same as [`NvramRegion::persist`].
    pub fn write_back(&self, ranges: &[Range<usize>]) -> Result<(), NvramError> {
        // SAFETY: the persister's region is `self`, alive for the call.
        unsafe { self.persister().write_back(ranges) }
    }

    /// Empty the device's volatile write cache of everything written back so far.
    pub fn flush_device(&self) -> Result<(), NvramError> {
        self.persister().flush_device()
    }

    /// A handle that makes ranges of this region durable without borrowing it, so that the log
    /// can be appended to (under the journal's lock) while an earlier group commit is being
    /// persisted (outside it). Writing a range back never touches it through Rust references:
    /// the syscalls and cache-line flushes act on addresses.
    pub fn persister(&self) -> Persister {
        Persister {
            base: self.bytes().as_ptr() as usize,
            len: self.len(),
            kind: match self.map {
                Mapping::Sync { .. } => Backing::Dax,
                Mapping::Page(_) => Backing::Mapped,
                Mapping::Anon { .. } => Backing::Direct,
            },
            path: self.path.clone(),
            file: self.file.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    Dax,
    Mapped,
    Direct,
}

/// See [`NvramRegion::persister`].
#[derive(Debug, Clone)]
pub struct Persister {
    base: usize,
    len: usize,
    kind: Backing,
    path: PathBuf,
    file: Arc<File>,
}

impl Persister {
    /// Make `ranges` durable through a power loss: [`Persister::write_back`], then
    /// [`Persister::flush_device`].
    ///
    /// # Safety
    /// The region this handle came from must still be mapped (the caller keeps it alive).
    pub unsafe fn persist(&self, ranges: &[Range<usize>]) -> Result<(), NvramError> {
        // SAFETY: forwarded contract.
        unsafe { self.write_back(ranges)? };
        if self.kind != Backing::Dax && ranges.iter().any(|r| !r.is_empty()) {
            self.flush_device()?;
        }
        Ok(())
    }

    /// Write `ranges` to the device and wait for it, without a device cache flush: the bytes
    /// then survive a process or kernel crash, and [`Persister::flush_device`] makes them
    /// survive a power loss. On DAX a cache-line flush and a fence, which is already both.
    ///
    /// # Safety
    /// The region this handle came from must still be mapped (the caller keeps it alive).
    pub unsafe fn write_back(&self, ranges: &[Range<usize>]) -> Result<(), NvramError> {
        for r in ranges.iter().filter(|r| !r.is_empty()) {
            if r.start > r.end || r.end > self.len {
                return Err(NvramError::OutOfRange {
                    path: self.path.clone(),
                    start: r.start,
                    end: r.end,
                    len: self.len,
                });
            }
            let err = |source| NvramError::WriteBack {
                path: self.path.clone(),
                start: r.start,
                end: r.end,
                source,
            };
            match self.kind {
                Backing::Dax => {
                    let mut line = (self.base + r.start) & !(CACHE_LINE - 1);
                    while line < self.base + r.end {
                        // SAFETY: the line lies in the live mapping (caller's contract);
                        // CLFLUSH is baseline on x86_64 and only takes the address.
                        unsafe { std::arch::x86_64::_mm_clflush(line as *const u8) };
                        line += CACHE_LINE;
                    }
                }
                Backing::Mapped => {
                    // The mapping is MAP_SHARED over this file from offset 0: region offsets
                    // are file offsets, and pages stored to through it are its dirty pages.
                    let start = r.start & !(DIRECT_ALIGN - 1);
                    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                    // SAFETY: plain syscall on our open descriptor.
                    let rc = unsafe {
                        libc::sync_file_range(
                            self.file.as_raw_fd(),
                            start as libc::off64_t,
                            (r.end - start) as libc::off64_t,
                            flags,
                        )
                    };
                    if rc != 0 {
                        return Err(err(std::io::Error::last_os_error()));
                    }
                }
                Backing::Direct => {
                    // Whole aligned blocks: the region and its base are page aligned, so the
                    // rounded range stays inside it and satisfies O_DIRECT.
                    let start = r.start & !(DIRECT_ALIGN - 1);
                    let end = r.end.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
                    let mut done = start;
                    while done < end {
                        // SAFETY: base+done..base+end lies in the live region (caller's
                        // contract); the kernel only reads it. Bytes other threads are
                        // appending in the same block may be caught half written: they belong
                        // to records not yet committed, which a scan discards.
                        let rc = unsafe {
                            libc::pwrite(
                                self.file.as_raw_fd(),
                                (self.base + done) as *const libc::c_void,
                                end - done,
                                done as libc::off_t,
                            )
                        };
                        if rc < 0 {
                            let e = std::io::Error::last_os_error();
                            if e.kind() == std::io::ErrorKind::Interrupted {
                                continue;
                            }
                            return Err(err(e));
                        }
                        if rc == 0 || rc as usize % 512 != 0 {
                            return Err(err(std::io::Error::other(format!(
                                "short direct write of {rc} bytes"
                            ))));
                        }
                        done += rc as usize;
                    }
                }
            }
        }
        if self.kind == Backing::Dax {
            store_fence();
        }
        Ok(())
    }

    /// Flush the device's volatile write cache (`fdatasync` of the region's file): everything
    /// written back before the call survives a power loss after it. A fence on DAX.
    pub fn flush_device(&self) -> Result<(), NvramError> {
        if self.kind == Backing::Dax {
            store_fence();
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|source| NvramError::FlushDevice {
                path: self.path.clone(),
                source,
            })
    }
}

impl Drop for NvramRegion {
    fn drop(&mut self) {
        if let Mapping::Sync { ptr, len } | Mapping::Anon { ptr, len } = self.map {
            // SAFETY: we mapped exactly this range (`map_sync`, `map_anon`) and nothing
            // borrows it now.
            let rc = unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
            if rc != 0 {
                tracing::error!(path = %self.path.display(), err = %std::io::Error::last_os_error(), "munmap");
            }
        }
    }
}

impl fmt::Debug for NvramRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NvramRegion({}, {} bytes, {})",
            self.path.display(),
            self.len(),
            self.persistence
        )
    }
}

/// Write the cache lines covering `bytes` back to the persistence domain (not yet ordered:
/// follow with [`store_fence`]).
#[cfg(target_arch = "x86_64")]
pub fn flush_cache_lines(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let start = bytes.as_ptr() as usize & !(CACHE_LINE - 1);
    let end = bytes.as_ptr() as usize + bytes.len();
    let (clwb, clflushopt) = flush_features();
    let mut line = start;
    while line < end {
        let p = line as *const u8;
        if clwb {
            // SAFETY: the CPU has CLWB; `p` is in (the cache line of) memory we can read.
            unsafe { std::arch::asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags)) };
        } else if clflushopt {
            // SAFETY: the CPU has CLFLUSHOPT; `p` is in (the cache line of) memory we can read.
            unsafe {
                std::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags))
            };
        } else {
            // SAFETY: CLFLUSH is part of SSE2, baseline on x86_64; `p` points into readable memory.
            unsafe { std::arch::x86_64::_mm_clflush(p) };
        }
        line += CACHE_LINE;
    }
}

/// CPUID leaf 7 EBX bit 24 (CLWB) and bit 23 (CLFLUSHOPT); std's feature detection knows
/// neither.
#[cfg(target_arch = "x86_64")]
fn flush_features() -> (bool, bool) {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    if __cpuid(0).eax < 7 {
        return (false, false);
    }
    let ebx = __cpuid_count(7, 0).ebx;
    (ebx & (1 << 24) != 0, ebx & (1 << 23) != 0)
}

/// Order the flushes before any later store (and before the acknowledgement).
#[cfg(target_arch = "x86_64")]
pub fn store_fence() {
    // SAFETY: SFENCE is part of SSE, baseline on x86_64.
    unsafe { std::arch::x86_64::_mm_sfence() };
}

#[cfg(not(target_arch = "x86_64"))]
compile_error!("NVRAM cache-line flush is only written for x86_64");

/// This node's NVRAM: its own log and the mirror of the partner's.
#[derive(Debug)]
pub struct Nvram {
    pub local: NvramRegion,
    pub mirror: NvramRegion,
}

impl Nvram {
    /// Open both regions, each `bytes` long.
    pub fn open(local: &Path, mirror: &Path, bytes: u64) -> Result<Nvram, NvramError> {
        Ok(Nvram {
            local: NvramRegion::open(local, bytes)?,
            mirror: NvramRegion::open(mirror, bytes)?,
        })
    }

    /// One line for the log and the status output, e.g. "NVRAM: file on ext4".
    pub fn describe(&self) -> String {
        if self.local.persistence() == self.mirror.persistence() {
            self.local.persistence().to_string()
        } else {
            format!(
                "local {}; mirror {}",
                self.local.persistence(),
                self.mirror.persistence()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::nvlog::{scan, Expect, LogAppender, DATA_START};
    use uuid::Uuid;

    const BYTES: u64 = (DATA_START + 64 * 1024) as u64;

    fn log_round_trip(dir: &Path) -> Persistence {
        let path = dir.join("local.nvlog");
        let agg = Uuid::from_bytes([3; 16]);
        let persistence;
        {
            let mut r = NvramRegion::open(&path, BYTES).unwrap();
            persistence = r.persistence();
            let mut log = LogAppender::format(r.bytes_mut(), agg, 1, 99).unwrap();
            for i in 0..10u8 {
                log.append(r.bytes_mut(), u64::from(i) * 4096, &[i; 700])
                    .unwrap();
            }
            let c = log.commit();
            r.persist(&c.ranges).unwrap();
        }
        let r = NvramRegion::open(&path, BYTES).unwrap();
        let replay = scan(
            r.bytes(),
            &Expect {
                aggregate: agg,
                generation: 1,
            },
        )
        .unwrap();
        assert_eq!(replay.records.len(), 10);
        for (i, rec) in replay.records.iter().enumerate() {
            assert_eq!(rec.offset, i as u64 * 4096);
            assert_eq!(replay.payload(r.bytes(), rec), &[i as u8; 700][..]);
        }
        // The bytes really are in the file, not only in our mapping.
        let on_file = std::fs::read(&path).unwrap();
        assert_eq!(&on_file[..], r.bytes());
        persistence
    }

    #[test]
    fn ext4_file_is_written_with_direct_io() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = log_round_trip(dir.path());
        assert_eq!(
            p,
            Persistence::DiskFile {
                fs: FsKind::Ext4,
                direct: true
            },
            "is /var/tmp on ext4 here?"
        );
        assert_eq!(p.to_string(), "NVRAM: file on ext4, direct I/O");
        assert!(p.survives_machine_crash());
    }

    /// The file's bytes at `off` as the device has them (O_DIRECT read: no page cache).
    fn on_device(path: &Path, off: u64) -> u8 {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap();
        let block = off / 4096 * 4096;
        let mut buf = Block::new();
        f.read_exact_at(&mut buf.0, block).unwrap();
        buf.0[(off - block) as usize]
    }

    /// One 4 KiB block, 4 KiB aligned (O_DIRECT).
    #[repr(C, align(4096))]
    struct Block([u8; 4096]);
    impl Block {
        fn new() -> Box<Block> {
            Box::new(Block([0; 4096]))
        }
    }

    #[test]
    fn write_back_puts_exactly_the_named_blocks_on_the_device() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("log");
        let mut r = NvramRegion::open(&path, BYTES).unwrap();
        assert_eq!(
            r.persistence(),
            Persistence::DiskFile {
                fs: FsKind::Ext4,
                direct: true
            }
        );
        r.bytes_mut()[100] = 1;
        r.bytes_mut()[3 * 4096 + 5] = 2;
        assert_eq!(
            (on_device(&path, 100), on_device(&path, 3 * 4096 + 5)),
            (0, 0),
            "memory only until written back"
        );
        r.write_back(&[50..101]).unwrap();
        assert_eq!(
            (on_device(&path, 100), on_device(&path, 3 * 4096 + 5)),
            (1, 0),
            "only the named block"
        );
        r.write_back(&[3 * 4096 + 5..3 * 4096 + 6]).unwrap();
        assert_eq!(on_device(&path, 3 * 4096 + 5), 2);
        r.flush_device().unwrap();
        let too_far = 0..BYTES as usize + 1;
        assert!(matches!(
            r.write_back(std::slice::from_ref(&too_far)),
            Err(NvramError::OutOfRange { .. })
        ));
        // The last block of the region, unaligned range end: rounded out, still inside.
        let last = BYTES as usize - 1;
        r.bytes_mut()[last] = 9;
        r.write_back(&[last..last + 1]).unwrap();
        assert_eq!(on_device(&path, last as u64), 9);
        drop(r);
        let again = NvramRegion::open(&path, BYTES).unwrap();
        assert_eq!(
            (
                again.bytes()[100],
                again.bytes()[3 * 4096 + 5],
                again.bytes()[last]
            ),
            (1, 2, 9),
            "loaded at open"
        );
    }

    #[test]
    fn dev_shm_is_tmpfs() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = log_round_trip(dir.path());
        assert_eq!(p, Persistence::Tmpfs);
        assert_eq!(
            p.to_string(),
            "NVRAM: file on tmpfs: survives a process kill only"
        );
        assert!(!p.survives_machine_crash());
    }

    #[test]
    fn two_regions_and_describe() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let nv = Nvram::open(&dir.path().join("a"), &dir.path().join("b"), BYTES).unwrap();
        assert_eq!(nv.describe(), "NVRAM: file on ext4, direct I/O");
        assert_eq!(nv.local.len(), BYTES as usize);
        drop(nv);
        let mixed = Nvram::open(&dir.path().join("a"), &shm.path().join("b"), BYTES).unwrap();
        assert_eq!(
            mixed.describe(),
            "local NVRAM: file on ext4, direct I/O; mirror NVRAM: file on tmpfs: survives a process kill only"
        );
    }

    #[test]
    fn existing_file_of_another_size_is_refused() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, [1u8; 8192]).unwrap();
        let err = NvramRegion::open(&path, BYTES).unwrap_err();
        assert!(
            matches!(err, NvramError::SizeMismatch { actual: 8192, .. }),
            "{err:?}"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            8192,
            "left untouched"
        );
    }

    #[test]
    fn persist_rejects_ranges_outside_the_region() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let r = NvramRegion::open(&dir.path().join("log"), BYTES).unwrap();
        let too_far = 0..BYTES as usize + 1;
        let err = r.persist(std::slice::from_ref(&too_far)).unwrap_err();
        assert!(matches!(err, NvramError::OutOfRange { .. }), "{err:?}");
        r.persist(&[0..10, 4000..5000]).unwrap();
    }

    #[test]
    fn flush_features_match_cpuinfo() {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let flags: Vec<&str> = info
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(
            flush_features(),
            (flags.contains(&"clwb"), flags.contains(&"clflushopt"))
        );
    }

    #[test]
    fn cache_line_flush_runs_on_ordinary_memory() {
        // No DAX here: this checks that the flush instructions chosen for this CPU execute
        // (a wrong choice faults with SIGILL) over unaligned ranges, and keep the data.
        let v: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        flush_cache_lines(&v[3..997]);
        flush_cache_lines(&v[..0]);
        store_fence();
        assert!(v.iter().enumerate().all(|(i, &b)| b == i as u8));
    }
}
