//! Three real `suanli` brokers on a real three-member etcd cluster, on loopback, through the
//! faults a group must survive: the leader killed under four writers, the leader paused past
//! its lease (fencing), a planned stop of the leader, the etcd leader killed, and a replica
//! that joins after the log was compacted. After each, every acknowledged request is present
//! exactly once, the capacity held equals the live leases, the ledger balances, and the
//! replicas' digests agree at one log position.
//!
//! The times each fault cost are printed (`failover: ...`); they are figures for
//! BENCHMARKS.md, not assertions: these machines are shared.

#[path = "support/etcd.rs"]
mod etcd;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd::EtcdCluster;
use suanli_proto::failover::{LeaderChannel, plain_endpoint};
use suanli_proto::v1 as pb;
use suanli_proto::v1::operator_service_client::OperatorServiceClient;
use suanli_proto::v1::tenant_service_client::TenantServiceClient;
use support::{Serving, start_with, with_token};

const OPERATOR: &str = "operator-test-token";
const TENANT: &str = "tenant-a-test-token";
const OTHER_TENANT: &str = "tenant-b-test-token";

/// The faults run one at a time: each runs three etcd members and three brokers on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(snapshot_every: u64) -> String {
    config_with_pools(snapshot_every, "simulated = [\"*\"]")
}

/// The group's configuration with `pools` as its `[pools]` section.
fn config_with_pools(snapshot_every: u64, pools: &str) -> String {
    format!(
        "snapshot_every = {snapshot_every}\n\
         operator_token = \"{OPERATOR}\"\n\
         [pools]\n{pools}\n\
         [[tenant]]\nname = \"tenant-a\"\nquota_tflops = 20000000\ntoken = \"{TENANT}\"\n\
         [[tenant]]\nname = \"tenant-b\"\nquota_tflops = 1000000\ntoken = \"{OTHER_TENANT}\"\n"
    )
}

/// The brokers of a group, each in a data folder of its own.
struct Group {
    endpoints: String,
    config: String,
    replicas: Vec<Option<(Serving, String)>>,
    dirs: Vec<tempfile::TempDir>,
}

impl Group {
    fn start(etcd: &EtcdCluster, n: usize, config: String) -> Group {
        let mut g = Group {
            endpoints: etcd.endpoints(),
            config,
            replicas: Vec::new(),
            dirs: Vec::new(),
        };
        for _ in 0..n {
            g.add();
        }
        g
    }

