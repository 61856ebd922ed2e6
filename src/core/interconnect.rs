//! The interconnect codec: length-framed, versioned, authenticated messages between the nodes.
//!
//! Sans-io: a [`Session`] turns messages into frames and bytes into messages; the caller owns
//! the socket and draws the random session nonce.
//!
//! # Frame
//! ```text
//! | header (24 bytes) | body (body_len bytes) | mac (32 bytes) |
//! ```
//! See [`FrameHeader`] for the header. `mac` is HMAC-SHA256 under the pre-shared key over
//! `direction_nonce (16 bytes) || header || body`, where `direction_nonce` is the nonce that the
//! *receiver* sent in its Hello (16 zero bytes for a Hello frame itself).
//!
//! # Replay protection
//! Each side sends a Hello with a fresh random nonce first. Every later frame it receives must
//! be MACed with that nonce, so a frame recorded in an earlier session fails the MAC; within a
//! session the frame sequence number must strictly increase, so a frame replayed in the same
//! session is refused. A frame reflected back at its sender fails the MAC too (it was MACed
//! with the other side's nonce). A replayed Hello can only start a session whose later frames
//! the real peer will not accept: denial of service, which anyone on the path can do anyway.
//!
//! A rejected frame never changes the session's state.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// Magic at the start of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"HPIC";
/// Wire version this code speaks.
pub const WIRE_VERSION: u16 = 1;
/// Bytes of the frame header.
pub const HEADER_BYTES: usize = 24;
/// Bytes of the HMAC-SHA256 tag.
pub const MAC_BYTES: usize = 32;
/// Largest body accepted: a batch of log records (4 MiB) plus framing.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024 + 4096;
/// Largest frame accepted.
pub const MAX_FRAME_BYTES: usize = HEADER_BYTES + MAX_BODY_BYTES + MAC_BYTES;
/// Most segments in one [`Message::LogRecords`].
pub const MAX_SEGMENTS: usize = 64;
/// Shortest pre-shared key accepted.
pub const MIN_KEY_BYTES: usize = 16;
/// Bytes of a session nonce.
pub const NONCE_BYTES: usize = 16;

/// The frame header, 24 bytes, little-endian:
///
/// | bytes | field | meaning |
/// | --- | --- | --- |
/// | 0..4 | magic | [`FRAME_MAGIC`] |
/// | 4..6 | version | [`WIRE_VERSION`]; any other is refused |
/// | 6..8 | kind | message kind ([`Message::kind`]) |
/// | 8..12 | body_len | body bytes, at most [`MAX_BODY_BYTES`] |
/// | 12..16 | flags | zero (reserved) |
/// | 16..24 | seq | frame sequence number in this direction, from 1, strictly increasing |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub kind: u16,
    pub body_len: u32,
    pub flags: u32,
    pub seq: u64,
}
const _: () = assert!(4 + 2 + 2 + 4 + 4 + 8 == HEADER_BYTES);

impl FrameHeader {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&FRAME_MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b
    }
}

/// First message each way. Body: node_id u8, software_version u32, capabilities u64,
/// nonce [u8; 16] (29 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// 0 for node `a`, 1 for node `b`.
    pub node_id: u8,
    /// hapaird version, `major << 16 | minor`, for the takeover compatibility check.
    pub software_version: u32,
    /// Feature bits the sender supports.
    pub capabilities: u64,
    /// Fresh random nonce: frames sent *to* this node are MACed with it.
    pub nonce: [u8; NONCE_BYTES],
}

/// What a heartbeat says about its sender. Body part: ha_state u8, flags u8,
/// aggregates_served u16, log_last_seq u64 (12 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateSummary {
    /// The sender's HA state code (owned by the takeover state machine).
    pub ha_state: u8,
    /// [`StateSummary::HEALTHY`] | [`StateSummary::SERVING_PARTNER`] | [`StateSummary::DRAINING`].
    pub flags: u8,
    pub aggregates_served: u16,
    /// Last sequence number in the sender's own log.
    pub log_last_seq: u64,
}

impl StateSummary {
    pub const HEALTHY: u8 = 1;
    pub const SERVING_PARTNER: u8 = 2;
    pub const DRAINING: u8 = 4;
    const KNOWN_FLAGS: u8 = Self::HEALTHY | Self::SERVING_PARTNER | Self::DRAINING;
}

/// Bytes of the partner's log to copy into its mirror, byte for byte at `region_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSegment {
    pub region_offset: u64,
    pub bytes: Vec<u8>,
}

/// A group commit for the mirror. Body: epoch u64, first_seq u64, last_seq u64, count u32,
/// then per segment region_offset u64, len u32, bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecords {
    /// The sender's log epoch (random at each format of its log). Sequence numbers restart with
    /// every epoch, so an acknowledgement counts only for the epoch it names.
    pub epoch: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub segments: Vec<LogSegment>,
}

