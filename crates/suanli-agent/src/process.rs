//! The `process` backend: a pool that is one machine. Each node's copy of a job runs as a child
//! process of the agent, through the node wrapper ([`crate::exec`]) in a process group of its
//! own, with the devices it holds as `CUDA_VISIBLE_DEVICES`-style indices chosen among the
//! node's devices that no other lease holds.
//!
//! Everything about a lease lives in `STATE/leases/r{request}-l{lease}/`: `job.json` (what was
//! started, with the devices and the wrappers' pids), one `node-{rank}/` folder per copy with
//! its output and status, and `ended.json` once the job has ended. A restarted agent reads
//! these back ([`ProcessBackend::recover`]), so it neither loses a job nor starts one twice.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process, kill_process_group, test_kill_process};
use serde::{Deserialize, Serialize};
use suanli_proto::v1 as pb;

use crate::backend::{
    Backend, BackendError, Job, JobEvent, Launched, LeaseId, LogFiles, NodeSlot, outcome,
    save_outcome, saved_outcome,
};
use crate::exec::{self, NodeStatus};

/// How the `process` backend is set up.
#[derive(Clone, Debug)]
pub struct ProcessConfig {
    /// Where leases' folders go.
    pub state_dir: PathBuf,
    /// The program that is the node wrapper, run as `WRAPPER exec-node ...` (the `suanli`
    /// binary).
    pub wrapper: PathBuf,
    /// Bytes kept of each output of each node.
    pub max_log_bytes: u64,
    /// Run jobs as this user and group id instead of the agent's.
    pub run_as: Option<(u32, u32)>,
    /// How often to look for ended jobs.
    pub poll_interval: Duration,
}

/// What `job.json` holds: enough to find the copies again after a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    id: LeaseId,
    nodes: Vec<NodeRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct NodeRecord {
    slot: NodeSlot,
    /// Device indices on the node.
    devices: Vec<u32>,
    /// The wrapper's pid, which is also its process group; none when it could not start.
    pid: Option<u32>,
}

/// One copy as the backend follows it.
struct Copy {
    rank: u32,
    dir: PathBuf,
    pid: Option<u32>,
    /// The wrapper, when this agent started it (after a restart, only its pid is known).
    child: Option<Child>,
    ended: Option<pb::JobOutcome>,
}

struct Running {
    record: Record,
    copies: Vec<Copy>,
    /// When stopped: when to kill what is left.
    kill_at: Option<Instant>,
}

/// See the module documentation.
pub struct ProcessBackend {
    config: ProcessConfig,
    running: BTreeMap<LeaseId, Running>,
    /// Device indices in use, per (group, node).
    in_use: BTreeMap<(u32, u32), BTreeSet<u32>>,
    /// Events for the next poll.
    events: Vec<JobEvent>,
}

impl ProcessBackend {
    /// A backend keeping its state in `config.state_dir`, created if missing.
    pub fn new(mut config: ProcessConfig) -> Result<Self, BackendError> {
        let leases = config.state_dir.join("leases");
        fs::create_dir_all(&leases)
            .map_err(|e| BackendError::Fatal(format!("state folder {}: {e}", leases.display())))?;
        // Copies run in their own folders: a relative path would point elsewhere from there.
        config.state_dir = fs::canonicalize(&config.state_dir).map_err(|e| {
            BackendError::Fatal(format!("state folder {}: {e}", config.state_dir.display()))
        })?;
        Ok(ProcessBackend {
            config,
            running: BTreeMap::new(),
            in_use: BTreeMap::new(),
            events: Vec::new(),
        })
    }

    fn lease_dir(&self, id: LeaseId) -> PathBuf {
        lease_dir(&self.config.state_dir, id)
    }

    /// The lowest free device indices of a node.
    fn take_devices(&mut self, slot: &NodeSlot) -> Vec<u32> {
        let used = self.in_use.entry((slot.group, slot.node)).or_default();
        let mut out = Vec::with_capacity(slot.devices as usize);
        let mut i = 0;
        while out.len() < slot.devices as usize {
            if used.insert(i) {
                out.push(i);
            }
            i += 1;
        }
        out
    }

    fn free_devices(&mut self, record: &Record) {
        for n in &record.nodes {
            if let Some(used) = self.in_use.get_mut(&(n.slot.group, n.slot.node)) {
                for d in &n.devices {
                    used.remove(d);
                }
            }
        }
    }

