//! Accounting through the real `suanli` binary.
//!
//! Settlement across a crash: the broker runs leases that end by themselves and by release
//! while tenants submit, a voucher pays half of the local ones, and the broker is killed with
//! SIGKILL in the middle of it. After a restart (through a snapshot and the log after it) every
//! lease that ran and ended is charged exactly once, at the amount its own record gives, and the
//! ledger balances: charges = voucher debits + tenant dues, and the voucher never pays beyond
//! its face value.
//!
//! The accounting commands (`vouchers`, `vouchers issue`, `budget`, `bill`, `subsidy`) as a
//! person and a script use them.

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::time::Duration;

use suanli_billing::{Fen, LeaseId, LeasePart, LeaseUsage, Month, charge_lease};
use suanli_core::PoolKind;
use suanli_proto::v1 as pb;
use suanli_proto::v1::operator_service_client::OperatorServiceClient;
use suanli_proto::v1::tenant_service_client::TenantServiceClient;
use support::{all_requests, channel, start_with, wait_for_credentials, with_token};

/// Prices of one fen per device-millisecond, so that leases of a few hundred milliseconds
/// cost whole yuan and the voucher runs out during the test.
const FLEET: &str = r#"
name = "billing-crash"

[[pool]]
id = "centre"
kind = "local_centre"
region = "guangdong-shenzhen"
rtt_ms = 1
data_zone = "mainland"
[[pool.group]]
model = "h100"
devices_per_node = 8
nodes = 16
interconnect = "nvlink"
price_fen_per_device_hour = 3600000

[[pool]]
id = "far"
kind = "external"
region = "guizhou-guiyang"
rtt_ms = 30
data_zone = "mainland"
[[pool.group]]
model = "a800"
devices_per_node = 8
nodes = 16
interconnect = "nvlink"
price_fen_per_device_hour = 1800000
"#;

/// Snapshots every 200 entries (a few during the run, with the kill far enough after the last
/// one that recovery settles leases from the log); a simulated lease of 10 minutes runs 100 ms.
const CONFIG: &str =
    "snapshot_every = 200\n[pools]\nsimulated = [\"*\"]\nsimulated_speedup = 6000.0\n";

