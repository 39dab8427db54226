//! Settling and compacting a busy ledger: 100,000 leases over three months (January to March
//! 2025, China Standard Time), five tenants, each with two vouchers (50% on the local pools,
//! 20% anywhere with a cap per lease), a third of the leases with a budget hold first.
//!
//! - Memory: bytes the ledger holds after settling all leases, after compacting January and
//!   February (March stays open), and after compacting March too, counted by a global
//!   allocator that adds what is allocated and subtracts what is freed (requested sizes, not
//!   the allocator's own overhead). Printed before the timings.
//! - `ledger/settle_100k`: settling the 100,000 leases into a fresh ledger (throughput in
//!   leases per second).
//! - `ledger/compact_100k`: compacting the full ledger before March.
//!
//! `cargo bench -p suanli-billing --bench ledger`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput};
use suanli_billing::{
    Budget, Fen, LeaseId, LeasePart, LeaseUsage, Ledger, Month, VoucherId, VoucherScope,
    VoucherSpec,
};
use suanli_core::{Millis, PoolKind};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Relaxed);
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const LEASES: u64 = 100_000;
const TENANTS: [&str; 5] = ["acme", "globex", "initech", "umbrella", "hooli"];
const HOUR: Millis = 3_600_000;

fn month(text: &str) -> Month {
    text.parse().expect("a month")
}

fn start_of(text: &str) -> Millis {
    month(text).starts_at_ms() as Millis
}

/// A ledger with the vouchers and budgets, before any lease.
fn opened() -> Ledger {
    let t0 = start_of("2025-01");
    let mut ledger = Ledger::new();
    ledger
        .set_subsidy_budget(Some(Fen::from_yuan(5_000_000).expect("fits")), t0)
        .expect("valid");
    for tenant in TENANTS {
        let voucher = |id: String, rate_bp, cap, scope| VoucherSpec {
            id: VoucherId::new(id),
            tenant: tenant.into(),
            face_value: Fen::from_yuan(2_000_000).expect("fits"),
            rate_bp,
            per_lease_cap: cap,
            scope,
            valid_from: t0,
            valid_until: start_of("2025-04"),
        };
        let local = voucher(
            format!("{tenant}-local"),
            5_000,
            None,
            VoucherScope::local_pools(),
        );
        let any = voucher(
            format!("{tenant}-any"),
            2_000,
            Some(Fen(50_000)),
            VoucherScope::AllPools,
        );
        ledger.issue_voucher(local, t0).expect("valid");
        ledger.issue_voucher(any, t0).expect("valid");
        ledger
            .set_budget(tenant, Some(Budget::total(Fen(i64::MAX / 16))), t0)
            .expect("valid");
    }
    ledger
}

/// Lease `k` of [`LEASES`]: spread evenly over January to March, one or two parts.
fn lease(k: u64) -> LeaseUsage {
    let t0 = start_of("2025-01");
    let span = start_of("2025-04") - t0 - 8 * HOUR;
    let started_at = t0 + span / LEASES * k;
    let mut parts = vec![LeasePart {
        pool: "futian-aicc".into(),
        pool_kind: PoolKind::LocalCentre,
        model: "ascend-910b".into(),
        devices: 1 + k % 16,
        tflops: (1 + k % 16) * 376,
        price_per_device_hour: Fen(1_200),
        billing_increment_ms: Some(HOUR),
    }];
    if k.is_multiple_of(3) {
        parts.push(LeasePart {
            pool: "guiyang-1".into(),
            pool_kind: PoolKind::External,
            model: "h20".into(),
            devices: 8,
            tflops: 8 * 148,
            price_per_device_hour: Fen(900),
            billing_increment_ms: None,
        });
    }
    LeaseUsage {
        lease: LeaseId::new(format!("lease-{k:07}")),
        tenant: TENANTS[(k % 5) as usize].into(),
        started_at,
        ended_at: started_at + HOUR / 4 + (k % 29) * HOUR / 4,
        parts,
    }
}

/// Settles every lease into `ledger`, a third after a budget hold.
fn settle_all(ledger: &mut Ledger) {
    for k in 0..LEASES {
        let usage = lease(k);
        if k % 3 == 1 {
            ledger
                .place_hold(
                    usage.lease.clone(),
                    &usage.tenant,
                    Fen(10_000),
                    usage.started_at,
                )
                .expect("valid hold");
        }
        let ended = usage.ended_at;
        ledger.settle(usage, ended).expect("settles");
    }
}

fn live() -> usize {
    LIVE.load(Relaxed)
}

fn per_lease(bytes: usize) -> String {
    format!(
        "{bytes} bytes ({:.1} MiB), {:.1} bytes per lease",
        bytes as f64 / (1024.0 * 1024.0),
        bytes as f64 / LEASES as f64
    )
}

fn memory() {
    let base = live();
    let mut ledger = opened();
    settle_all(&mut ledger);
    let full = live() - base;
    let open = ledger
        .settlements()
        .filter(|s| Month::containing(s.bill.usage.ended_at) >= month("2025-03"))
        .count();
    let outcome = ledger
        .compact(month("2025-03"), start_of("2025-04"))
        .expect("compacts");
    let after_two = live() - base;
    ledger
        .compact(month("2025-04"), start_of("2025-04"))
        .expect("compacts");
    let after_all = live() - base;
    println!("ledger memory, {LEASES} leases over 2025-01..2025-03, 5 tenants, 10 vouchers:");
    println!("  settled, not compacted:            {}", per_lease(full));
    println!(
        "  compacted before 2025-03 ({} folded, {open} open): {}",
        outcome.leases_folded,
        per_lease(after_two)
    );
    println!(
        "  compacted before 2025-04 (all folded):    {}",
        per_lease(after_all)
    );
    black_box(ledger);
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("ledger");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(LEASES));
    group.bench_function("settle_100k", |b| {
        b.iter_batched(
            opened,
            |mut ledger| {
                settle_all(&mut ledger);
                ledger
            },
            BatchSize::PerIteration,
        )
    });
    let mut full = opened();
    settle_all(&mut full);
    group.bench_function("compact_100k", |b| {
        b.iter_batched(
            || full.clone(),
            |mut ledger| {
                ledger
                    .compact(month("2025-03"), start_of("2025-04"))
                    .expect("compacts");
                ledger
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn main() {
    memory();
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
}
