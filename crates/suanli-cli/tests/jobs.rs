//! Jobs that really run: the real broker, and the real agent with `--backend process` on the
//! Futian AI Computing Centre, over real sockets. A job's exit status comes back to the request,
//! its output is read with `suanli logs`, a release stops its process group, and an agent
//! killed with SIGKILL and restarted neither loses nor repeats a job.

mod support;

#[path = "../../suanli-agent/tests/support/slurm.rs"]
mod slurm_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use suanli_proto::v1 as pb;
use suanli_proto::v1::tenant_service_client::TenantServiceClient;
use support::{Serving, channel, start_with, wait_for_credentials, with_token};
use tonic::transport::Channel;

const POOL: &str = "futian-aicc";

/// A running `suanli agent`, killed when dropped.
struct Agent(Child);

impl Agent {
    /// `suanli agent` for `pool` of `fleet` (a file or a built-in fleet) with the backend
    /// arguments `backend`, keeping its state in `state`.
    fn spawn(
        addr: &str,
        token: &str,
        fleet: &std::ffi::OsStr,
        pool: &str,
        backend: &[&str],
        state: &Path,
    ) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_suanli"));
        command
            .args(["--addr", addr, "--token", token, "agent", "--fleet"])
            .arg(fleet)
            .args(["--pool", pool])
            .args(backend)
            .arg("--state-dir")
            .arg(state)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    /// The agent of the Futian AI Computing Centre, running jobs as processes.
    fn start(addr: &str, token: &str, state: &Path) -> Agent {
        Agent::process(addr, token, Path::new("futian-2024"), POOL, state)
    }

    /// An agent of `pool` in the fleet file `fleet`, running jobs as processes.
    fn process(addr: &str, token: &str, fleet: &Path, pool: &str, state: &Path) -> Agent {
        let backend = ["--backend", "process", "--allow-root"];
        let mut command = Agent::spawn(addr, token, fleet.as_os_str(), pool, &backend, state);
        Agent(command.spawn().expect("start suanli agent"))
    }

