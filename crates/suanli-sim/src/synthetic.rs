//! The seeded synthetic workload. By default its distributions are fitted to the Philly trace
//! (`deploy/traces/philly-15k/`), so a million synthetic jobs look like Philly's 15,000:
//!
//! | what | distribution | fitted to Philly |
//! |---|---|---|
//! | arrivals, bursty (default) | with probability 0.287 a job arrives with the previous one (a batch); otherwise after a log-normal gap, σ = 1.954, μ set so the mean gap is 331.8 s | 28.7% of Philly's gaps are 0; σ of the log of the non-zero gaps; mean gap over the 15,000 jobs |
//! | arrivals, Poisson | exponential gaps, mean 331.8 s | mean gap |
//! | devices | 1: 79.75%, 2: 2.5%, 4: 6.03%, 8: 9.85%, 16: 1.62%, 28: 0.01%, 32: 0.22%, 48: 0.02% | Philly's `gpu_num` counts |
//! | duration | Philly's own run times of jobs of the same size class (1, 2-4, 5-8, more devices), drawn by inverse transform: a uniform rank, interpolated log-linearly between neighbouring order statistics | the empirical distribution itself (median 289 s, mean 20.8 h, up to 60 days): no parametric family fits its two humps |
//! | tenants | 136, Zipf with exponent 1.0 (tenant k submits ∝ 1/k) | 136 users; least-squares fit of the users' job shares |
//!
//! Philly says nothing about the rest; these are assumptions, documented and configurable:
//! 80% gangs and 20% elastic jobs; priorities 5% critical, 75% standard, 20% spot; 70% of jobs
//! take any model of at least the reference size and 30% name one model, drawn by the models'
//! share of the futian-2025 fleet's TFLOPS among the models both Futian fleets have (Ascend
//! 910B 32%, H800 31% (with H200's share), RTX 4090 7%, H100 7%, A800 7%, H20 5%, MI300X 4%,
//! L40S 4%, A100 2%); no deadlines.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use suanli_core::{Catalogue, Millis, ModelIx, Priority};

use crate::error::SimError;
use crate::job::{Job, JobShape};

/// How jobs arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrivals {
    /// Batches and log-normal gaps, as in Philly.
    Bursty,
    /// A Poisson process.
    Poisson,
}

/// Philly's job sizes: (devices, jobs of that size among 15,000).
pub const PHILLY_SIZES: [(u32, u32); 8] = [
    (1, 11_963),
    (2, 375),
    (4, 905),
    (8, 1_477),
    (16, 243),
    (28, 1),
    (32, 33),
    (48, 3),
];

/// Named-model mix: catalogue id and weight (per mille).
pub const MODEL_MIX: [(&str, u32); 9] = [
    ("ascend-910b", 318),
    ("h800", 308),
    ("rtx4090", 73),
    ("h100", 73),
    ("a800", 72),
    ("h20", 52),
    ("mi300x", 45),
    ("l40s", 36),
    ("a100", 16),
];

/// The generator's settings. [`SyntheticConfig::philly_fit`] gives the defaults above.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticConfig {
    /// Jobs to generate.
    pub jobs: u64,
    /// Seed of the random stream.
    pub seed: u64,
    /// Arrival process.
    pub arrivals: Arrivals,
    /// Mean gap between arrivals, in seconds.
    pub mean_gap_s: f64,
    /// Bursty arrivals: probability that a job arrives with the previous one.
    pub batch_probability: f64,
    /// Bursty arrivals: σ of the log of the non-zero gaps.
    pub gap_sigma: f64,
    /// Number of tenants.
    pub tenants: u32,
    /// Zipf exponent of the tenants' shares of jobs.
    pub tenant_zipf: f64,
    /// Share of gangs; the rest are elastic.
    pub gang_fraction: f64,
    /// Shares of critical and spot jobs; the rest are standard.
    pub critical_fraction: f64,
    /// Share of spot jobs.
    pub spot_fraction: f64,
    /// Share of jobs that name one model (drawn from [`MODEL_MIX`]).
    pub named_model_fraction: f64,
    /// Longest run time, in seconds: longer draws are cut to it (as a platform that makes
    /// long training runs checkpoint and resubmit would). Philly's longest is 60 days.
    pub max_duration_s: f64,
}

impl SyntheticConfig {
    /// The defaults fitted to Philly (see the module documentation).
    pub fn philly_fit(jobs: u64, seed: u64) -> Self {
        SyntheticConfig {
            jobs,
            seed,
            arrivals: Arrivals::Bursty,
            mean_gap_s: 331.8,
            batch_probability: 0.287,
            gap_sigma: 1.954,
            tenants: 136,
            tenant_zipf: 1.0,
            gang_fraction: 0.8,
            critical_fraction: 0.05,
            spot_fraction: 0.20,
            named_model_fraction: 0.3,
            max_duration_s: 60.0 * 86_400.0,
        }
    }

