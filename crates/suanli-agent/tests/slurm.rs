//! The `slurm` backend against a real Slurm that the test starts (2 nodes of 4 fake GPUs,
//! see `support/slurm.rs`): gangs, failures, time limits, stops, restarts of the agent,
//! refusals and argument quoting. Skipped, with a note on stderr, where Slurm is not installed
//! or the test is not root; `SUANLI_REQUIRE_SLURM=1` makes that a failure.
//!
//! Everything runs on one cluster in one test, since starting it takes seconds. The time-limit
//! job is submitted first and checked last: Slurm enforces limits in whole minutes, checked
//! every 30 s, so it needs 60 to 100 s, during which the other steps run.

#[path = "support/slurm.rs"]
mod slurm_support;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use slurm_support::SlurmCluster;
use suanli_agent::backend::{Backend, BackendError, Job, JobEvent, LeaseId, NodeSlot};
use suanli_agent::slurm::{SlurmBackend, SlurmConfig};
use suanli_proto::v1 as pb;

/// The bound of every wait.
const WAIT: Duration = Duration::from_secs(120);

fn lease(request: u64) -> LeaseId {
    LeaseId { request, lease: 1 }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as u64
}

/// A job of request `request` on this pool's nodes `ranks`, lasting `minutes`.
fn job(
    request: u64,
    ranks: &[u32],
    num_nodes: u32,
    devices: u32,
    argv: &[&str],
    minutes: u64,
) -> Job {
    let start = now_ms();
    Job {
        id: lease(request),
        tenant: "acme".into(),
        workload: pb::Workload {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
        nodes: ranks
            .iter()
            .map(|&rank| NodeSlot {
                rank,
                group: 0,
                node: rank,
                devices,
                model: "h100".into(),
            })
            .collect(),
        num_nodes,
        start_unix_ms: start,
        end_unix_ms: start + minutes * 60_000,
    }
}

/// Drives a backend like the agent does, keeping every outcome it reports.
struct Driver<'a> {
    cluster: &'a SlurmCluster,
    backend: SlurmBackend,
    ended: HashMap<LeaseId, pb::JobOutcome>,
    running: HashSet<LeaseId>,
}

