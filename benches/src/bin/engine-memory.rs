//! Measures the engine's heap with futian-2025, 50,000 live leases and 100,000 waiting
//! requests, by counting the bytes the allocator hands out and takes back; then what a
//! snapshot of that engine costs: the clone the broker's writer makes, the encoding (postcard,
//! as the broker saves it) and reading it back.
//!
//! `cargo run --release -p suanli-benches --bin engine-memory`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use suanli_benches::{Workload, engine_with_tenants, submit};
use suanli_core::fleet::FUTIAN_2025;
use suanli_core::{Catalogue, Command, Fleet, Shape};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(live, Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    let fleet = Fleet::from_toml(FUTIAN_2025, &Catalogue::builtin()).expect("valid fleet");
    let before = LIVE.load(Relaxed);
    let mut engine = engine_with_tenants(&fleet);
    let mut workload = Workload::new(3, &fleet);
    // 50,000 live leases of one device each (the fleet has 53,124 devices), tenants and
    // priorities from the mix, anywhere.
    let mut leases = 0;
    while leases < 50_000 {
        let mut spec = workload.request();
        spec.shape = Shape::Gang {
            nodes: 1,
            devices_per_node: 1,
        };
        spec.constraints = Default::default();
        let (_, placed) = submit(&mut engine, spec, 0);
        assert!(placed, "the fleet has room for 50,000 single devices");
        leases += 1;
    }
    // 100,000 waiting: drain the fleet so the mix queues.
    for p in &fleet.pools {
        engine.apply(Command::DrainPool { pool: p.id.clone() }, 0);
    }
    for _ in 0..100_000 {
        submit(&mut engine, workload.request(), 0);
    }
    assert_eq!(engine.queue_len(), 100_000);
    assert_eq!(engine.live_lease_count(), 50_000);
    let held = LIVE.load(Relaxed) - before;
    println!(
        "engine with futian-2025, {} live leases, {} waiting: {:.1} MiB on the heap (peak while building {:.1} MiB)",
        engine.live_lease_count(),
        engine.queue_len(),
        mib(held),
        mib(PEAK.load(Relaxed) - before),
    );

    let t = Instant::now();
    let copy = engine.clone();
    let cloned = t.elapsed();
    let t = Instant::now();
    let bytes = postcard::to_stdvec(&copy).expect("an engine encodes");
    let encoded = t.elapsed();
    let t = Instant::now();
    let back: suanli_core::Engine = postcard::from_bytes(&bytes).expect("and decodes");
    let decoded = t.elapsed();
    assert_eq!(back.digest(), engine.digest());
    println!(
        "snapshot: clone {:.1} ms (on the writer), encode {:.1} ms, {:.1} MiB, read back with its index rebuilt {:.1} ms",
        cloned.as_secs_f64() * 1e3,
        encoded.as_secs_f64() * 1e3,
        mib(bytes.len()),
        decoded.as_secs_f64() * 1e3,
    );
}
