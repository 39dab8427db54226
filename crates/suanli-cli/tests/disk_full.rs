//! The real `suanli` binary with its data folder on a small tmpfs that fills up: calls that
//! would change state are refused with RESOURCE_EXHAUSTED naming the full disk (never a hang
//! or a crash), reads go on, the broker takes calls again once space returns, and after a
//! SIGKILL and a restart exactly the acknowledged requests are there.
//!
//! Mounting a tmpfs needs root. Without it the test is skipped with a message, unless
//! `SUANLI_REQUIRE_TMPFS=1` (CI runs as root and sets it), which makes that a failure.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use suanli_proto::v1 as pb;
use suanli_proto::v1::operator_service_client::OperatorServiceClient;
use suanli_proto::v1::tenant_service_client::TenantServiceClient;
use support::{all_requests, channel, start, wait_for_credentials, with_token};
use tonic::Code;
use tonic::transport::Channel;

/// A tmpfs mounted on a temporary folder, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount` reads it, e.g. `16m`), or says why it cannot.
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Writes zeros to `path` until the file system is full; returns how many bytes it took.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create the filler");
    let block = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // What is buffered may still fail: the file system is full either way.
    let _ = f.sync_all();
    written
}

fn spec(i: u64) -> pb::RequestSpec {
    pb::RequestSpec {
        shape: Some(pb::request_spec::Shape::Gang(pb::GangShape {
            nodes: 1 + (i % 2) as u32,
            devices_per_node: 8,
        })),
        duration_ms: 3_600_000,
        priority: pb::Priority::Standard as i32,
        ..Default::default()
    }
}

async fn submit(
    tenant: &mut TenantServiceClient<Channel>,
    token: &str,
    key: &str,
    i: u64,
) -> Result<u64, tonic::Status> {
    let req = pb::SubmitRequestRequest {
        request_id: key.to_string(),
        spec: Some(spec(i)),
    };
    tenant
        .submit_request(with_token(req, token))
        .await
        .map(|r| r.into_inner().id)
}

