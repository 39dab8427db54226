//! Parsers of the values people type on the command line: humane durations (`2h`, `90m`),
//! gang shapes (`2x8`), amounts of compute (`5P`, `1500`), times (RFC 3339 or `+2h`) and
//! request names. Each returns a message that says what was expected; clap puts the flag's
//! name in front of it.

use suanli_core::TFLOPS_PER_P;
use suanli_proto::v1::GangShape;

use crate::time;

/// Largest number of devices on one node, as the API defines it.
const MAX_DEVICES_PER_NODE: u32 = 16;

/// Parses a duration such as `2h`, `90m`, `45s`, `1d`, `500ms` or `1h30m` into milliseconds.
pub fn duration_ms(text: &str) -> Result<u64, String> {
    let bad = |why: &str| {
        format!(
            "{text:?}: {why}; write a number and a unit (ms, s, m, h, d), for example 90m or 1h30m"
        )
    };
    let lower = text.trim().to_ascii_lowercase();
    if lower.is_empty() {
        return Err(bad("empty duration"));
    }
    let mut rest = lower.as_str();
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad("expected a number"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| bad("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(bad("missing unit")),
            _ => return Err(bad("unknown unit")),
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(unit_ms)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(|| bad("too long"))?;
    }
    Ok(total)
}

/// A duration that must be at least one millisecond (a request's run time).
pub fn positive_duration_ms(text: &str) -> Result<u64, String> {
    match duration_ms(text)? {
        0 => Err(format!("{text:?}: the duration must be longer than zero")),
        ms => Ok(ms),
    }
}

/// Parses a gang shape `NxM`: N nodes with M devices each (`2x8`).
/// `NAME=VALUE` for `--env`; the value may be empty and may hold `=`.
pub fn env_var(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!(
            "{text:?}: expected NAME=VALUE, for example NCCL_DEBUG=INFO"
        )),
    }
}

pub fn gang(text: &str) -> Result<GangShape, String> {
    let expected = || {
        format!("{text:?}: expected NODESxDEVICES, for example 2x8 for 2 nodes of 8 devices each")
    };
    let (n, m) = text.trim().split_once(['x', 'X']).ok_or_else(expected)?;
    let number = |s: &str| -> Result<u32, String> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(expected());
        }
        s.parse().map_err(|_| expected())
    };
    let (nodes, devices_per_node) = (number(n)?, number(m)?);
    if nodes == 0 {
        return Err(format!("{text:?}: the number of nodes must be at least 1"));
    }
    if !(1..=MAX_DEVICES_PER_NODE).contains(&devices_per_node) {
        return Err(format!(
            "{text:?}: devices per node must be 1 to {MAX_DEVICES_PER_NODE}"
        ));
    }
    Ok(GangShape {
        nodes,
        devices_per_node,
    })
}

/// A non-negative decimal with at most three decimals, in thousandths (`1.5` is 1500).
fn thousandths(text: &str) -> Option<u64> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|c| c.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) || frac.len() > 3 {
        return None;
    }
    let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac_value = format!("{frac:0<3}").parse::<u64>().ok()?;
    int.checked_mul(1000)?.checked_add(frac_value)
}

/// Parses an amount of compute: a number of TFLOPS (`1500`, `1500T`, `1500tflops`) or of P
/// (`5P`, `1.5P`; 1P = 1000 TFLOPS).
pub fn tflops(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{text:?}: expected TFLOPS (1500) or P (5P, 1.5P; 1P = 1000 TFLOPS), at most 3 decimals of P"
        )
    };
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    if let Some(p) = lower.strip_suffix('p') {
        return thousandths(p.trim_end())
            .map(|v| v * TFLOPS_PER_P / 1000)
            .ok_or_else(bad);
    }
    let number = lower
        .strip_suffix("tflops")
        .or_else(|| lower.strip_suffix('t'))
        .unwrap_or(&lower)
        .trim_end();
    if number.is_empty() || !number.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    number.parse().map_err(|_| bad())
}

/// An amount of compute that must be at least 1 TFLOPS (an elastic request).
pub fn positive_tflops(text: &str) -> Result<u64, String> {
    match tflops(text)? {
        0 => Err(format!("{text:?}: the amount must be at least 1 TFLOPS")),
        v => Ok(v),
    }
}

/// Parses an amount given in P (`500`, `0.5`, `500P`) into TFLOPS.
pub fn p_amount(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let number = t.strip_suffix(['P', 'p']).unwrap_or(t).trim_end();
    thousandths(number)
        .map(|v| v * TFLOPS_PER_P / 1000)
        .ok_or_else(|| {
            format!("{text:?}: expected an amount of P (500 or 0.5; 1P = 1000 TFLOPS), at most 3 decimals")
        })
}

/// A point in time from the command line: absolute, or relative to when the command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeArg {
    /// Milliseconds since the Unix epoch.
    At(u64),
    /// This many milliseconds from now.
    In(u64),
}

impl TimeArg {
    /// The time in milliseconds since the epoch, given the current time.
    pub fn resolve(self, now_unix_ms: u64) -> u64 {
        match self {
            TimeArg::At(ms) => ms,
            TimeArg::In(ms) => now_unix_ms.saturating_add(ms),
        }
    }
}

/// Parses an RFC 3339 time (`2025-03-01T08:00:00+08:00`) or a time relative to now (`+2h`).
pub fn time_arg(text: &str) -> Result<TimeArg, String> {
    match text.trim().strip_prefix('+') {
        Some(rel) => duration_ms(rel).map(TimeArg::In),
        None => time::parse_rfc3339(text.trim()).map(TimeArg::At),
    }
}

/// A request named on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestRef {
    /// A full name, `tenants/{tenant}/requests/{request}`.
    Name(String),
    /// A bare id; the name is built from the caller's tenant.
    Id(u64),
}