/// Every interconnect message. Bodies are little-endian; the kind codes are in [`Message::kind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    /// Body: seq u64 + [`StateSummary`].
    Heartbeat {
        seq: u64,
        state: StateSummary,
    },
    LogRecords(LogRecords),
    /// The mirror holds everything up to `up_to_seq` of log epoch `epoch` durably.
    /// Body: epoch u64, up_to_seq u64.
    LogAck {
        epoch: u64,
        up_to_seq: u64,
    },
    /// A CP put everything up to `up_to_seq` on the members: trim the mirror. Body: u64.
    Trim {
        up_to_seq: u64,
    },
    /// Empty body: "take me over".
    PleaseTakeover,
    /// Shut down gracefully within `countdown_ms`. Body: u32.
    PleaseShutdown {
        countdown_ms: u32,
    },
    ShutdownComplete,
    /// You are taken over: do not serve until giveback.
    PleaseDie,
    /// The countdown ended: taking over now.
    Takeover,
    Giveback,
    GivebackComplete,
    /// "My NVRAM log is lost: send me your mirror of it." Empty body.
    MirrorFetch,
    /// Bytes of the sender's mirror of the receiver's log, for the receiver to restore its log
    /// from (same body as [`Message::LogRecords`]).
    MirrorCopy(LogRecords),
    /// The copy is complete: `region_bytes` bytes were sent. Body: u64.
    MirrorCopyDone {
        region_bytes: u64,
    },
    /// "I apply none of your mirror updates in this session, from the one I refused on, until
    /// [`Message::LogResume`]" (e.g. this node serves the sender's aggregate after a takeover:
    /// it keeps no mirror of its log). The session stays up for HA traffic. Body: `reason`,
    /// UTF-8, at most [`MAX_REASON_BYTES`].
    LogRefused {
        reason: String,
    },
    /// The answer to [`Message::LogRefused`]: "I send no mirror updates in this session until
    /// [`Message::LogResume`]; every one I sent before this message was refused". Empty body.
    LogPaused,
    /// "Your mirror updates are applied again (your refused ones were not): copy the whole log
    /// again". Sent only after [`Message::LogPaused`]. Empty body.
    LogResume,
    /// A takeover state-machine message (`core::takeover::Message`), serialised by the HA
    /// layer. Opaque here; at most [`MAX_HA_BYTES`]. The MAC authenticates it like any other.
    Ha(Vec<u8>),
}

/// Largest [`Message::Ha`] body.
pub const MAX_HA_BYTES: usize = 64 * 1024;

/// Largest [`Message::LogRefused`] reason.
pub const MAX_REASON_BYTES: usize = 1024;

mod kind {
    pub const HELLO: u16 = 1;
    pub const HEARTBEAT: u16 = 2;
    pub const LOG_RECORDS: u16 = 3;
    pub const LOG_ACK: u16 = 4;
    pub const TRIM: u16 = 5;
    pub const PLEASE_TAKEOVER: u16 = 16;
    pub const PLEASE_SHUTDOWN: u16 = 17;
    pub const SHUTDOWN_COMPLETE: u16 = 18;
    pub const PLEASE_DIE: u16 = 19;
    pub const TAKEOVER: u16 = 20;
    pub const GIVEBACK: u16 = 21;
    pub const GIVEBACK_COMPLETE: u16 = 22;
    pub const HA: u16 = 32;
    pub const MIRROR_FETCH: u16 = 6;
    pub const MIRROR_COPY: u16 = 7;
    pub const MIRROR_COPY_DONE: u16 = 8;
    pub const LOG_REFUSED: u16 = 9;
    pub const LOG_PAUSED: u16 = 10;
    pub const LOG_RESUME: u16 = 11;
}

