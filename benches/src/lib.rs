//! What the criterion benchmarks in `benches/` share: a seeded, realistic mix of requests and
//! engines filled to a chosen occupancy with it.
//!
//! The mix: 55% gangs (mostly one node of 8 devices, a heavy tail up to 16 nodes, some partial
//! nodes), 45% elastic requests of 200 to 20,000 TFLOPS in chunks of a quarter; most name one
//! accelerator model, some two or three, a tenth any; a few bound the round trip or ask for the
//! Hetao zone; 5% critical, 70% standard, 25% spot; durations of 10 minutes to 2 days; 50 tenants
//! with weights 1 to 4 and quotas that do not bind.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use suanli_core::{
    Catalogue, Command, Constraints, Engine, EngineConfig, Event, Fleet, Priority, RequestId,
    RequestSpec, Shape, TenantSpec, Tflops,
};

/// Number of tenants in the benchmark workload.
pub const TENANTS: usize = 50;

/// A seeded generator of the request mix.
pub struct Workload {
    rng: ChaCha8Rng,
    models: Vec<String>,
}

impl Workload {
    /// A generator over the models that the fleet holds.
    pub fn new(seed: u64, fleet: &Fleet) -> Self {
        let mut models: Vec<String> = fleet
            .pools
            .iter()
            .flat_map(|p| p.groups.iter().map(|g| g.model.clone()))
            .collect();
        models.sort();
        models.dedup();
        Workload {
            rng: ChaCha8Rng::seed_from_u64(seed),
            models,
        }
    }

    fn pick_model(&mut self) -> String {
        self.models[self.rng.random_range(0..self.models.len())].clone()
    }

    /// The next request of the mix.
    pub fn request(&mut self) -> RequestSpec {
        let rng = &mut self.rng;
        let shape = if rng.random_bool(0.55) {
            match rng.random_range(0..100) {
                0..30 => Shape::Gang {
                    nodes: 1,
                    devices_per_node: [1, 2, 4][rng.random_range(0..3)],
                },
                30..75 => Shape::Gang {
                    nodes: 1,
                    devices_per_node: 8,
                },
                75..88 => Shape::Gang {
                    nodes: 2,
                    devices_per_node: 8,
                },
                88..96 => Shape::Gang {
                    nodes: 4,
                    devices_per_node: 8,
                },
                96..99 => Shape::Gang {
                    nodes: 8,
                    devices_per_node: 8,
                },
                _ => Shape::Gang {
                    nodes: 16,
                    devices_per_node: 8,
                },
            }
        } else {
            // Log-uniform between 200 and 20,000 TFLOPS.
            let tflops = (200.0 * 100f64.powf(rng.random::<f64>())) as Tflops;
            Shape::Elastic {
                tflops,
                min_chunk_tflops: tflops / 4,
            }
        };
        let priority = match rng.random_range(0..100) {
            0..5 => Priority::Critical,
            5..75 => Priority::Standard,
            _ => Priority::Spot,
        };
        let tenant = format!("tenant-{:02}", rng.random_range(0..TENANTS));
        let duration_ms = rng.random_range(600_000..172_800_000);
        let models = match rng.random_range(0..100) {
            0..10 => vec![],
            10..70 => vec![self.pick_model()],
            _ => (0..self.rng.random_range(2..4))
                .map(|_| self.pick_model())
                .collect(),
        };
        let rng = &mut self.rng;
        let max_rtt_ms = rng.random_bool(0.1).then_some(20);
        let data_zone = rng.random_bool(0.02).then(|| "hetao".to_string());
        RequestSpec {
            tenant,
            shape,
            duration_ms,
            priority,
            constraints: Constraints {
                models,
                max_rtt_ms,
                data_zone,
                ..Default::default()
            },
            policy: None,
            start_after_ms: None,
            deadline_ms: None,
            requeue: priority == Priority::Spot,
            workload: None,
        }
    }
}

/// An engine with a fleet and the workload's tenants.
pub fn engine_with_tenants(fleet: &Fleet) -> Engine {
    let mut engine = Engine::with_fleet(EngineConfig::default(), Catalogue::builtin(), fleet)
        .expect("benchmark fleet is valid");
    for t in 0..TENANTS {
        let ev = engine.apply(
            Command::SetTenant(TenantSpec {
                name: format!("tenant-{t:02}"),
                quota_tflops: Tflops::MAX / 4,
                borrow_limit_tflops: None,
                weight: 1 + (t % 4) as u32,
            }),
            0,
        );
        assert!(matches!(ev[..], [Event::TenantSet { .. }]));
    }
    engine
}

/// Submits `spec` and returns its id and whether it was placed at once.
pub fn submit(engine: &mut Engine, spec: RequestSpec, now: u64) -> (RequestId, bool) {
    let ev = engine.apply(Command::Submit(spec), now);
    match ev[..] {
        [Event::Submitted { request }, ref rest @ ..] => {
            (request, rest.contains(&Event::Placed { request }))
        }
        _ => panic!("benchmark request rejected: {ev:?}"),
    }
}

/// Fills the fleet with the workload until `fraction` of its TFLOPS is allocated. Requests that
/// do not fit at once are withdrawn, so nothing waits and new submissions place immediately.
pub fn fill(engine: &mut Engine, workload: &mut Workload, fraction: f64) {
    let capacity = engine.fleet_usage().total.capacity_tflops as f64;
    let mut allocated = 0.0;
    let mut misses = 0;
    while allocated < fraction * capacity && misses < 100_000 {
        let (id, placed) = submit(engine, workload.request(), 0);
        if placed {
            allocated += engine
                .request(id)
                .and_then(|r| r.lease)
                .map_or(0, |l| l.tflops) as f64;
        } else {
            misses += 1;
            engine.apply(Command::Cancel { request: id }, 0);
        }
    }
}

/// Requests that place at once on a filled fleet, to submit and release in turn: the mix
/// itself, keeping those that fit (and releasing them again).
pub fn probes(engine: &mut Engine, workload: &mut Workload, count: usize) -> Vec<RequestSpec> {
    let mut probes = Vec::with_capacity(count);
    while probes.len() < count {
        let spec = workload.request();
        let (id, placed) = submit(engine, spec.clone(), 0);
        let cmd = if placed {
            probes.push(spec);
            Command::Release { request: id }
        } else {
            Command::Cancel { request: id }
        };
        engine.apply(cmd, 0);
    }
    probes
}

/// Submits a probe and releases it, reusing `events` as a shell would; returns whether it was
/// placed at once (it should be).
pub fn place_release(engine: &mut Engine, spec: RequestSpec, events: &mut Vec<Event>) -> bool {
    events.clear();
    engine.apply_into(Command::Submit(spec), 0, events);
    let (request, placed) = match events[..] {
        [Event::Submitted { request }, Event::Placed { .. }] => (request, true),
        [Event::Submitted { request }, ..] => (request, false),
        _ => return false,
    };
    let end = if placed {
        Command::Release { request }
    } else {
        Command::Cancel { request }
    };
    events.clear();
    engine.apply_into(end, 0, events);
    placed
}
