//! Shared helpers for the NBD integration tests: a file-backed backend, a gated backend for
//! holding requests in flight, and a raw protocol client that can send anything.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hapair::core::nbd::*;
use hapair::daemon::backend::{Backend, BackendError, BlockSizes};

/// A backend over a regular file in /var/tmp (ext4 here, like a real deployment's disks),
/// with pread/pwrite; zeroes are written, never punched.
pub struct FileBackend {
    file: File,
    size: u64,
    sizes: BlockSizes,
    _tmp: tempfile::NamedTempFile,
    pub flushes: AtomicU64,
    /// The longest read or write the backend was called with.
    pub largest: AtomicU64,
    /// Calls whose offset or length was not a multiple of the minimum block size.
    pub misaligned: AtomicU64,
    /// Every read takes at least this long (microseconds): widens race windows in tests.
    pub read_delay_us: AtomicU64,
    /// This many of the next reads panic (a bug in a backend, injected).
    pub panic_reads: AtomicU64,
}

impl FileBackend {
    pub fn new(size: u64, sizes: BlockSizes) -> FileBackend {
        let tmp = tempfile::Builder::new()
            .prefix("hapair-nbd-")
            .tempfile_in("/var/tmp")
            .unwrap();
        tmp.as_file().set_len(size).unwrap();
        let file = tmp.reopen().unwrap();
        FileBackend {
            file,
            size,
            sizes,
            _tmp: tmp,
            flushes: AtomicU64::new(0),
            largest: AtomicU64::new(0),
            misaligned: AtomicU64::new(0),
            panic_reads: AtomicU64::new(0),
            read_delay_us: AtomicU64::new(0),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        self._tmp.path()
    }

    pub fn contents(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        self.file.read_exact_at(&mut v, 0).unwrap();
        v
    }

    pub fn fill(&self, data: &[u8]) {
        self.file.write_all_at(data, 0).unwrap();
    }

    fn check_aligned(&self, offset: u64, len: u64) {
        let min = u64::from(self.sizes.min_bytes);
        if offset % min != 0 || len % min != 0 {
            self.misaligned.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn io_err(e: std::io::Error) -> BackendError {
    BackendError::Io(e.to_string())
}

impl Backend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.size
    }
    fn block_sizes(&self) -> BlockSizes {
        self.sizes
    }
    fn multi_conn_safe(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.check_aligned(offset, buf.len() as u64);
        self.largest.fetch_max(buf.len() as u64, Ordering::Relaxed);
        if self
            .panic_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("injected backend panic (a test)");
        }
        let delay = self.read_delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_micros(delay));
        }
        self.file.read_exact_at(buf, offset).map_err(io_err)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.check_aligned(offset, data.len() as u64);
        self.largest.fetch_max(data.len() as u64, Ordering::Relaxed);
        self.file.write_all_at(data, offset).map_err(io_err)?;
        if fua {
            self.file.sync_data().map_err(io_err)?;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.check_aligned(offset, len);
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file
                .write_all_at(&zeroes[..n], offset + done)
                .map_err(io_err)?;
            done += n as u64;
        }
        if fua {
            self.file.sync_data().map_err(io_err)?;
        }
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.check_aligned(offset, len);
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.file.sync_data().map_err(io_err)
    }
}

/// Wraps a backend; every data operation waits until the gate is opened. With
/// `starts_writes`, writes take the server's fast path (`Backend::start_write`: written to the
/// inner backend at once, acknowledged once `finish_writes` passes the gate, or fails it with
/// EIO while `fail_finish` is set).
pub struct GatedBackend<B> {
    pub inner: B,
    pub open: Mutex<bool>,
    pub cv: Condvar,
    pub started: AtomicU64,
    pub starts_writes: bool,
    pub fail_finish: std::sync::atomic::AtomicBool,
    /// Writes started, and the highest token finished.
    pub writes_started: AtomicU64,
    pub finished_upto: AtomicU64,
    /// Calls of `read_batch` with more than one read (the server grouped them); the server
    /// groups only with `batches_reads`.
    pub grouped_reads: AtomicU64,
    pub batches_reads: bool,
    /// The same for writes (`write_batch`, `batches_writes`).
    pub grouped_writes: AtomicU64,
    pub batches_writes: bool,
}

impl<B: Backend> GatedBackend<B> {
    pub fn new(inner: B) -> GatedBackend<B> {
        GatedBackend {
            inner,
            open: Mutex::new(false),
            cv: Condvar::new(),
            started: AtomicU64::new(0),
            starts_writes: false,
            fail_finish: Default::default(),
            writes_started: AtomicU64::new(0),
            finished_upto: AtomicU64::new(0),
            grouped_reads: AtomicU64::new(0),
            batches_reads: false,
            grouped_writes: AtomicU64::new(0),
            batches_writes: false,
        }
    }
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
    pub fn close(&self) {
        *self.open.lock().unwrap() = false;
    }
    fn wait(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
        let mut g = self.open.lock().unwrap();
        while !*g {
            g = self.cv.wait(g).unwrap();
        }
    }
}