impl Message {
    /// The wire kind code.
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello(_) => kind::HELLO,
            Message::Heartbeat { .. } => kind::HEARTBEAT,
            Message::LogRecords(_) => kind::LOG_RECORDS,
            Message::LogAck { .. } => kind::LOG_ACK,
            Message::Trim { .. } => kind::TRIM,
            Message::PleaseTakeover => kind::PLEASE_TAKEOVER,
            Message::PleaseShutdown { .. } => kind::PLEASE_SHUTDOWN,
            Message::ShutdownComplete => kind::SHUTDOWN_COMPLETE,
            Message::PleaseDie => kind::PLEASE_DIE,
            Message::Takeover => kind::TAKEOVER,
            Message::Giveback => kind::GIVEBACK,
            Message::GivebackComplete => kind::GIVEBACK_COMPLETE,
            Message::Ha(_) => kind::HA,
            Message::MirrorFetch => kind::MIRROR_FETCH,
            Message::MirrorCopy(_) => kind::MIRROR_COPY,
            Message::MirrorCopyDone { .. } => kind::MIRROR_COPY_DONE,
            Message::LogRefused { .. } => kind::LOG_REFUSED,
            Message::LogPaused => kind::LOG_PAUSED,
            Message::LogResume => kind::LOG_RESUME,
        }
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello(h) => {
                out.push(h.node_id);
                out.extend_from_slice(&h.software_version.to_le_bytes());
                out.extend_from_slice(&h.capabilities.to_le_bytes());
                out.extend_from_slice(&h.nonce);
            }
            Message::Heartbeat { seq, state } => {
                out.extend_from_slice(&seq.to_le_bytes());
                out.push(state.ha_state);
                out.push(state.flags);
                out.extend_from_slice(&state.aggregates_served.to_le_bytes());
                out.extend_from_slice(&state.log_last_seq.to_le_bytes());
            }
            Message::LogRecords(r) | Message::MirrorCopy(r) => {
                out.extend_from_slice(&r.epoch.to_le_bytes());
                out.extend_from_slice(&r.first_seq.to_le_bytes());
                out.extend_from_slice(&r.last_seq.to_le_bytes());
                out.extend_from_slice(&(r.segments.len() as u32).to_le_bytes());
                for s in &r.segments {
                    out.extend_from_slice(&s.region_offset.to_le_bytes());
                    out.extend_from_slice(&(s.bytes.len() as u32).to_le_bytes());
                    out.extend_from_slice(&s.bytes);
                }
            }
            Message::LogAck { epoch, up_to_seq } => {
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(&up_to_seq.to_le_bytes())
            }
            Message::Trim { up_to_seq } => out.extend_from_slice(&up_to_seq.to_le_bytes()),
            Message::PleaseShutdown { countdown_ms } => {
                out.extend_from_slice(&countdown_ms.to_le_bytes())
            }
            Message::Ha(b) => out.extend_from_slice(b),
            Message::MirrorCopyDone { region_bytes } => {
                out.extend_from_slice(&region_bytes.to_le_bytes())
            }
            Message::LogRefused { reason } => {
                // Cut at a character boundary: the receiver decodes it as UTF-8.
                let mut n = reason.len().min(MAX_REASON_BYTES);
                while !reason.is_char_boundary(n) {
                    n -= 1;
                }
                out.extend_from_slice(&reason.as_bytes()[..n])
            }
            Message::MirrorFetch | Message::LogPaused | Message::LogResume => {}
            Message::PleaseTakeover
            | Message::ShutdownComplete
            | Message::PleaseDie
            | Message::Takeover
            | Message::Giveback
            | Message::GivebackComplete => {}
        }
    }

    fn decode_body(kind: u16, body: &[u8]) -> Result<Message, FrameError> {
        let mut r = Reader { b: body, kind };
        let msg = match kind {
            kind::HELLO => {
                let node_id = r.u8()?;
                let software_version = r.u32()?;
                let capabilities = r.u64()?;
                let nonce = r.array::<NONCE_BYTES>()?;
                Message::Hello(Hello {
                    node_id,
                    software_version,
                    capabilities,
                    nonce,
                })
            }
            kind::HEARTBEAT => {
                let seq = r.u64()?;
                let state = StateSummary {
                    ha_state: r.u8()?,
                    flags: r.u8()?,
                    aggregates_served: r.u16()?,
                    log_last_seq: r.u64()?,
                };
                if state.flags & !StateSummary::KNOWN_FLAGS != 0 {
                    return Err(FrameError::Malformed {
                        kind,
                        reason: "unknown state flags",
                    });
                }
                Message::Heartbeat { seq, state }
            }
            kind::LOG_RECORDS | kind::MIRROR_COPY => {
                let epoch = r.u64()?;
                let first_seq = r.u64()?;
                let last_seq = r.u64()?;
                let count = r.u32()? as usize;
                if count > MAX_SEGMENTS {
                    return Err(FrameError::Malformed {
                        kind,
                        reason: "too many segments",
                    });
                }
                if first_seq > last_seq.saturating_add(1) {
                    return Err(FrameError::Malformed {
                        kind,
                        reason: "first_seq after last_seq",
                    });
                }
                let mut segments = Vec::with_capacity(count);
                for _ in 0..count {
                    let region_offset = r.u64()?;
                    let len = r.u32()? as usize;
                    let bytes = r.take(len)?.to_vec();
                    segments.push(LogSegment {
                        region_offset,
                        bytes,
                    });
                }
                let r = LogRecords {
                    epoch,
                    first_seq,
                    last_seq,
                    segments,
                };
                if kind == kind::MIRROR_COPY {
                    Message::MirrorCopy(r)
                } else {
                    Message::LogRecords(r)
                }
            }
            kind::MIRROR_FETCH => Message::MirrorFetch,
            kind::MIRROR_COPY_DONE => Message::MirrorCopyDone {
                region_bytes: r.u64()?,
            },
            kind::LOG_REFUSED => {
                if body.len() > MAX_REASON_BYTES {
                    return Err(FrameError::Malformed {
                        kind,
                        reason: "refusal reason too long",
                    });
                }
                let n = r.b.len();
                let reason = std::str::from_utf8(r.take(n)?)
                    .map_err(|_| FrameError::Malformed {
                        kind,
                        reason: "refusal reason is not UTF-8",
                    })?
                    .to_string();
                Message::LogRefused { reason }
            }
            kind::LOG_PAUSED => Message::LogPaused,
            kind::LOG_RESUME => Message::LogResume,
            kind::LOG_ACK => Message::LogAck {
                epoch: r.u64()?,
                up_to_seq: r.u64()?,
            },
            kind::TRIM => Message::Trim {
                up_to_seq: r.u64()?,
            },
            kind::PLEASE_TAKEOVER => Message::PleaseTakeover,
            kind::PLEASE_SHUTDOWN => Message::PleaseShutdown {
                countdown_ms: r.u32()?,
            },
            kind::SHUTDOWN_COMPLETE => Message::ShutdownComplete,
            kind::PLEASE_DIE => Message::PleaseDie,
            kind::TAKEOVER => Message::Takeover,
            kind::GIVEBACK => Message::Giveback,
            kind::GIVEBACK_COMPLETE => Message::GivebackComplete,
            kind::HA => {
                if body.len() > MAX_HA_BYTES {
                    return Err(FrameError::Malformed {
                        kind,
                        reason: "HA message too large",
                    });
                }
                let n = r.b.len();
                Message::Ha(r.take(n)?.to_vec())
            }
            other => return Err(FrameError::UnknownKind(other)),
        };
        if !r.b.is_empty() {
            return Err(FrameError::Malformed {
                kind,
                reason: "trailing bytes in body",
            });
        }
        Ok(msg)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    kind: u16,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(FrameError::Malformed {
                kind: self.kind,
                reason: "body too short",
            });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// A frame refused. The session is unchanged; the caller drops the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("truncated frame: {have} bytes, need {need}")]
    Truncated { have: usize, need: usize },
    #[error("bad frame magic")]
    BadMagic,
    #[error("unknown wire version {0} (we speak {WIRE_VERSION})")]
    UnknownVersion(u16),
    #[error("frame body of {body_len} bytes exceeds the maximum of {max}")]
    Oversized { body_len: usize, max: usize },
    #[error("reserved flags {0:#x} set")]
    BadFlags(u32),
    #[error("frame authentication failed (wrong key, forged, or from another session)")]
    BadMac,
    #[error("replayed frame: seq {seq} not after {last}")]
    Replayed { seq: u64, last: u64 },
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("malformed body of kind {kind}: {reason}")]
    Malformed { kind: u16, reason: &'static str },
    #[error("first frame of a session must be a Hello")]
    HelloFirst,
    #[error("second Hello in one session")]
    DuplicateHello,
    #[error("Hello carries our own nonce: reflected")]
    ReflectedHello,
    #[error("{0} trailing bytes after the frame")]
    TrailingBytes(usize),
}

