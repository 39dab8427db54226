//! A real Slurm cluster on this machine, for tests: a private `munged` on its own socket and
//! key, one `slurmctld` and one `slurmd` per node, every file (configuration, state, spool,
//! logs, fake GPUs) in a temporary folder, every port picked free. Dropping the cluster cancels
//! its jobs and stops exactly the daemons it started.
//!
//! Include it with `#[path = ".../support/slurm.rs"] mod slurm_support;`: it needs only std
//! and `tempfile`. It needs root (slurmd launches jobs as their user) and Debian's
//! `slurm-wlm` and `munge`; without them [`SlurmCluster::start`] answers `Ok(None)` and
//! [`SlurmCluster::unavailable`] says why.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write as _};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The programs the cluster and its clients need.
const DAEMONS: [&str; 3] = ["munged", "slurmctld", "slurmd"];
const CLIENTS: [&str; 6] = ["sinfo", "sbatch", "squeue", "scontrol", "scancel", "srun"];

/// How long the daemons get to come up until every node is idle.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopping daemon gets before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running Slurm cluster. See the module documentation.
pub struct SlurmCluster {
    /// Stopped in reverse order: slurmd, slurmctld, munged.
    daemons: Vec<Daemon>,
    conf: PathBuf,
    bin_dir: PathBuf,
    nodes: u32,
    /// Dropped last: the folder goes once the daemons are gone.
    dir: tempfile::TempDir,
}

struct Daemon {
    name: String,
    child: Child,
}

