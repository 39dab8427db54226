//! Small fleets and requests for the unit tests of this crate.

use crate::Catalogue;
use crate::engine::{Command, Engine, EngineConfig, Event};
use crate::fleet::{GroupSpec, PoolKind, PoolSpec};
use crate::request::{Constraints, Priority, RequestSpec, Shape, TenantSpec};
use crate::units::RequestId;

pub fn pool(id: &str, kind: PoolKind, rtt_ms: u32, groups: &[(&str, u16, u32, u64)]) -> PoolSpec {
    PoolSpec {
        id: id.into(),
        name: id.into(),
        kind,
        region: if kind.is_local() {
            "guangdong-shenzhen"
        } else {
            "guizhou-guiyang"
        }
        .into(),
        rtt_ms,
        data_zone: "mainland".into(),
        groups: groups
            .iter()
            .map(|&(model, dpn, nodes, price)| GroupSpec {
                model: model.into(),
                devices_per_node: dpn,
                nodes,
                interconnect: "nvlink".into(),
                price_fen_per_device_hour: price,
            })
            .collect(),
        billing_increment_s: None,
    }
}

pub fn tenant(name: &str, quota_tflops: u64, borrow: Option<u64>, weight: u32) -> TenantSpec {
    TenantSpec {
        name: name.into(),
        quota_tflops,
        borrow_limit_tflops: borrow,
        weight,
    }
}

pub fn gang(tenant: &str, nodes: u32, m: u16, model: &str) -> RequestSpec {
    RequestSpec {
        tenant: tenant.into(),
        shape: Shape::Gang {
            nodes,
            devices_per_node: m,
        },
        duration_ms: 3_600_000,
        priority: Priority::Standard,
        constraints: Constraints {
            models: vec![model.into()],
            ..Default::default()
        },
        policy: None,
        start_after_ms: None,
        deadline_ms: None,
        requeue: false,
        workload: None,
    }
}

pub fn elastic(tenant: &str, tflops: u64, min_chunk: u64) -> RequestSpec {
    RequestSpec {
        shape: Shape::Elastic {
            tflops,
            min_chunk_tflops: min_chunk,
        },
        constraints: Constraints::default(),
        ..gang(tenant, 1, 1, "h100")
    }
}

/// An engine with the given pools and a roomy tenant `a`.
pub fn engine(pools: Vec<PoolSpec>) -> Engine {
    let mut e = Engine::new(EngineConfig::default(), Catalogue::builtin());
    for p in pools {
        ok(e.apply(Command::RegisterPool(p), 0));
    }
    ok(e.apply(Command::SetTenant(tenant("a", 1_000_000_000, None, 1)), 0));
    e
}

/// Panics if any event is a rejection.
pub fn ok(events: Vec<Event>) -> Vec<Event> {
    for ev in &events {
        if let Event::Rejected { error } = ev {
            panic!("rejected: {error}");
        }
    }
    events
}

pub fn submit(e: &mut Engine, spec: RequestSpec, now: u64) -> RequestId {
    let events = ok(e.apply(Command::Submit(spec), now));
    match events[0] {
        Event::Submitted { request } => request,
        ref other => panic!("unexpected {other:?}"),
    }
}

pub fn placed(events: &[Event], id: RequestId) -> bool {
    events.contains(&Event::Placed { request: id })
}
