//! What a subsidy policy costs, through whole runs:
//! - the run's ledger balances: cost = subsidy + what tenants paid, to the fen, and its cost
//!   agrees with the engine's price per hour times the time held, to half a fen per lease part;
//! - a 100% voucher without limit on all pools leaves tenants nothing to pay;
//! - a voucher for the local pools pays nothing on a fleet of external pools only;
//! - the face value per tenant bounds the subsidy at tenants x face value, a cap per lease at
//!   leases x cap;
//! - the same seed gives the same figures.

use suanli_core::{Catalogue, Fleet, Priority};
use suanli_sim::job::{Job, JobShape};
use suanli_sim::trace::Trace;
use suanli_sim::{Failures, SimConfig, SubsidyPolicy, Summary, Workload, simulate};

fn pool(id: &str, kind: &str, model: &str, nodes: u32, price: u64) -> String {
    format!(
        "[[pool]]\nid = \"{id}\"\nkind = \"{kind}\"\nregion = \"r\"\nrtt_ms = 5\n\
         data_zone = \"mainland\"\n[[pool.group]]\nmodel = \"{model}\"\n\
         devices_per_node = 8\nnodes = {nodes}\ninterconnect = \"nvlink\"\n\
         price_fen_per_device_hour = {price}\n"
    )
}

/// Local and external pools, with different prices.
fn mixed_fleet() -> Fleet {
    let text = format!(
        "name = \"mixed\"\n{}{}{}",
        pool("centre", "local_centre", "ascend-910b", 2, 1_200),
        pool("cloud", "local_cloud", "h800", 2, 1_800),
        pool("far", "external", "a800", 3, 900),
    );
    Fleet::from_toml(&text, &Catalogue::builtin()).expect("valid fleet")
}

/// External pools only.
fn external_fleet() -> Fleet {
    let text = format!(
        "name = \"external\"\n{}{}",
        pool("far", "external", "a800", 3, 900),
        pool("farther", "external", "h800", 2, 1_500),
    );
    Fleet::from_toml(&text, &Catalogue::builtin()).expect("valid fleet")
}

const TENANTS: usize = 5;

/// 300 jobs of five tenants, gangs and elastic, with run times that are not whole hours.
fn workload() -> Workload {
    let mut trace = Trace::new("mixed");
    trace.tenants = (0..TENANTS).map(|t| format!("t{t}")).collect();
    let mut clock = 0;
    for i in 0..300u64 {
        clock += (i * 7_919) % 900 * 1_000;
        trace.jobs.push(Job {
            submit_ms: clock,
            duration_ms: 60_000 + (i * 104_729) % 7_200_000 + i,
            devices: 1 + (i % 16) as u32,
            nodes: None,
            model: None,
            tenant: (i % TENANTS as u64) as u32,
            priority: if i % 5 == 0 {
                Priority::Spot
            } else {
                Priority::Standard
            },
            shape: if i % 3 == 0 {
                JobShape::Elastic
            } else {
                JobShape::Gang
            },
            deadline_after_ms: None,
        });
    }
    Workload::from_trace(trace)
}

fn policy(text: &str, per_tenant_fen: Option<i64>, cap_fen: Option<i64>) -> SubsidyPolicy {
    let mut p = SubsidyPolicy::parse(text).expect("valid policy");
    p.per_tenant = per_tenant_fen.map(suanli_billing::Fen);
    p.per_lease_cap = cap_fen.map(suanli_billing::Fen);
    p
}

fn run(fleet: &Fleet, subsidy: Option<SubsidyPolicy>, failures: bool) -> Summary {
    let config = SimConfig {
        seed: 7,
        failures: failures.then_some(Failures {
            mtbf_h: 3.0,
            mttr_h: 0.5,
        }),
        subsidy,
        ..SimConfig::default()
    };
    simulate(fleet, &Catalogue::builtin(), workload(), &config)
        .expect("runs")
        .summary
}

fn assert_balanced(s: &Summary) {
    assert!(s.cost_fen > 0, "a run with leases costs something");
    assert_eq!(s.cost_fen, s.subsidy_fen + s.tenant_paid_fen, "{s:?}");
    let by_kind: f64 = s.subsidy_by_pool_kind.values().sum();
    assert!((by_kind - s.subsidy_yuan).abs() < 0.005, "{s:?}");
    // Each lease part is rounded to the fen, half up: at most half a fen apart per part, and
    // a lease has at most one part per node group (three here).
    let bound = s.leases_settled as f64 * 3.0 * 0.005;
    assert!(
        (s.cost_yuan - s.cost_unrounded_yuan).abs() <= bound,
        "ledger {} vs price x time {}",
        s.cost_yuan,
        s.cost_unrounded_yuan
    );
}

