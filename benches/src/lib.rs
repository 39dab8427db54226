//! Criterion benchmarks of suanli live in `benches/`; this library holds what they share.
