//! Authentication: bearer tokens in the `authorization` metadata, each naming one principal
//! (a tenant, a pool's agent, or the operator). The interceptor puts the caller's
//! [`Principal`] into the request's extensions; services check what the principal may do.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tonic::{Request, Status};

use crate::error::BrokerError;

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Principal {
    /// An AI company.
    Tenant(String),
    /// The agent of one pool.
    Agent(String),
    /// The platform's operator.
    Operator,
}

impl Principal {
    /// The caller's name in idempotency keys and logs.
    pub fn key(&self) -> String {
        match self {
            Principal::Tenant(t) => t.clone(),
            Principal::Agent(p) => format!("agent:{p}"),
            Principal::Operator => "operator".into(),
        }
    }

    /// The tenant, or PERMISSION_DENIED.
    pub fn tenant(&self) -> Result<&str, BrokerError> {
        match self {
            Principal::Tenant(t) => Ok(t),
            _ => Err(BrokerError::PermissionDenied(
                "this call needs a tenant's credential".into(),
            )),
        }
    }

    /// Ok for the operator, else PERMISSION_DENIED.
    pub fn operator(&self) -> Result<(), BrokerError> {
        match self {
            Principal::Operator => Ok(()),
            _ => Err(BrokerError::PermissionDenied(
                "this call needs the operator's credential".into(),
            )),
        }
    }

    /// The pool of an agent (or any pool for the operator), else PERMISSION_DENIED.
    pub fn may_act_for_pool(&self, pool: &str) -> Result<(), BrokerError> {
        match self {
            Principal::Operator => Ok(()),
            Principal::Agent(p) if p == pool => Ok(()),
            Principal::Agent(p) => Err(BrokerError::PermissionDenied(format!(
                "the agent of pool {p} may not act for pool {pool}"
            ))),
            Principal::Tenant(_) => Err(BrokerError::PermissionDenied(
                "this call needs a pool agent's or the operator's credential".into(),
            )),
        }
    }
}

/// The tokens the broker accepts.
#[derive(Clone, Debug, Default)]
pub struct Tokens(Arc<RwLock<HashMap<String, Principal>>>);

impl Tokens {
    /// Grants `token` to `principal`, revoking the principal's other tokens.
    pub fn grant(&self, principal: Principal, token: String) {
        let mut map = self.0.write().expect("token table");
        map.retain(|_, p| *p != principal);
        map.insert(token, principal);
    }

    /// Who holds `token`.
    pub fn lookup(&self, token: &str) -> Option<Principal> {
        self.0.read().expect("token table").get(token).cloned()
    }

    /// Every principal's token (for the credentials file).
    pub fn all(&self) -> Vec<(Principal, String)> {
        let mut v: Vec<(Principal, String)> = self
            .0
            .read()
            .expect("token table")
            .iter()
            .map(|(t, p)| (p.clone(), t.clone()))
            .collect();
        v.sort_by_key(|a| a.0.key());
        v
    }

    /// The interceptor: UNAUTHENTICATED without a known bearer token.
    pub fn authenticate(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let header = req.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated("missing authorization metadata (Bearer token)")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer <token>\""))?;
        let principal = self
            .lookup(token.trim())
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        req.extensions_mut().insert(principal);
        Ok(req)
    }
}

/// A fresh random token.
pub fn new_token(prefix: &str) -> String {
    use rand::RngExt;
    let mut rng = rand::rng();
    let hex: String = (0..24)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect();
    format!("{prefix}-{hex}")
}

/// The principal the interceptor found.
pub fn principal<T>(req: &Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credential"))
}
