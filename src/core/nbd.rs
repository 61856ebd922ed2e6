//! NBD wire codec (server side), sans-io: constants, option request parsing, option reply
//! encoding, transmission request decoding and validation, simple and structured replies.
//!
//! Everything follows the NBD protocol description (NetworkBlockDevice/nbd `doc/proto.md`).
//! All integers on the wire are big-endian. Only the fixed newstyle handshake and compact
//! (non-extended) headers are spoken; `NBD_OPT_EXTENDED_HEADERS` is answered `NBD_REP_ERR_UNSUP`.
//!
//! ## Handshake (server first)
//! | bytes | field |
//! | --- | --- |
//! | 8 | `NBDMAGIC` |
//! | 8 | `IHAVEOPT` |
//! | 2 | handshake flags ([`HS_FLAG_FIXED_NEWSTYLE`], [`HS_FLAG_NO_ZEROES`]) |
//!
//! then the client sends 4 bytes of client flags ([`CLIENT_FLAG_FIXED_NEWSTYLE`],
//! [`CLIENT_FLAG_NO_ZEROES`]), then options ([`OptionHeader`] + data) until one of them ends the
//! handshake (`NBD_OPT_EXPORT_NAME`, or `NBD_OPT_GO` answered with `NBD_REP_ACK`).

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second 8 bytes of the server greeting, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (compact header).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const HS_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const HS_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Option: choose an export and enter transmission; cannot return errors.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: soft disconnect during the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: withdrawn `PEEK_EXPORT` extension.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Option: upgrade to TLS (not offered here).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit extended headers (not offered here).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success / end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every option error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR + 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR + 2;
/// Option error: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR + 3;
/// Option error: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR + 4;
/// Option error: TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR + 5;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR + 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR + 7;
/// Option error: the client must request `NBD_INFO_BLOCK_SIZE` before `NBD_OPT_GO`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR + 8;
/// Option error: request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR + 9;
/// Option error: extended headers required.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR + 10;

/// Info type: size and transmission flags (mandatory before a successful INFO/GO).
pub const INFO_EXPORT: u16 = 0;
/// Info type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Info type: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: always set.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational medium.
pub const TF_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` supported (only with structured replies).
pub const TF_SEND_DF: u16 = 1 << 7;
/// Transmission flag: connections share one consistent view and flushes apply to all.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_RESIZE` (experimental).
pub const TF_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: `NBD_CMD_CACHE` supported.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: soft disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (hint).
pub const CMD_TRIM: u16 = 4;
/// Command: cache (not supported here).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status (no metadata contexts offered here).
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command: resize (experimental, not supported here).
pub const CMD_RESIZE: u16 = 8;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must not punch holes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: at most one content chunk in a structured read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent per context in block status.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail write zeroes fast unless it is faster than a write.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag: payload length given (extended headers only).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply flag: final chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply type: no payload, final.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured reply type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply type: a hole at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply type: block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply type: error with message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Structured reply type: error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// NBD error: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// NBD error: input/output error.
pub const NBD_EIO: u32 = 5;
/// NBD error: cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// NBD error: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// NBD error: no space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// NBD error: operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// NBD error: server shutting down. This server never sends it (see DESIGN.md: qemu fails
/// such requests instead of retrying them after a reconnect).
pub const NBD_ESHUTDOWN: u32 = 108;

/// Longest string (export name, description, message) the protocol allows.
pub const MAX_STRING_BYTES: usize = 4096;
/// Size of a transmission request header.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Size of an option request header.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Size of a simple reply.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_BYTES: usize = 20;
/// Requests smaller than this must not be treated as a denial of service (proto.md).
pub const DOS_FLOOR_BYTES: u32 = 1 << 25;

/// Errors decoding fixed-size frames. Any of them means the stream cannot be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame does not start with the magic it must start with.
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic {
        /// The magic this frame must carry.
        expected: u64,
        /// What was received.
        found: u64,
    },
    /// The client set flags the server did not advertise or does not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// The 18-byte server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags (fixed newstyle and
/// no-zeroes).
pub fn encode_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(HS_FLAG_FIXED_NEWSTYLE | HS_FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Client flags as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle.
    pub fixed_newstyle: bool,
    /// The client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// Decode the 4-byte client flags. Unknown bits mean the server must drop the connection.
pub fn decode_client_flags(raw: [u8; 4]) -> Result<ClientFlags, FrameError> {
    let v = u32::from_be_bytes(raw);
    let known = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;
    if v & !known != 0 {
        return Err(FrameError::UnknownClientFlags(v));
    }
    Ok(ClientFlags {
        fixed_newstyle: v & CLIENT_FLAG_FIXED_NEWSTYLE != 0,
        no_zeroes: v & CLIENT_FLAG_NO_ZEROES != 0,
    })
}

/// Option request header.
///
/// | bytes | field |
/// | --- | --- |
/// | 8 | `IHAVEOPT` |
/// | 4 | option |
/// | 4 | length of the option data that follows |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number (`OPT_*`).
    pub option: u32,
    /// Bytes of option data that follow.
    pub length: u32,
}

