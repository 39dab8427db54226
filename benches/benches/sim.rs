//! Speed and memory of the simulator (BENCHMARKS.md, "The simulator"). Not a criterion
//! benchmark: one run of a million jobs is the measurement, so it runs a few times and prints
//! the median, with the peak resident memory of the process during the run (VmHWM, reset
//! before each run through /proc/self/clear_refs).
//!
//! `cargo bench -p suanli-benches --bench sim`
//!
//! - `synthetic-1m/futian-2025`: 1,000,000 jobs of the Philly-fitted synthetic workload (seed 1)
//!   at its own rate (about 220P of demand on the 20,983P fleet: queues stay short), default
//!   policy.
//! - `synthetic-1m-loaded/futian-2025`: the same jobs ten times as fast (about 2,200P of
//!   demand; large gangs wait now and then, so the engine runs scheduling passes over a queue).
//! - `philly/futian-2024`: the committed Philly trace as it is (15,000 jobs).
//! - `philly-loaded/futian-2024`: Philly with jobs 8 times as large arriving twice as fast (the
//!   golden test's run: large gangs queue).
//! - `synthetic-1m-subsidy/futian-2025`: `synthetic-1m` with a subsidy policy (a 50% voucher on
//!   all pools for each tenant, ¥1,000,000 face value, at most ¥2,000 per lease), so every lease
//!   is shared between a voucher and its tenant: the cost of the accounting.

use std::time::{Duration, Instant};

use suanli_core::Catalogue;
use suanli_sim::accounts::Fen;
use suanli_sim::{
    RequestRule, SimConfig, SubsidyPolicy, SyntheticConfig, Workload, fleet_by_name, simulate,
};

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn reset_peak_rss() {
    // "5" resets the peak resident set size of the process (Linux 4.0+); ignored elsewhere.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn run(
    name: &str,
    runs: usize,
    fleet: &str,
    rule: RequestRule,
    workload: impl Fn(&Catalogue) -> Workload,
) {
    run_with(name, runs, fleet, rule, None, workload);
}

fn run_with(
    name: &str,
    runs: usize,
    fleet: &str,
    rule: RequestRule,
    subsidy: Option<SubsidyPolicy>,
    workload: impl Fn(&Catalogue) -> Workload,
) {
    let catalogue = Catalogue::builtin();
    let fleet = fleet_by_name(fleet, &catalogue).expect("fleet");
    let config = SimConfig {
        rule,
        subsidy,
        ..SimConfig::default()
    };
    let mut times = Vec::new();
    let mut peak: f64 = 0.0;
    let mut last = None;
    for _ in 0..runs {
        let w = workload(&catalogue);
        reset_peak_rss();
        let start = Instant::now();
        let finished = simulate(&fleet, &catalogue, w, &config).expect("runs");
        times.push(start.elapsed());
        peak = peak.max(peak_rss_mib().unwrap_or(f64::NAN));
        last = Some(finished.summary);
    }
    let s = last.expect("at least one run");
    let t = median(times);
    println!(
        "sim/{name}: median {:.3} s over {runs} runs ({:.0} jobs/s), peak RSS {peak:.0} MiB; \
         {} jobs, offered {:.0}P, utilisation {:.1}%, wait mean {:.0} s, p99 {:.0} s; \
         cost {:.0} CNY, subsidy {:.0} CNY",
        t.as_secs_f64(),
        s.jobs as f64 / t.as_secs_f64(),
        s.jobs,
        s.offered_p,
        s.utilisation * 100.0,
        s.wait_mean_s,
        s.wait_p99_s,
        s.cost_yuan,
        s.subsidy_yuan
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a name filter as the first free argument selects runs.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if wanted("philly/") {
        run(
            "philly/futian-2024",
            21,
            "futian-2024",
            RequestRule::default(),
            |_| Workload::by_name("philly", 1, &Catalogue::builtin(), false).expect("philly"),
        );
    }
    if wanted("philly-loaded") {
        let rule = RequestRule {
            load_factor: 2.0,
            size_factor: 8.0,
            ..RequestRule::default()
        };
        run("philly-loaded/futian-2024", 5, "futian-2024", rule, |_| {
            Workload::by_name("philly", 1, &Catalogue::builtin(), false).expect("philly")
        });
    }
    if wanted("synthetic-1m/") {
        run(
            "synthetic-1m/futian-2025",
            3,
            "futian-2025",
            RequestRule::default(),
            |c| {
                Workload::synthetic(SyntheticConfig::philly_fit(1_000_000, 1), c)
                    .expect("synthetic")
            },
        );
    }
    if wanted("synthetic-1m-subsidy/") {
        let mut policy = SubsidyPolicy::parse("50%@all").expect("policy");
        policy.per_tenant = Some(Fen(100_000_000));
        policy.per_lease_cap = Some(Fen(200_000));
        run_with(
            "synthetic-1m-subsidy/futian-2025",
            3,
            "futian-2025",
            RequestRule::default(),
            Some(policy),
            |c| {
                Workload::synthetic(SyntheticConfig::philly_fit(1_000_000, 1), c)
                    .expect("synthetic")
            },
        );
    }
    if wanted("synthetic-1m-loaded") {
        let rule = RequestRule {
            load_factor: 10.0,
            ..RequestRule::default()
        };
        run(
            "synthetic-1m-loaded/futian-2025",
            1,
            "futian-2025",
            rule,
            |c| {
                Workload::synthetic(SyntheticConfig::philly_fit(1_000_000, 1), c)
                    .expect("synthetic")
            },
        );
    }
}
