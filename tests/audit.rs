//! The audit trail through a real socket: every operator mutation is listed with the token
//! that made it, the RPC, the target and the outcome, refusals included; the trail is what the
//! command log gives, so a restart (through a snapshot) lists the same; failed
//! authentications are listed and counted in `/metrics`.

use suanli_e2e::{Broker, http_get, test_config};
use suanli_proto::v1 as pb;
use tonic::Code;

const HOUR: u64 = 3_600_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// (who, rpc, target, refused or not) of every record.
fn lines(records: &[pb::AuditRecord]) -> Vec<(String, String, String, bool)> {
    records
        .iter()
        .map(|r| {
            (
                r.who.clone(),
                r.rpc.clone(),
                r.target.clone(),
                !r.refused.is_empty(),
            )
        })
        .collect()
}

fn line(who: &str, rpc: &str, target: &str, refused: bool) -> (String, String, String, bool) {
    (who.into(), rpc.into(), target.into(), refused)
}

#[tokio::test]
async fn every_operator_mutation_is_in_the_trail_with_who_made_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // Snapshots every few entries: the restart below reads the trail back through one.
    config.snapshot_every = 4;
    let broker = Broker::start_with_http(config.clone()).await;
    let mut op = broker.operator(&broker.creds.operator).await;
    let started = now_ms();

    op.set_tenant(pb::SetTenantRequest {
        request_id: "t".into(),
        tenant: Some(pb::Tenant {
            id: "acme".into(),
            quota_tflops: 1_000,
            weight: 1,
            ..Default::default()
        }),
        rotate_credential: false,
    })
    .await
    .unwrap();
    for drain in [true, false] {
        let name = "pools/near".to_string();
        if drain {
            op.drain_pool(pb::DrainPoolRequest {
                request_id: String::new(),
                name,
            })
            .await
            .unwrap();
        } else {
            op.undrain_pool(pb::UndrainPoolRequest {
                request_id: String::new(),
                name,
            })
            .await
            .unwrap();
        }
    }
    op.issue_voucher(pb::IssueVoucherRequest {
        voucher: Some(pb::VoucherSpec {
            id: "FT-1".into(),
            tenant: "acme".into(),
            face_value_fen: 10_000,
            rate_bp: 5_000,
            per_lease_cap_fen: None,
            scope: Some(pb::VoucherScope {
                pools: vec!["near".into()],
                ..Default::default()
            }),
            valid_from_unix_ms: started - HOUR,
            valid_until_unix_ms: started + 30 * 24 * HOUR,
        }),
        request_id: String::new(),
    })
    .await
    .unwrap();
    op.set_budget(pb::SetBudgetRequest {
        tenant: "acme".into(),
        budget: Some(pb::Budget {
            limit_fen: 1_000_000,
            period: pb::BudgetPeriod::Monthly as i32,
        }),
        request_id: String::new(),
    })
    .await
    .unwrap();
    op.set_subsidy_budget(pb::SetSubsidyBudgetRequest {
        monthly_fen: Some(5_000_000),
        request_id: String::new(),
    })
    .await
    .unwrap();
    op.adjust_balance(pb::AdjustBalanceRequest {
        tenant: "acme".into(),
        amount_fen: -500,
        reason: "SLA credit".into(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    let ops2 = op
        .create_token(pb::CreateTokenRequest {
            request_id: String::new(),
            name: "ops-2".into(),
            owner: Some(pb::TokenOwner {
                owner: Some(pb::token_owner::Owner::Operator(true)),
            }),
            expires_unix_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    // The second operator token: two refusals, then it revokes the first.
    let mut op2 = broker.operator(&ops2).await;
    let e = op2
        .drain_pool(pb::DrainPoolRequest {
            request_id: String::new(),
            name: "pools/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = op2
        .set_budget(pb::SetBudgetRequest {
            tenant: "nobody".into(),
            budget: None,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    op2.revoke_token(pb::RevokeTokenRequest {
        request_id: String::new(),
        name: "operator:primary".into(),
    })
    .await
    .unwrap();
    // A tenant's attempt is PERMISSION_DENIED: not an operator's mutation, not in the trail.
    let mut as_tenant = broker.operator(&broker.tenant_token("tenant-a")).await;
    let e = as_tenant
        .drain_pool(pb::DrainPoolRequest {
            request_id: String::new(),
            name: "pools/near".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let list = |op: &mut pb::operator_service_client::OperatorServiceClient<_>| {
        let mut op = op.clone();
        async move {
            op.list_audit_records(pb::ListAuditRecordsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let trail = list(&mut op2).await;
    let p = "operator:primary";
    let expected = vec![
        line(p, "SetTenant", "tenants/acme", false),
        line(p, "DrainPool", "pools/near", false),
        line(p, "UndrainPool", "pools/near", false),
        line(p, "IssueVoucher", "tenants/acme/vouchers/FT-1", false),
        line(p, "SetBudget", "tenants/acme", false),
        line(p, "SetSubsidyBudget", "subsidy-budget", false),
        line(p, "AdjustBalance", "tenants/acme", false),
        line(p, "CreateToken", "tokens/ops-2", false),
        line("ops-2", "DrainPool", "pools/nope", true),
        line("ops-2", "SetBudget", "tenants/nobody", true),
        line("ops-2", "RevokeToken", "tokens/operator:primary", false),
    ];
    assert_eq!(lines(&trail.records), expected);
    assert!(
        trail.records[8].refused.starts_with("NotFound"),
        "{trail:?}"
    );
    assert!(trail.records[9].refused.contains("nobody"), "{trail:?}");
    assert!(trail.records.iter().all(|r| r.time_unix_ms >= started));
    assert!(trail.next_page_token.is_empty());

    // Pages, and a start time.
    let first = op2
        .list_audit_records(pb::ListAuditRecordsRequest {
            page_size: 4,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.records, trail.records[..4]);
    let second = op2
        .list_audit_records(pb::ListAuditRecordsRequest {
            page_size: 4,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.records, trail.records[4..8]);
    let since = trail.records[8].time_unix_ms;
    let late = op2
        .list_audit_records(pb::ListAuditRecordsRequest {
            since_unix_ms: since,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(late.records.iter().all(|r| r.time_unix_ms >= since));
    assert!(late.records.ends_with(&trail.records[8..]));

    // Failed authentications: the revoked token, an unknown one; listed and counted.
    let e = op
        .get_fleet_summary(pb::GetFleetSummaryRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut stranger = broker.tenant("not-a-token").await;
    let e = stranger
        .get_tenant(pb::GetTenantRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let failures = op2
        .list_audit_records(pb::ListAuditRecordsRequest {
            auth_failures: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let reasons: Vec<&str> = failures.iter().map(|f| f.refused.as_str()).collect();
    assert!(
        reasons.contains(&"token operator:primary was revoked")
            && reasons.contains(&"unknown token"),
        "{failures:?}"
    );
    assert!(
        failures
            .iter()
            .all(|f| f.rpc == "authenticate" && f.who.starts_with("127.0.0.1:"))
    );
    let metrics = http_get(broker.http.unwrap(), "/metrics", Some(&ops2)).await;
    let counted = metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix("suanli_auth_failures_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no auth failure counter in {}", metrics.body));
    assert!(counted >= 2, "{counted}");

    // The trail is the log's: a restart (from a snapshot and the log after it) lists the same.
    drop((op, op2, as_tenant, stranger));
    broker.stop().await;
    let broker = Broker::start(config).await;
    let mut op2 = broker.operator(&ops2).await;
    assert_eq!(list(&mut op2).await.records, trail.records);
    broker.stop().await;
}
