//! The fleet as the metrics see it: pool and model indexes, which pools are local, and every
//! node group in the engine's order, so events and free-device tables map to arrays instead of
//! string lookups in the hot loop.

use rustc_hash::FxHashMap;
use suanli_core::{Catalogue, Fleet, PoolKind, Tflops};

/// One node group of the fleet, in the engine's registration order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    /// Index of its pool.
    pub pool: u32,
    /// Catalogue index of its model.
    pub model: u16,
    /// TFLOPS of one device.
    pub device_tflops: Tflops,
    /// Price of one device for one hour, in fen, from the fleet file. The simulator never
    /// changes a pool's prices, so this is also the price the engine fixes at placement.
    pub price_fen_per_device_hour: u64,
    /// Its pool's billing increment in ms, from the fleet file; `None` bills to the ms.
    pub billing_increment_ms: Option<u64>,
}

/// Indexes over a fleet.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Pool ids, by index.
    pub pool_ids: Vec<String>,
    /// Whether each pool is local (the centre or a cloud).
    pub pool_local: Vec<bool>,
    /// Kind of each pool, for billing (voucher scopes and subsidy by pool kind).
    pub pool_kind: Vec<PoolKind>,
    /// Index in `groups` of each pool's first node group.
    pub pool_first_group: Vec<u32>,
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
            pool_kind: Vec::new(),
            pool_first_group: Vec::new(),
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
            layout.pool_kind.push(pool.kind);
            layout.pool_first_group.push(layout.groups.len() as u32);
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
                    price_fen_per_device_hour: g.price_fen_per_device_hour,
                    billing_increment_ms: pool.billing_increment_s.map(|s| u64::from(s) * 1_000),
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

    /// Index in `groups` of node group `group` of pool `pool`.
    pub fn group(&self, pool: u32, group: u32) -> Option<u32> {
        let first = *self.pool_first_group.get(pool as usize)?;
        let end = self
            .pool_first_group
            .get(pool as usize + 1)
            .copied()
            .unwrap_or(self.groups.len() as u32);
        let g = first.checked_add(group)?;
        (g < end).then_some(g)
    }
}
