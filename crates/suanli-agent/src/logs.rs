//! Serving a node's output to the broker: the last lines of each kept file, then, when asked to
//! follow, what is appended until the job ends. The same for every backend: backends only say
//! where the files are ([`crate::LogFiles`]), oldest first, a rotated file before the current.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use suanli_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::backend::LogFiles;

/// Largest piece of output in one message.
pub const CHUNK: usize = 64 * 1024;
/// How often a follower looks for new output.
const FOLLOW_EVERY: Duration = Duration::from_millis(100);

/// The last `lines` lines of `bytes` (all when 0).
pub fn tail(bytes: &[u8], lines: u32) -> &[u8] {
    if lines == 0 {
        return bytes;
    }
    // A final newline ends the last line; it does not start another.
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut seen = 0;
    for (i, &b) in body.iter().enumerate().rev() {
        if b == b'\n' {
            seen += 1;
            if seen == lines {
                return &bytes[i + 1..];
            }
        }
    }
    bytes
}

fn read_from(path: &Path, offset: u64) -> Vec<u8> {
    let mut out = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_end(&mut out);
    }
    out
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// One output being read: its files and how far the current one has been read.
struct Source {
    stream: pb::LogStream,
    files: Vec<PathBuf>,
    offset: u64,
}

impl Source {
    /// Everything kept, and the position reached in the current file.
    fn read_all(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for f in &self.files {
            out.extend(read_from(f, 0));
        }
        self.offset = self.files.last().map_or(0, |f| size(f));
        out
    }

    /// What was appended since the last read, across a rotation.
    fn read_new(&mut self) -> Vec<u8> {
        let Some(current) = self.files.last().cloned() else {
            return Vec::new();
        };
        let now = size(&current);
        let mut out = Vec::new();
        if now < self.offset {
            // Rotated: the rest of the old file is the rotated one now.
            if let Some(rotated) = self.files.iter().rev().nth(1) {
                out.extend(read_from(rotated, self.offset));
            }
            self.offset = 0;
        }
        let fresh = read_from(&current, self.offset);
        self.offset += fresh.len() as u64;
        out.extend(fresh);
        out
    }
}

async fn send(
    out: &mpsc::Sender<pb::AgentMessage>,
    id: u64,
    stream: pb::LogStream,
    bytes: &[u8],
) -> Result<(), ()> {
    for piece in bytes.chunks(CHUNK) {
        let msg = pb::AgentMessage {
            body: Some(pb::agent_message::Body::LogsData(pb::LogsData {
                id,
                stream: stream as i32,
                data: piece.to_vec(),
                done: false,
                error: String::new(),
            })),
        };
        out.send(msg).await.map_err(|_| ())?;
    }
    Ok(())
}

async fn finish(out: &mpsc::Sender<pb::AgentMessage>, id: u64, error: String) {
    let msg = pb::AgentMessage {
        body: Some(pb::agent_message::Body::LogsData(pb::LogsData {
            id,
            done: true,
            error,
            ..Default::default()
        })),
    };
    let _ = out.send(msg).await;
}

/// Answers one LogsRequest: the files' tails, then (when following) new output until
/// `running` says the job ended, then a last message. `files` is `None` when the pool keeps
/// no output of that lease and node; the last message then says so.
pub async fn serve(
    files: Option<LogFiles>,
    req: pb::LogsRequest,
    what: String,
    out: mpsc::Sender<pb::AgentMessage>,
    running: impl Fn() -> bool + Send,
) {
    let Some(files) = files else {
        finish(&out, req.id, format!("this pool keeps no output of {what}")).await;
        return;
    };
    let mut sources = Vec::new();
    let want = pb::LogStream::try_from(req.stream).unwrap_or_default();
    if want != pb::LogStream::Stderr {
        sources.push(Source {
            stream: pb::LogStream::Stdout,
            files: files.stdout,
            offset: 0,
        });
    }
    if want != pb::LogStream::Stdout {
        sources.push(Source {
            stream: pb::LogStream::Stderr,
            files: files.stderr,
            offset: 0,
        });
    }
    for s in &mut sources {
        let all = s.read_all();
        if send(&out, req.id, s.stream, tail(&all, req.tail_lines))
            .await
            .is_err()
        {
            return;
        }
    }
    if req.follow {
        loop {
            let ended = !running();
            for s in &mut sources {
                let fresh = s.read_new();
                if send(&out, req.id, s.stream, &fresh).await.is_err() {
                    return;
                }
            }
            if ended {
                break;
            }
            tokio::time::sleep(FOLLOW_EVERY).await;
        }
    }
    finish(&out, req.id, String::new()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_count_lines_from_the_end() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail(b"a\nb\nc\n", 0), b"a\nb\nc\n");
        assert_eq!(tail(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail(b"", 3), b"");
    }

    #[tokio::test]
    async fn output_is_read_across_a_rotation_while_following() {
        let dir = tempfile::tempdir().unwrap();
        let cur = dir.path().join("stdout.log");
        let old = dir.path().join("stdout.log.1");
        std::fs::write(&cur, b"one\n").unwrap();
        let mut s = Source {
            stream: pb::LogStream::Stdout,
            files: vec![old.clone(), cur.clone()],
            offset: 0,
        };
        assert_eq!(s.read_all(), b"one\n");
        std::fs::write(&cur, b"one\ntwo\n").unwrap();
        assert_eq!(s.read_new(), b"two\n");
        // Rotation: the current file becomes the old one, and a new one starts.
        std::fs::write(&cur, b"one\ntwo\nthree\n").unwrap();
        std::fs::rename(&cur, &old).unwrap();
        std::fs::write(&cur, b"four\n").unwrap();
        assert_eq!(s.read_new(), b"three\nfour\n");
    }

    #[tokio::test]
    async fn serve_sends_tails_then_done() {
        let dir = tempfile::tempdir().unwrap();
        let out_file = dir.path().join("stdout.log");
        std::fs::write(&out_file, b"1\n2\n3\n").unwrap();
        let files = LogFiles {
            stdout: vec![out_file],
            stderr: vec![dir.path().join("stderr.log")],
        };
        let (tx, mut rx) = mpsc::channel(16);
        let req = pb::LogsRequest {
            id: 9,
            tail_lines: 2,
            ..Default::default()
        };
        serve(Some(files), req, "r1#1 node 0".into(), tx.clone(), || false).await;
        let mut got = Vec::new();
        let mut done = false;
        while let Ok(m) = rx.try_recv() {
            let Some(pb::agent_message::Body::LogsData(d)) = m.body else {
                panic!("not logs data")
            };
            assert_eq!(d.id, 9);
            got.extend(d.data);
            done |= d.done;
        }
        assert_eq!(got, b"2\n3\n");
        assert!(done);
        serve(
            None,
            pb::LogsRequest::default(),
            "r1#1 node 4".into(),
            tx,
            || false,
        )
        .await;
        let Some(pb::agent_message::Body::LogsData(d)) = rx.try_recv().unwrap().body else {
            panic!("not logs data")
        };
        assert!(d.done && d.error.contains("node 4"), "{d:?}");
    }
}
