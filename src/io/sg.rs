//! SG_IO: sending SCSI commands to a Linux SCSI device (`/dev/sgN` or `/dev/sdX`) and the
//! persistent-reservation operations hapair fences with.
//!
//! The bytes come from [`crate::core::scsi`]; this module only moves them through the
//! `SG_IO` ioctl and turns every status the kernel reports into a typed result.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::core::scsi::{
    self, check_completion, Capacity, Cdb10, FullStatus, Keys, ParseError, PrInAction, PrOut,
    ReservationKey, ReservationStatus, ReservationType, ScsiError,
};
use crate::io::buf::IoBuf;

/// `SG_IO` ioctl request number (`<scsi/sg.h>`).
const SG_IO: libc::c_ulong = 0x2285;
/// `SG_GET_VERSION_NUM`: answered by sg devices and by the block layer's SCSI ioctls alike;
/// anything else (loop, files, ...) refuses it.
const SG_GET_VERSION_NUM: libc::c_ulong = 0x2282;
/// `SG_DXFER_NONE`.
const SG_DXFER_NONE: libc::c_int = -1;
/// `SG_DXFER_TO_DEV`.
const SG_DXFER_TO_DEV: libc::c_int = -2;
/// `SG_DXFER_FROM_DEV`.
const SG_DXFER_FROM_DEV: libc::c_int = -3;
/// Sense buffer size: enough for fixed (18+) and descriptor sense with a few descriptors.
const SENSE_LEN: usize = 64;
/// Default command timeout.
pub const DEFAULT_TIMEOUT_MS: u32 = 30_000;
/// Largest PERSISTENT RESERVE IN response we accept (the ALLOCATION LENGTH field is 16 bits).
const PR_IN_MAX: usize = u16::MAX as usize;

/// `struct sg_io_hdr` from `<scsi/sg.h>` (interface 'S'), field by field:
///
/// | field | dir | meaning |
/// | --- | --- | --- |
/// | interface_id | in | `'S'` |
/// | dxfer_direction | in | `SG_DXFER_*` |
/// | cmd_len | in | CDB length (<= 16) |
/// | mx_sb_len | in | size of the sense buffer |
/// | iovec_count | in | 0: `dxferp` is a flat buffer |
/// | dxfer_len | in | data buffer length |
/// | dxferp | in | data buffer |
/// | cmdp | in | CDB |
/// | sbp | in | sense buffer |
/// | timeout | in | milliseconds |
/// | flags | in | `SG_FLAG_*`, 0 |
/// | pack_id, usr_ptr | in/out | unused |
/// | status | out | SCSI status byte |
/// | masked_status | out | status >> 1 & 0x7f (obsolete) |
/// | msg_status | out | unused |
/// | sb_len_wr | out | sense bytes written |
/// | host_status | out | `DID_*` |
/// | driver_status | out | `DRIVER_*` |
/// | resid | out | dxfer_len minus bytes actually transferred |
/// | duration | out | milliseconds |
/// | info | out | `SG_INFO_*` |
#[repr(C)]
struct SgIoHdr {
    interface_id: libc::c_int,
    dxfer_direction: libc::c_int,
    cmd_len: libc::c_uchar,
    mx_sb_len: libc::c_uchar,
    iovec_count: libc::c_ushort,
    dxfer_len: libc::c_uint,
    dxferp: *mut libc::c_void,
    cmdp: *const libc::c_uchar,
    sbp: *mut libc::c_uchar,
    timeout: libc::c_uint,
    flags: libc::c_uint,
    pack_id: libc::c_int,
    usr_ptr: *mut libc::c_void,
    status: libc::c_uchar,
    masked_status: libc::c_uchar,
    msg_status: libc::c_uchar,
    sb_len_wr: libc::c_uchar,
    host_status: libc::c_ushort,
    driver_status: libc::c_ushort,
    resid: libc::c_int,
    duration: libc::c_uint,
    info: libc::c_uint,
}

#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<SgIoHdr>() == 88);

