//! SCSI-3 persistent reservations, sans-io: CDB and parameter-list builders, response parsers,
//! sense-data decoding and the interpretation of an SG_IO completion (status, host and driver
//! status, sense) as a typed result.
//!
//! Nothing here touches a file descriptor; [`crate::io::sg`] sends these bytes with SG_IO.
//! Field layouts follow SPC-4 (PERSISTENT RESERVE IN/OUT, sense data) and SBC-3 (READ(10),
//! WRITE(10), READ CAPACITY(10)). All multi-byte fields on the wire are big-endian.

use std::fmt;

/// A reservation key: the 8-byte value a node registers with. 0 means "no key" on the wire
/// (REGISTER with SERVICE ACTION RESERVATION KEY 0 unregisters).
pub type ReservationKey = u64;

/// Operation code of PERSISTENT RESERVE IN.
pub const OP_PERSISTENT_RESERVE_IN: u8 = 0x5e;
/// Operation code of PERSISTENT RESERVE OUT.
pub const OP_PERSISTENT_RESERVE_OUT: u8 = 0x5f;
/// Operation code of READ(10).
pub const OP_READ_10: u8 = 0x28;
/// Operation code of WRITE(10).
pub const OP_WRITE_10: u8 = 0x2a;
/// Operation code of READ CAPACITY(10).
pub const OP_READ_CAPACITY_10: u8 = 0x25;

/// Length of every CDB this module builds.
pub const CDB10_LEN: usize = 10;
/// A 10-byte command descriptor block.
pub type Cdb10 = [u8; CDB10_LEN];

/// Length of the basic PERSISTENT RESERVE OUT parameter list (SPC-4 table "PERSISTENT RESERVE
/// OUT parameter list"), used by every service action we send.
pub const PR_OUT_PARAM_LEN: usize = 24;

/// SCSI status byte values (SAM-5) that the SG_IO layer reports in `status`.
pub mod status {
    /// GOOD.
    pub const GOOD: u8 = 0x00;
    /// CHECK CONDITION: sense data describes the error.
    pub const CHECK_CONDITION: u8 = 0x02;
    /// CONDITION MET.
    pub const CONDITION_MET: u8 = 0x04;
    /// BUSY.
    pub const BUSY: u8 = 0x08;
    /// RESERVATION CONFLICT: the I_T nexus is not allowed this command by a reservation.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    /// TASK SET FULL.
    pub const TASK_SET_FULL: u8 = 0x28;
    /// ACA ACTIVE.
    pub const ACA_ACTIVE: u8 = 0x30;
    /// TASK ABORTED.
    pub const TASK_ABORTED: u8 = 0x40;
}

/// The persistent reservation types of SPC-4 (the TYPE field, low nibble of the scope/type byte).
///
/// hapair fences with [`ReservationType::WriteExclusive`]; see `FENCING_TYPE` in
/// `src/bin/hapair-prtest.rs` and the README for why not the registrants-only type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReservationType {
    /// Only the reservation holder may write; anyone may read.
    WriteExclusive = 0x1,
    /// Only the reservation holder may read or write.
    ExclusiveAccess = 0x3,
    /// Every registered I_T nexus may write; anyone may read. One holder.
    WriteExclusiveRegistrantsOnly = 0x5,
    /// Every registered I_T nexus may read or write. One holder.
    ExclusiveAccessRegistrantsOnly = 0x6,
    /// Every registered I_T nexus may write and every registrant is a holder.
    WriteExclusiveAllRegistrants = 0x7,
    /// Every registered I_T nexus may read or write and every registrant is a holder.
    ExclusiveAccessAllRegistrants = 0x8,
}

impl ReservationType {
    /// The TYPE field value.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Decode a TYPE field value; `None` for reserved/obsolete codes.
    pub fn from_code(code: u8) -> Option<ReservationType> {
        use ReservationType::*;
        Some(match code {
            0x1 => WriteExclusive,
            0x3 => ExclusiveAccess,
            0x5 => WriteExclusiveRegistrantsOnly,
            0x6 => ExclusiveAccessRegistrantsOnly,
            0x7 => WriteExclusiveAllRegistrants,
            0x8 => ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// Short operator name, as sg_persist spells it.
    pub fn name(self) -> &'static str {
        use ReservationType::*;
        match self {
            WriteExclusive => "Write Exclusive",
            ExclusiveAccess => "Exclusive Access",
            WriteExclusiveRegistrantsOnly => "Write Exclusive, registrants only",
            ExclusiveAccessRegistrantsOnly => "Exclusive Access, registrants only",
            WriteExclusiveAllRegistrants => "Write Exclusive, all registrants",
            ExclusiveAccessAllRegistrants => "Exclusive Access, all registrants",
        }
    }
}

impl fmt::Display for ReservationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The only SCOPE SPC-4 still defines: LU_SCOPE (0h), the whole logical unit.
pub const SCOPE_LU: u8 = 0x0;

/// PERSISTENT RESERVE IN service actions (CDB byte 1, bits 4..0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PrInAction {
    /// Registered keys.
    ReadKeys = 0x00,
    /// The reservation, if any.
    ReadReservation = 0x01,
    /// What the device supports (not parsed here).
    ReportCapabilities = 0x02,
    /// Every registration with its transport ID and holder flag.
    ReadFullStatus = 0x03,
}

/// PERSISTENT RESERVE OUT service actions (CDB byte 1, bits 4..0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PrOutAction {
    /// Register, change or (new key 0) remove this I_T nexus's key; the current key must match.
    Register = 0x00,
    /// Create a reservation of the given type, held by this registrant.
    Reserve = 0x01,
    /// Release the reservation this nexus holds (type must match).
    Release = 0x02,
    /// Remove every registration and the reservation.
    Clear = 0x03,
    /// Remove registrations with the victim key; take its reservation if it held one.
    Preempt = 0x04,
    /// Like PREEMPT, and also abort the victims' outstanding commands.
    PreemptAndAbort = 0x05,
    /// Register whatever key is currently registered for this nexus.
    RegisterAndIgnoreExistingKey = 0x06,
}

