//! Jobs as the simulator sees them, before they become engine requests: when they arrive, how
//! long they run, how many devices of which model they ask for, and who asks.
//!
//! A job naming no model asks for "any model of at least the reference size": its devices may be
//! of any catalogue model whose rated dense FP16 TFLOPS is at least
//! [`RequestRule::reference_tflops`]. That is also the rule that turns traces which name no model
//! (Philly) into P: one trace GPU is one device of at least that many TFLOPS.

use suanli_core::engine::MAX_DURATION_MS;
use suanli_core::{
    Catalogue, Constraints, Millis, ModelIx, Priority, RequestSpec, Shape, TFLOPS_PER_P, Tflops,
};

use crate::error::SimError;

/// Largest number of devices a gang places on one node when a trace does not say how many
/// nodes it spans: the common node size of the Futian fleets.
pub const DEVICES_PER_NODE: u32 = 8;

/// Default size of one device of a job that names no model: the A100/A800 class (312 TFLOPS),
/// the usual training accelerator of the years the traces come from.
pub const DEFAULT_REFERENCE_TFLOPS: Tflops = 312;

/// Gang (all or nothing in one node group) or elastic (an amount of P that may be split).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobShape {
    /// `nodes` nodes of equal device counts.
    Gang,
    /// The devices' worth of TFLOPS, in chunks of at least a quarter of it.
    Elastic,
}

/// One job of a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// Arrival, on the trace's clock.
    pub submit_ms: Millis,
    /// Run time once placed.
    pub duration_ms: Millis,
    /// Devices in all, at least 1.
    pub devices: u32,
    /// Nodes a gang spans; `None` = the fewest nodes of [`DEVICES_PER_NODE`] devices.
    pub nodes: Option<u32>,
    /// A model from the catalogue, or `None` for any model of at least the reference size.
    pub model: Option<ModelIx>,
    /// Index into the workload's tenant names.
    pub tenant: u32,
    /// Priority class.
    pub priority: Priority,
    /// Gang or elastic.
    pub shape: JobShape,
    /// Must finish within this long after its arrival.
    pub deadline_after_ms: Option<Millis>,
}

/// How jobs become engine requests, and the scaling knobs.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestRule {
    /// TFLOPS of one device of a job that names no model (see the module documentation).
    pub reference_tflops: Tflops,
    /// Arrival times are divided by it: 2.0 offers twice the load in half the time.
    pub load_factor: f64,
    /// Device counts are multiplied by it (rounded, at least 1).
    pub size_factor: f64,
}

impl Default for RequestRule {
    fn default() -> Self {
        RequestRule {
            reference_tflops: DEFAULT_REFERENCE_TFLOPS,
            load_factor: 1.0,
            size_factor: 1.0,
        }
    }
}

impl RequestRule {
    /// Checks the knobs: positive, finite factors and a reference some model meets.
    pub fn validate(&self, catalogue: &Catalogue) -> Result<(), SimError> {
        if !(self.load_factor.is_finite() && self.load_factor > 0.0) {
            return Err(SimError::option(
                "load_factor",
                format!("{} must be a positive number", self.load_factor),
            ));
        }
        if !(self.size_factor.is_finite() && self.size_factor > 0.0) {
            return Err(SimError::option(
                "size_factor",
                format!("{} must be a positive number", self.size_factor),
            ));
        }
        let largest = catalogue
            .models()
            .iter()
            .map(|m| m.fp16_dense_tflops as Tflops)
            .max()
            .unwrap_or(0);
        if self.reference_tflops == 0 || self.reference_tflops > largest {
            return Err(SimError::option(
                "reference_tflops",
                format!(
                    "{} must be between 1 and the largest model's {largest}",
                    self.reference_tflops
                ),
            ));
        }
        Ok(())
    }

    /// The job after the load and size factors.
    pub fn scale(&self, job: &mut Job) {
        job.submit_ms = (job.submit_ms as f64 / self.load_factor).round() as Millis;
        if self.size_factor != 1.0 {
            let devices = (job.devices as f64 * self.size_factor).round().max(1.0);
            job.devices = devices.min(u32::MAX as f64) as u32;
            // An explicit node count scales with the devices so devices per node stay the same.
            job.nodes = job
                .nodes
                .map(|n| ((n as f64 * self.size_factor).round().max(1.0)) as u32);
        }
    }
}

/// Turns jobs into engine requests; built once per run.
#[derive(Clone, Debug)]
pub struct RequestBuilder {
    reference_tflops: Tflops,
    /// Catalogue ids of the models at least as large as the reference, for jobs naming none.
    any_models: Vec<String>,
    /// Id and TFLOPS per device of every catalogue model, by index.
    models: Vec<(String, Tflops)>,
}

impl RequestBuilder {
    /// A builder for a catalogue and a rule.
    pub fn new(catalogue: &Catalogue, rule: &RequestRule) -> Self {
        let models: Vec<(String, Tflops)> = catalogue
            .models()
            .iter()
            .map(|m| (m.id.clone(), m.fp16_dense_tflops as Tflops))
            .collect();
        let any_models = models
            .iter()
            .filter(|(_, t)| *t >= rule.reference_tflops)
            .map(|(id, _)| id.clone())
            .collect();
        RequestBuilder {
            reference_tflops: rule.reference_tflops,
            any_models,
            models,
        }
    }

