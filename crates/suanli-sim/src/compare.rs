//! The capacity-planning report: a grid of runs (fleets x demand levels x policies) on the
//! synthetic workload, spread over threads, written as a Markdown report with SVG charts.
//!
//! Demand is given in P of offered load (TFLOPS x run time of the arriving jobs per unit of
//! time); each level becomes a load factor of the synthetic workload, measured once from the
//! generated jobs, so every fleet and policy sees the very same jobs at a given level.
//!
//! The report describes each fleet once filled, not while it fills: every run is fed the jobs
//! arriving over a warm-up (by default the longest run time, after which every job running
//! arrived after the start) and a measurement window, and its figures are taken over the
//! window. Jobs arriving while the queue is at its limit are turned away, as the broker turns
//! them away, so a saturated fleet stays saturated over the whole window with a bounded queue
//! and its figures settle too. Each run says whether its window was steady
//! ([`crate::metrics::Steadiness`]).
//!
//! A subsidy policy ([`GridConfig::subsidy`]) applies to every run: the report then gives what
//! it cost the district (the vouchers' share of the bill) in each run, and at each fleet's
//! saturation point.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use suanli_core::{Catalogue, Fleet, Millis, Policy};

use crate::accounts::SubsidyPolicy;
use crate::error::SimError;
use crate::job::{RequestBuilder, RequestRule};
use crate::metrics::{Series, Steadiness, Summary};
use crate::run::{SimConfig, simulate};
use crate::svg::{Chart, Line, render};
use crate::synthetic::SyntheticConfig;
use crate::workload::{Workload, fleet_by_name};

/// p99 wait above which the report calls a fleet saturated, in seconds.
pub const SATURATION_P99_WAIT_S: f64 = 3600.0;

/// Synthetic jobs generated to measure the workload's offered load at load factor 1.
const CALIBRATION_JOBS: u64 = 100_000;

/// What the grid runs.
#[derive(Clone, Debug, PartialEq)]
pub struct GridConfig {
    /// Fleets by name or path.
    pub fleets: Vec<String>,
    /// Offered demand levels, in P.
    pub demands_p: Vec<f64>,
    /// Default placement policies.
    pub policies: Vec<Policy>,
    /// The synthetic workload (its `seed` and `max_duration_s` matter most; how many jobs a
    /// run is fed follows from `warmup_h` and `measure_h`).
    pub workload: SyntheticConfig,
    /// Hours of each run left out of its figures while the fleet fills up.
    pub warmup_h: f64,
    /// Hours of arrivals measured after the warm-up.
    pub measure_h: f64,
    /// Device counts are multiplied by this.
    pub size_factor: f64,
    /// Runs at once; 0 = one per core.
    pub threads: usize,
    /// Jobs arriving while this many wait are turned away (the fleet is saturated).
    pub queue_limit: u64,
    /// The subsidy policy of every run; `None` = no voucher (subsidy 0).
    pub subsidy: Option<SubsidyPolicy>,
}

impl Default for GridConfig {
    fn default() -> Self {
        let mut workload = SyntheticConfig::philly_fit(CALIBRATION_JOBS, 1);
        workload.max_duration_s = 2.0 * 86_400.0;
        GridConfig {
            fleets: vec!["futian-2024".into(), "futian-2025".into()],
            demands_p: vec![
                5_000.0, 7_500.0, 10_000.0, 12_500.0, 15_000.0, 20_000.0, 25_000.0,
            ],
            policies: vec![Policy::Cheapest, Policy::LowestLatency, Policy::BestFit],
            workload,
            size_factor: 4.0,
            threads: 0,
            queue_limit: 2_000,
            warmup_h: 48.0,
            measure_h: 192.0,
            subsidy: None,
        }
    }
}

/// One finished run of the grid.
#[derive(Clone, Debug)]
pub struct GridRun {
    /// Fleet name.
    pub fleet: String,
    /// Policy.
    pub policy: Policy,
    /// Demand level asked for, in P.
    pub demand_p: f64,
    /// The run's figures.
    pub summary: Summary,
    /// The run's series.
    pub series: Series,
}

