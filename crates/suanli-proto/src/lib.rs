//! The versioned gRPC API of suanli: the contract between the broker and its clients.
//!
//! The source of truth is the proto files under `proto/suanli/v1/` at the workspace root
//! (package `suanli.v1`):
//!
//! - `types.proto`: shared messages and enums: request specs, requests, leases, pools,
//!   tenants, utilisation, and the units and naming conventions of the whole API.
//! - `tenant.proto`: `TenantService`, for AI companies: submit, get, list, cancel, release,
//!   watch and quote requests.
//! - `pool.proto`: `PoolService`, for compute pools: register a pool, and the `ConnectAgent` stream
//!   over which a pool's agent receives leases and reports on them.
//! - `operator.proto`: `OperatorService`, for the district's operators: the fleet summary,
//!   pools and draining, tenants and credentials, the queue.
//!
//! [`v1`] holds the generated Rust: one struct per message, one enum per proto enum, and for
//! each service a client (`v1::tenant_service_client::TenantServiceClient`) and a server trait
//! with its service wrapper (`v1::tenant_service_server::{TenantService,
//! TenantServiceServer}`). [`FILE_DESCRIPTOR_SET`] is the compiled descriptor set, for gRPC
//! reflection. [`failover`] is how a client follows the leader of a group of brokers.
//!
//! # Regenerating
//! Nothing generated is checked in: `cargo build` compiles the protos in `build.rs` with
//! `protox` (no system `protoc` needed) whenever a file under `proto/` changes.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod failover;

/// Messages, enums, clients and servers of the package `suanli.v1`.
pub mod v1 {
    tonic::include_proto!("suanli.v1");
}

/// The encoded `google.protobuf.FileDescriptorSet` of every file of `suanli.v1`, with source
/// comments: register it with a reflection service so tools can discover the API.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/suanli_v1_descriptor.bin"));
