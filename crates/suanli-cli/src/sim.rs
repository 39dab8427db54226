//! `suanli sim`: one simulated run of a workload on a fleet, printed as a summary or as JSON;
//! `suanli sim compare`: the capacity-planning report over a grid of fleets, loads and policies.
//! Both take a subsidy policy (`--subsidy`): the compute voucher every tenant receives at the
//! start of a run, accounted by the billing ledger.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use suanli_billing::Fen;
use suanli_core::{Catalogue, Millis, Policy};
use suanli_sim::accounts::{SubsidyPolicy, parse_yuan};
use suanli_sim::compare::{GridConfig, run_grid, write_report};
use suanli_sim::job::DEFAULT_REFERENCE_TFLOPS;
use suanli_sim::{
    Failures, RequestRule, SimConfig, Steadiness, Summary, Workload, fleet_by_name, simulate,
};

use crate::client::GlobalArgs;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SimArgs {
    #[command(subcommand)]
    pub action: Option<SimAction>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum SimAction {
    /// Run the capacity-planning grid and write a Markdown report with SVG charts.
    Compare(CompareArgs),
}

/// One run.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Fleet: futian-2024, futian-2025, or the path of a fleet file.
    #[arg(long, default_value = "futian-2024", value_name = "FLEET")]
    pub fleet: String,
    /// Workload: philly, synthetic, synthetic:N (N jobs), or the path of a CSV trace.
    #[arg(long, default_value = "philly", value_name = "TRACE")]
    pub trace: String,
    /// The engine's default placement policy: cheapest, cheapest_after_subsidy,
    /// lowest_latency or best_fit.
    #[arg(long, default_value = "cheapest", value_parser = parse_policy, value_name = "POLICY")]
    pub policy: Policy,
    /// Divide arrival times by this (2 = twice the demand).
    #[arg(long, default_value_t = 1.0, value_parser = positive, value_name = "X")]
    pub load_factor: f64,
    /// Multiply every job's device count by this.
    #[arg(long, default_value_t = 1.0, value_parser = positive, value_name = "X")]
    pub size_factor: f64,
    /// TFLOPS of one device of a job that names no model (one Philly GPU).
    #[arg(long, default_value_t = DEFAULT_REFERENCE_TFLOPS, value_name = "TFLOPS")]
    pub reference_tflops: u64,
    /// Seed of the synthetic workload and of pool failures.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Fail pools at random with this mean time between failures, in hours (per pool).
    #[arg(long, value_parser = positive, value_name = "HOURS")]
    pub mtbf_hours: Option<f64>,
    /// Mean time to repair a failed pool, in hours.
    #[arg(long, default_value_t = 4.0, value_parser = positive, value_name = "HOURS")]
    pub mttr_hours: f64,
    /// Leave out bad rows of a CSV trace (counted and reported) instead of stopping.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Also print utilisation by pool (JSON always has it).
    #[arg(long)]
    pub by_pool: bool,
    /// Schedule at multiples of this many milliseconds of simulated time instead of at every
    /// lease end and arrival that calls for a pass, as a scheduler running at an interval does:
    /// a lease holds its capacity until the next tick.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=86_400_000), value_name = "MS")]
    pub tick_ms: Option<u64>,
    /// Make every scheduling pass walk every waiting request, instead of trying only the
    /// requests whose answer could have changed: the same decisions, slower (for comparison).
    #[arg(long)]
    pub full_passes: bool,
    /// Measure from this many hours after the first arrival (the fleet filling up is left
    /// out of utilisation, waits and the offered load) [default: from the first arrival].
    #[arg(long, value_parser = non_negative, value_name = "HOURS")]
    pub warmup_hours: Option<f64>,
    /// Turn away jobs arriving while this many wait (as the broker's max_waiting does) and go
    /// on with the rest [default: no limit].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), value_name = "JOBS")]
    pub queue_limit: Option<u64>,
    #[command(flatten)]
    pub subsidy: SubsidyArgs,
}