/// Errors of the SG_IO layer.
#[derive(Debug, thiserror::Error)]
pub enum SgError {
    /// The device node could not be opened.
    #[error("open {path}")]
    Open {
        /// Device path.
        path: PathBuf,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The path is not a SCSI device that takes SG_IO.
    #[error("{path}: not a SCSI generic device: {reason}")]
    NotSg {
        /// Device path.
        path: PathBuf,
        /// What it is instead.
        reason: String,
    },
    /// The SG_IO ioctl itself failed (bad arguments, device gone, ...).
    #[error("{path}: SG_IO ioctl")]
    Ioctl {
        /// Device path.
        path: PathBuf,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The command reached the SCSI layer and failed there.
    #[error("{path}: {op}")]
    Scsi {
        /// Device path.
        path: PathBuf,
        /// Which command.
        op: &'static str,
        /// Status, sense or response error.
        #[source]
        source: ScsiError,
    },
    /// Fewer bytes moved than a whole-block transfer needs.
    #[error("{path}: {op}: short transfer, {resid} of {len} bytes not transferred")]
    ShortTransfer {
        /// Device path.
        path: PathBuf,
        /// Which command.
        op: &'static str,
        /// Residual count the kernel reported.
        resid: usize,
        /// Bytes requested.
        len: usize,
    },
    /// A caller's buffer does not fit the command.
    #[error(
        "{op}: buffer of {len} bytes is not a whole number (1..=65535) of {block_len}-byte blocks"
    )]
    BadBuffer {
        /// Which command.
        op: &'static str,
        /// Buffer length.
        len: usize,
        /// Device block length.
        block_len: u32,
    },
}

impl SgError {
    /// The SCSI-level error, if the command got that far.
    pub fn scsi(&self) -> Option<&ScsiError> {
        match self {
            SgError::Scsi { source, .. } => Some(source),
            _ => None,
        }
    }

    /// See [`ScsiError::is_reservation_conflict`].
    pub fn is_reservation_conflict(&self) -> bool {
        self.scsi().is_some_and(ScsiError::is_reservation_conflict)
    }

    /// See [`ScsiError::is_unit_attention`].
    pub fn is_unit_attention(&self) -> bool {
        self.scsi().is_some_and(ScsiError::is_unit_attention)
    }

    /// See [`ScsiError::is_not_ready`].
    pub fn is_not_ready(&self) -> bool {
        self.scsi().is_some_and(ScsiError::is_not_ready)
    }

    /// See [`ScsiError::is_invalid_opcode`].
    pub fn is_invalid_opcode(&self) -> bool {
        self.scsi().is_some_and(ScsiError::is_invalid_opcode)
    }
}

