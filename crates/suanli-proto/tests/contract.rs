//! The contract as other implementations see it: the descriptor set served for reflection lists
//! every service and method, and messages survive the wire.

use prost::Message;
use prost_types::FileDescriptorSet;
use suanli_proto::FILE_DESCRIPTOR_SET;
use suanli_proto::v1::{
    self, Constraints, ElasticShape, EndReason, EnvVar, GangShape, JobCause, JobOutcome, Lease,
    LeasePart, Policy, Priority, Request, RequestSpec, RequestState, WaitInfo, WaitReason,
    Workload, request_spec::Shape,
};

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("the descriptor set decodes")
}

/// Methods of `suanli.v1.<service>`, in declaration order.
fn methods(fds: &FileDescriptorSet, service: &str) -> Vec<String> {
    let found: Vec<_> = fds
        .file
        .iter()
        .filter(|f| f.package() == "suanli.v1")
        .flat_map(|f| &f.service)
        .filter(|s| s.name() == service)
        .collect();
    assert_eq!(found.len(), 1, "service {service} is declared once");
    found[0]
        .method
        .iter()
        .map(|m| m.name().to_string())
        .collect()
}

#[test]
fn descriptor_set_holds_the_four_files_of_the_package() {
    let mut names: Vec<String> = descriptor_set()
        .file
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "suanli/v1/operator.proto",
            "suanli/v1/pool.proto",
            "suanli/v1/tenant.proto",
            "suanli/v1/types.proto",
        ]
    );
}

#[test]
fn tenant_service_has_its_methods() {
    assert_eq!(
        methods(&descriptor_set(), "TenantService"),
        [
            "SubmitRequest",
            "GetRequest",
            "ListRequests",
            "CancelRequest",
            "ReleaseRequest",
            "WatchRequests",
            "QuoteRequest",
            "GetTenant",
            "GetStatement",
            "ListVouchers",
            "StreamLogs",
        ]
    );
}

#[test]
fn pool_service_has_its_methods() {
    assert_eq!(
        methods(&descriptor_set(), "PoolService"),
        ["RegisterPool", "ConnectAgent"]
    );
}

#[test]
fn operator_service_has_its_methods() {
    assert_eq!(
        methods(&descriptor_set(), "OperatorService"),
        [
            "GetFleetSummary",
            "ListPools",
            "GetPool",
            "DrainPool",
            "UndrainPool",
            "SetTenant",
            "ListTenants",
            "ListQueue",
            "IssueVoucher",
            "ListVouchers",
            "SetBudget",
            "GetStatement",
            "GetSubsidyReport",
            "SetSubsidyBudget",
            "AdjustBalance",
            "GetReplicaStatus",
            "Checkpoint",
            "CreateToken",
            "ListTokens",
            "RevokeToken",
            "ListAuditRecords",
        ]
    );
}

#[test]
fn streaming_calls_stream_the_right_way() {
    let fds = descriptor_set();
    let streams = |service: &str, method: &str| {
        let m = fds
            .file
            .iter()
            .flat_map(|f| &f.service)
            .filter(|s| s.name() == service)
            .flat_map(|s| &s.method)
            .find(|m| m.name() == method)
            .unwrap_or_else(|| panic!("{service}.{method} exists"));
        (m.client_streaming(), m.server_streaming())
    };
    assert_eq!(streams("TenantService", "WatchRequests"), (false, true));
    assert_eq!(streams("PoolService", "ConnectAgent"), (true, true));
    assert_eq!(streams("TenantService", "SubmitRequest"), (false, false));
}

#[test]
fn every_mutating_call_carries_an_idempotency_key() {
    let fds = descriptor_set();
    for input in [
        "SubmitRequestRequest",
        "CancelRequestRequest",
        "ReleaseRequestRequest",
        "RegisterPoolRequest",
        "DrainPoolRequest",
        "UndrainPoolRequest",
        "SetTenantRequest",
        "IssueVoucherRequest",
        "SetBudgetRequest",
        "CreateTokenRequest",
        "RevokeTokenRequest",
    ] {
        let message = fds
            .file
            .iter()
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == input)
            .unwrap_or_else(|| panic!("message {input} exists"));
        let key = message
            .field
            .iter()
            .find(|f| f.name() == "request_id")
            .unwrap_or_else(|| panic!("{input} has request_id"));
        assert_eq!(
            key.r#type(),
            prost_types::field_descriptor_proto::Type::String
        );
    }
}

