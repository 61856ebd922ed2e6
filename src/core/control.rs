//! The control protocol between `takeoverctl` and `hapaird`, and the status it reports: pure.
//!
//! Transport: a Unix stream socket. One request per line (UTF-8 JSON object, `\n`-terminated,
//! at most [`MAX_LINE_BYTES`] including the newline), one reply per line; `watch` replies with a
//! stream of lines until the client closes. Every object carries `"v"`: [`PROTOCOL_VERSION`].
//!
//! ```text
//! > {"v":1,"cmd":"status"}
//! < {"v":1,"type":"status","status":{...PairStatus...}}
//! > {"v":1,"cmd":"takeover","of":"b","countdown_ms":30000,"immediate":false,"check_only":false}
//! < {"v":1,"type":"outcome","outcome":{"result":"completed",...},"status":{...}}
//! > {"v":1,"cmd":"giveback"}
//! > {"v":1,"cmd":"ack_alarms","ids":[3,5]}     (or "all":true)
//! < {"v":1,"type":"acknowledged","acknowledged":[3],"already":[5],"status":{...}}
//! > {"v":1,"cmd":"watch"}
//! < {"v":1,"type":"status","status":{...}}      (first the current status, then every change)
//! > {"v":1,"cmd":"statsu"}
//! < {"v":1,"type":"error","kind":"malformed","message":"unknown variant `statsu`, ..."}
//! ```
//! Unknown fields are refused (a typo must not silently change a takeover's meaning). Times in
//! the status are Unix milliseconds (`*_unix_ms`) or durations (`*_ms`); the raw state-machine
//! snapshot under `ha` counts milliseconds since the daemon started.

use crate::core::takeover::{
    AckMode, Alarm, NodeId, ProcedureKind, ProcedureReport, Refusal, RefusalReason, RequestKind,
    State, Status, StepError,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Version of the control protocol; a request with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request or reply line, newline included.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Longest countdown an operator may ask for.
pub const MAX_COUNTDOWN_MS: u64 = 3_600_000;
/// Longest an operator command may wait for its completion.
pub const MAX_WAIT_MS: u64 = 3_600_000;

/// A request, after the `"v"` check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The pair status.
    Status,
    /// Takeover: of this node (`of` absent or this node's name: ask the partner to take us
    /// over) or of the partner (`of` = the partner's name: take it over from here).
    Takeover {
        #[serde(default)]
        of: Option<String>,
        /// Graceful-shutdown countdown; absent: the configured one.
        #[serde(default)]
        countdown_ms: Option<u64>,
        /// No graceful shutdown: tell the partner *takeover* and fence it now.
        #[serde(default)]
        immediate: bool,
        /// Only run the checks and report what would refuse it.
        #[serde(default)]
        check_only: bool,
        /// Reply once the takeover completed (default) or once it started.
        #[serde(default = "yes")]
        wait: bool,
        /// How long to wait for completion before replying `timed_out`.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Give the partner's aggregates back.
    Giveback {
        #[serde(default = "yes")]
        wait: bool,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Stream the status on every change.
    Watch,
    /// Acknowledge alarms: these ids, or every unacknowledged one (`all`). An unknown id
    /// refuses the whole request (`unknown_alarm`).
    AckAlarms {
        #[serde(default)]
        ids: Vec<u64>,
        #[serde(default)]
        all: bool,
    },
}

/// Most alarm ids one acknowledgement may name.
pub const MAX_ACK_IDS: usize = 64;

fn yes() -> bool {
    true
}

/// What kind of error a reply reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not JSON, not an object, unknown command or field, wrong type.
    Malformed,
    /// Longer than [`MAX_LINE_BYTES`].
    TooLong,
    /// `"v"` missing or not [`PROTOCOL_VERSION`].
    UnsupportedVersion,
    /// A node name that is neither this node nor its partner.
    UnknownNode,
    /// An alarm id that is not in this node's alarm history.
    UnknownAlarm,
    /// A value out of range.
    InvalidArgument,
    /// The HA loop's queue is full or too many clients are connected; retry.
    Busy,
    /// The HA loop is not running (daemon stopping).
    Unavailable,
}

/// Protocol errors, on either side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ProtocolError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ProtocolError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ProtocolError {
        ProtocolError {
            kind,
            message: message.into(),
        }
    }
}

/// Parse one request line (without or with its trailing newline).
pub fn parse_request(line: &[u8]) -> Result<Request, ProtocolError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(ProtocolError::new(
            ErrorKind::TooLong,
            format!("request of {} bytes exceeds {MAX_LINE_BYTES}", line.len()),
        ));
    }
    let mut value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| ProtocolError::new(ErrorKind::Malformed, format!("not JSON: {e}")))?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| ProtocolError::new(ErrorKind::Malformed, "request must be a JSON object"))?;
    match obj.remove("v") {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(PROTOCOL_VERSION as u64) => {}
        Some(v) => {
            return Err(ProtocolError::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "protocol version {v} not supported; this daemon speaks {PROTOCOL_VERSION}"
                ),
            ))
        }
        None => {
            return Err(ProtocolError::new(
                ErrorKind::UnsupportedVersion,
                format!("missing \"v\" (protocol version {PROTOCOL_VERSION})"),
            ))
        }
    }
    let req: Request = serde_json::from_value(value)
        .map_err(|e| ProtocolError::new(ErrorKind::Malformed, e.to_string()))?;
    match &req {
        Request::Takeover {
            countdown_ms,
            timeout_ms,
            immediate,
            ..
        } => {
            if let Some(c) = countdown_ms {
                if *c == 0 || *c > MAX_COUNTDOWN_MS {
                    return Err(ProtocolError::new(
                        ErrorKind::InvalidArgument,
                        format!("countdown_ms must be in 1..={MAX_COUNTDOWN_MS}"),
                    ));
                }
                if *immediate {
                    return Err(ProtocolError::new(
                        ErrorKind::InvalidArgument,
                        "immediate and countdown_ms exclude each other",
                    ));
                }
            }
            check_wait(*timeout_ms)?;
        }
        Request::Giveback { timeout_ms, .. } => check_wait(*timeout_ms)?,
        Request::AckAlarms { ids, all } => {
            if ids.is_empty() != *all {
                return Err(ProtocolError::new(
                    ErrorKind::InvalidArgument,
                    "ack_alarms takes alarm ids or all, one of the two",
                ));
            }
            if ids.len() > MAX_ACK_IDS {
                return Err(ProtocolError::new(
                    ErrorKind::InvalidArgument,
                    format!("at most {MAX_ACK_IDS} alarm ids at once"),
                ));
            }
        }
        Request::Status | Request::Watch => {}
    }
    Ok(req)
}

fn check_wait(timeout_ms: Option<u64>) -> Result<(), ProtocolError> {
    match timeout_ms {
        Some(t) if t == 0 || t > MAX_WAIT_MS => Err(ProtocolError::new(
            ErrorKind::InvalidArgument,
            format!("timeout_ms must be in 1..={MAX_WAIT_MS}"),
        )),
        _ => Ok(()),
    }
}