/// Direction and buffer of one command's data phase.
pub enum Data<'a> {
    /// No data.
    None,
    /// Data to the device.
    ToDevice(&'a [u8]),
    /// Data from the device.
    FromDevice(&'a mut [u8]),
}

/// A SCSI device opened for SG_IO, with the persistent-reservation operations as methods.
///
/// One `PrDevice` is one I_T nexus: the initiator port of this host and the target port the
/// device node leads to. Registrations and reservations belong to that nexus.
#[derive(Debug)]
pub struct PrDevice {
    file: File,
    path: PathBuf,
    timeout_ms: u32,
}

/// Check that `file` answers `SG_GET_VERSION_NUM`, i.e. takes SG_IO.
fn sg_version(file: &File) -> io::Result<i32> {
    let mut version: libc::c_int = 0;
    // SAFETY: SG_GET_VERSION_NUM writes one int through the pointer, which points to a live
    // local c_int; the fd is open for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            SG_GET_VERSION_NUM,
            &mut version as *mut libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(version)
}

impl PrDevice {
    /// Open `path` read-write (PR OUT and WRITE need write access) and check that it takes
    /// SG_IO.
    pub fn open(path: impl AsRef<Path>) -> Result<PrDevice, SgError> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| SgError::Open {
                path: path.clone(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| SgError::Open {
            path: path.clone(),
            source,
        })?;
        let ft = meta.file_type();
        if !(ft.is_char_device() || ft.is_block_device()) {
            return Err(SgError::NotSg {
                path,
                reason: format!("a {} is not a device", kind(&ft)),
            });
        }
        if let Err(e) = sg_version(&file) {
            return Err(SgError::NotSg {
                path,
                reason: format!("SG_GET_VERSION_NUM refused ({e}): no SCSI passthrough"),
            });
        }
        Ok(PrDevice {
            file,
            path,
            timeout_ms: DEFAULT_TIMEOUT_MS,
        })
    }

    /// Device path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Change the per-command timeout.
    pub fn set_timeout_ms(&mut self, timeout_ms: u32) {
        self.timeout_ms = timeout_ms;
    }

    /// Send one command; returns the bytes transferred.
    pub fn execute(&self, op: &'static str, cdb: &Cdb10, data: Data<'_>) -> Result<usize, SgError> {
        let mut sense = [0u8; SENSE_LEN];
        let (direction, ptr, len) = match data {
            Data::None => (SG_DXFER_NONE, std::ptr::null_mut(), 0usize),
            // The kernel only reads a TO_DEV buffer; the field is `void *` for both directions.
            Data::ToDevice(b) => (SG_DXFER_TO_DEV, b.as_ptr() as *mut libc::c_void, b.len()),
            Data::FromDevice(b) => (
                SG_DXFER_FROM_DEV,
                b.as_mut_ptr() as *mut libc::c_void,
                b.len(),
            ),
        };
        let dxfer_len = u32::try_from(len).map_err(|_| SgError::BadBuffer {
            op,
            len,
            block_len: 1,
        })?;
        let mut hdr = SgIoHdr {
            interface_id: b'S' as libc::c_int,
            dxfer_direction: direction,
            cmd_len: cdb.len() as u8,
            mx_sb_len: SENSE_LEN as u8,
            iovec_count: 0,
            dxfer_len,
            dxferp: ptr,
            cmdp: cdb.as_ptr(),
            sbp: sense.as_mut_ptr(),
            timeout: self.timeout_ms,
            flags: 0,
            pack_id: 0,
            usr_ptr: std::ptr::null_mut(),
            status: 0,
            masked_status: 0,
            msg_status: 0,
            sb_len_wr: 0,
            host_status: 0,
            driver_status: 0,
            resid: 0,
            duration: 0,
            info: 0,
        };
        // SAFETY: hdr is a correctly laid out sg_io_hdr; cmdp points to `cdb` (cmd_len bytes),
        // sbp to `sense` (mx_sb_len bytes) and dxferp to a buffer of dxfer_len bytes (or null
        // with length 0), all borrowed for the whole call. SG_IO is synchronous: the kernel
        // neither reads nor writes these buffers after the ioctl returns.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), SG_IO, &mut hdr as *mut SgIoHdr) };
        if rc < 0 {
            return Err(SgError::Ioctl {
                path: self.path.clone(),
                source: io::Error::last_os_error(),
            });
        }
        let sense_len = (hdr.sb_len_wr as usize).min(SENSE_LEN);
        check_completion(
            hdr.status,
            hdr.host_status,
            hdr.driver_status,
            &sense[..sense_len],
        )
        .map_err(|source| SgError::Scsi {
            path: self.path.clone(),
            op,
            source,
        })?;
        let resid = usize::try_from(hdr.resid.max(0)).unwrap_or(0).min(len);
        Ok(len - resid)
    }

    fn pr_in(&self, op: &'static str, action: PrInAction) -> Result<IoBuf, SgError> {
        // Start with a page; if the device announces more, ask again with what it needs.
        let mut want = 4096usize;
        loop {
            let mut buf = IoBuf::new(want);
            let cdb = scsi::pr_in_cdb(action, want as u16);
            let got = self.execute(op, &cdb, Data::FromDevice(&mut buf))?;
            buf.set_len(got);
            if buf.len() >= 8 {
                let add = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
                let need = 8 + add;
                if need > buf.len() && buf.len() == want && want < PR_IN_MAX {
                    want = need.min(PR_IN_MAX);
                    continue;
                }
            }
            return Ok(buf);
        }
    }

    fn parsed<T>(&self, op: &'static str, r: Result<T, ParseError>) -> Result<T, SgError> {
        r.map_err(|e| SgError::Scsi {
            path: self.path.clone(),
            op,
            source: ScsiError::Response(e),
        })
    }

    /// PERSISTENT RESERVE IN / READ KEYS.
    pub fn read_keys(&self) -> Result<Keys, SgError> {
        const OP: &str = "PR IN READ KEYS";
        let buf = self.pr_in(OP, PrInAction::ReadKeys)?;
        self.parsed(OP, scsi::parse_read_keys(&buf))
    }

    /// PERSISTENT RESERVE IN / READ RESERVATION.
    pub fn read_reservation(&self) -> Result<ReservationStatus, SgError> {
        const OP: &str = "PR IN READ RESERVATION";
        let buf = self.pr_in(OP, PrInAction::ReadReservation)?;
        self.parsed(OP, scsi::parse_read_reservation(&buf))
    }

    /// PERSISTENT RESERVE IN / READ FULL STATUS.
    pub fn read_full_status(&self) -> Result<FullStatus, SgError> {
        const OP: &str = "PR IN READ FULL STATUS";
        let buf = self.pr_in(OP, PrInAction::ReadFullStatus)?;
        self.parsed(OP, scsi::parse_read_full_status(&buf))
    }

    fn pr_out(&self, op: &'static str, cmd: &PrOut) -> Result<(), SgError> {
        let params = cmd.params();
        self.execute(op, &cmd.cdb(), Data::ToDevice(&params))
            .map(|_| ())
    }

    /// REGISTER: change this nexus's key from `current` (0 if unregistered) to `new`
    /// (0 unregisters).
    pub fn register(&self, current: ReservationKey, new: ReservationKey) -> Result<(), SgError> {
        self.pr_out("PR OUT REGISTER", &PrOut::register(current, new))
    }

    /// REGISTER AND IGNORE EXISTING KEY.
    pub fn register_ignore(&self, new: ReservationKey) -> Result<(), SgError> {
        self.pr_out(
            "PR OUT REGISTER AND IGNORE EXISTING KEY",
            &PrOut::register_ignore(new),
        )
    }

    /// RESERVE.
    pub fn reserve(&self, key: ReservationKey, rtype: ReservationType) -> Result<(), SgError> {
        self.pr_out("PR OUT RESERVE", &PrOut::reserve(key, rtype))
    }

    /// RELEASE.
    pub fn release(&self, key: ReservationKey, rtype: ReservationType) -> Result<(), SgError> {
        self.pr_out("PR OUT RELEASE", &PrOut::release(key, rtype))
    }

    /// PREEMPT the registrations of `victim` (and take its reservation as `rtype`).
    pub fn preempt(
        &self,
        key: ReservationKey,
        victim: ReservationKey,
        rtype: ReservationType,
    ) -> Result<(), SgError> {
        self.pr_out("PR OUT PREEMPT", &PrOut::preempt(key, victim, rtype, false))
    }

    /// PREEMPT AND ABORT: as [`PrDevice::preempt`], and abort the victim's queued commands.
    /// This is the fence.
    pub fn preempt_and_abort(
        &self,
        key: ReservationKey,
        victim: ReservationKey,
        rtype: ReservationType,
    ) -> Result<(), SgError> {
        self.pr_out(
            "PR OUT PREEMPT AND ABORT",
            &PrOut::preempt(key, victim, rtype, true),
        )
    }

    /// CLEAR all registrations and the reservation.
    pub fn clear(&self, key: ReservationKey) -> Result<(), SgError> {
        self.pr_out("PR OUT CLEAR", &PrOut::clear(key))
    }

    /// READ CAPACITY(10).
    pub fn read_capacity(&self) -> Result<Capacity, SgError> {
        const OP: &str = "READ CAPACITY(10)";
        let mut buf = IoBuf::new(8);
        let got = self.execute(OP, &scsi::read_capacity10_cdb(), Data::FromDevice(&mut buf))?;
        self.parsed(OP, scsi::parse_read_capacity10(&buf[..got]))
    }

    fn blocks_of(op: &'static str, len: usize, block_len: u32) -> Result<u16, SgError> {
        let bad = SgError::BadBuffer { op, len, block_len };
        if block_len == 0 || len == 0 || len % block_len as usize != 0 {
            return Err(bad);
        }
        u16::try_from(len / block_len as usize).map_err(|_| bad)
    }

    /// READ(10) of `buf.len()` bytes (whole blocks of `block_len`) from `lba`.
    pub fn read_blocks(&self, lba: u32, block_len: u32, buf: &mut [u8]) -> Result<(), SgError> {
        const OP: &str = "READ(10)";
        let blocks = Self::blocks_of(OP, buf.len(), block_len)?;
        let len = buf.len();
        let got = self.execute(OP, &scsi::read10_cdb(lba, blocks), Data::FromDevice(buf))?;
        if got != len {
            return Err(SgError::ShortTransfer {
                path: self.path.clone(),
                op: OP,
                resid: len - got,
                len,
            });
        }
        Ok(())
    }

    /// WRITE(10) of `buf` (whole blocks of `block_len`) at `lba`; `fua` asks for Force Unit
    /// Access (devices without FUA emulation, e.g. LIO fileio by default, refuse it with
    /// INVALID FIELD IN CDB).
    pub fn write_blocks(
        &self,
        lba: u32,
        block_len: u32,
        buf: &[u8],
        fua: bool,
    ) -> Result<(), SgError> {
        const OP: &str = "WRITE(10)";
        let blocks = Self::blocks_of(OP, buf.len(), block_len)?;
        let got = self.execute(
            OP,
            &scsi::write10_cdb(lba, blocks, fua),
            Data::ToDevice(buf),
        )?;
        if got != buf.len() {
            return Err(SgError::ShortTransfer {
                path: self.path.clone(),
                op: OP,
                resid: buf.len() - got,
                len: buf.len(),
            });
        }
        Ok(())
    }
}

/// Run `f` again while it fails with UNIT ATTENTION, at most `attempts` times in all. A unit
/// attention means "something changed, command not executed" (reset, registrations
/// preempted, ...); it is reported once per nexus and then cleared. Each unit attention seen
/// is passed to `seen` so callers can log or check it.
pub fn retry_unit_attention<T>(
    attempts: u32,
    mut seen: impl FnMut(&SgError),
    mut f: impl FnMut() -> Result<T, SgError>,
) -> Result<T, SgError> {
    let mut left = attempts.max(1);
    loop {
        match f() {
            Err(e) if e.is_unit_attention() && left > 1 => {
                seen(&e);
                left -= 1;
            }
            r => return r,
        }
    }
}

fn kind(ft: &std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "regular file"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

/// Why a path does not offer persistent reservations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoPrReason {
    /// Not a device node at all (regular file, directory, ...).
    NotADevice(&'static str),
    /// A device without SCSI passthrough (loop, nvme without SCSI translation, ...): the
    /// errno of `SG_GET_VERSION_NUM`.
    NoScsiPassthrough(&'static str, i32),
    /// A SCSI device that does not know PERSISTENT RESERVE IN (sense 5/20/00): e.g. Linux
    /// `scsi_debug` or qemu's emulated `scsi-hd`.
    InvalidOpcode(String),
    /// A SCSI device that refused READ KEYS with ILLEGAL REQUEST for another reason (for
    /// example INVALID FIELD IN CDB for an unsupported service action).
    IllegalRequest(String),
}

impl std::fmt::Display for NoPrReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoPrReason::NotADevice(k) => write!(f, "{k}, not a device"),
            NoPrReason::NoScsiPassthrough(k, errno) => write!(
                f,
                "{k} without SCSI passthrough (SG_GET_VERSION_NUM: {})",
                io::Error::from_raw_os_error(*errno)
            ),
            NoPrReason::InvalidOpcode(s) => {
                write!(f, "device does not support PERSISTENT RESERVE IN ({s})")
            }
            NoPrReason::IllegalRequest(s) => write!(f, "device refused READ KEYS ({s})"),
        }
    }
}