impl<B: Backend> Backend for GatedBackend<B> {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn block_sizes(&self) -> BlockSizes {
        self.inner.block_sizes()
    }
    fn multi_conn_safe(&self) -> bool {
        self.inner.multi_conn_safe()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.wait();
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.wait();
        self.inner.write(offset, data, fua)
    }
    fn batches_reads(&self) -> bool {
        self.batches_reads
    }
    fn read_batch(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), BackendError> {
        if reads.len() > 1 {
            self.grouped_reads.fetch_add(1, Ordering::SeqCst);
        }
        for (offset, buf) in reads.iter_mut() {
            self.read(*offset, buf)?;
        }
        Ok(())
    }
    fn batches_writes(&self) -> bool {
        self.batches_writes
    }
    fn write_batch(&self, writes: &[(u64, &[u8])], fua: bool) -> Result<(), BackendError> {
        if writes.len() > 1 {
            self.grouped_writes.fetch_add(1, Ordering::SeqCst);
        }
        for (offset, data) in writes {
            self.write(*offset, data, fua)?;
        }
        Ok(())
    }
    fn start_write(&self, offset: u64, data: &[u8]) -> Result<Option<u64>, BackendError> {
        if !self.starts_writes {
            return Ok(None);
        }
        self.inner.write(offset, data, false)?;
        Ok(Some(self.writes_started.fetch_add(1, Ordering::SeqCst) + 1))
    }
    fn finish_writes(&self, upto: u64, fua: bool) -> Result<(), BackendError> {
        self.wait();
        if self.fail_finish.load(Ordering::SeqCst) {
            return Err(BackendError::Io(
                "injected: the log could not be written".into(),
            ));
        }
        if fua {
            self.inner.flush()?;
        }
        self.finished_upto.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.wait();
        self.inner.write_zeroes(offset, len, fua)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.inner.trim(offset, len)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.wait();
        self.inner.flush()
    }
}

pub fn sizes(min: u32, preferred: u32, max: u32) -> BlockSizes {
    BlockSizes {
        min_bytes: min,
        preferred_bytes: preferred,
        max_bytes: max,
    }
}

/// Poll `f` until it is true, failing the test after `secs`.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A structured reply chunk as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub ty: u16,
    pub handle: u64,
    pub payload: Vec<u8>,
}

/// One reply of either kind, for clients that negotiated structured replies and also get
/// simple replies for non-reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple { errno: u32, handle: u64 },
    Chunk(Chunk),
}

/// A raw NBD client that can send malformed input.
pub struct RawClient {
    pub s: TcpStream,
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        RawClient { s }
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Read the greeting and answer with `client_flags`.
    pub fn greet(&mut self, client_flags: u32) {
        let g = self.read_n(18);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(be16(&g[16..18]), HS_FLAG_FIXED_NEWSTYLE | HS_FLAG_NO_ZEROES);
        self.send(&client_flags.to_be_bytes());
    }

    pub fn send_option(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// (option, reply type, data)
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(be64(&h[0..8]), OPTION_REPLY_MAGIC);
        let len = be32(&h[16..20]) as usize;
        (be32(&h[8..12]), be32(&h[12..16]), self.read_n(len))
    }

    pub fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    /// Send INFO/GO and collect the NBD_REP_INFO replies until the final reply.
    /// Returns (infos by type, final reply type).
    pub fn info(&mut self, opt: u32, name: &str, reqs: &[u16]) -> (Vec<(u16, Vec<u8>)>, u32) {
        self.send_option(opt, &Self::info_data(name, reqs));
        let mut infos = Vec::new();
        loop {
            let (o, ty, data) = self.option_reply();
            assert_eq!(o, opt);
            if ty == REP_INFO {
                infos.push((be16(&data[0..2]), data[2..].to_vec()));
            } else {
                return (infos, ty);
            }
        }
    }

    /// Full handshake with NBD_OPT_GO; returns (size, transmission flags).
    pub fn open(addr: SocketAddr, name: &str, structured: bool) -> (RawClient, u64, u16) {
        let mut c = RawClient::connect(addr);
        c.greet(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
        if structured {
            c.send_option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.option_reply(), (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
        }
        let (infos, fin) = c.info(OPT_GO, name, &[INFO_BLOCK_SIZE]);
        assert_eq!(fin, REP_ACK, "GO failed");
        let exp = infos
            .iter()
            .find(|(t, _)| *t == INFO_EXPORT)
            .expect("NBD_INFO_EXPORT");
        (c, be64(&exp.1[0..8]), be16(&exp.1[8..10]))
    }

    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let h = RequestHeader {
            flags,
            kind,
            handle,
            offset,
            length,
        };
        let mut m = encode_request_header(&h).to_vec();
        m.extend_from_slice(payload);
        self.send(&m);
    }

    /// Read one reply header (simple or structured) and its payload. For a successful simple
    /// reply to a read, `read_len` bytes of data follow and are returned in a Chunk-less form.
    pub fn reply(&mut self) -> Reply {
        let m = self.read_n(4);
        match be32(&m) {
            SIMPLE_REPLY_MAGIC => {
                let r = self.read_n(12);
                Reply::Simple {
                    errno: be32(&r[0..4]),
                    handle: be64(&r[4..12]),
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let r = self.read_n(16);
                let len = be32(&r[12..16]) as usize;
                Reply::Chunk(Chunk {
                    flags: be16(&r[0..2]),
                    ty: be16(&r[2..4]),
                    handle: be64(&r[4..12]),
                    payload: self.read_n(len),
                })
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    pub fn simple(&mut self) -> (u32, u64) {
        match self.reply() {
            Reply::Simple { errno, handle } => (errno, handle),
            r => panic!("expected a simple reply, got {r:?}"),
        }
    }

    pub fn chunk(&mut self) -> Chunk {
        match self.reply() {
            Reply::Chunk(c) => c,
            r => panic!("expected a structured chunk, got {r:?}"),
        }
    }

    /// True when the server closed the connection (EOF or reset) within the read timeout.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ),
        }
    }
}

/// Fail loudly when a client tool is missing.
pub fn need(tool: &str) -> std::path::PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = std::path::Path::new(dir).join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{tool} is not installed: these tests need real NBD clients \
         (apt-get install -y fio libnbd-bin nbdkit qemu-utils)"
    );
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; n];
    r.fill_bytes(&mut v);
    v
}

pub type Shared<B> = Arc<B>;