impl PrOutAction {
    /// Whether the CDB's TYPE field is meaningful for this action (SPC-4: RESERVE, RELEASE,
    /// PREEMPT, PREEMPT AND ABORT); it is sent as zero otherwise.
    pub fn uses_type(self) -> bool {
        matches!(
            self,
            PrOutAction::Reserve
                | PrOutAction::Release
                | PrOutAction::Preempt
                | PrOutAction::PreemptAndAbort
        )
    }
}

/// Build a PERSISTENT RESERVE IN CDB.
///
/// | byte | field |
/// | --- | --- |
/// | 0 | OPERATION CODE 5Eh |
/// | 1 | bits 4..0 SERVICE ACTION |
/// | 2..=6 | reserved |
/// | 7..=8 | ALLOCATION LENGTH (bytes the initiator can take) |
/// | 9 | CONTROL |
pub fn pr_in_cdb(action: PrInAction, allocation_len: u16) -> Cdb10 {
    let mut cdb = [0u8; CDB10_LEN];
    cdb[0] = OP_PERSISTENT_RESERVE_IN;
    cdb[1] = action as u8 & 0x1f;
    cdb[7..9].copy_from_slice(&allocation_len.to_be_bytes());
    cdb
}

/// One PERSISTENT RESERVE OUT command: its CDB and its 24-byte parameter list.
///
/// CDB:
/// | byte | field |
/// | --- | --- |
/// | 0 | OPERATION CODE 5Fh |
/// | 1 | bits 4..0 SERVICE ACTION |
/// | 2 | bits 7..4 SCOPE (0 = LU), bits 3..0 TYPE |
/// | 3..=4 | reserved |
/// | 5..=8 | PARAMETER LIST LENGTH (24) |
/// | 9 | CONTROL |
///
/// Parameter list:
/// | byte | field |
/// | --- | --- |
/// | 0..=7 | RESERVATION KEY (the sender's current key; 0 if not registered) |
/// | 8..=15 | SERVICE ACTION RESERVATION KEY (new key for REGISTER*, victim key for PREEMPT*) |
/// | 16..=19 | obsolete |
/// | 20 | bit 3 SPEC_I_PT, bit 2 ALL_TG_PT, bit 0 APTPL |
/// | 21 | reserved |
/// | 22..=23 | obsolete |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrOut {
    /// The service action.
    pub action: PrOutAction,
    /// Reservation type, for the actions where it counts.
    pub rtype: Option<ReservationType>,
    /// RESERVATION KEY.
    pub key: ReservationKey,
    /// SERVICE ACTION RESERVATION KEY.
    pub sa_key: ReservationKey,
    /// Activate persist through power loss (only meaningful for REGISTER*).
    pub aptpl: bool,
}

impl PrOut {
    /// REGISTER: change this nexus's key from `current` (0 when unregistered) to `new`
    /// (0 unregisters).
    pub fn register(current: ReservationKey, new: ReservationKey) -> PrOut {
        PrOut {
            action: PrOutAction::Register,
            rtype: None,
            key: current,
            sa_key: new,
            aptpl: false,
        }
    }

    /// REGISTER AND IGNORE EXISTING KEY: set this nexus's key to `new` whatever it was.
    pub fn register_ignore(new: ReservationKey) -> PrOut {
        PrOut {
            action: PrOutAction::RegisterAndIgnoreExistingKey,
            rtype: None,
            key: 0,
            sa_key: new,
            aptpl: false,
        }
    }

    /// RESERVE with our key.
    pub fn reserve(key: ReservationKey, rtype: ReservationType) -> PrOut {
        PrOut {
            action: PrOutAction::Reserve,
            rtype: Some(rtype),
            key,
            sa_key: 0,
            aptpl: false,
        }
    }

    /// RELEASE of the reservation we hold.
    pub fn release(key: ReservationKey, rtype: ReservationType) -> PrOut {
        PrOut {
            action: PrOutAction::Release,
            rtype: Some(rtype),
            key,
            sa_key: 0,
            aptpl: false,
        }
    }

    /// PREEMPT (or, with `abort`, PREEMPT AND ABORT) the registrations of `victim`, taking its
    /// reservation as `rtype`.
    pub fn preempt(
        key: ReservationKey,
        victim: ReservationKey,
        rtype: ReservationType,
        abort: bool,
    ) -> PrOut {
        let action = if abort {
            PrOutAction::PreemptAndAbort
        } else {
            PrOutAction::Preempt
        };
        PrOut {
            action,
            rtype: Some(rtype),
            key,
            sa_key: victim,
            aptpl: false,
        }
    }

    /// CLEAR every registration and the reservation (sender must be registered with `key`).
    pub fn clear(key: ReservationKey) -> PrOut {
        PrOut {
            action: PrOutAction::Clear,
            rtype: None,
            key,
            sa_key: 0,
            aptpl: false,
        }
    }

    /// The CDB.
    pub fn cdb(&self) -> Cdb10 {
        let mut cdb = [0u8; CDB10_LEN];
        cdb[0] = OP_PERSISTENT_RESERVE_OUT;
        cdb[1] = self.action as u8 & 0x1f;
        let type_code = match (self.action.uses_type(), self.rtype) {
            (true, Some(t)) => t.code(),
            _ => 0,
        };
        cdb[2] = (SCOPE_LU << 4) | (type_code & 0x0f);
        cdb[5..9].copy_from_slice(&(PR_OUT_PARAM_LEN as u32).to_be_bytes());
        cdb
    }

    /// The parameter list.
    pub fn params(&self) -> [u8; PR_OUT_PARAM_LEN] {
        let mut p = [0u8; PR_OUT_PARAM_LEN];
        p[0..8].copy_from_slice(&self.key.to_be_bytes());
        p[8..16].copy_from_slice(&self.sa_key.to_be_bytes());
        if self.aptpl {
            p[20] |= 0x01;
        }
        p
    }
}