/// Offered load of the workload at load factor 1, in P.
fn base_offered_p(config: &GridConfig, catalogue: &Catalogue) -> Result<f64, SimError> {
    let rule = RequestRule {
        size_factor: config.size_factor,
        ..RequestRule::default()
    };
    let builder = RequestBuilder::new(catalogue, &rule);
    let mut calibration = config.workload.clone();
    calibration.jobs = CALIBRATION_JOBS;
    let workload = Workload::synthetic(calibration, catalogue)?;
    let (mut work, mut first, mut last) = (0.0f64, None, 0);
    for mut job in workload.jobs {
        rule.scale(&mut job);
        work += builder.tflops(&job) as f64 * job.duration_ms as f64;
        first.get_or_insert(job.submit_ms);
        last = job.submit_ms;
    }
    let span = last.saturating_sub(first.unwrap_or(0)).max(1) as f64;
    Ok(work / span / 1000.0)
}

/// The workload of a run at `load_factor`: the jobs arriving within the warm-up and the
/// measurement window (at least one).
fn run_workload(config: &GridConfig, catalogue: &Catalogue, load_factor: f64) -> SyntheticConfig {
    let span_ms = (config.warmup_h + config.measure_h) * 3.6e6;
    let mut all = config.workload.clone();
    all.jobs = u64::MAX;
    let mut workload = config.workload.clone();
    workload.jobs = crate::synthetic::Synthetic::new(all, catalogue)
        .map(|g| {
            g.take_while(|j| (j.submit_ms as f64 / load_factor).round() <= span_ms)
                .count() as u64
        })
        .unwrap_or(0)
        .max(1);
    workload
}

/// Runs the grid; `progress(done, total)` is called after each run.
pub fn run_grid(
    config: &GridConfig,
    catalogue: &Catalogue,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Vec<GridRun>, SimError> {
    if config.fleets.is_empty() || config.demands_p.is_empty() || config.policies.is_empty() {
        return Err(SimError::option(
            "grid",
            "needs at least one fleet, demand and policy",
        ));
    }
    if let Some(d) = config
        .demands_p
        .iter()
        .find(|d| !(d.is_finite() && **d > 0.0))
    {
        return Err(SimError::option(
            "demands",
            format!("{d} is not a positive demand"),
        ));
    }
    if !(config.warmup_h.is_finite() && config.warmup_h >= 0.0) {
        return Err(SimError::option(
            "warmup_h",
            format!("{} is not a number of hours", config.warmup_h),
        ));
    }
    if !(config.measure_h.is_finite() && config.measure_h > 0.0) {
        return Err(SimError::option(
            "measure_h",
            format!("{} is not a positive number of hours", config.measure_h),
        ));
    }
    if config.queue_limit == 0 {
        return Err(SimError::option("queue_limit", "must let a job wait"));
    }
    // Validates the workload's settings before the jobs of any run are counted.
    crate::synthetic::Synthetic::new(config.workload.clone(), catalogue)?;
    let fleets: Vec<Fleet> = config
        .fleets
        .iter()
        .map(|f| fleet_by_name(f, catalogue))
        .collect::<Result<_, _>>()?;
    let base = base_offered_p(config, catalogue)?;
    let workloads: Vec<SyntheticConfig> = config
        .demands_p
        .iter()
        .map(|d| run_workload(config, catalogue, d / base))
        .collect();
    let mut tasks = Vec::new();
    for fleet in &fleets {
        for (level, &demand_p) in config.demands_p.iter().enumerate() {
            for &policy in &config.policies {
                tasks.push((fleet, demand_p, &workloads[level], policy));
            }
        }
    }
    let total = tasks.len();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<GridRun, SimError>>>> =
        Mutex::new((0..total).map(|_| None).collect());
    let threads = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(total);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(fleet, demand_p, workload, policy)) = tasks.get(i) else {
                        break;
                    };
                    let sim = SimConfig {
                        policy,
                        rule: RequestRule {
                            load_factor: demand_p / base,
                            size_factor: config.size_factor,
                            ..RequestRule::default()
                        },
                        seed: config.workload.seed,
                        queue_limit: Some(config.queue_limit),
                        warmup_ms: (config.warmup_h * 3.6e6).round() as Millis,
                        subsidy: config.subsidy.clone(),
                        ..SimConfig::default()
                    };
                    let result = Workload::synthetic(workload.clone(), catalogue)
                        .and_then(|w| simulate(fleet, catalogue, w, &sim))
                        .map(|f| GridRun {
                            fleet: fleet.name.clone(),
                            policy,
                            demand_p,
                            summary: f.summary,
                            series: f.series,
                        });
                    if let Ok(mut r) = results.lock() {
                        r[i] = Some(result);
                    }
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_default();
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(SimError::option("grid", "a run did not finish"))))
        .collect()
}

