//! The Philly trace: the last 15,000 jobs of Microsoft's Philly GPU cluster (CC BY 4.0; the copy
//! and its attribution are in `deploy/traces/philly-15k/`), compiled into the crate so
//! `suanli sim --trace philly` works on a fresh clone.
//!
//! How a Philly row becomes a job:
//! - arrival: the running sum of `interval` (seconds since the previous submission);
//! - duration: `run_time` seconds, whatever the job's final status (a failed or killed job held
//!   its GPUs for that long too);
//! - tenant: `user`;
//! - size: `gpu_num` devices, each of any model at least as large as the reference
//!   (312 TFLOPS by default, the A100/A800 class: see [`crate::job::RequestRule`]), so one
//!   Philly GPU counts as `reference_tflops` / 1000 P. The trace names no model; its P100/P40
//!   GPUs would be far smaller, but the question the simulator answers is how today's jobs of
//!   that shape load today's fleet;
//! - shape: a gang on the fewest nodes of 8 devices (`node_num` records how Philly's scheduler
//!   happened to scatter the job, not what it needed); priority standard, no deadline.

use suanli_core::{Millis, Priority};

use crate::error::{RowError, SimError};
use crate::job::{Job, JobShape};
use crate::trace::{TenantNames, Trace};

/// The committed copy of the trace.
pub const PHILLY_15K: &str = include_str!("../../../deploy/traces/philly-15k/philly-15k.csv");

/// The built-in Philly trace as jobs.
pub fn philly() -> Result<Trace, SimError> {
    parse_philly("philly", PHILLY_15K)
}

/// Parses a file in the Philly cut's format
/// (`u_id,user,gpu_num,cpu_num,node_num,interval,run_time,wall_time,new_status`).
pub fn parse_philly(name: &str, text: &str) -> Result<Trace, SimError> {
    const HEADER: [&str; 9] = [
        "u_id",
        "user",
        "gpu_num",
        "cpu_num",
        "node_num",
        "interval",
        "run_time",
        "wall_time",
        "new_status",
    ];
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = lines
        .next()
        .map(|(_, l)| l.split(',').map(str::trim).collect())
        .unwrap_or_default();
    if header != HEADER {
        return Err(SimError::Trace {
            trace: name.to_string(),
            reason: format!("the header is not {}", HEADER.join(",")),
        });
    }
    let mut tenants = TenantNames::default();
    let mut trace = Trace::new(name);
    let mut clock_s: u64 = 0;
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let row_err = |col: usize, reason: String| SimError::Row {
            trace: name.to_string(),
            error: RowError {
                line: i + 1,
                column: HEADER.get(col).unwrap_or(&"?").to_string(),
                reason,
            },
        };
        if f.len() != HEADER.len() {
            return Err(row_err(
                f.len().min(HEADER.len() - 1),
                format!("{} fields where the header has {}", f.len(), HEADER.len()),
            ));
        }
        let number = |col: usize| -> Result<u64, SimError> {
            f[col]
                .parse::<u64>()
                .map_err(|_| row_err(col, format!("{:?} is not a whole number", f[col])))
        };
        clock_s = clock_s.saturating_add(number(5)?);
        let gpus = number(2)?;
        if gpus == 0 || gpus > 1_000_000 {
            return Err(row_err(
                2,
                format!("{gpus} GPUs is out of range 1..=1000000"),
            ));
        }
        let run_s = number(6)?;
        if f[1].is_empty() {
            return Err(row_err(1, "must not be empty".into()));
        }
        trace.jobs.push(Job {
            submit_ms: clock_s.saturating_mul(1000) as Millis,
            duration_ms: run_s.max(1).saturating_mul(1000),
            devices: gpus as u32,
            nodes: None,
            model: None,
            tenant: tenants.intern(f[1]),
            priority: Priority::Standard,
            shape: JobShape::Gang,
            deadline_after_ms: None,
        });
    }
    trace.tenants = tenants.into_names();
    trace.sort();
    Ok(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_copy_has_the_documented_figures() {
        let t = philly().unwrap();
        assert_eq!(t.jobs.len(), 15_000);
        assert_eq!(t.tenants.len(), 136);
        let gpu_hours: u64 = t
            .jobs
            .iter()
            .map(|j| j.devices as u64 * j.duration_ms / 1000)
            .sum::<u64>()
            / 3600;
        assert_eq!(gpu_hours, 765_763);
        let span_days = t.jobs.last().unwrap().submit_ms as f64 / 86_400_000.0;
        assert!((span_days - 57.6).abs() < 0.05, "{span_days}");
    }

    #[test]
    fn bad_rows_name_line_and_column() {
        let text = "u_id,user,gpu_num,cpu_num,node_num,interval,run_time,wall_time,new_status\n\
                    0,1,1,0,1,0,100,0,Pass\n1,2,x,0,1,5,100,0,Pass\n";
        match parse_philly("p", text) {
            Err(SimError::Row { error, .. }) => {
                assert_eq!((error.line, error.column.as_str()), (3, "gpu_num"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_philly("p", "a,b\n"),
            Err(SimError::Trace { .. })
        ));
    }
}