/// The subsidy policy of a run: one compute voucher per tenant, issued when the run starts and
/// valid for the whole run. Without `--subsidy` no voucher is issued and the subsidy is 0 (the
/// cost is still reported).
#[derive(Args, Debug, Clone)]
pub struct SubsidyArgs {
    /// Subsidy policy: every tenant gets one compute voucher at the start, valid for the whole
    /// run, paying RATE of each bill (50% or 0.5) on SCOPE: all (the default),
    /// local (the local centre and clouds), or pool kinds joined by + or , (local_centre,
    /// local_cloud, external). Example: --subsidy 50%@local.
    #[arg(long, value_parser = parse_subsidy, value_name = "RATE[@SCOPE]")]
    pub subsidy: Option<Box<SubsidyPolicy>>,
    /// Face value of each tenant's voucher, in yuan [default: unlimited].
    #[arg(long, requires = "subsidy", value_parser = parse_yuan, value_name = "YUAN")]
    pub subsidy_per_tenant: Option<Fen>,
    /// Most a voucher pays towards one lease, in yuan [default: no cap].
    #[arg(long, requires = "subsidy", value_parser = parse_yuan, value_name = "YUAN")]
    pub subsidy_cap_per_lease: Option<Fen>,
}

impl SubsidyArgs {
    fn policy(&self) -> Option<SubsidyPolicy> {
        self.subsidy.as_deref().map(|p| SubsidyPolicy {
            per_tenant: self.subsidy_per_tenant,
            per_lease_cap: self.subsidy_cap_per_lease,
            ..p.clone()
        })
    }
}

/// Boxed to keep the command-line enum small.
fn parse_subsidy(s: &str) -> Result<Box<SubsidyPolicy>, String> {
    SubsidyPolicy::parse(s).map(Box::new).map_err(|e| match e {
        suanli_sim::SimError::Option { reason, .. } => reason,
        other => other.to_string(),
    })
}

/// The grid of the capacity-planning report.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Output folder for report.md and the charts.
    #[arg(long, default_value = "sim-report", value_name = "DIR")]
    pub out: PathBuf,
    /// Fleets to compare, by name or path.
    #[arg(long, value_delimiter = ',', default_values_t = ["futian-2024".to_string(), "futian-2025".to_string()])]
    pub fleets: Vec<String>,
    /// Offered demand levels, in P [default: 5000,7500,10000,12500,15000,20000,25000].
    #[arg(long, value_delimiter = ',', value_parser = positive, value_name = "P,...")]
    pub demands: Vec<f64>,
    /// Policies [default: cheapest,lowest_latency,best_fit].
    #[arg(long, value_delimiter = ',', value_parser = parse_policy, value_name = "POLICY,...")]
    pub policies: Vec<Policy>,
    /// Hours of each run left out of the figures while the fleet fills up [default: the
    /// longest run time, --max-hours].
    #[arg(long, value_parser = non_negative, value_name = "HOURS")]
    pub warmup_hours: Option<f64>,
    /// Hours of arrivals measured after the warm-up: each run is fed the jobs arriving in
    /// warm-up plus measurement at its demand.
    #[arg(long, default_value_t = 192.0, value_parser = positive, value_name = "HOURS")]
    pub measure_hours: f64,
    /// Seed of the synthetic workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Multiply every job's device count by this.
    #[arg(long, default_value_t = 4.0, value_parser = positive, value_name = "X")]
    pub size_factor: f64,
    /// Cut run times to this many hours.
    #[arg(long, default_value_t = 48.0, value_parser = positive, value_name = "HOURS")]
    pub max_hours: f64,
    /// Runs at once [default: one per core].
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Turn away the jobs arriving while this many wait (the fleet is saturated), as the
    /// broker refuses submissions beyond its max_waiting.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_limit: u64,
    /// The subsidy policy of every run of the grid.
    #[command(flatten)]
    pub subsidy: SubsidyArgs,
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    Policy::from_name(s).ok_or_else(|| {
        format!("{s:?} is not cheapest, cheapest_after_subsidy, lowest_latency or best_fit")
    })
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a number of at least 0")),
    }
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

pub fn run(g: &GlobalArgs, a: &SimArgs) -> anyhow::Result<()> {
    match &a.action {
        Some(SimAction::Compare(c)) => compare(g, c),
        None => single(g, &a.run),
    }
}

