//! Golden figures of the committed Philly trace, so a change that moves the simulator's results
//! (or the engine's decisions) is seen. Recorded with the engine of this revision; when a
//! deliberate change of policy moves them, record the new figures here with the reason.
//!
//! The run: Philly on futian-2024, each GPU 312 TFLOPS, jobs 8 times as large (up to 384
//! devices) arriving 2 times as fast, seed 1, so that large gangs queue.
//!
//! The costs moved once, deliberately, when the fleet files gained billing increments (the
//! district's pools per started minute, external pools per started hour): same decisions,
//! about 2% more charged.

use suanli_core::{Catalogue, Policy};
use suanli_sim::accounts::Fen;
use suanli_sim::{RequestRule, SimConfig, SubsidyPolicy, Workload, fleet_by_name, simulate};

#[test]
fn philly_on_futian_2024_golden_figures() {
    let catalogue = Catalogue::builtin();
    let fleet = fleet_by_name("futian-2024", &catalogue).unwrap();
    let workload = Workload::by_name("philly", 1, &catalogue, false).unwrap();
    let config = SimConfig {
        rule: RequestRule {
            load_factor: 2.0,
            size_factor: 8.0,
            ..RequestRule::default()
        },
        ..SimConfig::default()
    };
    let s = simulate(&fleet, &catalogue, workload, &config)
        .unwrap()
        .summary;
    let got = format!(
        "jobs {} completed {} unserved {} offered {:.1}P utilisation {:.4} wait mean {:.1}s p50 {:.1}s p99 {:.1}s jct mean {:.1}s slowdown {:.3} jain {:.4} fragmentation {:.4} cost {:.0}",
        s.jobs,
        s.completed,
        s.unserved,
        s.offered_p,
        s.utilisation,
        s.wait_mean_s,
        s.wait_p50_s,
        s.wait_p99_s,
        s.jct_mean_s,
        s.bounded_slowdown_mean,
        s.jain_fairness,
        s.fragmentation,
        s.cost_yuan
    );
    assert_eq!(
        got,
        "jobs 15000 completed 15000 unserved 0 offered 2765.0P utilisation 0.1598 wait mean 4230.8s \
         p50 0.0s p99 97799.0s jct mean 79184.6s slowdown 5.139 jain 0.8420 fragmentation 0.9807 \
         cost 40342074"
    );
}

/// The same run under a subsidy policy: a 50% voucher on the local pools for each of Philly's
/// 136 tenants, ¥200,000 face value, at most ¥5,000 per lease. Figures in exact fen.
#[test]
fn philly_on_futian_2024_golden_subsidy() {
    let catalogue = Catalogue::builtin();
    let fleet = fleet_by_name("futian-2024", &catalogue).unwrap();
    let workload = Workload::by_name("philly", 1, &catalogue, false).unwrap();
    let mut subsidy = SubsidyPolicy::parse("50%@local").unwrap();
    subsidy.per_tenant = Some(Fen(20_000_000));
    subsidy.per_lease_cap = Some(Fen(500_000));
    let config = SimConfig {
        rule: RequestRule {
            load_factor: 2.0,
            size_factor: 8.0,
            ..RequestRule::default()
        },
        subsidy: Some(subsidy),
        ..SimConfig::default()
    };
    let s = simulate(&fleet, &catalogue, workload, &config)
        .unwrap()
        .summary;
    let got = format!(
        "leases {} cost {} subsidy {} tenants paid {} local_centre {:.2} local_cloud {:.2} external {:.2} vouchers {} exhausted {}",
        s.leases_settled,
        s.cost_fen,
        s.subsidy_fen,
        s.tenant_paid_fen,
        s.subsidy_by_pool_kind["local_centre"],
        s.subsidy_by_pool_kind["local_cloud"],
        s.subsidy_by_pool_kind["external"],
        s.vouchers_issued,
        s.vouchers_exhausted
    );
    assert_eq!(
        got,
        "leases 15000 cost 4034207356 subsidy 239301390 tenants paid 3794905966 local_centre \
         1917947.39 local_cloud 475066.51 external 0.00 vouchers 136 exhausted 2"
    );
    assert_eq!(s.cost_fen, s.subsidy_fen + s.tenant_paid_fen);
}

/// With a voucher that pays half on the district's own pools, the policy "cheapest after
/// subsidy" sends work where tenants pay least after it: more of it runs on the local pools,
/// the vouchers pay more, and tenants pay less than under plain "cheapest", whose ranking
/// ignores the voucher.
#[test]
fn cheapest_after_subsidy_moves_work_to_the_subsidised_pools() {
    let catalogue = Catalogue::builtin();
    let fleet = fleet_by_name("futian-2024", &catalogue).unwrap();
    let run = |policy: Policy| {
        let workload = Workload::by_name("philly", 1, &catalogue, false).unwrap();
        let config = SimConfig {
            rule: RequestRule {
                load_factor: 2.0,
                size_factor: 8.0,
                ..RequestRule::default()
            },
            policy,
            subsidy: Some(SubsidyPolicy::parse("50%@local").unwrap()),
            ..SimConfig::default()
        };
        simulate(&fleet, &catalogue, workload, &config)
            .unwrap()
            .summary
    };
    let plain = run(Policy::Cheapest);
    let aware = run(Policy::CheapestAfterSubsidy);
    assert_eq!(aware.completed, plain.completed);
    assert!(
        aware.utilisation_local > plain.utilisation_local,
        "local utilisation {} vs {}",
        aware.utilisation_local,
        plain.utilisation_local
    );
    assert!(aware.subsidy_fen > plain.subsidy_fen);
    assert!(
        aware.tenant_paid_fen < plain.tenant_paid_fen,
        "tenants paid {} vs {}",
        aware.tenant_paid_fen,
        plain.tenant_paid_fen
    );
    eprintln!(
        "local utilisation {:.4} -> {:.4}, subsidy {} -> {}, tenants paid {} -> {}, wait mean {:.0}s -> {:.0}s",
        plain.utilisation_local,
        aware.utilisation_local,
        plain.subsidy_fen,
        aware.subsidy_fen,
        plain.tenant_paid_fen,
        aware.tenant_paid_fen,
        plain.wait_mean_s,
        aware.wait_mean_s
    );
}
