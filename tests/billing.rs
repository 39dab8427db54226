//! Accounting end to end: vouchers issued over gRPC pay their share of a lease run on the
//! broker, statements match what `suanli-billing` computes from the lease's record, budgets
//! refuse submissions by name, quotes show the subsidy, and a restart recovers the same ledger.

use std::time::Duration;

use suanli_billing::{Fen, LeaseId, LeasePart, LeaseUsage, Ledger, Month, VoucherScope};
use suanli_core::PoolKind;
use suanli_e2e::{Broker, gang, submit, test_config};
use suanli_proto::v1 as pb;
use tonic::Code;

const HOUR: u64 = 3_600_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A 50% voucher on the district's own pools, valid from an hour ago for 30 days.
fn local_voucher(id: &str, tenant: &str, face_yuan: i64, from: u64) -> pb::VoucherSpec {
    pb::VoucherSpec {
        id: id.into(),
        tenant: tenant.into(),
        face_value_fen: face_yuan * 100,
        rate_bp: 5_000,
        per_lease_cap_fen: None,
        scope: Some(pb::VoucherScope {
            pool_kinds: vec![
                pb::PoolKind::LocalCentre as i32,
                pb::PoolKind::LocalCloud as i32,
            ],
            ..Default::default()
        }),
        valid_from_unix_ms: from,
        valid_until_unix_ms: from + 30 * 24 * HOUR,
    }
}

fn issue(spec: pb::VoucherSpec) -> pb::IssueVoucherRequest {
    pb::IssueVoucherRequest {
        voucher: Some(spec),
        request_id: String::new(),
    }
}

/// What the broker's ledger should hold for `record`'s lease, computed by the accounting core
/// from the record alone: its running time, its parts and their prices fixed at placement.
fn usage_from_record(record: &pb::Request) -> LeaseUsage {
    let lease = record.lease.as_ref().expect("a lease");
    let devices: u64 = lease.parts.iter().map(|p| u64::from(p.devices)).sum();
    let part = &lease.parts[0];
    assert!(
        lease
            .parts
            .iter()
            .all(|p| p.pool == part.pool && p.group == part.group)
    );
    LeaseUsage {
        lease: LeaseId::new(format!("r{}#{}", record.id, record.leases)),
        tenant: record.tenant.clone(),
        started_at: lease.running_since_unix_ms.expect("it ran"),
        ended_at: record.update_time_unix_ms,
        parts: vec![LeasePart {
            pool: part.pool.clone(),
            pool_kind: PoolKind::LocalCentre,
            model: part.model.clone(),
            devices,
            // h100: 989 dense FP16 TFLOPS per device.
            tflops: devices * 989,
            price_per_device_hour: Fen(part.price_fen_per_device_hour as i64),
            billing_increment_ms: None,
        }],
    }
}