fn single(g: &GlobalArgs, a: &RunArgs) -> anyhow::Result<()> {
    let catalogue = Catalogue::builtin();
    let fleet = fleet_by_name(&a.fleet, &catalogue)?;
    let workload = Workload::by_name(&a.trace, a.seed, &catalogue, a.skip_bad_rows)?;
    let skipped = workload.skipped.clone();
    let config = SimConfig {
        policy: a.policy,
        rule: RequestRule {
            reference_tflops: a.reference_tflops,
            load_factor: a.load_factor,
            size_factor: a.size_factor,
        },
        seed: a.seed,
        failures: a.mtbf_hours.map(|mtbf_h| Failures {
            mtbf_h,
            mttr_h: a.mttr_hours,
        }),
        record_commands: false,
        max_waiting: None,
        queue_limit: a.queue_limit,
        warmup_ms: a.warmup_hours.map_or(0, |h| (h * 3.6e6).round() as Millis),
        subsidy: a.subsidy.policy(),
        tick_interval_ms: a.tick_ms,
        full_passes: a.full_passes,
    };
    let finished = simulate(&fleet, &catalogue, workload, &config).context("simulation")?;
    let s = &finished.summary;
    if g.json {
        println!("{}", serde_json::to_string_pretty(s)?);
    } else {
        print!("{}", human(s, a.by_pool));
        for e in skipped.iter().take(10) {
            eprintln!("skipped: {e}");
        }
        if skipped.len() > 10 {
            eprintln!("skipped: ... and {} more rows", skipped.len() - 10);
        }
    }
    Ok(())
}

fn duration(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} d", s / 86_400.0)
    }
}

/// The readable summary of one run.
fn human(s: &Summary, by_pool: bool) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let pct = |x: f64| format!("{:.1}%", x * 100.0);
    let _ = writeln!(
        o,
        "fleet {} ({:.0}P), workload {}, policy {}, load x{}, size x{}, seed {}{}",
        s.fleet,
        s.capacity_p,
        s.workload,
        s.policy,
        s.load_factor,
        s.size_factor,
        s.seed,
        s.tick_interval_ms
            .map_or_else(String::new, |ms| format!(", a pass every {ms} ms"))
    );
    let _ = writeln!(
        o,
        "offered demand {:.0}P over {:.1} days of arrivals measured{}; run {:.1} days; {}",
        s.offered_p,
        s.window_h / 24.0,
        if s.warmup_h > 0.0 {
            format!(" after a warm-up of {:.1} h", s.warmup_h)
        } else {
            String::new()
        },
        s.makespan_h / 24.0,
        match s.steadiness {
            Steadiness::Steady => "steady state".to_string(),
            Steadiness::Filling => "NOT steady: utilisation still rising (warm up longer)".into(),
            Steadiness::Saturated =>
                "saturated: the queue grows, or arrivals were turned away".into(),
            Steadiness::TooShort => "too short to tell a steady state".into(),
        }
    );
    let _ = writeln!(
        o,
        "jobs {}: submitted {}, rejected {}, placed {}, completed {}, failed {}, unserved {}, requeues {}, skipped rows {}{}",
        s.jobs,
        s.submitted,
        s.rejected,
        s.placed,
        s.completed,
        s.failed,
        s.unserved,
        s.requeues,
        s.skipped_rows,
        if s.saturated {
            format!("; saturated: {} jobs not fed", s.not_submitted)
        } else if s.turned_away > 0 {
            format!(
                "; turned away at the queue's limit: {} ({:.1}% of the window's arrivals)",
                s.turned_away,
                s.turned_away_share * 100.0
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        o,
        "utilisation {} (local {}, external {})",
        pct(s.utilisation),
        pct(s.utilisation_local),
        pct(s.utilisation_external)
    );
    let models: Vec<String> = s
        .utilisation_by_model
        .iter()
        .map(|(m, u)| format!("{m} {}", pct(*u)))
        .collect();
    let _ = writeln!(o, "  by model: {}", models.join(", "));
    let _ = writeln!(
        o,
        "wait mean {}, p50 {}, p95 {}, p99 {}, max {}",
        duration(s.wait_mean_s),
        duration(s.wait_p50_s),
        duration(s.wait_p95_s),
        duration(s.wait_p99_s),
        duration(s.wait_max_s)
    );
    let _ = writeln!(
        o,
        "job completion mean {}, p50 {}, p99 {}; bounded slowdown {:.2}",
        duration(s.jct_mean_s),
        duration(s.jct_p50_s),
        duration(s.jct_p99_s),
        s.bounded_slowdown_mean
    );
    let _ = writeln!(
        o,
        "Jain's fairness {:.3}; fragmentation {} ({} samples), stranded {:.0}P on average",
        s.jain_fairness,
        pct(s.fragmentation),
        s.fragmentation_samples,
        s.stranded_p
    );
    let _ = writeln!(
        o,
        "cost {} over {} leases; subsidy {} ({} of the cost: local centre {}, local cloud {}, external {}); tenants paid {}",
        yuan(s.cost_fen),
        s.leases_settled,
        yuan(s.subsidy_fen),
        pct(s.subsidy_share),
        kind_yuan(s, "local_centre"),
        kind_yuan(s, "local_cloud"),
        kind_yuan(s, "external"),
        yuan(s.tenant_paid_fen)
    );
    match &s.subsidy_policy {
        Some(policy) => {
            let _ = writeln!(
                o,
                "subsidy policy: {policy}; {} vouchers issued{}, {} exhausted",
                s.vouchers_issued,
                s.vouchers_face_yuan
                    .map(|f| format!(" (face value {} in all)", yuan((f * 100.0).round() as i64)))
                    .unwrap_or_default(),
                s.vouchers_exhausted
            );
        }
        None => {
            let _ = writeln!(o, "subsidy policy: none (see --subsidy)");
        }
    }
    if s.leases_open_at_end > 0 {
        let _ = writeln!(
            o,
            "{} leases still held at the end of the run were charged up to it",
            s.leases_open_at_end
        );
    }
    let _ = writeln!(o, "digest {}", s.digest);
    if by_pool {
        for (pool, u) in &s.utilisation_by_pool {
            let _ = writeln!(o, "  {pool:<28} {}", pct(*u));
        }
    }
    o
}

/// An amount in fen as yuan with two decimals and thousands separators: `12,345.67 CNY`.
fn yuan(fen: i64) -> String {
    let text = Fen(fen).yuan_decimal();
    let (sign, digits) = match text.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", text.as_str()),
    };
    let (whole, cents) = digits.split_once('.').unwrap_or((digits, "00"));
    let mut grouped = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{sign}{grouped}.{cents} CNY")
}