/// Parses a request id (`12`) or full name (`tenants/acme/requests/12`).
pub fn request_ref(text: &str) -> Result<RequestRef, String> {
    let bad =
        || format!("{text:?}: expected a request id (12) or name (tenants/TENANT/requests/12)");
    let t = text.trim();
    let is_id = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if is_id(t) {
        return t.parse().map(RequestRef::Id).map_err(|_| bad());
    }
    match t.split('/').collect::<Vec<_>>().as_slice() {
        ["tenants", tenant, "requests", id] if !tenant.is_empty() && is_id(id) => {
            Ok(RequestRef::Name(t.to_string()))
        }
        _ => Err(bad()),
    }
}

/// The full name of a tenant's request.
pub fn request_name(tenant: &str, id: u64) -> String {
    format!("tenants/{tenant}/requests/{id}")
}

/// The full name of a pool given its id or its name.
pub fn pool_name(text: &str) -> String {
    if text.starts_with("pools/") {
        text.to_string()
    } else {
        format!("pools/{text}")
    }
}

/// A fresh idempotency key: a random (version 4) UUID.
pub fn new_request_id() -> String {
    let mut bits: u128 = rand::random();
    bits = (bits & !(0xf << 76)) | (0x4 << 76);
    bits = (bits & !(0x3 << 62)) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_ms("2h"), Ok(7_200_000));
        assert_eq!(duration_ms("90m"), Ok(5_400_000));
        assert_eq!(duration_ms("45s"), Ok(45_000));
        assert_eq!(duration_ms("1d"), Ok(86_400_000));
        assert_eq!(duration_ms("500ms"), Ok(500));
        assert_eq!(duration_ms("1h30m"), Ok(5_400_000));
        assert_eq!(duration_ms("2H"), Ok(7_200_000));
        assert_eq!(duration_ms("0s"), Ok(0));
    }

    #[test]
    fn bad_durations_say_what_is_expected() {
        for bad in [
            "",
            "90",
            "h",
            "2w",
            "1.5h",
            "-1h",
            "2h-",
            "99999999999999999999d",
        ] {
            let err = duration_ms(bad).unwrap_err();
            assert!(err.contains("unit"), "{bad}: {err}");
        }
        assert!(
            positive_duration_ms("0m")
                .unwrap_err()
                .contains("longer than zero")
        );
    }

    #[test]
    fn gang_shapes() {
        assert_eq!(
            gang("2x8"),
            Ok(GangShape {
                nodes: 2,
                devices_per_node: 8
            })
        );
        assert_eq!(
            gang("1X16"),
            Ok(GangShape {
                nodes: 1,
                devices_per_node: 16
            })
        );
        assert!(gang("2x").unwrap_err().contains("expected NODESxDEVICES"));
        assert!(gang("x8").unwrap_err().contains("expected NODESxDEVICES"));
        assert!(gang("28").unwrap_err().contains("expected NODESxDEVICES"));
        assert!(gang("-1x8").unwrap_err().contains("expected NODESxDEVICES"));
        assert!(
            gang("0x8")
                .unwrap_err()
                .contains("nodes must be at least 1")
        );
        assert!(gang("2x0").unwrap_err().contains("1 to 16"));
        assert!(gang("2x17").unwrap_err().contains("1 to 16"));
    }

    #[test]
    fn amounts_of_compute() {
        assert_eq!(tflops("5P"), Ok(5000));
        assert_eq!(tflops("5p"), Ok(5000));
        assert_eq!(tflops("1.5P"), Ok(1500));
        assert_eq!(tflops("0.25P"), Ok(250));
        assert_eq!(tflops("1500"), Ok(1500));
        assert_eq!(tflops("1500T"), Ok(1500));
        assert_eq!(tflops("1500tflops"), Ok(1500));
        assert_eq!(tflops("0"), Ok(0));
        for bad in ["", "P", "1.5", "1.2345P", "-5P", "5 PF", "five"] {
            assert!(tflops(bad).is_err(), "{bad}");
        }
        assert!(positive_tflops("0P").is_err());
        assert_eq!(p_amount("500"), Ok(500_000));
        assert_eq!(p_amount("0.5"), Ok(500));
        assert_eq!(p_amount("12.5P"), Ok(12_500));
        assert!(p_amount("0.0001").is_err());
    }

    #[test]
    fn times() {
        assert_eq!(time_arg("+2h"), Ok(TimeArg::In(7_200_000)));
        assert_eq!(time_arg("1970-01-01T08:00:01+08:00"), Ok(TimeArg::At(1000)));
        assert_eq!(TimeArg::In(5).resolve(10), 15);
        assert_eq!(TimeArg::At(5).resolve(10), 5);
        assert!(time_arg("tomorrow").is_err());
        assert!(time_arg("+2").is_err());
    }

    #[test]
    fn request_names() {
        assert_eq!(request_ref("12"), Ok(RequestRef::Id(12)));
        assert_eq!(
            request_ref("tenants/acme/requests/12"),
            Ok(RequestRef::Name("tenants/acme/requests/12".into()))
        );
        for bad in [
            "",
            "-1",
            "tenants/acme/requests/",
            "tenants//requests/12",
            "tenants/acme/requests/x",
            "pools/acme/requests/12",
            "tenants/acme/requests/12/x",
        ] {
            assert!(request_ref(bad).is_err(), "{bad}");
        }
        assert_eq!(request_name("acme", 7), "tenants/acme/requests/7");
        assert_eq!(pool_name("futian-aicc"), "pools/futian-aicc");
        assert_eq!(pool_name("pools/futian-aicc"), "pools/futian-aicc");
    }

    #[test]
    fn request_ids_are_fresh_uuids() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
    }
}
