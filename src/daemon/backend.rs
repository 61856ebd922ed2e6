//! What an export serves: a block device-like backend. The NBD server speaks only to this trait.

use crate::io::buf::IoBuf;

/// Errors a backend returns; each maps onto one NBD error code.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The data could not be read or written (NBD_EIO).
    #[error("I/O error: {0}")]
    Io(String),
    /// The request lies outside the device or is misaligned (NBD_EINVAL).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No space (NBD_ENOSPC).
    #[error("no space: {0}")]
    NoSpace(String),
    /// The backend is read-only or fenced (NBD_EPERM).
    #[error("not permitted: {0}")]
    NotPermitted(String),
}

/// Block size constraints advertised to clients (NBD_INFO_BLOCK_SIZE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest request size and alignment the backend handles (power of two).
    pub min_bytes: u32,
    /// Size and alignment that performs best (power of two, >= min).
    pub preferred_bytes: u32,
    /// Largest payload of a single request (multiple of min).
    pub max_bytes: u32,
}

/// A block backend. Implementations are internally synchronised: any number of threads may call
/// any method at once. Offsets and lengths are in bytes and have been checked against
/// [`Backend::size_bytes`] and [`Backend::block_sizes`] by the caller.
pub trait Backend: Send + Sync + 'static {
    /// Size of the device in bytes.
    fn size_bytes(&self) -> u64;
    /// Block size constraints.
    fn block_sizes(&self) -> BlockSizes;
    /// True when concurrent connections see one consistent device and a flush on any of them
    /// makes every completed write durable (NBD_FLAG_CAN_MULTI_CONN).
    fn multi_conn_safe(&self) -> bool;
    /// A page-aligned buffer for a payload of `len` bytes.
    fn alloc(&self, len: usize) -> IoBuf {
        IoBuf::new(len)
    }
    /// Read `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    /// Write `data` at `offset`; with `fua`, durable before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError>;
    /// True when [`Backend::read_batch`] does the reads together (one round of device I/O):
    /// then the server groups a connection's pipelined reads. Otherwise they go to workers
    /// one by one, in parallel.
    fn batches_reads(&self) -> bool {
        false
    }
    /// Read several ranges (a batch of requests of one connection); `Ok` only when every one
    /// was read. The default reads them one by one; a backend over devices submits them together.
    fn read_batch(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), BackendError> {
        for (offset, buf) in reads.iter_mut() {
            self.read(*offset, buf)?;
        }
        Ok(())
    }
    /// True when [`Backend::write_batch`] does the writes together: then the server groups a
    /// connection's pipelined writes.
    fn batches_writes(&self) -> bool {
        false
    }
    /// Write several ranges (a batch of requests of one connection; two may overlap, then the
    /// later one wins); with `fua`, all durable before returning. `Ok` only when every one was
    /// written. The default writes them one by one.
    fn write_batch(&self, writes: &[(u64, &[u8])], fua: bool) -> Result<(), BackendError> {
        for (offset, data) in writes {
            self.write(*offset, data, fua)?;
        }
        Ok(())
    }
    /// Start a write that the caller acknowledges later without holding a thread for it: `Some`
    /// token once the data is taken (reads see it), to pass to [`Backend::finish_writes`];
    /// `None` where this backend or this write needs the blocking [`Backend::write`]. Must not
    /// wait for I/O. Tokens increase: finishing one finishes every earlier one.
    fn start_write(&self, _offset: u64, _data: &[u8]) -> Result<Option<u64>, BackendError> {
        Ok(None)
    }
    /// Wait until every write started up to token `upto` may be acknowledged; with `fua`,
    /// durable as a FUA write is.
    fn finish_writes(&self, _upto: u64, _fua: bool) -> Result<(), BackendError> {
        Err(BackendError::Io("this backend starts no writes".into()))
    }
    /// Write `len` zero bytes at `offset` (never by punching holes).
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError>;
    /// Advise that `len` bytes at `offset` are no longer needed. May do nothing.
    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<(), BackendError>;
}

/// An in-memory backend for unit tests of protocol code. Never used in place of a real device.
pub struct MemBackend {
    data: std::sync::Mutex<Vec<u8>>,
    sizes: BlockSizes,
}

impl MemBackend {
    /// A zeroed memory device of `size_bytes`.
    pub fn new(size_bytes: u64, sizes: BlockSizes) -> MemBackend {
        MemBackend {
            data: std::sync::Mutex::new(vec![0; size_bytes as usize]),
            sizes,
        }
    }
}

impl Backend for MemBackend {
    fn size_bytes(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn block_sizes(&self) -> BlockSizes {
        self.sizes
    }
    fn multi_conn_safe(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let d = self.data.lock().unwrap();
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), BackendError> {
        let mut d = self.data.lock().unwrap();
        let o = offset as usize;
        d[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), BackendError> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
}
