//! Wall-clock times as the API carries them (`_unix_ms`, milliseconds since the Unix epoch, UTC)
//! and as people write them (RFC 3339), converted with the proleptic Gregorian calendar.

use std::time::{SystemTime, UNIX_EPOCH};

const MS_PER_DAY: i64 = 86_400_000;

/// Now, in milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// `2025-03-01T08:00:00Z`: whole seconds, UTC.
pub fn format_rfc3339(unix_ms: u64) -> String {
    let ms = unix_ms as i64;
    let (year, month, day) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    let secs = ms.rem_euclid(MS_PER_DAY) / 1000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Parses an RFC 3339 date-time with a `Z` or `±HH:MM` offset and optional fractional seconds
/// (`2025-03-01T08:00:00+08:00`, `2025-03-01T00:00:00.5Z`) into milliseconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let bad = |what: &str| {
        format!(
            "{text:?} is not an RFC 3339 time ({what}); expected for example 2025-03-01T08:00:00+08:00"
        )
    };
    let b = text.as_bytes();
    if !text.is_ascii() || b.len() < 20 {
        return Err(bad("too short or not ASCII"));
    }
    let num = |range: std::ops::Range<usize>, what: &str| -> Result<i64, String> {
        let s = &text[range];
        if s.bytes().all(|c| c.is_ascii_digit()) {
            Ok(s.parse().expect("digits parse"))
        } else {
            Err(bad(what))
        }
    };
    let year = num(0..4, "year")?;
    let month = num(5..7, "month")? as u32;
    let day = num(8..10, "day")? as u32;
    let hour = num(11..13, "hour")?;
    let minute = num(14..16, "minute")?;
    let second = num(17..19, "second")?;
    if b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return Err(bad("separators"));
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad("a 'T' must separate date and time"));
    }
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(bad("no such date"));
    }
    // 60 allows a leap second, which counts as the next second.
    if hour > 23 || minute > 59 || second > 60 {
        return Err(bad("no such time of day"));
    }
    let mut rest = &text[19..];
    let mut millis = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad("fraction of a second"));
        }
        for (i, c) in frac[..digits.min(3)].bytes().enumerate() {
            millis += i64::from(c - b'0') * [100, 10, 1][i];
        }
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let digits = |s: &str| s.bytes().all(|c| c.is_ascii_digit());
            if !digits(&rest[1..3]) || !digits(&rest[4..6]) {
                return Err(bad("offset"));
            }
            let m = rest[1..3].parse::<i64>().expect("digits") * 60
                + rest[4..6].parse::<i64>().expect("digits");
            if rest.starts_with('-') { -m } else { m }
        }
        _ => return Err(bad("the offset must be Z or like +08:00")),
    };
    let ms = days_from_civil(year, month, day) * MS_PER_DAY
        + ((hour * 60 + minute - offset_min) * 60 + second) * 1000
        + millis;
    u64::try_from(ms).map_err(|_| bad("before 1970"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        // 2024-02-29 12:34:56.789 UTC, a leap day.
        assert_eq!(format_rfc3339(1_709_210_096_789), "2024-02-29T12:34:56Z");
        assert_eq!(format_rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn parses_offsets_and_fractions() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_rfc3339("2024-02-29T12:34:56.789Z"),
            Ok(1_709_210_096_789)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T20:34:56.789+08:00"),
            Ok(1_709_210_096_789)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T11:34:56.789123-01:00"),
            Ok(1_709_210_096_789)
        );
        assert_eq!(parse_rfc3339("1970-01-01t00:00:01.5z"), Ok(1500));
    }

    #[test]
    fn rejects_malformed_times() {
        for bad in [
            "2024-02-30T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00+0800",
            "2024-01-01",
            "1969-12-31T23:59:59Z",
            "2024-01-01T00:00:00.Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn round_trips_every_day_of_four_centuries() {
        for day in (0..146_097).step_by(17) {
            let ms = day as u64 * MS_PER_DAY as u64 + 3_723_000;
            assert_eq!(parse_rfc3339(&format_rfc3339(ms)), Ok(ms));
        }
    }
}