    /// An agent of `pool` in the fleet file `fleet`, on a Slurm cluster.
    fn slurm(
        addr: &str,
        token: &str,
        fleet: &Path,
        pool: &str,
        state: &Path,
        conf: &Path,
    ) -> Agent {
        let backend = [
            "--backend",
            "slurm",
            "--slurm-poll",
            "200ms",
            "--max-log-bytes",
            "16384",
        ];
        let mut command = Agent::spawn(addr, token, fleet.as_os_str(), pool, &backend, state);
        command.env("SLURM_CONF", conf);
        Agent(command.spawn().expect("start suanli agent"))
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn job(nodes: u32, argv: &[&str]) -> pb::RequestSpec {
    pb::RequestSpec {
        shape: Some(pb::request_spec::Shape::Gang(pb::GangShape {
            nodes,
            devices_per_node: 4,
        })),
        duration_ms: 3_600_000,
        constraints: Some(pb::Constraints {
            pools: vec![POOL.into()],
            ..Default::default()
        }),
        workload: Some(pb::Workload {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stop_grace_s: 2,
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Tenant {
    client: TenantServiceClient<Channel>,
    token: String,
}

impl Tenant {
    async fn submit(&mut self, spec: pb::RequestSpec) -> Result<pb::Request, tonic::Status> {
        let req = pb::SubmitRequestRequest {
            request_id: String::new(),
            spec: Some(spec),
        };
        Ok(self
            .client
            .submit_request(with_token(req, &self.token))
            .await?
            .into_inner())
    }

    async fn get(&mut self, name: &str) -> pb::Request {
        let req = pb::GetRequestRequest { name: name.into() };
        self.client
            .get_request(with_token(req, &self.token))
            .await
            .expect("get")
            .into_inner()
    }

    /// Waits (bounded) until the request is in `state`.
    async fn wait_for(&mut self, name: &str, state: pb::RequestState) -> pb::Request {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.get(name).await;
            if r.state == state as i32 {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never reached {state:?}: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `suanli logs` through the real binary: (stdout, stderr, success).
fn logs(addr: &str, token: &str, id: u64, node: u32) -> (String, String, bool) {
    let out = Command::new(env!("CARGO_BIN_EXE_suanli"))
        .args(["--addr", addr, "--token", token, "logs"])
        .arg(id.to_string())
        .args(["--node", &node.to_string()])
        .output()
        .expect("run suanli logs");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn broker(dir: &Path) -> (Serving, String) {
    start_with(
        dir,
        &format!("[pools]\nsimulated = [\"*\"]\nagent = [\"{POOL}\"]\n"),
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_on_the_process_backend_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, addr) = broker(dir.path());
    let creds = wait_for_credentials(dir.path()).await;
    let ch = channel(&addr).await;
    let token = creds.tenant("tenant-a").unwrap().to_string();
    let agent_token = creds.agent(POOL).expect("an agent token").to_string();
    let state = dir.path().join("agent");
    let mut agent = Agent::start(&addr, &agent_token, &state);
    let mut a = Tenant {
        client: TenantServiceClient::new(ch.clone()),
        token: token.clone(),
    };

    // A 2-node job that prints and exits 3: FAILED with exit code 3, output readable per node.
    let script = "echo hello from $SUANLI_NODE_RANK of $SUANLI_NUM_NODES lease $SUANLI_LEASE \
                  gpus $CUDA_VISIBLE_DEVICES; echo oops >&2; exit 3";
    let r = a.submit(job(2, &["/bin/sh", "-c", script])).await.unwrap();
    let ended = a.wait_for(&r.name, pb::RequestState::Failed).await;
    assert_eq!(ended.end_reason, pb::EndReason::JobFailed as i32);
    let outcome = ended.outcome.expect("a job's end carries its outcome");
    assert_eq!(outcome.cause, pb::JobCause::Failed as i32);
    assert_eq!(outcome.exit_code, Some(3));
    for node in 0..2 {
        let (out, err, ok) = logs(&addr, &token, r.id, node);
        assert!(ok, "suanli logs failed: {err}");
        assert!(
            out.contains(&format!(
                "hello from {node} of 2 lease r{}#1 gpus 0,1,2,3",
                r.id
            )),
            "node {node} stdout: {out:?}"
        );
        assert_eq!(err, "oops\n", "node {node} stderr");
    }

    // Exit 0 everywhere: COMPLETED.
    let r = a.submit(job(1, &["/bin/true"])).await.unwrap();
    let done = a.wait_for(&r.name, pb::RequestState::Completed).await;
    assert_eq!(done.end_reason, pb::EndReason::Finished as i32);
    assert_eq!(done.outcome.unwrap().exit_code, Some(0));

    // A missing executable fails with its cause and message, and the agent serves on.
    let r = a.submit(job(1, &["/no/such/program"])).await.unwrap();
    let failed = a.wait_for(&r.name, pb::RequestState::Failed).await;
    let outcome = failed.outcome.unwrap();
    assert_eq!(outcome.cause, pb::JobCause::LaunchFailed as i32);
    assert!(outcome.message.contains("/no/such/program"), "{outcome:?}");

    // A job still running at the end of its duration is stopped and fails, timed out.
    let mut short = job(1, &["/bin/sh", "-c", "echo started; exec sleep 600"]);
    short.duration_ms = 1_500;
    let r = a.submit(short).await.unwrap();
    let over = a.wait_for(&r.name, pb::RequestState::Failed).await;
    assert_eq!(over.end_reason, pb::EndReason::Expired as i32);
    assert_eq!(over.outcome.unwrap().cause, pb::JobCause::TimedOut as i32);

    // A release stops a running job: its process group is gone within the grace period.
    let pid_file = dir.path().join("sleeper.pid");
    let sleeper = format!("echo $$ > {}; exec sleep 600", pid_file.display());
    let r = a
        .submit(job(1, &["/bin/sh", "-c", &sleeper]))
        .await
        .unwrap();
    a.wait_for(&r.name, pb::RequestState::Running).await;
    wait_until("the job wrote its pid", || pid_file.exists()).await;
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let release = pb::ReleaseRequestRequest {
        request_id: String::new(),
        name: r.name.clone(),
    };
    a.client
        .release_request(with_token(release, &token))
        .await
        .unwrap();
    wait_until("the released job's process is gone", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    })
    .await;

    // The agent killed with SIGKILL while a job runs, and started again: the job runs once,
    // and its end is reported.
    let starts = dir.path().join("starts");
    let once = format!("echo start >> {}; sleep 2", starts.display());
    let r = a.submit(job(1, &["/bin/sh", "-c", &once])).await.unwrap();
    a.wait_for(&r.name, pb::RequestState::Running).await;
    agent.kill();
    let _agent = Agent::start(&addr, &agent_token, &state);
    let done = a.wait_for(&r.name, pb::RequestState::Completed).await;
    assert_eq!(done.outcome.unwrap().exit_code, Some(0));
    assert_eq!(
        std::fs::read_to_string(&starts).unwrap(),
        "start\n",
        "ran exactly once"
    );

    // A node the lease does not have is named in the error.
    let (_, err, ok) = logs(&addr, &token, r.id, 9);
    assert!(
        !ok && err.contains("INVALID_ARGUMENT") && err.contains("node_rank"),
        "{err}"
    );

    // Another tenant's logs are NOT_FOUND, like its requests.
    let (_, err, ok) = logs(&addr, creds.tenant("tenant-b").unwrap(), r.id, 0);
    assert!(!ok && err.contains("NOT_FOUND"), "{err}");

    // A capacity lease has no output to read.
    let mut capacity = job(1, &["x"]);
    capacity.workload = None;
    let r = a.submit(capacity).await.unwrap();
    let (_, err, ok) = logs(&addr, &token, r.id, 0);
    assert!(!ok && err.contains("FAILED_PRECONDITION"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_workloads_are_refused_by_field_and_unrunnable_ones_wait_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, addr) = broker(dir.path());
    let creds = wait_for_credentials(dir.path()).await;
    let ch = channel(&addr).await;
    let mut a = Tenant {
        client: TenantServiceClient::new(ch),
        token: creds.tenant("tenant-a").unwrap().to_string(),
    };
    let long = "x".repeat(5000);
    let mut too_many = job(1, &["a"]);
    too_many.workload.as_mut().unwrap().argv = vec!["a".into(); 300];
    let mut bad_env = job(1, &["a"]);
    bad_env.workload.as_mut().unwrap().env = vec![pb::EnvVar {
        name: "1BAD".into(),
        value: String::new(),
    }];
    let mut reserved = job(1, &["a"]);
    reserved.workload.as_mut().unwrap().env = vec![pb::EnvVar {
        name: "SUANLI_NODE_RANK".into(),
        value: "9".into(),
    }];
    for (spec, field) in [
        (job(1, &["a", &long]), "spec.workload.argv[1]"),
        (too_many, "spec.workload.argv"),
        (job(1, &[]), "spec.workload.argv"),
        (bad_env, "spec.workload.env[0].name"),
        (reserved, "spec.workload.env[0].name"),
    ] {
        let e = a.submit(spec).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    // No agent runs commands yet: the job waits, and says why.
    let r = a.submit(job(1, &["/bin/true"])).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = a.get(&r.name).await;
        assert_eq!(now.state, pb::RequestState::Queued as i32);
        let reason = now.wait.unwrap().reason;
        if reason == pb::WaitReason::WorkloadUnsupported as i32 {
            break;
        }
        assert_eq!(reason, pb::WaitReason::Pending as i32, "{now:?}");
        assert!(Instant::now() < deadline, "never said why it waits");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fleet of the Slurm test: one pool of two nodes of four H100s, as the cluster has.
const LAB_FLEET: &str = r#"
name = "lab"

[[pool]]
id = "slurm-lab"
name = "Slurm on loopback"
kind = "external"
region = "guangdong-shenzhen"
rtt_ms = 1
data_zone = "mainland"

[[pool.group]]
model = "h100"
devices_per_node = 4
nodes = 2
interconnect = "nvlink"
price_fen_per_device_hour = 1000
"#;

/// A broker of the lab fleet in a test's folder, its pool run by an agent.
struct Lab {
    _broker: Serving,
    addr: String,
    creds: suanli_broker::credentials::Credentials,
    agent_token: String,
    fleet: std::path::PathBuf,
    state: std::path::PathBuf,
}

impl Lab {
    async fn start(dir: &Path) -> Lab {
        let fleet = dir.join("lab.toml");
        std::fs::write(&fleet, LAB_FLEET).unwrap();
        // The fleet is named in the file: the pools it states must be the fleet's.
        let (broker, addr) = start_with(
            dir,
            "fleet = \"lab.toml\"\n[pools]\nagent = [\"slurm-lab\"]\n",
            &[],
        );
        let creds = wait_for_credentials(dir).await;
        let agent_token = creds
            .agent("slurm-lab")
            .expect("an agent token")
            .to_string();
        Lab {
            _broker: broker,
            addr,
            creds,
            agent_token,
            fleet,
            state: dir.join("agent"),
        }
    }

    /// The pool's agent on the Slurm cluster of `conf`.
    fn slurm_agent(&self, conf: &Path) -> Agent {
        Agent::slurm(
            &self.addr,
            &self.agent_token,
            &self.fleet,
            "slurm-lab",
            &self.state,
            conf,
        )
    }

    /// The pool's agent running jobs as processes.
    fn process_agent(&self) -> Agent {
        Agent::process(
            &self.addr,
            &self.agent_token,
            &self.fleet,
            "slurm-lab",
            &self.state,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_on_a_real_slurm_cluster() {
    let Some(cluster) = slurm_support::SlurmCluster::start_or_skip(2, 4) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path()).await;
    let (addr, token) = (
        lab.addr.clone(),
        lab.creds.tenant("tenant-a").unwrap().to_string(),
    );
    let _agent = lab.slurm_agent(cluster.conf_path());
    let mut a = Tenant {
        client: TenantServiceClient::new(channel(&addr).await),
        token: token.clone(),
    };
    let lab = |nodes: u32, devices: u32, argv: &[&str]| {
        let mut spec = job(nodes, argv);
        spec.shape = Some(pb::request_spec::Shape::Gang(pb::GangShape {
            nodes,
            devices_per_node: devices,
        }));
        spec.constraints = Some(pb::Constraints {
            pools: vec!["slurm-lab".into()],
            ..Default::default()
        });
        spec
    };

    // A 2x2 gang runs on both nodes, completes, and each node's output comes back.
    let script = "echo node $SUANLI_NODE_RANK of $SUANLI_NUM_NODES on $SLURMD_NODENAME gpus \
                  $CUDA_VISIBLE_DEVICES master $SUANLI_MASTER_ADDR";
    let r = a
        .submit(lab(2, 2, &["/bin/sh", "-c", script]))
        .await
        .unwrap();
    let done = a.wait_for(&r.name, pb::RequestState::Completed).await;
    assert_eq!(done.end_reason, pb::EndReason::Finished as i32);
    assert!(
        done.lease.unwrap().running_since_unix_ms.is_some(),
        "it ran: Slurm started it before it ended"
    );
    assert_eq!(done.outcome.unwrap().exit_code, Some(0));
    let mut hosts = Vec::new();
    for node in 0..2 {
        let (out, err, ok) = logs(&addr, &token, r.id, node);
        assert!(ok, "suanli logs failed: {err}");
        assert!(
            out.contains(&format!("node {node} of 2 on ")),
            "node {node}: {out:?}"
        );
        assert!(out.contains("gpus 0,1 master "), "node {node}: {out:?}");
        let host = out.split(" on ").nth(1).unwrap().split(' ').next().unwrap();
        hosts.push(host.to_string());
    }
    assert_ne!(hosts[0], hosts[1], "one copy on each node: {hosts:?}");

    // Output is capped and rotated on the nodes: the newest lines are kept.
    let r = a.submit(lab(1, 1, &["seq", "1", "20000"])).await.unwrap();
    a.wait_for(&r.name, pb::RequestState::Completed).await;
    let (out, err, ok) = logs(&addr, &token, r.id, 0);
    assert!(ok, "suanli logs failed: {err}");
    assert!(out.ends_with("\n20000\n"), "the newest lines are kept");
    assert!(!out.starts_with("1\n2\n"), "the oldest are rotated out");
    assert!(out.len() <= 16384, "{} bytes kept", out.len());

    // A job that exits 3 on its second node fails with that code.
    let fails = [
        "/bin/sh",
        "-c",
        "[ $SUANLI_NODE_RANK = 1 ] && exit 3; exit 0",
    ];
    let r = a.submit(lab(2, 1, &fails)).await.unwrap();
    let failed = a.wait_for(&r.name, pb::RequestState::Failed).await;
    let o = failed.outcome.unwrap();
    assert_eq!(
        (o.cause, o.exit_code, o.node_rank),
        (pb::JobCause::Failed as i32, Some(3), 1),
        "{o:?}"
    );

    // A job over its time: the lease ends, the job is cancelled, the request fails timed out.
    let mut over = lab(1, 1, &["sleep", "600"]);
    over.duration_ms = 3_000;
    let r = a.submit(over).await.unwrap();
    let over = a.wait_for(&r.name, pb::RequestState::Failed).await;
    assert_eq!(over.outcome.unwrap().cause, pb::JobCause::TimedOut as i32);
    let name = format!("suanli-r{}-l1", r.id);
    wait_until("squeue no longer shows the timed-out job running", || {
        !slurm_running(&cluster, &name)
    })
    .await;

    // A release scancels a running job: squeue no longer shows it running.
    let r = a.submit(lab(1, 1, &["sleep", "600"])).await.unwrap();
    a.wait_for(&r.name, pb::RequestState::Running).await;
    let name = format!("suanli-r{}-l1", r.id);
    assert!(slurm_running(&cluster, &name), "{}", cluster.squeue());
    let release = pb::ReleaseRequestRequest {
        request_id: String::new(),
        name: r.name.clone(),
    };
    a.client
        .release_request(with_token(release, &token))
        .await
        .unwrap();
    wait_until("squeue no longer shows the released job running", || {
        !slurm_running(&cluster, &name)
    })
    .await;
}

/// Whether Slurm lists a job of this name as pending, running or finishing.
fn slurm_running(cluster: &slurm_support::SlurmCluster, name: &str) -> bool {
    cluster.squeue().lines().any(|line| {
        let f: Vec<&str> = line.split('|').collect();
        f.len() >= 4
            && f[3] == name
            && matches!(f[1], "PENDING" | "RUNNING" | "COMPLETING" | "CONFIGURING")
    })
}

/// Not a check but the measurement behind BENCHMARKS.md: 200 short jobs through a Slurm
/// agent, eight at a time, with `suanli loadgen --jobs`. Run it with
/// `cargo test --release -p suanli-cli --test jobs -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for BENCHMARKS.md, not a check: run it with --ignored"]
async fn measure_jobs_through_slurm() {
    let Some(cluster) = slurm_support::SlurmCluster::start_or_skip(2, 4) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path()).await;
    let _agent = lab.slurm_agent(cluster.conf_path());
    let (addr, creds) = (&lab.addr, &lab.creds);
    let jobs = std::env::var("SUANLI_MEASURE_JOBS").unwrap_or_else(|_| "200".into());
    let out = Command::new(env!("CARGO_BIN_EXE_suanli"))
        .args([
            "--addr",
            addr,
            "--token",
            creds.tenant("tenant-a").unwrap(),
            "--json",
        ])
        .args([
            "loadgen",
            "--jobs",
            &jobs,
            "--concurrency",
            "8",
            "--job-pool",
            "slurm-lab",
        ])
        .output()
        .expect("run suanli loadgen");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_job_is_stopped_and_its_process_group_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path()).await;
    let _agent = lab.process_agent();
    let (addr, creds) = (&lab.addr, &lab.creds);
    let ch = channel(addr).await;
    let tenant = |name: &str| Tenant {
        client: TenantServiceClient::new(ch.clone()),
        token: creds.tenant(name).unwrap().to_string(),
    };
    let (mut a, mut b) = (tenant("tenant-a"), tenant("tenant-b"));
    let on_lab = |priority: pb::Priority, argv: &[&str]| {
        let mut spec = job(2, argv);
        spec.priority = priority as i32;
        spec.constraints = Some(pb::Constraints {
            pools: vec!["slurm-lab".into()],
            ..Default::default()
        });
        spec
    };
    // A spot job takes the whole pool.
    let pid_file = dir.path().join("spot.pid");
    let spot = format!(
        "[ $SUANLI_NODE_RANK = 0 ] && echo $$ > {}; exec sleep 600",
        pid_file.display()
    );
    let r = a
        .submit(on_lab(pb::Priority::Spot, &["/bin/sh", "-c", &spot]))
        .await
        .unwrap();
    a.wait_for(&r.name, pb::RequestState::Running).await;
    wait_until("the spot job wrote its pid", || pid_file.exists()).await;
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    // Standard work preempts it: its processes are stopped, and the standard job runs.
    let standard = b
        .submit(on_lab(pb::Priority::Standard, &["/bin/true"]))
        .await
        .unwrap();
    let preempted = a.wait_for(&r.name, pb::RequestState::Preempted).await;
    assert_eq!(preempted.end_reason, pb::EndReason::Preempted as i32);
    wait_until("the preempted job's process is gone", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    })
    .await;
    b.wait_for(&standard.name, pb::RequestState::Completed)
        .await;
}