#[tokio::test]
async fn a_voucher_pays_half_of_a_local_lease_and_the_ledger_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // Snapshots now and then: recovery reads the ledger from one and replays the log after it.
    config.snapshot_every = 4;
    let broker = Broker::start(config.clone()).await;
    let mut op = broker.operator(&broker.creds.operator.clone()).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let mut b = broker.tenant(&broker.tenant_token("tenant-b")).await;
    let from = now_ms() - HOUR;

    let spec_a = local_voucher("FT-A-1", "tenant-a", 10_000, from);
    let issued = op
        .issue_voucher(issue(spec_a.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.spec.as_ref(), Some(&spec_a));
    assert_eq!(issued.remaining_fen, 1_000_000);
    assert_eq!(issued.scope_label, "kinds:local_centre;local_cloud");
    op.issue_voucher(issue(local_voucher("FT-B-1", "tenant-b", 500, from)))
        .await
        .unwrap();
    // The same id again is refused; a retry under the same request_id is not.
    let again = op.issue_voucher(issue(spec_a.clone())).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    // A second voucher, valid only on the external pool: it pays nothing below.
    let keyed = pb::IssueVoucherRequest {
        voucher: Some(pb::VoucherSpec {
            scope: Some(pb::VoucherScope {
                pools: vec!["far".into()],
                ..Default::default()
            }),
            ..local_voucher("FT-A-2", "tenant-a", 1, from)
        }),
        request_id: "issue-a-2".into(),
    };
    op.issue_voucher(keyed.clone()).await.unwrap();
    op.issue_voucher(keyed).await.unwrap();

    // Each tenant sees its own vouchers only.
    let mine = a
        .list_vouchers(pb::ListVouchersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vouchers;
    let ids: Vec<_> = mine
        .iter()
        .map(|v| v.spec.as_ref().unwrap().id.as_str())
        .collect();
    assert_eq!(ids, ["FT-A-1", "FT-A-2"]);
    let theirs = a
        .list_vouchers(pb::ListVouchersRequest {
            tenant: "tenant-b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(theirs.code(), Code::PermissionDenied);
    let b_sees = b
        .list_vouchers(pb::ListVouchersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vouchers;
    assert_eq!(b_sees.len(), 1);
    assert_eq!(b_sees[0].spec.as_ref().unwrap().id, "FT-B-1");
    let statement_of_b = a
        .get_statement(pb::GetStatementRequest {
            tenant: "tenant-b".into(),
            month: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(statement_of_b.code(), Code::PermissionDenied);

    // The quote shows the price before and after subsidy: 8 h100 at ¥30 for an hour on the
    // local pool, half paid by the voucher on local pools.
    let q = a
        .quote_request(pb::QuoteRequestRequest {
            spec: Some(gang(1, 8, "h100", HOUR)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.pools, ["near"]);
    assert_eq!(q.estimated_cost_fen, 24_000);
    assert_eq!(q.estimated_subsidy_fen, 12_000);
    assert_eq!(q.estimated_due_fen, 12_000);
    // Tenant b's voucher is on local pools: on the external pool it pays nothing.
    let far = pb::RequestSpec {
        constraints: Some(pb::Constraints {
            models: vec!["a800".into()],
            ..Default::default()
        }),
        ..gang(1, 8, "a800", HOUR)
    };
    let q = b
        .quote_request(pb::QuoteRequestRequest { spec: Some(far) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.pools, ["far"]);
    assert_eq!(q.estimated_cost_fen, 8_000);
    assert_eq!((q.estimated_subsidy_fen, q.estimated_due_fen), (0, 8_000));

    // A lease runs on the simulated local pool and is released.
    let r = a
        .submit_request(submit("run-1", gang(1, 8, "h100", HOUR)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.leases, 1);
    let placed = r.lease.as_ref().unwrap();
    assert!(
        placed
            .parts
            .iter()
            .all(|p| p.price_fen_per_device_hour == 3_000)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done = a
        .release_request(pb::ReleaseRequestRequest {
            name: r.name.clone(),
            request_id: "rel-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state(), pb::RequestState::Completed);

    // The statement is what the accounting core computes from the record.
    let usage = usage_from_record(&done);
    let mut expected = Ledger::new();
    let from_ms = spec_a.valid_from_unix_ms;
    expected
        .issue_voucher(
            suanli_billing::VoucherSpec {
                id: suanli_billing::VoucherId::new("FT-A-1"),
                tenant: "tenant-a".into(),
                face_value: Fen::from_yuan(10_000).unwrap(),
                rate_bp: 5_000,
                per_lease_cap: None,
                scope: VoucherScope::local_pools(),
                valid_from: from_ms,
                valid_until: from_ms + 30 * 24 * HOUR,
            },
            from_ms,
        )
        .unwrap();
    let bill = expected.settle(usage.clone(), usage.ended_at).unwrap();
    let bill = bill.settlement.bill;
    assert!(
        bill.charge.is_positive(),
        "the lease ran for {} ms",
        usage.running_ms()
    );
    let month = Month::containing(usage.ended_at);
    let statement = a
        .get_statement(pb::GetStatementRequest {
            tenant: String::new(),
            month: month.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(statement.leases, 1);
    assert_eq!(statement.cost_fen, bill.charge.fen());
    assert_eq!(statement.subsidy_fen, bill.subsidy.fen());
    assert_eq!(statement.due_fen, bill.tenant_due.fen());
    assert_eq!(statement.payable_fen, bill.tenant_due.fen());
    assert_eq!(
        statement.cost_fen,
        statement.subsidy_fen + statement.due_fen
    );
    assert_eq!(statement.lines.len(), 1);
    assert_eq!(statement.lines[0].pool_kind(), pb::PoolKind::LocalCentre);
    assert!(
        statement.usage_csv.starts_with("tenant,"),
        "{}",
        statement.usage_csv
    );
    let used = statement
        .vouchers
        .iter()
        .find(|v| v.voucher == "FT-A-1")
        .unwrap();
    assert_eq!(used.used_in_month_fen, bill.subsidy.fen());
    // The operator reads the same statement, and the subsidy in its report.
    let seen_by_op = op
        .get_statement(pb::GetStatementRequest {
            tenant: "tenant-a".into(),
            month: month.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen_by_op, statement);
    let report = op
        .get_subsidy_report(pb::GetSubsidyReportRequest {
            first_month: month.to_string(),
            last_month: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.months.len(), 1);
    assert_eq!(report.months[0].spent_fen, bill.subsidy.fen());
    assert_eq!(
        report.months[0].by_pool_kind,
        [pb::PoolKindAmount {
            pool_kind: pb::PoolKind::LocalCentre as i32,
            amount_fen: bill.subsidy.fen(),
        }]
    );
    let balances = op
        .list_vouchers(pb::ListVouchersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balances.vouchers.len(), 3);
    assert_eq!(balances.vouchers[0].used_fen, bill.subsidy.fen());

    // A restart recovers the same ledger, statement and balances.
    let summary = broker.stop_summary().await;
    assert_eq!(summary.ledger.settlements().count(), 1);
    assert_eq!(
        suanli_broker::recovered_ledger(&config).unwrap(),
        summary.ledger
    );
    let broker = Broker::start(config.clone()).await;
    let mut op = broker.operator(&broker.creds.operator.clone()).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let after = a
        .get_statement(pb::GetStatementRequest {
            tenant: String::new(),
            month: month.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, statement);
    let balances_after = op
        .list_vouchers(pb::ListVouchersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balances_after, balances);
    let summary_after = broker.stop_summary().await;
    assert_eq!(summary_after.ledger, summary.ledger);
}

#[tokio::test]
async fn a_budget_refuses_a_submission_by_name_and_bad_fields_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let mut op = broker.operator(&broker.creds.operator.clone()).await;
    let mut c = broker.tenant(&broker.tenant_token("tenant-c")).await;

    let budget = |limit_fen, period: pb::BudgetPeriod| pb::SetBudgetRequest {
        tenant: "tenant-c".into(),
        budget: Some(pb::Budget {
            limit_fen,
            period: period as i32,
        }),
        request_id: String::new(),
    };
    let set = op
        .set_budget(budget(10_000, pb::BudgetPeriod::Monthly))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        set.budget,
        Some(pb::Budget {
            limit_fen: 10_000,
            period: pb::BudgetPeriod::Monthly as i32
        })
    );
    // An hour of 8 h100 costs ¥240: past the ¥100 monthly budget.
    let refused = c
        .submit_request(submit("big", gang(1, 8, "h100", HOUR)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let m = refused.message();
    assert!(
        m.contains("tenant-c") && m.contains("monthly") && m.contains("budget"),
        "{m}"
    );
    assert!(m.contains("¥100.00") && m.contains("¥240.00"), "{m}");
    // A refused submission is not a request.
    let listed = c
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.requests.is_empty());
    // A quarter of an hour (¥60) fits.
    c.submit_request(submit("small", gang(1, 8, "h100", HOUR / 4)))
        .await
        .unwrap();
    // Removing the budget lets the big one through.
    op.set_budget(pb::SetBudgetRequest {
        tenant: "tenant-c".into(),
        budget: None,
        request_id: String::new(),
    })
    .await
    .unwrap();
    c.submit_request(submit("big", gang(1, 8, "h100", HOUR)))
        .await
        .unwrap();

    // Bad input is INVALID_ARGUMENT naming the field; unknown tenants are NOT_FOUND.
    let unspecified = op
        .set_budget(budget(100, pb::BudgetPeriod::Unspecified))
        .await
        .unwrap_err();
    assert_eq!(unspecified.code(), Code::InvalidArgument);
    assert!(unspecified.message().contains("budget.period"));
    let negative = op
        .set_budget(budget(-1, pb::BudgetPeriod::Total))
        .await
        .unwrap_err();
    assert!(
        negative.message().contains("budget.limit_fen"),
        "{negative:?}"
    );
    let from = now_ms();
    for (field, spec) in [
        (
            "voucher.rate_bp",
            pb::VoucherSpec {
                rate_bp: 0,
                ..local_voucher("x", "tenant-c", 1, from)
            },
        ),
        (
            "voucher.rate_bp",
            pb::VoucherSpec {
                rate_bp: 10_001,
                ..local_voucher("x", "tenant-c", 1, from)
            },
        ),
        (
            "voucher.face_value_fen",
            pb::VoucherSpec {
                face_value_fen: 0,
                ..local_voucher("x", "tenant-c", 1, from)
            },
        ),
        (
            "voucher.id",
            pb::VoucherSpec {
                id: String::new(),
                ..local_voucher("x", "tenant-c", 1, from)
            },
        ),
        (
            "voucher.scope",
            pb::VoucherSpec {
                scope: Some(pb::VoucherScope {
                    all_pools: true,
                    pools: vec!["near".into()],
                    pool_kinds: vec![],
                }),
                ..local_voucher("x", "tenant-c", 1, from)
            },
        ),
        (
            "voucher.scope.pool_kinds",
            pb::VoucherSpec {
                scope: Some(pb::VoucherScope {
                    pool_kinds: vec![0],
                    ..Default::default()
                }),
                ..local_voucher("x", "tenant-c", 1, from)
            },
        ),
        (
            "voucher.valid_until_unix_ms",
            pb::VoucherSpec {
                valid_until_unix_ms: from,
                ..local_voucher("x", "tenant-c", 1, from)
            },
        ),
        (
            "voucher.per_lease_cap_fen",
            pb::VoucherSpec {
                per_lease_cap_fen: Some(-5),
                ..local_voucher("x", "tenant-c", 1, from)
            },
        ),
    ] {
        let e = op.issue_voucher(issue(spec)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {e:?}");
    }
    let missing = op
        .issue_voucher(pb::IssueVoucherRequest::default())
        .await
        .unwrap_err();
    assert!(missing.message().contains("voucher"), "{missing:?}");
    let nobody = op
        .issue_voucher(issue(local_voucher("x", "nobody", 1, from)))
        .await
        .unwrap_err();
    assert_eq!(nobody.code(), Code::NotFound);
    let month = op
        .get_statement(pb::GetStatementRequest {
            tenant: "tenant-c".into(),
            month: "2025-13".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(month.code(), Code::InvalidArgument);
    assert!(month.message().contains("month"), "{month:?}");
    // Tenants may not issue vouchers or set budgets.
    let mut as_tenant = broker.operator(&broker.tenant_token("tenant-c")).await;
    let denied = as_tenant
        .set_budget(budget(1, pb::BudgetPeriod::Total))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    broker.stop().await;
}

#[tokio::test]
async fn the_ledger_is_rebuilt_from_the_command_log_alone() {
    // No snapshot: recovery replays the whole log, settlements included.
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let broker = Broker::start(config.clone()).await;
    let mut op = broker.operator(&broker.creds.operator.clone()).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    op.issue_voucher(issue(local_voucher(
        "FT-LOG",
        "tenant-a",
        100,
        now_ms() - HOUR,
    )))
    .await
    .unwrap();
    let r = a
        .submit_request(submit("log-1", gang(2, 8, "h100", HOUR)))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.cancel_request(pb::CancelRequestRequest {
        name: r.name,
        request_id: "cancel-log-1".into(),
    })
    .await
    .unwrap();
    let summary = broker.stop_summary().await;
    let settled: Vec<_> = summary.ledger.settlements().collect();
    assert_eq!(
        settled.len(),
        1,
        "a lease cancelled while running is charged"
    );
    assert_eq!(
        settled[0].bill.usage.lease,
        LeaseId::new(format!("r{}#1", r.id))
    );
    let bill = &settled[0].bill;
    assert_eq!(
        bill.charge.fen(),
        bill.subsidy.fen() + bill.tenant_due.fen()
    );
    let recovered = suanli_broker::recovered_ledger(&config).unwrap();
    assert_eq!(recovered, summary.ledger);
    assert_eq!(recovered.totals(), summary.ledger.totals());
}

/// The small fleet with the local pool billing per started hour.
fn fleet_billing_hourly_locally() -> suanli_core::Fleet {
    let text = suanli_e2e::SMALL_FLEET.replacen(
        "data_zone = \"mainland\"",
        "data_zone = \"mainland\"\nbilling_increment_s = 3600",
        1,
    );
    suanli_core::Fleet::from_toml(&text, &suanli_core::Catalogue::builtin()).unwrap()
}

/// A gang of one node of 8 devices, of h100 (local, ¥30) or a800 (external, ¥10), placed
/// by what the tenant pays after its vouchers.
fn after_subsidy(request_id: &str) -> pb::SubmitRequestRequest {
    let spec = pb::RequestSpec {
        constraints: Some(pb::Constraints {
            models: vec!["h100".into(), "a800".into()],
            ..Default::default()
        }),
        policy: pb::Policy::CheapestAfterSubsidy as i32,
        ..gang(1, 8, "h100", HOUR)
    };
    submit(request_id, spec)
}

fn pools_of(r: &pb::Request) -> Vec<String> {
    let mut pools: Vec<String> = r
        .lease
        .iter()
        .flat_map(|l| l.parts.iter().map(|p| p.pool.clone()))
        .collect();
    pools.dedup();
    pools
}

#[tokio::test]
async fn cheapest_after_subsidy_follows_the_vouchers_and_replays_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.fleet = fleet_billing_hourly_locally();
    config.snapshot_every = 5;
    let broker = Broker::start(config.clone()).await;
    let mut op = broker.operator(&broker.creds.operator.clone()).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let mut c = broker.tenant(&broker.tenant_token("tenant-c")).await;
    let now = now_ms();
    // Tenant a: 70% off the local pool now, ¥100 in all. Tenant c: the same from 1.5 s on.
    let seventy = |id: &str, tenant: &str, from: u64| pb::VoucherSpec {
        rate_bp: 7_000,
        ..local_voucher(id, tenant, 100, from)
    };
    op.issue_voucher(issue(seventy("A-70", "tenant-a", now - HOUR)))
        .await
        .unwrap();
    let c_from = now_ms() + 1_500;
    op.issue_voucher(issue(seventy("C-70", "tenant-c", c_from)))
        .await
        .unwrap();

    // ¥30 x 30% = ¥9 a device-hour locally for a, below the external ¥10: placement ranks by
    // the voucher's rate; the quote pays no more than its ¥100 balance.
    let q = a
        .quote_request(pb::QuoteRequestRequest {
            spec: after_subsidy("").spec,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.pools, ["near"]);
    assert_eq!(
        (q.estimated_cost_fen, q.estimated_due_fen),
        (24_000, 14_000)
    );
    let ra = a
        .submit_request(after_subsidy("a-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pools_of(&ra), ["near"]);
    assert_eq!(
        ra.lease.as_ref().unwrap().parts[0].billing_increment_s,
        Some(3_600),
        "the pool's increment is fixed on the lease"
    );
    // Plain cheapest ignores the voucher; c's voucher is not valid yet.
    let mut plain = after_subsidy("a-plain");
    plain.spec.as_mut().unwrap().policy = pb::Policy::Cheapest as i32;
    let rp = a.submit_request(plain).await.unwrap().into_inner();
    assert_eq!(pools_of(&rp), ["far"]);
    a.release_request(pb::ReleaseRequestRequest {
        name: rp.name.clone(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    let rc = c
        .submit_request(after_subsidy("c-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pools_of(&rc), ["far"], "c's voucher is not valid yet");
    c.release_request(pb::ReleaseRequestRequest {
        name: rc.name.clone(),
        request_id: String::new(),
    })
    .await
    .unwrap();

    // a's lease ran well under an hour but the pool bills per started hour: ¥240, of which
    // the voucher pays 70% = ¥168, more than its ¥100: it runs out.
    let done = a
        .release_request(pb::ReleaseRequestRequest {
            name: ra.name.clone(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let month = Month::containing(done.update_time_unix_ms).to_string();
    let statement = a
        .get_statement(pb::GetStatementRequest {
            tenant: String::new(),
            month: month.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(statement.leases, 2);
    let far_hour_share = statement.cost_fen - 24_000;
    // The external lease ran a few ms, billed to the millisecond.
    assert!((0..8_000).contains(&far_hour_share), "{statement:?}");
    assert_eq!(statement.subsidy_fen, 10_000, "{statement:?}");
    // Without a voucher, a goes where the list price is lowest again.
    let ra2 = a
        .submit_request(after_subsidy("a-2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pools_of(&ra2), ["far"], "a's voucher ran out");

    // Once c's voucher is valid, c's requests go to the local pool.
    let wait = c_from.saturating_sub(now_ms()) + 200;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let rc2 = c
        .submit_request(after_subsidy("c-2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pools_of(&rc2), ["near"], "c's voucher is valid now");

    // Replay reaches the same engine (placements and what it was told of vouchers) and ledger.
    let summary = broker.stop_summary().await;
    assert_eq!(
        suanli_broker::recovered_digest(&config).unwrap(),
        summary.digest
    );
    assert_eq!(
        suanli_broker::recovered_ledger(&config).unwrap(),
        summary.ledger
    );
}

#[tokio::test]
async fn a_budget_holds_placed_leases_against_concurrent_submissions() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let broker = Broker::start(config.clone()).await;
    let mut op = broker.operator(&broker.creds.operator.clone()).await;
    let c = broker.tenant(&broker.tenant_token("tenant-c")).await;
    // ¥300 a month; an hour of 8 h100 is ¥240 and two are placeable at once.
    op.set_budget(pb::SetBudgetRequest {
        tenant: "tenant-c".into(),
        budget: Some(pb::Budget {
            limit_fen: 30_000,
            period: pb::BudgetPeriod::Monthly as i32,
        }),
        request_id: String::new(),
    })
    .await
    .unwrap();
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (r1, r2) = tokio::join!(
        c1.submit_request(submit("one", gang(1, 8, "h100", HOUR))),
        c2.submit_request(submit("two", gang(1, 8, "h100", HOUR))),
    );
    let (ok, refused): (Vec<_>, Vec<_>) = [r1, r2].into_iter().partition(|r| r.is_ok());
    assert_eq!((ok.len(), refused.len()), (1, 1), "one fits, not both");
    let refused = refused.into_iter().next().unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("¥240.00 already committed"),
        "the placed lease is held: {}",
        refused.message()
    );
    // Released after a moment, the lease is charged what it ran and its hold goes. Half a
    // second at ¥240 an hour is 3.3 fen: long enough to round to a charge.
    let placed = ok.into_iter().next().unwrap().unwrap().into_inner();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut c = c;
    c.release_request(pb::ReleaseRequestRequest {
        name: placed.name.clone(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    c.submit_request(submit("three", gang(1, 8, "h100", HOUR)))
        .await
        .expect("the hold is released at settlement");
    let summary = broker.stop_summary().await;
    let account = summary.ledger.tenant("tenant-c").unwrap();
    assert_eq!(account.held, Fen(24_000), "only the open lease is held");
    assert!(account.spent_total.is_positive() && account.spent_total < Fen(100));
}

#[tokio::test]
async fn a_requeued_lease_is_settled_and_its_next_placement_is_a_lease_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let broker = Broker::start(config.clone()).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let mut b = broker.tenant(&broker.tenant_token("tenant-b")).await;
    // Spot work on both local nodes, to be requeued when preempted.
    let spot = pb::RequestSpec {
        priority: pb::Priority::Spot as i32,
        requeue: true,
        ..gang(2, 8, "h100", HOUR)
    };
    let rs = a
        .submit_request(submit("spot", spot))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rs.leases, 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Standard work preempts it; it goes back to the queue.
    let rb = b
        .submit_request(submit("std", gang(1, 8, "h100", HOUR)))
        .await
        .unwrap()
        .into_inner();
    // The next pass preempts the spot work for it.
    let get = |name: &str| pb::GetRequestRequest { name: name.into() };
    let mut rb = b.get_request(get(&rb.name)).await.unwrap().into_inner();
    for _ in 0..100 {
        if rb.lease.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        rb = b.get_request(get(&rb.name)).await.unwrap().into_inner();
    }
    assert_eq!(pools_of(&rb), ["near"]);
    let requeued = a.get_request(get(&rs.name)).await.unwrap().into_inner();
    assert_eq!(requeued.state(), pb::RequestState::Queued);
    // Once b is done, the spot work is placed again: its second lease.
    b.release_request(pb::ReleaseRequestRequest {
        name: rb.name.clone(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    let mut again = a.get_request(get(&rs.name)).await.unwrap().into_inner();
    for _ in 0..100 {
        if again.leases == 2 && again.lease.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        again = a.get_request(get(&rs.name)).await.unwrap().into_inner();
    }
    assert_eq!(again.leases, 2, "{again:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let done = a
        .release_request(pb::ReleaseRequestRequest {
            name: rs.name.clone(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let summary = broker.stop_summary().await;
    let first = summary
        .ledger
        .settlement(&LeaseId::new(format!("r{}#1", rs.id)))
        .expect("the preempted lease is settled");
    let second = summary
        .ledger
        .settlement(&LeaseId::new(format!("r{}#2", rs.id)))
        .expect("the second lease is settled");
    for s in [first, second] {
        assert_eq!(s.bill.usage.tenant, "tenant-a");
        assert_eq!(s.bill.usage.parts.len(), 1);
        assert_eq!(s.bill.usage.parts[0].devices, 16);
        assert!(s.bill.charge.is_positive());
    }
    assert!(first.bill.usage.ended_at <= second.bill.usage.started_at);
    assert_eq!(second.bill.usage, usage_from_record(&done));
    // Replay settles both again, exactly once each.
    assert_eq!(
        suanli_broker::recovered_ledger(&config).unwrap(),
        summary.ledger
    );
}

#[tokio::test]
async fn the_district_subsidy_budget_is_set_over_grpc_and_reported_against() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let broker = Broker::start(config.clone()).await;
    let mut op = broker.operator(&broker.creds.operator.clone()).await;
    let set = |monthly_fen| pb::SetSubsidyBudgetRequest {
        monthly_fen,
        request_id: String::new(),
    };
    let done = op
        .set_subsidy_budget(set(Some(100_000_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.monthly_fen, Some(100_000_000));
    let report = op
        .get_subsidy_report(pb::GetSubsidyReportRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.months.len(), 1);
    assert_eq!(report.months[0].budget_fen, Some(100_000_000));
    assert_eq!(report.months[0].remaining_fen, Some(100_000_000));
    let negative = op.set_subsidy_budget(set(Some(-1))).await.unwrap_err();
    assert_eq!(negative.code(), Code::InvalidArgument);
    assert!(negative.message().contains("monthly_fen"), "{negative:?}");
    let mut as_tenant = broker.operator(&broker.tenant_token("tenant-a")).await;
    let denied = as_tenant.set_subsidy_budget(set(None)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // It is durable, and removing it is too.
    let summary = broker.stop_summary().await;
    assert_eq!(
        summary.ledger.subsidy_budget_monthly(),
        Some(Fen(100_000_000))
    );
    let broker = Broker::start(config.clone()).await;
    let mut op = broker.operator(&broker.creds.operator.clone()).await;
    let removed = op.set_subsidy_budget(set(None)).await.unwrap().into_inner();
    assert_eq!(removed.monthly_fen, None);
    let summary = broker.stop_summary().await;
    assert_eq!(summary.ledger.subsidy_budget_monthly(), None);
    assert_eq!(
        suanli_broker::recovered_ledger(&config).unwrap(),
        summary.ledger
    );
}

#[tokio::test]
async fn an_operator_adjustment_is_on_the_statement_once_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let broker = Broker::start(config.clone()).await;
    let mut op = broker.operator(&broker.creds.operator.clone()).await;
    let mut a = broker.tenant(&broker.tenant_token("tenant-a")).await;
    let adjust =
        |tenant: &str, amount_fen, reason: &str, request_id: &str| pb::AdjustBalanceRequest {
            tenant: tenant.into(),
            amount_fen,
            reason: reason.into(),
            request_id: request_id.into(),
        };
    let credit = adjust("tenant-a", -5_000, "SLA credit: pool outage", "credit-1");
    let done = op
        .adjust_balance(credit.clone())
        .await
        .unwrap()
        .into_inner();
    // A retry under the same request_id adjusts nothing more.
    op.adjust_balance(credit).await.unwrap();
    op.adjust_balance(adjust("tenant-a", 1_234, "support hours", ""))
        .await
        .unwrap();
    let statement = a
        .get_statement(pb::GetStatementRequest {
            tenant: String::new(),
            month: done.month.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(statement.adjustments_fen, -5_000 + 1_234);
    assert_eq!(statement.payable_fen, statement.due_fen - 5_000 + 1_234);
    let lines: Vec<(i64, &str)> = statement
        .adjustments
        .iter()
        .map(|a| (a.amount_fen, a.reason.as_str()))
        .collect();
    assert_eq!(
        lines,
        [
            (-5_000, "SLA credit: pool outage"),
            (1_234, "support hours")
        ]
    );
    for (bad, field) in [
        (adjust("tenant-a", 0, "nothing", ""), "amount_fen"),
        (adjust("tenant-a", 100, " ", ""), "reason"),
        (adjust("", 100, "x", ""), "tenant"),
    ] {
        let e = op.adjust_balance(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {e:?}");
    }
    let nobody = op
        .adjust_balance(adjust("nobody", 100, "x", ""))
        .await
        .unwrap_err();
    assert_eq!(nobody.code(), Code::NotFound);
    let mut as_tenant = broker.operator(&broker.tenant_token("tenant-a")).await;
    let denied = as_tenant
        .adjust_balance(adjust("tenant-a", -100, "self-service", ""))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let summary = broker.stop_summary().await;
    assert_eq!(summary.ledger.totals().adjustments, Fen(-5_000 + 1_234));
    assert_eq!(
        suanli_broker::recovered_ledger(&config).unwrap(),
        summary.ledger
    );
}
