//! Scheduling passes: a pass walks the queue in the order of priority class, weighted fair
//! share and arrival, one slice at a time (see [`super::EngineConfig::pass_slice`]), placing
//! what fits, reserving for the first request that does not and backfilling behind it. A
//! full pass walks everything waiting; an incremental pass (see `incremental`) the requests
//! whose answer could have changed since, in the same order; an arrivals pass only the
//! requests that arrived since the last one. The pass under way is part of the engine's
//! state, so a recovered engine goes on with it as the live one would.

use super::*;

impl Engine {
    /// Begins a pass when one is due and walks the pass under way for one slice (see
    /// [`EngineConfig::pass_slice`]).
    pub(super) fn schedule(&mut self, out: &mut Vec<Event>) {
        if self.pass.is_none() {
            let timed = self.timed.first().is_some_and(|&(at, _)| at <= self.now);
            if self.pass_due || timed {
                self.begin_due_pass();
            } else if !self.arrivals.is_empty() {
                self.pass_counts.arrivals += 1;
                self.begin_arrivals_pass();
            } else {
                return;
            }
        }
        self.continue_pass(out);
    }

    /// A pass after something changed: incremental unless everything may have changed (or
    /// the engine is set to make full passes).
    fn begin_due_pass(&mut self) {
        self.pass_due = false;
        let mut due = Vec::new();
        while let Some(&(at, id)) = self.timed.first()
            && at <= self.now
        {
            self.timed.pop_first();
            due.push(id);
        }
        let wakes = std::mem::take(&mut self.pending);
        self.inbox = Wakes::default();
        if self.config.incremental && !wakes.full {
            self.pass_counts.incremental += 1;
            self.begin_incremental_pass(wakes, due);
        } else {
            self.pass_counts.full += 1;
            self.begin_full_pass();
        }
    }

    /// A pass that ranks and tries every queued request, in the order the queue holds them now.
    pub(super) fn begin_full_pass(&mut self) {
        self.reservation = None;
        self.arrivals.clear();
        let classes = Priority::ALL.map(|class| {
            self.queue.classes[class.rank()]
                .iter()
                // Entries that left the queue are skipped by the pass itself.
                .map(|(&tenant, q)| TenantRun::new(tenant, q.iter().copied().collect()))
                .collect()
        });
        self.begin_pass(classes);
    }

    /// When nothing but new arrivals happened since the last pass, the requests that waited
    /// then would be decided the same way again (no capacity came free, no time came): only the
    /// arrivals are tried, after them, under the same reservation.
    pub(super) fn begin_arrivals_pass(&mut self) {
        let mut by_class: [BTreeMap<TenantIx, Vec<RequestId>>; 3] = Default::default();
        let mut arrivals = std::mem::take(&mut self.arrivals);
        arrivals.sort_unstable();
        for id in arrivals {
            if let Some(r) = self.requests.get(&id).filter(|r| r.in_queue) {
                by_class[r.priority.rank()]
                    .entry(r.tenant)
                    .or_default()
                    .push(id);
            }
        }
        let classes = by_class.map(|c| {
            c.into_iter()
                .map(|(tenant, ids)| TenantRun::new(tenant, ids))
                .collect()
        });
        self.begin_pass(classes);
    }

    pub(super) fn begin_pass(&mut self, classes: [Vec<TenantRun>; 3]) {
        self.passes += 1;
        self.inbox = Wakes::default();
        self.pass = Some(PassInProgress {
            id: self.passes,
            classes,
            class: 0,
            preemption_budget: PREEMPTION_SEARCHES_PER_PASS,
            picked: None,
        });
    }

