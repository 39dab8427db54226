//! The capacity-planning report measures a steady state: with the default warm-up, doubling
//! the measurement window moves the figures the report reads by less than 10%, at a demand the
//! fleet serves and at one it cannot (where jobs are turned away at the queue's limit).

use suanli_core::{Catalogue, Policy};
use suanli_sim::compare::{GridConfig, GridRun, run_grid};
use suanli_sim::{
    RequestRule, SimConfig, SimError, Steadiness, Summary, SyntheticConfig, Workload,
    fleet_by_name, simulate,
};

/// One run of the report's grid: a fleet at a demand, cheapest first, measured for `measure_h`.
fn run(fleet: &str, demand_p: f64, measure_h: f64) -> Summary {
    let config = GridConfig {
        fleets: vec![fleet.into()],
        demands_p: vec![demand_p],
        policies: vec![Policy::Cheapest],
        measure_h,
        ..GridConfig::default()
    };
    let mut runs: Vec<GridRun> = run_grid(&config, &Catalogue::builtin(), &|_, _| {}).unwrap();
    runs.remove(0).summary
}

/// Relative change from `a` to `b`.
fn moved(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (b - a).abs() / a.abs().max(b.abs())
    }
}

/// Runs a point for the default window and for twice as long, and checks that the figures the
/// report reads move by less than 10%.
fn check_doubling(fleet: &str, demand_p: f64, saturated: bool) {
    let measure_h = GridConfig::default().measure_h;
    let a = run(fleet, demand_p, measure_h);
    let b = run(fleet, demand_p, 2.0 * measure_h);
    println!(
        "{fleet} at {demand_p}P: offered {:.0} -> {:.0} P, utilisation {:.4} -> {:.4}, p99 wait {:.0} -> {:.0} s, turned away {:.4} -> {:.4}, {:?} -> {:?}",
        a.offered_p,
        b.offered_p,
        a.utilisation,
        b.utilisation,
        a.wait_p99_s,
        b.wait_p99_s,
        a.turned_away_share,
        b.turned_away_share,
        a.steadiness,
        b.steadiness
    );
    assert!(
        (b.window_h / a.window_h - 2.0).abs() < 0.05,
        "windows {} and {} h",
        a.window_h,
        b.window_h
    );
    let mut figures = vec![
        ("offered P", a.offered_p, b.offered_p),
        ("utilisation", a.utilisation, b.utilisation),
        (
            "local utilisation",
            a.utilisation_local,
            b.utilisation_local,
        ),
    ];
    if saturated {
        // A saturated fleet's waits grow with the run (low priorities wait behind a queue that
        // never empties): the report reads its utilisation and the share it turns away.
        assert_eq!(a.steadiness, Steadiness::Saturated, "{a:?}");
        assert_eq!(b.steadiness, Steadiness::Saturated, "{b:?}");
        figures.push((
            "share turned away",
            a.turned_away_share,
            b.turned_away_share,
        ));
    } else {
        assert_eq!(a.steadiness, Steadiness::Steady, "{a:?}");
        assert_eq!(b.steadiness, Steadiness::Steady, "{b:?}");
        assert_eq!((a.turned_away, b.turned_away), (0, 0));
        figures.push(("p99 wait", a.wait_p99_s, b.wait_p99_s));
    }
    for (figure, x, y) in figures {
        assert!(
            moved(x, y) < 0.10,
            "{figure} moved from {x} to {y} when the window doubled"
        );
    }
}

#[test]
fn doubling_the_window_moves_a_served_point_by_less_than_ten_percent() {
    // futian-2025 serves 10,000P with short waits.
    check_doubling("futian-2025", 10_000.0, false);
}

#[test]
fn doubling_the_window_moves_a_saturated_point_by_less_than_ten_percent() {
    // futian-2024 (10,496P) cannot serve 15,000P.
    check_doubling("futian-2024", 15_000.0, true);
}

fn try_small_run(config: SimConfig) -> Result<Summary, SimError> {
    let catalogue = Catalogue::builtin();
    let fleet = fleet_by_name("futian-2024", &catalogue).unwrap();
    let mut workload = SyntheticConfig::philly_fit(3_000, 5);
    workload.max_duration_s = 6.0 * 3600.0;
    let workload = Workload::synthetic(workload, &catalogue).unwrap();
    simulate(&fleet, &catalogue, workload, &config).map(|f| f.summary)
}

fn small_run(config: SimConfig) -> Summary {
    try_small_run(config).unwrap()
}

#[test]
fn a_warm_up_moves_the_window_not_the_decisions() {
    let rule = RequestRule {
        load_factor: 20.0,
        size_factor: 4.0,
        ..RequestRule::default()
    };
    let whole = small_run(SimConfig {
        rule: rule.clone(),
        ..SimConfig::default()
    });
    let warmed = small_run(SimConfig {
        rule,
        warmup_ms: 6 * 3_600_000,
        ..SimConfig::default()
    });
    // The same decisions and counts; a window 6 h shorter, measured after it.
    assert_eq!(warmed.digest, whole.digest);
    assert_eq!(
        (warmed.jobs, warmed.completed, warmed.cost_fen),
        (whole.jobs, whole.completed, whole.cost_fen)
    );
    assert_eq!(warmed.warmup_h, 6.0);
    assert!((whole.window_h - warmed.window_h - 6.0).abs() < 1e-9);
    // The fleet starts empty: the window after the warm-up is at least as busy.
    assert!(
        warmed.utilisation > whole.utilisation,
        "{} vs {}",
        warmed.utilisation,
        whole.utilisation
    );
    assert_eq!(whole.warmup_h, 0.0);
}

#[test]
fn jobs_arriving_at_the_queue_limit_are_turned_away_and_counted() {
    let rule = RequestRule {
        load_factor: 400.0,
        size_factor: 8.0,
        ..RequestRule::default()
    };
    let limited = small_run(SimConfig {
        rule,
        queue_limit: Some(50),
        ..SimConfig::default()
    });
    assert!(limited.turned_away > 0, "{limited:?}");
    assert_eq!(limited.jobs + limited.turned_away, 3_000);
    assert_eq!(limited.steadiness, Steadiness::Saturated);
    assert!(limited.turned_away_share > 0.0 && limited.turned_away_share < 1.0);
    let refused = try_small_run(SimConfig {
        queue_limit: Some(0),
        ..SimConfig::default()
    });
    assert!(
        matches!(
            refused,
            Err(SimError::Option {
                option: "queue_limit",
                ..
            })
        ),
        "{refused:?}"
    );
}