/// Build a READ(10) CDB.
///
/// | byte | field |
/// | --- | --- |
/// | 0 | 28h |
/// | 1 | RDPROTECT/DPO/FUA flags (0) |
/// | 2..=5 | LOGICAL BLOCK ADDRESS |
/// | 6 | GROUP NUMBER (0) |
/// | 7..=8 | TRANSFER LENGTH in blocks |
/// | 9 | CONTROL |
pub fn read10_cdb(lba: u32, blocks: u16) -> Cdb10 {
    let mut cdb = [0u8; CDB10_LEN];
    cdb[0] = OP_READ_10;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// Build a WRITE(10) CDB; `fua` sets Force Unit Access (byte 1 bit 3). Layout as READ(10).
pub fn write10_cdb(lba: u32, blocks: u16, fua: bool) -> Cdb10 {
    let mut cdb = [0u8; CDB10_LEN];
    cdb[0] = OP_WRITE_10;
    if fua {
        cdb[1] |= 0x08;
    }
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// Build a READ CAPACITY(10) CDB (all fields but the opcode zero).
pub fn read_capacity10_cdb() -> Cdb10 {
    let mut cdb = [0u8; CDB10_LEN];
    cdb[0] = OP_READ_CAPACITY_10;
    cdb
}

/// A malformed or short response to a command we sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer bytes than the fixed header.
    #[error("{what}: response of {got} bytes is shorter than its {need}-byte header")]
    ShortHeader {
        /// Which response.
        what: &'static str,
        /// Bytes received.
        got: usize,
        /// Header length.
        need: usize,
    },
    /// The device has more to say than we received: retry with `need` bytes of buffer.
    #[error("{what}: response needs {need} bytes but only {got} arrived")]
    Truncated {
        /// Which response.
        what: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes the header announces.
        need: usize,
    },
    /// A length field that the format does not allow.
    #[error("{what}: invalid length field {len}")]
    BadLength {
        /// Which response.
        what: &'static str,
        /// The offending value.
        len: u32,
    },
    /// A reservation type code SPC-4 does not define.
    #[error("{what}: unknown reservation type {code:#x}")]
    UnknownType {
        /// Which response.
        what: &'static str,
        /// The TYPE field.
        code: u8,
    },
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Common 8-byte header of every PERSISTENT RESERVE IN response: PRGENERATION (bytes 0..=3)
/// and ADDITIONAL LENGTH (bytes 4..=7, bytes that follow the header). Returns the generation
/// and the payload, refusing a short or truncated buffer.
fn pr_in_header<'a>(what: &'static str, buf: &'a [u8]) -> Result<(u32, &'a [u8]), ParseError> {
    if buf.len() < 8 {
        return Err(ParseError::ShortHeader {
            what,
            got: buf.len(),
            need: 8,
        });
    }
    let generation = be32(&buf[0..4]);
    let add = be32(&buf[4..8]);
    let need = 8usize
        .checked_add(add as usize)
        .ok_or(ParseError::BadLength { what, len: add })?;
    if buf.len() < need {
        return Err(ParseError::Truncated {
            what,
            got: buf.len(),
            need,
        });
    }
    Ok((generation, &buf[8..need]))
}

/// READ KEYS response: PRGENERATION, ADDITIONAL LENGTH, then one 8-byte key per registered
/// I_T nexus (a key registered through two nexuses appears twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// PRGENERATION: bumped by every successful PR OUT except RESERVE/RELEASE.
    pub generation: u32,
    /// Registered keys, in device order.
    pub keys: Vec<ReservationKey>,
}

/// Parse a READ KEYS response.
pub fn parse_read_keys(buf: &[u8]) -> Result<Keys, ParseError> {
    const WHAT: &str = "READ KEYS";
    let (generation, body) = pr_in_header(WHAT, buf)?;
    if body.len() % 8 != 0 {
        return Err(ParseError::BadLength {
            what: WHAT,
            len: body.len() as u32,
        });
    }
    Ok(Keys {
        generation,
        keys: body.chunks_exact(8).map(be64).collect(),
    })
}

/// A persistent reservation as READ RESERVATION reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Key of the holder.
    pub key: ReservationKey,
    /// SCOPE (always LU_SCOPE today).
    pub scope: u8,
    /// TYPE.
    pub rtype: ReservationType,
}

/// READ RESERVATION response: header, then (ADDITIONAL LENGTH 10h) bytes 8..=15 RESERVATION
/// KEY, 16..=19 obsolete, 20 reserved, 21 SCOPE (7..4) / TYPE (3..0), 22..=23 obsolete;
/// ADDITIONAL LENGTH 0 means no reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservationStatus {
    /// PRGENERATION.
    pub generation: u32,
    /// The reservation, if one exists.
    pub reservation: Option<Reservation>,
}

/// Parse a READ RESERVATION response.
pub fn parse_read_reservation(buf: &[u8]) -> Result<ReservationStatus, ParseError> {
    const WHAT: &str = "READ RESERVATION";
    let (generation, body) = pr_in_header(WHAT, buf)?;
    match body.len() {
        0 => Ok(ReservationStatus {
            generation,
            reservation: None,
        }),
        16 => {
            let key = be64(&body[0..8]);
            let scope = body[13] >> 4;
            let code = body[13] & 0x0f;
            let rtype = ReservationType::from_code(code)
                .ok_or(ParseError::UnknownType { what: WHAT, code })?;
            Ok(ReservationStatus {
                generation,
                reservation: Some(Reservation { key, scope, rtype }),
            })
        }
        n => Err(ParseError::BadLength {
            what: WHAT,
            len: n as u32,
        }),
    }
}