#[test]
fn the_ledger_of_a_run_balances_with_lost_and_requeued_leases() {
    let p = policy("50%@local", Some(50_000), Some(2_000));
    let s = run(&mixed_fleet(), Some(p), true);
    assert_balanced(&s);
    assert!(s.subsidy_fen > 0);
    assert_eq!(s.subsidy_by_pool_kind["external"], 0.0);
    assert!(s.requeues > 0, "pool failures requeue leases: {s:?}");
    // Every attempt is its own lease: more leases than jobs placed.
    assert!(s.leases_settled > s.placed, "{s:?}");
    assert_eq!(s.leases_open_at_end, 0);
    assert_eq!(s.vouchers_issued, TENANTS as u64);
    // Without a policy the cost is the same and nobody is subsidised.
    let none = run(&mixed_fleet(), None, true);
    assert_balanced(&none);
    assert_eq!(none.cost_fen, s.cost_fen);
    assert_eq!((none.subsidy_fen, none.vouchers_issued), (0, 0));
    assert_eq!(none.subsidy_policy, None);
}

#[test]
fn a_full_unlimited_voucher_on_all_pools_leaves_tenants_nothing_to_pay() {
    let s = run(&mixed_fleet(), Some(policy("100%@all", None, None)), false);
    assert_balanced(&s);
    assert_eq!(s.tenant_paid_fen, 0);
    assert_eq!(s.subsidy_fen, s.cost_fen);
    assert_eq!(s.subsidy_share, 1.0);
    assert_eq!(s.vouchers_exhausted, 0);
    assert!(s.subsidy_by_pool_kind.values().all(|&y| y > 0.0), "{s:?}");
}

#[test]
fn a_local_voucher_pays_nothing_on_external_pools() {
    let local = run(
        &external_fleet(),
        Some(policy("100%@local", None, None)),
        false,
    );
    assert_balanced(&local);
    assert_eq!(local.subsidy_fen, 0);
    assert_eq!(local.tenant_paid_fen, local.cost_fen);
    // The same voucher on all pools does pay there: the local scope is what kept it out.
    let all = run(
        &external_fleet(),
        Some(policy("100%@all", None, None)),
        false,
    );
    assert_eq!(all.subsidy_fen, local.cost_fen);
    let external = run(
        &external_fleet(),
        Some(policy("30%@external", None, None)),
        false,
    );
    assert!(external.subsidy_fen > 0 && external.subsidy_fen < external.cost_fen);
}

#[test]
fn face_value_and_cap_bound_the_subsidy() {
    let fleet = mixed_fleet();
    let unlimited = run(&fleet, Some(policy("100%", None, None)), false);
    // ¥10 per tenant is far less than any tenant's bill: every voucher runs out, and the
    // district pays exactly tenants x face value.
    let face = 1_000;
    let s = run(&fleet, Some(policy("100%", Some(face), None)), false);
    assert_balanced(&s);
    assert!(unlimited.subsidy_fen > TENANTS as i64 * face);
    assert_eq!(s.vouchers_exhausted, TENANTS as u64);
    assert_eq!(s.subsidy_fen, TENANTS as i64 * face);
    assert_eq!(
        s.vouchers_face_yuan,
        Some(TENANTS as f64 * face as f64 / 100.0)
    );
    // A cap of ¥1 per lease: at most leases x ¥1.
    let capped = run(&fleet, Some(policy("100%", None, Some(100))), false);
    assert_balanced(&capped);
    assert!(capped.subsidy_fen <= capped.leases_settled as i64 * 100);
    assert!(capped.subsidy_fen > 0 && capped.subsidy_fen < unlimited.subsidy_fen);
}

#[test]
fn the_same_seed_gives_the_same_figures() {
    let p = policy("40%@local_cloud,external", Some(20_000), Some(5_000));
    let a = run(&mixed_fleet(), Some(p.clone()), true);
    let b = run(&mixed_fleet(), Some(p), true);
    assert_eq!(a, b);
    assert_eq!(a.cost_unrounded_yuan, b.cost_unrounded_yuan);
    assert!(a.subsidy_fen > 0);
}

#[test]
fn a_bad_policy_is_refused_naming_the_option() {
    let mut p = policy("50%", None, None);
    p.rate_bp = 0;
    let config = SimConfig {
        subsidy: Some(p),
        ..SimConfig::default()
    };
    let err = simulate(&mixed_fleet(), &Catalogue::builtin(), workload(), &config).unwrap_err();
    assert!(err.to_string().contains("option subsidy"), "{err}");
}