/// A message that could not be framed. The session is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("no Hello received from the peer yet: only a Hello can be sent")]
    NoPeerNonce,
    #[error("a Hello must carry this session's nonce")]
    WrongNonce,
    #[error("body of {body_len} bytes exceeds the maximum of {max}")]
    TooLarge { body_len: usize, max: usize },
    #[error("too many segments: {0} > {MAX_SEGMENTS}")]
    TooManySegments(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("pre-shared key of {0} bytes: need at least {MIN_KEY_BYTES}")]
pub struct KeyError(pub usize);

/// What [`Session::decode`] found at the front of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Not a whole frame yet: read until the buffer holds `need` bytes.
    NeedMore { need: usize },
    /// A frame accepted; `consumed` bytes of the buffer were it.
    Frame {
        seq: u64,
        message: Message,
        consumed: usize,
    },
}

/// One connection's codec state, both directions.
#[derive(Clone)]
pub struct Session {
    mac: HmacSha256,
    local_nonce: [u8; NONCE_BYTES],
    tx_seq: u64,
    peer: Option<Hello>,
    rx_last_seq: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Session")
            .field("tx_seq", &self.tx_seq)
            .field("rx_last_seq", &self.rx_last_seq)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session under the pre-shared `key`, with `local_nonce` freshly drawn by the caller
    /// from a CSPRNG for this connection.
    pub fn new(key: &[u8], local_nonce: [u8; NONCE_BYTES]) -> Result<Session, KeyError> {
        if key.len() < MIN_KEY_BYTES {
            return Err(KeyError(key.len()));
        }
        let mac = HmacSha256::new_from_slice(key).map_err(|_| KeyError(key.len()))?;
        Ok(Session {
            mac,
            local_nonce,
            tx_seq: 0,
            peer: None,
            rx_last_seq: 0,
        })
    }

    pub fn local_nonce(&self) -> [u8; NONCE_BYTES] {
        self.local_nonce
    }
    /// The peer's Hello, once received.
    pub fn peer(&self) -> Option<&Hello> {
        self.peer.as_ref()
    }
    /// Sequence number of the last frame accepted (0: none).
    pub fn rx_last_seq(&self) -> u64 {
        self.rx_last_seq
    }

    fn tag(&self, nonce: &[u8; NONCE_BYTES], header_and_body: &[u8]) -> HmacSha256 {
        let mut m = self.mac.clone();
        m.update(nonce);
        m.update(header_and_body);
        m
    }

