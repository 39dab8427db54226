//! Benchmarks of the allocation engine. The ids are stable so figures can be compared across
//! changes (BENCHMARKS.md):
//! - `place_release/futian-2024`, `place_release/futian-2025`: one submit that places at once
//!   plus its release, on the fleet already 70% occupied by the realistic mix;
//! - `schedule_backlog/100k`: one scheduling pass over 100,000 mixed waiting requests on an
//!   empty futian-2025;
//! - `pools_scaling/{150,1500,15000}`: place_release on synthetic fleets of that many pools.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use suanli_benches::{Workload, engine_with_tenants, fill, place_release, probes, submit};
use suanli_core::fleet::{FUTIAN_2024, FUTIAN_2025};
use suanli_core::{Catalogue, Command, Engine, Fleet};
use suanli_fleetgen::synthetic;

const PROBES: usize = 64;

fn bench_place_release(c: &mut Criterion, group: &str, name: &str, fleet_text: &str) {
    let fleet = Fleet::from_toml(fleet_text, &Catalogue::builtin()).expect("valid fleet");
    let mut engine = engine_with_tenants(&fleet);
    let mut workload = Workload::new(7, &fleet);
    fill(&mut engine, &mut workload, 0.7);
    let probes = probes(&mut engine, &mut workload, PROBES);
    let mut g = c.benchmark_group(group);
    let mut i = 0;
    let mut events = Vec::new();
    g.bench_function(name, |b| {
        b.iter(|| {
            i = (i + 1) % PROBES;
            black_box(place_release(&mut engine, probes[i].clone(), &mut events))
        })
    });
    g.finish();
}

fn place_release_futian(c: &mut Criterion) {
    bench_place_release(c, "place_release", "futian-2024", FUTIAN_2024);
    bench_place_release(c, "place_release", "futian-2025", FUTIAN_2025);
}

fn pools_scaling(c: &mut Criterion) {
    for pools in [150, 1500, 15000] {
        bench_place_release(c, "pools_scaling", &pools.to_string(), &synthetic(pools, 1));
    }
}

/// Ticks at one instant until the scheduling pass is done; returns the events.
fn whole_pass(e: &mut Engine, now: u64) -> usize {
    let mut events = e.apply(Command::Tick, now).len();
    while e.pass_in_progress() {
        events += e.apply(Command::Tick, now).len();
    }
    events
}

fn schedule_backlog(c: &mut Criterion) {
    let fleet = Fleet::from_toml(FUTIAN_2025, &Catalogue::builtin()).expect("valid fleet");
    let mut engine = engine_with_tenants(&fleet);
    let mut workload = Workload::new(11, &fleet);
    for p in &fleet.pools {
        engine.apply(Command::DrainPool { pool: p.id.clone() }, 0);
    }
    for _ in 0..100_000 {
        submit(&mut engine, workload.request(), 0);
    }
    for p in &fleet.pools {
        engine.apply(Command::UndrainPool { pool: p.id.clone() }, 0);
    }
    assert_eq!(engine.queue_len(), 100_000);
    let mut g = c.benchmark_group("schedule_backlog");
    g.sample_size(10);
    g.bench_function("100k", |b| {
        b.iter_batched(
            || engine.clone(),
            |mut e| black_box(whole_pass(&mut e, 1)),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// The steady state the broker's ticks meet under load: futian-2024 full, about 57,000
/// requests waiting, and one lease released before each pass, in which almost nothing fits.
/// `tick` is one tick (one slice of the pass, what a call may wait behind in the broker);
/// `whole` is the whole pass, ticked at one instant as the simulator does. The pass is
/// incremental (it tries what the freed capacity could serve); `.../full` are the same with
/// every pass a full one, for the ratio. `steady` releases a lease and makes a pass on one
/// engine at each iteration.
fn full_pass_on_full_fleet(c: &mut Criterion) {
    let fleet = Fleet::from_toml(FUTIAN_2024, &Catalogue::builtin()).expect("valid fleet");
    let mut engine = engine_with_tenants(&fleet);
    let mut workload = Workload::new(3, &fleet);
    for now in 1..=60_000 {
        submit(&mut engine, workload.request(), now);
    }
    whole_pass(&mut engine, 60_001);
    let leased: Vec<_> = engine
        .live_requests()
        .into_iter()
        .filter(|&id| engine.request(id).is_some_and(|r| r.lease.is_some()))
        .collect();
    let mut g = c.benchmark_group("full_pass");
    g.sample_size(10);
    let waiting = engine.queue_len() / 1000;
    let mut next = 0;
    let mut released = |incremental: bool| {
        let mut e = engine.clone();
        e.config_mut().incremental = incremental;
        e.apply(
            Command::Release {
                request: leased[next % leased.len()],
            },
            60_002,
        );
        next += 1;
        e
    };
    for (incremental, suffix) in [(true, ""), (false, "/full")] {
        g.bench_function(format!("{waiting}k-waiting/tick{suffix}"), |b| {
            b.iter_batched(
                || released(incremental),
                |mut e| black_box(e.apply(Command::Tick, 60_003).len()),
                BatchSize::LargeInput,
            )
        });
        g.bench_function(format!("{waiting}k-waiting/whole{suffix}"), |b| {
            b.iter_batched(
                || released(incremental),
                |mut e| black_box(whole_pass(&mut e, 60_003)),
                BatchSize::LargeInput,
            )
        });
    }
    // The steady state: one engine, a lease released and a pass made at each iteration, so
    // each pass meets what the last one left (the first pass after the set-up above also
    // carries what the set-up woke).
    for (incremental, suffix) in [(true, ""), (false, "/full")] {
        let mut e = engine.clone();
        e.config_mut().incremental = incremental;
        let mut now = 60_002;
        let mut live: Vec<_> = Vec::new();
        g.bench_function(format!("{waiting}k-waiting/steady{suffix}"), |b| {
            b.iter(|| {
                let lease = loop {
                    match live.pop() {
                        Some(id) if e.request(id).is_some_and(|r| r.lease.is_some()) => break id,
                        Some(_) => continue,
                        None => {
                            live = e.live_requests();
                            live.retain(|&id| e.request(id).is_some_and(|r| r.lease.is_some()));
                            assert!(!live.is_empty(), "the full fleet holds leases");
                            live.reverse();
                        }
                    }
                };
                now += 2;
                e.apply(Command::Release { request: lease }, now);
                black_box(whole_pass(&mut e, now + 1))
            })
        });
    }
    // What the broker adds to each rebuild of its queue view: start estimates for the head.
    let head: Vec<_> = engine.queued().iter().take(100).map(|q| q.id).collect();
    g.bench_function("estimated_starts-100", |b| {
        b.iter(|| black_box(engine.estimated_starts(&head).len()))
    });
    g.finish();
}

criterion_group!(
    benches,
    place_release_futian,
    schedule_backlog,
    full_pass_on_full_fleet,
    pools_scaling
);
criterion_main!(benches);