/// A run is saturated when its p99 wait passes [`SATURATION_P99_WAIT_S`], its queue grew, or
/// arrivals were turned away.
fn is_saturated(s: &Summary) -> bool {
    s.saturated || s.steadiness == Steadiness::Saturated || s.wait_p99_s > SATURATION_P99_WAIT_S
}

/// A wait of a run for the report: a saturated run's waits grow with the length of the run
/// (low priorities wait behind a queue that never empties), and are marked so.
fn wait_cell(s: &Summary, seconds: f64) -> String {
    if s.steadiness == Steadiness::Saturated && seconds > 0.0 {
        format!("{}, growing", hours(seconds))
    } else {
        hours(seconds)
    }
}

/// How the table marks a run's window.
fn steadiness_label(s: &Summary) -> &'static str {
    match s.steadiness {
        Steadiness::Steady => "steady",
        Steadiness::Filling => "**still filling**",
        Steadiness::Saturated => "saturated",
        Steadiness::TooShort => "**too short**",
    }
}

/// Yuan, rounded to the yuan, with thousands separators.
fn money(yuan: f64) -> String {
    let whole = format!("{:.0}", yuan.abs());
    let mut grouped = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let sign = if yuan < -0.5 { "-" } else { "" };
    format!("{sign}¥{grouped}")
}

fn hours(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.0} s")
    } else if s < 3600.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// Writes `report.md` and the charts into `dir` (created if needed).
pub fn write_report(dir: &Path, config: &GridConfig, runs: &[GridRun]) -> Result<(), SimError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| SimError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let charts = charts(config, runs);
    for (file, chart) in &charts {
        let path = dir.join(file);
        std::fs::write(&path, render(chart)).map_err(io(&path))?;
    }
    let path = dir.join("report.md");
    std::fs::write(&path, markdown(config, runs, &charts)).map_err(io(&path))?;
    Ok(())
}