/// One full status descriptor of READ FULL STATUS.
///
/// | byte | field |
/// | --- | --- |
/// | 0..=7 | RESERVATION KEY |
/// | 8..=11 | reserved |
/// | 12 | bit 1 ALL_TG_PT, bit 0 R_HOLDER |
/// | 13 | SCOPE (7..4), TYPE (3..0): defined only when R_HOLDER is set |
/// | 14..=17 | reserved |
/// | 18..=19 | RELATIVE TARGET PORT IDENTIFIER |
/// | 20..=23 | ADDITIONAL DESCRIPTOR LENGTH (n - 23) |
/// | 24..=n | TransportID of the initiator port |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullStatusDescriptor {
    /// Registered key.
    pub key: ReservationKey,
    /// Registered through all target ports.
    pub all_tg_pt: bool,
    /// This registration holds the reservation.
    pub holder: bool,
    /// Reservation type, when `holder`.
    pub rtype: Option<ReservationType>,
    /// Relative target port the registration came through.
    pub relative_target_port: u16,
    /// TransportID bytes identifying the initiator port.
    pub transport_id: Vec<u8>,
}

/// READ FULL STATUS response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullStatus {
    /// PRGENERATION.
    pub generation: u32,
    /// One descriptor per registration.
    pub descriptors: Vec<FullStatusDescriptor>,
}

/// Parse a READ FULL STATUS response.
pub fn parse_read_full_status(buf: &[u8]) -> Result<FullStatus, ParseError> {
    const WHAT: &str = "READ FULL STATUS";
    let (generation, mut body) = pr_in_header(WHAT, buf)?;
    let mut descriptors = Vec::new();
    while !body.is_empty() {
        if body.len() < 24 {
            return Err(ParseError::Truncated {
                what: WHAT,
                got: body.len(),
                need: 24,
            });
        }
        let add = be32(&body[20..24]);
        let end = 24usize
            .checked_add(add as usize)
            .ok_or(ParseError::BadLength {
                what: WHAT,
                len: add,
            })?;
        if body.len() < end {
            return Err(ParseError::Truncated {
                what: WHAT,
                got: body.len(),
                need: end,
            });
        }
        let holder = body[12] & 0x01 != 0;
        let rtype = if holder {
            let code = body[13] & 0x0f;
            Some(
                ReservationType::from_code(code)
                    .ok_or(ParseError::UnknownType { what: WHAT, code })?,
            )
        } else {
            None
        };
        descriptors.push(FullStatusDescriptor {
            key: be64(&body[0..8]),
            all_tg_pt: body[12] & 0x02 != 0,
            holder,
            rtype,
            relative_target_port: u16::from_be_bytes([body[18], body[19]]),
            transport_id: body[24..end].to_vec(),
        });
        body = &body[end..];
    }
    Ok(FullStatus {
        generation,
        descriptors,
    })
}

/// READ CAPACITY(10) data: bytes 0..=3 RETURNED LOGICAL BLOCK ADDRESS (last LBA),
/// 4..=7 LOGICAL BLOCK LENGTH IN BYTES.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Address of the last block.
    pub last_lba: u32,
    /// Bytes per block.
    pub block_len: u32,
}

/// Parse READ CAPACITY(10) data; a block length of zero is refused.
pub fn parse_read_capacity10(buf: &[u8]) -> Result<Capacity, ParseError> {
    const WHAT: &str = "READ CAPACITY(10)";
    if buf.len() < 8 {
        return Err(ParseError::ShortHeader {
            what: WHAT,
            got: buf.len(),
            need: 8,
        });
    }
    let block_len = be32(&buf[4..8]);
    if block_len == 0 {
        return Err(ParseError::BadLength { what: WHAT, len: 0 });
    }
    Ok(Capacity {
        last_lba: be32(&buf[0..4]),
        block_len,
    })
}

/// The SENSE KEY (SPC-4 table "Sense key descriptions").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenseKey {
    /// 0h.
    NoSense,
    /// 1h.
    RecoveredError,
    /// 2h: the logical unit is not accessible.
    NotReady,
    /// 3h.
    MediumError,
    /// 4h.
    HardwareError,
    /// 5h: bad CDB or parameters, unsupported command.
    IllegalRequest,
    /// 6h: something changed (reset, registrations preempted, ...).
    UnitAttention,
    /// 7h.
    DataProtect,
    /// 8h.
    BlankCheck,
    /// 9h.
    VendorSpecific,
    /// Ah.
    CopyAborted,
    /// Bh.
    AbortedCommand,
    /// Dh.
    VolumeOverflow,
    /// Eh.
    Miscompare,
    /// Ch and Fh: reserved / completed.
    Other(u8),
}

impl SenseKey {
    /// Decode the 4-bit SENSE KEY field.
    pub fn from_code(code: u8) -> SenseKey {
        use SenseKey::*;
        match code & 0x0f {
            0x0 => NoSense,
            0x1 => RecoveredError,
            0x2 => NotReady,
            0x3 => MediumError,
            0x4 => HardwareError,
            0x5 => IllegalRequest,
            0x6 => UnitAttention,
            0x7 => DataProtect,
            0x8 => BlankCheck,
            0x9 => VendorSpecific,
            0xa => CopyAborted,
            0xb => AbortedCommand,
            0xd => VolumeOverflow,
            0xe => Miscompare,
            c => Other(c),
        }
    }
}

/// Which of the two sense data formats the device used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenseFormat {
    /// Response code 70h (current) / 71h (deferred).
    Fixed,
    /// Response code 72h (current) / 73h (deferred).
    Descriptor,
}

/// Decoded sense data.
///
/// Fixed format (70h/71h): byte 0 bits 6..0 RESPONSE CODE, byte 2 bits 3..0 SENSE KEY, byte 7
/// ADDITIONAL SENSE LENGTH, byte 12 ASC, byte 13 ASCQ.
/// Descriptor format (72h/73h): byte 0 RESPONSE CODE, byte 1 bits 3..0 SENSE KEY, byte 2 ASC,
/// byte 3 ASCQ, byte 7 ADDITIONAL SENSE LENGTH, then descriptors (not decoded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Fixed or descriptor.
    pub format: SenseFormat,
    /// Current (70h/72h) rather than deferred (71h/73h) error.
    pub current: bool,
    /// SENSE KEY.
    pub key: SenseKey,
    /// ADDITIONAL SENSE CODE.
    pub asc: u8,
    /// ADDITIONAL SENSE CODE QUALIFIER.
    pub ascq: u8,
}