    /// TFLOPS of one device of the job (its model's rating, or the reference).
    pub fn device_tflops(&self, job: &Job) -> Tflops {
        match job.model {
            Some(m) => self.models.get(m.0 as usize).map_or(0, |(_, t)| *t),
            None => self.reference_tflops,
        }
    }

    /// Catalogue ids a job may run on.
    pub fn allowed_models(&self, job: &Job) -> Vec<String> {
        match job.model.and_then(|m| self.models.get(m.0 as usize)) {
            Some((id, _)) => vec![id.clone()],
            None => self.any_models.clone(),
        }
    }

    /// Bit mask over catalogue indexes of the models a job may run on.
    pub fn allowed_mask(&self, job: &Job) -> u64 {
        match job.model {
            Some(m) => 1u64 << (m.0 as u32 % 64),
            None => self
                .models
                .iter()
                .enumerate()
                .filter(|(_, (_, t))| *t >= self.reference_tflops)
                .fold(0, |mask, (i, _)| mask | 1u64 << (i as u32 % 64)),
        }
    }

    /// The job's shape in engine terms: a gang on the fewest (or the given) nodes with equal
    /// device counts (rounded up), or the devices' worth of TFLOPS in chunks of a quarter.
    pub fn shape(&self, job: &Job) -> Shape {
        let devices = job.devices.max(1);
        match job.shape {
            JobShape::Gang => {
                let nodes = job
                    .nodes
                    .unwrap_or_else(|| devices.div_ceil(DEVICES_PER_NODE))
                    .clamp(1, devices);
                let per_node = devices.div_ceil(nodes).min(u16::MAX as u32) as u16;
                Shape::Gang {
                    nodes,
                    devices_per_node: per_node,
                }
            }
            JobShape::Elastic => {
                let per_device = self.device_tflops(job).max(1);
                let tflops = per_device * devices as Tflops;
                Shape::Elastic {
                    tflops,
                    min_chunk_tflops: (tflops / 4).max(per_device),
                }
            }
        }
    }

    /// Compute the job holds while it runs, in TFLOPS (before any rounding by placement).
    pub fn tflops(&self, job: &Job) -> Tflops {
        match self.shape(job) {
            Shape::Gang {
                nodes,
                devices_per_node,
            } => nodes as Tflops * devices_per_node as Tflops * self.device_tflops(job),
            Shape::Elastic { tflops, .. } => tflops,
        }
    }

    /// The engine request for a job arriving at `now`. Jobs go back to the queue when preempted
    /// or when their pool is lost, as a training job restarts from its checkpoint.
    pub fn request(&self, job: &Job, tenant: &str, now: Millis) -> RequestSpec {
        RequestSpec {
            tenant: tenant.to_string(),
            shape: self.shape(job),
            duration_ms: job.duration_ms.clamp(1, MAX_DURATION_MS),
            priority: job.priority,
            constraints: Constraints {
                models: self.allowed_models(job),
                ..Constraints::default()
            },
            policy: None,
            start_after_ms: None,
            deadline_ms: job.deadline_after_ms.map(|d| now.saturating_add(d)),
            requeue: true,
            workload: None,
        }
    }
}

/// TFLOPS as P, for reports.
pub fn as_p(tflops: f64) -> f64 {
    tflops / TFLOPS_PER_P as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(devices: u32, shape: JobShape) -> Job {
        Job {
            submit_ms: 0,
            duration_ms: 1000,
            devices,
            nodes: None,
            model: None,
            tenant: 0,
            priority: Priority::Standard,
            shape,
            deadline_after_ms: None,
        }
    }

    #[test]
    fn gangs_take_the_fewest_nodes_of_eight() {
        let b = RequestBuilder::new(&Catalogue::builtin(), &RequestRule::default());
        let shape = |d| b.shape(&job(d, JobShape::Gang));
        assert_eq!(
            shape(1),
            Shape::Gang {
                nodes: 1,
                devices_per_node: 1
            }
        );
        assert_eq!(
            shape(12),
            Shape::Gang {
                nodes: 2,
                devices_per_node: 6
            }
        );
        assert_eq!(
            shape(48),
            Shape::Gang {
                nodes: 6,
                devices_per_node: 8
            }
        );
    }

    #[test]
    fn any_model_means_at_least_the_reference_size() {
        let c = Catalogue::builtin();
        let b = RequestBuilder::new(&c, &RequestRule::default());
        let models = b.allowed_models(&job(1, JobShape::Gang));
        assert!(models.contains(&"a800".to_string()));
        assert!(models.contains(&"h800".to_string()));
        assert!(!models.contains(&"h20".to_string()), "{models:?}");
        assert!(!models.contains(&"rtx4090".to_string()));
        let e = b.shape(&job(8, JobShape::Elastic));
        assert_eq!(
            e,
            Shape::Elastic {
                tflops: 8 * 312,
                min_chunk_tflops: 2 * 312
            }
        );
    }

    #[test]
    fn factors_compress_arrivals_and_grow_sizes() {
        let rule = RequestRule {
            load_factor: 4.0,
            size_factor: 2.0,
            ..RequestRule::default()
        };
        let mut j = job(3, JobShape::Gang);
        j.submit_ms = 1000;
        rule.scale(&mut j);
        assert_eq!((j.submit_ms, j.devices), (250, 6));
        let bad = RequestRule {
            load_factor: 0.0,
            ..RequestRule::default()
        };
        assert!(bad.validate(&Catalogue::builtin()).is_err());
    }
}
