//! The node wrapper: the `process` backend runs every copy of a job as
//! `suanli exec-node --dir DIR [...] -- ARGV...`, in a process group of its own. The wrapper
//! starts the job, copies its stdout and stderr into size-capped, rotated files, and when the
//! job ends writes how it ended to `DIR/status.json`.
//!
//! Why a wrapper and not the agent itself: the agent can die (SIGKILL, a crash, an upgrade)
//! while jobs run. The wrapper keeps the job's output flowing to disk and records its exit
//! status where the restarted agent finds it; a process that is no longer the agent's child
//! could not tell it otherwise.
//!
//! The wrapper survives the polite stop (it handles SIGTERM and waits for the job, which gets
//! the signal with the rest of the group); the kill after the grace period ends both.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

/// How one copy ended, as the wrapper writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Exit code, when the job exited by itself.
    pub exit_code: Option<i32>,
    /// Signal that killed it, when one did.
    pub signal: Option<i32>,
    /// Set when the job could not be started, with why.
    pub launch_error: Option<String>,
}

/// The file a node's status is written to.
pub const STATUS_FILE: &str = "status.json";

/// What `suanli exec-node` is told.
#[derive(Clone, Debug)]
pub struct ExecArgs {
    /// The node's folder: output and status go here.
    pub dir: PathBuf,
    /// The job's working directory; the node's folder when unset.
    pub workdir: Option<PathBuf>,
    /// Bytes kept of each output: the current file and one rotated file, half each.
    pub max_log_bytes: u64,
    /// Run the job as this user and group id.
    pub run_as: Option<(u32, u32)>,
    /// The program and its arguments.
    pub argv: Vec<String>,
}

impl NodeStatus {
    /// The exit code a shell would give for this end: the job's own, 128 + the signal that
    /// killed it, 127 when it could not start. A wrapper run under another resource manager
    /// (`srun`) exits with it, so that the manager sees the job's end as its own.
    pub fn shell_code(&self) -> i32 {
        match (self.exit_code, self.signal, &self.launch_error) {
            (Some(c), _, _) => c,
            (_, Some(s), _) => 128 + s,
            _ => 127,
        }
    }
}

/// Runs one copy of a job to its end and records the end; returns how it ended.
pub fn run(args: &ExecArgs) -> io::Result<NodeStatus> {
    // Handled, not ignored: an ignored signal would stay ignored in the job after exec.
    let terminated = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&terminated))?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, terminated)?;
    let status = match launch(args) {
        Ok(status) => status,
        Err(e) => {
            // Said where the resource manager's own log of the copy can show it too.
            eprintln!("suanli exec-node: {e}");
            NodeStatus {
                exit_code: None,
                signal: None,
                launch_error: Some(e),
            }
        }
    };
    write_status(&args.dir, &status)?;
    Ok(status)
}