#[test]
fn every_message_enum_and_field_is_documented() {
    let fds = descriptor_set();
    let mut undocumented = Vec::new();
    for file in &fds.file {
        let info = file.source_code_info.as_ref().expect("source info is kept");
        let documented = |path: &[i32]| {
            info.location
                .iter()
                .any(|l| l.path == path && !l.leading_comments().trim().is_empty())
        };
        // Field numbers of FileDescriptorProto, DescriptorProto, EnumDescriptorProto and
        // ServiceDescriptorProto in descriptor.proto.
        const MESSAGE: i32 = 4;
        const ENUM: i32 = 5;
        const SERVICE: i32 = 6;
        const FIELD: i32 = 2;
        const ONEOF: i32 = 8;
        const VALUE: i32 = 2;
        const METHOD: i32 = 2;
        for (i, m) in file.message_type.iter().enumerate() {
            let at = [MESSAGE, i as i32];
            if !documented(&at) {
                undocumented.push(m.name().to_string());
            }
            for (j, f) in m.field.iter().enumerate() {
                if !documented(&[MESSAGE, i as i32, FIELD, j as i32]) {
                    undocumented.push(format!("{}.{}", m.name(), f.name()));
                }
            }
            for (j, o) in m.oneof_decl.iter().enumerate() {
                // proto3 `optional` fields get a synthetic oneof without a source location.
                if o.name().starts_with('_') {
                    continue;
                }
                if !documented(&[MESSAGE, i as i32, ONEOF, j as i32]) {
                    undocumented.push(format!("{}.{}", m.name(), o.name()));
                }
            }
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            if !documented(&[ENUM, i as i32]) {
                undocumented.push(e.name().to_string());
            }
            for (j, v) in e.value.iter().enumerate() {
                if !documented(&[ENUM, i as i32, VALUE, j as i32]) {
                    undocumented.push(v.name().to_string());
                }
            }
        }
        for (i, s) in file.service.iter().enumerate() {
            if !documented(&[SERVICE, i as i32]) {
                undocumented.push(s.name().to_string());
            }
            for (j, m) in s.method.iter().enumerate() {
                if !documented(&[SERVICE, i as i32, METHOD, j as i32]) {
                    undocumented.push(format!("{}.{}", s.name(), m.name()));
                }
            }
        }
    }
    assert!(undocumented.is_empty(), "undocumented: {undocumented:?}");
}

#[test]
fn enums_start_with_a_prefixed_unspecified_value() {
    for file in &descriptor_set().file {
        for e in &file.enum_type {
            let prefix: String = e
                .name()
                .chars()
                .enumerate()
                .flat_map(|(i, c)| {
                    let sep = (i > 0 && c.is_ascii_uppercase()).then_some('_');
                    sep.into_iter()
                        .chain(std::iter::once(c.to_ascii_uppercase()))
                })
                .collect();
            assert_eq!(e.value[0].number(), 0, "{}", e.name());
            assert_eq!(e.value[0].name(), format!("{prefix}_UNSPECIFIED"));
            for v in &e.value {
                assert!(
                    v.name().starts_with(&format!("{prefix}_")),
                    "{} in {}",
                    v.name(),
                    e.name()
                );
            }
        }
    }
}

fn placed_request() -> Request {
    Request {
        name: "tenants/acme/requests/42".into(),
        id: 42,
        tenant: "acme".into(),
        spec: Some(RequestSpec {
            shape: Some(Shape::Gang(GangShape {
                nodes: 2,
                devices_per_node: 8,
            })),
            duration_ms: 3_600_000,
            priority: Priority::Critical as i32,
            constraints: Some(Constraints {
                models: vec!["h100".into(), "h800".into()],
                regions: vec!["guangdong-shenzhen".into()],
                pools: vec![],
                max_rtt_ms: Some(20),
                data_zone: Some("hetao".into()),
                max_price_fen_per_device_hour: Some(0),
            }),
            policy: Policy::BestFit as i32,
            start_after_unix_ms: None,
            deadline_unix_ms: Some(1_767_225_600_000),
            requeue: true,
            workload: Some(Workload {
                argv: vec![
                    "python3".into(),
                    "train.py".into(),
                    "--lr".into(),
                    "3e-4".into(),
                ],
                env: vec![EnvVar {
                    name: "NCCL_DEBUG".into(),
                    value: "INFO".into(),
                }],
                working_dir: "/data/run-7".into(),
                image: String::new(),
                stop_grace_s: 30,
            }),
            // Asked at submission only: a record never carries it.
            wait_for_pools: false,
        }),
        state: RequestState::Running as i32,
        wait: None,
        lease: Some(Lease {
            start_unix_ms: 1_767_000_000_000,
            end_unix_ms: 1_767_003_600_000,
            tflops: 2 * 8 * 989,
            price_fen_per_hour: 16 * 2500,
            borrowed_tflops: 989,
            parts: (0..2)
                .map(|node| LeasePart {
                    pool: "futian-aicc".into(),
                    group: 1,
                    model: "h100".into(),
                    node,
                    devices: 8,
                    price_fen_per_device_hour: 2500,
                    billing_increment_s: Some(60),
                })
                .collect(),
            running_since_unix_ms: Some(1_767_000_000_200),
        }),
        end_reason: EndReason::Preempted as i32,
        submit_time_unix_ms: 1_766_999_000_000,
        update_time_unix_ms: 1_767_000_000_500,
        leases: 1,
        outcome: Some(JobOutcome {
            cause: JobCause::Failed as i32,
            exit_code: Some(3),
            signal: None,
            node_rank: 1,
            message: "exit 3".into(),
        }),
    }
}

