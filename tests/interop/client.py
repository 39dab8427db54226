"""A suanli client written with grpcio (the C-core gRPC implementation), not tonic.

Run by tests/interop.rs against a broker it started. The suanli.v1 stubs are generated at test
time with grpc_tools.protoc and found on PYTHONPATH. Prints one line per check and exits
non-zero, naming the failed check, on the first failure.

    python3 client.py --addr HOST:PORT --tenant-a TOKEN --tenant-b TOKEN --operator TOKEN
                      [--no-health] [--no-reflection]
"""

import argparse
import os
import sys
import traceback

import grpc

from suanli.v1 import operator_pb2, operator_pb2_grpc, tenant_pb2, tenant_pb2_grpc, types_pb2

TIMEOUT_S = 10.0


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def ok(what):
    print(f"ok: {what}", flush=True)


def bearer(token):
    return (("authorization", f"Bearer {token}"),)


def gang_spec(nodes, devices_per_node, model, duration_ms):
    return types_pb2.RequestSpec(
        gang=types_pb2.GangShape(nodes=nodes, devices_per_node=devices_per_node),
        duration_ms=duration_ms,
        priority=types_pb2.PRIORITY_STANDARD,
        constraints=types_pb2.Constraints(models=[model]),
    )


def state_name(request):
    return types_pb2.RequestState.Name(request.state)


def expect_code(call, code, what):
    try:
        call()
    except grpc.RpcError as e:
        check(e.code() == code, f"{what}: expected {code.name}, got {e.code().name}: {e.details()}")
        return
    raise CheckFailed(f"{what}: expected {code.name}, but the call succeeded")