impl SlurmCluster {
    /// Why no cluster can be started here, if it cannot: not root, or a program missing.
    pub fn unavailable() -> Option<String> {
        match fs::metadata("/proc/self") {
            Ok(meta) if meta.uid() == 0 => {}
            Ok(_) => {
                return Some("a Slurm cluster needs root (slurmd runs jobs as their user)".into());
            }
            Err(e) => return Some(format!("cannot tell who runs the tests: {e}")),
        }
        let missing: Vec<&str> = DAEMONS
            .iter()
            .chain(CLIENTS.iter())
            .copied()
            .filter(|name| find_program(name).is_none())
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "Slurm or munge is not installed (missing: {})",
                missing.join(", ")
            )
        })
    }

    /// Starts `nodes` nodes of `gpus_per_node` fake GPUs each and waits until all are idle.
    /// `Ok(None)` when Slurm cannot run here (see [`SlurmCluster::unavailable`]).
    pub fn start(nodes: u32, gpus_per_node: u32) -> Result<Option<SlurmCluster>, String> {
        if Self::unavailable().is_some() {
            return Ok(None);
        }
        // A port picked free may be taken before the daemon binds it: try again with others.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::start_once(nodes, gpus_per_node) {
                Ok(cluster) => return Ok(Some(cluster)),
                Err(e) if e.contains("in use") => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// For tests: the cluster, or `None` after printing `skipped: <why>` when Slurm cannot run
    /// here. Panics when it fails to start, or when it cannot run here and
    /// `SUANLI_REQUIRE_SLURM=1`.
    pub fn start_or_skip(nodes: u32, gpus_per_node: u32) -> Option<SlurmCluster> {
        match Self::start(nodes, gpus_per_node) {
            Ok(Some(cluster)) => Some(cluster),
            Ok(None) => {
                let why = Self::unavailable().unwrap_or_else(|| "Slurm is unavailable".into());
                if std::env::var("SUANLI_REQUIRE_SLURM").is_ok_and(|v| v == "1") {
                    panic!("SUANLI_REQUIRE_SLURM=1 but {why}");
                }
                eprintln!("skipped: {why}");
                None
            }
            Err(e) => panic!("the Slurm cluster did not start: {e}"),
        }
    }

    /// The configuration file: `SLURM_CONF` for every command run against this cluster.
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The folder of the client commands (`sbatch`, `squeue`, `srun`...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Node names, `n001` up.
    pub fn node_names(&self) -> Vec<String> {
        (1..=self.nodes).map(node_name).collect()
    }

    /// A client command (`squeue`, `scancel`...) aimed at this cluster.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        command.env("SLURM_CONF", &self.conf).stdin(Stdio::null());
        command
    }

    /// Every job Slurm knows, `id|state|reason|name`, for test messages.
    pub fn squeue(&self) -> String {
        self.output("squeue", &["-h", "-t", "all", "-o", "%i|%T|%r|%j"])
            .unwrap_or_else(|e| format!("(squeue failed: {e})"))
    }

    /// The ends of the daemons' logs, for messages when something went wrong.
    pub fn log_tails(&self) -> String {
        let mut text = String::new();
        let mut logs: Vec<PathBuf> = fs::read_dir(self.dir().join("log"))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        for log in logs {
            let _ = writeln!(text, "--- {}", log.display());
            text.push_str(&tail(&log, 3000));
            text.push('\n');
        }
        text
    }

    /// Runs a client command to its end; its output, or why it failed.
    fn output(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let out = self
            .command(program)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{program} {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn start_once(nodes: u32, gpus: u32) -> Result<SlurmCluster, String> {
        let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
        let dir = tempfile::Builder::new()
            .prefix("suanli-slurm-")
            .tempdir()
            .map_err(|e| io("cannot create a temporary folder", e))?;
        let root = dir.path().to_path_buf();
        // munged wants every folder above its socket searchable by everyone.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
            .map_err(|e| io("cannot open the temporary folder", e))?;
        for sub in ["munge", "state", "spool", "log", "run", "fakegpu"] {
            fs::create_dir(root.join(sub)).map_err(|e| io("cannot create a folder", e))?;
            fs::set_permissions(root.join(sub), fs::Permissions::from_mode(0o755))
                .map_err(|e| io("cannot set a folder's mode", e))?;
        }
        write_munge_key(&root.join("munge/munge.key"))?;
        // Fake GPUs: slurmd stat()s them and wants character devices.
        for k in 0..gpus {
            symlink("/dev/null", root.join(format!("fakegpu/gpu{k}")))
                .map_err(|e| io("cannot create a fake GPU", e))?;
        }
        let ports = free_ports(nodes as usize + 1)?;
        let conf = root.join("slurm.conf");
        fs::write(&conf, slurm_conf(&root, nodes, gpus, &ports))
            .map_err(|e| io("cannot write slurm.conf", e))?;
        let gres = match gpus {
            0 => String::new(),
            1 => format!("Name=gpu File={}/fakegpu/gpu0\n", root.display()),
            n => format!(
                "Name=gpu File={}/fakegpu/gpu[0-{}]\n",
                root.display(),
                n - 1
            ),
        };
        fs::write(root.join("gres.conf"), format!("AutoDetect=off\n{gres}"))
            .map_err(|e| io("cannot write gres.conf", e))?;
        fs::write(root.join("plugstack.conf"), "")
            .map_err(|e| io("cannot write plugstack.conf", e))?;

        let program = |name: &str| find_program(name).ok_or_else(|| format!("{name} is missing"));
        let bin_dir = program("sbatch")?
            .parent()
            .map(Path::to_path_buf)
            .ok_or("sbatch has no folder")?;
        let mut cluster = SlurmCluster {
            daemons: Vec::new(),
            conf,
            bin_dir,
            nodes,
            dir,
        };
        let socket = root.join("munge/munge.sock");
        let munge_args = [
            "-F".to_string(),
            format!("--socket={}", socket.display()),
            format!("--key-file={}", root.join("munge/munge.key").display()),
            format!("--pid-file={}", root.join("munge/munged.pid").display()),
            format!("--seed-file={}", root.join("munge/munged.seed").display()),
            format!("--log-file={}", root.join("log/munged.log").display()),
        ];
        cluster.spawn("munged", &program("munged")?, &munge_args, false)?;
        cluster.wait_for("munged's socket", Duration::from_secs(10), |_| {
            Ok(socket.exists())
        })?;
        cluster.spawn(
            "slurmctld",
            &program("slurmctld")?,
            &["-D".to_string()],
            true,
        )?;
        for name in cluster.node_names() {
            let args = ["-D".to_string(), "-N".to_string(), name.clone()];
            cluster.spawn(&format!("slurmd-{name}"), &program("slurmd")?, &args, true)?;
        }
        cluster.wait_for("every node idle", START_TIMEOUT, |c| {
            // One line per node: all must say idle.
            Ok(c.output("sinfo", &["-h", "-N", "-o", "%T"])
                .is_ok_and(|out| {
                    out.lines().filter(|l| l.trim() == "idle").count() == nodes as usize
                }))
        })?;
        Ok(cluster)
    }

    /// Starts a daemon with its output in `log/NAME.out` and, for Slurm's, `SLURM_CONF` set.
    fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        slurm: bool,
    ) -> Result<(), String> {
        let log = self.dir().join(format!("log/{name}.out"));
        let out =
            fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot share {}: {e}", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if slurm {
            command.env("SLURM_CONF", &self.conf);
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        self.daemons.push(Daemon {
            name: name.to_string(),
            child,
        });
        Ok(())
    }

    /// Waits until `ready` holds, failing early when a daemon exits.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&SlurmCluster) -> Result<bool, String>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self
                .daemons
                .iter_mut()
                .find_map(|daemon| match daemon.child.try_wait() {
                    Ok(Some(status)) => Some(format!("{} exited ({status})", daemon.name)),
                    _ => None,
                });
            if let Some(exited) = exited {
                return Err(format!(
                    "{exited} while waiting for {what}\n{}",
                    self.log_tails()
                ));
            }
            if ready(self)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no {what} after {} s\n{}",
                    timeout.as_secs(),
                    self.log_tails()
                ));
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Cancels every job and waits (bounded) until none runs: their slurmstepd would
    /// outlive slurmd.
    fn cancel_all_jobs(&self) {
        let Ok(ids) = self.output("squeue", &["-h", "-o", "%i"]) else {
            return;
        };
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if ids.is_empty() {
            return;
        }
        let _ = self.output("scancel", &ids);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            match self.output("squeue", &["-h", "-o", "%i"]) {
                Ok(left) if !left.trim().is_empty() => thread::sleep(Duration::from_millis(200)),
                _ => return,
            }
        }
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        if !self.daemons.is_empty() {
            self.cancel_all_jobs();
        }
        while let Some(mut daemon) = self.daemons.pop() {
            stop_child(&mut daemon.child);
        }
    }
}