#[test]
fn a_request_round_trips_through_the_wire_format() {
    let request = placed_request();
    let bytes = request.encode_to_vec();
    let back = Request::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(back, request);
    assert_eq!(back.state(), RequestState::Running);
    assert_eq!(
        back.spec.as_ref().map(|s| s.priority()),
        Some(Priority::Critical)
    );
}

#[test]
fn proto3_optional_keeps_an_explicit_zero_apart_from_unset() {
    let request = placed_request();
    let back = Request::decode(request.encode_to_vec().as_slice()).expect("decodes");
    let constraints = back.spec.and_then(|s| s.constraints).expect("constraints");
    assert_eq!(constraints.max_price_fen_per_device_hour, Some(0));
    assert_eq!(constraints.max_rtt_ms, Some(20));
    assert!(constraints.pools.is_empty());
}

#[test]
fn a_queued_elastic_request_round_trips() {
    let request = Request {
        name: "tenants/acme/requests/7".into(),
        id: 7,
        tenant: "acme".into(),
        spec: Some(RequestSpec {
            shape: Some(Shape::Elastic(ElasticShape {
                tflops: 50_000,
                min_chunk_tflops: 5_000,
            })),
            duration_ms: 600_000,
            priority: Priority::Spot as i32,
            ..Default::default()
        }),
        state: RequestState::Queued as i32,
        wait: Some(WaitInfo {
            reason: WaitReason::CapacityBusy as i32,
            position: 3,
            earliest_start_unix_ms: Some(1_767_000_600_000),
        }),
        ..Default::default()
    };
    let back = Request::decode(request.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(back, request);
    assert_eq!(
        back.wait.map(|w| w.reason()),
        Some(WaitReason::CapacityBusy)
    );
}

#[test]
fn enum_names_match_the_proto() {
    assert_eq!(Priority::Critical.as_str_name(), "PRIORITY_CRITICAL");
    assert_eq!(
        WaitReason::from_str_name("WAIT_REASON_BEHIND_RESERVATION"),
        Some(WaitReason::BehindReservation)
    );
    assert_eq!(
        v1::PoolKind::from_str_name("POOL_KIND_LOCAL_CENTRE"),
        Some(v1::PoolKind::LocalCentre)
    );
}

#[test]
fn a_voucher_and_a_statement_round_trip_through_the_wire_format() {
    let voucher = v1::VoucherBalance {
        spec: Some(v1::VoucherSpec {
            id: "FT-2025-0001".into(),
            tenant: "acme".into(),
            face_value_fen: 1_000_000,
            rate_bp: 5_000,
            per_lease_cap_fen: Some(50_000),
            scope: Some(v1::VoucherScope {
                pool_kinds: vec![
                    v1::PoolKind::LocalCentre as i32,
                    v1::PoolKind::LocalCloud as i32,
                ],
                ..Default::default()
            }),
            valid_from_unix_ms: 1_740_758_400_000,
            valid_until_unix_ms: 1_748_534_400_000,
        }),
        scope_label: "kinds:local_centre;local_cloud".into(),
        issued_unix_ms: 1_740_758_400_000,
        used_fen: 105_600,
        remaining_fen: 894_400,
    };
    let back = v1::VoucherBalance::decode(voucher.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(back, voucher);
    // A removed cap is absent, not zero.
    let uncapped = v1::VoucherSpec {
        per_lease_cap_fen: None,
        ..voucher.spec.clone().unwrap()
    };
    let back = v1::VoucherSpec::decode(uncapped.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(back.per_lease_cap_fen, None);
    assert_eq!(
        v1::BudgetPeriod::from_str_name("BUDGET_PERIOD_MONTHLY"),
        Some(v1::BudgetPeriod::Monthly)
    );
    assert_eq!(v1::BudgetPeriod::default(), v1::BudgetPeriod::Unspecified);
}