    /// Walks the pass under way (see the module documentation) for at most
    /// [`EngineConfig::pass_slice`] queue entries, and ends it when it has walked them all.
    pub(super) fn continue_pass(&mut self, out: &mut Vec<Event>) {
        let Some(mut pass) = self.pass.take() else {
            return;
        };
        // What changed between slices.
        let wakes = std::mem::take(&mut self.inbox);
        self.apply_wakes(&mut pass, wakes);
        // What did not fit is remembered for one slice only: capacity may come free between
        // slices.
        let mut state = PassState {
            failed: FxHashSet::default(),
            preemption_budget: pass.preemption_budget,
        };
        let mut walked = 0u32;
        while pass.class < pass.classes.len() {
            // Shares are read afresh at each slice: leases may have ended since the last one.
            let mut heap: BinaryHeap<Reverse<(Share, usize)>> = pass.classes[pass.class]
                .iter()
                .enumerate()
                .filter(|(_, run)| run.open())
                .map(|(i, run)| Reverse((self.share(run.tenant), i)))
                .collect();
            while let Some(Reverse((share, i))) = heap.pop() {
                if walked >= self.config.pass_slice.max(1) {
                    break;
                }
                let class = pass.class;
                let run = &mut pass.classes[class][i];
                // Next request of this tenant that is still queued.
                let mut next = None;
                loop {
                    let candidate = if run.picked.is_some() {
                        // Requests looked at for a victim search count as walked, a
                        // sixteenth each.
                        let mut looked_at = 0;
                        let id =
                            self.next_pick(class, run, state.preemption_budget > 0, &mut looked_at);
                        walked = walked.saturating_add(looked_at / 16);
                        self.pass_counts.looked_at += u64::from(looked_at);
                        id
                    } else {
                        let id = run.ids.get(run.walked).copied();
                        run.walked += usize::from(id.is_some());
                        id
                    };
                    let Some(id) = run.take(candidate) else {
                        break;
                    };
                    walked += 1;
                    if let Some(r) = self.requests.get(&id)
                        && r.state == RequestState::Queued
                        && r.queued_in_pass != pass.id
                    {
                        next = Some((id, r.key));
                        break;
                    }
                }
                let Some((id, key)) = next else {
                    continue;
                };
                let incremental = pass.classes[pass.class][i].picked.is_some();
                if incremental && self.try_changes_nothing(id, state.preemption_budget > 0) {
                    self.pass_counts.passed_over += 1;
                    if pass.classes[pass.class][i].open() {
                        heap.push(Reverse((share, i)));
                    }
                    continue;
                }
                self.pass_counts.tried += 1;
                let (searches, reserved) = (state.preemption_budget, self.reservation.is_some());
                if let Start::Placed = self.try_start(id, Some(&mut state), out) {
                    walked += PLACEMENT_WEIGHT;
                }
                // A victim search reads every preemptible lease, a reservation estimate up to
                // every live lease: each lease read counts for a quarter of an entry walked.
                if state.preemption_budget < searches {
                    walked = walked.saturating_add(self.preemptible.len() as u32 / 4);
                }
                if !reserved && self.reservation.is_some() {
                    walked = walked.saturating_add(self.live_leases as u32 / 4);
                }
                self.after_try(&mut pass, i, key);
                if pass.classes[pass.class][i].open() {
                    heap.push(Reverse((self.share(share.tenant), i)));
                }
            }
            if walked >= self.config.pass_slice.max(1)
                && pass.classes[pass.class].iter().any(TenantRun::open)
            {
                break;
            }
            pass.class += 1;
        }
        if pass.class < pass.classes.len() {
            pass.preemption_budget = state.preemption_budget;
            self.pass = Some(pass);
        }
    }

    /// Passes made so far, by kind, and the requests they tried.
    pub fn pass_counts(&self) -> PassCounts {
        self.pass_counts
    }

    /// Whether a scheduling pass is under way: the next tick goes on with it.
    pub fn pass_in_progress(&self) -> bool {
        self.pass.is_some()
    }

    /// What is wrong with the pass under way, if anything: for the audit.
    pub(crate) fn pass_fault(&self) -> Option<String> {
        let pass = self.pass.as_ref()?;
        if pass.id != self.passes {
            return Some(format!(
                "the pass under way is number {}, the last begun {}",
                pass.id, self.passes
            ));
        }
        if pass.class >= pass.classes.len() {
            return Some(format!("the pass under way is at class {}", pass.class));
        }
        let mut runs = pass.classes.iter().flatten();
        if let Some(run) = runs.find(|run| run.walked > run.ids.len()) {
            return Some(format!(
                "the pass walked {} of the {} requests of tenant {}",
                run.walked,
                run.ids.len(),
                run.tenant.0
            ));
        }
        None
    }

    /// Whether the next tick would walk a pass: one is under way, or requests wait and
    /// something happened that a pass could act on (capacity freed, requests queued). A shell
    /// that ticks on a timer may tick sooner while this holds.
    pub fn pass_wanted(&self) -> bool {
        self.pass.is_some() || (self.pass_due || !self.arrivals.is_empty()) && self.queue.len() > 0
    }

    pub(crate) fn share(&self, t: TenantIx) -> Share {
        let tenant = &self.tenants[t.0 as usize];
        Share {
            used: tenant.used,
            weight: tenant.spec.weight,
            tenant: t,
        }
    }
}
