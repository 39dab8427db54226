//! The one place where the simulator applies commands to the engine.
//!
//! [`Driver::apply`] applies a command at a virtual time, hands every event to the
//! [`Recorder`], remembers the lease end times of placed requests in its own min-heap (so the
//! loop knows when to tick next without asking the engine to scan its live requests), and, as
//! the broker does for pools on simulated execution, confirms every placed lease at once with
//! [`Command::LeaseStarted`]. [`replay`] feeds a recorded command list through the same driver
//! without those confirmations (a recorded list already holds them) and returns the engine's
//! digest: the broker, given the same list, must reach the same digest.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use suanli_core::engine::{Command, Event};
use suanli_core::{Engine, Millis, RequestId};

use crate::error::SimError;
use crate::layout::Layout;
use crate::metrics::{Recorder, Series, Summary};

/// Applies commands and records what happens.
pub struct Driver {
    engine: Engine,
    recorder: Recorder,
    /// Confirm placed leases at once (simulated execution).
    start_leases: bool,
    ends: BinaryHeap<Reverse<Millis>>,
    events: Vec<Event>,
    placed: Vec<RequestId>,
    log: Option<Vec<(Millis, Command)>>,
}

/// What applying one command did, as far as the loop cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The command was rejected.
    pub rejected: bool,
    /// A submission was accepted but not placed at once: it waits.
    pub queued: bool,
}

impl Driver {
    /// A driver over an engine that already holds the fleet.
    pub fn new(engine: Engine, layout: Layout, start_leases: bool, record: bool) -> Self {
        Driver {
            engine,
            recorder: Recorder::new(layout),
            start_leases,
            ends: BinaryHeap::new(),
            events: Vec::new(),
            placed: Vec::new(),
            log: record.then(Vec::new),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The recorder.
    pub fn recorder_mut(&mut self) -> &mut Recorder {
        &mut self.recorder
    }

    /// The earliest lease end not yet ticked for.
    pub fn next_lease_end(&self) -> Option<Millis> {
        self.ends.peek().map(|r| r.0)
    }

    /// Forgets lease ends up to `now` (a tick at `now` expires them).
    pub fn pop_lease_ends(&mut self, now: Millis) -> bool {
        let mut any = false;
        while self.ends.peek().is_some_and(|r| r.0 <= now) {
            self.ends.pop();
            any = true;
        }
        any
    }

    /// Samples what is sampled on a schedule, in the state held until `now`.
    pub fn advance_to(&mut self, now: Millis) {
        self.recorder.sample_before(now, &self.engine);
    }

    /// Applies a command at `now`, then the lease confirmations it calls for.
    pub fn apply(&mut self, command: Command, now: Millis) -> Applied {
        let submit = matches!(command, Command::Submit(_));
        let applied = self.apply_one(command, now);
        let mut queued = false;
        if submit && !applied.rejected {
            queued = !self
                .events
                .iter()
                .any(|e| matches!(e, Event::Placed { .. }));
        }
        if self.start_leases {
            // Placed ids are drained into a local list: confirming one may not place another,
            // but the buffer is reused by the next apply.
            let placed = std::mem::take(&mut self.placed);
            for &request in &placed {
                self.apply_one(Command::LeaseStarted { request }, now);
            }
            self.placed = placed;
            self.placed.clear();
        }
        // Placement stops counting on a voucher the moment it runs out.
        for tenant in self.recorder.take_exhausted_vouchers() {
            let clear = Command::SetSubsidies {
                tenant,
                subsidies: Vec::new(),
            };
            self.apply_one(clear, now);
        }
        Applied {
            rejected: applied.rejected,
            queued,
        }
    }

    /// Ticks the engine at `now` until its scheduling pass is done. The broker walks a long
    /// pass in slices, a tick apart, so that calls do not wait behind it; the simulator has no
    /// calls to keep waiting and walks it at one instant.
    pub fn tick(&mut self, now: Millis) {
        self.apply(Command::Tick, now);
        while self.engine.pass_in_progress() {
            self.apply(Command::Tick, now);
        }
    }

    fn apply_one(&mut self, command: Command, now: Millis) -> Applied {
        if let Command::Submit(spec) = &command {
            self.recorder.expect_submit(spec, now);
        }
        if let Some(log) = &mut self.log {
            log.push((now, command.clone()));
        }
        self.events.clear();
        self.engine.apply_into(command, now, &mut self.events);
        let rejected = matches!(self.events[..], [Event::Rejected { .. }]);
        for event in &self.events {
            let lease_end = self.recorder.on_event(event, now, &self.engine);
            if let Event::Placed { request } = event {
                self.placed.push(*request);
                if let Some(end) = lease_end {
                    self.ends.push(Reverse(end));
                }
            }
        }
        if !self.start_leases {
            self.placed.clear();
        }
        Applied {
            rejected,
            queued: false,
        }
    }

    /// Ends the run at `now`: withdraws what still waits (nothing is left that could place it),
    /// and returns the summary, the series, the engine's digest and the commands applied (when
    /// recording). An error only if the run's accounts overflowed.
    pub fn finish(mut self, now: Millis) -> Result<Finished, SimError> {
        for request in self.recorder.waiting_requests() {
            self.apply(Command::Cancel { request }, now);
        }
        let (mut summary, series) = self.recorder.finish(now)?;
        let digest = self.engine.digest();
        summary.digest = format!("{digest:016x}");
        let passes = self.engine.pass_counts();
        summary.passes_full = passes.full;
        summary.passes_incremental = passes.incremental;
        summary.requests_tried = passes.tried;
        Ok(Finished {
            summary,
            series,
            digest,
            commands: self.log,
        })
    }
}

/// What a finished run leaves.
#[derive(Clone, Debug)]
pub struct Finished {
    /// The figures.
    pub summary: Summary,
    /// The series behind the charts.
    pub series: Series,
    /// The engine's digest after the last command.
    pub digest: u64,
    /// Every command applied, with its time, when recording was asked for.
    pub commands: Option<Vec<(Millis, Command)>>,
}

/// Applies a recorded list of timestamped commands to `engine` through the simulator's driver,
/// as they are (the list carries its own lease confirmations), and returns the final digest.
pub fn replay(engine: Engine, commands: impl IntoIterator<Item = (Millis, Command)>) -> u64 {
    let no_pools = suanli_core::Fleet {
        name: String::new(),
        pools: Vec::new(),
    };
    let layout = Layout::new(&no_pools, engine.catalogue());
    let mut driver = Driver::new(engine, layout, false, false);
    for (now, command) in commands {
        driver.apply(command, now);
    }
    driver.engine.digest()
}
