//! Credentials with a lifecycle, through a real socket: an operator creates tokens for a
//! tenant, a pool's agent and an operator, lists them (never a secret), revokes them; a revoked
//! or expired token is refused at the next call, open streams opened with it end, and nothing
//! in the data folder grants what a token granted. An agent's token acts for its pool only.

use std::time::Duration;

use suanli_e2e::{Broker, agent_hello, gang, submit, test_config};
use suanli_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn owner(owner: pb::token_owner::Owner) -> Option<pb::TokenOwner> {
    Some(pb::TokenOwner { owner: Some(owner) })
}

fn create(name: &str, who: pb::token_owner::Owner, expires: u64) -> pb::CreateTokenRequest {
    pb::CreateTokenRequest {
        request_id: format!("create-{name}"),
        name: name.into(),
        owner: owner(who),
        expires_unix_ms: expires,
    }
}

fn revoke(name: &str) -> pb::RevokeTokenRequest {
    pb::RevokeTokenRequest {
        request_id: format!("revoke-{name}"),
        name: name.into(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Every file under `dir`, as bytes.
fn files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

#[tokio::test]
async fn tokens_are_created_listed_revoked_and_kept_only_as_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(test_config(dir.path())).await;
    let mut op = broker.operator(&broker.creds.operator).await;
    use pb::token_owner::Owner;

    // A tenant's token: its secret is shown once and works at once.
    let made = op
        .create_token(create("ci-bot", Owner::Tenant("tenant-a".into()), 0))
        .await
        .unwrap()
        .into_inner();
    let secret = made.secret.clone();
    assert!(secret.len() >= 40, "a long random secret: {secret}");
    let info = made.token.unwrap();
    assert_eq!(info.name, "ci-bot");
    assert_eq!(info.owner, owner(Owner::Tenant("tenant-a".into())));
    assert!(info.created_unix_ms > 0);
    let mut tenant = broker.tenant(&secret).await;
    let me = tenant
        .get_tenant(pb::GetTenantRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.id, "tenant-a");

    // Bad creations name what is wrong.
    let bad = [
        (
            pb::CreateTokenRequest {
                request_id: "other".into(),
                ..create("ci-bot", Owner::Tenant("tenant-a".into()), 0)
            },
            Code::AlreadyExists,
            None,
        ),
        (
            create("Bad Name", Owner::Tenant("tenant-a".into()), 0),
            Code::InvalidArgument,
            Some("name"),
        ),
        (
            create("nobody", Owner::Tenant("no-such".into()), 0),
            Code::NotFound,
            Some("no-such"),
        ),
        (
            create("old", Owner::Tenant("tenant-a".into()), 1),
            Code::InvalidArgument,
            Some("expires_unix_ms"),
        ),
        (
            pb::CreateTokenRequest {
                owner: None,
                ..create("x", Owner::Operator(true), 0)
            },
            Code::InvalidArgument,
            Some("owner"),
        ),
    ];
    for (request, code, named) in bad {
        let e = op.create_token(request).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        if let Some(named) = named {
            assert!(e.message().contains(named), "{e:?}");
        }
    }
    // A retry of the creation does not show the secret again.
    let e = op
        .create_token(create("ci-bot", Owner::Tenant("tenant-a".into()), 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("only once"), "{e:?}");
    // Only the operator manages tokens.
    let mut as_tenant = broker.operator(&secret).await;
    let e = as_tenant
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // The list shows every token with its last use, never a secret.
    let list = op
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = list.tokens.iter().map(|t| t.name.as_str()).collect();
    assert!(names.contains(&"ci-bot"), "{names:?}");
    assert!(names.contains(&"operator:primary"), "{names:?}");
    assert!(names.contains(&"tenant:tenant-a"), "{names:?}");
    let bot = list.tokens.iter().find(|t| t.name == "ci-bot").unwrap();
    assert!(bot.last_used_unix_ms >= bot.created_unix_ms, "{bot:?}");
    let listed = format!("{list:?}");
    assert!(!listed.contains(&secret));
    assert!(!listed.contains(&broker.creds.operator));

    // A watch opened with the token ends when it is revoked; the next call is refused.
    let mut watch = tenant
        .watch_requests(pb::WatchRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let revoked = op
        .revoke_token(revoke("ci-bot"))
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked_unix_ms > 0);
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match watch.next().await {
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the watch ends after the revocation");
    let e = ended.expect("an error, not a silent end").unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("ci-bot was revoked"), "{e:?}");
    let e = tenant
        .get_tenant(pb::GetTenantRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("revoked"), "{e:?}");
    // Revoking again changes nothing; a retry answers the same; an unknown name is NOT_FOUND.
    let again = op
        .revoke_token(pb::RevokeTokenRequest {
            request_id: "again".into(),
            ..revoke("ci-bot")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.revoked_unix_ms, revoked.revoked_unix_ms);
    let retry = op
        .revoke_token(revoke("ci-bot"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry.revoked_unix_ms, revoked.revoked_unix_ms);
    let e = op.revoke_token(revoke("no-such")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Revoked tokens are listed on asking, and keep their names.
    let all = op
        .list_tokens(pb::ListTokensRequest {
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(all.tokens.iter().any(|t| t.name == "ci-bot"));
    let active = op
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!active.tokens.iter().any(|t| t.name == "ci-bot"));

    // The operator rotates its own token: a new one, then the old one revoked.
    let ops2 = op
        .create_token(create("ops-2", Owner::Operator(true), 0))
        .await
        .unwrap()
        .into_inner()
        .secret;
    let mut op2 = broker.operator(&ops2).await;
    op2.revoke_token(revoke("operator:primary")).await.unwrap();
    let e = op
        .get_fleet_summary(pb::GetFleetSummaryRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // A token that expires works until then, and not after.
    let soon = op2
        .create_token(create(
            "short-lived",
            Owner::Tenant("tenant-b".into()),
            now_ms() + 3_000,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut short = broker.tenant(&soon.secret).await;
    let expires = soon.token.unwrap().expires_unix_ms;
    let first = short.get_tenant(pb::GetTenantRequest::default()).await;
    if now_ms() < expires {
        // (Unless this machine stalled for the token's whole life.)
        first.expect("a token works before it expires");
    }
    let refused = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Err(e) = short.get_tenant(pb::GetTenantRequest::default()).await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the token stops working once it expires");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("short-lived expired"),
        "{refused:?}"
    );
    assert!(now_ms() >= expires);

    // A restart keeps every token and every revocation; the data folder holds no secret of
    // a created token.
    drop((tenant, short, op, op2));
    broker.stop().await;
    for (path, bytes) in files(dir.path()) {
        for s in [&secret, &ops2, &soon.secret] {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                "{} holds a token's secret",
                path.display()
            );
        }
    }
    let broker = Broker::start(test_config(dir.path())).await;
    let mut op2 = broker.operator(&ops2).await;
    let list = op2
        .list_tokens(pb::ListTokensRequest {
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let state = |name: &str| {
        list.tokens
            .iter()
            .find(|t| t.name == name)
            .cloned()
            .unwrap()
    };
    assert!(state("ci-bot").revoked_unix_ms > 0);
    assert!(state("operator:primary").revoked_unix_ms > 0);
    assert_eq!(state("ops-2").revoked_unix_ms, 0);
    let mut tenant = broker.tenant(&secret).await;
    let e = tenant
        .get_tenant(pb::GetTenantRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // The revoked operator token was generated at the first start: it is not made again.
    let old = broker.operator(&broker.creds.operator).await;
    let e = old
        .clone()
        .get_fleet_summary(pb::GetFleetSummaryRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    broker.stop().await;
}

#[tokio::test]
async fn an_agents_token_acts_for_its_pool_only_and_its_stream_ends_when_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.agent_pools = vec!["near".into(), "far".into()];
    let broker = Broker::start(config).await;
    let mut op = broker.operator(&broker.creds.operator).await;
    use pb::token_owner::Owner;
    let secret = op
        .create_token(create("near-agent", Owner::Pool("near".into()), 0))
        .await
        .unwrap()
        .into_inner()
        .secret;
    let mut pool = broker.pool(&secret).await;

    // Not for another pool: neither registering it nor opening its stream.
    let far = pb::Pool {
        id: "far".into(),
        kind: pb::PoolKind::External as i32,
        ..Default::default()
    };
    let e = pool
        .register_pool(pb::RegisterPoolRequest {
            request_id: String::new(),
            pool: Some(far),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("may not act for pool far"), "{e:?}");
    let (tx, rx) = mpsc::channel(4);
    tx.send(agent_hello("far", vec![])).await.unwrap();
    let e = pool
        .connect_agent(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Nor as a tenant.
    let mut as_tenant = broker.tenant(&secret).await;
    let e = as_tenant
        .submit_request(submit("x", gang(1, 8, "h100", 60_000)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Its own pool's stream works, and ends when the token is revoked.
    let (tx, rx) = mpsc::channel(4);
    tx.send(agent_hello("near", vec![])).await.unwrap();
    let mut stream = pool
        .connect_agent(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let welcome = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        welcome.body,
        Some(pb::broker_message::Body::Welcome(_))
    ));
    op.revoke_token(revoke("near-agent")).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the agent's stream ends after the revocation");
    let e = ended.expect("an error, not a silent end").unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("near-agent was revoked"), "{e:?}");
    drop(tx);
    broker.stop().await;
}
