//! The fleet as the metrics see it: pool and model indexes, which pools are local, and every
//! node group in the engine's order, so events and free-device tables map to arrays instead of
//! string lookups in the hot loop.

use rustc_hash::FxHashMap;
use suanli_core::{Catalogue, Fleet, Tflops};

/// One node group of the fleet, in the engine's registration order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    /// Index of its pool.
    pub pool: u32,
    /// Catalogue index of its model.
    pub model: u16,
    /// TFLOPS of one device.
    pub device_tflops: Tflops,
}

/// Indexes over a fleet.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Pool ids, by index.
    pub pool_ids: Vec<String>,
    /// Whether each pool is local (the centre or a cloud).
    pub pool_local: Vec<bool>,
    /// Capacity of each pool, in TFLOPS.
    pub pool_capacity: Vec<Tflops>,
    /// Catalogue model ids, by catalogue index.
    pub model_ids: Vec<String>,
    /// TFLOPS of one device, by catalogue index.
    pub model_tflops: Vec<Tflops>,
    /// Capacity per model, in TFLOPS, by catalogue index.
    pub model_capacity: Vec<Tflops>,
    /// Node groups in engine order.
    pub groups: Vec<GroupInfo>,
    /// Total, local and external capacity, in TFLOPS.
    pub capacity: Tflops,
    /// Local capacity.
    pub local_capacity: Tflops,
    pool_ix: FxHashMap<String, u32>,
}

impl Layout {
    /// Indexes a validated fleet.
    pub fn new(fleet: &Fleet, catalogue: &Catalogue) -> Self {
        let model_ids: Vec<String> = catalogue.models().iter().map(|m| m.id.clone()).collect();
        let model_tflops: Vec<Tflops> = catalogue
            .models()
            .iter()
            .map(|m| m.fp16_dense_tflops as Tflops)
            .collect();
        let mut layout = Layout {
            pool_ids: Vec::new(),
            pool_local: Vec::new(),
            pool_capacity: Vec::new(),
            model_capacity: vec![0; model_ids.len()],
            model_ids,
            model_tflops,
            groups: Vec::new(),
            capacity: 0,
            local_capacity: 0,
            pool_ix: FxHashMap::default(),
        };
        for (p, pool) in fleet.pools.iter().enumerate() {
            let p = p as u32;
            layout.pool_ix.insert(pool.id.clone(), p);
            layout.pool_ids.push(pool.id.clone());
            layout.pool_local.push(pool.kind.is_local());
            let mut capacity = 0;
            for g in &pool.groups {
                let model = catalogue.lookup(&g.model).map_or(0, |m| m.0);
                let device_tflops = layout.model_tflops[model as usize];
                let tflops = g.nodes as Tflops * g.devices_per_node as Tflops * device_tflops;
                capacity += tflops;
                layout.model_capacity[model as usize] += tflops;
                layout.groups.push(GroupInfo {
                    pool: p,
                    model,
                    device_tflops,
                });
            }
            layout.pool_capacity.push(capacity);
            layout.capacity += capacity;
            if pool.kind.is_local() {
                layout.local_capacity += capacity;
            }
        }
        layout
    }

    /// Index of a pool id.
    pub fn pool(&self, id: &str) -> Option<u32> {
        self.pool_ix.get(id).copied()
    }
}