fn kind_yuan(s: &Summary, kind: &str) -> String {
    let y = s.subsidy_by_pool_kind.get(kind).copied().unwrap_or(0.0);
    yuan((y * 100.0).round() as i64)
}

fn compare(g: &GlobalArgs, a: &CompareArgs) -> anyhow::Result<()> {
    let catalogue = Catalogue::builtin();
    let mut config = GridConfig {
        fleets: a.fleets.clone(),
        size_factor: a.size_factor,
        threads: a.threads,
        queue_limit: a.queue_limit,
        subsidy: a.subsidy.policy(),
        measure_h: a.measure_hours,
        warmup_h: a.warmup_hours.unwrap_or(a.max_hours),
        ..GridConfig::default()
    };
    if !a.demands.is_empty() {
        config.demands_p = a.demands.clone();
    }
    if !a.policies.is_empty() {
        config.policies = a.policies.clone();
    }
    config.workload.seed = a.seed;
    config.workload.max_duration_s = a.max_hours * 3600.0;
    let started = Instant::now();
    let bar = Progress::new(!g.json && std::io::stderr().is_terminal());
    let runs = run_grid(&config, &catalogue, &|done, total| {
        bar.show(done, total, started)
    })
    .context("capacity-planning grid")?;
    bar.finish();
    write_report(&a.out, &config, &runs)?;
    let report = a.out.join("report.md");
    if g.json {
        let summaries: Vec<&Summary> = runs.iter().map(|r| &r.summary).collect();
        println!("{}", serde_json::to_string_pretty(&summaries)?);
    } else {
        println!(
            "{} runs in {:.1} s; report: {}",
            runs.len(),
            started.elapsed().as_secs_f64(),
            report.display()
        );
    }
    Ok(())
}

/// A one-line progress bar on stderr, drawn only on a terminal.
struct Progress {
    on: bool,
}

impl Progress {
    fn new(on: bool) -> Self {
        Progress { on }
    }