/// The resource name of request `id`, as the list shows it.
async fn listed_name(tenant: &mut TenantServiceClient<Channel>, token: &str, id: u64) -> String {
    all_requests(tenant, token)
        .await
        .into_iter()
        .find(|r| r.id == id)
        .map(|r| r.name)
        .expect("the request is listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_mutations_keeps_reads_and_loses_nothing() {
    let tmpfs = match Tmpfs::mount("24m") {
        Ok(t) => t,
        Err(why) => {
            if std::env::var("SUANLI_REQUIRE_TMPFS").as_deref() == Ok("1") {
                panic!("SUANLI_REQUIRE_TMPFS=1 but a tmpfs cannot be mounted: {why}");
            }
            eprintln!(
                "skipped: a tmpfs cannot be mounted here ({why}); run as root, or set \
                 SUANLI_REQUIRE_TMPFS=1 to make this a failure"
            );
            return;
        }
    };
    let data: PathBuf = tmpfs.path().join("data");
    std::fs::create_dir(&data).expect("create the data folder");
    let (mut broker, addr) = start(&data);
    let creds = wait_for_credentials(&data).await;
    let token = creds.tenant("tenant-a").unwrap().to_string();
    let ch = channel(&addr).await;
    let mut tenant = TenantServiceClient::new(ch.clone());
    let mut operator = OperatorServiceClient::new(ch.clone());

    let mut acked: Vec<(String, u64)> = Vec::new();
    for i in 0..20 {
        let key = format!("before-{i}");
        let id = submit(&mut tenant, &token, &key, i).await.expect("submit");
        acked.push((key, id));
    }

    // Fill the disk, then submit until the log cannot take a batch: redb may still have free
    // pages inside its file for the first few.
    let filler = tmpfs.path().join("filler");
    fill(&filler);
    let mut refused = None;
    for i in 0..100_000u64 {
        let key = format!("full-{i}");
        match submit(&mut tenant, &token, &key, i).await {
            Ok(id) => acked.push((key, id)),
            Err(status) => {
                refused = Some((key, i, status));
                break;
            }
        }
    }
    let (refused_key, refused_i, status) = refused.expect("the full disk refused a submission");
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "a full disk is RESOURCE_EXHAUSTED: {status:?}"
    );
    assert!(
        status.message().contains("disk is full")
            && status
                .message()
                .contains("nothing of this call took effect"),
        "the refusal says why: {}",
        status.message()
    );

    // Still full: every call that would log is refused at once, and the broker lives.
    for i in 0..5u64 {
        let status = submit(&mut tenant, &token, &format!("still-full-{i}"), i)
            .await
            .expect_err("refused while the disk is full");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    let first_name = listed_name(&mut tenant, &token, acked[0].1).await;
    let cancel = pb::CancelRequestRequest {
        name: first_name.clone(),
        request_id: "cancel-while-full".into(),
    };
    let status = tenant
        .cancel_request(with_token(cancel, &token))
        .await
        .expect_err("a cancel is refused while the disk is full");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(broker.is_running(), "the broker is alive with a full disk");
    // The broker tries the log every second, but not while the disk has no room: a small
    // entry may still fit in pages the log freed, and the next batch would fail again.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let status = submit(&mut tenant, &token, "after-two-tries", 0)
        .await
        .expect_err("still refused while the disk is full");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // Reads go on, and show exactly what was acknowledged.
    let listed = all_requests(&mut tenant, &token).await;
    let mut ids: Vec<u64> = listed.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    let mut want: Vec<u64> = acked.iter().map(|(_, id)| *id).collect();
    want.sort_unstable();
    assert_eq!(ids, want, "the listed requests are the acknowledged ones");
    let got = tenant
        .get_request(with_token(
            pb::GetRequestRequest { name: first_name },
            &token,
        ))
        .await
        .expect("a read while the disk is full")
        .into_inner();
    assert_eq!(got.id, acked[0].1);
    operator
        .get_fleet_summary(with_token(pb::GetFleetSummaryRequest {}, &creds.operator))
        .await
        .expect("the fleet summary while the disk is full");

    // Space returns: the broker takes calls again, by itself.
    std::fs::remove_file(&filler).expect("remove the filler");
    let mut back = None;
    // The refused call, retried with its request_id: it never took effect, so it is new.
    for _ in 0..600 {
        match submit(&mut tenant, &token, &refused_key, refused_i).await {
            Ok(id) => {
                back = Some(id);
                break;
            }
            Err(s) if s.code() == Code::ResourceExhausted => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("after space returned: {s:?}"),
        }
    }
    let id = back.expect("the broker takes submissions again once space returns");
    acked.push((refused_key, id));
    for i in 0..20 {
        let key = format!("after-{i}");
        let id = submit(&mut tenant, &token, &key, i).await.expect("submit");
        acked.push((key, id));
    }

    // A retry of an acknowledged call still gets its first answer.
    let (key, id) = acked.iter().find(|(k, _)| k == "after-3").unwrap();
    assert_eq!(submit(&mut tenant, &token, key, 3).await.unwrap(), *id);

    // Killed and restarted: exactly the acknowledged requests, once each, and the capacity
    // the live leases hold is what the fleet counts as allocated.
    broker.kill();
    let (_broker, addr) = start(&data);
    let ch = channel(&addr).await;
    let mut tenant = TenantServiceClient::new(ch.clone());
    let mut operator = OperatorServiceClient::new(ch);
    let listed = all_requests(&mut tenant, &token).await;
    let mut ids: Vec<u64> = listed.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    let mut want: Vec<u64> = acked.iter().map(|(_, id)| *id).collect();
    want.sort_unstable();
    assert_eq!(
        ids, want,
        "after a restart: the acknowledged requests, once each"
    );
    let live: u64 = listed
        .iter()
        .filter(|r| r.end_reason == pb::EndReason::Unspecified as i32)
        .filter_map(|r| r.lease.as_ref().map(|l| l.tflops))
        .sum();
    let summary = operator
        .get_fleet_summary(with_token(pb::GetFleetSummaryRequest {}, &creds.operator))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.total.unwrap().allocated_tflops, live);
}
