//! RAID-4 geometry and I/O planning: N data members and one dedicated parity member.
//!
//! Logical layout: the export's byte address space is cut into stripes of `N * chunk_bytes`.
//! Stripe `s` keeps its `i`-th chunk on data member `i` at member offset `s * chunk_bytes`
//! (relative to the member's data area), and the XOR of its N chunks on the parity member at the
//! same offset. A byte at column `c` of a stripe (offset within the chunk) is protected by the
//! parity byte at column `c`.
//!
//! Everything here is pure: it maps ranges and decides what to read and write; the aggregate in
//! `daemon::aggregate` executes the plans through an I/O engine.

/// Shape of a RAID-4 aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Number of data members (N >= 1). The parity member has index N.
    pub data_members: usize,
    /// Chunk size in bytes: a power of two, at least 4 KiB.
    pub chunk_bytes: u64,
    /// Number of stripes (usable bytes per member / chunk_bytes).
    pub stripes: u64,
}

/// A piece of a request that lands on one member within one stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Data member index (0..N).
    pub member: usize,
    /// Column: byte offset within the chunk.
    pub col: u64,
    /// Length in bytes; `col + len <= chunk_bytes`.
    pub len: u64,
    /// Offset of this piece within the request buffer.
    pub buf_off: u64,
}

/// The part of a request that falls into one stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeSpan {
    /// Stripe number.
    pub stripe: u64,
    /// Pieces in member order (ascending logical address).
    pub segs: Vec<Seg>,
}

impl StripeSpan {
    /// Union of the columns touched in this stripe: `[lo, hi)`.
    pub fn columns(&self) -> (u64, u64) {
        let lo = self.segs.iter().map(|s| s.col).min().unwrap_or(0);
        let hi = self.segs.iter().map(|s| s.col + s.len).max().unwrap_or(0);
        (lo, hi)
    }

    /// The piece on data member `m`, if the request touches it here.
    pub fn seg_of(&self, m: usize) -> Option<&Seg> {
        self.segs.iter().find(|s| s.member == m)
    }
}

/// How a partial-stripe write keeps parity right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMethod {
    /// Every data chunk of the stripe is rewritten: parity from the new data alone, no reads.
    FullStripe,
    /// Read old data and old parity of the touched columns; new parity = old ^ old data ^ new.
    ReadModifyWrite,
    /// Read the untouched data in the touched columns; parity computed from scratch.
    ReconstructWrite,
}

/// Geometry errors, found when the aggregate is built or a request is checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// The chunk size is not a power of two of at least 4 KiB.
    #[error("chunk size {0} bytes is not a power of two of at least 4096")]
    BadChunk(u64),
    /// Fewer than one data member.
    #[error("an aggregate needs at least one data member and one parity member")]
    NoDataMembers,
    /// The range falls outside the aggregate.
    #[error("range {offset}+{len} is outside the aggregate of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

impl Geometry {
    /// A geometry for `data_members` data members of `member_data_bytes` usable bytes each.
    pub fn new(
        data_members: usize,
        chunk_bytes: u64,
        member_data_bytes: u64,
    ) -> Result<Geometry, GeometryError> {
        if chunk_bytes < 4096 || !chunk_bytes.is_power_of_two() {
            return Err(GeometryError::BadChunk(chunk_bytes));
        }
        if data_members == 0 {
            return Err(GeometryError::NoDataMembers);
        }
        Ok(Geometry {
            data_members,
            chunk_bytes,
            stripes: member_data_bytes / chunk_bytes,
        })
    }

    /// Index of the parity member.
    pub fn parity(&self) -> usize {
        self.data_members
    }

    /// Total members, parity included.
    pub fn members(&self) -> usize {
        self.data_members + 1
    }

    /// Data bytes in one stripe.
    pub fn stripe_bytes(&self) -> u64 {
        self.data_members as u64 * self.chunk_bytes
    }