/// Encode a request line (newline included).
pub fn encode_request(req: &Request) -> Vec<u8> {
    let mut v = serde_json::to_value(req).expect("request serializes");
    v.as_object_mut()
        .expect("object")
        .insert("v".into(), PROTOCOL_VERSION.into());
    let mut line = serde_json::to_vec(&v).expect("value serializes");
    line.push(b'\n');
    line
}

/// A reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Status {
        status: Box<PairStatus>,
    },
    Outcome {
        outcome: Outcome,
        status: Box<PairStatus>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
    /// Alarms acknowledged now, and those named that already were.
    Acknowledged {
        acknowledged: Vec<u64>,
        already: Vec<u64>,
        status: Box<PairStatus>,
    },
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    body: Reply,
}

/// Encode a reply line (newline included).
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Envelope {
        v: PROTOCOL_VERSION,
        body: reply.clone(),
    })
    .expect("reply serializes");
    line.push(b'\n');
    line
}

/// Parse a reply line.
pub fn parse_reply(line: &[u8]) -> Result<Reply, ProtocolError> {
    let env: Envelope = serde_json::from_slice(line)
        .map_err(|e| ProtocolError::new(ErrorKind::Malformed, format!("bad reply: {e}")))?;
    if env.v != PROTOCOL_VERSION {
        return Err(ProtocolError::new(
            ErrorKind::UnsupportedVersion,
            format!(
                "daemon speaks protocol {}, takeoverctl {PROTOCOL_VERSION}",
                env.v
            ),
        ));
    }
    Ok(env.body)
}

/// An operator command as the HA loop takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpRequest {
    /// Ask the partner to take this node over.
    TakeoverSelf,
    /// Take the partner over from here.
    TakeoverPartner {
        countdown_ms: Option<u64>,
        immediate: bool,
    },
    /// Give the partner's aggregates back.
    Giveback,
}

/// How an operator command ended, as far as the reply is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// `check_only`: nothing this node knows of would refuse it.
    CheckPassed { note: String },
    /// Refused (here or by the partner) with every reason.
    Refused {
        refusal: Refusal,
        refusal_at_unix_ms: u64,
        /// One line per reason, for people.
        text: Vec<String>,
    },
    /// Started; not waiting for completion.
    Accepted { state: State },
    /// Done.
    Completed {
        state: State,
        report: Option<ProcedureView>,
    },
    /// Started but ended somewhere else (fence failed, fenced out, partner gone).
    Failed { state: State, detail: String },
    /// Still running when the wait ended; follow it with `status` or `watch`.
    TimedOut {
        state: State,
        /// Where it stands: the step it is in (with failed attempts and the last error) or
        /// what it waits for.
        #[serde(default)]
        detail: String,
    },
}

/// Which aggregate has which home node (from the configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggregateHome {
    pub name: String,
    pub home: NodeId,
}

/// What the HA loop hands out: the state machine's status plus what is needed to present it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaSnapshot {
    pub node_name: String,
    pub partner_name: String,
    /// Unix ms of the state machine's time 0 (daemon start).
    pub origin_unix_ms: u64,
    pub status: Status,
    /// This node takes requests for its own aggregates / for the partner's.
    pub serves_own: bool,
    pub serves_partner: bool,
    pub aggregates: Vec<AggregateHome>,
    /// Interconnect silence after which the partner counts as unreachable.
    pub partner_timeout_ms: u64,
}

impl HaSnapshot {
    /// Unix ms of a state-machine time.
    pub fn unix_ms(&self, t_ms: u64) -> u64 {
        self.origin_unix_ms + t_ms
    }
    fn name_of(&self, id: NodeId) -> &str {
        if id == self.status.node {
            &self.node_name
        } else {
            &self.partner_name
        }
    }
}

/// One node in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub id: NodeId,
    pub local: bool,
    /// As known here: the partner's from its last heartbeat.
    pub state: Option<State>,
    pub state_since_unix_ms: Option<u64>,
    /// Partner only: last interconnect message / last mailbox heartbeat change, ms ago.
    pub interconnect_heard_ms_ago: Option<u64>,
    pub mailbox_beat_ms_ago: Option<u64>,
}

/// Whether this node's mirror of the partner's log is current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorView {
    pub partner_log_mirrored: bool,
    /// When it stopped being current (None: current, or never was since start).
    pub not_mirrored_since_unix_ms: Option<u64>,
    /// "mirrored" / "not mirrored since 2024-05-01 12:04:07+02:00" / "never mirrored since
    /// start".
    pub summary: String,
    /// How this node acknowledges writes right now.
    pub ack_mode: AckMode,
}

/// One aggregate and who serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggregateView {
    pub name: String,
    pub home: String,
    /// The node taking its requests; None: nobody.
    pub served_by: Option<String>,
    /// Filled by the node (e.g. "online", "degraded: member 2 failed"); empty if unknown.
    #[serde(default)]
    pub state: String,
}

/// One export (filled by the node's [`crate::daemon::control::StatusProvider`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportView {
    pub name: String,
    pub aggregate: String,
    pub address: String,
    pub served_by: Option<String>,
    #[serde(default)]
    pub connections: Option<u64>,
}

/// The NVRAM line (filled by the node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvramView {
    /// How the log is made persistent, e.g. "dax /dev/pmem0 (cache flush)" or
    /// "file /var/lib/hapair/nvram (fdatasync)".
    pub persistence: String,
    /// None: the node does not know (it is not printed as 0).
    #[serde(default)]
    pub used_bytes: Option<u64>,
    pub capacity_bytes: u64,
    #[serde(default)]
    pub detail: String,
}

/// One phase of a procedure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseView {
    pub step: String,
    pub elapsed_ms: u64,
    pub failures: u32,
}

/// The step a procedure is in (running), or was in when a halt cut it short (finished).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningStepView {
    pub step: String,
    /// Since its first attempt began (until the procedure ended, if it did).
    pub elapsed_ms: u64,
    /// Failed attempts so far.
    pub failures: u32,
    pub last_error: Option<String>,
}

/// A takeover, giveback, shutdown or resume with its per-phase timings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcedureView {
    pub kind: String,
    pub started_unix_ms: u64,
    pub finished_unix_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub fenced: bool,
    pub phases: Vec<PhaseView>,
    #[serde(default)]
    pub current: Option<RunningStepView>,
}

/// A refusal with readable reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalView {
    pub at_unix_ms: u64,
    pub request: RequestKind,
    pub reasons: Vec<RefusalReason>,
    pub text: Vec<String>,
}

/// An alarm with readable text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmView {
    /// Its id for `takeoverctl alarm ack` (None: not in the history).
    #[serde(default)]
    pub id: Option<u64>,
    /// Its condition holds now (acknowledged or not, it is in the headline).
    #[serde(default)]
    pub open: bool,
    /// When the operator acknowledged it.
    #[serde(default)]
    pub acknowledged_at_unix_ms: Option<u64>,
    /// When it was (last) raised.
    pub at_unix_ms: u64,
    pub alarm: Alarm,
    pub text: String,
    /// How often it was raised (repeats share one entry) and when first.
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub first_at_unix_ms: Option<u64>,
}

fn one() -> u32 {
    1
}

