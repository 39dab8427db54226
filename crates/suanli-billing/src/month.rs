//! Calendar months in China Standard Time (UTC+8, no daylight saving), the period of every
//! statement and of monthly budgets.
//!
//! Times are unix milliseconds like everywhere in suanli. The conversion is plain integer
//! arithmetic on days (the proleptic Gregorian calendar), so it needs no time-zone database and
//! gives the same answer on every machine.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use suanli_core::Millis;

use crate::error::BillingError;

/// China Standard Time is UTC+8 all year.
pub const CST_OFFSET_MS: i64 = 8 * 3_600_000;

const MS_PER_DAY: i64 = 86_400_000;

/// The last year a month may have: far beyond any `u64` millisecond time (about 584 million
/// years), and small enough that every computation on months stays inside its integers.
pub const MAX_YEAR: i32 = 999_999_999;

/// A calendar month in China Standard Time, e.g. `2025-03`.
/// Serialises as its text, `2025-03`, so it can key a map in any format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Month {
    // Private so that every month is a valid one (see `Month::new`).
    year: i32,
    month: u8,
}

impl Month {
    /// A month, or an error when `month` is not in 1..=12 or `year` not in 0..=[`MAX_YEAR`].
    pub fn new(year: i32, month: u8) -> Result<Month, BillingError> {
        if (1..=12).contains(&month) && (0..=MAX_YEAR).contains(&year) {
            Ok(Month { year, month })
        } else {
            Err(BillingError::InvalidMonth {
                text: format!("{year:04}-{month:02}"),
            })
        }
    }

    /// The year, e.g. 2025.
    pub fn year(self) -> i32 {
        self.year
    }

    /// The month of the year, 1..=12.
    pub fn month(self) -> u8 {
        self.month
    }

    /// Months since January of year 0: consecutive months differ by one.
    pub fn index(self) -> i64 {
        i64::from(self.year) * 12 + i64::from(self.month) - 1
    }

    /// The month (in China Standard Time) that contains the instant `at`.
    pub fn containing(at: Millis) -> Month {
        // u64 milliseconds fit in i128 with room for the offset.
        let local = at as i128 + CST_OFFSET_MS as i128;
        let days = local.div_euclid(MS_PER_DAY as i128) as i64;
        let (year, month, _) = civil_from_days(days);
        Month { year, month }
    }

    /// The first instant of the month, in unix milliseconds (negative before 1970; wider than
    /// `u64` so that every month has one).
    pub fn starts_at_ms(self) -> i128 {
        i128::from(days_from_civil(self.year, self.month, 1)) * i128::from(MS_PER_DAY)
            - i128::from(CST_OFFSET_MS)
    }