impl Driver<'_> {
    fn poll(&mut self) {
        for event in self.backend.poll() {
            match event {
                JobEvent::Running(lease) => {
                    // Again after a new backend recovers it; never after its end.
                    self.running.insert(lease);
                    assert!(
                        !self.ended.contains_key(&lease),
                        "{lease} running after its end"
                    );
                }
                JobEvent::Ended(lease, outcome) => {
                    let again = self.ended.insert(lease, outcome.clone());
                    assert!(again.is_none(), "{lease} reported twice: {outcome:?}");
                }
            }
        }
    }

    /// Polls until the lease's end is reported.
    fn wait_end(&mut self, lease: LeaseId) -> pb::JobOutcome {
        let deadline = Instant::now() + WAIT;
        loop {
            self.poll();
            if let Some(outcome) = self.ended.get(&lease) {
                return outcome.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{lease} did not end within {WAIT:?}; squeue:\n{}",
                self.cluster.squeue()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Polls until Slurm shows the lease's only job in a state that `want` accepts.
    fn wait_state(&mut self, lease: LeaseId, what: &str, want: impl Fn(&str) -> bool) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            self.poll();
            let jobs = jobs_of(self.cluster, lease);
            if let [(id, state)] = jobs.as_slice()
                && want(state)
            {
                return *id;
            }
            assert!(
                Instant::now() < deadline,
                "{lease} not {what} within {WAIT:?}; squeue:\n{}",
                self.cluster.squeue()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Slurm's jobs of a lease, by name: `(id, state)`.
fn jobs_of(cluster: &SlurmCluster, lease: LeaseId) -> Vec<(u64, String)> {
    let name = format!("suanli-r{}-l{}", lease.request, lease.lease);
    let out = cluster
        .command("squeue")
        .args(["-h", "-t", "all", "-o", "%i|%T", &format!("--name={name}")])
        .output()
        .expect("squeue runs");
    assert!(
        out.status.success(),
        "squeue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (id, state) = line.trim().split_once('|')?;
            Some((id.parse().ok()?, state.to_string()))
        })
        .collect()
}

/// A node's stdout as the backend keeps it: its files oldest first, those that exist.
fn stdout_of(backend: &SlurmBackend, lease: LeaseId, rank: u32) -> String {
    let files = backend
        .logs(lease, rank)
        .unwrap_or_else(|| panic!("no logs for {lease} rank {rank}"));
    let current = files.stdout.last().expect("a current file");
    assert!(current.exists(), "{} is missing", current.display());
    files
        .stdout
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .collect()
}

fn cause(o: &pb::JobOutcome) -> pb::JobCause {
    pb::JobCause::try_from(o.cause).expect("a known cause")
}

#[test]
fn slurm_backend_on_a_real_cluster() {
    let Some(cluster) = SlurmCluster::start_or_skip(2, 4) else {
        return;
    };
    let began = Instant::now();
    let state = tempfile::tempdir().expect("a state folder");
    let config = SlurmConfig {
        slurm_conf: Some(cluster.conf_path().to_path_buf()),
        bin_dir: Some(cluster.bin_dir().to_path_buf()),
        poll_interval: Duration::from_millis(200),
        ..SlurmConfig::new(state.path())
    };
    let backend = SlurmBackend::new(config.clone()).expect("a backend");
    assert_eq!(backend.name(), "slurm");
    assert_eq!(backend.runtimes(), vec![pb::WorkloadRuntime::Command]);
    let mut d = Driver {
        cluster: &cluster,
        backend,
        ended: HashMap::new(),
        running: HashSet::new(),
    };

    // The time limit: a one-minute lease that sleeps ten; its end is checked last. It holds no
    // GPU, so the gang below gets GPUs 0 and 1 on both nodes.
    let over_time = job(100, &[0], 1, 0, &["sleep", "600"], 1);
    d.backend.start(&over_time).expect("submitted");

    // 1. A 2x2 gang: each node's copy with its rank, its GPUs and the master's address.
    let gang = job(
        1,
        &[0, 1],
        2,
        2,
        &[
            "/bin/sh",
            "-c",
            "echo rank=$SUANLI_NODE_RANK of $SUANLI_NUM_NODES host=$(hostname) \
             gpus=$CUDA_VISIBLE_DEVICES master=$SUANLI_MASTER_ADDR lease=$SUANLI_LEASE",
        ],
        10,
    );
    d.backend.start(&gang).expect("submitted");
    d.backend.start(&gang).expect("a second start does nothing");
    let done = d.wait_end(gang.id);
    assert!(
        d.running.contains(&gang.id),
        "Slurm was seen running it before its end"
    );
    assert_eq!(cause(&done), pb::JobCause::Completed, "{done:?}");
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(jobs_of(&cluster, gang.id).len(), 1, "submitted once");
    for rank in 0..2 {
        let out = stdout_of(&d.backend, gang.id, rank);
        assert!(
            out.contains(&format!("rank={rank} of 2 ")),
            "rank {rank}: {out}"
        );
        assert!(out.contains("gpus=0,1 "), "rank {rank}: {out}");
        assert!(out.contains("master=n001 "), "rank {rank}: {out}");
        assert!(out.contains("lease=r1#1"), "rank {rank}: {out}");
    }
    eprintln!("gang completed after {:?}", began.elapsed());

    // 2. A copy exiting 3 fails the job with its code and rank; the other copy is stopped.
    let failing = job(
        2,
        &[0, 1],
        2,
        1,
        &[
            "/bin/sh",
            "-c",
            "if [ \"$SUANLI_NODE_RANK\" = 1 ]; then exit 3; fi; sleep 60",
        ],
        10,
    );
    d.backend.start(&failing).expect("submitted");
    let failed = d.wait_end(failing.id);
    assert_eq!(cause(&failed), pb::JobCause::Failed, "{failed:?}");
    assert_eq!(
        (failed.exit_code, failed.node_rank),
        (Some(3), 1),
        "{failed:?}"
    );
    assert!(failed.message.contains("FAILED"), "{failed:?}");

    // 7. Arguments and variables arrive exactly as given; a lease spanning pools keeps its ranks.
    let args = [
        "two words",
        "it's",
        "\"double\"",
        "$HOME and $(date) and `id`",
        "line one\nline two",
        "",
        "back\\slash",
        "tab\there",
        "*",
        "--output=x",
    ];
    let mut argv = vec![
        "/bin/sh",
        "-c",
        "printf '%s\\n' \"$@\"; printf 'rank=%s odd=%s\\n' \"$SUANLI_NODE_RANK\" \"$ODD\"",
        "sh",
    ];
    argv.extend(args);
    let mut quoting = job(3, &[4], 6, 0, &argv, 10);
    let odd = "a'b $c\nd\\e";
    quoting.workload.env.push(pb::EnvVar {
        name: "ODD".into(),
        value: odd.into(),
    });
    d.backend.start(&quoting).expect("submitted");
    let done = d.wait_end(quoting.id);
    assert_eq!(cause(&done), pb::JobCause::Completed, "{done:?}");
    let mut expected: String = args.iter().map(|a| format!("{a}\n")).collect();
    expected.push_str(&format!("rank=4 odd={odd}\n"));
    assert_eq!(stdout_of(&d.backend, quoting.id, 4), expected);
    assert!(
        d.backend.logs(quoting.id, 0).is_none(),
        "rank 0 is on another pool"
    );

    // 6. Slurm refusing a job is a launch error with its words; the backend serves on.
    let too_big = job(4, &[0], 1, 9, &["true"], 10);
    match d.backend.start(&too_big) {
        Err(BackendError::Launch(m)) => {
            assert!(
                m.contains("Requested node configuration is not available"),
                "{m}"
            )
        }
        other => panic!("9 GPUs on a node of 4: {other:?}"),
    }
    let nowhere_state = tempfile::tempdir().expect("a state folder");
    let mut nowhere = SlurmBackend::new(SlurmConfig {
        partition: Some("nope".into()),
        ..SlurmConfig {
            state_dir: nowhere_state.path().to_path_buf(),
            ..config.clone()
        }
    })
    .expect("a backend");
    match nowhere.start(&job(41, &[0], 1, 1, &["true"], 10)) {
        Err(BackendError::Launch(m)) => assert!(m.contains("Invalid partition"), "{m}"),
        other => panic!("a partition that does not exist: {other:?}"),
    }
    let empty_bin = tempfile::tempdir().expect("a folder");
    let mut no_sbatch = SlurmBackend::new(SlurmConfig {
        bin_dir: Some(empty_bin.path().to_path_buf()),
        ..SlurmConfig {
            state_dir: nowhere_state.path().join("other"),
            ..config.clone()
        }
    })
    .expect("a backend");
    match no_sbatch.start(&job(42, &[0], 1, 1, &["true"], 10)) {
        Err(BackendError::Fatal(m)) => assert!(m.contains("sbatch"), "{m}"),
        other => panic!("without sbatch: {other:?}"),
    }
    let mut image = job(43, &[0], 1, 1, &["true"], 10);
    image.workload.image = "pytorch:2".into();
    match d.backend.start(&image) {
        Err(BackendError::Launch(m)) => assert!(m.contains("not images"), "{m}"),
        other => panic!("an image: {other:?}"),
    }

    // A job cancelled by someone else is reported cancelled.
    let cancelled = job(5, &[0], 1, 1, &["sleep", "600"], 10);
    d.backend
        .start(&cancelled)
        .expect("submitted after the refusals");
    let id = d.wait_state(cancelled.id, "running", |s| s == "RUNNING");
    let status = cluster
        .command("scancel")
        .arg(id.to_string())
        .status()
        .expect("scancel runs");
    assert!(status.success());
    let o = d.wait_end(cancelled.id);
    assert_eq!(cause(&o), pb::JobCause::Cancelled, "{o:?}");

    // 4. stop(): the workload gets TERM and its grace...
    let polite = job(
        6,
        &[0],
        1,
        1,
        &[
            "/bin/sh",
            "-c",
            "trap 'echo got TERM; exit 0' TERM; echo started; sleep 600 & wait",
        ],
        10,
    );
    d.backend.start(&polite).expect("submitted");
    d.wait_state(polite.id, "running", |s| s == "RUNNING");
    wait_for_file(&d, polite.id, "started");
    d.backend.stop(polite.id, Duration::from_secs(30));
    d.wait_state(polite.id, "over", |s| s != "RUNNING" && s != "COMPLETING");
    assert!(stdout_of(&d.backend, polite.id, 0).contains("got TERM"));
    // ...and one that ignores TERM is cancelled once the grace is over.
    let stubborn = job(
        7,
        &[0],
        1,
        1,
        &["/bin/sh", "-c", "trap '' TERM; sleep 600"],
        10,
    );
    d.backend.start(&stubborn).expect("submitted");
    d.wait_state(stubborn.id, "running", |s| s == "RUNNING");
    d.backend.stop(stubborn.id, Duration::from_secs(1));
    d.wait_state(stubborn.id, "cancelled", |s| s == "CANCELLED");
    for _ in 0..5 {
        d.poll();
    }
    assert!(
        !d.ended.contains_key(&polite.id),
        "a stopped job's end is not reported"
    );
    assert!(
        !d.ended.contains_key(&stubborn.id),
        "a stopped job's end is not reported"
    );
    eprintln!("stops done after {:?}", began.elapsed());

    // 5. recover(): a new backend on the same folder finds the running job and does not submit
    // it again.
    let long = job(8, &[0], 1, 1, &["sleep", "600"], 10);
    d.backend.start(&long).expect("submitted");
    d.wait_state(long.id, "running", |s| s == "RUNNING");
    let mut again = SlurmBackend::new(config.clone()).expect("a backend");
    let running = again.recover().expect("recovered");
    assert!(running.contains(&long.id), "{running:?}");
    assert!(
        !running.contains(&polite.id) && !running.contains(&gang.id),
        "{running:?}"
    );
    again.start(&long).expect("a no-op");
    assert_eq!(jobs_of(&cluster, long.id).len(), 1, "never a second sbatch");
    d.backend = again;
    d.backend.stop(long.id, Duration::ZERO);
    // A job that ends while the agent is away is reported by the next poll.
    let quick = job(9, &[0], 1, 1, &["true"], 10);
    d.backend.start(&quick).expect("submitted");
    d.backend = SlurmBackend::new(config.clone()).expect("a backend");
    d.wait_state(quick.id, "completed", |s| s == "COMPLETED");
    let held = d.backend.recover().expect("recovered");
    assert!(
        held.contains(&quick.id),
        "held until its end is reported: {held:?}"
    );
    let o = d.wait_end(quick.id);
    assert_eq!(cause(&o), pb::JobCause::Completed, "{o:?}");

    // 3. The job past its time limit.
    let o = d.wait_end(over_time.id);
    assert_eq!(cause(&o), pb::JobCause::TimedOut, "{o:?}");
    assert!(o.message.contains("TIMEOUT"), "{o:?}");
    eprintln!("time limit reached after {:?}", began.elapsed());
}

/// Waits until a lease's rank-0 output contains `text`.
fn wait_for_file(d: &Driver<'_>, lease: LeaseId, text: &str) {
    let deadline = Instant::now() + WAIT;
    while !d
        .backend
        .logs(lease, 0)
        .and_then(|f| fs::read_to_string(f.stdout.last()?).ok())
        .is_some_and(|out| out.contains(text))
    {
        assert!(Instant::now() < deadline, "{lease} never printed {text:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