    fn show(&self, done: usize, total: usize, started: Instant) {
        if !self.on || total == 0 {
            return;
        }
        const WIDTH: usize = 30;
        let filled = done * WIDTH / total;
        let elapsed = started.elapsed().as_secs_f64();
        let left = elapsed / done.max(1) as f64 * (total - done) as f64;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r[{}{}] {done}/{total} runs, {elapsed:.0} s, about {left:.0} s left ",
            "#".repeat(filled),
            " ".repeat(WIDTH - filled)
        );
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.on {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    fn parse(args: &[&str]) -> Result<SimArgs, String> {
        Cli::try_parse_from(std::iter::once("sim").chain(args.iter().copied()))
            .map(|c| c.sim)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn subsidy_options_make_a_policy() {
        let a = parse(&[
            "--subsidy",
            "50%@local",
            "--subsidy-per-tenant",
            "10000",
            "--subsidy-cap-per-lease",
            "99.5",
        ])
        .unwrap();
        let p = a.run.subsidy.policy().unwrap();
        assert_eq!(p.rate_bp, 5_000);
        assert_eq!(p.per_tenant, Some(Fen(1_000_000)));
        assert_eq!(p.per_lease_cap, Some(Fen(9_950)));
        assert_eq!(
            p.to_string(),
            "50% on local pools, ¥10000.00 per tenant, at most ¥99.50 per lease"
        );
        assert!(parse(&[]).unwrap().run.subsidy.policy().is_none());
        let c = parse(&["compare", "--subsidy", "0.3@external"]).unwrap();
        let Some(SimAction::Compare(c)) = c.action else {
            panic!("compare expected");
        };
        assert_eq!(c.subsidy.policy().unwrap().rate_bp, 3_000);
    }

    #[test]
    fn bad_subsidy_values_name_the_option() {
        for (args, option) in [
            (&["--subsidy", "0%"][..], "--subsidy <RATE[@SCOPE]>"),
            (&["--subsidy", "50%@moon"][..], "--subsidy <RATE[@SCOPE]>"),
            (
                &["--subsidy", "50%", "--subsidy-per-tenant", "1.234"][..],
                "--subsidy-per-tenant",
            ),
            (
                &["--subsidy", "50%", "--subsidy-cap-per-lease=-3"][..],
                "--subsidy-cap-per-lease",
            ),
            // A face value without a policy is an error, not silently ignored.
            (&["--subsidy-per-tenant", "5"][..], "--subsidy"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(option), "{args:?}: {err}");
        }
    }

    #[test]
    fn tick_ms_takes_a_positive_interval_of_at_most_a_day() {
        assert_eq!(
            parse(&["--tick-ms", "60000"]).unwrap().run.tick_ms,
            Some(60_000)
        );
        assert_eq!(parse(&[]).unwrap().run.tick_ms, None);
        for bad in ["0", "86400001", "-5", "1.5", "soon"] {
            let err = parse(&[&format!("--tick-ms={bad}")]).unwrap_err();
            assert!(err.contains("--tick-ms <MS>"), "{bad}: {err}");
        }
    }

    #[test]
    fn warm_up_and_queue_limit_refuse_what_they_cannot_mean() {
        let run = parse(&["--warmup-hours", "24", "--queue-limit", "500"])
            .unwrap()
            .run;
        assert_eq!((run.warmup_hours, run.queue_limit), (Some(24.0), Some(500)));
        for bad in ["-1", "soon", "inf"] {
            let err = parse(&[&format!("--warmup-hours={bad}")]).unwrap_err();
            assert!(err.contains("--warmup-hours <HOURS>"), "{bad}: {err}");
        }
        for bad in ["0", "-3", "many"] {
            let err = parse(&[&format!("--queue-limit={bad}")]).unwrap_err();
            assert!(err.contains("--queue-limit <JOBS>"), "{bad}: {err}");
            let err = parse(&["compare", &format!("--queue-limit={bad}")]).unwrap_err();
            assert!(err.contains("--queue-limit <QUEUE_LIMIT>"), "{bad}: {err}");
        }
        let err = parse(&["compare", "--measure-hours=0"]).unwrap_err();
        assert!(err.contains("--measure-hours <HOURS>"), "{err}");
    }

    #[test]
    fn the_summary_shows_cost_and_subsidy() {
        let s = Summary {
            subsidy_policy: Some("50% on local pools, unlimited".into()),
            cost_fen: 123_456_789,
            subsidy_fen: 23_456_789,
            tenant_paid_fen: 100_000_000,
            subsidy_share: 0.19,
            vouchers_issued: 3,
            vouchers_exhausted: 1,
            subsidy_by_pool_kind: [("local_cloud".to_string(), 234_567.89)].into(),
            ..Summary::default()
        };
        let text = human(&s, false);
        assert!(
            text.contains(
                "cost 1,234,567.89 CNY over 0 leases; subsidy 234,567.89 CNY (19.0% of the cost: \
                 local centre 0.00 CNY, local cloud 234,567.89 CNY, external 0.00 CNY); tenants \
                 paid 1,000,000.00 CNY"
            ),
            "{text}"
        );
        assert!(text.contains(
            "subsidy policy: 50% on local pools, unlimited; 3 vouchers issued, 1 exhausted"
        ));
        assert_eq!(yuan(-5), "-0.05 CNY");
        assert_eq!(yuan(100_000), "1,000.00 CNY");
    }
}
