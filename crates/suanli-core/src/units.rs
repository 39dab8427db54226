//! Integer units and identifiers. Capacity, time and money are integers so that sums are exact
//! and the engine stays deterministic: no float is ever accumulated.

use std::fmt;

/// Dense FP16/BF16 tensor throughput in TFLOPS at rated peak. One P is [`TFLOPS_PER_P`] TFLOPS.
pub type Tflops = u64;

/// Milliseconds on the caller's clock. The engine never reads a clock: every command carries `now`.
pub type Millis = u64;

/// Money in fen (0.01 CNY).
pub type Fen = u64;

/// TFLOPS in one P (one petaFLOPS), the unit of Chinese compute statistics.
pub const TFLOPS_PER_P: Tflops = 1000;

/// The engine's identifier of a request, assigned in submission order.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// Index of a pool in the engine, in registration order.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub(crate) struct PoolIx(pub u32);

/// Index of a tenant in the engine, in the order tenants were first set.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub(crate) struct TenantIx(pub u32);

/// Index of an accelerator model in the catalogue.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ModelIx(pub u16);