impl Sense {
    /// Raw 4-bit sense key.
    pub fn key_code(&self) -> u8 {
        use SenseKey::*;
        match self.key {
            NoSense => 0,
            RecoveredError => 1,
            NotReady => 2,
            MediumError => 3,
            HardwareError => 4,
            IllegalRequest => 5,
            UnitAttention => 6,
            DataProtect => 7,
            BlankCheck => 8,
            VendorSpecific => 9,
            CopyAborted => 0xa,
            AbortedCommand => 0xb,
            VolumeOverflow => 0xd,
            Miscompare => 0xe,
            Other(c) => c,
        }
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sense {:x}/{:02x}/{:02x} ({:?}{})",
            self.key_code(),
            self.asc,
            self.ascq,
            self.key,
            if self.current { "" } else { ", deferred" }
        )
    }
}

/// Sense data that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SenseError {
    /// No sense bytes at all.
    #[error("no sense data")]
    Empty,
    /// A response code that is neither fixed nor descriptor format.
    #[error("unknown sense response code {0:#04x}")]
    UnknownResponseCode(u8),
    /// Too short to hold sense key, ASC and ASCQ.
    #[error("sense data of {got} bytes is too short for its format (need {need})")]
    Short {
        /// Bytes available.
        got: usize,
        /// Bytes the format needs for key/ASC/ASCQ.
        need: usize,
    },
}

/// Decode sense data (as much as the device wrote: SG_IO's `sb_len_wr`).
pub fn parse_sense(buf: &[u8]) -> Result<Sense, SenseError> {
    let first = *buf.first().ok_or(SenseError::Empty)?;
    let code = first & 0x7f;
    let (format, current) = match code {
        0x70 => (SenseFormat::Fixed, true),
        0x71 => (SenseFormat::Fixed, false),
        0x72 => (SenseFormat::Descriptor, true),
        0x73 => (SenseFormat::Descriptor, false),
        c => return Err(SenseError::UnknownResponseCode(c)),
    };
    match format {
        SenseFormat::Fixed => {
            // Key at byte 2; ASC/ASCQ at 12/13 exist only if the additional length covers them.
            if buf.len() < 14 {
                return Err(SenseError::Short {
                    got: buf.len(),
                    need: 14,
                });
            }
            let announced = buf[7] as usize + 8;
            if announced < 14 {
                return Err(SenseError::Short {
                    got: announced,
                    need: 14,
                });
            }
            Ok(Sense {
                format,
                current,
                key: SenseKey::from_code(buf[2]),
                asc: buf[12],
                ascq: buf[13],
            })
        }
        SenseFormat::Descriptor => {
            if buf.len() < 4 {
                return Err(SenseError::Short {
                    got: buf.len(),
                    need: 4,
                });
            }
            Ok(Sense {
                format,
                current,
                key: SenseKey::from_code(buf[1]),
                asc: buf[2],
                ascq: buf[3],
            })
        }
    }
}

/// `host_status` values (Linux `DID_*`) worth naming in messages.
pub fn host_status_name(host_status: u16) -> &'static str {
    match host_status {
        0x00 => "DID_OK",
        0x01 => "DID_NO_CONNECT",
        0x02 => "DID_BUS_BUSY",
        0x03 => "DID_TIME_OUT",
        0x04 => "DID_BAD_TARGET",
        0x05 => "DID_ABORT",
        0x06 => "DID_PARITY",
        0x07 => "DID_ERROR",
        0x08 => "DID_RESET",
        0x09 => "DID_BAD_INTR",
        0x0a => "DID_PASSTHROUGH",
        0x0b => "DID_SOFT_ERROR",
        0x0c => "DID_IMM_RETRY",
        0x0d => "DID_REQUEUE",
        0x0e => "DID_TRANSPORT_DISRUPTED",
        0x0f => "DID_TRANSPORT_FAILFAST",
        0x11 => "DID_NEXUS_FAILURE",
        0x13 => "DID_TRANSPORT_MARGINAL",
        _ => "unknown",
    }
}

/// Linux `DRIVER_SENSE`: set in `driver_status` when sense data was returned. Not an error by
/// itself; the SCSI status says what happened.
pub const DRIVER_SENSE: u16 = 0x08;
/// Linux `DRIVER_TIMEOUT`.
pub const DRIVER_TIMEOUT: u16 = 0x06;