fn launch(args: &ExecArgs) -> Result<NodeStatus, String> {
    let (program, rest) = args.argv.split_first().ok_or("an empty argv")?;
    let workdir = args.workdir.clone().unwrap_or_else(|| args.dir.clone());
    let mut command = Command::new(program);
    command
        .args(rest)
        .current_dir(&workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some((uid, gid)) = args.run_as {
        // As root, std also drops the supplementary groups.
        command.uid(uid).gid(gid);
    }
    let mut child = command.spawn().map_err(|e| {
        if !workdir.is_dir() {
            format!("working directory {}: no such directory", workdir.display())
        } else {
            format!("cannot run {program:?}: {e}")
        }
    })?;
    let half = (args.max_log_bytes / 2).max(1);
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let dir = args.dir.clone();
    let copy_out = std::thread::spawn(move || copy_rotating(out, &dir, "stdout", half));
    let dir = args.dir.clone();
    let copy_err = std::thread::spawn(move || copy_rotating(err, &dir, "stderr", half));
    let status = wait(&mut child).map_err(|e| format!("waiting for the job: {e}"))?;
    // The copies end when every holder of the pipes (the job and its children) is gone.
    let _ = copy_out.join();
    let _ = copy_err.join();
    Ok(NodeStatus {
        exit_code: status.code(),
        signal: status.signal(),
        launch_error: None,
    })
}

fn wait(child: &mut std::process::Child) -> io::Result<ExitStatus> {
    loop {
        match child.wait() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Copies a pipe into `DIR/NAME.log`; when the file passes `half` bytes it becomes
/// `NAME.log.1` (replacing the older one) and a new file starts.
fn copy_rotating(mut from: impl Read, dir: &Path, name: &str, half: u64) -> io::Result<()> {
    let current = dir.join(format!("{name}.log"));
    let rotated = dir.join(format!("{name}.log.1"));
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&current)?;
    let mut written = file.metadata()?.len();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // A piece is split where a file fills, so no file ever passes `half` bytes.
        let mut piece = &buf[..n];
        while !piece.is_empty() {
            if written >= half {
                fs::rename(&current, &rotated)?;
                file = File::create(&current)?;
                written = 0;
            }
            let take = piece.len().min((half - written) as usize);
            file.write_all(&piece[..take])?;
            written += take as u64;
            piece = &piece[take..];
        }
    }
}

/// Writes a node's status atomically: a reader sees the whole file or none.
pub fn write_status(dir: &Path, status: &NodeStatus) -> io::Result<()> {
    let tmp = dir.join(format!("{STATUS_FILE}.tmp"));
    fs::write(&tmp, serde_json::to_vec(status).map_err(io::Error::other)?)?;
    fs::rename(tmp, dir.join(STATUS_FILE))
}

/// Reads a node's status, if the wrapper wrote one.
pub fn read_status(dir: &Path) -> Option<NodeStatus> {
    let bytes = fs::read(dir.join(STATUS_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_rotates_and_keeps_the_newest_bytes() {
        let data: Vec<u8> = (0..2500u32)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        // A pipe delivers output in pieces: feed it in pieces.
        let dir2 = tempfile::tempdir().unwrap();
        for chunk in data.chunks(1000) {
            copy_rotating(chunk, dir2.path(), "stdout", 4096).unwrap();
        }
        let current = fs::read(dir2.path().join("stdout.log")).unwrap();
        let rotated = fs::read(dir2.path().join("stdout.log.1")).unwrap();
        assert!(current.len() <= 4096 && rotated.len() <= 4096);
        let mut kept = rotated.clone();
        kept.extend(&current);
        assert!(
            data.ends_with(&kept),
            "the kept bytes are the newest, in order"
        );
        assert!(kept.len() < data.len(), "older bytes were dropped");
        // One read larger than the cap (a pipe can deliver 64 KiB at once) is cut too.
        let dir3 = tempfile::tempdir().unwrap();
        copy_rotating(&data[..], dir3.path(), "stdout", 4096).unwrap();
        let current = fs::read(dir3.path().join("stdout.log")).unwrap();
        let rotated = fs::read(dir3.path().join("stdout.log.1")).unwrap();
        assert!(current.len() <= 4096 && rotated.len() == 4096);
        let mut kept = rotated;
        kept.extend(&current);
        assert!(data.ends_with(&kept), "the newest bytes, in order");
    }

    #[test]
    fn status_is_written_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_status(dir.path()), None);
        let s = NodeStatus {
            exit_code: Some(3),
            signal: None,
            launch_error: None,
        };
        write_status(dir.path(), &s).unwrap();
        assert_eq!(read_status(dir.path()), Some(s));
    }

    #[test]
    fn a_missing_program_or_folder_is_a_launch_error() {
        let dir = tempfile::tempdir().unwrap();
        let args = ExecArgs {
            dir: dir.path().into(),
            workdir: None,
            max_log_bytes: 1 << 20,
            run_as: None,
            argv: vec!["/no/such/program".into()],
        };
        let e = launch(&args).unwrap_err();
        assert!(e.contains("/no/such/program"), "{e}");
        let args = ExecArgs {
            workdir: Some(dir.path().join("missing")),
            argv: vec!["true".into()],
            ..args
        };
        let e = launch(&args).unwrap_err();
        assert!(e.contains("no such directory"), "{e}");
    }

    #[test]
    fn exit_codes_and_output_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let args = ExecArgs {
            dir: dir.path().into(),
            workdir: None,
            max_log_bytes: 1 << 20,
            run_as: None,
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 3".into(),
            ],
        };
        let s = launch(&args).unwrap();
        assert_eq!((s.exit_code, s.signal), (Some(3), None));
        assert_eq!(
            fs::read_to_string(dir.path().join("stdout.log")).unwrap(),
            "out\n"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("stderr.log")).unwrap(),
            "err\n"
        );
    }
}
