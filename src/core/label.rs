//! The on-disk label at the start of every aggregate member.
//!
//! Member layout (bytes):
//! ```text
//! 0        .. 4096      label (this module)
//! 4096     .. 65536     reserved
//! 65536    .. 1 MiB     mailbox slots (fencing; see the mailbox module when it lands)
//! 1 MiB    .. end       data area (data_offset_bytes), data_bytes of it used
//! ```
//!
//! Label block (4096 bytes, little-endian, written with O_DIRECT):
//!
//! | offset | size | field | meaning |
//! |---|---|---|---|
//! | 0 | 8 | magic | `HAPAIRL1` |
//! | 8 | 4 | format_version | [`FORMAT_VERSION`]; other versions are refused |
//! | 12 | 4 | label_bytes | 4096 |
//! | 16 | 16 | aggregate_uuid | identity of the aggregate; equal on every member |
//! | 32 | 64 | aggregate_name | UTF-8, NUL padded |
//! | 96 | 4 | member_index | 0..N-1 data, N parity |
//! | 100 | 4 | role | 0 data, 1 parity |
//! | 104 | 4 | member_count | N + 1 |
//! | 108 | 4 | chunk_bytes | power of two >= 4096 |
//! | 112 | 8 | data_offset_bytes | start of the data area on this member |
//! | 120 | 8 | data_bytes | bytes of the data area used (a multiple of chunk_bytes) |
//! | 128 | 32 | home_node | name of the home node, UTF-8, NUL padded |
//! | 160 | 8 | generation | bumped on every label rewrite; the newest set wins |
//! | 168 | 4 | state | 1 clean (parity known good), 2 dirty (open for writing) |
//! | 172 | 4 | failed_member | index of the member that failed, or 0xFFFF_FFFF |
//! | 176 | 8 | mailbox_offset_bytes | start of the mailbox area |
//! | 184 | 8 | mailbox_bytes | size of the mailbox area |
//! | 192 | 3900 | reserved | zero |
//! | 4092 | 4 | checksum | crc32c of bytes 0..4092 |

/// Size of the label block.
pub const LABEL_BYTES: usize = 4096;
/// Magic at the start of every label.
pub const MAGIC: [u8; 8] = *b"HAPAIRL1";
/// The label format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Where the mailbox area starts on every member.
pub const MAILBOX_OFFSET_BYTES: u64 = 65536;
/// Size of the mailbox area.
pub const MAILBOX_BYTES: u64 = 1024 * 1024 - 65536;
/// Where the data area starts on every member.
pub const DATA_OFFSET_BYTES: u64 = 1024 * 1024;
/// Marker for "no failed member".
pub const NO_FAILED_MEMBER: u32 = u32::MAX;

const _: () = assert!(MAILBOX_OFFSET_BYTES + MAILBOX_BYTES == DATA_OFFSET_BYTES);
const _: () = assert!(LABEL_BYTES as u64 <= MAILBOX_OFFSET_BYTES);

/// Role of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Role {
    /// Holds data chunks.
    Data,
    /// Holds the XOR of the data chunks.
    Parity,
}

/// Whether parity is known to match the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CleanState {
    /// Closed cleanly: parity matches data everywhere.
    Clean,
    /// Open for writing, or not closed cleanly: stripes written last may need their parity redone.
    Dirty,
}

/// A decoded label. See the module documentation for the byte layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub format_version: u32,
    pub aggregate_uuid: [u8; 16],
    pub aggregate_name: String,
    pub member_index: u32,
    pub role: Role,
    pub member_count: u32,
    pub chunk_bytes: u32,
    pub data_offset_bytes: u64,
    pub data_bytes: u64,
    pub home_node: String,
    pub generation: u64,
    pub state: CleanState,
    pub failed_member: Option<u32>,
    pub mailbox_offset_bytes: u64,
    pub mailbox_bytes: u64,
}

/// Why a label block was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("no hapair label (magic is {0:02x?})")]
    NoMagic([u8; 8]),
    #[error("label checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("label format version {0} is not supported (this build reads {FORMAT_VERSION})")]
    Version(u32),
    #[error("label field {field} is invalid: {why}")]
    Field { field: &'static str, why: String },
    #[error("label block is {0} bytes, expected {LABEL_BYTES}")]
    Size(usize),
}

fn field(field: &'static str, why: impl Into<String>) -> LabelError {
    LabelError::Field {
        field,
        why: why.into(),
    }
}

fn put_str(buf: &mut [u8], s: &str) {
    let b = s.as_bytes();
    buf[..b.len()].copy_from_slice(b);
}