    /// Usable size of the aggregate in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.stripes * self.stripe_bytes()
    }

    /// Offset within a member's data area of column `col` of stripe `stripe`.
    pub fn member_offset(&self, stripe: u64, col: u64) -> u64 {
        stripe * self.chunk_bytes + col
    }

    /// Check that `[offset, offset+len)` lies inside the aggregate.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), GeometryError> {
        let size = self.size_bytes();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(GeometryError::OutOfRange { offset, len, size }),
        }
    }

    /// Split a logical range (already checked) into per-stripe spans.
    pub fn spans(&self, offset: u64, len: u64) -> Vec<StripeSpan> {
        let mut out: Vec<StripeSpan> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let stripe = pos / self.stripe_bytes();
            let in_stripe = pos % self.stripe_bytes();
            let member = (in_stripe / self.chunk_bytes) as usize;
            let col = in_stripe % self.chunk_bytes;
            let n = (self.chunk_bytes - col).min(end - pos);
            let seg = Seg {
                member,
                col,
                len: n,
                buf_off: pos - offset,
            };
            match out.last_mut() {
                Some(span) if span.stripe == stripe => span.segs.push(seg),
                _ => out.push(StripeSpan {
                    stripe,
                    segs: vec![seg],
                }),
            }
            pos += n;
        }
        out
    }

    /// Choose how to write `span`: whichever reads fewer bytes (read-modify-write on a tie, as
    /// it touches fewer members).
    pub fn write_method(&self, span: &StripeSpan) -> WriteMethod {
        let written: u64 = span.segs.iter().map(|s| s.len).sum();
        if written == self.stripe_bytes() {
            return WriteMethod::FullStripe;
        }
        let (rmw, rcw) = self.read_costs(span);
        if rcw < rmw {
            WriteMethod::ReconstructWrite
        } else {
            WriteMethod::ReadModifyWrite
        }
    }

    /// Bytes read by (read-modify-write, reconstruct-write) for `span`.
    pub fn read_costs(&self, span: &StripeSpan) -> (u64, u64) {
        let (lo, hi) = span.columns();
        let written: u64 = span.segs.iter().map(|s| s.len).sum();
        let rmw = written + (hi - lo);
        let rcw = (hi - lo) * self.data_members as u64 - written;
        (rmw, rcw)
    }

    /// For reconstruct-write: the column ranges of data member `m` inside `[lo, hi)` that the
    /// write does not cover and that must therefore be read. At most one range per member,
    /// because a request covers a prefix, a suffix, a whole chunk or a middle piece of one chunk.
    pub fn uncovered(&self, span: &StripeSpan, m: usize) -> Option<(u64, u64)> {
        let (lo, hi) = span.columns();
        match span.seg_of(m) {
            None => Some((lo, hi)),
            Some(s) => {
                let (a, b) = (s.col, s.col + s.len);
                debug_assert!(a == lo || b == hi, "a seg inside [lo,hi) leaves two holes");
                if a > lo {
                    Some((lo, a))
                } else if b < hi {
                    Some((b, hi))
                } else {
                    None
                }
            }
        }
    }
}