/// Decode a 16-byte option header.
pub fn decode_option_header(raw: &[u8; OPTION_HEADER_BYTES]) -> Result<OptionHeader, FrameError> {
    let magic = be64(&raw[0..8]);
    if magic != IHAVEOPT {
        return Err(FrameError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    Ok(OptionHeader {
        option: be32(&raw[8..12]),
        length: be32(&raw[12..16]),
    })
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
///
/// | bytes | field |
/// | --- | --- |
/// | 4 | name length N |
/// | N | export name |
/// | 2 | number of information requests R |
/// | 2 × R | information types requested |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" is the default export).
    pub name: String,
    /// Information types requested (`INFO_*`), unknown ones included.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// True when the client asked for `NBD_INFO_BLOCK_SIZE`.
    pub fn wants_block_size(&self) -> bool {
        self.requests.contains(&INFO_BLOCK_SIZE)
    }
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
///
/// | bytes | field |
/// | --- | --- |
/// | 4 | name length N |
/// | N | export name |
/// | 4 | number of queries Q |
/// | Q × (4 + len) | each query: 4-byte length, then the query string |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub name: String,
    /// Query strings.
    pub queries: Vec<String>,
}

/// A parsed option request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    /// `NBD_OPT_EXPORT_NAME` with the export name.
    ExportName(String),
    /// `NBD_OPT_ABORT` (any data is ignored, as the spec asks).
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// Anything else (answered `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

/// Why an option's data could not be parsed; answered with `reply` and the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("option {option}: {message}")]
pub struct OptionError {
    /// The option that failed.
    pub option: u32,
    /// Error reply type to send (`REP_ERR_*`).
    pub reply: u32,
    /// Human-readable message sent with the reply.
    pub message: String,
}

fn invalid(option: u32, message: &str) -> OptionError {
    OptionError {
        option,
        reply: REP_ERR_INVALID,
        message: message.to_string(),
    }
}

/// Validate an NBD string: UTF-8, no NUL, at most [`MAX_STRING_BYTES`].
pub fn parse_string(raw: &[u8]) -> Result<String, &'static str> {
    if raw.len() > MAX_STRING_BYTES {
        return Err("string longer than 4096 bytes");
    }
    if raw.contains(&0) {
        return Err("string contains NUL");
    }
    std::str::from_utf8(raw)
        .map(str::to_string)
        .map_err(|_| "string is not UTF-8")
}

/// A cursor over option data that reports truncation as `NBD_REP_ERR_INVALID`.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    option: u32,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        if self.data.len() - self.pos < n {
            return Err(invalid(self.option, "option data truncated"));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, OptionError> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Result<u32, OptionError> {
        self.take(4).map(be32)
    }
    fn string(&mut self, len: usize) -> Result<String, OptionError> {
        let raw = self.take(len)?;
        parse_string(raw).map_err(|m| invalid(self.option, m))
    }
    fn finish(&self) -> Result<(), OptionError> {
        if self.pos != self.data.len() {
            return Err(invalid(self.option, "trailing bytes after option data"));
        }
        Ok(())
    }
}