    fn validate(&self) -> Result<(), SimError> {
        let fraction = |name: &'static str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(SimError::option(name, format!("{v} is not within 0..=1")))
            }
        };
        fraction("batch_probability", self.batch_probability)?;
        fraction("gang_fraction", self.gang_fraction)?;
        fraction("critical_fraction", self.critical_fraction)?;
        fraction("spot_fraction", self.spot_fraction)?;
        fraction("named_model_fraction", self.named_model_fraction)?;
        if self.critical_fraction + self.spot_fraction > 1.0 {
            return Err(SimError::option(
                "spot_fraction",
                "critical and spot shares add up to more than 1",
            ));
        }
        if !(self.mean_gap_s.is_finite() && self.mean_gap_s > 0.0) {
            return Err(SimError::option("mean_gap_s", "must be positive"));
        }
        if !(self.gap_sigma.is_finite() && self.gap_sigma >= 0.0) {
            return Err(SimError::option("gap_sigma", "must not be negative"));
        }
        if !(self.max_duration_s.is_finite() && self.max_duration_s >= 1.0) {
            return Err(SimError::option(
                "max_duration_s",
                "must be at least 1 second",
            ));
        }
        if self.tenants == 0 {
            return Err(SimError::option("tenants", "at least one tenant"));
        }
        if !self.tenant_zipf.is_finite() || self.tenant_zipf < 0.0 {
            return Err(SimError::option("tenant_zipf", "must not be negative"));
        }
        Ok(())
    }
}

/// The generator: an endless-until-`jobs` iterator of jobs in arrival order.
#[derive(Clone, Debug)]
pub struct Synthetic {
    config: SyntheticConfig,
    rng: ChaCha8Rng,
    emitted: u64,
    clock_s: f64,
    /// Cumulative tenant weights (Zipf).
    tenant_cdf: Vec<f64>,
    /// (model, cumulative weight) of the named-model mix, models the catalogue knows.
    models: Vec<(ModelIx, u32)>,
    /// μ of the log-normal non-zero gap.
    gap_mu: f64,
    /// Philly's run times in seconds, sorted, per size class.
    run_times: [Vec<f64>; 4],
}

fn size_class(devices: u32) -> usize {
    match devices {
        0..=1 => 0,
        2..=4 => 1,
        5..=8 => 2,
        _ => 3,
    }
}

/// Philly's run times by size class, sorted.
fn philly_run_times() -> Result<[Vec<f64>; 4], SimError> {
    let mut classes: [Vec<f64>; 4] = Default::default();
    for job in crate::philly::philly()?.jobs {
        classes[size_class(job.devices)].push(job.duration_ms as f64 / 1000.0);
    }
    for c in &mut classes {
        c.sort_by(f64::total_cmp);
    }
    Ok(classes)
}

impl Synthetic {
    /// A generator; fails on out-of-range settings.
    pub fn new(config: SyntheticConfig, catalogue: &Catalogue) -> Result<Self, SimError> {
        config.validate()?;
        let mut total = 0.0;
        let tenant_cdf = (1..=config.tenants)
            .map(|k| {
                total += 1.0 / (k as f64).powf(config.tenant_zipf);
                total
            })
            .collect();
        let mut cumulative = 0;
        let models = MODEL_MIX
            .iter()
            .filter_map(|(id, w)| {
                cumulative += w;
                catalogue.lookup(id).map(|m| (m, cumulative))
            })
            .collect();
        // A non-zero gap has mean exp(μ + σ²/2); batches make the mean over all gaps
        // (1 - p) times that.
        let nonzero_mean = config.mean_gap_s / (1.0 - config.batch_probability).max(1e-9);
        let gap_mu = nonzero_mean.ln() - config.gap_sigma * config.gap_sigma / 2.0;
        Ok(Synthetic {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            config,
            emitted: 0,
            clock_s: 0.0,
            tenant_cdf,
            models,
            gap_mu,
            run_times: philly_run_times()?,
        })
    }

    /// Tenant names: `tenant-001` upwards, the most active first.
    pub fn tenant_names(&self) -> Vec<String> {
        (1..=self.config.tenants)
            .map(|k| format!("tenant-{k:03}"))
            .collect()
    }

    /// A standard normal draw (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1: f64 = 1.0 - self.rng.random::<f64>();
        let u2: f64 = self.rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    fn gap_s(&mut self) -> f64 {
        match self.config.arrivals {
            Arrivals::Poisson => -(1.0 - self.rng.random::<f64>()).ln() * self.config.mean_gap_s,
            Arrivals::Bursty => {
                if self.rng.random_bool(self.config.batch_probability) {
                    0.0
                } else {
                    (self.gap_mu + self.config.gap_sigma * self.normal()).exp()
                }
            }
        }
    }

