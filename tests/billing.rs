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
