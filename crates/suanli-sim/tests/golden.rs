//! Golden figures of the committed Philly trace, so a change that moves the simulator's results
//! (or the engine's decisions) is seen. Recorded with the engine of this revision; when a
//! deliberate change of policy moves them, record the new figures here with the reason.
//!
//! The run: Philly on futian-2024, each GPU 312 TFLOPS, jobs 8 times as large (up to 384
//! devices) arriving 2 times as fast, seed 1, so that large gangs queue.

use suanli_core::Catalogue;
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
         cost 39588221"
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
        "leases 15000 cost 3958822135 subsidy 238959210 tenants paid 3719862925 local_centre \
         1915447.54 local_cloud 474144.56 external 0.00 vouchers 136 exhausted 2"
    );
    assert_eq!(s.cost_fen, s.subsidy_fen + s.tenant_paid_fen);
}