/// `dst ^= src`, a word at a time. The compiler vectorises the inner loop.
pub fn xor_into(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "xor of unequal lengths");
    let mut d = dst.chunks_exact_mut(64);
    let mut s = src.chunks_exact(64);
    for (dc, sc) in (&mut d).zip(&mut s) {
        for i in 0..8 {
            let a = u64::from_ne_bytes(dc[i * 8..i * 8 + 8].try_into().unwrap());
            let b = u64::from_ne_bytes(sc[i * 8..i * 8 + 8].try_into().unwrap());
            dc[i * 8..i * 8 + 8].copy_from_slice(&(a ^ b).to_ne_bytes());
        }
    }
    for (x, y) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *x ^= *y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn g(n: usize, chunk: u64, stripes: u64) -> Geometry {
        Geometry::new(n, chunk, chunk * stripes).unwrap()
    }

    #[test]
    fn bad_geometry_refused() {
        assert_eq!(
            Geometry::new(4, 3000, 1 << 20),
            Err(GeometryError::BadChunk(3000))
        );
        assert_eq!(
            Geometry::new(4, 2048, 1 << 20),
            Err(GeometryError::BadChunk(2048))
        );
        assert_eq!(
            Geometry::new(0, 4096, 1 << 20),
            Err(GeometryError::NoDataMembers)
        );
    }

    #[test]
    fn range_checks() {
        let geo = g(4, 4096, 10);
        assert_eq!(geo.size_bytes(), 4 * 4096 * 10);
        assert!(geo.check_range(0, geo.size_bytes()).is_ok());
        assert!(geo.check_range(1, geo.size_bytes()).is_err());
        assert!(geo.check_range(u64::MAX, 2).is_err());
    }

    #[test]
    fn spans_cover_request_in_order() {
        let geo = g(4, 4096, 10);
        let spans = geo.spans(4096 * 3 + 100, 4096 * 2);
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].stripe, 0);
        assert_eq!(
            spans[0].segs,
            vec![Seg {
                member: 3,
                col: 100,
                len: 3996,
                buf_off: 0
            }]
        );
        assert_eq!(spans[1].stripe, 1);
        assert_eq!(
            spans[1].segs,
            vec![
                Seg {
                    member: 0,
                    col: 0,
                    len: 4096,
                    buf_off: 3996
                },
                Seg {
                    member: 1,
                    col: 0,
                    len: 100,
                    buf_off: 3996 + 4096
                }
            ]
        );
    }

    #[test]
    fn write_method_choice() {
        let geo = g(4, 65536, 10);
        let full = &geo.spans(0, geo.stripe_bytes())[0];
        assert_eq!(geo.write_method(full), WriteMethod::FullStripe);
        let small = &geo.spans(4096, 4096)[0];
        // RMW reads 4K data + 4K parity; RCW would read 3 x 4K.
        assert_eq!(geo.read_costs(small), (8192, 12288));
        assert_eq!(geo.write_method(small), WriteMethod::ReadModifyWrite);
        let most = &geo.spans(0, 3 * 65536)[0];
        // RMW reads 3 chunks + parity; RCW reads the one untouched chunk.
        assert_eq!(geo.write_method(most), WriteMethod::ReconstructWrite);
        assert_eq!(geo.uncovered(most, 3), Some((0, 65536)));
        assert_eq!(geo.uncovered(most, 0), None);
    }

    #[test]
    fn xor_matches_bytewise() {
        let a: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let b: Vec<u8> = (0..1000u32).map(|i| (i * 13 + 5) as u8).collect();
        let mut d = a.clone();
        xor_into(&mut d, &b);
        for i in 0..1000 {
            assert_eq!(d[i], a[i] ^ b[i]);
        }
    }

    proptest! {
        #[test]
        fn spans_partition_the_range(n in 1usize..6, shift in 12u32..17, off in 0u64..1_000_000, len in 1u64..600_000) {
            let chunk = 1u64 << shift;
            let geo = g(n, chunk, 64);
            prop_assume!(geo.check_range(off, len).is_ok());
            let spans = geo.spans(off, len);
            let mut expect_buf = 0;
            for span in &spans {
                for s in &span.segs {
                    prop_assert_eq!(s.buf_off, expect_buf);
                    prop_assert!(s.col + s.len <= chunk);
                    let logical = span.stripe * geo.stripe_bytes() + s.member as u64 * chunk + s.col;
                    prop_assert_eq!(logical, off + s.buf_off);
                    expect_buf += s.len;
                }
                let (lo, hi) = span.columns();
                for m in 0..n {
                    if let Some((a, b)) = geo.uncovered(span, m) {
                        prop_assert!(lo <= a && a < b && b <= hi);
                    }
                }
            }
            prop_assert_eq!(expect_buf, len);
        }
    }
}