/// Why a SCSI command did not succeed. Keeps every byte an operator needs to see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScsiError {
    /// Status 18h: a persistent reservation forbids this nexus the command.
    #[error("RESERVATION CONFLICT (status 0x18)")]
    ReservationConflict,
    /// CHECK CONDITION with decodable sense data.
    #[error("CHECK CONDITION, {0}")]
    CheckCondition(Sense),
    /// CHECK CONDITION whose sense data could not be decoded.
    #[error("CHECK CONDITION with undecodable sense data")]
    CheckConditionBadSense(#[source] SenseError),
    /// Another non-GOOD SCSI status (BUSY, TASK SET FULL, ...).
    #[error("SCSI status {0:#04x}")]
    Status(u8),
    /// The host adapter (here: the initiator side of the transport) failed the command.
    #[error("host status {code:#06x} ({name})", name = host_status_name(*code))]
    Host {
        /// `host_status`.
        code: u16,
    },
    /// The Linux SCSI driver failed the command (timeout, ...).
    #[error("driver status {0:#06x}")]
    Driver(u16),
    /// The command succeeded but the data it returned is malformed.
    #[error("malformed response")]
    Response(#[from] ParseError),
}

impl ScsiError {
    /// The sense data, when the command ended in CHECK CONDITION with decodable sense.
    pub fn sense(&self) -> Option<&Sense> {
        match self {
            ScsiError::CheckCondition(s) => Some(s),
            _ => None,
        }
    }

    /// RESERVATION CONFLICT: we are fenced (or not registered) for this command.
    pub fn is_reservation_conflict(&self) -> bool {
        matches!(self, ScsiError::ReservationConflict)
    }

    /// UNIT ATTENTION: the device reports a change (power on, reset, registrations preempted
    /// 2Ah/05h, reservations released 2Ah/04h, ...); the command was not executed.
    pub fn is_unit_attention(&self) -> bool {
        self.sense()
            .is_some_and(|s| s.key == SenseKey::UnitAttention)
    }

    /// NOT READY: the logical unit cannot serve now.
    pub fn is_not_ready(&self) -> bool {
        self.sense().is_some_and(|s| s.key == SenseKey::NotReady)
    }

    /// ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE (20h/00h): the device does not know
    /// the command (for PR commands: no persistent reservation support).
    pub fn is_invalid_opcode(&self) -> bool {
        self.sense()
            .is_some_and(|s| s.key == SenseKey::IllegalRequest && s.asc == 0x20 && s.ascq == 0x00)
    }
}

/// Interpret an SG_IO completion: SCSI `status` (the full status byte, not the shifted
/// `masked_status`), `host_status`, `driver_status` and the sense bytes written.
///
/// Order of checks: a status from the device server (RESERVATION CONFLICT, CHECK CONDITION)
/// is a definite answer from the target and wins; otherwise a host or driver failure means
/// the command may never have reached the device; otherwise any non-GOOD status is an error.
/// CONDITION MET counts as success (SBC: only for PRE-FETCH).
pub fn check_completion(
    status: u8,
    host_status: u16,
    driver_status: u16,
    sense: &[u8],
) -> Result<(), ScsiError> {
    match status {
        status::RESERVATION_CONFLICT => return Err(ScsiError::ReservationConflict),
        status::CHECK_CONDITION => {
            return Err(match parse_sense(sense) {
                Ok(s) => ScsiError::CheckCondition(s),
                Err(e) => ScsiError::CheckConditionBadSense(e),
            })
        }
        _ => {}
    }
    if host_status != 0 {
        return Err(ScsiError::Host { code: host_status });
    }
    if driver_status & !DRIVER_SENSE != 0 {
        return Err(ScsiError::Driver(driver_status));
    }
    match status {
        status::GOOD | status::CONDITION_MET => Ok(()),
        s => Err(ScsiError::Status(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KA: u64 = 0x0102_0304_0506_0708;
    const KB: u64 = 0x1112_1314_1516_1718;

    #[test]
    fn pr_in_cdbs() {
        assert_eq!(
            pr_in_cdb(PrInAction::ReadKeys, 0x1234),
            [0x5e, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0]
        );
        assert_eq!(pr_in_cdb(PrInAction::ReadReservation, 8)[1], 0x01);
        assert_eq!(pr_in_cdb(PrInAction::ReportCapabilities, 8)[1], 0x02);
        let c = pr_in_cdb(PrInAction::ReadFullStatus, 0xffff);
        assert_eq!(c, [0x5e, 0x03, 0, 0, 0, 0, 0, 0xff, 0xff, 0]);
    }

    fn assert_out(cmd: &PrOut, sa: u8, type_byte: u8, key: u64, sa_key: u64) {
        let cdb = cmd.cdb();
        assert_eq!(cdb, [0x5f, sa, type_byte, 0, 0, 0, 0, 0, 24, 0], "{cmd:?}");
        let p = cmd.params();
        assert_eq!(&p[0..8], &key.to_be_bytes());
        assert_eq!(&p[8..16], &sa_key.to_be_bytes());
        assert_eq!(
            &p[16..24],
            &[0u8; 8],
            "{cmd:?}: flags/obsolete must be zero"
        );
    }

    #[test]
    fn pr_out_builders() {
        assert_out(&PrOut::register(0, KA), 0x00, 0, 0, KA);
        assert_out(&PrOut::register(KA, 0), 0x00, 0, KA, 0);
        assert_out(&PrOut::register_ignore(KB), 0x06, 0, 0, KB);
        assert_out(
            &PrOut::reserve(KA, ReservationType::WriteExclusive),
            0x01,
            0x01,
            KA,
            0,
        );
        assert_out(
            &PrOut::reserve(KA, ReservationType::WriteExclusiveRegistrantsOnly),
            0x01,
            0x05,
            KA,
            0,
        );
        assert_out(
            &PrOut::release(KA, ReservationType::ExclusiveAccess),
            0x02,
            0x03,
            KA,
            0,
        );
        assert_out(&PrOut::clear(KB), 0x03, 0, KB, 0);
        assert_out(
            &PrOut::preempt(KB, KA, ReservationType::WriteExclusive, false),
            0x04,
            0x01,
            KB,
            KA,
        );
        assert_out(
            &PrOut::preempt(KB, KA, ReservationType::ExclusiveAccessAllRegistrants, true),
            0x05,
            0x08,
            KB,
            KA,
        );
    }

    #[test]
    fn pr_out_type_ignored_where_meaningless_and_aptpl() {
        let mut c = PrOut::register(0, KA);
        c.rtype = Some(ReservationType::ExclusiveAccess);
        c.aptpl = true;
        assert_eq!(c.cdb()[2], 0, "REGISTER carries no TYPE");
        assert_eq!(c.params()[20], 0x01, "APTPL is bit 0 of byte 20");
    }

    #[test]
    fn reservation_type_codes_round_trip() {
        for code in 0u8..=0x0f {
            match ReservationType::from_code(code) {
                Some(t) => assert_eq!(t.code(), code),
                None => assert!(matches!(code, 0 | 2 | 4 | 9..=15), "code {code:#x}"),
            }
        }
    }

    #[test]
    fn rw10_and_capacity_cdbs() {
        assert_eq!(
            read10_cdb(0x0a0b0c0d, 0x0102),
            [0x28, 0, 0x0a, 0x0b, 0x0c, 0x0d, 0, 0x01, 0x02, 0]
        );
        assert_eq!(write10_cdb(7, 1, false), [0x2a, 0, 0, 0, 0, 7, 0, 0, 1, 0]);
        assert_eq!(write10_cdb(7, 1, true)[1], 0x08);
        assert_eq!(read_capacity10_cdb(), [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    fn header(generation: u32, add: u32) -> Vec<u8> {
        let mut v = generation.to_be_bytes().to_vec();
        v.extend_from_slice(&add.to_be_bytes());
        v
    }

    #[test]
    fn read_keys_parses() {
        let mut b = header(9, 16);
        b.extend_from_slice(&KA.to_be_bytes());
        b.extend_from_slice(&KB.to_be_bytes());
        let k = parse_read_keys(&b).unwrap();
        assert_eq!(
            k,
            Keys {
                generation: 9,
                keys: vec![KA, KB]
            }
        );
        // Trailing bytes beyond the announced length (allocation larger than data) are ignored.
        b.extend_from_slice(&[0xee; 8]);
        assert_eq!(parse_read_keys(&b).unwrap().keys, vec![KA, KB]);
        assert_eq!(
            parse_read_keys(&header(3, 0)).unwrap(),
            Keys {
                generation: 3,
                keys: vec![]
            }
        );
    }

    #[test]
    fn read_keys_refuses_malformed() {
        assert!(matches!(
            parse_read_keys(&[0; 7]),
            Err(ParseError::ShortHeader { got: 7, .. })
        ));
        let mut b = header(1, 16);
        b.extend_from_slice(&KA.to_be_bytes());
        assert_eq!(
            parse_read_keys(&b),
            Err(ParseError::Truncated {
                what: "READ KEYS",
                got: 16,
                need: 24
            })
        );
        let mut b = header(1, 12);
        b.extend_from_slice(&[0; 12]);
        assert!(matches!(
            parse_read_keys(&b),
            Err(ParseError::BadLength { len: 12, .. })
        ));
        // A huge additional length must not overflow or panic.
        assert!(matches!(
            parse_read_keys(&header(1, u32::MAX)),
            Err(ParseError::Truncated { .. })
        ));
    }

    #[test]
    fn read_reservation_parses() {
        assert_eq!(
            parse_read_reservation(&header(4, 0)).unwrap(),
            ReservationStatus {
                generation: 4,
                reservation: None
            }
        );
        let mut b = header(5, 16);
        b.extend_from_slice(&KB.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0x05, 0, 0]);
        assert_eq!(
            parse_read_reservation(&b).unwrap(),
            ReservationStatus {
                generation: 5,
                reservation: Some(Reservation {
                    key: KB,
                    scope: 0,
                    rtype: ReservationType::WriteExclusiveRegistrantsOnly
                })
            }
        );
    }

    #[test]
    fn read_reservation_refuses_malformed() {
        let mut b = header(5, 16);
        b.extend_from_slice(&KB.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0x02, 0, 0]);
        assert_eq!(
            parse_read_reservation(&b),
            Err(ParseError::UnknownType {
                what: "READ RESERVATION",
                code: 2
            })
        );
        let mut b = header(5, 8);
        b.extend_from_slice(&KB.to_be_bytes());
        assert!(matches!(
            parse_read_reservation(&b),
            Err(ParseError::BadLength { len: 8, .. })
        ));
        let b = header(5, 16);
        assert!(matches!(
            parse_read_reservation(&b),
            Err(ParseError::Truncated { need: 24, .. })
        ));
        assert!(matches!(
            parse_read_reservation(&[]),
            Err(ParseError::ShortHeader { .. })
        ));
    }

    fn descriptor(key: u64, flags: u8, scope_type: u8, rtpi: u16, tid: &[u8]) -> Vec<u8> {
        let mut d = key.to_be_bytes().to_vec();
        d.extend_from_slice(&[0; 4]);
        d.push(flags);
        d.push(scope_type);
        d.extend_from_slice(&[0; 4]);
        d.extend_from_slice(&rtpi.to_be_bytes());
        d.extend_from_slice(&(tid.len() as u32).to_be_bytes());
        d.extend_from_slice(tid);
        d
    }

    #[test]
    fn read_full_status_parses() {
        let tid_a = [0x05u8, 0, 0, 8, b'n', b'a', b'a', b'.', 1, 2, 3, 0];
        let tid_b = [0x05u8, 0, 0, 4, b'x', b'y', 0, 0];
        let mut body = descriptor(KA, 0x01, 0x01, 1, &tid_a);
        body.extend(descriptor(KB, 0x02, 0x00, 2, &tid_b));
        let mut b = header(7, body.len() as u32);
        b.extend(body);
        let fs = parse_read_full_status(&b).unwrap();
        assert_eq!(fs.generation, 7);
        assert_eq!(
            fs.descriptors,
            vec![
                FullStatusDescriptor {
                    key: KA,
                    all_tg_pt: false,
                    holder: true,
                    rtype: Some(ReservationType::WriteExclusive),
                    relative_target_port: 1,
                    transport_id: tid_a.to_vec(),
                },
                FullStatusDescriptor {
                    key: KB,
                    all_tg_pt: true,
                    holder: false,
                    rtype: None,
                    relative_target_port: 2,
                    transport_id: tid_b.to_vec(),
                },
            ]
        );
        assert!(parse_read_full_status(&header(1, 0))
            .unwrap()
            .descriptors
            .is_empty());
    }

    #[test]
    fn read_full_status_refuses_malformed() {
        // Descriptor header cut short.
        let d = descriptor(KA, 0x01, 0x01, 1, &[1, 2, 3, 4]);
        let mut b = header(1, 20);
        b.extend_from_slice(&d[..20]);
        assert!(matches!(
            parse_read_full_status(&b),
            Err(ParseError::Truncated { need: 24, .. })
        ));
        // Transport ID longer than the data.
        let mut d = descriptor(KA, 0x01, 0x01, 1, &[1, 2, 3, 4]);
        d[23] = 40;
        let mut b = header(1, d.len() as u32);
        b.extend(d);
        assert!(matches!(
            parse_read_full_status(&b),
            Err(ParseError::Truncated { need: 64, .. })
        ));
        // Holder with an undefined type.
        let d = descriptor(KA, 0x01, 0x04, 1, &[]);
        let mut b = header(1, d.len() as u32);
        b.extend(d);
        assert!(matches!(
            parse_read_full_status(&b),
            Err(ParseError::UnknownType { code: 4, .. })
        ));
        // Whole response shorter than announced.
        let d = descriptor(KA, 0, 0, 1, &[]);
        let mut b = header(1, 48);
        b.extend(d);
        assert!(matches!(
            parse_read_full_status(&b),
            Err(ParseError::Truncated { need: 56, .. })
        ));
    }

    #[test]
    fn read_capacity_parses_and_refuses() {
        let b = [0, 0, 0x0f, 0xff, 0, 0, 2, 0];
        assert_eq!(
            parse_read_capacity10(&b).unwrap(),
            Capacity {
                last_lba: 0xfff,
                block_len: 512
            }
        );
        assert!(matches!(
            parse_read_capacity10(&b[..7]),
            Err(ParseError::ShortHeader { .. })
        ));
        assert!(matches!(
            parse_read_capacity10(&[0, 0, 1, 0, 0, 0, 0, 0]),
            Err(ParseError::BadLength { .. })
        ));
    }

    fn fixed_sense(key: u8, asc: u8, ascq: u8) -> Vec<u8> {
        let mut s = vec![0u8; 18];
        s[0] = 0x70;
        s[2] = key;
        s[7] = 10;
        s[12] = asc;
        s[13] = ascq;
        s
    }

    #[test]
    fn sense_fixed_and_descriptor() {
        let s = parse_sense(&fixed_sense(0x06, 0x2a, 0x05)).unwrap();
        assert_eq!(
            s,
            Sense {
                format: SenseFormat::Fixed,
                current: true,
                key: SenseKey::UnitAttention,
                asc: 0x2a,
                ascq: 0x05
            }
        );
        assert_eq!(s.to_string(), "sense 6/2a/05 (UnitAttention)");
        // Valid bit (0x80) set, deferred error, high nibble flags in key byte ignored.
        let mut f = fixed_sense(0x25, 0x20, 0x00);
        f[0] = 0xf1;
        let s = parse_sense(&f).unwrap();
        assert!(!s.current);
        assert_eq!(s.key, SenseKey::IllegalRequest);
        let d = [0x72, 0x02, 0x04, 0x03, 0, 0, 0, 0];
        assert_eq!(
            parse_sense(&d).unwrap(),
            Sense {
                format: SenseFormat::Descriptor,
                current: true,
                key: SenseKey::NotReady,
                asc: 4,
                ascq: 3
            }
        );
        assert!(!parse_sense(&[0x73, 0x0b, 0x47, 0x00]).unwrap().current);
    }

    #[test]
    fn sense_refuses_malformed() {
        assert_eq!(parse_sense(&[]), Err(SenseError::Empty));
        assert_eq!(
            parse_sense(&[0x7f, 0, 0, 0]),
            Err(SenseError::UnknownResponseCode(0x7f))
        );
        assert!(matches!(
            parse_sense(&fixed_sense(6, 0x29, 0)[..13]),
            Err(SenseError::Short { .. })
        ));
        // Additional sense length too small to cover ASC/ASCQ.
        let mut f = fixed_sense(6, 0x29, 0);
        f[7] = 4;
        assert!(matches!(parse_sense(&f), Err(SenseError::Short { .. })));
        assert!(matches!(
            parse_sense(&[0x72, 0x06, 0x29]),
            Err(SenseError::Short { got: 3, need: 4 })
        ));
    }

    #[test]
    fn completion_classification() {
        assert_eq!(check_completion(0, 0, 0, &[]), Ok(()));
        assert_eq!(check_completion(status::CONDITION_MET, 0, 0, &[]), Ok(()));
        let e = check_completion(0x18, 0, 0, &[]).unwrap_err();
        assert!(e.is_reservation_conflict());
        assert!(!e.is_unit_attention() && !e.is_not_ready() && !e.is_invalid_opcode());

        let ua = check_completion(2, 0, DRIVER_SENSE, &fixed_sense(6, 0x2a, 0x05)).unwrap_err();
        assert!(ua.is_unit_attention() && !ua.is_reservation_conflict());
        assert_eq!(ua.sense().map(|s| (s.asc, s.ascq)), Some((0x2a, 0x05)));

        let nr = check_completion(2, 0, DRIVER_SENSE, &[0x72, 0x02, 0x04, 0x0a, 0, 0, 0, 0])
            .unwrap_err();
        assert!(nr.is_not_ready() && !nr.is_unit_attention());

        let inv = check_completion(2, 0, DRIVER_SENSE, &fixed_sense(5, 0x20, 0)).unwrap_err();
        assert!(inv.is_invalid_opcode());
        let field = check_completion(2, 0, DRIVER_SENSE, &fixed_sense(5, 0x24, 0)).unwrap_err();
        assert!(
            !field.is_invalid_opcode(),
            "INVALID FIELD IN CDB is not an unknown opcode"
        );

        assert!(matches!(
            check_completion(2, 0, 0, &[]),
            Err(ScsiError::CheckConditionBadSense(SenseError::Empty))
        ));
        assert_eq!(
            check_completion(0, 0x03, 0, &[]),
            Err(ScsiError::Host { code: 3 })
        );
        assert_eq!(
            check_completion(0, 0x01, 0, &[]).unwrap_err().to_string(),
            "host status 0x0001 (DID_NO_CONNECT)"
        );
        assert_eq!(
            check_completion(0, 0, DRIVER_TIMEOUT, &[]),
            Err(ScsiError::Driver(6))
        );
        assert_eq!(
            check_completion(0, 0, DRIVER_SENSE, &[]),
            Ok(()),
            "DRIVER_SENSE alone is no error"
        );
        assert_eq!(
            check_completion(status::BUSY, 0, 0, &[]),
            Err(ScsiError::Status(8))
        );
        // A definite answer from the target wins over a host byte.
        assert!(check_completion(0x18, 0x11, 0, &[])
            .unwrap_err()
            .is_reservation_conflict());
    }
}