/// SIGTERM to that one process, SIGKILL if it is still there after [`STOP_TIMEOUT`].
fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if term.is_ok_and(|s| s.success()) {
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn node_name(k: u32) -> String {
    format!("n{k:03}")
}

/// A program on `PATH` or in the usual system folders (daemons live in `sbin`).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/sbin",
                "/sbin",
                "/usr/local/sbin",
                "/usr/bin",
                "/usr/local/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A fresh random key, readable by its owner only (munged refuses anything looser).
fn write_munge_key(path: &Path) -> Result<(), String> {
    let mut key = [0u8; 128];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(&key))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `n` distinct ports free on 127.0.0.1 right now.
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    // All listeners are held until every port is picked, so none comes twice.
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot find a free port: {e}"))
}

fn slurm_conf(root: &Path, nodes: u32, gpus: u32, ports: &[u16]) -> String {
    let r = root.display();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let cluster = format!("t{}x{}", std::process::id(), nanos % 100_000);
    let mut conf = format!(
        "# A test cluster of suanli: every file in {r}.
ClusterName={cluster}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.sock
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
PlugStackConfig={r}/plugstack.conf
SlurmdParameters=config_overrides
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
# No accounting: squeue is the only record of ended jobs, keep them for an hour.
MinJobAge=3600
# Cancelled jobs get SIGKILL 5 s after SIGTERM (30 s by default).
KillWait=5
OverTimeLimit=0
InactiveLimit=0
",
        ctld_port = ports[0],
    );
    let gres = if gpus > 0 {
        format!(" Gres=gpu:{gpus}")
    } else {
        String::new()
    };
    for k in 1..=nodes {
        let _ = writeln!(
            conf,
            "NodeName={} NodeHostname=localhost NodeAddr=127.0.0.1 Port={} \
             CPUs=8 RealMemory=16000{gres} State=UNKNOWN",
            node_name(k),
            ports[k as usize],
        );
    }
    conf.push_str("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n");
    conf
}

/// The last `max` bytes of a file.
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return String::from("(unreadable)");
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}