fn get_str(buf: &[u8], name: &'static str) -> Result<String, LabelError> {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if buf[end..].iter().any(|&b| b != 0) {
        return Err(field(name, "bytes after the terminating NUL"));
    }
    String::from_utf8(buf[..end].to_vec()).map_err(|_| field(name, "not UTF-8"))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

impl Label {
    /// Check the fields for internal consistency; called before encoding and after decoding.
    pub fn validate(&self) -> Result<(), LabelError> {
        if self.aggregate_name.is_empty() || self.aggregate_name.len() > 63 {
            return Err(field("aggregate_name", "must be 1..=63 bytes"));
        }
        if self.home_node.is_empty() || self.home_node.len() > 31 {
            return Err(field("home_node", "must be 1..=31 bytes"));
        }
        if self.member_count < 2 {
            return Err(field("member_count", format!("{} < 2", self.member_count)));
        }
        if self.member_index >= self.member_count {
            return Err(field(
                "member_index",
                format!("{} >= {}", self.member_index, self.member_count),
            ));
        }
        let expect_role = if self.member_index + 1 == self.member_count {
            Role::Parity
        } else {
            Role::Data
        };
        if self.role != expect_role {
            return Err(field(
                "role",
                format!("{:?} at index {}", self.role, self.member_index),
            ));
        }
        if self.chunk_bytes < 4096 || !self.chunk_bytes.is_power_of_two() {
            return Err(field(
                "chunk_bytes",
                format!("{} is not a power of two >= 4096", self.chunk_bytes),
            ));
        }
        if self.data_bytes == 0 || self.data_bytes % self.chunk_bytes as u64 != 0 {
            return Err(field(
                "data_bytes",
                format!(
                    "{} is not a positive multiple of the chunk",
                    self.data_bytes
                ),
            ));
        }
        if self.data_offset_bytes < LABEL_BYTES as u64 || self.data_offset_bytes % 4096 != 0 {
            return Err(field(
                "data_offset_bytes",
                format!("{}", self.data_offset_bytes),
            ));
        }
        if let Some(f) = self.failed_member {
            if f >= self.member_count {
                return Err(field(
                    "failed_member",
                    format!("{f} >= {}", self.member_count),
                ));
            }
        }
        if self.mailbox_offset_bytes < LABEL_BYTES as u64
            || self.mailbox_offset_bytes + self.mailbox_bytes > self.data_offset_bytes
        {
            return Err(field("mailbox", "area overlaps the label or the data"));
        }
        Ok(())
    }