fn markdown(config: &GridConfig, runs: &[GridRun], charts: &[(String, Chart)]) -> String {
    let w = &config.workload;
    let mut o = String::new();
    let _ = writeln!(o, "# Capacity planning: {}\n", config.fleets.join(" vs "));
    let _ = writeln!(
        o,
        "Every run feeds synthetic jobs (Philly-fitted, seed {}, sizes x{}, run times cut to \
         {:.0} h) to the allocation engine on a virtual clock, with arrivals compressed to offer \
         the demand of each row: the jobs arriving over a warm-up of {:.0} h and a measurement \
         window of {:.0} h, so that every fleet and policy sees the same jobs at a given demand \
         (more jobs at higher demand). The figures are taken over the window only, once the \
         fleet has filled up: utilisation over its time, waits and completion times of the jobs \
         arriving in it; the chart of utilisation over time marks where it starts. Jobs arriving \
         while {} wait are turned away, as the broker turns them away, and counted. Demand and \
         capacity are in P (1P = 1000 dense FP16 TFLOPS); a job naming no model takes devices \
         of at least 312 TFLOPS. Waits run from arrival to first placement. Produced by \
         `suanli sim compare`.\n",
        w.seed,
        config.size_factor,
        w.max_duration_s / 3600.0,
        config.warmup_h,
        config.measure_h,
        config.queue_limit
    );
    let _ = writeln!(o, "## Reading\n");
    let mut fleets: Vec<&str> = runs.iter().map(|r| r.fleet.as_str()).collect();
    fleets.dedup();
    let policy = config.policies[0];
    for fleet in &fleets {
        let mut rows: Vec<&GridRun> = runs
            .iter()
            .filter(|r| r.fleet == *fleet && r.policy == policy)
            .collect();
        rows.sort_by(|a, b| a.demand_p.total_cmp(&b.demand_p));
        let Some(first) = rows.first() else { continue };
        // The first saturated level, and the level just below it.
        let first_saturated = rows.iter().position(|r| is_saturated(&r.summary));
        let saturated = first_saturated.map(|i| rows[i]);
        let fine = match first_saturated {
            Some(0) => None,
            Some(i) => Some(rows[i - 1].demand_p),
            None => rows.last().map(|r| r.demand_p),
        };
        let _ = write!(
            o,
            "- **{fleet}** ({:.0}P), policy {}: ",
            first.summary.capacity_p,
            policy.as_str()
        );
        let served = fine.and_then(|d| rows.iter().find(|r| r.demand_p == d));
        match (fine, saturated) {
            (Some(d), Some(s)) => {
                let _ = writeln!(
                    o,
                    "p99 wait stays under {} up to {d:.0}P of demand; at {:.0}P it is {}{} \
                     (utilisation {:.0}%).",
                    hours(SATURATION_P99_WAIT_S),
                    s.demand_p,
                    wait_cell(&s.summary, s.summary.wait_p99_s),
                    if s.summary.turned_away_share > 0.0 {
                        format!(
                            " and {:.0}% of the jobs are turned away at the queue's limit",
                            s.summary.turned_away_share * 100.0
                        )
                    } else {
                        String::new()
                    },
                    s.summary.utilisation * 100.0
                );
            }
            (Some(d), None) => {
                let _ = writeln!(
                    o,
                    "p99 wait stays under {} at every demand up to {d:.0}P.",
                    hours(SATURATION_P99_WAIT_S)
                );
            }
            (None, _) => {
                let _ = writeln!(
                    o,
                    "p99 wait exceeds {} already at the lowest demand.",
                    hours(SATURATION_P99_WAIT_S)
                );
            }
        }
        if let (Some(policy), Some(r)) = (&config.subsidy, served) {
            let s = &r.summary;
            let days = s.makespan_h / 24.0;
            let _ = writeln!(
                o,
                "  At {:.0}P, {}, the subsidy ({policy}) cost the district {} over the \
                 {days:.1}-day run, about {} a day: {:.0}% of the {} compute bill.",
                r.demand_p,
                if saturated.is_some() {
                    "the most it serves before saturating"
                } else {
                    "the highest demand of the grid"
                },
                money(s.subsidy_yuan),
                money(if days > 0.0 {
                    s.subsidy_yuan / days
                } else {
                    0.0
                }),
                s.subsidy_share * 100.0,
                money(s.cost_yuan)
            );
        }
    }
    let not_steady: Vec<String> = runs
        .iter()
        .filter(|r| {
            matches!(
                r.summary.steadiness,
                Steadiness::Filling | Steadiness::TooShort
            )
        })
        .map(|r| format!("{} {} at {:.0}P", r.fleet, r.policy.as_str(), r.demand_p))
        .collect();
    let _ = writeln!(
        o,
        "\nA fleet counts as saturated once the p99 wait passes {}, once its queue grows over \
         the window (the mean number waiting in the window's second half at least twice the \
         first's), or once jobs are turned away at the queue's limit of {}: the share turned \
         away is then what the fleet cannot serve. A saturated fleet's waits are marked \
         *growing*: low priorities wait behind a queue that never empties, so they lengthen \
         with the run; read its utilisation and the share turned away instead. Utilisation cannot reach 100%: jobs naming no model cannot use the H20 and RTX 4090 \
         devices, large gangs need whole nodes in one node group, and the engine holds capacity \
         for the first waiting job (EASY backfill).\n",
        hours(SATURATION_P99_WAIT_S),
        config.queue_limit,
    );
    if not_steady.is_empty() {
        let _ = writeln!(
            o,
            "Every run reached a steady state within its warm-up: over its window, utilisation \
             rose by at most 5 points and the queue did not grow (or the run is saturated).\n"
        );
    } else {
        let _ = writeln!(
            o,
            "**Not steady**: {} still filled up during the window (utilisation rose by more \
             than 5 points from its first half to its second) or had too short a window; read \
             their figures as a lower bound of utilisation, and run again with a longer \
             `--warmup-hours` or `--measure-hours`.\n",
            not_steady.join(", ")
        );
    }
    let _ = writeln!(o, "## Charts\n");
    for (file, chart) in charts {
        let _ = writeln!(o, "![{}]({file})\n", chart.title);
    }
    let _ = writeln!(o, "## All runs\n");
    let _ = writeln!(
        o,
        "| fleet | policy | demand P | offered P | jobs | window (h) | state | turned away | utilisation | local | external | wait mean | wait p50 | wait p99 | JCT mean | slowdown | Jain | fragmentation | stranded P | unserved | cost (CNY) | subsidy (CNY) | tenants paid (CNY) |"
    );
    let _ = writeln!(
        o,
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in runs {
        let s = &r.summary;
        let _ = writeln!(
            o,
            "| {} | {} | {:.0} | {:.0} | {} | {:.0} | {} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {} | {} | {} | {} | {:.2} | {:.3} | {:.1}% | {:.0} | {} | {:.0} | {:.0} | {:.0} |",
            r.fleet,
            r.policy.as_str(),
            r.demand_p,
            s.offered_p,
            s.jobs + s.turned_away,
            s.window_h,
            steadiness_label(s),
            s.turned_away_share * 100.0,
            s.utilisation * 100.0,
            s.utilisation_local * 100.0,
            s.utilisation_external * 100.0,
            wait_cell(s, s.wait_mean_s),
            hours(s.wait_p50_s),
            wait_cell(s, s.wait_p99_s),
            hours(s.jct_mean_s),
            s.bounded_slowdown_mean,
            s.jain_fairness,
            s.fragmentation * 100.0,
            s.stranded_p,
            s.unserved,
            s.cost_yuan,
            s.subsidy_yuan,
            s.tenant_paid_yuan
        );
    }
    let _ = writeln!(
        o,
        "\nCost is what the leases were charged by the billing rules, over the whole run (warm-up \
         included): each lease at the prices fixed at placement for the time it was held. {}",
        match &config.subsidy {
            Some(p) => format!(
                "Subsidy is what the compute vouchers paid of it, tenants paid the rest; every \
                 tenant received one voucher at the start of each run: {p}."
            ),
            None => "No subsidy policy was given (`--subsidy`): the tenants paid it all.".into(),
        }
    );
    o
}

/// The demand level closest to the middle of the grid, for the time and CDF charts.
fn featured_demand(config: &GridConfig) -> f64 {
    let mut d = config.demands_p.clone();
    d.sort_by(f64::total_cmp);
    d[d.len() / 2]
}

fn charts(config: &GridConfig, runs: &[GridRun]) -> Vec<(String, Chart)> {
    let mut fleets: Vec<&str> = runs.iter().map(|r| r.fleet.as_str()).collect();
    fleets.dedup();
    let against_demand = |value: fn(&Summary) -> f64| -> Vec<Line> {
        let mut lines = Vec::new();
        for (fi, fleet) in fleets.iter().enumerate() {
            for (pi, policy) in config.policies.iter().enumerate() {
                let mut points: Vec<(f64, f64)> = runs
                    .iter()
                    .filter(|r| r.fleet == *fleet && r.policy == *policy)
                    .map(|r| (r.demand_p, value(&r.summary)))
                    .collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                lines.push(Line {
                    name: format!("{fleet}, {}", policy.as_str()),
                    points,
                    dashed: pi > 0,
                    colour: fi * 3 + pi,
                });
            }
        }
        lines
    };
    let featured = featured_demand(config);
    let policy = config.policies[0];
    let featured_runs: Vec<&GridRun> = runs
        .iter()
        .filter(|r| r.demand_p == featured && r.policy == policy)
        .collect();
    vec![
        (
            "utilisation_vs_demand.svg".into(),
            Chart {
                title: "Utilisation against demand".into(),
                x_label: "offered demand (P)".into(),
                y_label: "utilisation (%)".into(),
                x_log: false,
                y_log: false,
                log_floor: 0.0,
                y_range: Some((0.0, 100.0)),
                lines: against_demand(|s| s.utilisation * 100.0),
                marker: None,
            },
        ),
        (
            "p99_wait_vs_demand.svg".into(),
            Chart {
                title: "p99 waiting time against demand".into(),
                x_label: "offered demand (P)".into(),
                y_label: "p99 wait (hours, log scale)".into(),
                x_log: false,
                y_log: true,
                log_floor: 0.01,
                y_range: None,
                lines: against_demand(|s| s.wait_p99_s / 3600.0),
                marker: None,
            },
        ),
        (
            "utilisation_over_time.svg".into(),
            Chart {
                title: format!(
                    "Utilisation over time at {featured:.0}P of demand ({})",
                    policy.as_str()
                ),
                x_label: "days since the first arrival".into(),
                y_label: "utilisation (%)".into(),
                x_log: false,
                y_log: false,
                log_floor: 0.0,
                y_range: Some((0.0, 100.0)),
                lines: featured_runs
                    .iter()
                    .enumerate()
                    .map(|(i, r)| Line {
                        name: r.fleet.clone(),
                        points: r
                            .series
                            .utilisation
                            .iter()
                            .map(|&(h, u)| (h / 24.0, u * 100.0))
                            .collect(),
                        dashed: false,
                        colour: i * 3,
                    })
                    .collect(),
                marker: (config.warmup_h > 0.0)
                    .then(|| (config.warmup_h / 24.0, "measured from here".to_string())),
            },
        ),
        (
            "wait_cdf.svg".into(),
            Chart {
                title: format!(
                    "Waiting time distribution at {featured:.0}P of demand ({})",
                    policy.as_str()
                ),
                x_label: "wait (seconds, log scale; no wait drawn at 1 s)".into(),
                y_label: "share of jobs waiting at most that long (%)".into(),
                x_log: true,
                y_log: false,
                log_floor: 1.0,
                y_range: Some((0.0, 100.0)),
                lines: featured_runs
                    .iter()
                    .enumerate()
                    .map(|(i, r)| Line {
                        name: r.fleet.clone(),
                        points: r
                            .series
                            .wait_cdf
                            .iter()
                            .map(|&(w, q)| (w.max(1.0), q * 100.0))
                            .collect(),
                        dashed: false,
                        colour: i * 3,
                    })
                    .collect(),
                marker: None,
            },
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_grid_writes_a_report_with_every_run_and_chart() {
        let mut workload = SyntheticConfig::philly_fit(300, 3);
        workload.max_duration_s = 3600.0;
        let config = GridConfig {
            warmup_h: 1.0,
            measure_h: 48.0,
            demands_p: vec![500.0, 4000.0],
            policies: vec![Policy::Cheapest, Policy::BestFit],
            workload,
            threads: 2,
            subsidy: Some(SubsidyPolicy::parse("40%@all").unwrap()),
            ..GridConfig::default()
        };
        let catalogue = Catalogue::builtin();
        let calls = AtomicUsize::new(0);
        let runs = run_grid(&config, &catalogue, &|_, total| {
            assert_eq!(total, 8);
            calls.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 8);
        assert_eq!(runs.len(), 8);
        let low = &runs[0].summary;
        assert!(
            (low.offered_p / 500.0 - 1.0).abs() < 0.05,
            "offered {}",
            low.offered_p
        );
        let dir = std::env::temp_dir().join(format!("suanli-sim-report-{}", std::process::id()));
        write_report(&dir, &config, &runs).unwrap();
        let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert_eq!(report.matches("| futian-").count(), 8, "{report}");
        // Every run was subsidised, and the reading says what it cost at each fleet's
        // saturation point (or the highest demand, when it does not saturate).
        for r in &runs {
            assert!(r.summary.subsidy_fen > 0, "{:?}", r.summary);
            assert_eq!(
                r.summary.subsidy_policy.as_deref(),
                Some("40% on all pools, unlimited")
            );
        }
        assert!(report.contains("| subsidy (CNY) | tenants paid (CNY) |"));
        // Saturated runs mark their waits as growing; the others do not. (futian-2024 at
        // 4000P saturates with these jobs, futian-2025 does not.)
        assert!(
            runs.iter()
                .any(|r| r.summary.steadiness == Steadiness::Saturated)
        );
        for r in &runs {
            let row = report
                .lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "| {} | {} | {:.0} |",
                        r.fleet,
                        r.policy.as_str(),
                        r.demand_p
                    ))
                })
                .unwrap();
            let saturated =
                r.summary.steadiness == Steadiness::Saturated && r.summary.wait_p99_s > 0.0;
            assert_eq!(row.contains(", growing"), saturated, "{row}");
        }
        assert_eq!(
            report
                .matches("the subsidy (40% on all pools, unlimited) cost the district ¥")
                .count(),
            2,
            "{report}"
        );
        for chart in [
            "utilisation_vs_demand.svg",
            "p99_wait_vs_demand.svg",
            "utilisation_over_time.svg",
            "wait_cdf.svg",
        ] {
            assert!(report.contains(chart));
            assert!(
                std::fs::read_to_string(dir.join(chart))
                    .unwrap()
                    .contains("<polyline")
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_grids_are_refused() {
        let config = GridConfig {
            demands_p: vec![-1.0],
            ..GridConfig::default()
        };
        assert!(matches!(
            run_grid(&config, &Catalogue::builtin(), &|_, _| {}),
            Err(SimError::Option {
                option: "demands",
                ..
            })
        ));
    }
}
