//! Validation against queueing theory: one pool of c identical devices, Poisson arrivals,
//! exponential run times, one-device jobs (an M/M/c queue). The simulated mean wait must match
//! the Erlang C formula within 5%, and Little's law must hold, at utilisations 0.5, 0.8 and
//! 0.95.
//!
//! The formula is evaluated at the load of the jobs actually generated (their arrival rate and
//! mean run time), so the check measures the simulator, not the sampling error of the load;
//! the load itself is checked against the nominal one. The standard error of a long-run mean
//! wait still grows steeply with utilisation, so each utilisation gets enough jobs for the 5%
//! bound to lie well outside the spread over seeds, measured in a release build over 20 seeds
//! (c = 2): relative standard deviation of the mean wait 1.5% at ρ = 0.5
//! with 100,000 jobs, 2.0% at ρ = 0.8 with 100,000, 6.5% at ρ = 0.95 with 200,000. The runs
//! below use 100,000 (3.4 σ), 200,000 (3.5 σ) and 2 x 1,000,000 (2.5 σ) jobs.
//! The queue starts empty; that warm-up bias is well below the tolerance at these lengths.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use suanli_core::{Catalogue, Fleet, Priority};
use suanli_sim::job::{Job, JobShape};
use suanli_sim::trace::Trace;
use suanli_sim::{SimConfig, Summary, Workload, simulate};

/// Devices in the pool: one node of them. Two servers keep the chance of waiting high (1/3 at
/// ρ = 0.5), so the mean wait is estimated with far fewer jobs than with many servers.
const SERVERS: u32 = 2;
/// Mean run time: one hour.
const MEAN_RUN_S: f64 = 3600.0;

fn fleet() -> Fleet {
    Fleet::from_toml(
        &format!(
            r#"
            name = "mmc"
            [[pool]]
            id = "only"
            kind = "local_centre"
            region = "guangdong-shenzhen"
            rtt_ms = 1
            data_zone = "mainland"
            [[pool.group]]
            model = "h800"
            devices_per_node = {}
            nodes = 1
            interconnect = "nvlink"
            price_fen_per_device_hour = 1000
            "#,
            SERVERS
        ),
        &Catalogue::builtin(),
    )
    .expect("valid fleet")
}

/// Erlang C: the mean wait in queue of M/M/c, in seconds.
fn erlang_c_wait_s(c: u32, rho: f64, mean_run_s: f64) -> f64 {
    let a = rho * c as f64;
    let mut term = 1.0;
    let mut sum = 0.0;
    for k in 0..c {
        if k > 0 {
            term *= a / k as f64;
        }
        sum += term;
    }
    let last = term * a / c as f64 / (1.0 - rho);
    let p_wait = last / (sum + last);
    let mu = 1.0 / mean_run_s;
    p_wait / (c as f64 * mu - a * mu)
}

fn exponential(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    -(1.0 - rng.random::<f64>()).ln() * mean
}

/// The arrival rate and mean run time of the jobs actually generated.
struct Realised {
    rho: f64,
    mean_run_s: f64,
}

fn mmc_run(rho: f64, jobs: usize, seed: u64) -> (Summary, Realised) {
    let catalogue = Catalogue::builtin();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mean_gap_s = MEAN_RUN_S / (rho * SERVERS as f64);
    let mut clock = 0.0;
    let mut trace = Trace::new("mmc");
    trace.tenants = vec!["only".into()];
    for _ in 0..jobs {
        clock += exponential(&mut rng, mean_gap_s);
        trace.jobs.push(Job {
            submit_ms: (clock * 1000.0) as u64,
            duration_ms: (exponential(&mut rng, MEAN_RUN_S) * 1000.0).max(1.0) as u64,
            devices: 1,
            nodes: None,
            model: catalogue.lookup("h800"),
            tenant: 0,
            priority: Priority::Standard,
            shape: JobShape::Gang,
            deadline_after_ms: None,
        });
    }
    let span_s = trace.jobs.last().map_or(0, |j| j.submit_ms) as f64 / 1000.0;
    let mean_run_s =
        trace.jobs.iter().map(|j| j.duration_ms as f64).sum::<f64>() / 1000.0 / jobs as f64;
    let realised = Realised {
        rho: jobs as f64 / span_s * mean_run_s / SERVERS as f64,
        mean_run_s,
    };
    let summary = simulate(
        &fleet(),
        &catalogue,
        Workload::from_trace(trace),
        &SimConfig::default(),
    )
    .expect("runs")
    .summary;
    (summary, realised)
}

/// Runs independent replications (one thread each) and checks their pooled mean wait against
/// Erlang C, and Little's law in each.
fn check(rho: f64, jobs: usize, seeds: &[u64]) {
    let runs: Vec<(Summary, Realised)> = std::thread::scope(|scope| {
        let handles: Vec<_> = seeds
            .iter()
            .map(|&seed| scope.spawn(move || mmc_run(rho, jobs, seed)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("run"))
            .collect()
    });
    let mut ratio = 0.0;
    for (s, r) in &runs {
        assert_eq!(s.completed, jobs as u64);
        ratio += s.wait_mean_s / erlang_c_wait_s(SERVERS, r.rho, r.mean_run_s);
        check_little(rho, s);
        assert!((r.rho / rho - 1.0).abs() < 0.03, "generated load {}", r.rho);
    }
    let error = ratio / runs.len() as f64 - 1.0;
    assert!(
        error.abs() < 0.05,
        "rho {rho}: mean wait off Erlang C by {:+.2}%",
        error * 100.0
    );
}

fn check_little(rho: f64, s: &Summary) {
    // Little's law, L = λW, for the queue and for the whole system.
    let lambda_per_s = s.arrival_rate_per_h / 3600.0;
    let little_queue = lambda_per_s * s.wait_mean_s;
    assert!(
        (s.queue_mean / little_queue - 1.0).abs() < 0.01,
        "rho {rho}: time-averaged queue {:.3}, λW {little_queue:.3}",
        s.queue_mean
    );
    let little_system = lambda_per_s * s.jct_mean_s;
    assert!(
        (s.in_system_mean / little_system - 1.0).abs() < 0.01,
        "rho {rho}: time-averaged jobs in system {:.3}, λ(JCT) {little_system:.3}",
        s.in_system_mean
    );
    // The utilisation the queue was built for.
    assert!(
        (s.utilisation / rho - 1.0).abs() < 0.03,
        "{}",
        s.utilisation
    );
}

#[test]
fn erlang_c_mean_wait_at_half_load() {
    check(0.5, 100_000, &[11]);
}

#[test]
fn erlang_c_mean_wait_at_080() {
    check(0.8, 200_000, &[12]);
}

/// Two million jobs: the workspace builds the engine and the simulator optimised even in test
/// builds (`[profile.dev.package]` in the root manifest), so this runs in seconds.
#[test]
fn erlang_c_mean_wait_at_095() {
    check(0.95, 1_000_000, &[13, 14]);
}

#[test]
fn erlang_c_formula_matches_known_values() {
    // M/M/1: Wq = ρ/(μ(1-ρ)).
    assert!((erlang_c_wait_s(1, 0.5, 1.0) - 1.0).abs() < 1e-12);
    // M/M/2 at ρ = 0.5: C = 1/3, Wq = C/(2μ - λ) = 1/3.
    assert!((erlang_c_wait_s(2, 0.5, 1.0) - 1.0 / 3.0).abs() < 1e-12);
}