/// Parse an option's data. Errors carry the reply the server must send.
pub fn parse_option(option: u32, data: &[u8]) -> Result<OptionRequest, OptionError> {
    let no_data = |req: OptionRequest| {
        if data.is_empty() {
            Ok(req)
        } else {
            Err(invalid(option, "option takes no data"))
        }
    };
    let mut c = Cursor {
        data,
        pos: 0,
        option,
    };
    match option {
        OPT_EXPORT_NAME => Ok(OptionRequest::ExportName(c.string(data.len())?)),
        OPT_ABORT => Ok(OptionRequest::Abort),
        OPT_LIST => no_data(OptionRequest::List),
        OPT_STARTTLS => Ok(OptionRequest::StartTls),
        OPT_STRUCTURED_REPLY => no_data(OptionRequest::StructuredReply),
        OPT_EXTENDED_HEADERS => Ok(OptionRequest::ExtendedHeaders),
        OPT_INFO | OPT_GO => {
            let name_len = c.u32()? as usize;
            // The spec bounds the name by "option length - 6"; take() checks it.
            let name = c.string(name_len)?;
            let n = c.u16()? as usize;
            let mut requests = Vec::with_capacity(n.min(16));
            for _ in 0..n {
                requests.push(c.u16()?);
            }
            c.finish()?;
            let req = InfoRequest { name, requests };
            Ok(if option == OPT_INFO {
                OptionRequest::Info(req)
            } else {
                OptionRequest::Go(req)
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let name_len = c.u32()? as usize;
            let name = c.string(name_len)?;
            let n = c.u32()? as usize;
            let mut queries = Vec::new();
            for _ in 0..n {
                let len = c.u32()? as usize;
                queries.push(c.string(len)?);
            }
            c.finish()?;
            let req = MetaContextRequest { name, queries };
            Ok(if option == OPT_LIST_META_CONTEXT {
                OptionRequest::ListMetaContext(req)
            } else {
                OptionRequest::SetMetaContext(req)
            })
        }
        other => Ok(OptionRequest::Unknown(other)),
    }
}

/// Append one option reply.
///
/// | bytes | field |
/// | --- | --- |
/// | 8 | [`OPTION_REPLY_MAGIC`] |
/// | 4 | option being answered |
/// | 4 | reply type (`REP_*`) |
/// | 4 | length of the reply data |
/// | len | reply data |
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Cut a message to the protocol's string limit on a character boundary.
pub fn clamp_message(msg: &str) -> &str {
    if msg.len() <= MAX_STRING_BYTES {
        return msg;
    }
    let mut end = MAX_STRING_BYTES;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

/// Append an option error reply (`reply_type` must have bit 31 set) with a message.
pub fn encode_option_error(out: &mut Vec<u8>, option: u32, reply_type: u32, msg: &str) {
    debug_assert!(reply_type & REP_FLAG_ERROR != 0, "not an error reply type");
    encode_option_reply(out, option, reply_type, clamp_message(msg).as_bytes());
}

/// Append `NBD_REP_ACK`.
pub fn encode_ack(out: &mut Vec<u8>, option: u32) {
    encode_option_reply(out, option, REP_ACK, &[]);
}

/// Append `NBD_REP_SERVER`: 4-byte name length, name, then the description as free text.
pub fn encode_rep_server(out: &mut Vec<u8>, option: u32, name: &str, description: &str) {
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(clamp_message(description).as_bytes());
    encode_option_reply(out, option, REP_SERVER, &data);
}

/// Append `NBD_REP_INFO` / `NBD_INFO_EXPORT`: type (2), size (8), transmission flags (2).
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size_bytes: u64, flags: u16) {
    let mut data = [0u8; 12];
    data[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    data[10..12].copy_from_slice(&flags.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

/// Append `NBD_REP_INFO` / `NBD_INFO_NAME`: type (2), name.
pub fn encode_info_name(out: &mut Vec<u8>, option: u32, name: &str) {
    let mut data = INFO_NAME.to_be_bytes().to_vec();
    data.extend_from_slice(clamp_message(name).as_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

/// Append `NBD_REP_INFO` / `NBD_INFO_DESCRIPTION`: type (2), description.
pub fn encode_info_description(out: &mut Vec<u8>, option: u32, description: &str) {
    let mut data = INFO_DESCRIPTION.to_be_bytes().to_vec();
    data.extend_from_slice(clamp_message(description).as_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

/// Append `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`: type (2), minimum (4), preferred (4),
/// maximum (4).
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    let mut data = [0u8; 14];
    data[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&min.to_be_bytes());
    data[6..10].copy_from_slice(&preferred.to_be_bytes());
    data[10..14].copy_from_slice(&max.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size (8), transmission flags (2), and 124 zero bytes
/// unless the client negotiated `NBD_FLAG_C_NO_ZEROES`.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size_bytes: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// Check block size constraints against the rules of proto.md ("Block size constraints").
pub fn check_block_sizes(min: u32, preferred: u32, max: u32) -> Result<(), &'static str> {
    if !min.is_power_of_two() || min > 1 << 16 {
        return Err("minimum block size must be a power of two no larger than 64 KiB");
    }
    if !preferred.is_power_of_two() || preferred < min.max(512) {
        return Err("preferred block size must be a power of two >= max(minimum, 512)");
    }
    if max != u32::MAX && max % min != 0 {
        return Err("maximum block size must be a multiple of the minimum");
    }
    if max < preferred {
        return Err("maximum block size must be at least the preferred block size");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Transmission

/// Transmission request header (compact form).
///
/// | bytes | field |
/// | --- | --- |
/// | 4 | [`REQUEST_MAGIC`] |
/// | 2 | command flags (`CMD_FLAG_*`) |
/// | 2 | command type (`CMD_*`) |
/// | 8 | handle, echoed in the reply |
/// | 8 | offset |
/// | 4 | length (for `NBD_CMD_WRITE`, this many payload bytes follow) |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque handle.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

/// Decode a 28-byte request header. A bad magic means the stream is lost.
pub fn decode_request_header(
    raw: &[u8; REQUEST_HEADER_BYTES],
) -> Result<RequestHeader, FrameError> {
    let magic = be32(&raw[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(FrameError::BadMagic {
            expected: REQUEST_MAGIC as u64,
            found: magic as u64,
        });
    }
    Ok(RequestHeader {
        flags: be16(&raw[4..6]),
        kind: be16(&raw[6..8]),
        handle: be64(&raw[8..16]),
        offset: be64(&raw[16..24]),
        length: be32(&raw[24..28]),
    })
}

/// Encode a request header (used by tests and tools that play the client).
pub fn encode_request_header(h: &RequestHeader) -> [u8; REQUEST_HEADER_BYTES] {
    let mut out = [0u8; REQUEST_HEADER_BYTES];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&h.flags.to_be_bytes());
    out[6..8].copy_from_slice(&h.kind.to_be_bytes());
    out[8..16].copy_from_slice(&h.handle.to_be_bytes());
    out[16..24].copy_from_slice(&h.offset.to_be_bytes());
    out[24..28].copy_from_slice(&h.length.to_be_bytes());
    out
}

/// What the server negotiated for one connection; requests are checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Export size in bytes.
    pub size_bytes: u64,
    /// Advertised minimum block size (alignment of offset and length).
    pub min_bytes: u32,
    /// Advertised maximum block size (largest READ/WRITE).
    pub max_bytes: u32,
    /// Export is read-only.
    pub read_only: bool,
    /// Structured replies were negotiated (and so `NBD_FLAG_SEND_DF` advertised).
    pub structured: bool,
    /// Largest WRITE payload the server reads and discards when rejecting a request; beyond
    /// it the server hangs up (denial of service). At least [`DOS_FLOOR_BYTES`].
    pub max_discard_bytes: u32,
}

/// A request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
    },
    /// Write the `length`-byte payload that follows at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Soft disconnect.
    Disc,
    /// Flush.
    Flush,
    /// Trim hint.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Write zeroes (never by punching holes, so `NBD_CMD_FLAG_NO_HOLE` always holds).
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// Durable before the reply.
        fua: bool,
    },
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Reply with `errno`; first read and discard `discard_bytes` of payload.
    Error {
        /// NBD error number.
        errno: u32,
        /// Short reason for logs and structured error messages.
        reason: &'static str,
        /// Payload bytes that follow the header and must be skipped.
        discard_bytes: u32,
    },
    /// The stream cannot be continued safely: hard disconnect.
    Disconnect {
        /// Short reason for logs.
        reason: &'static str,
    },
}

/// Check a request against the negotiated limits, in the order: command known, payload size
/// sane, flags valid for the command, export writable, alignment, maximum size, bounds.
///
/// Errors follow proto.md: `EINVAL` for unknown commands and flags, misalignment, a READ or
/// WRITE over the maximum block size, and READ/TRIM past the end; `ENOSPC` for WRITE and
/// WRITE_ZEROES past the end; `EPERM` for writes to a read-only export. TRIM and WRITE_ZEROES
/// carry no payload and are not bound by the maximum block size (the server splits them).
/// `NBD_CMD_FLUSH` ignores its reserved offset/length, which some clients fill in.
pub fn validate_request(h: &RequestHeader, lim: &RequestLimits) -> Result<Command, Rejection> {
    let discard = if h.kind == CMD_WRITE { h.length } else { 0 };
    let err = |errno, reason| {
        Err(Rejection::Error {
            errno,
            reason,
            discard_bytes: discard,
        })
    };
    if h.kind == CMD_WRITE && h.length > lim.max_discard_bytes.max(DOS_FLOOR_BYTES) {
        return Err(Rejection::Disconnect {
            reason: "write payload too large",
        });
    }
    let allowed = match h.kind {
        CMD_READ => CMD_FLAG_FUA | if lim.structured { CMD_FLAG_DF } else { 0 },
        CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_DISC => return Ok(Command::Disc),
        CMD_CACHE | CMD_BLOCK_STATUS | CMD_RESIZE => {
            return err(NBD_EINVAL, "command not supported")
        }
        _ => return err(NBD_EINVAL, "unknown command"),
    };
    if h.flags & !allowed != 0 {
        return err(NBD_EINVAL, "command flag not valid for this command");
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    if h.kind == CMD_FLUSH {
        return Ok(Command::Flush);
    }
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && lim.read_only {
        return err(NBD_EPERM, "export is read-only");
    }
    let min = lim.min_bytes.max(1) as u64;
    if h.offset % min != 0 || h.length as u64 % min != 0 {
        return err(NBD_EINVAL, "request not aligned to the minimum block size");
    }
    if matches!(h.kind, CMD_READ | CMD_WRITE) && h.length > lim.max_bytes {
        return err(NBD_EINVAL, "request larger than the maximum block size");
    }
    let past_end = match h.offset.checked_add(h.length as u64) {
        Some(end) => end > lim.size_bytes,
        None => true,
    };
    if past_end {
        return match h.kind {
            CMD_WRITE | CMD_WRITE_ZEROES => err(NBD_ENOSPC, "request past the end of the export"),
            _ => err(NBD_EINVAL, "request past the end of the export"),
        };
    }
    let (offset, length) = (h.offset, h.length);
    Ok(match h.kind {
        CMD_READ => Command::Read { offset, length },
        CMD_WRITE => Command::Write {
            offset,
            length,
            fua,
        },
        CMD_TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        _ => Command::WriteZeroes {
            offset,
            length,
            fua,
        },
    })
}

/// Simple reply: magic (4), error (4), handle (8); READ data follows when error is 0.
pub fn encode_simple_reply(errno: u32, handle: u64) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut out = [0u8; SIMPLE_REPLY_BYTES];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&errno.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

/// Structured reply chunk header: magic (4), flags (2), type (2), handle (8), payload
/// length (4).
pub fn encode_chunk_header(
    flags: u16,
    ty: u16,
    handle: u64,
    length: u32,
) -> [u8; CHUNK_HEADER_BYTES] {
    let mut out = [0u8; CHUNK_HEADER_BYTES];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&ty.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// Everything of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk before its data: chunk header with
/// length `8 + data_len`, then the 8-byte offset. The `data_len` bytes follow.
pub fn encode_offset_data_header(handle: u64, offset: u64, data_len: u32, done: bool) -> [u8; 28] {
    assert!(
        data_len > 0 && data_len <= u32::MAX - 8,
        "OFFSET_DATA length out of range"
    );
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut out = [0u8; 28];
    out[..20].copy_from_slice(&encode_chunk_header(
        flags,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        data_len + 8,
    ));
    out[20..28].copy_from_slice(&offset.to_be_bytes());
    out
}

/// `NBD_REPLY_TYPE_NONE` with `NBD_REPLY_FLAG_DONE`.
pub fn encode_none_chunk(handle: u64) -> [u8; CHUNK_HEADER_BYTES] {
    encode_chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)
}

/// `NBD_REPLY_TYPE_ERROR` chunk (final): header, error (4), message length (2), message.
pub fn encode_error_chunk(handle: u64, errno: u32, msg: &str) -> Vec<u8> {
    assert!(errno != 0, "error chunk needs a nonzero error");
    let msg = clamp_message(msg).as_bytes();
    let mut out = Vec::with_capacity(CHUNK_HEADER_BYTES + 6 + msg.len());
    out.extend_from_slice(&encode_chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    ));
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// Transmission flags for an export, given what the connection negotiated.
pub fn transmission_flags(read_only: bool, multi_conn: bool, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA;
    if read_only {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    }
    if structured {
        // Every read is answered with a single content chunk, so DF always holds.
        f |= TF_SEND_DF;
    }
    if multi_conn {
        f |= TF_CAN_MULTI_CONN;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> RequestLimits {
        RequestLimits {
            size_bytes: 1 << 20,
            min_bytes: 512,
            max_bytes: 64 << 10,
            read_only: false,
            structured: true,
            max_discard_bytes: DOS_FLOOR_BYTES,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            handle: 0xabcd,
            offset,
            length,
        }
    }

    fn rej(errno: u32, discard: u32) -> impl Fn(Result<Command, Rejection>) {
        move |r| match r {
            Err(Rejection::Error {
                errno: e,
                discard_bytes,
                ..
            }) => {
                assert_eq!((e, discard_bytes), (errno, discard), "{r:?}")
            }
            other => panic!("expected errno {errno}, got {other:?}"),
        }
    }

    #[test]
    fn greeting_bytes() {
        let g = encode_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            decode_client_flags([0, 0, 0, 3]).unwrap(),
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            }
        );
        assert_eq!(
            decode_client_flags([0, 0, 0, 1]).unwrap(),
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: false
            }
        );
        assert_eq!(
            decode_client_flags([0, 0, 0, 4]),
            Err(FrameError::UnknownClientFlags(4))
        );
        assert!(decode_client_flags([0x80, 0, 0, 1]).is_err());
    }

    #[test]
    fn option_header() {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(b"IHAVEOPT");
        raw[8..12].copy_from_slice(&7u32.to_be_bytes());
        raw[12..16].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            decode_option_header(&raw).unwrap(),
            OptionHeader {
                option: 7,
                length: 9
            }
        );
        raw[0] = b'X';
        assert!(matches!(
            decode_option_header(&raw),
            Err(FrameError::BadMagic { .. })
        ));
    }

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn parse_go_and_info() {
        let d = info_data("disk0", &[INFO_BLOCK_SIZE, INFO_NAME, 999]);
        let r = parse_option(OPT_GO, &d).unwrap();
        let OptionRequest::Go(go) = r else {
            panic!("{r:?}")
        };
        assert_eq!(go.name, "disk0");
        assert_eq!(go.requests, vec![INFO_BLOCK_SIZE, INFO_NAME, 999]);
        assert!(go.wants_block_size());
        let r = parse_option(OPT_INFO, &info_data("", &[])).unwrap();
        assert_eq!(
            r,
            OptionRequest::Info(InfoRequest {
                name: String::new(),
                requests: vec![]
            })
        );
        // Name length pointing past the data.
        let mut bad = info_data("abc", &[]);
        bad[3] = 200;
        assert_eq!(
            parse_option(OPT_GO, &bad).unwrap_err().reply,
            REP_ERR_INVALID
        );
        // Request count larger than the data holds.
        let mut bad = info_data("abc", &[1]);
        bad[8] = 5;
        assert_eq!(
            parse_option(OPT_GO, &bad).unwrap_err().reply,
            REP_ERR_INVALID
        );
        // Trailing garbage.
        let mut bad = info_data("abc", &[1]);
        bad.push(0);
        assert_eq!(
            parse_option(OPT_INFO, &bad).unwrap_err().reply,
            REP_ERR_INVALID
        );
        // Too short for even the length.
        assert_eq!(
            parse_option(OPT_GO, &[0, 0]).unwrap_err().reply,
            REP_ERR_INVALID
        );
        // NUL and bad UTF-8 in the name.
        assert!(parse_option(OPT_GO, &info_data("a\0b", &[])).is_err());
        let mut bad = info_data("ab", &[]);
        bad[4] = 0xff;
        assert!(parse_option(OPT_GO, &bad).is_err());
    }

    #[test]
    fn parse_simple_options() {
        assert_eq!(parse_option(OPT_LIST, &[]).unwrap(), OptionRequest::List);
        assert_eq!(
            parse_option(OPT_LIST, &[1]).unwrap_err().reply,
            REP_ERR_INVALID
        );
        assert_eq!(
            parse_option(OPT_STRUCTURED_REPLY, &[]).unwrap(),
            OptionRequest::StructuredReply
        );
        assert_eq!(
            parse_option(OPT_STRUCTURED_REPLY, &[0]).unwrap_err().reply,
            REP_ERR_INVALID
        );
        assert_eq!(
            parse_option(OPT_ABORT, &[1, 2, 3]).unwrap(),
            OptionRequest::Abort
        );
        assert_eq!(
            parse_option(OPT_STARTTLS, &[]).unwrap(),
            OptionRequest::StartTls
        );
        assert_eq!(
            parse_option(OPT_EXTENDED_HEADERS, &[]).unwrap(),
            OptionRequest::ExtendedHeaders
        );
        assert_eq!(
            parse_option(4242, &[9, 9]).unwrap(),
            OptionRequest::Unknown(4242)
        );
        assert_eq!(
            parse_option(OPT_EXPORT_NAME, b"vol").unwrap(),
            OptionRequest::ExportName("vol".into())
        );
        assert!(parse_option(OPT_EXPORT_NAME, &vec![b'a'; 4097]).is_err());
    }

    #[test]
    fn parse_meta_context() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let r = parse_option(OPT_SET_META_CONTEXT, &d).unwrap();
        assert_eq!(
            r,
            OptionRequest::SetMetaContext(MetaContextRequest {
                name: "vol".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
            })
        );
        assert!(matches!(
            parse_option(OPT_LIST_META_CONTEXT, &d).unwrap(),
            OptionRequest::ListMetaContext(_)
        ));
        let truncated = &d[..d.len() - 1];
        assert_eq!(
            parse_option(OPT_SET_META_CONTEXT, truncated)
                .unwrap_err()
                .reply,
            REP_ERR_INVALID
        );
    }

    fn split_reply(b: &[u8]) -> (u64, u32, u32, &[u8]) {
        let len = be32(&b[16..20]) as usize;
        assert_eq!(b.len(), 20 + len);
        (be64(&b[0..8]), be32(&b[8..12]), be32(&b[12..16]), &b[20..])
    }

    #[test]
    fn option_replies() {
        let mut out = Vec::new();
        encode_ack(&mut out, OPT_GO);
        assert_eq!(
            split_reply(&out),
            (OPTION_REPLY_MAGIC, OPT_GO, REP_ACK, &[][..])
        );

        let mut out = Vec::new();
        encode_rep_server(&mut out, OPT_LIST, "vol", "my disk");
        let (_, opt, ty, data) = split_reply(&out);
        assert_eq!((opt, ty), (OPT_LIST, REP_SERVER));
        assert_eq!(&data[0..4], &3u32.to_be_bytes());
        assert_eq!(&data[4..], b"volmy disk");

        let mut out = Vec::new();
        encode_info_export(&mut out, OPT_INFO, 0x1_0000_0000, 0x1234);
        let (_, _, ty, data) = split_reply(&out);
        assert_eq!(ty, REP_INFO);
        assert_eq!(data, &[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0x12, 0x34]);

        let mut out = Vec::new();
        encode_info_block_size(&mut out, OPT_GO, 512, 4096, 1 << 25);
        let (_, _, _, data) = split_reply(&out);
        assert_eq!(data.len(), 14);
        assert_eq!(be16(&data[0..2]), INFO_BLOCK_SIZE);
        assert_eq!(
            (be32(&data[2..6]), be32(&data[6..10]), be32(&data[10..14])),
            (512, 4096, 1 << 25)
        );

        let mut out = Vec::new();
        encode_info_name(&mut out, OPT_GO, "vol");
        assert_eq!(split_reply(&out).3, &[0, 1, b'v', b'o', b'l']);
        let mut out = Vec::new();
        encode_info_description(&mut out, OPT_GO, "d");
        assert_eq!(split_reply(&out).3, &[0, 2, b'd']);

        let mut out = Vec::new();
        encode_option_error(&mut out, 77, REP_ERR_UNSUP, "nope");
        assert_eq!(
            split_reply(&out),
            (OPTION_REPLY_MAGIC, 77, 0x8000_0001, &b"nope"[..])
        );
        let mut out = Vec::new();
        encode_option_error(&mut out, 77, REP_ERR_INVALID, &"é".repeat(3000));
        let msg = split_reply(&out).3;
        assert!(msg.len() <= MAX_STRING_BYTES);
        assert!(std::str::from_utf8(msg).is_ok());
    }

    #[test]
    fn error_reply_numbers() {
        assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
        assert_eq!(REP_ERR_BLOCK_SIZE_REQD, 0x8000_0008);
        assert_eq!(REPLY_TYPE_ERROR, 0x8001);
    }

    #[test]
    fn export_name_reply() {
        let mut out = Vec::new();
        encode_export_name_reply(&mut out, 4096, 0x0003, false);
        assert_eq!(out.len(), 134);
        assert!(out[10..].iter().all(|&b| b == 0));
        let mut out = Vec::new();
        encode_export_name_reply(&mut out, 4096, 0x0003, true);
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 3]);
    }

    #[test]
    fn block_sizes() {
        assert!(check_block_sizes(512, 4096, 1 << 25).is_ok());
        assert!(check_block_sizes(1, 512, u32::MAX).is_ok());
        assert!(check_block_sizes(3, 4096, 1 << 20).is_err());
        assert!(check_block_sizes(1 << 17, 1 << 17, 1 << 20).is_err());
        assert!(check_block_sizes(4096, 2048, 1 << 20).is_err());
        assert!(check_block_sizes(512, 256, 1 << 20).is_err());
        assert!(check_block_sizes(4096, 4096, 4096 * 3 + 1).is_err());
        assert!(check_block_sizes(4096, 8192, 4096).is_err());
    }

    #[test]
    fn request_header_roundtrip() {
        let h = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let raw = encode_request_header(&h);
        assert_eq!(&raw[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(decode_request_header(&raw).unwrap(), h);
        let mut bad = raw;
        bad[3] = 0x14;
        assert_eq!(
            decode_request_header(&bad),
            Err(FrameError::BadMagic {
                expected: 0x25609513,
                found: 0x25609514
            })
        );
    }

    #[test]
    fn valid_requests() {
        let l = lim();
        assert_eq!(
            validate_request(&req(CMD_READ, 0, 512, 1024), &l),
            Ok(Command::Read {
                offset: 512,
                length: 1024
            })
        );
        assert_eq!(
            validate_request(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &l),
            Ok(Command::Read {
                offset: 0,
                length: 512
            })
        );
        assert_eq!(
            validate_request(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 64 << 10), &l),
            Ok(Command::Write {
                offset: 0,
                length: 64 << 10,
                fua: true
            })
        );
        // Up to the very end.
        assert!(validate_request(&req(CMD_WRITE, 0, (1 << 20) - 512, 512), &l).is_ok());
        assert_eq!(
            validate_request(&req(CMD_FLUSH, 0, 0, 0), &l),
            Ok(Command::Flush)
        );
        assert_eq!(
            validate_request(&req(CMD_FLUSH, 0, 7, 9), &l),
            Ok(Command::Flush)
        );
        assert_eq!(
            validate_request(&req(CMD_DISC, 0, 0, 0), &l),
            Ok(Command::Disc)
        );
        // Trim and write-zeroes are not bound by the maximum block size.
        assert_eq!(
            validate_request(&req(CMD_TRIM, 0, 0, 1 << 20), &l),
            Ok(Command::Trim {
                offset: 0,
                length: 1 << 20,
                fua: false
            })
        );
        assert_eq!(
            validate_request(
                &req(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
                    0,
                    1 << 20
                ),
                &l
            ),
            Ok(Command::WriteZeroes {
                offset: 0,
                length: 1 << 20,
                fua: true
            })
        );
        // Zero-length requests are allowed.
        assert!(validate_request(&req(CMD_READ, 0, 0, 0), &l).is_ok());
    }

    #[test]
    fn invalid_requests() {
        let l = lim();
        rej(NBD_EINVAL, 0)(validate_request(&req(99, 0, 0, 512), &l));
        rej(NBD_EINVAL, 0)(validate_request(&req(CMD_BLOCK_STATUS, 0, 0, 512), &l));
        rej(NBD_EINVAL, 0)(validate_request(&req(CMD_CACHE, 0, 0, 512), &l));
        // Unknown flag, and flags not valid for the command.
        rej(NBD_EINVAL, 512)(validate_request(&req(CMD_WRITE, 1 << 9, 0, 512), &l));
        rej(NBD_EINVAL, 512)(validate_request(
            &req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512),
            &l,
        ));
        rej(NBD_EINVAL, 0)(validate_request(
            &req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512),
            &l,
        ));
        rej(NBD_EINVAL, 0)(validate_request(
            &req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512),
            &l,
        ));
        let simple = RequestLimits {
            structured: false,
            ..l
        };
        rej(NBD_EINVAL, 0)(validate_request(
            &req(CMD_READ, CMD_FLAG_DF, 0, 512),
            &simple,
        ));
        // Misaligned offset and length.
        rej(NBD_EINVAL, 512)(validate_request(&req(CMD_WRITE, 0, 1, 512), &l));
        rej(NBD_EINVAL, 0)(validate_request(&req(CMD_READ, 0, 0, 100), &l));
        rej(NBD_EINVAL, 0)(validate_request(&req(CMD_TRIM, 0, 256, 512), &l));
        // Over the maximum.
        rej(NBD_EINVAL, (64 << 10) + 512)(validate_request(
            &req(CMD_WRITE, 0, 0, (64 << 10) + 512),
            &l,
        ));
        rej(NBD_EINVAL, 0)(validate_request(&req(CMD_READ, 0, 0, 128 << 10), &l));
        // Past the end: reads and trims EINVAL, writes ENOSPC.
        rej(NBD_EINVAL, 0)(validate_request(&req(CMD_READ, 0, 1 << 20, 512), &l));
        rej(NBD_EINVAL, 0)(validate_request(
            &req(CMD_TRIM, 0, (1 << 20) - 512, 1024),
            &l,
        ));
        rej(NBD_ENOSPC, 1024)(validate_request(
            &req(CMD_WRITE, 0, (1 << 20) - 512, 1024),
            &l,
        ));
        rej(NBD_ENOSPC, 0)(validate_request(
            &req(CMD_WRITE_ZEROES, 0, 1 << 21, 512),
            &l,
        ));
        // Offset + length overflowing u64.
        rej(NBD_EINVAL, 0)(validate_request(
            &req(CMD_READ, 0, u64::MAX - 511, 1024),
            &l,
        ));
        // Read-only export.
        let ro = RequestLimits {
            read_only: true,
            ..l
        };
        rej(NBD_EPERM, 512)(validate_request(&req(CMD_WRITE, 0, 0, 512), &ro));
        rej(NBD_EPERM, 0)(validate_request(&req(CMD_TRIM, 0, 0, 512), &ro));
        rej(NBD_EPERM, 0)(validate_request(&req(CMD_WRITE_ZEROES, 0, 0, 512), &ro));
        assert!(validate_request(&req(CMD_READ, 0, 0, 512), &ro).is_ok());
        // A huge write payload is a denial of service: hang up.
        assert!(matches!(
            validate_request(&req(CMD_WRITE, 0, 0, u32::MAX), &l),
            Err(Rejection::Disconnect { .. })
        ));
        // Just under the floor is read and discarded.
        rej(NBD_EINVAL, DOS_FLOOR_BYTES)(validate_request(
            &req(CMD_WRITE, 0, 0, DOS_FLOOR_BYTES),
            &l,
        ));
    }

    #[test]
    fn replies() {
        let s = encode_simple_reply(NBD_EIO, 0x0102_0304_0506_0708);
        assert_eq!(
            s,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        let h = encode_offset_data_header(9, 4096, 512, true);
        assert_eq!(be32(&h[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be16(&h[4..6]), REPLY_FLAG_DONE);
        assert_eq!(be16(&h[6..8]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be64(&h[8..16]), 9);
        assert_eq!(be32(&h[16..20]), 520);
        assert_eq!(be64(&h[20..28]), 4096);
        let n = encode_none_chunk(5);
        assert_eq!(
            (
                be16(&n[4..6]),
                be16(&n[6..8]),
                be64(&n[8..16]),
                be32(&n[16..20])
            ),
            (1, 0, 5, 0)
        );
        let e = encode_error_chunk(6, NBD_EINVAL, "bad");
        assert_eq!(e.len(), 20 + 6 + 3);
        assert_eq!(
            (be16(&e[4..6]), be16(&e[6..8]), be32(&e[16..20])),
            (1, 0x8001, 9)
        );
        assert_eq!(be32(&e[20..24]), NBD_EINVAL);
        assert_eq!(be16(&e[24..26]), 3);
        assert_eq!(&e[26..], b"bad");
    }

    #[test]
    fn flags_are_truthful() {
        let rw = transmission_flags(false, true, true);
        assert_eq!(
            rw,
            TF_HAS_FLAGS
                | TF_SEND_FLUSH
                | TF_SEND_FUA
                | TF_SEND_TRIM
                | TF_SEND_WRITE_ZEROES
                | TF_SEND_DF
                | TF_CAN_MULTI_CONN
        );
        let ro = transmission_flags(true, false, false);
        assert_eq!(
            ro,
            TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_READ_ONLY
        );
        assert_eq!(
            ro & (TF_SEND_DF | TF_CAN_MULTI_CONN | TF_SEND_FAST_ZERO | TF_SEND_CACHE),
            0
        );
    }
}