    fn devices(&mut self) -> u32 {
        let total: u32 = PHILLY_SIZES.iter().map(|(_, n)| n).sum();
        let mut pick = self.rng.random_range(0..total);
        for (devices, n) in PHILLY_SIZES {
            if pick < n {
                return devices;
            }
            pick -= n;
        }
        1
    }

    fn duration_s(&mut self, devices: u32) -> f64 {
        let u: f64 = self.rng.random::<f64>();
        let sorted = &self.run_times[size_class(devices)];
        if sorted.len() < 2 {
            return sorted.first().copied().unwrap_or(1.0);
        }
        let pos = u * (sorted.len() - 1) as f64;
        let i = (pos as usize).min(sorted.len() - 2);
        let frac = pos - i as f64;
        let (a, b) = (sorted[i].max(1.0).ln(), sorted[i + 1].max(1.0).ln());
        (a + frac * (b - a)).exp()
    }

    fn tenant(&mut self) -> u32 {
        let total = self.tenant_cdf.last().copied().unwrap_or(1.0);
        let x = self.rng.random::<f64>() * total;
        self.tenant_cdf
            .partition_point(|&c| c <= x)
            .min(self.tenant_cdf.len() - 1) as u32
    }

    fn model(&mut self) -> Option<ModelIx> {
        if self.models.is_empty() || !self.rng.random_bool(self.config.named_model_fraction) {
            return None;
        }
        let total = self.models.last().map_or(1, |m| m.1);
        let x = self.rng.random_range(0..total);
        self.models.iter().find(|(_, c)| x < *c).map(|(m, _)| *m)
    }
}

impl Iterator for Synthetic {
    type Item = Job;

    fn next(&mut self) -> Option<Job> {
        if self.emitted >= self.config.jobs {
            return None;
        }
        if self.emitted > 0 {
            self.clock_s += self.gap_s();
        }
        self.emitted += 1;
        let devices = self.devices();
        let duration_s = self.duration_s(devices).min(self.config.max_duration_s);
        let shape = if self.rng.random_bool(self.config.gang_fraction) {
            JobShape::Gang
        } else {
            JobShape::Elastic
        };
        let p = self.rng.random::<f64>();
        let priority = if p < self.config.critical_fraction {
            Priority::Critical
        } else if p < self.config.critical_fraction + self.config.spot_fraction {
            Priority::Spot
        } else {
            Priority::Standard
        };
        Some(Job {
            submit_ms: (self.clock_s * 1000.0) as Millis,
            duration_ms: (duration_s * 1000.0).round() as Millis,
            devices,
            nodes: None,
            model: self.model(),
            tenant: self.tenant(),
            priority,
            shape,
            deadline_after_ms: None,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.config.jobs - self.emitted) as usize;
        (left, Some(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(config: SyntheticConfig) -> Vec<Job> {
        Synthetic::new(config, &Catalogue::builtin())
            .unwrap()
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_jobs() {
        let a = jobs(SyntheticConfig::philly_fit(500, 7));
        assert_eq!(a, jobs(SyntheticConfig::philly_fit(500, 7)));
        assert_ne!(a, jobs(SyntheticConfig::philly_fit(500, 8)));
    }

    #[test]
    fn the_fit_reproduces_philly_statistics() {
        let js = jobs(SyntheticConfig::philly_fit(200_000, 1));
        let n = js.len() as f64;
        let mean_gap_s = js.last().unwrap().submit_ms as f64 / 1000.0 / (n - 1.0);
        assert!((mean_gap_s / 331.8 - 1.0).abs() < 0.1, "{mean_gap_s}");
        let single = js.iter().filter(|j| j.devices == 1).count() as f64 / n;
        assert!((single - 0.7975).abs() < 0.01, "{single}");
        let mut run: Vec<u64> = js.iter().map(|j| j.duration_ms / 1000).collect();
        run.sort_unstable();
        let median = run[run.len() / 2];
        assert!(
            (260..=320).contains(&median),
            "median run time {median} s, Philly 289 s"
        );
        let top = js.iter().filter(|j| j.tenant == 0).count() as f64 / n;
        assert!((0.15..0.22).contains(&top), "busiest tenant's share {top}");
        assert!(js.windows(2).all(|w| w[0].submit_ms <= w[1].submit_ms));
    }

    #[test]
    fn bad_settings_are_named() {
        let mut c = SyntheticConfig::philly_fit(10, 1);
        c.gang_fraction = 1.5;
        assert!(matches!(
            Synthetic::new(c, &Catalogue::builtin()),
            Err(SimError::Option {
                option: "gang_fraction",
                ..
            })
        ));
    }
}
