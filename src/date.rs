//! The dates Strait writes: the `Date` field it adds to responses that lack one
//! (RFC 9110 §6.6.1, IMF-fixdate), and the access log's time in the common log format
//! that log tools parse (`04/Dec/2026:00:45:01 +0000`). Each is formatted at most once
//! per second per thread.

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

/// `Sun, 06 Nov 1994 08:49:37 GMT`
pub const HTTP_LEN: usize = 29;
/// `06/Nov/1994:08:49:37 +0000`
pub const CLF_LEN: usize = 26;

thread_local! {
    static HTTP: Cell<(u64, [u8; HTTP_LEN])> = const { Cell::new((u64::MAX, [0; HTTP_LEN])) };
    static CLF: Cell<(u64, [u8; CLF_LEN])> = const { Cell::new((u64::MAX, [0; CLF_LEN])) };
}

const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// The current time as an IMF-fixdate.
pub fn http_now() -> [u8; HTTP_LEN] {
    cached(&HTTP, http)
}

/// The current time as the common log format writes it (UTC).
pub fn clf_now() -> [u8; CLF_LEN] {
    cached(&CLF, clf)
}

fn cached<const N: usize>(
    cache: &'static std::thread::LocalKey<Cell<(u64, [u8; N])>>,
    format: fn(u64) -> [u8; N],
) -> [u8; N] {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    cache.with(|c| {
        let (at, text) = c.get();
        if at == secs {
            return text;
        }
        let text = format(secs);
        c.set((secs, text));
        text
    })
}

/// Seconds since the Unix epoch (UTC) as an IMF-fixdate.
fn http(secs: u64) -> [u8; HTTP_LEN] {
    let t = Civil::from_secs(secs);
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    out[..3].copy_from_slice(DAYS[t.weekday]);
    two(&mut out[5..7], t.day);
    out[8..11].copy_from_slice(MONTHS[t.month as usize - 1]);
    four(&mut out[12..16], t.year);
    t.clock(&mut out[17..25]);
    out
}

/// Seconds since the Unix epoch (UTC) as the common log format's time.
fn clf(secs: u64) -> [u8; CLF_LEN] {
    let t = Civil::from_secs(secs);
    let mut out = *b"01/Jan/1970:00:00:00 +0000";
    two(&mut out[..2], t.day);
    out[3..6].copy_from_slice(MONTHS[t.month as usize - 1]);
    four(&mut out[7..11], t.year);
    t.clock(&mut out[12..20]);
    out
}

/// A moment in UTC, split for formatting.
struct Civil {
    year: u32,
    month: u32,
    day: u32,
    /// 0 is Thursday (1970-01-01 was one).
    weekday: usize,
    secs_of_day: u32,
}

impl Civil {
    fn from_secs(secs: u64) -> Civil {
        let days = secs / 86_400;
        let (year, month, day) = civil_from_days(days as i64);
        Civil {
            year: year as u32,
            month,
            day,
            weekday: (days % 7) as usize,
            secs_of_day: (secs % 86_400) as u32,
        }
    }

    /// `HH:MM:SS` into `dst` (8 bytes).
    fn clock(&self, dst: &mut [u8]) {
        let s = self.secs_of_day;
        two(&mut dst[0..2], s / 3600);
        dst[2] = b':';
        two(&mut dst[3..5], s / 60 % 60);
        dst[5] = b':';
        two(&mut dst[6..8], s % 60);
    }
}

fn two(dst: &mut [u8], n: u32) {
    dst[0] = b'0' + (n / 10 % 10) as u8;
    dst[1] = b'0' + (n % 10) as u8;
}

fn four(dst: &mut [u8], n: u32) {
    two(&mut dst[..2], n / 100);
    two(&mut dst[2..4], n % 100);
}

/// Year, month (1-12) and day (1-31) of a day count since 1970-01-01, in the proleptic
/// Gregorian calendar (the era-based method: 400-year cycles of 146 097 days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_imf_fixdate() {
        assert_eq!(&http(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&http(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        // A leap day, and the last second of a century year that is a leap year.
        assert_eq!(&http(951_782_400), b"Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(&http(978_307_199), b"Sun, 31 Dec 2000 23:59:59 GMT");
        assert_eq!(&http(1_795_737_600), b"Fri, 27 Nov 2026 00:00:00 GMT");
    }

    #[test]
    fn formats_the_common_log_formats_time() {
        assert_eq!(&clf(0), b"01/Jan/1970:00:00:00 +0000");
        assert_eq!(&clf(784_111_777), b"06/Nov/1994:08:49:37 +0000");
        assert_eq!(&clf(951_782_400), b"29/Feb/2000:00:00:00 +0000");
        assert_eq!(&clf(1_796_344_501), b"04/Dec/2026:00:35:01 +0000");
    }

    #[test]
    fn now_is_well_formed() {
        let text = http_now();
        assert!(text.ends_with(b" GMT"));
        assert_eq!(text[3], b',');
        let text = clf_now();
        assert!(text.ends_with(b" +0000"));
        assert_eq!((text[2], text[6], text[11]), (b'/', b'/', b':'));
    }
}