    fn spawn_copy(&self, job: &Job, node: &NodeRecord, dir: &Path) -> Result<Child, String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let devices = node
            .devices
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut command = Command::new(&self.config.wrapper);
        command
            .arg("exec-node")
            .arg("--dir")
            .arg(dir)
            .arg("--max-log-bytes")
            .arg(self.config.max_log_bytes.to_string());
        if !job.workload.working_dir.is_empty() {
            command.arg("--workdir").arg(&job.workload.working_dir);
        }
        if let Some((uid, gid)) = self.config.run_as {
            command.arg("--run-as").arg(format!("{uid}:{gid}"));
        }
        command.arg("--").args(&job.workload.argv);
        for v in &job.workload.env {
            command.env(&v.name, &v.value);
        }
        command
            .envs(job.suanli_env(node.slot.rank))
            .env("SUANLI_MASTER_ADDR", "127.0.0.1")
            .env("CUDA_VISIBLE_DEVICES", &devices);
        // Accelerators of other vendors read their own variable.
        if node.slot.model.starts_with("ascend") {
            command.env("ASCEND_RT_VISIBLE_DEVICES", &devices);
        } else if node.slot.model.starts_with("mi") {
            command.env("HIP_VISIBLE_DEVICES", &devices);
        }
        command
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        command.spawn().map_err(|e| {
            format!(
                "cannot start the node wrapper {}: {e}",
                self.config.wrapper.display()
            )
        })
    }

    /// Follows a lease started before (by this agent or before a restart) from what its
    /// folder says: its copies still running are followed again, ended ones give their end.
    /// `None` when the folder holds no readable job.
    fn adopt(&mut self, dir: &Path) -> Option<LeaseId> {
        let bytes = fs::read(dir.join("job.json")).ok()?;
        let record = match serde_json::from_slice::<Record>(&bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "unreadable job.json: lease skipped");
                return None;
            }
        };
        let copies: Vec<Copy> = record
            .nodes
            .iter()
            .map(|n| {
                let ndir = node_dir(dir, n.slot.rank);
                let status = exec::read_status(&ndir);
                // A wrapper whose status is written has ended, whatever owns its pid now.
                let running = status.is_none() && n.pid.is_some_and(alive);
                Copy {
                    rank: n.slot.rank,
                    pid: n.pid.filter(|_| running),
                    child: None,
                    ended: (!running).then(|| node_outcome(status)),
                    dir: ndir,
                }
            })
            .collect();
        if copies.iter().any(|c| c.ended.is_none()) {
            self.events.push(JobEvent::Running(record.id));
        }
        for n in &record.nodes {
            let used = self.in_use.entry((n.slot.group, n.slot.node)).or_default();
            used.extend(n.devices.iter().copied());
        }
        let id = record.id;
        self.running.insert(
            id,
            Running {
                record,
                copies,
                kill_at: None,
            },
        );
        Some(id)
    }

    fn save(&self, record: &Record) -> Result<(), BackendError> {
        let dir = self.lease_dir(record.id);
        let tmp = dir.join("job.json.tmp");
        let bytes = serde_json::to_vec_pretty(record).expect("a record serialises");
        fs::write(&tmp, bytes)
            .and_then(|()| fs::rename(&tmp, dir.join("job.json")))
            .map_err(|e| BackendError::Fatal(format!("{}: {e}", dir.display())))
    }
}

fn lease_dir(state: &Path, id: LeaseId) -> PathBuf {
    state
        .join("leases")
        .join(format!("r{}-l{}", id.request, id.lease))
}

fn node_dir(lease_dir: &Path, rank: u32) -> PathBuf {
    lease_dir.join(format!("node-{rank}"))
}

fn signal_group(pid: u32, signal: Signal) {
    if let Some(pid) = Pid::from_raw(pid as i32) {
        let _ = kill_process_group(pid, signal);
    }
}

fn alive(pid: u32) -> bool {
    Pid::from_raw(pid as i32).is_some_and(|p| test_kill_process(p).is_ok())
}

/// A copy's end from the wrapper's status file.
fn node_outcome(status: Option<NodeStatus>) -> pb::JobOutcome {
    match status {
        Some(NodeStatus {
            launch_error: Some(e),
            ..
        }) => outcome(pb::JobCause::LaunchFailed, e),
        Some(NodeStatus {
            exit_code: Some(0), ..
        }) => pb::JobOutcome {
            cause: pb::JobCause::Completed as i32,
            exit_code: Some(0),
            ..Default::default()
        },
        Some(NodeStatus {
            exit_code, signal, ..
        }) => pb::JobOutcome {
            cause: pb::JobCause::Failed as i32,
            exit_code,
            signal,
            // The code or the signal says it all.
            message: String::new(),
            ..Default::default()
        },
        None => outcome(
            pb::JobCause::Failed,
            "the job's wrapper ended without recording how the job ended (killed?)",
        ),
    }
}

impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    fn runtimes(&self) -> Vec<pb::WorkloadRuntime> {
        vec![pb::WorkloadRuntime::Command]
    }

    fn poll_interval(&self) -> Duration {
        self.config.poll_interval
    }

    fn start(&mut self, job: &Job) -> Result<Launched, BackendError> {
        if self.running.contains_key(&job.id) {
            return Ok(Launched::Queued);
        }
        if !job.workload.image.is_empty() {
            return Err(BackendError::Launch(
                "this pool runs commands as processes, not container images".into(),
            ));
        }
        let dir = self.lease_dir(job.id);
        if let Some(o) = saved_outcome(&dir) {
            // Ran and ended before (its end may not have reached the broker): say it again.
            self.events.push(JobEvent::Ended(job.id, o));
            return Ok(Launched::Queued);
        }
        if dir.join("job.json").exists() && self.adopt(&dir).is_some() {
            return Ok(Launched::Queued);
        }
        fs::create_dir_all(&dir)
            .map_err(|e| BackendError::Fatal(format!("{}: {e}", dir.display())))?;
        let mut record = Record {
            id: job.id,
            nodes: Vec::with_capacity(job.nodes.len()),
        };
        for slot in &job.nodes {
            let devices = self.take_devices(slot);
            record.nodes.push(NodeRecord {
                slot: slot.clone(),
                devices,
                pid: None,
            });
        }
        // Saved before any copy starts, so a crash in between leaves no unknown process.
        self.save(&record)?;
        let mut copies = Vec::with_capacity(record.nodes.len());
        let mut failure = None;
        for node in &mut record.nodes {
            let ndir = node_dir(&dir, node.slot.rank);
            match self.spawn_copy(job, node, &ndir) {
                Ok(child) => {
                    node.pid = Some(child.id());
                    copies.push(Copy {
                        rank: node.slot.rank,
                        dir: ndir,
                        pid: Some(child.id()),
                        child: Some(child),
                        ended: None,
                    });
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let saved = self.save(&record);
        if let Some(e) = failure {
            for c in &copies {
                if let Some(pid) = c.pid {
                    signal_group(pid, Signal::KILL);
                }
            }
            for mut c in copies {
                if let Some(child) = c.child.as_mut() {
                    let _ = child.wait();
                }
            }
            self.free_devices(&record);
            return Err(BackendError::Launch(e));
        }
        saved?;
        self.running.insert(
            job.id,
            Running {
                record,
                copies,
                kill_at: None,
            },
        );
        Ok(Launched::Running)
    }

    fn stop(&mut self, lease: LeaseId, grace: Duration) {
        let Some(run) = self.running.get_mut(&lease) else {
            return;
        };
        if run.kill_at.is_some() {
            return;
        }
        for c in run.copies.iter().filter(|c| c.ended.is_none()) {
            if let Some(pid) = c.pid {
                signal_group(pid, Signal::TERM);
            }
        }
        run.kill_at = Some(Instant::now() + grace);
    }

    fn poll(&mut self) -> Vec<JobEvent> {
        let now = Instant::now();
        let mut done = Vec::new();
        for (id, run) in &mut self.running {
            for c in run.copies.iter_mut().filter(|c| c.ended.is_none()) {
                let exited = match (c.child.as_mut(), c.pid) {
                    (Some(child), _) => !matches!(child.try_wait(), Ok(None)),
                    (None, Some(pid)) => !alive(pid),
                    (None, None) => true,
                };
                if exited {
                    c.ended = Some(node_outcome(exec::read_status(&c.dir)));
                }
            }
            if run.copies.iter().all(|c| c.ended.is_some()) {
                done.push(*id);
            } else if run.kill_at.is_some_and(|at| now >= at) {
                for c in run.copies.iter().filter(|c| c.ended.is_none()) {
                    if let Some(pid) = c.pid {
                        signal_group(pid, Signal::KILL);
                        // The wrapper is gone with its group; its children may outlive it
                        // only if they left the group, which a job should not do.
                        if let Some(p) = Pid::from_raw(pid as i32) {
                            let _ = kill_process(p, Signal::KILL);
                        }
                    }
                }
            }
        }
        let mut events = std::mem::take(&mut self.events);
        for id in done {
            let run = self.running.remove(&id).expect("listed above");
            self.free_devices(&run.record);
            let copies: Vec<(u32, pb::JobOutcome)> = run
                .copies
                .into_iter()
                .map(|c| (c.rank, c.ended.expect("all ended")))
                .collect();
            let o = crate::backend::combine(&copies);
            let dir = self.lease_dir(id);
            if let Err(e) = save_outcome(&dir, &o) {
                tracing::error!(lease = %id, error = %e, "cannot save the job's end");
            }
            if run.kill_at.is_none() {
                events.push(JobEvent::Ended(id, o));
            } // stopped: its end is nobody's news
        }
        events
    }

    fn recover(&mut self) -> Result<Vec<LeaseId>, BackendError> {
        let leases = self.config.state_dir.join("leases");
        let entries = fs::read_dir(&leases)
            .map_err(|e| BackendError::Fatal(format!("{}: {e}", leases.display())))?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            // Ended and saved: reported, or in the agent's journal, or given again on start.
            if dir.join(crate::backend::ENDED_FILE).exists() {
                continue;
            }
            if let Some(id) = self.adopt(&dir) {
                found.push(id);
            }
        }
        Ok(found)
    }

    fn logs(&self, lease: LeaseId, rank: u32) -> Option<LogFiles> {
        let dir = node_dir(&self.lease_dir(lease), rank);
        if !dir.is_dir() {
            return None;
        }
        let files = |name: &str| {
            vec![
                dir.join(format!("{name}.log.1")),
                dir.join(format!("{name}.log")),
            ]
        };
        Some(LogFiles {
            stdout: files("stdout"),
            stderr: files("stderr"),
        })
    }
}

/// Whether the agent runs as root (jobs would too, unless told to run as another user).
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}