    /// Frame `msg` for the peer.
    pub fn encode(&mut self, msg: &Message) -> Result<Vec<u8>, EncodeError> {
        let nonce = match msg {
            Message::Hello(h) if h.nonce != self.local_nonce => {
                return Err(EncodeError::WrongNonce)
            }
            Message::Hello(_) => [0u8; NONCE_BYTES],
            _ => self.peer.ok_or(EncodeError::NoPeerNonce)?.nonce,
        };
        if let Message::LogRecords(r) = msg {
            if r.segments.len() > MAX_SEGMENTS {
                return Err(EncodeError::TooManySegments(r.segments.len()));
            }
        }
        let mut out = vec![0u8; HEADER_BYTES];
        msg.encode_body(&mut out);
        let body_len = out.len() - HEADER_BYTES;
        if body_len > MAX_BODY_BYTES {
            return Err(EncodeError::TooLarge {
                body_len,
                max: MAX_BODY_BYTES,
            });
        }
        let seq = self.tx_seq + 1;
        let header = FrameHeader {
            version: WIRE_VERSION,
            kind: msg.kind(),
            body_len: body_len as u32,
            flags: 0,
            seq,
        };
        out[..HEADER_BYTES].copy_from_slice(&header.encode());
        let tag = self.tag(&nonce, &out).finalize().into_bytes();
        out.extend_from_slice(&tag);
        self.tx_seq = seq;
        Ok(out)
    }

    /// Decode the frame at the front of `buf` (a stream buffer). On `Ok(Frame)` the session
    /// has advanced; on `NeedMore` or any error it has not.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Decoded, FrameError> {
        if buf.len() < HEADER_BYTES {
            // Check what we have of the magic early: garbage fails fast.
            let n = buf.len().min(4);
            if buf[..n] != FRAME_MAGIC[..n] {
                return Err(FrameError::BadMagic);
            }
            return Ok(Decoded::NeedMore { need: HEADER_BYTES });
        }
        let h: &[u8; HEADER_BYTES] = buf[..HEADER_BYTES].try_into().expect("header length");
        if h[0..4] != FRAME_MAGIC {
            return Err(FrameError::BadMagic);
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != WIRE_VERSION {
            return Err(FrameError::UnknownVersion(version));
        }
        let kind = u16::from_le_bytes([h[6], h[7]]);
        let body_len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        if body_len > MAX_BODY_BYTES {
            return Err(FrameError::Oversized {
                body_len,
                max: MAX_BODY_BYTES,
            });
        }
        let flags = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if flags != 0 {
            return Err(FrameError::BadFlags(flags));
        }
        let seq = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
        let total = HEADER_BYTES + body_len + MAC_BYTES;
        if buf.len() < total {
            return Ok(Decoded::NeedMore { need: total });
        }
        let signed = &buf[..HEADER_BYTES + body_len];
        let nonce = if kind == kind::HELLO {
            [0u8; NONCE_BYTES]
        } else {
            self.local_nonce
        };
        self.tag(&nonce, signed)
            .verify_slice(&buf[HEADER_BYTES + body_len..total])
            .map_err(|_| FrameError::BadMac)?;
        if seq <= self.rx_last_seq {
            return Err(FrameError::Replayed {
                seq,
                last: self.rx_last_seq,
            });
        }
        let message = Message::decode_body(kind, &buf[HEADER_BYTES..HEADER_BYTES + body_len])?;
        match (&message, &self.peer) {
            (Message::Hello(_), Some(_)) => return Err(FrameError::DuplicateHello),
            (Message::Hello(hello), None) if hello.nonce == self.local_nonce => {
                return Err(FrameError::ReflectedHello)
            }
            (Message::Hello(hello), None) => self.peer = Some(*hello),
            (_, None) => return Err(FrameError::HelloFirst),
            (_, Some(_)) => {}
        }
        self.rx_last_seq = seq;
        Ok(Decoded::Frame {
            seq,
            message,
            consumed: total,
        })
    }