/// Everything `takeoverctl status` shows. The HA part comes from [`PairStatus::from_snapshot`];
/// the node fills `aggregates[].state`, `exports`, `nvram` and anything under `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairStatus {
    pub node: String,
    pub partner: String,
    pub now_unix_ms: u64,
    /// One-line verdict, e.g. "TAKEOVER: a serves b's aggregates; b waits for giveback".
    pub headline: String,
    pub nodes: Vec<NodeView>,
    pub mirror: MirrorView,
    pub aggregates: Vec<AggregateView>,
    #[serde(default)]
    pub exports: Vec<ExportView>,
    #[serde(default)]
    pub nvram: Option<NvramView>,
    pub countdown_remaining_ms: Option<u64>,
    pub running: Option<ProcedureView>,
    pub last_takeover: Option<ProcedureView>,
    pub last_giveback: Option<ProcedureView>,
    /// This node's last graceful shutdown for a takeover, with its phase timings.
    #[serde(default)]
    pub last_shutdown: Option<ProcedureView>,
    /// The partner was heard on the interconnect within its timeout.
    #[serde(default)]
    pub partner_reachable: bool,
    /// Newest last.
    pub refusals: Vec<RefusalView>,
    /// Newest last; a repeated alarm is one entry with a count.
    pub alarms: Vec<AlarmView>,
    /// Alarm conditions that still hold (the headline names them).
    #[serde(default)]
    pub open_alarms: Vec<AlarmView>,
    pub auto_giveback: bool,
    pub holddown_until_unix_ms: Option<u64>,
    pub mailbox_access: bool,
    /// The raw state-machine snapshot (times in ms since daemon start).
    pub ha: Status,
    /// Room for the node's own fields without a protocol change.
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A wall-clock time for people: `2024-05-01 12:04:07+02:00` (local date and time with the
/// zone's offset `utc_offset_s`), or `2024-05-01 10:04:07Z` when the offset is 0. A bare
/// `HH:MM:SS` leaves the day and the zone to guess, across midnight or between machines.
pub fn timestamp(unix_ms: u64, utc_offset_s: i64) -> String {
    let s = (unix_ms / 1000) as i64 + utc_offset_s;
    let (y, m, d) = civil_from_days(s.div_euclid(86_400));
    let t = s.rem_euclid(86_400);
    let zone = if utc_offset_s == 0 {
        "Z".to_string()
    } else {
        let a = utc_offset_s.abs();
        format!(
            "{}{:02}:{:02}",
            if utc_offset_s < 0 { '-' } else { '+' },
            a / 3600,
            a / 60 % 60
        )
    };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}{zone}",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// (year, month, day) of a count of days since 1970-01-01 (proleptic Gregorian calendar;
/// Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A step error for people.
pub fn step_error_text(e: &StepError) -> String {
    match e {
        StepError::ReservationConflict => "reservation conflict (this node was fenced)".into(),
        StepError::Failed(why) => why.clone(),
    }
}

/// A duration for people: "850 ms", "4.2 s", "3 min 5 s".
pub fn duration(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {} s", ms / 60_000, ms / 1000 % 60)
    }
}

/// Parse a duration as operators type it: `500ms`, `30s`, `2m`, `1h`, `1m30s`; a bare number is
/// seconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return secs
            .checked_mul(1000)
            .ok_or_else(|| format!("duration {t:?} too long"));
    }
    let mut total: u64 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("bad duration {t:?}: expected a number at {rest:?}"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("bad number in {t:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            u => {
                return Err(format!(
                    "bad duration {t:?}: unknown unit {u:?} (use ms, s, m, h)"
                ))
            }
        };
        rest = &rest[unit_len..];
        total = n
            .checked_mul(mult)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(|| format!("duration {t:?} too long"))?;
    }
    Ok(total)
}

/// One reason for people. `local_clock`: the reason's times are on this node's clock (false
/// for reasons the partner sent, whose times we cannot place).
pub fn describe_reason(
    r: &RefusalReason,
    snap: &HaSnapshot,
    utc_offset_s: i64,
    local_clock: bool,
) -> String {
    let at = |t: u64| timestamp(snap.unix_ms(t), utc_offset_s);
    let partner = &snap.partner_name;
    match r {
        RefusalReason::MirrorNotCurrent { since_ms } => match (since_ms, local_clock) {
            (Some(t), true) => format!("partner log not mirrored since {}", at(*t)),
            (None, true) => "partner log never mirrored since this node started".into(),
            (_, false) => "the partner's mirror of this node's log is not current".into(),
        },
        RefusalReason::PartnerDisksNotVisible { visible, expected } => {
            format!("sees {visible} of {expected} of the partner's disks")
        }
        RefusalReason::IncompatibleVersion { ours, theirs } => {
            format!("HA protocol versions differ (this node {ours}, partner {theirs})")
        }
        RefusalReason::PartnerVersionUnknown => {
            format!("{partner} never announced its version (not heard on the interconnect)")
        }
        RefusalReason::SelfUnhealthy { detail } => format!("node is unhealthy: {detail}"),
        RefusalReason::AlreadyTakenOver => format!("{partner} is already taken over"),
        RefusalReason::TakeoverInProgress => "a takeover is already in progress".into(),
        RefusalReason::GivebackInProgress => "a giveback is in progress".into(),
        RefusalReason::SelfNotServing { state } => format!("node is not serving (state {state:?})"),
        RefusalReason::HoldDown { until_ms } => {
            if local_clock {
                format!(
                    "hold-down after a giveback until {} (the node given back may take over the other way round)",
                    at(*until_ms)
                )
            } else {
                "the partner is in its hold-down after a giveback".into()
            }
        }
        RefusalReason::PartnerUnreachable { last_heard_ms } => match last_heard_ms {
            Some(t) => format!("{partner} unreachable on the interconnect since {}", at(*t)),
            None => format!("{partner} never heard on the interconnect"),
        },
        RefusalReason::NoAnswer => format!("{partner} did not answer the takeover request"),
        RefusalReason::NotInTakeover => format!("this node has not taken {partner} over"),
        RefusalReason::PartnerNotReady { partner_state } => match partner_state {
            Some(s) => format!("{partner} is not waiting for giveback (state {s:?})"),
            None => format!("{partner}'s state is unknown"),
        },
        RefusalReason::Conflict => {
            "conflicting request (both nodes asked at once, or not the partner)".into()
        }
    }
}

/// Readable lines for a refusal.
pub fn describe_refusal(r: &Refusal, snap: &HaSnapshot, utc_offset_s: i64) -> Vec<String> {
    r.reasons
        .iter()
        .map(|x| {
            // Reasons of a refused please-takeover come from the partner, except those this
            // node found itself before asking.
            let local = r.request != RequestKind::TakeoverOfSelf
                || matches!(
                    x,
                    RefusalReason::PartnerUnreachable { .. } | RefusalReason::NoAnswer
                );
            describe_reason(x, snap, utc_offset_s, local)
        })
        .collect()
}

/// "cannot take over", "cannot give back", ... for a refused request.
pub fn refusal_prefix(request: RequestKind) -> &'static str {
    match request {
        RequestKind::TakeoverOfSelf => "cannot be taken over",
        RequestKind::TakeoverOfPartner | RequestKind::PleaseTakeover => "cannot take over",
        RequestKind::PleaseShutdown => "refused to shut down",
        RequestKind::HardTakeover => "partner down, cannot take over",
        RequestKind::Giveback => "cannot give back",
    }
}

