//! The simulator cannot drift from production: the commands a broker logged, replayed through
//! the simulator's driver on a fresh engine, end in the digest the broker stopped with.

use std::time::Duration;

use suanli_broker::store::{Entry, RedbStore, Store};
use suanli_core::{Catalogue, Engine};
use suanli_e2e::{Broker, test_config};
use suanli_proto::v1 as pb;

fn spec(i: u64) -> pb::RequestSpec {
    let shape = if i.is_multiple_of(3) {
        pb::request_spec::Shape::Elastic(pb::ElasticShape {
            tflops: 1_000 + 700 * i,
            min_chunk_tflops: 0,
        })
    } else {
        pb::request_spec::Shape::Gang(pb::GangShape {
            nodes: 1 + (i % 2) as u32,
            devices_per_node: [1, 2, 4, 8][(i % 4) as usize],
        })
    };
    pb::RequestSpec {
        shape: Some(shape),
        // Some end by themselves while the test runs, the rest are released or stay.
        duration_ms: if i.is_multiple_of(4) { 50 } else { 3_600_000 },
        priority: [
            pb::Priority::Standard,
            pb::Priority::Spot,
            pb::Priority::Critical,
        ][(i % 3) as usize] as i32,
        requeue: i.is_multiple_of(2),
        // The largest elastic requests ask for more than the fleet holds: they wait, as part
        // of the mix the simulator must replay.
        wait_for_pools: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn the_simulator_replays_a_brokers_log_to_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let broker = Broker::start(config.clone()).await;
    let tenants = ["tenant-a", "tenant-b", "tenant-c"];
    let mut clients = Vec::new();
    for t in tenants {
        clients.push(broker.tenant(&broker.tenant_token(t)).await);
    }
    let mut placed = Vec::new();
    for i in 0..60u64 {
        let client = &mut clients[(i % 3) as usize];
        let r = client
            .submit_request(pb::SubmitRequestRequest {
                request_id: format!("p{i}"),
                spec: Some(spec(i)),
            })
            .await
            .unwrap()
            .into_inner();
        if r.lease.is_some() && i % 5 == 1 {
            placed.push(((i % 3) as usize, r.name));
        }
        if i % 10 == 9 {
            // Let ticks, expiries and passes happen between the bursts.
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }
    for (c, name) in placed {
        // A release may lose the race with an expiry; either way the log has what happened.
        let _ = clients[c]
            .release_request(pb::ReleaseRequestRequest {
                request_id: format!("release-{name}"),
                name,
            })
            .await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let digest = broker.stop().await;

    let log = RedbStore::open(dir.path()).unwrap().recover().unwrap();
    assert!(log.snapshot.is_none(), "the whole log is there to replay");
    let commands: Vec<_> = log
        .entries
        .into_iter()
        .map(|e| match e {
            // An operator's call carries what it logged.
            Entry::Audited { entry, .. } => *entry,
            other => other,
        })
        .filter_map(|e| match e {
            Entry::Command { now, command, .. } => Some((now, command)),
            // Accounting and credentials do not touch the engine.
            Entry::Billing { .. }
            | Entry::Credential { .. }
            | Entry::TokenIssued { .. }
            | Entry::TokenRevoked { .. }
            | Entry::Audited { .. }
            | Entry::Refused(_)
            | Entry::Synced { .. }
            | Entry::Checkpoint => None,
        })
        .collect();
    assert!(commands.len() > 100, "{} commands logged", commands.len());
    let engine = Engine::new(config.engine.clone(), Catalogue::builtin());
    assert_eq!(suanli_sim::replay(engine, commands), digest);
}
