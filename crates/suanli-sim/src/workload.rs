//! Workloads by name: `philly`, `synthetic` or `synthetic:N`, or the path of a CSV trace; and
//! fleets by name (`futian-2024`, `futian-2025`) or by the path of a fleet file.

use suanli_core::fleet::{FUTIAN_2024, FUTIAN_2025};
use suanli_core::{Catalogue, Fleet};

use crate::error::SimError;
use crate::job::Job;
use crate::philly::philly;
use crate::synthetic::{Synthetic, SyntheticConfig};
use crate::trace::{Trace, parse_csv};

/// Jobs synthesised by `--trace synthetic` without a count.
pub const DEFAULT_SYNTHETIC_JOBS: u64 = 100_000;

/// A workload ready to run: its tenants and its jobs in arrival order.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Name for reports.
    pub name: String,
    /// Tenant names; jobs index this list.
    pub tenants: Vec<String>,
    /// Trace rows left out (with `skip_bad_rows`), with their errors.
    pub skipped: Vec<crate::error::RowError>,
    /// The jobs.
    pub jobs: Jobs,
}

/// The jobs of a workload: read from a trace, or generated as they are needed.
#[derive(Clone, Debug)]
pub enum Jobs {
    /// Read from a trace, sorted by arrival.
    Trace(std::vec::IntoIter<Job>),
    /// Generated on the fly, in arrival order.
    Synthetic(Box<Synthetic>),
}

impl Iterator for Jobs {
    type Item = Job;

    fn next(&mut self) -> Option<Job> {
        match self {
            Jobs::Trace(it) => it.next(),
            Jobs::Synthetic(g) => g.next(),
        }
    }
}

impl Workload {
    /// A workload of a parsed trace.
    pub fn from_trace(trace: Trace) -> Self {
        Workload {
            name: trace.name,
            tenants: trace.tenants,
            skipped: trace.skipped,
            jobs: Jobs::Trace(trace.jobs.into_iter()),
        }
    }

    /// A synthetic workload.
    pub fn synthetic(config: SyntheticConfig, catalogue: &Catalogue) -> Result<Self, SimError> {
        let jobs = config.jobs;
        let generator = Synthetic::new(config, catalogue)?;
        Ok(Workload {
            name: format!("synthetic:{jobs}"),
            tenants: generator.tenant_names(),
            skipped: Vec::new(),
            jobs: Jobs::Synthetic(Box::new(generator)),
        })
    }

    /// Resolves a `--trace` value: `philly`, `synthetic[:N]` (seeded by `seed`), or a CSV path.
    pub fn by_name(
        spec: &str,
        seed: u64,
        catalogue: &Catalogue,
        skip_bad_rows: bool,
    ) -> Result<Self, SimError> {
        if spec == "philly" {
            return Ok(Workload::from_trace(philly()?));
        }
        if let Some(rest) = spec.strip_prefix("synthetic") {
            let jobs = match rest.strip_prefix(':') {
                None if rest.is_empty() => DEFAULT_SYNTHETIC_JOBS,
                Some(n) => n
                    .replace('_', "")
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        SimError::option("trace", format!("{n:?} is not a positive job count"))
                    })?,
                None => return Workload::csv(spec, catalogue, skip_bad_rows),
            };
            return Workload::synthetic(SyntheticConfig::philly_fit(jobs, seed), catalogue);
        }
        Workload::csv(spec, catalogue, skip_bad_rows)
    }

    fn csv(path: &str, catalogue: &Catalogue, skip_bad_rows: bool) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
            path: path.to_string(),
            source,
        })?;
        Ok(Workload::from_trace(parse_csv(
            path,
            &text,
            catalogue,
            skip_bad_rows,
        )?))
    }
}

/// Resolves a `--fleet` value: `futian-2024`, `futian-2025`, or the path of a fleet file.
pub fn fleet_by_name(spec: &str, catalogue: &Catalogue) -> Result<Fleet, SimError> {
    let text = match spec {
        "futian-2024" => FUTIAN_2024.to_string(),
        "futian-2025" => FUTIAN_2025.to_string(),
        path => std::fs::read_to_string(path).map_err(|source| SimError::Io {
            path: path.to_string(),
            source,
        })?,
    };
    Fleet::from_toml(&text, catalogue).map_err(|source| SimError::Fleet {
        fleet: spec.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve() {
        let c = Catalogue::builtin();
        assert_eq!(
            Workload::by_name("synthetic:1_000", 1, &c, false)
                .unwrap()
                .jobs
                .count(),
            1000
        );
        assert!(matches!(
            Workload::by_name("synthetic:0", 1, &c, false),
            Err(SimError::Option {
                option: "trace",
                ..
            })
        ));
        assert!(matches!(
            Workload::by_name("no/such/file.csv", 1, &c, false),
            Err(SimError::Io { .. })
        ));
        assert_eq!(fleet_by_name("futian-2025", &c).unwrap().pools.len(), 238);
        assert!(matches!(
            fleet_by_name("no-such-fleet.toml", &c),
            Err(SimError::Io { .. })
        ));
    }
}
