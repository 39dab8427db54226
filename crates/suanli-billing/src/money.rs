//! Money as an integer number of fen (0.01 CNY).
//!
//! Amounts are signed so that a credit (a negative adjustment) is representable and so that a
//! negative input reaches validation and gets a named error instead of wrapping. Every sum goes
//! through checked arithmetic: an overflow is a [`BillingError::Overflow`], never a panic and
//! never a wrapped value.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::BillingError;

/// Fen in one yuan.
pub const FEN_PER_YUAN: i64 = 100;

/// An amount of money in fen (0.01 CNY). Displays as yuan, e.g. `¥1234.56` or `-¥0.05`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Fen(pub i64);

impl Fen {
    /// No money.
    pub const ZERO: Fen = Fen(0);

    /// An amount of whole yuan, or an overflow error.
    pub fn from_yuan(yuan: i64) -> Result<Fen, BillingError> {
        yuan.checked_mul(FEN_PER_YUAN)
            .map(Fen)
            .ok_or(BillingError::Overflow {
                what: "yuan to fen",
            })
    }

    /// The amount in fen.
    pub fn fen(self) -> i64 {
        self.0
    }

    /// `self + other`, or an overflow error naming `what` was being added.
    pub fn checked_add(self, other: Fen, what: &'static str) -> Result<Fen, BillingError> {
        self.0
            .checked_add(other.0)
            .map(Fen)
            .ok_or(BillingError::Overflow { what })
    }

    /// `self - other`, or an overflow error naming `what` was being subtracted.
    pub fn checked_sub(self, other: Fen, what: &'static str) -> Result<Fen, BillingError> {
        self.0
            .checked_sub(other.0)
            .map(Fen)
            .ok_or(BillingError::Overflow { what })
    }

    /// Sum of amounts, or an overflow error.
    pub fn checked_sum(
        amounts: impl IntoIterator<Item = Fen>,
        what: &'static str,
    ) -> Result<Fen, BillingError> {
        amounts
            .into_iter()
            .try_fold(Fen::ZERO, |acc, a| acc.checked_add(a, what))
    }

    /// Whether the amount is below zero.
    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Whether the amount is above zero.
    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    /// The amount as a plain decimal number of yuan with two decimals, e.g. `1234.56` or
    /// `-0.05`: what CSV files and spreadsheets expect.
    pub fn yuan_decimal(self) -> String {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let per = FEN_PER_YUAN as u64;
        format!("{sign}{}.{:02}", abs / per, abs % per)
    }
}

impl fmt::Display for Fen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let decimal = self.yuan_decimal();
        match decimal.strip_prefix('-') {
            Some(abs) => write!(f, "-¥{abs}"),
            None => write!(f, "¥{decimal}"),
        }
    }
}

/// Converts an exact integer result computed in `u128` back into fen.
pub(crate) fn fen_from_u128(value: u128, what: &'static str) -> Result<Fen, BillingError> {
    i64::try_from(value)
        .map(Fen)
        .map_err(|_| BillingError::Overflow { what })
}

/// `numerator / denominator` rounded to the nearest integer, halves up, in exact integers.
/// `None` when the denominator is zero or the rounding step overflows.
pub(crate) fn div_round_half_up(numerator: u128, denominator: u128) -> Option<u128> {
    if denominator == 0 {
        return None;
    }
    let quotient = numerator / denominator;
    let remainder = numerator % denominator;
    // Compare 2r >= d without computing 2r, which could overflow.
    if remainder >= denominator - remainder {
        quotient.checked_add(1)
    } else {
        Some(quotient)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_yuan_with_two_decimals() {
        assert_eq!(Fen(123456).to_string(), "¥1234.56");
        assert_eq!(Fen(5).to_string(), "¥0.05");
        assert_eq!(Fen(0).to_string(), "¥0.00");
        assert_eq!(Fen(-5).to_string(), "-¥0.05");
        assert_eq!(Fen(-100).to_string(), "-¥1.00");
        assert_eq!(Fen(i64::MIN).yuan_decimal(), "-92233720368547758.08");
        assert_eq!(Fen(100).yuan_decimal(), "1.00");
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        let err = Fen(i64::MAX).checked_add(Fen(1), "test sum").unwrap_err();
        assert_eq!(err, BillingError::Overflow { what: "test sum" });
        assert!(Fen(i64::MIN).checked_sub(Fen(1), "x").is_err());
        assert!(Fen::checked_sum([Fen(i64::MAX), Fen(1)], "x").is_err());
        assert!(Fen::from_yuan(i64::MAX / 10).is_err());
        assert_eq!(Fen::from_yuan(12).unwrap(), Fen(1200));
        assert!(fen_from_u128(u128::from(u64::MAX), "x").is_err());
    }

    #[test]
    fn rounds_halves_up() {
        assert_eq!(div_round_half_up(5, 10), Some(1));
        assert_eq!(div_round_half_up(4, 10), Some(0));
        assert_eq!(div_round_half_up(15, 10), Some(2));
        assert_eq!(div_round_half_up(14, 10), Some(1));
        assert_eq!(div_round_half_up(1, 3), Some(0));
        assert_eq!(div_round_half_up(2, 3), Some(1));
        assert_eq!(div_round_half_up(7, 0), None);
        assert_eq!(div_round_half_up(u128::MAX, u128::MAX), Some(1));
        assert_eq!(div_round_half_up(u128::MAX, 1), Some(u128::MAX));
    }
}
