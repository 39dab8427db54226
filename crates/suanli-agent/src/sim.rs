//! The `sim` backend: runs nothing. A lease's "job" ends, completed, after the lease's length
//! divided by a speedup. It is the default, for pools whose leases are capacity only and for
//! load tests of the broker through real agent streams.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use suanli_proto::v1 as pb;

use crate::backend::{Backend, BackendError, Job, JobEvent, Launched, LeaseId, LogFiles};

/// See the module documentation.
pub struct SimBackend {
    speedup: f64,
    running: BTreeMap<LeaseId, Instant>,
}

impl SimBackend {
    /// Jobs end after their lease's length divided by `speedup` (above 0).
    pub fn new(speedup: f64) -> Self {
        SimBackend {
            speedup,
            running: BTreeMap::new(),
        }
    }
}

/// How long a simulated job runs: the lease's length divided by the speedup.
pub fn simulated_run_time(start_unix_ms: u64, end_unix_ms: u64, speedup: f64) -> Duration {
    let ms = end_unix_ms.saturating_sub(start_unix_ms) as f64 / speedup;
    Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX)
}

impl Backend for SimBackend {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn runtimes(&self) -> Vec<pb::WorkloadRuntime> {
        Vec::new()
    }

    fn poll_interval(&self) -> Duration {
        // Only simulated ends are due at poll: a looser interval spares the CPU of a machine
        // that runs many simulated agents.
        Duration::from_millis(100)
    }

    fn start(&mut self, job: &Job) -> Result<Launched, BackendError> {
        let run = simulated_run_time(job.start_unix_ms, job.end_unix_ms, self.speedup);
        let due = Instant::now().checked_add(run).unwrap_or_else(far_future);
        self.running.entry(job.id).or_insert(due);
        Ok(Launched::Running)
    }

    fn stop(&mut self, lease: LeaseId, _grace: Duration) {
        self.running.remove(&lease);
    }

    fn poll(&mut self) -> Vec<JobEvent> {
        let now = Instant::now();
        let mut events = Vec::new();
        let due: Vec<LeaseId> = self
            .running
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| *id)
            .collect();
        events.extend(due.into_iter().map(|id| {
            self.running.remove(&id);
            JobEvent::Ended(
                id,
                pb::JobOutcome {
                    cause: pb::JobCause::Completed as i32,
                    message: "simulated job finished".into(),
                    ..Default::default()
                },
            )
        }));
        events
    }

    fn recover(&mut self) -> Result<Vec<LeaseId>, BackendError> {
        Ok(Vec::new())
    }

    fn logs(&self, _lease: LeaseId, _rank: u32) -> Option<LogFiles> {
        None
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_time_is_the_lease_length_over_the_speedup() {
        let hour = 3_600_000;
        assert_eq!(
            simulated_run_time(hour, 3 * hour, 1.0),
            Duration::from_secs(7200)
        );
        assert_eq!(
            simulated_run_time(0, 2 * hour, 10.0),
            Duration::from_secs(720)
        );
        assert_eq!(simulated_run_time(5, 1, 1.0), Duration::ZERO);
        assert_eq!(simulated_run_time(0, u64::MAX, 1e-300), Duration::MAX);
    }
}
