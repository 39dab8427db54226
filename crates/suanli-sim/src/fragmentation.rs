//! Fragmentation: free devices that no waiting request can use.
//!
//! At a sample instant, a free device is *usable* when some waiting request accepts its model
//! and either
//! - the request is a gang of n nodes x m devices, the device's node has at least m free
//!   devices, and its node group has at least n such nodes; or
//! - the request is elastic and the device's node group has at least the request's minimum
//!   chunk free.
//!
//! Fragmentation is the share of free devices that are not usable. It is sampled only when at
//! least one request waits and some device is free (otherwise nothing is stranded), and
//! reported as the mean over those samples; `stranded_p` is the mean TFLOPS of stranded devices
//! over all samples (0 when nothing waits), in P. Devices of lost pools are not free. The workloads
//! of the simulator constrain only the model, so this test is exact for them; a request with
//! region or round-trip constraints would need the engine's own filter.

use rustc_hash::FxHashMap;
use suanli_core::{Shape, Tflops};

use crate::layout::Layout;

/// What a waiting request needs, as far as fragmentation is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Demand {
    /// Catalogue indexes of the models it accepts, as bits.
    pub models: u64,
    /// Its shape.
    pub shape: Shape,
}

/// Waiting requests grouped by demand, with counts.
#[derive(Clone, Debug, Default)]
pub struct Waiting {
    kinds: Vec<(Demand, u32)>,
    ids: FxHashMap<Demand, u32>,
}

impl Waiting {
    /// The index of a demand, interned.
    pub fn intern(&mut self, d: Demand) -> u32 {
        *self.ids.entry(d).or_insert_with(|| {
            self.kinds.push((d, 0));
            (self.kinds.len() - 1) as u32
        })
    }

    /// One more request of this demand waits.
    pub fn add(&mut self, kind: u32) {
        if let Some(k) = self.kinds.get_mut(kind as usize) {
            k.1 += 1;
        }
    }

    /// One request of this demand stopped waiting.
    pub fn remove(&mut self, kind: u32) {
        if let Some(k) = self.kinds.get_mut(kind as usize) {
            k.1 = k.1.saturating_sub(1);
        }
    }

    /// Whether any request waits.
    pub fn any(&self) -> bool {
        self.kinds.iter().any(|k| k.1 > 0)
    }
}

/// Free and stranded devices at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stranded {
    /// Free devices in healthy pools.
    pub free: u64,
    /// Of those, devices no waiting request can use.
    pub stranded: u64,
    /// Their TFLOPS.
    pub stranded_tflops: Tflops,
}

/// Counts stranded devices. `free_table` is the engine's `node_free_table()` (groups in engine
/// order: free devices per node), `healthy` tells which pools take work.
pub fn stranded(
    layout: &Layout,
    free_table: &[(String, Vec<u16>, u16)],
    healthy: &[bool],
    waiting: &Waiting,
) -> Stranded {
    let active: Vec<&(Demand, u32)> = waiting.kinds.iter().filter(|k| k.1 > 0).collect();
    let mut out = Stranded::default();
    for (g, (_, free, _)) in free_table.iter().enumerate() {
        let Some(info) = layout.groups.get(g) else {
            break;
        };
        if !healthy.get(info.pool as usize).copied().unwrap_or(true) {
            continue;
        }
        // at_least[m] = nodes with at least m free devices.
        let mut at_least = [0u32; 18];
        let mut group_free: u64 = 0;
        for &f in free {
            at_least[(f as usize).min(17)] += 1;
            group_free += f as u64;
        }
        if group_free == 0 {
            continue;
        }
        for m in (0..17).rev() {
            at_least[m] += at_least[m + 1];
        }
        let group_tflops = group_free as Tflops * info.device_tflops;
        let bit = 1u64 << (info.model as u32 % 64);
        let mut whole_group = false;
        let mut smallest_gang = u16::MAX;
        for (d, _) in &active {
            if d.models & bit == 0 {
                continue;
            }
            match d.shape {
                Shape::Elastic {
                    min_chunk_tflops, ..
                } => {
                    if group_tflops >= min_chunk_tflops {
                        whole_group = true;
                        break;
                    }
                }
                Shape::Gang {
                    nodes,
                    devices_per_node,
                } => {
                    let m = devices_per_node as usize;
                    if m <= 16 && at_least[m] >= nodes {
                        smallest_gang = smallest_gang.min(devices_per_node);
                    }
                }
            }
        }
        let usable: u64 = if whole_group {
            group_free
        } else {
            free.iter()
                .filter(|&&f| f > 0 && f >= smallest_gang)
                .map(|&f| f as u64)
                .sum()
        };
        out.free += group_free;
        out.stranded += group_free - usable;
        out.stranded_tflops += (group_free - usable) * info.device_tflops;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use suanli_core::{Catalogue, Fleet};

    fn layout() -> Layout {
        let fleet = Fleet::from_toml(
            r#"
            name = "t"
            [[pool]]
            id = "p"
            kind = "external"
            region = "r"
            rtt_ms = 1
            data_zone = "mainland"
            [[pool.group]]
            model = "h800"
            devices_per_node = 8
            nodes = 3
            interconnect = "nvlink"
            price_fen_per_device_hour = 100
            "#,
            &Catalogue::builtin(),
        )
        .unwrap();
        Layout::new(&fleet, &Catalogue::builtin())
    }

    #[test]
    fn free_devices_too_small_for_every_waiting_gang_are_stranded() {
        let l = layout();
        let h800 = 1u64 << Catalogue::builtin().lookup("h800").unwrap().0;
        let table = vec![("p".to_string(), vec![2, 3, 8], 8)];
        let mut w = Waiting::default();
        let gang = |nodes, m| Demand {
            models: h800,
            shape: Shape::Gang {
                nodes,
                devices_per_node: m,
            },
        };
        // With nothing waiting no device is usable (the recorder samples only when one waits).
        assert_eq!(stranded(&l, &table, &[true], &w).stranded, 13);
        let k = w.intern(gang(1, 4));
        w.add(k);
        // 4 devices on one node: only the node with 8 free serves it.
        assert_eq!(
            stranded(&l, &table, &[true], &w),
            Stranded {
                free: 13,
                stranded: 5,
                stranded_tflops: 5 * 989,
            }
        );
        // A gang of two nodes of 3 fits too: nodes with 3 and 8 free are usable.
        let k2 = w.intern(gang(2, 3));
        w.add(k2);
        assert_eq!(stranded(&l, &table, &[true], &w).stranded, 2);
        // An elastic request with a small chunk can use every free device.
        let e = w.intern(Demand {
            models: h800,
            shape: Shape::Elastic {
                tflops: 10_000,
                min_chunk_tflops: 989,
            },
        });
        w.add(e);
        assert_eq!(stranded(&l, &table, &[true], &w).stranded, 0);
        // Another model's demand does not count; a lost pool has no free devices.
        w.remove(e);
        w.remove(k2);
        assert_eq!(stranded(&l, &table, &[false], &w), Stranded::default());
    }
}
