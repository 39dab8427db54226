//! `suanli tokens`: the operator creates, lists and revokes the bearer tokens of tenants, pool
//! agents and operators. A token's secret is printed once, when it is created: the broker keeps
//! only its hash.

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use suanli_proto::v1::token_owner::Owner;
use suanli_proto::v1::{
    CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, TokenInfo, TokenOwner,
};

use crate::client::{self, GlobalArgs, PageArgs};
use crate::output::{self, Table};
use crate::parse::{self, TimeArg};
use crate::tenant_cmds::more_hint;
use crate::time::now_unix_ms;

/// `suanli tokens`: list tokens, or create or revoke one.
#[derive(Args, Clone, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct TokensArgs {
    #[command(subcommand)]
    pub action: Option<TokensAction>,
    /// Also list revoked and expired tokens.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub page: PageArgs,
}

/// What to do with one token.
#[derive(Subcommand, Clone, Debug)]
pub enum TokensAction {
    /// Create a token and print its secret (shown only now).
    Create(CreateArgs),
    /// Revoke a token: calls presenting it are refused from now on, and streams opened with it
    /// are closed.
    Revoke {
        /// The token's name.
        name: String,
        /// Idempotency key [default: a fresh random id].
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
}

/// `suanli tokens create`.
#[derive(Args, Clone, Debug)]
pub struct CreateArgs {
    /// The token's name: 1 to 64 of a-z, 0-9, '.', '_' and '-'.
    pub name: String,
    #[command(flatten)]
    pub owner: OwnerArgs,
    /// When the token stops working: RFC 3339 (2027-01-01T00:00:00+08:00) or from now (+90d).
    #[arg(long, value_name = "TIME", value_parser = parse::time_arg)]
    pub expires: Option<TimeArg>,
    /// Idempotency key [default: a fresh random id].
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

/// Whom a new token identifies: exactly one.
#[derive(Args, Clone, Debug)]
#[group(required = true, multiple = false)]
pub struct OwnerArgs {
    /// A tenant's token.
    #[arg(long, value_name = "TENANT")]
    pub tenant: Option<String>,
    /// A pool agent's token: it acts for this pool only.
    #[arg(long, value_name = "POOL")]
    pub pool: Option<String>,
    /// An operator's token (to rotate the operator's own: create one, then revoke the old).
    #[arg(long)]
    pub operator: bool,
}

impl OwnerArgs {
    fn to_pb(&self) -> TokenOwner {
        let owner = match (&self.tenant, &self.pool) {
            (Some(t), _) => Owner::Tenant(t.strip_prefix("tenants/").unwrap_or(t).to_string()),
            (_, Some(p)) => Owner::Pool(p.strip_prefix("pools/").unwrap_or(p).to_string()),
            _ => Owner::Operator(true),
        };
        TokenOwner { owner: Some(owner) }
    }
}

/// `suanli tokens ...`.
pub async fn tokens(g: &GlobalArgs, a: &TokensArgs) -> anyhow::Result<()> {
    let mut client = client::operator_client(g).await?;
    match &a.action {
        None => {
            let include_inactive = a.all;
            let (tokens, next) = a
                .page
                .collect(|page_size, page_token| {
                    let mut client = client.clone();
                    async move {
                        let page = client
                            .list_tokens(ListTokensRequest {
                                page_size,
                                page_token,
                                include_inactive,
                            })
                            .await?
                            .into_inner();
                        Ok((page.tokens, page.next_page_token))
                    }
                })
                .await?;
            if g.json {
                output::print_json(&json!({
                    "tokens": tokens.iter().map(token_json).collect::<Vec<_>>(),
                    "next_page_token": next,
                }));
            } else {
                output::emit(&tokens_table(&tokens, now_unix_ms()).render());
                more_hint(&next);
            }
        }
        Some(TokensAction::Create(c)) => {
            let reply = client
                .create_token(CreateTokenRequest {
                    request_id: c.request_id.clone().unwrap_or_else(parse::new_request_id),
                    name: c.name.clone(),
                    owner: Some(c.owner.to_pb()),
                    expires_unix_ms: c.expires.map_or(0, |e| e.resolve(now_unix_ms())),
                })
                .await?
                .into_inner();
            let token = reply.token.unwrap_or_default();
            if g.json {
                output::print_json(&json!({
                    "token": token_json(&token),
                    "secret": reply.secret,
                }));
            } else {
                output::emit(&tokens_table(std::slice::from_ref(&token), now_unix_ms()).render());
                output::emit(&format!("\nsecret  {}\n", reply.secret));
                eprintln!(
                    "The secret is shown only now (the broker keeps its hash): pass it as \
                     --token or SUANLI_TOKEN."
                );
            }
        }
        Some(TokensAction::Revoke { name, request_id }) => {
            let token = client
                .revoke_token(RevokeTokenRequest {
                    request_id: request_id.clone().unwrap_or_else(parse::new_request_id),
                    name: name.clone(),
                })
                .await?
                .into_inner();
            if g.json {
                output::print_json(&token_json(&token));
            } else {
                output::emit(&tokens_table(std::slice::from_ref(&token), now_unix_ms()).render());
            }
        }
    }
    Ok(())
}

/// Whom a token identifies, as `tenant acme`, `pool p1`, `operator`.
fn owner_text(t: &TokenInfo) -> String {
    match t.owner.as_ref().and_then(|o| o.owner.as_ref()) {
        Some(Owner::Tenant(name)) => format!("tenant {name}"),
        Some(Owner::Pool(pool)) => format!("pool {pool}"),
        Some(Owner::Operator(_)) => "operator".into(),
        None => "-".into(),
    }
}

/// Whether a token works at `now`.
fn state(t: &TokenInfo, now: u64) -> &'static str {
    if t.revoked_unix_ms > 0 {
        "revoked"
    } else if t.expires_unix_ms > 0 && t.expires_unix_ms <= now {
        "expired"
    } else {
        "active"
    }
}

fn tokens_table(tokens: &[TokenInfo], now: u64) -> Table {
    let mut table = Table::new(&["NAME", "OWNER", "STATE", "CREATED", "EXPIRES", "LAST USED"]);
    for t in tokens {
        table.row(vec![
            t.name.clone(),
            owner_text(t),
            state(t, now).into(),
            output::time(t.created_unix_ms),
            output::time(t.expires_unix_ms),
            output::time(t.last_used_unix_ms),
        ]);
    }
    table
}

fn token_json(t: &TokenInfo) -> Value {
    let owner = match t.owner.as_ref().and_then(|o| o.owner.as_ref()) {
        Some(Owner::Tenant(name)) => json!({"tenant": name}),
        Some(Owner::Pool(pool)) => json!({"pool": pool}),
        Some(Owner::Operator(_)) => json!({"operator": true}),
        None => Value::Null,
    };
    let opt = |ms: u64| (ms > 0).then_some(ms);
    json!({
        "name": t.name,
        "owner": owner,
        "state": state(t, now_unix_ms()),
        "created_unix_ms": t.created_unix_ms,
        "expires_unix_ms": opt(t.expires_unix_ms),
        "last_used_unix_ms": opt(t.last_used_unix_ms),
        "revoked_unix_ms": opt(t.revoked_unix_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(revoked: u64, expires: u64) -> TokenInfo {
        TokenInfo {
            name: "ci".into(),
            owner: Some(TokenOwner {
                owner: Some(Owner::Tenant("acme".into())),
            }),
            created_unix_ms: 1,
            expires_unix_ms: expires,
            last_used_unix_ms: 0,
            revoked_unix_ms: revoked,
        }
    }

    #[test]
    fn a_token_is_active_until_revoked_or_expired() {
        assert_eq!(state(&info(0, 0), 100), "active");
        assert_eq!(state(&info(0, 200), 100), "active");
        assert_eq!(state(&info(0, 100), 100), "expired");
        assert_eq!(state(&info(50, 200), 100), "revoked");
        let text = tokens_table(&[info(0, 0)], 100).render();
        assert!(text.contains("tenant acme"), "{text}");
        assert!(text.contains("active"), "{text}");
    }
}