fn spec(i: u64) -> pb::RequestSpec {
    let model = if i.is_multiple_of(3) { "a800" } else { "h100" };
    pb::RequestSpec {
        shape: Some(pb::request_spec::Shape::Gang(pb::GangShape {
            nodes: 1 + (i % 2) as u32,
            devices_per_node: 8,
        })),
        duration_ms: 600_000,
        priority: pb::Priority::Standard as i32,
        constraints: Some(pb::Constraints {
            models: vec![model.into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The charge of a lease as its record gives it: running from when it started to when it
/// ended, at the prices fixed on its parts.
fn charge_of(r: &pb::Request) -> Option<Fen> {
    let lease = r.lease.as_ref()?;
    let started_at = lease.running_since_unix_ms?;
    let parts = lease
        .parts
        .iter()
        .map(|p| LeasePart {
            pool: p.pool.clone(),
            pool_kind: PoolKind::External,
            model: p.model.clone(),
            devices: u64::from(p.devices),
            tflops: u64::from(p.devices),
            price_per_device_hour: Fen(p.price_fen_per_device_hour as i64),
            billing_increment_ms: None,
        })
        .collect();
    let usage = LeaseUsage {
        lease: LeaseId::new(format!("r{}#{}", r.id, r.leases)),
        tenant: r.tenant.clone(),
        started_at,
        ended_at: r.update_time_unix_ms,
        parts,
    };
    // Per node: rounding per part may differ from the ledger's per node group by a fen or two
    // per part, so the sum below is compared with that slack.
    Some(charge_lease(&usage).unwrap().1)
}

fn is_ended(r: &pb::Request) -> bool {
    matches!(
        r.state(),
        pb::RequestState::Completed
            | pb::RequestState::Failed
            | pb::RequestState::Cancelled
            | pb::RequestState::Preempted
            | pb::RequestState::Lost
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ended_lease_is_charged_exactly_once_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet.toml");
    std::fs::write(&fleet, FLEET).unwrap();
    let fleet = fleet.to_str().unwrap().to_string();
    let (mut child, addr) = start_with(dir.path(), CONFIG, &["--fleet", &fleet]);
    let creds = wait_for_credentials(dir.path()).await;
    let token = creds.tenant("tenant-a").unwrap().to_string();
    let ch = channel(&addr).await;

    // ¥1000 of vouchers paying half of every bill on local pools.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let face_fen = 100_000;
    let mut operator = OperatorServiceClient::new(ch.clone());
    operator
        .issue_voucher(with_token(
            pb::IssueVoucherRequest {
                voucher: Some(pb::VoucherSpec {
                    id: "FT-CRASH".into(),
                    tenant: "tenant-a".into(),
                    face_value_fen: face_fen,
                    rate_bp: 5_000,
                    per_lease_cap_fen: None,
                    scope: Some(pb::VoucherScope {
                        pool_kinds: vec![pb::PoolKind::LocalCentre as i32],
                        ..Default::default()
                    }),
                    valid_from_unix_ms: now - 3_600_000,
                    valid_until_unix_ms: now + 24 * 3_600_000,
                }),
                request_id: "voucher".into(),
            },
            &creds.operator,
        ))
        .await
        .unwrap();

    // Four writers submit, and release every third request they placed, as fast as they can;
    // the broker is killed while they do and while simulated leases end by themselves.
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let ch = ch.clone();
        let token = token.clone();
        writers.push(tokio::spawn(async move {
            let mut client = TenantServiceClient::new(ch);
            let mut acked = 0u64;
            for i in 0.. {
                let req = pb::SubmitRequestRequest {
                    request_id: format!("w{w}-{i}"),
                    spec: Some(spec(i)),
                };
                let r = match client.submit_request(with_token(req, &token)).await {
                    Ok(r) => r.into_inner(),
                    Err(_) => break,
                };
                acked += 1;
                if i % 3 == 0 && r.lease.is_some() {
                    let release = pb::ReleaseRequestRequest {
                        request_id: format!("rel-w{w}-{i}"),
                        name: r.name,
                    };
                    if let Err(e) = client.release_request(with_token(release, &token)).await
                        && e.code() == tonic::Code::Unavailable
                    {
                        break;
                    }
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    child.kill();
    let mut acked = 0;
    for w in writers {
        acked += w.await.unwrap();
    }
    assert!(acked > 10, "only {acked} submissions were acknowledged");

    let (mut child, addr) = start_with(dir.path(), CONFIG, &["--fleet", &fleet]);
    wait_for_credentials(dir.path()).await;
    let ch = channel(&addr).await;
    let mut tenant = TenantServiceClient::new(ch.clone());
    let mut operator = OperatorServiceClient::new(ch);
    // End what is still live, so that nothing changes while the ledger is read.
    for r in all_requests(&mut tenant, &token).await {
        if !is_ended(&r) {
            let cancel = pb::CancelRequestRequest {
                request_id: format!("cancel-{}", r.id),
                name: r.name.clone(),
            };
            // It may have ended by itself meanwhile: FAILED_PRECONDITION is fine.
            let _ = tenant.cancel_request(with_token(cancel, &token)).await;
        }
    }
    let all = all_requests(&mut tenant, &token).await;
    assert!(all.iter().all(is_ended), "every request has ended");
    assert!(
        all.iter().all(|r| r.leases <= 1),
        "nothing here is requeued, so each request had at most one lease"
    );
    let ran: Vec<&pb::Request> = all
        .iter()
        .filter(|r| {
            r.lease
                .as_ref()
                .is_some_and(|l| l.running_since_unix_ms.is_some())
        })
        .collect();
    assert!(ran.len() > 10, "only {} leases ran", ran.len());

    // The statements of every month a lease ended in count each lease that ran once.
    let months: BTreeSet<Month> = ran
        .iter()
        .map(|r| Month::containing(r.update_time_unix_ms))
        .collect();
    let (mut leases, mut cost, mut subsidy, mut due) = (0, 0, 0, 0);
    for m in &months {
        let s = tenant
            .get_statement(with_token(
                pb::GetStatementRequest {
                    tenant: String::new(),
                    month: m.to_string(),
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.cost_fen, s.subsidy_fen + s.due_fen, "{m} balances");
        leases += s.leases;
        cost += s.cost_fen;
        subsidy += s.subsidy_fen;
        due += s.due_fen;
    }
    assert_eq!(
        leases,
        ran.len() as u64,
        "each lease that ran is charged exactly once"
    );
    // At the amount its record gives (to within a fen per node of rounding).
    let expected: i64 = ran.iter().map(|r| charge_of(r).unwrap().fen()).sum();
    let nodes: i64 = ran
        .iter()
        .map(|r| r.lease.as_ref().unwrap().parts.len() as i64)
        .sum();
    assert!(
        (cost - expected).abs() <= nodes,
        "charged {cost} fen, the records give {expected} fen"
    );
    assert!(cost > 0);
    assert_eq!(cost, subsidy + due);

    // The voucher paid exactly the subsidy, within its face value.
    let vouchers = operator
        .list_vouchers(with_token(
            pb::ListVouchersRequest {
                tenant: "tenant-a".into(),
            },
            &creds.operator,
        ))
        .await
        .unwrap()
        .into_inner()
        .vouchers;
    assert_eq!(vouchers.len(), 1);
    assert_eq!(vouchers[0].used_fen, subsidy);
    assert!(subsidy > 0 && subsidy <= face_fen);
    assert_eq!(vouchers[0].remaining_fen, face_fen - subsidy);
    child.kill();
}

/// Runs `suanli --addr http://ADDR --token TOKEN ARGS...`.
fn suanli(addr: &str, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_suanli"))
        .args(["--addr", &format!("http://{addr}"), "--token", token])
        .args(args)
        .output()
        .expect("run suanli")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[tokio::test]
async fn vouchers_budgets_and_bills_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet.toml");
    std::fs::write(&fleet, FLEET).unwrap();
    let fleet = fleet.to_str().unwrap().to_string();
    let (mut child, addr) = start_with(dir.path(), CONFIG, &["--fleet", &fleet]);
    let creds = wait_for_credentials(dir.path()).await;
    let a = creds.tenant("tenant-a").unwrap().to_string();
    let b = creds.tenant("tenant-b").unwrap().to_string();
    let op = creds.operator.clone();

    let issued = suanli(
        &addr,
        &op,
        &[
            "vouchers",
            "issue",
            "--tenant",
            "tenant-a",
            "--id",
            "FT-1",
            "--face",
            "10000",
            "--rate",
            "50%",
            "--scope",
            "local",
            "--from",
            "2025-01-01",
            "--until",
            "+30d",
            "--cap-per-lease",
            "500",
        ],
    );
    let table = ok(&issued, "vouchers issue");
    assert!(
        table.contains("FT-1") && table.contains("10000.00"),
        "{table}"
    );
    // The operator lists every voucher, a tenant its own (here: none for tenant-b).
    let all: serde_json::Value = serde_json::from_str(&ok(
        &suanli(&addr, &op, &["--json", "vouchers"]),
        "vouchers",
    ))
    .unwrap();
    assert_eq!(all["vouchers"][0]["id"], "FT-1");
    assert_eq!(all["vouchers"][0]["per_lease_cap_fen"], 50_000);
    let mine: serde_json::Value =
        serde_json::from_str(&ok(&suanli(&addr, &a, &["--json", "vouchers"]), "vouchers")).unwrap();
    assert_eq!(mine["vouchers"].as_array().unwrap().len(), 1);
    let theirs: serde_json::Value =
        serde_json::from_str(&ok(&suanli(&addr, &b, &["--json", "vouchers"]), "vouchers")).unwrap();
    assert!(theirs["vouchers"].as_array().unwrap().is_empty());

    // A lease on the local centre, released; the bill shows it, half paid by the voucher
    // (within its ¥500 cap per lease).
    let submitted = suanli(
        &addr,
        &a,
        &[
            "--json",
            "submit",
            "--gang",
            "1x8",
            "--model",
            "h100",
            "--duration",
            "1h",
        ],
    );
    let r: serde_json::Value = serde_json::from_str(&ok(&submitted, "submit")).unwrap();
    assert_eq!(r["leases"], 1);
    assert_eq!(
        r["lease"]["parts"][0]["price_fen_per_device_hour"],
        3_600_000
    );
    let id = r["id"].as_u64().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(50)).await;
    ok(&suanli(&addr, &a, &["release", &id]), "release");
    let bill: serde_json::Value =
        serde_json::from_str(&ok(&suanli(&addr, &a, &["--json", "bill"]), "bill")).unwrap();
    assert_eq!(bill["leases"], 1);
    let (cost, subsidy, due) = (
        bill["cost_fen"].as_i64().unwrap(),
        bill["subsidy_fen"].as_i64().unwrap(),
        bill["due_fen"].as_i64().unwrap(),
    );
    assert!(cost > 0 && subsidy > 0 && subsidy <= 50_000);
    assert_eq!(cost, subsidy + due);
    assert_eq!(subsidy, (cost / 2).min(50_000));
    let csv = ok(&suanli(&addr, &a, &["bill", "--csv"]), "bill --csv");
    assert!(csv.starts_with("tenant,month,model,pool_kind"), "{csv}");
    assert!(csv.contains(",h100,local_centre,1,"), "{csv}");
    // The operator reads tenant-a's bill, and the subsidy report.
    let seen: serde_json::Value = serde_json::from_str(&ok(
        &suanli(&addr, &op, &["--json", "bill", "--tenant", "tenant-a"]),
        "bill --tenant",
    ))
    .unwrap();
    assert_eq!(seen, bill);
    let report = ok(&suanli(&addr, &op, &["subsidy", "--csv"]), "subsidy --csv");
    assert!(report.starts_with("month,local_centre_cny,"), "{report}");
    // The district's monthly subsidy budget, set from the CLI, heads the report's budget.
    let budgeted: serde_json::Value = serde_json::from_str(&ok(
        &suanli(&addr, &op, &["--json", "subsidy", "--set-budget", "50000"]),
        "subsidy --set-budget",
    ))
    .unwrap();
    let month = &budgeted["months"][0];
    assert_eq!(month["budget_fen"], 5_000_000, "{budgeted}");
    // A credit with its reason, on tenant-a's bill.
    let adjusted = ok(
        &suanli(
            &addr,
            &op,
            &[
                "adjust",
                "--tenant",
                "tenant-a",
                "--amount",
                "-12.50",
                "--reason",
                "SLA credit",
            ],
        ),
        "adjust",
    );
    assert!(adjusted.contains("-12.50 CNY"), "{adjusted}");
    let billed: serde_json::Value =
        serde_json::from_str(&ok(&suanli(&addr, &a, &["--json", "bill"]), "bill")).unwrap();
    assert_eq!(billed["adjustments_fen"], -1_250, "{billed}");
    assert_eq!(billed["adjustments"][0]["reason"], "SLA credit", "{billed}");
    assert_eq!(
        billed["payable_fen"].as_i64(),
        Some(due - 1_250),
        "{billed}"
    );
    let text = ok(&suanli(&addr, &a, &["bill"]), "bill");
    assert!(text.contains("SLA credit"), "{text}");
    let spent = month["spent_fen"].as_i64().unwrap();
    assert!(spent >= subsidy, "{budgeted}");
    assert_eq!(
        month["remaining_fen"].as_i64(),
        Some(5_000_000 - spent),
        "{budgeted}"
    );
    // A tenant may not read another's bill.
    let denied = suanli(&addr, &b, &["bill", "--tenant", "tenant-a"]);
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("PERMISSION_DENIED"));

    // A budget refuses a submission by name, with exit code 1 and one line.
    ok(
        &suanli(
            &addr,
            &op,
            &[
                "budget", "--tenant", "tenant-b", "--limit", "1", "--per", "total",
            ],
        ),
        "budget",
    );
    let refused = suanli(
        &addr,
        &b,
        &[
            "submit",
            "--gang",
            "1x8",
            "--model",
            "h100",
            "--duration",
            "1h",
        ],
    );
    assert_eq!(refused.status.code(), Some(1));
    let line = String::from_utf8_lossy(&refused.stderr);
    assert!(
        line.starts_with("error: FAILED_PRECONDITION: tenant tenant-b: total budget of ¥1.00"),
        "{line}"
    );
    ok(
        &suanli(&addr, &op, &["budget", "--tenant", "tenant-b", "--remove"]),
        "budget --remove",
    );
    ok(
        &suanli(
            &addr,
            &b,
            &[
                "submit",
                "--gang",
                "1x8",
                "--model",
                "h100",
                "--duration",
                "1h",
            ],
        ),
        "submit after removing the budget",
    );
    child.kill();
}
