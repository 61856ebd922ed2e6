//! Wall-clock helpers: the local time zone's offset (for printing local times with their date and
//! offset, as operators read their watches) and Unix milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Offset of the local time zone from UTC at `unix_ms`, in seconds (0 if unknown).
pub fn local_utc_offset_s(unix_ms: u64) -> i64 {
    let t = (unix_ms / 1000) as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value of this plain C struct (the pointer field
    // `tm_zone` may be null); localtime_r fills it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers point to live, properly aligned locals for the duration of the
    // call; localtime_r is the re-entrant variant and keeps no reference to them.
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() {
        return 0;
    }
    tm.tm_gmtoff
}

#[cfg(test)]
mod tests {
    #[test]
    fn offset_is_within_a_day_and_unix_ms_moves() {
        let now = super::unix_ms();
        assert!(now > 1_600_000_000_000);
        assert!(super::local_utc_offset_s(now).abs() <= 14 * 3600);
    }
}