def tenant_checks(channel, a_token, b_token):
    tenant = tenant_pb2_grpc.TenantServiceStub(channel)
    a = bearer(a_token)

    gang = tenant.SubmitRequest(
        tenant_pb2.SubmitRequestRequest(request_id="py-gang", spec=gang_spec(1, 8, "h100", 60_000)),
        metadata=a,
        timeout=TIMEOUT_S,
    )
    check(gang.name == f"tenants/tenant-a/requests/{gang.id}", f"gang name: {gang.name!r}")
    check(gang.tenant == "tenant-a", f"gang tenant: {gang.tenant!r}")
    check(gang.state == types_pb2.REQUEST_STATE_RUNNING, f"gang state: {state_name(gang)}")
    check(gang.spec.WhichOneof("shape") == "gang", "gang spec shape echoed")
    parts = list(gang.lease.parts)
    check(len(parts) == 1, f"gang lease parts: {len(parts)}")
    check(
        parts[0].pool == "near" and parts[0].model == "h100" and parts[0].devices == 8,
        f"gang lease part: {parts[0]}",
    )
    check(gang.lease.end_unix_ms - gang.lease.start_unix_ms == 60_000, "gang lease lasts 60 s")
    ok(f"SubmitRequest gang 1x8 h100: {gang.name} RUNNING on {parts[0].pool}")

    elastic = tenant.SubmitRequest(
        tenant_pb2.SubmitRequestRequest(
            request_id="py-elastic",
            spec=types_pb2.RequestSpec(
                elastic=types_pb2.ElasticShape(tflops=1000, min_chunk_tflops=0),
                duration_ms=60_000,
            ),
        ),
        metadata=a,
        timeout=TIMEOUT_S,
    )
    check(elastic.state == types_pb2.REQUEST_STATE_RUNNING, f"elastic state: {state_name(elastic)}")
    check(len(elastic.lease.parts) >= 1, "elastic lease has parts")
    check(elastic.lease.tflops >= 1000, f"elastic lease tflops: {elastic.lease.tflops}")
    check(elastic.id != gang.id, "two requests, two ids")
    ok(
        f"SubmitRequest elastic 1000 TFLOPS: {elastic.name} RUNNING, "
        f"{len(elastic.lease.parts)} part(s), {elastic.lease.tflops} TFLOPS"
    )

    again = tenant.SubmitRequest(
        tenant_pb2.SubmitRequestRequest(request_id="py-gang", spec=gang_spec(1, 8, "h100", 60_000)),
        metadata=a,
        timeout=TIMEOUT_S,
    )
    check(again.id == gang.id, "the same request_id returns the first request")
    ok("SubmitRequest is idempotent on request_id")

    got = tenant.GetRequest(tenant_pb2.GetRequestRequest(name=gang.name), metadata=a, timeout=TIMEOUT_S)
    check(got.id == gang.id and got.name == gang.name, f"GetRequest returned {got.name!r}")
    check(got.state == types_pb2.REQUEST_STATE_RUNNING, f"got state: {state_name(got)}")
    ok(f"GetRequest {got.name}")

    listed = tenant.ListRequests(tenant_pb2.ListRequestsRequest(), metadata=a, timeout=TIMEOUT_S)
    ids = [r.id for r in listed.requests]
    check(ids == [gang.id, elastic.id], f"ListRequests ids: {ids}")
    ok("ListRequests: 2 requests in submission order")

    quote = tenant.QuoteRequest(
        tenant_pb2.QuoteRequestRequest(spec=gang_spec(1, 1, "a800", 3_600_000)),
        metadata=a,
        timeout=TIMEOUT_S,
    )
    check(quote.placeable_now, f"quote placeable now (wait reason {quote.wait_reason})")
    check(list(quote.pools) == ["far"], f"quote pools: {list(quote.pools)}")
    check(quote.price_fen_per_hour == 1000, f"quote price per hour: {quote.price_fen_per_hour}")
    check(quote.estimated_cost_fen == 1000, f"quote cost: {quote.estimated_cost_fen}")
    after = tenant.ListRequests(tenant_pb2.ListRequestsRequest(), metadata=a, timeout=TIMEOUT_S)
    check(len(after.requests) == 2, "a quote submits nothing")
    ok("QuoteRequest 1x1 a800 for an hour: 1000 fen on far")

    cancelled = tenant.CancelRequest(
        tenant_pb2.CancelRequestRequest(request_id="py-cancel", name=elastic.name),
        metadata=a,
        timeout=TIMEOUT_S,
    )
    check(
        cancelled.state == types_pb2.REQUEST_STATE_CANCELLED,
        f"cancelled state: {state_name(cancelled)}",
    )
    ok(f"CancelRequest {elastic.name}: CANCELLED")

    b = bearer(b_token)
    expect_code(
        lambda: tenant.GetRequest(tenant_pb2.GetRequestRequest(name=gang.name), metadata=b, timeout=TIMEOUT_S),
        grpc.StatusCode.NOT_FOUND,
        "tenant-b reading tenant-a's request",
    )
    expect_code(
        lambda: tenant.CancelRequest(
            tenant_pb2.CancelRequestRequest(request_id="py-b-cancel", name=gang.name),
            metadata=b,
            timeout=TIMEOUT_S,
        ),
        grpc.StatusCode.NOT_FOUND,
        "tenant-b cancelling tenant-a's request",
    )
    ok("tenant-b gets NOT_FOUND on tenant-a's request")

    expect_code(
        lambda: tenant.ListRequests(tenant_pb2.ListRequestsRequest(), timeout=TIMEOUT_S),
        grpc.StatusCode.UNAUTHENTICATED,
        "a call without a token",
    )
    expect_code(
        lambda: tenant.ListRequests(
            tenant_pb2.ListRequestsRequest(), metadata=bearer("not-a-token"), timeout=TIMEOUT_S
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "a call with a wrong token",
    )
    ok("no token or a wrong token gets UNAUTHENTICATED")
    return gang


def workload_checks(channel, a_token):
    """A request that carries a job: its workload round-trips, a bad one is refused by field,
    and with no agent that runs commands (the test's pools are simulated) it waits, saying why."""
    import time

    tenant = tenant_pb2_grpc.TenantServiceStub(channel)
    a = bearer(a_token)
    spec = gang_spec(1, 8, "h100", 60_000)
    spec.workload.CopyFrom(
        types_pb2.Workload(
            argv=["python3", "train.py", "--lr", "3e-4"],
            env=[types_pb2.EnvVar(name="NCCL_DEBUG", value="INFO")],
            working_dir="/data/run-7",
            stop_grace_s=30,
        )
    )
    job = tenant.SubmitRequest(
        tenant_pb2.SubmitRequestRequest(request_id="py-job", spec=spec), metadata=a, timeout=TIMEOUT_S
    )
    check(job.spec.workload == spec.workload, f"workload as submitted: {job.spec.workload}")
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        got = tenant.GetRequest(tenant_pb2.GetRequestRequest(name=job.name), metadata=a, timeout=TIMEOUT_S)
        check(got.state == types_pb2.REQUEST_STATE_QUEUED, f"job state: {state_name(got)}")
        if got.wait.reason == types_pb2.WAIT_REASON_WORKLOAD_UNSUPPORTED:
            break
        check(time.monotonic() < deadline, f"job wait reason: {got.wait.reason}")
        time.sleep(0.02)
    ok(f"SubmitRequest with a workload: {job.name} waits, WAIT_REASON_WORKLOAD_UNSUPPORTED")

    expect_code(
        lambda: list(
            tenant.StreamLogs(tenant_pb2.StreamLogsRequest(name=job.name), metadata=a, timeout=TIMEOUT_S)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "StreamLogs of a job not placed yet",
    )
    ok("StreamLogs of a job not placed yet: FAILED_PRECONDITION")

    bad = gang_spec(1, 8, "h100", 60_000)
    bad.workload.CopyFrom(types_pb2.Workload(argv=["python3", "x" * 5000]))
    try:
        tenant.SubmitRequest(
            tenant_pb2.SubmitRequestRequest(request_id="py-bad-job", spec=bad), metadata=a, timeout=TIMEOUT_S
        )
        raise CheckFailed("an argv entry of 5000 bytes was accepted")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"oversized argv: {e.code().name}")
        check("spec.workload.argv[1]" in e.details(), f"oversized argv names the field: {e.details()}")
    ok("SubmitRequest with an oversized argv entry: INVALID_ARGUMENT naming spec.workload.argv[1]")

    tenant.CancelRequest(
        tenant_pb2.CancelRequestRequest(request_id="py-job-cancel", name=job.name), metadata=a, timeout=TIMEOUT_S
    )


def operator_checks(channel, op_token):
    operator = operator_pb2_grpc.OperatorServiceStub(channel)
    op = bearer(op_token)
    summary = operator.GetFleetSummary(operator_pb2.GetFleetSummaryRequest(), metadata=op, timeout=TIMEOUT_S)
    check(summary.pools.healthy == 2, f"healthy pools: {summary.pools.healthy}")
    check(summary.live_leases == 1, f"live leases after the cancel: {summary.live_leases}")
    check(summary.total.capacity_devices == 32, f"fleet devices: {summary.total.capacity_devices}")
    check(summary.total.allocated_devices == 8, f"allocated devices: {summary.total.allocated_devices}")
    models = [k.key for k in summary.by_model]
    check(models == ["a800", "h100"], f"by_model keys: {models}")
    ok(
        f"GetFleetSummary: {summary.pools.healthy} healthy pools, {summary.live_leases} live lease, "
        f"{summary.total.allocated_devices}/{summary.total.capacity_devices} devices"
    )

    pools = operator.ListPools(operator_pb2.ListPoolsRequest(), metadata=op, timeout=TIMEOUT_S)
    names = [p.name for p in pools.pools]
    check(names == ["pools/near", "pools/far"], f"ListPools names: {names}")
    check(all(p.health == types_pb2.POOL_HEALTH_HEALTHY for p in pools.pools), "pools healthy")
    near = pools.pools[0]
    check(near.utilisation.allocated_devices == 8, f"near allocated: {near.utilisation.allocated_devices}")
    ok(f"ListPools: {', '.join(names)}")

    # A broker on its own leads a group of one; a checkpoint lands in its log and its status.
    status = operator.GetReplicaStatus(operator_pb2.GetReplicaStatusRequest(), metadata=op, timeout=TIMEOUT_S)
    check(not status.replicated and status.leader, f"a broker on its own leads: {status}")
    mark = operator.Checkpoint(operator_pb2.CheckpointRequest(), metadata=op, timeout=TIMEOUT_S)
    check(mark.log_index > 0 and mark.digest != 0, f"checkpoint: {mark}")
    status = operator.GetReplicaStatus(operator_pb2.GetReplicaStatusRequest(), metadata=op, timeout=TIMEOUT_S)
    marks = [(c.log_index, c.digest) for c in status.checkpoints]
    check((mark.log_index, mark.digest) in marks, f"checkpoint in the status: {marks}")
    check(status.log_index > mark.log_index, f"log index {status.log_index} past the checkpoint")
    ok(f"Checkpoint at log index {mark.log_index}, digest {mark.digest:016x}, in GetReplicaStatus")
    expect_code(
        lambda: operator.GetReplicaStatus(operator_pb2.GetReplicaStatusRequest(), metadata=bearer("nope"), timeout=TIMEOUT_S),
        grpc.StatusCode.UNAUTHENTICATED,
        "GetReplicaStatus without the operator's token",
    )


def token_checks(channel, op_token):
    """A token's life through grpcio: created (its secret shown once), used, listed without its
    secret, revoked (refused at the next call); both calls in the audit trail."""
    operator = operator_pb2_grpc.OperatorServiceStub(channel)
    op = bearer(op_token)
    made = operator.CreateToken(
        operator_pb2.CreateTokenRequest(
            request_id="interop-token",
            name="interop-bot",
            owner=operator_pb2.TokenOwner(tenant="tenant-a"),
        ),
        metadata=op,
        timeout=TIMEOUT_S,
    )
    check(made.token.name == "interop-bot" and len(made.secret) >= 40, f"CreateToken: {made.token}")
    tenant = tenant_pb2_grpc.TenantServiceStub(channel)
    me = tenant.GetTenant(tenant_pb2.GetTenantRequest(), metadata=bearer(made.secret), timeout=TIMEOUT_S)
    check(me.id == "tenant-a", f"the new token's tenant: {me.id}")
    listed = operator.ListTokens(operator_pb2.ListTokensRequest(), metadata=op, timeout=TIMEOUT_S)
    check("interop-bot" in [t.name for t in listed.tokens], f"ListTokens: {[t.name for t in listed.tokens]}")
    check(made.secret not in str(listed), "ListTokens shows no secret")
    revoked = operator.RevokeToken(
        operator_pb2.RevokeTokenRequest(request_id="interop-revoke", name="interop-bot"),
        metadata=op,
        timeout=TIMEOUT_S,
    )
    check(revoked.revoked_unix_ms > 0, f"RevokeToken: {revoked}")
    expect_code(
        lambda: tenant.GetTenant(tenant_pb2.GetTenantRequest(), metadata=bearer(made.secret), timeout=TIMEOUT_S),
        grpc.StatusCode.UNAUTHENTICATED,
        "GetTenant with a revoked token",
    )
    ok("CreateToken, ListTokens, RevokeToken: the token worked, then was refused")

    trail = operator.ListAuditRecords(operator_pb2.ListAuditRecordsRequest(), metadata=op, timeout=TIMEOUT_S)
    calls = [(r.rpc, r.target, r.who, r.refused) for r in trail.records]
    for rpc in ("CreateToken", "RevokeToken"):
        check((rpc, "tokens/interop-bot", "operator:primary", "") in calls, f"{rpc} in the trail: {calls}")
    failures = operator.ListAuditRecords(
        operator_pb2.ListAuditRecordsRequest(auth_failures=True), metadata=op, timeout=TIMEOUT_S
    )
    check(any(r.rpc == "authenticate" for r in failures.records), f"auth failures: {failures.records}")
    ok(f"ListAuditRecords: {len(trail.records)} records, {len(failures.records)} failed authentications")


def health_checks(channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "suanli.v1.TenantService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        check(reply.status == health_pb2.HealthCheckResponse.SERVING, f"health of {service!r}: {status}")
        ok(f"grpc.health.v1.Health/Check {service!r}: {status}")
    expect_code(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT_S),
        grpc.StatusCode.NOT_FOUND,
        "health of an unknown service",
    )
    ok("grpc.health.v1.Health/Check of an unknown service: NOT_FOUND")


def reflection_checks(channel):
    from grpc_reflection.v1alpha import reflection_pb2

    # grpcio-reflection ships only v1alpha stubs; v1 has the same messages on the wire, so both
    # versions are asked with the same message classes on their own method paths.
    for version in ("v1alpha", "v1"):
        method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
        call = channel.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        replies = list(
            call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT_S)
        )
        check(len(replies) == 1, f"reflection {version}: {len(replies)} replies")
        check(
            replies[0].WhichOneof("message_response") == "list_services_response",
            f"reflection {version}: {replies[0].WhichOneof('message_response')}",
        )
        services = sorted(s.name for s in replies[0].list_services_response.service)
        for wanted in ("suanli.v1.TenantService", "suanli.v1.OperatorService", "suanli.v1.PoolService"):
            check(wanted in services, f"reflection {version} lists {wanted}: {services}")
        ok(f"grpc.reflection.{version}.ServerReflection list_services: {', '.join(services)}")

        files = list(
            call(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="suanli.v1.TenantService")]),
                timeout=TIMEOUT_S,
            )
        )
        kind = files[0].WhichOneof("message_response") if files else None
        check(kind == "file_descriptor_response", f"reflection {version} file_containing_symbol: {kind}")
        ok(f"grpc.reflection.{version}.ServerReflection file_containing_symbol suanli.v1.TenantService")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True)
    parser.add_argument("--tenant-a", required=True)
    parser.add_argument("--tenant-b", required=True)
    parser.add_argument("--operator", required=True)
    parser.add_argument("--no-health", action="store_true", help="grpcio-health-checking is missing")
    parser.add_argument("--no-reflection", action="store_true", help="grpcio-reflection is missing")
    args = parser.parse_args()

    print(f"grpcio {grpc.__version__} -> {args.addr}", flush=True)
    # A loopback broker: never go through a proxy from the environment.
    channel = grpc.insecure_channel(args.addr, options=[("grpc.enable_http_proxy", 0)])
    try:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
        tenant_checks(channel, args.tenant_a, args.tenant_b)
        workload_checks(channel, args.tenant_a)
        operator_checks(channel, args.operator)
        token_checks(channel, args.operator)
        if args.no_health:
            print("skipped: health checks (grpcio-health-checking is not installed)", flush=True)
        else:
            health_checks(channel)
        if args.no_reflection:
            print("skipped: reflection checks (grpcio-reflection is not installed)", flush=True)
        else:
            reflection_checks(channel)
    except CheckFailed as e:
        print(f"FAILED: {e}", flush=True)
        return 1
    except grpc.FutureTimeoutError:
        print(f"FAILED: could not connect to {args.addr} within {TIMEOUT_S} s", flush=True)
        return 1
    except grpc.RpcError as e:
        here = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == os.path.abspath(__file__)]
        at = f" at client.py line {here[-1].lineno} in {here[-1].name}(): {here[-1].line}" if here else ""
        print(f"FAILED: unexpected RPC error {e.code().name}: {e.details()}{at}", flush=True)
        return 1
    finally:
        channel.close()
    print("all interop checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