    /// Starts one more replica, on an empty data folder.
    fn add(&mut self) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let serving = start_with(dir.path(), &self.config, &["--etcd", &self.endpoints]);
        self.dirs.push(dir);
        self.replicas.push(Some(serving));
        self.replicas.len() - 1
    }

    fn addr(&self, i: usize) -> &str {
        &self.replicas[i].as_ref().expect("running").1
    }

    fn pid(&self, i: usize) -> u32 {
        self.replicas[i].as_ref().expect("running").0.pid()
    }

    /// The addresses of the replicas that run.
    fn addrs(&self) -> Vec<String> {
        self.replicas
            .iter()
            .flatten()
            .map(|(_, a)| format!("http://{a}"))
            .collect()
    }

    fn running(&self) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|&i| self.replicas[i].is_some())
            .collect()
    }

    fn kill(&mut self, i: usize) {
        if let Some((mut s, _)) = self.replicas[i].take() {
            s.kill();
        }
    }

    /// A channel to the leader of the moment (following it should it change).
    async fn leader_channel(&self) -> LeaderChannel {
        let leader = self.leader().await;
        let mut addrs = self.addrs();
        let first = format!("http://{}", self.addr(leader));
        addrs.retain(|a| *a != first);
        addrs.insert(0, first);
        group_channel(addrs)
    }

    /// Waits until one of the running replicas says it leads; its index.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for i in self.running() {
                if let Some(s) = status(self.addr(i)).await
                    && s.leader
                {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no replica leads after 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A replica's status, or `None` when it does not answer.
async fn status(addr: &str) -> Option<pb::ReplicaStatus> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
        .ok()?;
    let mut op = OperatorServiceClient::new(ch);
    let call = op.get_replica_status(with_token(pb::GetReplicaStatusRequest {}, OPERATOR));
    tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .ok()?
        .ok()
        .map(|r| r.into_inner())
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

fn spec(i: u64) -> pb::RequestSpec {
    pb::RequestSpec {
        shape: Some(pb::request_spec::Shape::Gang(pb::GangShape {
            nodes: 1,
            devices_per_node: 1 + (i % 8) as u32,
        })),
        duration_ms: 3_600_000,
        priority: pb::Priority::Standard as i32,
        ..Default::default()
    }
}

/// What the writers were told: request_id, request id, which broker answered, when.
type Acks = Arc<Mutex<Vec<(String, u64, String, Instant)>>>;

/// Four writers submit (and release every fifth request) through the group's failover
/// client until `stop`; each request_id is retried until it is acknowledged.
fn writers(
    addrs: Vec<String>,
    stop: Arc<AtomicBool>,
    acks: Acks,
) -> Vec<tokio::task::JoinHandle<()>> {
    writers_named("", addrs, stop, acks)
}

/// [`writers`] whose request_ids start with `prefix`.
fn writers_named(
    prefix: &str,
    addrs: Vec<String>,
    stop: Arc<AtomicBool>,
    acks: Acks,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4u64)
        .map(|w| {
            let (addrs, stop, acks) = (addrs.clone(), stop.clone(), acks.clone());
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                let group = group_channel(addrs);
                let mut tenant = TenantServiceClient::new(group.clone());
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("{prefix}w{w}-{i}");
                    let req = pb::SubmitRequestRequest {
                        request_id: key.clone(),
                        spec: Some(spec(i)),
                    };
                    let r = tenant
                        .submit_request(with_token(req, TENANT))
                        .await
                        .unwrap_or_else(|e| panic!("writer {w}: {key} failed: {e}"));
                    let id = r.into_inner().id;
                    acks.lock()
                        .unwrap()
                        .push((key.clone(), id, group.current(), Instant::now()));
                    if i % 5 == 4 {
                        let release = pb::ReleaseRequestRequest {
                            request_id: format!("release-{key}"),
                            name: format!("tenants/tenant-a/requests/{id}"),
                        };
                        tenant
                            .release_request(with_token(release, TENANT))
                            .await
                            .unwrap_or_else(|e| panic!("writer {w}: release {id}: {e}"));
                    }
                    i += 1;
                }
            })
        })
        .collect()
}