/// Outcome of [`probe`]: whether fencing can use persistent reservations on a path, or must
/// fall back to the mailbox alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrSupport {
    /// READ KEYS worked.
    Supported {
        /// The keys registered right now.
        keys: Keys,
    },
    /// No PR on this path, and why.
    Unsupported(NoPrReason),
}

/// Does `path` support SCSI-3 persistent reservations? Sends READ KEYS (retrying through
/// unit attentions). Returns `Err` only for failures that say nothing about PR support
/// (cannot open, device not ready, transport errors): a caller must not silently choose
/// mailbox-only fencing on those.
pub fn probe(path: impl AsRef<Path>) -> Result<PrSupport, SgError> {
    let path = path.as_ref();
    let meta = std::fs::metadata(path).map_err(|source| SgError::Open {
        path: path.into(),
        source,
    })?;
    let ft = meta.file_type();
    if !(ft.is_char_device() || ft.is_block_device()) {
        return Ok(PrSupport::Unsupported(NoPrReason::NotADevice(kind(&ft))));
    }
    // Open read-only for the check: PR IN needs no write access, and a read-only open is
    // harmless on any device node.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| SgError::Open {
            path: path.into(),
            source,
        })?;
    if let Err(e) = sg_version(&file) {
        return match e.raw_os_error() {
            Some(errno @ (libc::ENOTTY | libc::EINVAL)) => Ok(PrSupport::Unsupported(
                NoPrReason::NoScsiPassthrough(kind(&ft), errno),
            )),
            _ => Err(SgError::Ioctl {
                path: path.into(),
                source: e,
            }),
        };
    }
    let dev = PrDevice {
        file,
        path: path.into(),
        timeout_ms: DEFAULT_TIMEOUT_MS,
    };
    match retry_unit_attention(4, |_| {}, || dev.read_keys()) {
        Ok(keys) => Ok(PrSupport::Supported { keys }),
        Err(e) if e.is_invalid_opcode() => Ok(PrSupport::Unsupported(NoPrReason::InvalidOpcode(
            e.scsi()
                .and_then(ScsiError::sense)
                .map(|s| s.to_string())
                .unwrap_or_default(),
        ))),
        Err(e)
            if e.scsi()
                .and_then(ScsiError::sense)
                .is_some_and(|s| s.key == scsi::SenseKey::IllegalRequest) =>
        {
            Ok(PrSupport::Unsupported(NoPrReason::IllegalRequest(
                e.scsi()
                    .and_then(ScsiError::sense)
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            )))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::Command;

    /// A loop device attached for the test and detached on drop (also when the test fails).
    struct Loop(String);

    impl Loop {
        fn attach(file: &Path) -> Loop {
            let out = Command::new("losetup")
                .args(["-f", "--show"])
                .arg(file)
                .output()
                .expect("run losetup (this test needs root and util-linux)");
            assert!(
                out.status.success(),
                "losetup failed (this test needs root and loop devices): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }

    fn backing_file() -> tempfile::NamedTempFile {
        // On the worktree's filesystem, not /tmp: loop wants a real filesystem file.
        let mut f = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        f.write_all(&vec![0u8; 1 << 20]).unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn probe_regular_file_says_no_pr() {
        let f = backing_file();
        let r = probe(f.path()).unwrap();
        assert_eq!(
            r,
            PrSupport::Unsupported(NoPrReason::NotADevice("regular file"))
        );
        if let PrSupport::Unsupported(reason) = r {
            assert_eq!(reason.to_string(), "regular file, not a device");
        }
        let e = PrDevice::open(f.path()).unwrap_err();
        assert!(matches!(e, SgError::NotSg { .. }), "{e}");
        assert!(e
            .to_string()
            .starts_with(&format!("{}: not a SCSI", f.path().display())));
        assert!(
            e.to_string().contains("regular file is not a device"),
            "{e}"
        );
    }

    #[test]
    fn probe_directory_and_missing_path() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            probe(d.path()).unwrap(),
            PrSupport::Unsupported(NoPrReason::NotADevice("directory"))
        );
        let missing = d.path().join("nope");
        let e = probe(&missing).unwrap_err();
        assert!(
            matches!(&e, SgError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
    }

    #[test]
    fn probe_char_device_without_sg() {
        match probe("/dev/null").unwrap() {
            PrSupport::Unsupported(NoPrReason::NoScsiPassthrough("character device", errno)) => {
                assert!(
                    errno == libc::ENOTTY || errno == libc::EINVAL,
                    "errno {errno}"
                )
            }
            other => panic!("/dev/null probed as {other:?}"),
        }
        let e = PrDevice::open("/dev/null").unwrap_err();
        assert!(e.to_string().contains("SG_GET_VERSION_NUM refused"), "{e}");
    }

    #[test]
    fn probe_loop_device_says_no_pr() {
        let f = backing_file();
        let lo = Loop::attach(f.path());
        let r = probe(&lo.0).unwrap();
        let PrSupport::Unsupported(reason) = r else {
            panic!("{} probed as {r:?}", lo.0)
        };
        let NoPrReason::NoScsiPassthrough(k, errno) = &reason else {
            panic!("{}: unexpected reason {reason:?}", lo.0)
        };
        assert_eq!(*k, "block device");
        assert!(
            *errno == libc::ENOTTY || *errno == libc::EINVAL,
            "errno {errno}"
        );
        assert!(reason
            .to_string()
            .starts_with("block device without SCSI passthrough"));
    }

    #[test]
    fn block_counts_checked() {
        assert_eq!(PrDevice::blocks_of("x", 4096, 512).unwrap(), 8);
        assert!(PrDevice::blocks_of("x", 4097, 512).is_err());
        assert!(PrDevice::blocks_of("x", 0, 512).is_err());
        assert!(PrDevice::blocks_of("x", 512, 0).is_err());
        assert!(PrDevice::blocks_of("x", 512 * 65536, 512).is_err());
        assert_eq!(PrDevice::blocks_of("x", 512 * 65535, 512).unwrap(), 65535);
    }

    #[test]
    fn retry_stops_on_other_errors_and_bounds_unit_attentions() {
        let ua = || SgError::Scsi {
            path: "/dev/x".into(),
            op: "t",
            source: ScsiError::CheckCondition(scsi::Sense {
                format: scsi::SenseFormat::Fixed,
                current: true,
                key: scsi::SenseKey::UnitAttention,
                asc: 0x2a,
                ascq: 0x05,
            }),
        };
        let mut calls = 0;
        let mut seen = 0;
        let r: Result<(), _> = retry_unit_attention(
            3,
            |_| seen += 1,
            || {
                calls += 1;
                Err(ua())
            },
        );
        assert!(r.unwrap_err().is_unit_attention());
        assert_eq!((calls, seen), (3, 2));
        let mut calls = 0;
        let r: Result<(), _> = retry_unit_attention(
            3,
            |_| {},
            || {
                calls += 1;
                if calls == 1 {
                    Err(ua())
                } else {
                    Err(SgError::Scsi {
                        path: "/dev/x".into(),
                        op: "t",
                        source: ScsiError::ReservationConflict,
                    })
                }
            },
        );
        let e: SgError = r.unwrap_err();
        assert!(e.is_reservation_conflict());
        assert_eq!(calls, 2);
    }
}
