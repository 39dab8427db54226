//! Invariants of whole runs, stated over random small workloads and fleets, with and without
//! pool failures:
//! - every job the engine accepted ends in exactly one final state, and every job is either
//!   accepted or rejected;
//! - the run's commands, replayed on a fresh engine, give the same events' outcome and the
//!   same digest (the simulator decides nothing the engine did not);
//! - the same seed gives the same run.

use std::collections::BTreeMap;

use proptest::prelude::*;
use suanli_core::engine::{Command, Event};
use suanli_core::{Catalogue, Engine, EngineConfig, Fleet, Policy, Priority, RequestState};
use suanli_sim::job::{Job, JobShape};
use suanli_sim::trace::Trace;
use suanli_sim::{Failures, SimConfig, Workload, replay, simulate};

fn fleet() -> Fleet {
    let pool = |id: &str, kind: &str, model: &str, per_node: u32, nodes: u32| {
        format!(
            "[[pool]]\nid = \"{id}\"\nkind = \"{kind}\"\nregion = \"r\"\nrtt_ms = 5\n\
             data_zone = \"mainland\"\n[[pool.group]]\nmodel = \"{model}\"\n\
             devices_per_node = {per_node}\nnodes = {nodes}\ninterconnect = \"nvlink\"\n\
             price_fen_per_device_hour = 900\n"
        )
    };
    let text = format!(
        "name = \"small\"\n{}{}{}",
        pool("centre", "local_centre", "h800", 8, 3),
        pool("east", "external", "a800", 8, 2),
        pool("west", "external", "ascend-910b", 4, 4),
    );
    Fleet::from_toml(&text, &Catalogue::builtin()).expect("valid fleet")
}

/// One random job: gap before it (s), run time (s), devices, model, priority, tenant, shape
/// (0 = elastic), whether it has a deadline.
type Row = (u64, u64, u32, u8, u8, u8, u8, bool);

fn job() -> impl Strategy<Value = Row> {
    (
        0u64..600,
        1u64..3_000,
        1u32..40,
        0u8..4,
        0u8..3,
        0u8..4,
        0u8..3,
        any::<bool>(),
    )
}

fn workload(rows: &[Row]) -> Workload {
    let c = Catalogue::builtin();
    let models = [None, c.lookup("h800"), c.lookup("a800"), c.lookup("h20")];
    let mut trace = Trace::new("random");
    trace.tenants = vec!["a".into(), "b".into(), "c".into(), "d".into()];
    let mut clock = 0;
    for &(gap, run_s, devices, model, priority, tenant, shape, deadline) in rows {
        clock += gap * 1000;
        trace.jobs.push(Job {
            submit_ms: clock,
            duration_ms: run_s * 1000,
            devices,
            nodes: None,
            model: models[model as usize],
            tenant: tenant as u32,
            priority: [Priority::Critical, Priority::Standard, Priority::Spot][priority as usize],
            shape: if shape == 0 {
                JobShape::Elastic
            } else {
                JobShape::Gang
            },
            deadline_after_ms: deadline.then_some(run_s * 3000),
        });
    }
    Workload::from_trace(trace)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_submitted_job_ends_exactly_once(
        rows in proptest::collection::vec(job(), 1..60),
        policy in 0usize..3,
        failures in any::<bool>(),
        seed in 0u64..1000,
        tick_ms in proptest::option::of(1u64..=600_000),
    ) {
        let policy = [Policy::Cheapest, Policy::LowestLatency, Policy::BestFit][policy];
        let config = SimConfig {
            policy,
            seed,
            failures: failures.then_some(Failures { mtbf_h: 0.2, mttr_h: 0.1 }),
            record_commands: true,
            tick_interval_ms: tick_ms,
            ..SimConfig::default()
        };
        let catalogue = Catalogue::builtin();
        let fleet = fleet();
        let run = simulate(&fleet, &catalogue, workload(&rows), &config).unwrap();
        let s = &run.summary;
        prop_assert_eq!(s.jobs, rows.len() as u64);
        prop_assert_eq!(s.submitted + s.rejected, s.jobs);
        prop_assert_eq!(
            s.completed + s.failed + s.unserved + s.preempted_or_lost,
            s.submitted
        );
        prop_assert_eq!(s.command_rejections, 0);

        // Apply the recorded commands to a fresh engine and follow every request.
        let commands = run.commands.clone().unwrap();
        if let Some(interval) = tick_ms {
            for (now, command) in &commands {
                prop_assert!(
                    *command != Command::Tick || now % interval == 0,
                    "a tick at {} with a {} ms interval", now, interval
                );
            }
        }
        let mut engine = Engine::with_fleet(
            EngineConfig {
                default_policy: policy,
                ..EngineConfig::default()
            },
            catalogue.clone(),
            &fleet,
        ).unwrap();
        let mut finals: BTreeMap<u64, Vec<RequestState>> = BTreeMap::new();
        let mut out = Vec::new();
        for (now, command) in commands.iter().cloned() {
            out.clear();
            engine.apply_into(command, now, &mut out);
            for e in &out {
                match e {
                    Event::Submitted { request } => {
                        prop_assert!(finals.insert(request.0, Vec::new()).is_none());
                    }
                    Event::Ended { request, state, .. } => {
                        prop_assert!(state.is_final());
                        finals.get_mut(&request.0).expect("ends a submitted request").push(*state);
                    }
                    _ => {}
                }
            }
        }
        prop_assert_eq!(finals.len() as u64, s.submitted);
        for (id, states) in &finals {
            prop_assert_eq!(states.len(), 1, "request {} ended {:?}", id, states);
        }
        prop_assert_eq!(engine.live_lease_count(), 0);
        prop_assert_eq!(engine.queue_len(), 0);
        prop_assert_eq!(engine.digest(), run.digest);

        // The same through the simulator's own replay.
        let fresh = Engine::with_fleet(
            EngineConfig {
                default_policy: policy,
                ..EngineConfig::default()
            },
            catalogue.clone(),
            &fleet,
        ).unwrap();
        prop_assert_eq!(replay(fresh, commands), run.digest);

        // And the same seed gives the same run.
        let again = simulate(&fleet, &catalogue, workload(&rows), &config).unwrap();
        prop_assert_eq!(&again.summary, &run.summary);
    }
}