/// The first acknowledgement after `since` from a broker other than `old`: how long after
/// `since` it came.
async fn first_ack_elsewhere(acks: &Acks, old: &str, since: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = acks
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, by, at)| *at > since && !by.ends_with(old))
            .map(|(_, _, _, at)| *at)
            .min();
        if let Some(at) = found {
            return at - since;
        }
        if Instant::now() >= deadline {
            let acks = acks.lock().unwrap();
            let last: Vec<_> = acks.iter().rev().take(5).collect();
            panic!(
                "no acknowledgement from a broker other than {old} within 60 s; {} in all, the \
                 last: {last:?}",
                acks.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A channel to the group's leader, patient enough for any failover of these tests.
fn group_channel(addrs: Vec<String>) -> LeaderChannel {
    LeaderChannel::with_timing(
        addrs,
        Box::new(plain_endpoint),
        Duration::from_secs(60),
        Duration::from_secs(5),
    )
}

/// Every page of `token`'s requests, from the leader.
async fn all_requests(group: &LeaderChannel, token: &str) -> Vec<pb::Request> {
    let mut tenant = TenantServiceClient::new(group.clone());
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = pb::ListRequestsRequest {
            page_size: 1000,
            page_token: page_token.clone(),
            states: vec![],
        };
        let page = tenant
            .list_requests(with_token(req, token))
            .await
            .unwrap()
            .into_inner();
        all.extend(page.requests);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

/// The checks after every fault: each acknowledged request once, capacity conserved, the
/// ledger balanced, and the digests of the running replicas equal at one checkpoint.
async fn check(g: &Group, acks: &Acks) {
    let acks = acks.lock().unwrap().clone();
    assert!(!acks.is_empty());
    // Read from the leader: a follower's views may trail it by a few milliseconds (reads
    // there are stale by design, with the staleness stated), and every acknowledgement came
    // from a leader. The followers are compared with it at a checkpoint below.
    let group = g.leader_channel().await;
    let mut operator = OperatorServiceClient::new(group.clone());
    let all = all_requests(&group, TENANT).await;
    for (key, id, _, _) in &acks {
        let found = all.iter().filter(|r| r.id == *id).count();
        assert_eq!(
            found, 1,
            "acknowledged {key} (request {id}) is there {found} times"
        );
    }
    let mut ids: Vec<u64> = acks.iter().map(|(_, id, _, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), acks.len(), "two request_ids got one request");
    assert_eq!(
        all.len(),
        acks.len(),
        "requests that no acknowledged request_id names"
    );
    let live: u64 = all
        .iter()
        .filter(|r| r.end_reason == pb::EndReason::Unspecified as i32)
        .filter_map(|r| r.lease.as_ref().map(|l| l.tflops))
        .sum();
    let summary = operator
        .get_fleet_summary(with_token(pb::GetFleetSummaryRequest {}, OPERATOR))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        summary.total.unwrap().allocated_tflops,
        live,
        "capacity held is the live leases'"
    );
    let req = pb::GetStatementRequest {
        tenant: "tenant-a".into(),
        month: String::new(),
    };
    let statement = operator
        .get_statement(with_token(req, OPERATOR))
        .await
        .unwrap()
        .into_inner();
    assert!(statement.cost_fen > 0, "released leases were charged");
    assert_eq!(
        statement.cost_fen,
        statement.subsidy_fen + statement.due_fen,
        "the ledger balances"
    );
    // gRPC health: SERVING on the leader alone, so a load balancer's check finds it.
    let mut serving = Vec::new();
    for i in g.running() {
        let ch = support::channel(g.addr(i)).await;
        let answer = tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        if answer.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            serving.push(i);
        }
    }
    assert_eq!(
        serving,
        vec![g.leader().await],
        "only the leader is SERVING"
    );
    let mark = operator
        .checkpoint(with_token(pb::CheckpointRequest {}, OPERATOR))
        .await
        .unwrap()
        .into_inner();
    for i in g.running() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = status(g.addr(i)).await;
            if let Some(c) = s
                .as_ref()
                .and_then(|s| s.checkpoints.iter().find(|c| c.log_index == mark.log_index))
            {
                assert_eq!(
                    c.digest, mark.digest,
                    "replica {i} disagrees at log index {}",
                    mark.log_index
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} did not reach log index {} in 30 s: {s:?}",
                mark.log_index
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn stop_writers(stop: &AtomicBool, writers: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
}

/// A group of `n` under the four writers' load for a second: the group, its leader and its
/// address, and the writers with their stop flag and acknowledgements.
struct UnderLoad {
    g: Group,
    leader: usize,
    old: String,
    stop: Arc<AtomicBool>,
    acks: Acks,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

async fn under_load(etcd: &EtcdCluster, n: usize, config: String) -> UnderLoad {
    let g = Group::start(etcd, n, config);
    let leader = g.leader().await;
    let old = g.addr(leader).to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let acks: Acks = Arc::default();
    let writers = writers(g.addrs(), stop.clone(), acks.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    UnderLoad {
        g,
        leader,
        old,
        stop,
        acks,
        writers,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_nothing_acknowledged_is_lost() {
    let _serial = SERIAL.lock().await;
    let Some(etcd) = EtcdCluster::start_or_skip(3) else {
        return;
    };
    let UnderLoad {
        mut g,
        leader,
        old,
        stop,
        acks,
        writers: w,
    } = under_load(&etcd, 3, config(500)).await;
    let before = acks.lock().unwrap().len();
    let killed = Instant::now();
    g.kill(leader);
    let failover = first_ack_elsewhere(&acks, &old, killed).await;
    println!(
        "failover: SIGKILL of the leader to the first acknowledged submission: {failover:?} ({before} acknowledged before)"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_writers(&stop, w).await;
    let new = g.leader().await;
    assert_ne!(new, leader);
    check(&g, &acks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_hands_over() {
    let _serial = SERIAL.lock().await;
    let Some(etcd) = EtcdCluster::start_or_skip(3) else {
        return;
    };
    let UnderLoad {
        mut g,
        leader,
        old,
        stop,
        acks,
        writers: w,
    } = under_load(&etcd, 3, config(500)).await;
    let asked = Instant::now();
    signal(g.pid(leader), "-TERM");
    let handover = first_ack_elsewhere(&acks, &old, asked).await;
    println!("failover: SIGTERM of the leader to the first acknowledged submission: {handover:?}");
    let (mut serving, _) = g.replicas[leader].take().unwrap();
    let code = serving.wait();
    assert!(code.success(), "the old leader stopped cleanly: {code:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_writers(&stop, w).await;
    check(&g, &acks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_fenced_and_steps_down() {
    let _serial = SERIAL.lock().await;
    let Some(etcd) = EtcdCluster::start_or_skip(3) else {
        return;
    };
    let UnderLoad {
        g,
        leader,
        old,
        stop,
        acks,
        writers: w,
    } = under_load(&etcd, 3, config(500)).await;
    let paused = Instant::now();
    signal(g.pid(leader), "-STOP");
    // Calls to the paused leader only: they wait while it is stopped, and none may succeed.
    let stale = {
        let old = old.clone();
        tokio::spawn(async move {
            let ch = support::channel(&old).await;
            let mut calls = Vec::new();
            for i in 0..8u64 {
                let mut client = TenantServiceClient::new(ch.clone());
                calls.push(tokio::spawn(async move {
                    let req = pb::SubmitRequestRequest {
                        request_id: format!("stale-{i}"),
                        spec: Some(spec(i)),
                    };
                    client.submit_request(with_token(req, OTHER_TENANT)).await
                }));
            }
            let mut answers = Vec::new();
            for c in calls {
                answers.push(c.await.unwrap());
            }
            answers
        })
    };
    let failover = first_ack_elsewhere(&acks, &old, paused).await;
    println!(
        "failover: SIGSTOP of the leader to the first acknowledged submission elsewhere: {failover:?}"
    );
    // Past the lease by well over a second, while the new leader takes writes.
    let lease = suanli_broker::LEASE_TTL + Duration::from_secs(2);
    tokio::time::sleep(lease.saturating_sub(paused.elapsed())).await;
    signal(g.pid(leader), "-CONT");
    for answer in stale.await.unwrap() {
        let status = answer.expect_err("the paused leader acknowledged a call after its term");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    // It steps down and follows.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&old).await;
        if s.as_ref()
            .is_some_and(|s| !s.leader && !s.leader_address.is_empty())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old leader did not step down: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_writers(&stop, w).await;
    // Nothing the paused leader was asked is in the state.
    let other = all_requests(&g.leader_channel().await, OTHER_TENANT).await;
    assert!(
        other.is_empty(),
        "the paused leader's calls were applied: {other:?}"
    );
    check(&g, &acks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_goes_on_when_the_etcd_leader_dies() {
    let _serial = SERIAL.lock().await;
    let Some(mut etcd) = EtcdCluster::start_or_skip(3) else {
        return;
    };
    let UnderLoad {
        g,
        stop,
        acks,
        writers: w,
        ..
    } = under_load(&etcd, 3, config(500)).await;
    let member = etcd.wait_for_leader();
    let before = acks.lock().unwrap().len();
    let killed = Instant::now();
    etcd.kill(member);
    let mut etcd = tokio::task::spawn_blocking(move || {
        etcd.wait_for_leader();
        etcd
    })
    .await
    .unwrap();
    println!(
        "etcd leader member killed: etcd elected another in {:?}",
        killed.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while acks.lock().unwrap().len() < before + 100 {
        assert!(
            Instant::now() < deadline,
            "writes did not go on after etcd's election"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "failover: 100 more submissions acknowledged {:?} after the etcd leader was killed",
        killed.elapsed()
    );
    stop_writers(&stop, w).await;
    // The member comes back and catches up; the group is checked on the whole cluster.
    etcd.restart(member);
    check(&g, &acks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_joins_after_compaction_starts_from_the_snapshot() {
    let _serial = SERIAL.lock().await;
    let Some(etcd) = EtcdCluster::start_or_skip(3) else {
        return;
    };
    // Snapshots every 100 entries: the log is cut and etcd compacted many times.
    let mut g = Group::start(&etcd, 2, config(100));
    g.leader().await;
    let stop = Arc::new(AtomicBool::new(false));
    let acks: Acks = Arc::default();
    let w = writers(g.addrs(), stop.clone(), acks.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    while acks.lock().unwrap().len() < 600 {
        assert!(Instant::now() < deadline, "600 submissions took over 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_writers(&stop, w).await;
    assert!(
        etcd.has_key("/suanli/snapshot/latest"),
        "a snapshot was saved"
    );
    assert!(
        !etcd.has_key("/suanli/log/00000000000000000000"),
        "the log before the snapshot was dropped"
    );
    let joined = g.add();
    let s = status(g.addr(joined)).await;
    println!("a replica joined after compaction: {s:?}");
    check(&g, &acks).await;
}

/// A child process killed when dropped, so that a failing test leaves none behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pool whose agent runs jobs in the agent test.
const AGENT_POOL: &str = "futian-aicc";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_follows_the_new_leader_and_its_job_runs_once() {
    let _serial = SERIAL.lock().await;
    let Some(etcd) = EtcdCluster::start_or_skip(3) else {
        return;
    };
    let pools = format!("simulated = [\"*\"]\nagent = [\"{AGENT_POOL}\"]");
    let mut g = Group::start(&etcd, 3, config_with_pools(500, &pools));
    let leader = g.leader().await;
    let creds = support::wait_for_credentials(g.dirs[leader].path()).await;
    let agent_token = creds.agent(AGENT_POOL).expect("an agent token").to_string();
    let work = tempfile::tempdir().unwrap();
    let marker = work.path().join("started");
    let _agent = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_suanli"))
            .args(["--addr", &g.addrs().join(","), "--token", &agent_token])
            .args(["agent", "--fleet", "futian-2024", "--pool", AGENT_POOL])
            .args(["--backend", "process", "--allow-root", "--state-dir"])
            .arg(work.path().join("agent"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start suanli agent"),
    );
    // The job notes each start, then outlives the failover.
    let script = format!("echo started >> {}; sleep 15", marker.display());
    let spec = pb::RequestSpec {
        shape: Some(pb::request_spec::Shape::Gang(pb::GangShape {
            nodes: 1,
            devices_per_node: 4,
        })),
        duration_ms: 600_000,
        constraints: Some(pb::Constraints {
            pools: vec![AGENT_POOL.into()],
            ..Default::default()
        }),
        workload: Some(pb::Workload {
            argv: vec!["sh".into(), "-c".into(), script],
            ..Default::default()
        }),
        ..Default::default()
    };
    let group = group_channel(g.addrs());
    let mut tenant = TenantServiceClient::new(group.clone());
    let submit = pb::SubmitRequestRequest {
        request_id: "the-job".into(),
        spec: Some(spec),
    };
    let name = tenant
        .submit_request(with_token(submit, TENANT))
        .await
        .unwrap()
        .into_inner()
        .name;
    let state_of = |r: &pb::Request| pb::RequestState::try_from(r.state).unwrap();
    let get = {
        let tenant = tenant.clone();
        move |name: String| {
            let mut tenant = tenant.clone();
            async move {
                tenant
                    .get_request(with_token(pb::GetRequestRequest { name }, TENANT))
                    .await
                    .unwrap()
                    .into_inner()
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while state_of(&get(name.clone()).await) != pb::RequestState::Running {
        assert!(Instant::now() < deadline, "the job never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    g.kill(leader);
    let new = g.leader().await;
    // The new leader knows the job as running, and the agent is back with it.
    let r = get(name.clone()).await;
    assert_eq!(state_of(&r), pb::RequestState::Running, "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let r = get(name.clone()).await;
        if state_of(&r) != pb::RequestState::Running {
            break r;
        }
        assert!(Instant::now() < deadline, "the job did not end: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state_of(&done), pb::RequestState::Completed, "{done:?}");
    assert_eq!(done.leases, 1, "the job was placed once: {done:?}");
    let starts = std::fs::read_to_string(&marker).unwrap();
    assert_eq!(starts.lines().count(), 1, "the job started {starts:?}");
    // Its pool was never declared lost.
    let mut operator = OperatorServiceClient::new(group.clone());
    let pool = operator
        .get_pool(with_token(
            pb::GetPoolRequest {
                name: format!("pools/{AGENT_POOL}"),
            },
            OPERATOR,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pool.health, pb::PoolHealth::Healthy as i32, "{pool:?}");
    assert_ne!(new, leader);
}

/// The figures of BENCHMARKS.md: failover after SIGKILL of the leader, and handover after its
/// SIGTERM, each from the signal to the first acknowledged submission on another replica,
/// `SUANLI_FAILOVER_RUNS` times (10 by default). After each run a fresh replica joins, so the
/// group is three again. Run with
/// `cargo test --release -p suanli-cli --test ha -- --ignored --nocapture measure_failover`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for BENCHMARKS.md: minutes of faults"]
async fn measure_failover() {
    let _serial = SERIAL.lock().await;
    let etcd = EtcdCluster::start_or_skip(3).expect("etcd is needed for the measurement");
    let runs: usize = std::env::var("SUANLI_FAILOVER_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut g = Group::start(&etcd, 3, config(100_000));
    g.leader().await;
    let stop = Arc::new(AtomicBool::new(false));
    let acks: Acks = Arc::default();
    // Writers start afresh each run, with the addresses of the replicas running then.
    let mut figures = Vec::new();
    for signal_name in ["-KILL", "-TERM"] {
        let mut times = Vec::new();
        for run in 0..runs {
            let prefix = format!("{signal_name}{run}-");
            let w = writers_named(&prefix, g.addrs(), stop.clone(), acks.clone());
            tokio::time::sleep(Duration::from_millis(500)).await;
            let leader = g.leader().await;
            let old = g.addr(leader).to_string();
            let at = Instant::now();
            signal(g.pid(leader), signal_name);
            let took = first_ack_elsewhere(&acks, &old, at).await;
            println!("{signal_name} run {run}: {took:?}");
            times.push(took);
            stop_writers(&stop, w).await;
            stop.store(false, Ordering::Relaxed);
            g.kill(leader);
            g.add();
            g.leader().await;
        }
        times.sort();
        figures.push((signal_name, times));
    }
    for (signal_name, times) in &figures {
        println!(
            "failover after {signal_name}: min {:?}, median {:?}, max {:?} over {} runs: {:?}",
            times[0],
            times[times.len() / 2],
            times[times.len() - 1],
            times.len(),
            times
        );
    }
    check(&g, &acks).await;
}