    /// Decode exactly one whole frame (e.g. a datagram or a test vector).
    pub fn decode_frame(&mut self, frame: &[u8]) -> Result<Message, FrameError> {
        let mut probe = self.clone();
        match probe.decode(frame)? {
            Decoded::NeedMore { need } => Err(FrameError::Truncated {
                have: frame.len(),
                need,
            }),
            Decoded::Frame { consumed, .. } if consumed != frame.len() => {
                Err(FrameError::TrailingBytes(frame.len() - consumed))
            }
            Decoded::Frame { message, .. } => {
                *self = probe;
                Ok(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &[u8] = b"a pre-shared key of the pair, 32b";

    fn hello(node_id: u8, nonce: u8) -> Hello {
        Hello {
            node_id,
            software_version: 0x0001_0002,
            capabilities: 0b101,
            nonce: [nonce; 16],
        }
    }

    /// Two sessions `a` and `b` that exchanged Hellos.
    fn pair() -> (Session, Session) {
        let mut a = Session::new(KEY, [0xA; 16]).unwrap();
        let mut b = Session::new(KEY, [0xB; 16]).unwrap();
        let ha = a.encode(&Message::Hello(hello(0, 0xA))).unwrap();
        let hb = b.encode(&Message::Hello(hello(1, 0xB))).unwrap();
        assert_eq!(b.decode_frame(&ha).unwrap(), Message::Hello(hello(0, 0xA)));
        assert_eq!(a.decode_frame(&hb).unwrap(), Message::Hello(hello(1, 0xB)));
        (a, b)
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Heartbeat {
                seq: 42,
                state: StateSummary {
                    ha_state: 3,
                    flags: StateSummary::HEALTHY,
                    aggregates_served: 2,
                    log_last_seq: 99,
                },
            },
            Message::LogRecords(LogRecords {
                epoch: 3,
                first_seq: 5,
                last_seq: 7,
                segments: vec![
                    LogSegment {
                        region_offset: 4096,
                        bytes: vec![1; 300],
                    },
                    LogSegment {
                        region_offset: 8192,
                        bytes: vec![],
                    },
                ],
            }),
            Message::LogAck {
                epoch: 5,
                up_to_seq: 7,
            },
            Message::Trim { up_to_seq: 6 },
            Message::PleaseTakeover,
            Message::PleaseShutdown {
                countdown_ms: 30_000,
            },
            Message::ShutdownComplete,
            Message::PleaseDie,
            Message::Takeover,
            Message::Giveback,
            Message::GivebackComplete,
            Message::Ha(br#"{"PleaseDie":{"epoch":3}}"#.to_vec()),
            Message::MirrorFetch,
            Message::MirrorCopy(LogRecords {
                epoch: 0,
                first_seq: 0,
                last_seq: 9,
                segments: vec![LogSegment {
                    region_offset: 0,
                    bytes: vec![7; 64],
                }],
            }),
            Message::MirrorCopyDone {
                region_bytes: 1 << 20,
            },
            Message::LogRefused {
                reason: "serving the partner's aggregate".into(),
            },
            Message::LogPaused,
            Message::LogResume,
        ]
    }

    /// A correctly MACed frame with arbitrary header fields and body, as a buggy or newer
    /// peer holding the key could send.
    fn seal(s: &Session, nonce: [u8; 16], kind: u16, seq: u64, body: &[u8]) -> Vec<u8> {
        let h = FrameHeader {
            version: WIRE_VERSION,
            kind,
            body_len: body.len() as u32,
            flags: 0,
            seq,
        };
        let mut out = h.encode().to_vec();
        out.extend_from_slice(body);
        let tag = s.tag(&nonce, &out).finalize().into_bytes();
        out.extend_from_slice(&tag);
        out
    }

    /// After a rejection the session is unchanged and the next legitimate frame still goes.
    fn still_works(a: &mut Session, b: &mut Session, before: u64) {
        assert_eq!(b.rx_last_seq(), before, "rejected frame changed state");
        let f = a
            .encode(&Message::LogAck {
                epoch: 1,
                up_to_seq: 1,
            })
            .unwrap();
        assert_eq!(
            b.decode_frame(&f).unwrap(),
            Message::LogAck {
                epoch: 1,
                up_to_seq: 1
            }
        );
    }

    #[test]
    fn every_message_round_trips() {
        let (mut a, mut b) = pair();
        for m in all_messages() {
            let f = a.encode(&m).unwrap();
            assert!(f.len() <= MAX_FRAME_BYTES);
            assert_eq!(b.decode_frame(&f).unwrap(), m);
        }
        assert_eq!(b.rx_last_seq(), 1 + all_messages().len() as u64);
        assert_eq!(b.peer(), Some(&hello(0, 0xA)));
    }

    #[test]
    fn stream_decoding_in_pieces() {
        let (mut a, mut b) = pair();
        let mut stream = Vec::new();
        for m in all_messages() {
            stream.extend(a.encode(&m).unwrap());
        }
        let mut got = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        // Feed 7 bytes at a time, as a socket might.
        for chunk in stream.chunks(7) {
            buf.extend_from_slice(chunk);
            while let Decoded::Frame {
                message, consumed, ..
            } = b.decode(&buf).unwrap()
            {
                got.push(message);
                buf.drain(..consumed);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(got, all_messages());
    }

    #[test]
    fn forged_frame_is_rejected() {
        let (mut a, mut b) = pair();
        let last = b.rx_last_seq();
        let mut f = a
            .encode(&Message::PleaseShutdown { countdown_ms: 10 })
            .unwrap();
        f[HEADER_BYTES] ^= 1; // countdown changed in flight
        assert_eq!(b.decode_frame(&f), Err(FrameError::BadMac));
        let mut f = a.encode(&Message::Takeover).unwrap();
        let n = f.len();
        f[n - 1] ^= 1; // tag changed
        assert_eq!(b.decode_frame(&f), Err(FrameError::BadMac));
        // A sender with another key.
        let mut mallory = Session::new(b"not the key of this pair!!", [0xA; 16]).unwrap();
        mallory.peer = Some(hello(1, 0xB));
        mallory.tx_seq = 1000;
        let f = mallory.encode(&Message::PleaseDie).unwrap();
        assert_eq!(b.decode_frame(&f), Err(FrameError::BadMac));
        still_works(&mut a, &mut b, last);
    }

    #[test]
    fn replayed_frame_is_rejected() {
        let (mut a, mut b) = pair();
        let f = a.encode(&Message::Giveback).unwrap();
        assert_eq!(b.decode_frame(&f).unwrap(), Message::Giveback);
        let last = b.rx_last_seq();
        assert_eq!(
            b.decode_frame(&f),
            Err(FrameError::Replayed { seq: last, last })
        );
        // An older frame, delivered late.
        let old = a.encode(&Message::PleaseDie).unwrap();
        let newer = a.encode(&Message::PleaseDie).unwrap();
        b.decode_frame(&newer).unwrap();
        assert!(matches!(
            b.decode_frame(&old),
            Err(FrameError::Replayed { .. })
        ));
        let last = b.rx_last_seq();
        still_works(&mut a, &mut b, last);
    }

    #[test]
    fn frame_from_an_earlier_session_is_rejected() {
        let (mut a, _b) = pair();
        let recorded = a.encode(&Message::Takeover).unwrap();
        // b restarts: new nonce, new session; a reconnects.
        let mut a2 = Session::new(KEY, [0xC; 16]).unwrap();
        let mut b2 = Session::new(KEY, [0xD; 16]).unwrap();
        b2.decode_frame(&a2.encode(&Message::Hello(hello(0, 0xC))).unwrap())
            .unwrap();
        a2.decode_frame(&b2.encode(&Message::Hello(hello(1, 0xD))).unwrap())
            .unwrap();
        let last = b2.rx_last_seq();
        assert_eq!(b2.decode_frame(&recorded), Err(FrameError::BadMac));
        still_works(&mut a2, &mut b2, last);
    }

    #[test]
    fn reflected_frames_are_rejected() {
        let (mut a, mut b) = pair();
        // a's own frame sent back to a: MACed with b's nonce, a expects its own.
        let f = a.encode(&Message::PleaseTakeover).unwrap();
        let last = a.rx_last_seq();
        assert_eq!(a.decode_frame(&f), Err(FrameError::BadMac));
        assert_eq!(a.rx_last_seq(), last);
        // A Hello reflected to its sender in a fresh session.
        let mut c = Session::new(KEY, [0xE; 16]).unwrap();
        let hc = c.encode(&Message::Hello(hello(0, 0xE))).unwrap();
        assert_eq!(c.decode_frame(&hc), Err(FrameError::ReflectedHello));
        assert!(c.peer().is_none());
        let last = b.rx_last_seq();
        still_works(&mut a, &mut b, last);
    }

    #[test]
    fn truncated_frame_is_rejected() {
        let (mut a, mut b) = pair();
        let last = b.rx_last_seq();
        let f = a
            .encode(&Message::LogAck {
                epoch: 1,
                up_to_seq: 3,
            })
            .unwrap();
        for cut in [0, 1, HEADER_BYTES - 1, HEADER_BYTES, f.len() - 1] {
            assert_eq!(
                b.decode_frame(&f[..cut]),
                Err(FrameError::Truncated {
                    have: cut,
                    need: if cut < HEADER_BYTES {
                        HEADER_BYTES
                    } else {
                        f.len()
                    }
                })
            );
            assert!(matches!(b.decode(&f[..cut]), Ok(Decoded::NeedMore { .. })));
        }
        let mut longer = f.clone();
        longer.push(0);
        assert_eq!(b.decode_frame(&longer), Err(FrameError::TrailingBytes(1)));
        assert_eq!(b.rx_last_seq(), last);
        assert_eq!(
            b.decode_frame(&f).unwrap(),
            Message::LogAck {
                epoch: 1,
                up_to_seq: 3
            }
        );
    }

    #[test]
    fn oversized_frame_is_rejected_from_its_header() {
        let (mut a, mut b) = pair();
        let last = b.rx_last_seq();
        let mut f = a.encode(&Message::PleaseDie).unwrap();
        f[8..12].copy_from_slice(&((MAX_BODY_BYTES + 1) as u32).to_le_bytes());
        // Refused from the header alone: no need to buffer the claimed body.
        assert_eq!(
            b.decode(&f[..HEADER_BYTES]),
            Err(FrameError::Oversized {
                body_len: MAX_BODY_BYTES + 1,
                max: MAX_BODY_BYTES
            })
        );
        let huge = Message::LogRecords(LogRecords {
            epoch: 3,
            first_seq: 1,
            last_seq: 1,
            segments: vec![LogSegment {
                region_offset: 0,
                bytes: vec![0; MAX_BODY_BYTES],
            }],
        });
        assert!(matches!(a.encode(&huge), Err(EncodeError::TooLarge { .. })));
        still_works(&mut a, &mut b, last);
    }

    #[test]
    fn unknown_version_magic_and_flags_are_rejected() {
        let (mut a, mut b) = pair();
        let last = b.rx_last_seq();
        let f = a.encode(&Message::PleaseDie).unwrap();
        let mut v2 = f.clone();
        v2[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(b.decode_frame(&v2), Err(FrameError::UnknownVersion(2)));
        let mut bad = f.clone();
        bad[0] = b'X';
        assert_eq!(b.decode_frame(&bad), Err(FrameError::BadMagic));
        assert_eq!(b.decode(b"GET / HTTP/1.1"), Err(FrameError::BadMagic));
        let mut flags = f.clone();
        flags[12] = 1;
        assert_eq!(b.decode_frame(&flags), Err(FrameError::BadFlags(1)));
        still_works(&mut a, &mut b, last);
    }

    #[test]
    fn unknown_kind_and_malformed_bodies_are_rejected_even_when_authentic() {
        let (mut a, mut b) = pair();
        let last = b.rx_last_seq();
        let nb = b.local_nonce();
        assert_eq!(
            b.decode_frame(&seal(&a, nb, 99, 1000, &[])),
            Err(FrameError::UnknownKind(99))
        );
        assert_eq!(
            b.decode_frame(&seal(&a, nb, kind::LOG_ACK, 1000, &[1, 2, 3])),
            Err(FrameError::Malformed {
                kind: kind::LOG_ACK,
                reason: "body too short"
            })
        );
        assert_eq!(
            b.decode_frame(&seal(&a, nb, kind::PLEASE_DIE, 1000, &[0])),
            Err(FrameError::Malformed {
                kind: kind::PLEASE_DIE,
                reason: "trailing bytes in body"
            })
        );
        let mut many = vec![0u8; 24]; // epoch, first_seq, last_seq
        many.extend_from_slice(&(MAX_SEGMENTS as u32 + 1).to_le_bytes());
        assert_eq!(
            b.decode_frame(&seal(&a, nb, kind::LOG_RECORDS, 1000, &many)),
            Err(FrameError::Malformed {
                kind: kind::LOG_RECORDS,
                reason: "too many segments"
            })
        );
        let mut hb = vec![0u8; 8];
        hb.extend_from_slice(&[0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            b.decode_frame(&seal(&a, nb, kind::HEARTBEAT, 1000, &hb)),
            Err(FrameError::Malformed { .. })
        ));
        still_works(&mut a, &mut b, last);
    }

    #[test]
    fn hello_must_come_first_and_once() {
        let mut a = Session::new(KEY, [0xA; 16]).unwrap();
        let mut b = Session::new(KEY, [0xB; 16]).unwrap();
        assert_eq!(a.encode(&Message::PleaseDie), Err(EncodeError::NoPeerNonce));
        assert_eq!(
            a.encode(&Message::Hello(hello(0, 0x1))),
            Err(EncodeError::WrongNonce)
        );
        // A non-Hello first frame, MACed with b's nonce by someone holding the key.
        let f = seal(&a, b.local_nonce(), kind::PLEASE_DIE, 1, &[]);
        assert_eq!(b.decode_frame(&f), Err(FrameError::HelloFirst));
        assert_eq!((b.rx_last_seq(), b.peer()), (0, None));
        b.decode_frame(&a.encode(&Message::Hello(hello(0, 0xA))).unwrap())
            .unwrap();
        let mut body = Vec::new();
        Message::Hello(hello(0, 0x7)).encode_body(&mut body);
        let again = seal(&a, [0; 16], kind::HELLO, 50, &body);
        assert_eq!(b.decode_frame(&again), Err(FrameError::DuplicateHello));
        assert_eq!(b.peer(), Some(&hello(0, 0xA)));
        assert_eq!(b.rx_last_seq(), 1);
    }

    #[test]
    fn short_key_is_refused() {
        assert_eq!(Session::new(b"short", [0; 16]).unwrap_err(), KeyError(5));
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder and never change its state unless accepted.
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>()) {
            let (_a, mut b) = pair();
            let mut bytes = bytes;
            if magic && bytes.len() >= 6 {
                bytes[..4].copy_from_slice(&FRAME_MAGIC);
                bytes[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
            }
            let before = (b.rx_last_seq(), b.peer().copied());
            if !matches!(b.decode(&bytes), Ok(Decoded::Frame { .. })) {
                prop_assert_eq!((b.rx_last_seq(), b.peer().copied()), before);
            }
            let mut fresh = Session::new(KEY, [1; 16]).unwrap();
            let _ = fresh.decode_frame(&bytes);
        }

        /// Any single bit flipped in a frame is caught.
        #[test]
        fn any_bit_flip_is_rejected(which in 0usize..11, bit in 0usize..(8 * 400)) {
            let (mut a, mut b) = pair();
            let mut f = a.encode(&all_messages()[which]).unwrap();
            let bit = bit % (8 * f.len());
            f[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(b.decode_frame(&f).is_err());
            prop_assert_eq!(b.rx_last_seq(), 1);
        }
    }
}