    /// The month after this one.
    pub fn next(self) -> Month {
        if self.month == 12 {
            Month {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Month {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The month before this one.
    pub fn prev(self) -> Month {
        if self.month == 1 {
            Month {
                year: self.year - 1,
                month: 12,
            }
        } else {
            Month {
                year: self.year,
                month: self.month - 1,
            }
        }
    }

    /// Whether the instant `at` falls in this month.
    pub fn contains(self, at: Millis) -> bool {
        Month::containing(at) == self
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl From<Month> for String {
    fn from(month: Month) -> String {
        month.to_string()
    }
}

impl TryFrom<String> for Month {
    type Error = BillingError;

    fn try_from(text: String) -> Result<Month, BillingError> {
        text.parse()
    }
}

impl FromStr for Month {
    type Err = BillingError;

    /// Parses `YYYY-MM`, e.g. `2025-03`.
    fn from_str(text: &str) -> Result<Month, BillingError> {
        let invalid = || BillingError::InvalidMonth {
            text: text.to_string(),
        };
        let (year, month) = text.split_once('-').ok_or_else(invalid)?;
        // Years past 9999 are written in full, so every month a u64 time reaches round-trips.
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if year.len() < 4 || month.len() != 2 || !digits(year) || !digits(month) {
            return Err(invalid());
        }
        let year: i32 = year.parse().map_err(|_| invalid())?;
        let month: u8 = month.parse().map_err(|_| invalid())?;
        Month::new(year, month).map_err(|_| invalid())
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i32, month: u8, day: u8) -> i64 {
    let y = year as i64 - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let m = month as i64;
    let day_of_year = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day as i64 - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The proleptic Gregorian date of a day number since 1970-01-01 (`civil_from_days`).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (year_of_era + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2025-02-01T00:00:00+08:00 = 2025-01-31T16:00:00Z.
    const FEB_2025_CST: Millis = 1_738_339_200_000;

    #[test]
    fn month_boundary_is_midnight_in_beijing_not_utc() {
        assert_eq!(
            Month::containing(FEB_2025_CST),
            Month::new(2025, 2).unwrap()
        );
        assert_eq!(
            Month::containing(FEB_2025_CST - 1),
            Month::new(2025, 1).unwrap()
        );
        assert_eq!(
            Month::new(2025, 2).unwrap().starts_at_ms(),
            FEB_2025_CST as i128
        );
    }

    #[test]
    fn epoch_is_eight_in_the_morning_of_1970_01_01() {
        assert_eq!(Month::containing(0), Month::new(1970, 1).unwrap());
        assert_eq!(
            Month::new(1970, 1).unwrap().starts_at_ms(),
            -i128::from(CST_OFFSET_MS)
        );
    }

    #[test]
    fn leap_day_and_year_end() {
        // 2024-02-29T23:59:59.999+08:00 is still February; one ms later it is March.
        let march_2024 = Month::new(2024, 3).unwrap().starts_at_ms() as Millis;
        assert_eq!(Month::containing(march_2024 - 1).month, 2);
        assert_eq!(Month::containing(march_2024).month, 3);
        let jan_2025 = Month::new(2025, 1).unwrap().starts_at_ms() as Millis;
        assert_eq!(
            Month::containing(jan_2025 - 1),
            Month::new(2024, 12).unwrap()
        );
        assert_eq!(
            Month::new(2024, 12).unwrap().next(),
            Month::new(2025, 1).unwrap()
        );
    }

    #[test]
    fn every_month_start_round_trips_for_two_centuries() {
        let mut month = Month::new(1970, 2).unwrap();
        while month.year < 2170 {
            let start = month.starts_at_ms() as Millis;
            assert_eq!(Month::containing(start), month);
            assert_ne!(Month::containing(start - 1), month);
            assert_eq!(Month::containing(start - 1), month.prev());
            let next = month.next();
            assert_eq!(next.prev(), month);
            assert!(next.starts_at_ms() > month.starts_at_ms());
            month = next;
        }
    }

    #[test]
    fn parses_and_displays_yyyy_mm() {
        let m: Month = "2025-03".parse().unwrap();
        assert_eq!(m, Month::new(2025, 3).unwrap());
        assert_eq!(m.to_string(), "2025-03");
        let far = Month::containing(u64::MAX);
        assert_eq!(far.to_string().parse::<Month>().unwrap(), far);
        assert!(far.starts_at_ms() <= i128::from(u64::MAX));
        assert!(far.next().starts_at_ms() > i128::from(u64::MAX));
        let last: Month = format!("{MAX_YEAR}-12").parse().unwrap();
        assert!(last.next().starts_at_ms() > last.starts_at_ms());
        assert!(
            format!("{}-01", MAX_YEAR as i64 + 1)
                .parse::<Month>()
                .is_err()
        );
        assert!(Month::new(-1, 1).is_err());
        for bad in [
            "+2025-03", "2025-+3", "2025-13", "2025-00", "2025-3", "25-03", "2025/03", "",
            "abcd-ef",
        ] {
            assert!(bad.parse::<Month>().is_err(), "{bad}");
        }
        assert!(Month::new(2025, 0).is_err());
    }
}