    /// Encode into a 4096-byte block with its checksum.
    pub fn encode(&self) -> Result<[u8; LABEL_BYTES], LabelError> {
        self.validate()?;
        let mut b = [0u8; LABEL_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        b[12..16].copy_from_slice(&(LABEL_BYTES as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.aggregate_uuid);
        put_str(&mut b[32..96], &self.aggregate_name);
        b[96..100].copy_from_slice(&self.member_index.to_le_bytes());
        let role: u32 = match self.role {
            Role::Data => 0,
            Role::Parity => 1,
        };
        b[100..104].copy_from_slice(&role.to_le_bytes());
        b[104..108].copy_from_slice(&self.member_count.to_le_bytes());
        b[108..112].copy_from_slice(&self.chunk_bytes.to_le_bytes());
        b[112..120].copy_from_slice(&self.data_offset_bytes.to_le_bytes());
        b[120..128].copy_from_slice(&self.data_bytes.to_le_bytes());
        put_str(&mut b[128..160], &self.home_node);
        b[160..168].copy_from_slice(&self.generation.to_le_bytes());
        let state: u32 = match self.state {
            CleanState::Clean => 1,
            CleanState::Dirty => 2,
        };
        b[168..172].copy_from_slice(&state.to_le_bytes());
        b[172..176].copy_from_slice(&self.failed_member.unwrap_or(NO_FAILED_MEMBER).to_le_bytes());
        b[176..184].copy_from_slice(&self.mailbox_offset_bytes.to_le_bytes());
        b[184..192].copy_from_slice(&self.mailbox_bytes.to_le_bytes());
        let crc = crc32c::crc32c(&b[..LABEL_BYTES - 4]);
        b[LABEL_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Decode and verify a label block.
    pub fn decode(b: &[u8]) -> Result<Label, LabelError> {
        if b.len() != LABEL_BYTES {
            return Err(LabelError::Size(b.len()));
        }
        let magic: [u8; 8] = b[0..8].try_into().unwrap();
        if magic != MAGIC {
            return Err(LabelError::NoMagic(magic));
        }
        let stored = u32_at(b, LABEL_BYTES - 4);
        let computed = crc32c::crc32c(&b[..LABEL_BYTES - 4]);
        if stored != computed {
            return Err(LabelError::Checksum { stored, computed });
        }
        let format_version = u32_at(b, 8);
        if format_version != FORMAT_VERSION {
            return Err(LabelError::Version(format_version));
        }
        if u32_at(b, 12) as usize != LABEL_BYTES {
            return Err(field("label_bytes", format!("{}", u32_at(b, 12))));
        }
        if b[192..LABEL_BYTES - 4].iter().any(|&x| x != 0) {
            return Err(field("reserved", "not zero"));
        }
        let role = match u32_at(b, 100) {
            0 => Role::Data,
            1 => Role::Parity,
            r => return Err(field("role", format!("unknown role {r}"))),
        };
        let state = match u32_at(b, 168) {
            1 => CleanState::Clean,
            2 => CleanState::Dirty,
            s => return Err(field("state", format!("unknown state {s}"))),
        };
        let failed = u32_at(b, 172);
        let label = Label {
            format_version,
            aggregate_uuid: b[16..32].try_into().unwrap(),
            aggregate_name: get_str(&b[32..96], "aggregate_name")?,
            member_index: u32_at(b, 96),
            role,
            member_count: u32_at(b, 104),
            chunk_bytes: u32_at(b, 108),
            data_offset_bytes: u64_at(b, 112),
            data_bytes: u64_at(b, 120),
            home_node: get_str(&b[128..160], "home_node")?,
            generation: u64_at(b, 160),
            state,
            failed_member: if failed == NO_FAILED_MEMBER {
                None
            } else {
                Some(failed)
            },
            mailbox_offset_bytes: u64_at(b, 176),
            mailbox_bytes: u64_at(b, 184),
        };
        label.validate()?;
        Ok(label)
    }

    /// True when `other` describes the same aggregate shape (everything but the per-member
    /// fields, the generation, the state and the failed member).
    pub fn same_aggregate(&self, other: &Label) -> Result<(), String> {
        let checks: [(&str, bool); 7] = [
            (
                "aggregate uuid",
                self.aggregate_uuid == other.aggregate_uuid,
            ),
            (
                "aggregate name",
                self.aggregate_name == other.aggregate_name,
            ),
            ("member count", self.member_count == other.member_count),
            ("chunk size", self.chunk_bytes == other.chunk_bytes),
            (
                "data offset",
                self.data_offset_bytes == other.data_offset_bytes,
            ),
            ("data size", self.data_bytes == other.data_bytes),
            ("home node", self.home_node == other.home_node),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            None => Ok(()),
            Some((what, _)) => Err(format!("{what} differs")),
        }
    }
}

/// Format a UUID for people.
pub fn uuid_string(u: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*u).hyphenated().to_string()
}

/// Outcome of checking a set of labels read from the configured members, in member order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assembly {
    /// The label everything agrees on (the newest generation), for member 0's shape.
    pub reference: Label,
    /// A member that is failed: recorded in the newest labels, or unreadable now.
    pub failed_member: Option<u32>,
    /// True when the failure is new (not yet recorded in the labels): the caller rewrites them.
    pub failure_is_new: bool,
}

/// Why a set of labels does not make an aggregate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssemblyError {
    #[error("member {index} ({path}): {why}")]
    Member {
        index: usize,
        path: String,
        why: String,
    },
    #[error("aggregate {name} has {failed} unusable members ({list}); RAID-4 survives one: refusing to serve")]
    TooManyFailed {
        name: String,
        failed: usize,
        list: String,
    },
    #[error("no member has a readable label: {0}")]
    Nothing(String),
}

/// Decide whether labels read from the members (in configured order; `Err` where a member could
/// not be read or had no valid label) form one consistent aggregate.
///
/// Decision table:
/// - every label valid, same aggregate, same generation, index = position: assemble (failed
///   member as the labels record it).
/// - a label at an older generation whose member the newest labels record as failed: that
///   member stays failed.
/// - a label at an older generation otherwise, a different aggregate, a different shape, or an
///   index that does not match its position: refuse, naming the member.
/// - exactly one member unreadable or unlabelled and no other failure: assemble degraded and
///   record the failure (`failure_is_new`).
/// - two or more members unusable: refuse.
pub fn assemble(members: &[(String, Result<Label, String>)]) -> Result<Assembly, AssemblyError> {
    // The aggregate most members agree on (first member's on a tie), then its newest label.
    let valid: Vec<&Label> = members
        .iter()
        .filter_map(|(_, l)| l.as_ref().ok())
        .collect();
    let votes = |u: &[u8; 16]| valid.iter().filter(|l| &l.aggregate_uuid == u).count();
    let majority =
        valid
            .iter()
            .map(|l| l.aggregate_uuid)
            .fold(None, |best: Option<[u8; 16]>, u| match best {
                Some(b) if votes(&b) >= votes(&u) => Some(b),
                _ => Some(u),
            });
    let newest = valid
        .iter()
        .filter(|l| Some(l.aggregate_uuid) == majority)
        .max_by_key(|l| l.generation)
        .map(|l| (*l).clone())
        .ok_or_else(|| {
            AssemblyError::Nothing(
                members
                    .iter()
                    .map(|(p, l)| format!("{p}: {}", l.as_ref().err().unwrap()))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
    if newest.member_count as usize != members.len() {
        return Err(AssemblyError::Member {
            index: 0,
            path: members[0].0.clone(),
            why: format!(
                "labels describe {} members but {} are configured",
                newest.member_count,
                members.len()
            ),
        });
    }
    let recorded_failed = newest.failed_member;
    let mut unusable: Vec<(usize, String)> = Vec::new();
    for (i, (path, l)) in members.iter().enumerate() {
        let member_err = |why: String| AssemblyError::Member {
            index: i,
            path: path.clone(),
            why,
        };
        match l {
            Err(why) => unusable.push((i, why.clone())),
            Ok(l) => {
                newest.same_aggregate(l).map_err(|d| {
                    member_err(format!(
                        "belongs to a different aggregate or shape ({d}: {} uuid {} vs {} uuid {})",
                        l.aggregate_name,
                        uuid_string(&l.aggregate_uuid),
                        newest.aggregate_name,
                        uuid_string(&newest.aggregate_uuid)
                    ))
                })?;
                if l.member_index as usize != i {
                    return Err(member_err(format!(
                        "label says member index {} but it is configured at position {i}",
                        l.member_index
                    )));
                }
                if l.generation != newest.generation {
                    if recorded_failed == Some(i as u32) {
                        unusable.push((
                            i,
                            format!("recorded failed at generation {}", newest.generation),
                        ));
                    } else {
                        return Err(member_err(format!(
                            "stale label: generation {} while the others are at {}",
                            l.generation, newest.generation
                        )));
                    }
                } else if recorded_failed == Some(i as u32) {
                    unusable.push((i, "recorded failed in the labels".into()));
                }
            }
        }
    }
    match unusable.len() {
        0 => Ok(Assembly {
            reference: newest,
            failed_member: None,
            failure_is_new: false,
        }),
        1 => {
            let idx = unusable[0].0 as u32;
            Ok(Assembly {
                reference: newest,
                failed_member: Some(idx),
                failure_is_new: recorded_failed != Some(idx),
            })
        }
        n => Err(AssemblyError::TooManyFailed {
            name: newest.aggregate_name.clone(),
            failed: n,
            list: unusable
                .iter()
                .map(|(i, w)| format!("member {i} {}: {w}", members[*i].0))
                .collect::<Vec<_>>()
                .join("; "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(index: u32) -> Label {
        Label {
            format_version: FORMAT_VERSION,
            aggregate_uuid: [7; 16],
            aggregate_name: "aggr0".into(),
            member_index: index,
            role: if index == 4 { Role::Parity } else { Role::Data },
            member_count: 5,
            chunk_bytes: 65536,
            data_offset_bytes: DATA_OFFSET_BYTES,
            data_bytes: 64 * 65536,
            home_node: "a".into(),
            generation: 3,
            state: CleanState::Clean,
            failed_member: None,
            mailbox_offset_bytes: MAILBOX_OFFSET_BYTES,
            mailbox_bytes: MAILBOX_BYTES,
        }
    }

    #[test]
    fn round_trip() {
        for i in 0..5 {
            let l = sample(i);
            let b = l.encode().unwrap();
            assert_eq!(Label::decode(&b).unwrap(), l);
        }
        let mut l = sample(1);
        l.failed_member = Some(3);
        l.state = CleanState::Dirty;
        assert_eq!(Label::decode(&l.encode().unwrap()).unwrap(), l);
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let b = sample(2).encode().unwrap();
        for byte in 0..LABEL_BYTES {
            for bit in 0..8 {
                let mut c = b;
                c[byte] ^= 1 << bit;
                assert!(
                    Label::decode(&c).is_err(),
                    "flip at byte {byte} bit {bit} accepted"
                );
            }
        }
    }

    #[test]
    fn bad_fields_refused_even_with_good_checksum() {
        let reseal = |mut b: [u8; LABEL_BYTES]| {
            let crc = crc32c::crc32c(&b[..LABEL_BYTES - 4]);
            b[LABEL_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let good = sample(0).encode().unwrap();
        let cases: Vec<(usize, Vec<u8>, &str)> = vec![
            (8, 2u32.to_le_bytes().to_vec(), "version"),
            (100, 1u32.to_le_bytes().to_vec(), "role"),
            (100, 9u32.to_le_bytes().to_vec(), "role"),
            (108, 5000u32.to_le_bytes().to_vec(), "chunk_bytes"),
            (96, 5u32.to_le_bytes().to_vec(), "member_index"),
            (168, 0u32.to_le_bytes().to_vec(), "state"),
            (172, 9u32.to_le_bytes().to_vec(), "failed_member"),
            (120, 100u64.to_le_bytes().to_vec(), "data_bytes"),
            (500, vec![1], "reserved"),
            (32, vec![0xff, 0xfe], "aggregate_name"),
        ];
        for (off, bytes, what) in cases {
            let mut b = good;
            b[off..off + bytes.len()].copy_from_slice(&bytes);
            let err = Label::decode(&reseal(b)).unwrap_err();
            assert!(
                format!("{err}").contains(what)
                    || (what == "version" && matches!(err, LabelError::Version(2))),
                "{what}: got {err}"
            );
        }
        assert!(matches!(
            Label::decode(&[0u8; 100]),
            Err(LabelError::Size(100))
        ));
        assert!(matches!(
            Label::decode(&[0u8; LABEL_BYTES]),
            Err(LabelError::NoMagic(_))
        ));
    }

    fn set(labels: Vec<Result<Label, String>>) -> Vec<(String, Result<Label, String>)> {
        labels
            .into_iter()
            .enumerate()
            .map(|(i, l)| (format!("/dev/loop{i}"), l))
            .collect()
    }

    #[test]
    fn assembly_decision_table() {
        // Consistent set.
        let a = assemble(&set((0..5).map(|i| Ok(sample(i))).collect())).unwrap();
        assert_eq!(a.failed_member, None);
        // One unreadable member: degraded, new failure.
        let mut s: Vec<_> = (0..5).map(|i| Ok(sample(i))).collect();
        s[2] = Err("short read".into());
        let a = assemble(&set(s)).unwrap();
        assert_eq!((a.failed_member, a.failure_is_new), (Some(2), true));
        // Recorded failure with stale label on the failed member: degraded, known.
        let mut s: Vec<Result<Label, String>> = (0..5)
            .map(|i| {
                let mut l = sample(i);
                l.generation = 4;
                l.failed_member = Some(3);
                Ok(l)
            })
            .collect();
        s[3] = Ok(sample(3));
        let a = assemble(&set(s.clone())).unwrap();
        assert_eq!((a.failed_member, a.failure_is_new), (Some(3), false));
        // Plus another unreadable member: refused.
        s[0] = Err("EIO".into());
        let e = assemble(&set(s)).unwrap_err();
        assert!(
            matches!(e, AssemblyError::TooManyFailed { failed: 2, .. }),
            "{e}"
        );
        // Stale label not recorded as failed: refused naming it.
        let mut s: Vec<_> = (0..5).map(|i| Ok(sample(i))).collect();
        let mut old = sample(1);
        old.generation = 2;
        s[1] = Ok(old);
        let e = assemble(&set(s)).unwrap_err();
        assert!(matches!(e, AssemblyError::Member { index: 1, .. }), "{e}");
        assert!(e.to_string().contains("stale label"));
        // A member of another aggregate.
        let mut s: Vec<_> = (0..5).map(|i| Ok(sample(i))).collect();
        let mut other = sample(4);
        other.aggregate_uuid = [9; 16];
        s[4] = Ok(other);
        let e = assemble(&set(s)).unwrap_err();
        assert!(e.to_string().contains("member 4 (/dev/loop4)"), "{e}");
        // Members in the wrong order.
        let mut s: Vec<_> = (0..5).map(|i| Ok(sample(i))).collect();
        s.swap(0, 1);
        let e = assemble(&set(s)).unwrap_err();
        assert!(e.to_string().contains("configured at position 0"), "{e}");
        // Wrong member count.
        let s: Vec<_> = (0..4).map(|i| Ok(sample(i))).collect();
        assert!(assemble(&set(s)).is_err());
        // Nothing readable.
        let s: Vec<_> = (0..5).map(|_| Err("gone".to_string())).collect();
        assert!(matches!(assemble(&set(s)), Err(AssemblyError::Nothing(_))));
    }
}