fn describe_alarm(a: &Alarm, snap: &HaSnapshot, off: i64) -> String {
    let partner = &snap.partner_name;
    match a {
        Alarm::InterconnectDown { since_ms } => format!(
            "interconnect to {partner} down since {} while its mailbox heartbeat lives: no takeover",
            timestamp(snap.unix_ms(*since_ms), off)
        ),
        Alarm::MailboxAccessLost => "mailbox unreadable on a majority of members".into(),
        Alarm::PartnerDownCannotTakeOver { reasons } => format!(
            "{partner} is down and cannot be taken over: {}",
            reasons
                .iter()
                .map(|r| describe_reason(r, snap, off, true))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        Alarm::StepFailed { step, error } => {
            format!("step {step:?} failed: {}", step_error_text(error))
        }
        Alarm::IllegalTransition { from, to } => format!("BUG: illegal transition {from:?} -> {to:?}"),
        Alarm::FencedOut => format!("fenced out by {partner}: halted"),
        Alarm::SelfFenced { reason } => format!("self-fenced: {reason}"),
    }
}

/// A procedure report for people (Unix times, step names).
pub fn procedure_view(p: &ProcedureReport, snap: &HaSnapshot) -> ProcedureView {
    let kind = match p.kind {
        ProcedureKind::Shutdown => "shutdown".to_string(),
        ProcedureKind::Takeover(k) => format!("takeover ({k:?})").to_lowercase(),
        ProcedureKind::Giveback => "giveback".into(),
        ProcedureKind::Resume { after_giveback } => {
            if after_giveback {
                "resume after giveback".into()
            } else {
                "resume at boot".into()
            }
        }
    };
    let mut phases: Vec<PhaseView> = p
        .phases
        .iter()
        .map(|ph| PhaseView {
            step: format!("{:?}", ph.step),
            elapsed_ms: ph.elapsed_ms(),
            failures: ph.failures,
        })
        .collect();
    let mut current = p.current.as_ref().map(|c| RunningStepView {
        step: format!("{:?}", c.step),
        elapsed_ms: p
            .finished_ms
            .unwrap_or(snap.status.now_ms)
            .saturating_sub(c.started_ms),
        failures: c.failures,
        last_error: c.last_error.as_ref().map(step_error_text),
    });
    // A giveback's last phase is the partner bringing its aggregate up: a phase once it
    // serves, the running step while it resumes, the interrupted one if it never served.
    if let Some(r) = &p.partner_resume {
        let elapsed_ms = p
            .finished_ms
            .unwrap_or(snap.status.now_ms)
            .saturating_sub(r.started_ms);
        match (&r.abandoned, p.finished_ms) {
            (None, Some(_)) => phases.push(PhaseView {
                step: PARTNER_RESUME_PHASE.into(),
                elapsed_ms,
                failures: 0,
            }),
            (why, _) => {
                current = Some(RunningStepView {
                    step: PARTNER_RESUME_PHASE.into(),
                    elapsed_ms,
                    failures: 0,
                    last_error: why.clone(),
                })
            }
        }
    }
    ProcedureView {
        kind,
        started_unix_ms: snap.unix_ms(p.started_ms),
        finished_unix_ms: p.finished_ms.map(|t| snap.unix_ms(t)),
        total_ms: p.finished_ms.map(|t| t.saturating_sub(p.started_ms)),
        fenced: p.fenced,
        phases,
        current,
    }
}

/// The name of a giveback's last phase: from the *giveback* message until the partner serves.
pub const PARTNER_RESUME_PHASE: &str = "PartnerResume";

fn serving_own(s: State) -> bool {
    matches!(
        s,
        State::Normal
            | State::TakeoverRequested
            | State::AwaitingShutdown
            | State::TakingOver
            | State::InTakeover
            | State::GivingBack
    )
}

impl PairStatus {
    /// The HA part of the status. `now_unix_ms` is the wall clock at the snapshot.
    pub fn from_snapshot(snap: &HaSnapshot, utc_offset_s: i64) -> PairStatus {
        let st = &snap.status;
        let off = utc_offset_s;
        let now_unix_ms = snap.unix_ms(st.now_ms);
        let local = NodeView {
            name: snap.node_name.clone(),
            id: st.node,
            local: true,
            state: Some(st.state),
            state_since_unix_ms: Some(snap.unix_ms(st.state_since_ms)),
            interconnect_heard_ms_ago: None,
            mailbox_beat_ms_ago: None,
        };
        let partner = NodeView {
            name: snap.partner_name.clone(),
            id: st.node.partner(),
            local: false,
            state: st.partner_state,
            state_since_unix_ms: None,
            interconnect_heard_ms_ago: st
                .partner_last_heard_ms
                .map(|t| st.now_ms.saturating_sub(t)),
            mailbox_beat_ms_ago: st
                .partner_mailbox_last_change_ms
                .map(|t| st.now_ms.saturating_sub(t)),
        };
        let summary = if st.mirror_current {
            "mirrored".to_string()
        } else if let Some(t) = st.mirror_not_current_since_ms {
            format!("not mirrored since {}", timestamp(snap.unix_ms(t), off))
        } else {
            "never mirrored since start".to_string()
        };
        let mirror = MirrorView {
            partner_log_mirrored: st.mirror_current,
            not_mirrored_since_unix_ms: st.mirror_not_current_since_ms.map(|t| snap.unix_ms(t)),
            summary,
            ack_mode: st.ack_mode,
        };
        let partner_alive = st
            .partner_last_heard_ms
            .is_some_and(|t| st.now_ms.saturating_sub(t) < snap.partner_timeout_ms);
        let partner_serves_own = partner_alive && st.partner_state.is_some_and(serving_own);
        let partner_serves_ours = partner_alive && st.partner_state == Some(State::InTakeover);
        let aggregates = snap
            .aggregates
            .iter()
            .map(|a| {
                let ours = a.home == st.node;
                let served_by = if ours {
                    if snap.serves_own {
                        Some(snap.node_name.clone())
                    } else if partner_serves_ours {
                        Some(snap.partner_name.clone())
                    } else {
                        None
                    }
                } else if snap.serves_partner {
                    Some(snap.node_name.clone())
                } else if partner_serves_own {
                    Some(snap.partner_name.clone())
                } else {
                    None
                };
                AggregateView {
                    name: a.name.clone(),
                    home: snap.name_of(a.home).to_string(),
                    served_by,
                    state: String::new(),
                }
            })
            .collect();
        let refusals = st
            .refusals
            .iter()
            .map(|r| RefusalView {
                at_unix_ms: snap.unix_ms(r.at_ms),
                request: r.request,
                reasons: r.reasons.clone(),
                text: describe_refusal(r, snap, off),
            })
            .collect();
        let alarms = st
            .alarms
            .iter()
            .map(|e| AlarmView {
                id: Some(e.id),
                open: st.open_alarms.contains(&e.alarm),
                acknowledged_at_unix_ms: e.acked_ms.map(|t| snap.unix_ms(t)),
                at_unix_ms: snap.unix_ms(e.last_ms),
                alarm: e.alarm.clone(),
                text: describe_alarm(&e.alarm, snap, off),
                count: e.count,
                first_at_unix_ms: Some(snap.unix_ms(e.first_ms)),
            })
            .collect();
        let open_alarms = st
            .open_alarms
            .iter()
            .map(|a| {
                // When it was raised, if the history still has it.
                let e = st.alarms.iter().rev().find(|e| e.alarm == *a);
                AlarmView {
                    id: e.map(|e| e.id),
                    open: true,
                    acknowledged_at_unix_ms: e.and_then(|e| e.acked_ms).map(|t| snap.unix_ms(t)),
                    at_unix_ms: snap.unix_ms(e.map_or(st.now_ms, |e| e.last_ms)),
                    alarm: a.clone(),
                    text: describe_alarm(a, snap, off),
                    count: e.map_or(1, |e| e.count),
                    first_at_unix_ms: e.map(|e| snap.unix_ms(e.first_ms)),
                }
            })
            .collect();
        let mut s = PairStatus {
            node: snap.node_name.clone(),
            partner: snap.partner_name.clone(),
            now_unix_ms,
            headline: String::new(),
            nodes: vec![local, partner],
            mirror,
            aggregates,
            exports: Vec::new(),
            nvram: None,
            countdown_remaining_ms: st.countdown_remaining_ms,
            running: st.running.as_ref().map(|p| procedure_view(p, snap)),
            last_takeover: st.last_takeover.as_ref().map(|p| procedure_view(p, snap)),
            last_giveback: st.last_giveback.as_ref().map(|p| procedure_view(p, snap)),
            last_shutdown: st.last_shutdown.as_ref().map(|p| procedure_view(p, snap)),
            partner_reachable: partner_alive,
            refusals,
            alarms,
            open_alarms,
            auto_giveback: st.auto_giveback,
            holddown_until_unix_ms: st.holddown_until_ms.map(|t| snap.unix_ms(t)),
            mailbox_access: st.mailbox_access,
            ha: st.clone(),
            extra: BTreeMap::new(),
        };
        s.headline = headline(&s);
        s
    }
}

/// The one-line verdict: the truth at a glance. "OK" only when the partner is reachable on
/// the interconnect, no alarm condition holds (acknowledged or not), both serve and the
/// partner's log is mirrored; an unreachable partner and every open alarm are named after the
/// state (an acknowledged one marked so), then the count of cleared alarms the operator has
/// not acknowledged.
pub fn headline(s: &PairStatus) -> String {
    let me = &s.node;
    let p = &s.partner;
    let unserved: Vec<&str> = s
        .aggregates
        .iter()
        .filter(|a| a.served_by.is_none())
        .map(|a| a.name.as_str())
        .collect();
    let mut alarms: Vec<String> = Vec::new();
    let open_has = |f: &dyn Fn(&Alarm) -> bool| s.open_alarms.iter().any(|a| f(&a.alarm));
    if !s.partner_reachable && !open_has(&|a| matches!(a, Alarm::InterconnectDown { .. })) {
        let heard = s
            .nodes
            .iter()
            .find(|n| !n.local)
            .and_then(|n| n.interconnect_heard_ms_ago);
        alarms.push(match heard {
            Some(ago) => format!("{p} not heard on the interconnect for {}", duration(ago)),
            None => format!("{p} never heard on the interconnect"),
        });
    }
    if !s.mailbox_access && !open_has(&|a| *a == Alarm::MailboxAccessLost) {
        alarms.push("mailbox unreadable".into());
    }
    // Acknowledged or not, a condition that holds is named: an acknowledgement says the
    // operator saw it, not that it went away.
    for a in &s.open_alarms {
        let mut t = a.text.clone();
        if a.count > 1 {
            t += &format!(" ({} times)", a.count);
        }
        if a.acknowledged_at_unix_ms.is_some() {
            t += " (acknowledged)";
        }
        alarms.push(t);
    }
    let unacked_past = s
        .alarms
        .iter()
        .filter(|a| !a.open && a.acknowledged_at_unix_ms.is_none())
        .count();
    let base = match (s.ha.state, s.ha.partner_state) {
        (State::InTakeover, _) => {
            format!("TAKEOVER: {me} serves {p}'s aggregates; {p} waits for giveback")
        }
        (State::TakenOver, _) => {
            format!("TAKEN OVER: {me} serves nothing and waits for giveback from {p}")
        }
        (State::AwaitingShutdown, _) => {
            format!("TAKEOVER IN PROGRESS: {p} is shutting down (countdown)")
        }
        (State::TakingOver, _) => format!("TAKEOVER IN PROGRESS: {me} is taking {p} over"),
        (State::ShuttingDown, _) => format!("SHUTTING DOWN: {me} hands its aggregates to {p}"),
        (State::TakeoverRequested, _) => format!("TAKEOVER REQUESTED: waiting for {p} to answer"),
        (State::GivingBack, _) => format!("GIVEBACK IN PROGRESS: {me} returns {p}'s aggregates"),
        (State::Booting, _) => format!("BOOTING: {me} reads the mailbox"),
        (State::Resuming, _) => format!("RESUMING: {me} brings its aggregates up"),
        (State::Normal, Some(State::Normal))
            if s.mirror.partner_log_mirrored && alarms.is_empty() =>
        {
            "OK: both nodes serve their own aggregates; partner log mirrored".to_string()
        }
        (State::Normal, _) if !s.partner_reachable => format!(
            "DEGRADED: {me} serves its own aggregates; {p} unreachable; partner log {}",
            s.mirror.summary
        ),
        (State::Normal, Some(State::InTakeover)) => format!("TAKEN OVER BY {p}"),
        (State::Normal, Some(ps)) => {
            format!("DEGRADED: {p} is {ps:?}; partner log {}", s.mirror.summary)
        }
        (State::Normal, None) => {
            format!("DEGRADED: {p} not heard; partner log {}", s.mirror.summary)
        }
    };
    let mut line = base;
    if !unserved.is_empty() {
        line = format!("{line} -- NOT SERVED: {}", unserved.join(", "));
    }
    if !alarms.is_empty() {
        line = format!("{line} -- ALARM: {}", alarms.join("; "));
    }
    if unacked_past > 0 {
        line = format!(
            "{line} -- {unacked_past} past alarm{} not acknowledged (takeoverctl alarm ack)",
            if unacked_past == 1 { "" } else { "s" }
        );
    }
    line
}

/// A size for people: whole MiB or GiB when it is one, else bytes.
fn bytes(n: u64) -> String {
    const MIB: u64 = 1 << 20;
    if n >= 1 << 30 && n % (1 << 30) == 0 {
        format!("{} GiB", n >> 30)
    } else if n >= MIB && n % MIB == 0 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

/// The table `takeoverctl status` prints.
pub fn render_status(s: &PairStatus, utc_offset_s: i64) -> String {
    let off = utc_offset_s;
    let c = |t: u64| timestamp(t, off);
    let mut o = String::new();
    let _ = writeln!(o, "{}", s.headline);
    let _ = writeln!(o, "(status of {} at {})", s.node, c(s.now_unix_ms));
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<10} {:<8} {:<18} {:<25} {:<22} MAILBOX HEARTBEAT",
        "NODE", "ROLE", "STATE", "SINCE", "INTERCONNECT"
    );
    for n in &s.nodes {
        let state = n.state.map_or("unknown".to_string(), |x| format!("{x:?}"));
        let since = n.state_since_unix_ms.map_or("-".to_string(), c);
        let (ic, mb) = if n.local {
            (
                "-".to_string(),
                if s.mailbox_access {
                    "writing"
                } else {
                    "NO ACCESS"
                }
                .to_string(),
            )
        } else {
            (
                n.interconnect_heard_ms_ago
                    .map_or("never heard".into(), |a| {
                        format!("heard {} ago", duration(a))
                    }),
                n.mailbox_beat_ms_ago.map_or("never seen".into(), |a| {
                    format!("moved {} ago", duration(a))
                }),
            )
        };
        let role = if n.local { "local" } else { "partner" };
        let _ = writeln!(
            o,
            "{:<10} {:<8} {:<18} {:<25} {:<22} {}",
            n.name, role, state, since, ic, mb
        );
    }
    let _ = writeln!(o);
    let serves_nothing = s
        .nodes
        .iter()
        .any(|n| n.local && matches!(n.state, Some(State::TakenOver | State::Booting)));
    let _ = writeln!(
        o,
        "partner log mirror: {}    writes acknowledged: {}",
        s.mirror.summary,
        match s.mirror.ack_mode {
            _ if serves_nothing => "none (this node serves nothing)",
            AckMode::Mirrored => "in both NVRAMs",
            AckMode::LocalOnly => "in local NVRAM only (partner fenced)",
        }
    );
    match &s.nvram {
        Some(n) => {
            let used = match n.used_bytes {
                Some(u) => format!(
                    "{}% of {} used",
                    (u.saturating_mul(100))
                        .checked_div(n.capacity_bytes)
                        .unwrap_or(0),
                    bytes(n.capacity_bytes)
                ),
                None => format!("{} (use not reported)", bytes(n.capacity_bytes)),
            };
            let _ = writeln!(o, "NVRAM: {} -- {used}", n.persistence);
            if !n.detail.is_empty() {
                let _ = writeln!(o, "    {}", n.detail);
            }
        }
        None => {
            let _ = writeln!(o, "NVRAM: (not reported)");
        }
    }
    if let Some(r) = s.countdown_remaining_ms {
        let _ = writeln!(o, "countdown: {} left", duration(r));
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<16} {:<10} {:<10} STATE",
        "AGGREGATE", "HOME", "SERVED BY"
    );
    for a in &s.aggregates {
        let by = a.served_by.as_deref().unwrap_or("NOBODY");
        let note = if a.served_by.as_deref().is_some_and(|b| b != a.home) {
            " (taken over)"
        } else {
            ""
        };
        // The partner's aggregates' state is the partner's to report.
        let state = if a.state.is_empty() { "-" } else { &a.state };
        let _ = writeln!(
            o,
            "{:<16} {:<10} {:<10} {}{}",
            a.name, a.home, by, state, note
        );
    }
    if !s.exports.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<16} {:<16} {:<24} SERVED BY",
            "EXPORT", "AGGREGATE", "ADDRESS"
        );
        for e in &s.exports {
            let _ = writeln!(
                o,
                "{:<16} {:<16} {:<24} {}",
                e.name,
                e.aggregate,
                e.address,
                e.served_by.as_deref().unwrap_or("NOBODY")
            );
        }
    }
    let _ = writeln!(o);
    let proc_line = |label: &str, p: &Option<ProcedureView>, o: &mut String| match p {
        None => {
            let _ = writeln!(o, "{label}: none");
        }
        Some(p) => {
            let total = p.total_ms.map_or("running".to_string(), duration);
            let _ = writeln!(
                o,
                "{label}: {} at {}, {}{}",
                p.kind,
                c(p.started_unix_ms),
                total,
                if p.fenced {
                    ", partner fenced first"
                } else {
                    ""
                }
            );
            for ph in &p.phases {
                let f = if ph.failures > 0 {
                    format!(" ({} failed attempts)", ph.failures)
                } else {
                    String::new()
                };
                let _ = writeln!(o, "    {:<22} {}{}", ph.step, duration(ph.elapsed_ms), f);
            }
            if let Some(r) = &p.current {
                let what = if p.finished_unix_ms.is_some() {
                    "interrupted after"
                } else {
                    "running for"
                };
                let mut l = format!("    {:<22} {what} {}", r.step, duration(r.elapsed_ms));
                if r.failures > 0 {
                    l += &format!(", {} failed attempts", r.failures);
                }
                if let Some(e) = &r.last_error {
                    l += &format!(", last error: {e}");
                }
                let _ = writeln!(o, "{l}");
            }
        }
    };
    if s.running.is_some() {
        proc_line("running", &s.running, &mut o);
    }
    proc_line("last takeover", &s.last_takeover, &mut o);
    proc_line("last giveback", &s.last_giveback, &mut o);
    if s.last_shutdown.is_some() {
        proc_line("last shutdown", &s.last_shutdown, &mut o);
    }
    if let Some(h) = s.holddown_until_unix_ms.filter(|h| *h > s.now_unix_ms) {
        let _ = writeln!(
            o,
            "hold-down until {} (operator takeovers as the last one refused; the other way round allowed)",
            c(h)
        );
    }
    let _ = writeln!(o);
    if s.refusals.is_empty() {
        let _ = writeln!(o, "refusals: none");
    } else {
        let _ = writeln!(o, "refusals (newest last):");
        for r in &s.refusals {
            let _ = writeln!(
                o,
                "  {} {}: {}",
                c(r.at_unix_ms),
                refusal_prefix(r.request),
                r.text.join("; ")
            );
        }
    }
    if s.alarms.is_empty() {
        let _ = writeln!(o, "alarms: none");
    } else {
        let _ = writeln!(
            o,
            "alarms (newest last; `takeoverctl alarm ack ID` once seen):"
        );
        for a in &s.alarms {
            let id = a.id.map_or("-".to_string(), |i| format!("#{i}"));
            let times = match (a.count, a.first_at_unix_ms) {
                (n, Some(first)) if n > 1 => format!(" ({n} times since {})", c(first)),
                _ => String::new(),
            };
            let state = match (a.open, a.acknowledged_at_unix_ms) {
                (true, None) => "HOLDS, not acknowledged".to_string(),
                (true, Some(t)) => format!("HOLDS, acknowledged {}", c(t)),
                (false, None) => "cleared, not acknowledged".to_string(),
                (false, Some(t)) => format!("cleared, acknowledged {}", c(t)),
            };
            let _ = writeln!(
                o,
                "  {id:>4} {} {}{times} [{state}]",
                c(a.at_unix_ms),
                a.text
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::takeover::{Config, Event, Node, OperatorCmd};

    fn snap(node: &Node) -> HaSnapshot {
        HaSnapshot {
            node_name: "alpha".into(),
            partner_name: "beta".into(),
            origin_unix_ms: 12 * 3_600_000,
            status: node.status(),
            serves_own: node.accepts_own(),
            serves_partner: node.accepts_partner(),
            aggregates: vec![
                AggregateHome {
                    name: "aggr0".into(),
                    home: NodeId::A,
                },
                AggregateHome {
                    name: "aggr1".into(),
                    home: NodeId::B,
                },
            ],
            partner_timeout_ms: 5_000,
        }
    }

    #[test]
    fn requests_parse_with_defaults_and_round_trip() {
        let r = parse_request(br#"{"v":1,"cmd":"takeover","of":"beta"}"#).unwrap();
        assert_eq!(
            r,
            Request::Takeover {
                of: Some("beta".into()),
                countdown_ms: None,
                immediate: false,
                check_only: false,
                wait: true,
                timeout_ms: None
            }
        );
        assert_eq!(parse_request(&encode_request(&r)).unwrap(), r);
        assert_eq!(
            parse_request(b"{\"v\":1,\"cmd\":\"status\"}\n").unwrap(),
            Request::Status
        );
    }

    #[test]
    fn malformed_requests_get_clear_errors() {
        let kind = |b: &[u8]| parse_request(b).unwrap_err().kind;
        assert_eq!(kind(b"status"), ErrorKind::Malformed);
        assert_eq!(kind(b"[1]"), ErrorKind::Malformed);
        assert_eq!(kind(br#"{"cmd":"status"}"#), ErrorKind::UnsupportedVersion);
        assert_eq!(
            kind(br#"{"v":2,"cmd":"status"}"#),
            ErrorKind::UnsupportedVersion
        );
        assert_eq!(kind(br#"{"v":1,"cmd":"statsu"}"#), ErrorKind::Malformed);
        assert_eq!(
            kind(br#"{"v":1,"cmd":"takeover","of":"b","countdwn_ms":5}"#),
            ErrorKind::Malformed
        );
        assert_eq!(
            kind(br#"{"v":1,"cmd":"takeover","countdown_ms":"5"}"#),
            ErrorKind::Malformed
        );
        assert_eq!(
            kind(br#"{"v":1,"cmd":"takeover","countdown_ms":0}"#),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            kind(br#"{"v":1,"cmd":"takeover","countdown_ms":5,"immediate":true}"#),
            ErrorKind::InvalidArgument
        );
        let long = vec![b' '; MAX_LINE_BYTES + 1];
        assert_eq!(kind(&long), ErrorKind::TooLong);
        let e = parse_request(br#"{"v":1,"cmd":"statsu"}"#).unwrap_err();
        assert!(e.message.contains("statsu"), "{}", e.message);
    }

    #[test]
    fn replies_round_trip_and_version_is_checked() {
        let r = Reply::Error {
            kind: ErrorKind::Busy,
            message: "x".into(),
        };
        let line = encode_reply(&r);
        assert!(line.ends_with(b"\n"));
        assert_eq!(parse_reply(&line).unwrap(), r);
        let bad = br#"{"v":9,"type":"error","kind":"busy","message":"x"}"#;
        assert_eq!(
            parse_reply(bad).unwrap_err().kind,
            ErrorKind::UnsupportedVersion
        );
    }

    #[test]
    fn status_tells_mirror_refusals_and_takeover_at_a_glance() {
        let mut n = resumed_node();
        n.step(
            1,
            Event::PartnerDisks {
                visible: 4,
                expected: 4,
            },
        );
        assert_eq!(n.state(), State::Normal);
        // 12:04:07 local (offset 0): the partner reports its mirror not in sync.
        let t = 4 * 60_000 + 7_000;
        n.step(
            t,
            Event::Message(crate::core::takeover::Message::Heartbeat {
                state: State::Normal,
                protocol_version: 1,
                mirror_in_sync: false,
            }),
        );
        n.step(
            t + 1_000,
            Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)),
        );
        let s = PairStatus::from_snapshot(&snap(&n), 0);
        assert_eq!(s.mirror.summary, "not mirrored since 1970-01-01 12:04:07Z");
        let r = s.refusals.last().unwrap();
        assert!(
            r.text
                .contains(&"partner log not mirrored since 1970-01-01 12:04:07Z".to_string()),
            "{:?}",
            r.text
        );
        let table = render_status(&s, 0);
        assert!(table.contains("cannot take over: "), "{table}");
        assert!(
            table.contains("partner log mirror: not mirrored since 1970-01-01 12:04:07Z"),
            "{table}"
        );
        assert!(table.starts_with("DEGRADED: beta is Normal"), "{table}");
        // aggr1 is beta's and beta is alive and Normal: served by beta.
        assert_eq!(s.aggregates[1].served_by.as_deref(), Some("beta"));
        let json = serde_json::to_string(&s).unwrap();
        let back: PairStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn durations_parse_as_operators_type_them() {
        assert_eq!(parse_duration_ms("30"), Ok(30_000));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert_eq!(parse_duration_ms("1m30s"), Ok(90_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        assert!(parse_duration_ms("").is_err());
        assert!(parse_duration_ms("5x")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration_ms("s").is_err());
        assert!(parse_duration_ms("99999999999999999999h").is_err());
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes(32 << 20), "32 MiB");
        assert_eq!(bytes(2 << 30), "2 GiB");
        assert_eq!(bytes(1536 << 20), "1536 MiB");
        assert_eq!(bytes(4096), "4096 bytes");
        assert_eq!(bytes((1 << 20) + 1), "1048577 bytes");
    }

    #[test]
    fn timestamps_carry_the_date_and_the_zone() {
        assert_eq!(
            timestamp(12 * 3_600_000 + 4 * 60_000 + 7_000, 0),
            "1970-01-01 12:04:07Z"
        );
        assert_eq!(timestamp(0, 3600), "1970-01-01 01:00:00+01:00");
        assert_eq!(timestamp(0, -3600), "1969-12-31 23:00:00-01:00");
        assert_eq!(timestamp(0, 5 * 3600 + 1800), "1970-01-01 05:30:00+05:30");
        // 2024-02-29 23:59:59 UTC (a leap day), and the next second.
        assert_eq!(timestamp(1_709_251_199_000, 0), "2024-02-29 23:59:59Z");
        assert_eq!(timestamp(1_709_251_200_999, 0), "2024-03-01 00:00:00Z");
        assert_eq!(timestamp(951_782_400_000, 0), "2000-02-29 00:00:00Z");
    }

    /// A mailbox round that read a majority: no partner slot, no please-die.
    fn readable_mailbox() -> crate::core::takeover::MailboxView {
        crate::core::takeover::MailboxView {
            partner_slot: None,
            please_die_for_me: false,
            please_die_for_partner: false,
        }
    }

    /// Node a after its boot: resumed, serving its own aggregate (at t = 1 ms).
    fn resumed_node() -> Node {
        let mut n = Node::new(Config::new(NodeId::A), 0).unwrap();
        n.step(0, Event::MailboxRead(Some(readable_mailbox())));
        n.step(1, Event::StepDone(crate::core::takeover::Step::RegisterOwn));
        n.step(1, Event::MailboxChecked { please_die: false });
        for st in [
            crate::core::takeover::Step::OpenOwnAggregate,
            crate::core::takeover::Step::ReplayOwnLog,
            crate::core::takeover::Step::TakeOwnIps,
            crate::core::takeover::Step::ServeOwnExports,
        ] {
            n.step(1, Event::StepDone(st));
        }
        n
    }

    /// A pair where both nodes serve and a's mirror of b's log is current, as seen from a at
    /// `t`, with b last heard at `heard`.
    fn normal_pair(heard: u64, t: u64) -> Node {
        let mut n = resumed_node();
        n.step(
            heard,
            Event::Message(crate::core::takeover::Message::Heartbeat {
                state: State::Normal,
                protocol_version: 1,
                mirror_in_sync: true,
            }),
        );
        n.step(t, Event::Tick);
        n
    }

    #[test]
    fn the_headline_is_ok_only_with_the_partner_reachable_and_no_open_alarm() {
        let s = PairStatus::from_snapshot(&snap(&normal_pair(1_000, 2_000)), 0);
        assert!(s.partner_reachable);
        assert!(s.headline.starts_with("OK: "), "{}", s.headline);

        // b silent on the interconnect past the timeout: not OK, and the headline says so,
        // whatever b's last heartbeat said (before the state machine's next tick, too).
        let n = normal_pair(1_000, 2_000);
        let mut sn = snap(&n);
        sn.status.now_ms = 7_000; // the HA loop shows the present
        let s = PairStatus::from_snapshot(&sn, 0);
        assert!(!s.partner_reachable);
        assert!(
            s.headline
                .starts_with("DEGRADED: alpha serves its own aggregates; beta unreachable"),
            "{}",
            s.headline
        );
        assert!(
            s.headline
                .contains("ALARM: beta not heard on the interconnect for 6.0 s"),
            "{}",
            s.headline
        );
        // The tick raised the interconnect alarm (its mailbox lives): its text instead.
        let s = PairStatus::from_snapshot(&snap(&normal_pair(1_000, 7_000)), 0);
        assert!(
            s.headline.contains(
                "ALARM: interconnect to beta down since 1970-01-01 12:00:01Z while its mailbox"
            ),
            "{}",
            s.headline
        );

        // Reachable, but an alarm condition holds (the mailbox cannot be read): not OK.
        let mut n = normal_pair(1_000, 2_000);
        n.step(2_000, Event::MailboxRead(None));
        let s = PairStatus::from_snapshot(&snap(&n), 0);
        assert_eq!(s.open_alarms.len(), 1, "{:?}", s.open_alarms);
        assert!(!s.headline.starts_with("OK"), "{}", s.headline);
        assert!(
            s.headline
                .ends_with("ALARM: mailbox unreadable on a majority of members"),
            "{}",
            s.headline
        );
        // Readable again: the condition is closed, the history keeps it, OK again.
        n.step(2_100, Event::MailboxRead(Some(readable_mailbox())));
        let s = PairStatus::from_snapshot(&snap(&n), 0);
        assert!(s.headline.starts_with("OK: "), "{}", s.headline);
        assert_eq!(s.alarms.len(), 1);
    }

    /// Acknowledging says "seen", never "gone": an acknowledged alarm that holds stays in the
    /// headline, marked; a cleared one not acknowledged is counted until it is.
    #[test]
    fn the_headline_keeps_acknowledged_alarms_that_hold_and_counts_unacknowledged_past_ones() {
        let mut n = normal_pair(1_000, 2_000);
        n.step(2_000, Event::MailboxRead(None));
        let id = n.status().alarms[0].id;
        n.step(2_050, Event::Operator(OperatorCmd::AckAlarm(Some(id))));
        let s = PairStatus::from_snapshot(&snap(&n), 0);
        assert!(!s.headline.starts_with("OK"), "{}", s.headline);
        assert!(
            s.headline
                .ends_with("ALARM: mailbox unreadable on a majority of members (acknowledged)"),
            "{}",
            s.headline
        );
        let v = &s.open_alarms[0];
        assert_eq!(v.id, Some(id));
        assert!(v.open && v.acknowledged_at_unix_ms == Some(12 * 3_600_000 + 2_050));
        let table = render_status(&s, 0);
        assert!(
            table.contains(&format!(
                "#{id} 1970-01-01 12:00:02Z mailbox unreadable on a majority of members [HOLDS, acknowledged 1970-01-01 12:00:02Z]"
            )),
            "{table}"
        );
        // Cleared: OK, nothing left to acknowledge.
        n.step(2_100, Event::MailboxRead(Some(readable_mailbox())));
        let s = PairStatus::from_snapshot(&snap(&n), 0);
        assert_eq!(
            s.headline,
            "OK: both nodes serve their own aggregates; partner log mirrored"
        );
        assert!(render_status(&s, 0).contains("[cleared, acknowledged"));
        // Lost and back again without an acknowledgement: OK, but the headline counts it.
        n.step(3_000, Event::MailboxRead(None));
        n.step(3_100, Event::MailboxRead(Some(readable_mailbox())));
        let s = PairStatus::from_snapshot(&snap(&n), 0);
        assert_eq!(
            s.headline,
            "OK: both nodes serve their own aggregates; partner log mirrored -- 1 past alarm not acknowledged (takeoverctl alarm ack)"
        );
        let new_id = s.alarms.last().unwrap().id.unwrap();
        assert!(new_id > id);
        n.step(3_200, Event::Operator(OperatorCmd::AckAlarm(None)));
        let s = PairStatus::from_snapshot(&snap(&n), 0);
        assert_eq!(
            s.headline,
            "OK: both nodes serve their own aggregates; partner log mirrored"
        );
    }

    #[test]
    fn ack_requests_take_ids_or_all() {
        let req = |l: &str| parse_request(l.as_bytes());
        assert_eq!(
            req(r#"{"v":1,"cmd":"ack_alarms","ids":[3,5]}"#),
            Ok(Request::AckAlarms {
                ids: vec![3, 5],
                all: false
            })
        );
        assert_eq!(
            req(r#"{"v":1,"cmd":"ack_alarms","all":true}"#),
            Ok(Request::AckAlarms {
                ids: vec![],
                all: true
            })
        );
        for bad in [
            r#"{"v":1,"cmd":"ack_alarms"}"#,
            r#"{"v":1,"cmd":"ack_alarms","ids":[3],"all":true}"#,
        ] {
            assert_eq!(
                req(bad).unwrap_err().kind,
                ErrorKind::InvalidArgument,
                "{bad}"
            );
        }
        let many = format!(
            r#"{{"v":1,"cmd":"ack_alarms","ids":[{}]}}"#,
            vec!["1"; MAX_ACK_IDS + 1].join(",")
        );
        assert_eq!(req(&many).unwrap_err().kind, ErrorKind::InvalidArgument);
        let r = Reply::Acknowledged {
            acknowledged: vec![3],
            already: vec![],
            status: Box::new(PairStatus::from_snapshot(&snap(&resumed_node()), 0)),
        };
        assert_eq!(parse_reply(&encode_reply(&r)), Ok(r));
    }

    #[test]
    fn clock_and_duration_formatting() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(4_200), "4.2 s");
        assert_eq!(duration(185_000), "3 min 5 s");
    }
}
