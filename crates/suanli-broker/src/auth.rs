//! Authentication: bearer tokens in the `authorization` metadata, each naming one principal
//! (a tenant, a pool's agent, or the operator). The interceptor puts the caller's
//! [`Principal`] and [`Credential`] into the request's extensions; services check what the
//! principal may do.
//!
//! The broker keeps a token's SHA-256 hash, never its secret: the command log, the snapshots
//! and the data folder grant nothing to whoever copies them. Secrets are random (192 bits), so
//! one round of a fast hash is as good as a slow password hash would be. A token has a name,
//! an owner, an optional expiry and may be revoked; a call presenting a revoked or expired
//! token is UNAUTHENTICATED at once, and streams opened with it end (see [`Tokens::closed`]).
//!
//! With mutual TLS for agents (`[tls] agent_ca`), a client certificate that the CA signed and
//! that names a pool (see [`pool_of_certificate`]) identifies that pool's agent, with no
//! token; a token sent with it must be the same pool's.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// A token's SHA-256 hash: all the broker keeps of its secret.
pub type SecretHash = [u8; 32];

/// The hash of a secret.
pub fn hash_secret(secret: &str) -> SecretHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut hash = [0; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

/// The name of a principal's start-up token (configured, generated for development, or issued
/// by SetTenant). The `:` keeps these names apart from the names operators choose.
pub fn primary_name(principal: &Principal) -> String {
    match principal {
        Principal::Operator => "operator:primary".into(),
        Principal::Tenant(t) => format!("tenant:{t}"),
        Principal::Agent(p) => format!("agent:{p}"),
    }
}

/// Checks a token name an operator chose: 1 to 64 of `a-z0-9._-`, starting with a letter or a
/// digit.
pub fn check_token_name(name: &str) -> Result<(), BrokerError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(BrokerError::field(
            "name",
            "a token name is 1 to 64 of a-z, 0-9, '.', '_' and '-', starting with a letter or \
             a digit",
        ))
    }
}

/// A token as the broker keeps it (in the log, the snapshots and memory).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Its name, unique among all tokens, revoked ones included.
    pub name: String,
    /// Whom it identifies.
    pub principal: Principal,
    /// The SHA-256 of its secret.
    pub hash: SecretHash,
    /// When it was issued (unix ms).
    pub created_ms: u64,
    /// When it stops working (unix ms).
    pub expires_ms: Option<u64>,
    /// When it was revoked (unix ms).
    pub revoked_ms: Option<u64>,
}

impl TokenRecord {
    /// Why the token does not work at `now`, if it does not.
    pub fn inactive(&self, now: u64) -> Option<String> {
        if self.revoked_ms.is_some() {
            return Some(format!("token {} was revoked", self.name));
        }
        match self.expires_ms {
            Some(at) if at <= now => Some(format!("token {} expired", self.name)),
            _ => None,
        }
    }
}

/// The token a call presented: its name and whom it identifies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// The token's name (who made a change, in logs and the audit trail).
    pub name: String,
    /// Whom it identifies.
    pub principal: Principal,
    /// Its hash: a token re-issued under the same name is another credential.
    pub hash: SecretHash,
    /// A client certificate, not a token: TLS checked it at the handshake, and nothing
    /// revokes it while the connection lasts.
    pub certificate: bool,
}

/// How an agent's client certificate names its pool: a URI subject alternative name
/// `suanli:pool:<pool id>`.
pub const POOL_URI_PREFIX: &str = "suanli:pool:";

/// The pool a client certificate (DER) names in a URI subject alternative name
/// [`POOL_URI_PREFIX`]`<pool id>`; `None` when it names none, an error when it cannot be read
/// or names several.
pub fn pool_of_certificate(der: &[u8]) -> Result<Option<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the client certificate cannot be read: {e}"))?;
    let names = cert
        .subject_alternative_name()
        .map_err(|e| format!("the client certificate's alternative names: {e}"))?;
    let mut pools = names
        .into_iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(uri) => uri.strip_prefix(POOL_URI_PREFIX),
            _ => None,
        });
    let pool = pools.next().map(str::to_string);
    if pools.next().is_some() {
        return Err("the client certificate names several pools; an agent's names one".into());
    }
    Ok(pool)
}

#[derive(Default)]
struct Table {
    /// Every token by name, with when a call last presented it here (0: not yet).
    records: BTreeMap<String, (TokenRecord, AtomicU64)>,
    /// Names by hash.
    by_hash: HashMap<SecretHash, String>,
}

struct Shared {
    table: RwLock<Table>,
    /// Bumped on every revocation or replacement: open streams check their token again.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            table: RwLock::default(),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// The tokens the broker accepts: the writer issues and revokes them as it applies the log;
/// the interceptor and the HTTP side read them.
#[derive(Clone, Default)]
pub struct Tokens(Arc<Shared>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.read().records.len())
            .finish()
    }
}

impl Tokens {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.0.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.0.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a token; one of the same name is replaced, and its secret stops working.
    pub fn issue(&self, record: TokenRecord) {
        let replaced = {
            let mut table = self.write();
            let hash = record.hash;
            let name = record.name.clone();
            let old = table
                .records
                .insert(name.clone(), (record, AtomicU64::new(0)));
            if let Some((old, _)) = &old
                && old.hash != hash
            {
                table.by_hash.remove(&old.hash);
            }
            table.by_hash.insert(hash, name);
            old.is_some()
        };
        if replaced {
            self.0.changed.send_modify(|g| *g += 1);
        }
    }

    /// Revokes a token at `at`; false when there is none of that name. A revoked token stays
    /// revoked at its first revocation time.
    pub fn revoke(&self, name: &str, at: u64) -> bool {
        let found = match self.write().records.get_mut(name) {
            Some((r, _)) => {
                r.revoked_ms.get_or_insert(at);
                true
            }
            None => false,
        };
        if found {
            self.0.changed.send_modify(|g| *g += 1);
        }
        found
    }

    /// Makes this table a copy of `other` (a state rebuilt from the store), in one step, so
    /// no call is refused in between; open streams check their tokens again.
    pub fn assign(&self, other: &Tokens) {
        let copy = other.records();
        {
            let mut table = self.write();
            let last: HashMap<String, u64> = table
                .records
                .iter()
                .map(|(n, (_, used))| (n.clone(), used.load(Ordering::Relaxed)))
                .collect();
            *table = Table::default();
            for (record, _) in copy {
                let used = last.get(&record.name).copied().unwrap_or(0);
                table.by_hash.insert(record.hash, record.name.clone());
                table
                    .records
                    .insert(record.name.clone(), (record, AtomicU64::new(used)));
            }
        }
        self.0.changed.send_modify(|g| *g += 1);
    }

    /// A principal's start-up token (see [`primary_name`]).
    pub fn primary(&self, principal: &Principal) -> Option<TokenRecord> {
        self.get(&primary_name(principal))
    }

    /// The token of this name.
    pub fn get(&self, name: &str) -> Option<TokenRecord> {
        self.read().records.get(name).map(|(r, _)| r.clone())
    }

    /// Whether a token with this secret's hash works at `now`, for `principal`.
    pub fn grants(&self, hash: &SecretHash, principal: &Principal, now: u64) -> bool {
        let table = self.read();
        table
            .by_hash
            .get(hash)
            .and_then(|n| table.records.get(n))
            .is_some_and(|(r, _)| r.principal == *principal && r.inactive(now).is_none())
    }

    /// Every token by name, with when a call last presented it here (0: not since start).
    pub fn records(&self) -> Vec<(TokenRecord, u64)> {
        self.read()
            .records
            .values()
            .map(|(r, used)| (r.clone(), used.load(Ordering::Relaxed)))
            .collect()
    }

    /// Who presents `secret` at `now`, or why nobody: the call is then UNAUTHENTICATED.
    pub fn lookup(&self, secret: &str, now: u64) -> Result<Credential, String> {
        let hash = hash_secret(secret);
        let table = self.read();
        let (record, used) = table
            .by_hash
            .get(&hash)
            .and_then(|n| table.records.get(n))
            .ok_or_else(|| "unknown token".to_string())?;
        if let Some(why) = record.inactive(now) {
            return Err(why);
        }
        used.store(now, Ordering::Relaxed);
        Ok(Credential {
            name: record.name.clone(),
            principal: record.principal.clone(),
            hash,
            certificate: false,
        })
    }

    /// Completes, with the reason, when `credential` stops working: revoked, expired, or
    /// replaced by another secret under its name. Open streams end then.
    pub fn closed(
        &self,
        credential: &Credential,
    ) -> impl std::future::Future<Output = String> + Send + 'static {
        let tokens = self.clone();
        let credential = credential.clone();
        let mut changed = self.0.changed.subscribe();
        async move {
            if credential.certificate {
                return std::future::pending().await;
            }
            loop {
                let expires = {
                    let table = tokens.read();
                    let Some((record, _)) = table.records.get(&credential.name) else {
                        return format!("token {} was removed", credential.name);
                    };
                    if record.hash != credential.hash {
                        return format!("token {} was issued again", credential.name);
                    }
                    if let Some(why) = record.inactive(crate::writer::wall_ms()) {
                        return why;
                    }
                    record.expires_ms
                };
                let until_expiry = async {
                    match expires {
                        Some(at) => {
                            let left = at.saturating_sub(crate::writer::wall_ms());
                            tokio::time::sleep(std::time::Duration::from_millis(left)).await
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = changed.changed() => {
                        if changed.is_err() {
                            // The table is gone with the server: nothing to close for.
                            return std::future::pending().await;
                        }
                    }
                    () = until_expiry => {}
                }
            }
        }
    }

    /// The interceptor: UNAUTHENTICATED without a working bearer token or an agent's client
    /// certificate; PERMISSION_DENIED when a token and a certificate name different callers.
    pub fn authenticate(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let certified = match req.peer_certs() {
            Some(chain) => match chain.first() {
                Some(leaf) => pool_of_certificate(leaf).map_err(Status::unauthenticated)?,
                None => None,
            },
            None => None,
        };
        let header = req.metadata().get("authorization");
        let credential = match (header, certified) {
            (None, Some(pool)) => Credential {
                name: format!("certificate of pool {pool}"),
                principal: Principal::Agent(pool),
                hash: [0; 32],
                certificate: true,
            },
            (None, None) => {
                return Err(Status::unauthenticated(
                    "missing authorization metadata (Bearer token)",
                ));
            }
            (Some(header), certified) => {
                let token = header
                    .to_str()
                    .ok()
                    .and_then(|h| h.strip_prefix("Bearer "))
                    .ok_or_else(|| {
                        Status::unauthenticated("authorization must be \"Bearer <token>\"")
                    })?;
                let credential = self
                    .lookup(token.trim(), crate::writer::wall_ms())
                    .map_err(Status::unauthenticated)?;
                if let Some(pool) = certified
                    && credential.principal != Principal::Agent(pool.clone())
                {
                    return Err(Status::permission_denied(format!(
                        "the client certificate is the agent of pool {pool}'s, but token {} \
                         is not that agent's",
                        credential.name
                    )));
                }
                credential
            }
        };
        req.extensions_mut().insert(credential.principal.clone());
        req.extensions_mut().insert(credential);
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

/// The credential the interceptor found.
pub fn credential<T>(req: &Request<T>) -> Result<Credential, Status> {
    req.extensions()
        .get::<Credential>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credential"))
}

/// The principal the interceptor found.
pub fn principal<T>(req: &Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credential"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, secret: &str, expires_ms: Option<u64>) -> TokenRecord {
        TokenRecord {
            name: name.into(),
            principal: Principal::Tenant("acme".into()),
            hash: hash_secret(secret),
            created_ms: 10,
            expires_ms,
            revoked_ms: None,
        }
    }

    #[test]
    fn a_token_works_until_revoked_expired_or_issued_again() {
        let tokens = Tokens::default();
        tokens.issue(record("ci", "s1", Some(1_000)));
        let who = tokens.lookup("s1", 500).unwrap();
        assert_eq!(
            (who.name.as_str(), who.principal.key()),
            ("ci", "acme".into())
        );
        assert_eq!(tokens.records()[0].1, 500, "the last use is kept");
        assert_eq!(tokens.lookup("s1", 1_000).unwrap_err(), "token ci expired");
        assert_eq!(tokens.lookup("nope", 500).unwrap_err(), "unknown token");
        // Issued again under its name: the old secret stops working.
        tokens.issue(record("ci", "s2", None));
        assert_eq!(tokens.lookup("s1", 500).unwrap_err(), "unknown token");
        assert!(tokens.lookup("s2", 5_000).is_ok());
        assert!(tokens.revoke("ci", 6_000));
        assert!(!tokens.revoke("other", 6_000));
        assert_eq!(
            tokens.lookup("s2", 7_000).unwrap_err(),
            "token ci was revoked"
        );
        // A second revocation keeps the first time.
        tokens.revoke("ci", 9_000);
        assert_eq!(tokens.get("ci").unwrap().revoked_ms, Some(6_000));
    }

    #[test]
    fn a_certificate_names_its_pool_in_one_uri() {
        let der = |sans: Vec<rcgen::SanType>| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = sans;
            params.self_signed(&key).unwrap().der().to_vec()
        };
        let uri = |s: &str| rcgen::SanType::URI(s.try_into().unwrap());
        let dns = rcgen::SanType::DnsName("agent.example".try_into().unwrap());
        let one = der(vec![dns.clone(), uri("suanli:pool:gpu-east")]);
        assert_eq!(
            pool_of_certificate(&one).unwrap().as_deref(),
            Some("gpu-east")
        );
        assert_eq!(pool_of_certificate(&der(vec![dns])).unwrap(), None);
        assert_eq!(
            pool_of_certificate(&der(vec![uri("https://agent.example")])).unwrap(),
            None
        );
        let two = der(vec![uri("suanli:pool:a"), uri("suanli:pool:b")]);
        assert!(
            pool_of_certificate(&two)
                .unwrap_err()
                .contains("several pools")
        );
        assert!(
            pool_of_certificate(b"not a certificate")
                .unwrap_err()
                .contains("cannot be read")
        );
    }

    #[test]
    fn token_names_are_checked() {
        for ok in ["a", "ci-bot", "team.ml_2", &"x".repeat(64)] {
            assert!(check_token_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "tenant:acme", "a b", &"x".repeat(65)] {
            assert!(check_token_name(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_stream_learns_its_token_was_revoked() {
        let tokens = Tokens::default();
        tokens.issue(record("ci", "s1", None));
        let who = tokens.lookup("s1", 0).unwrap();
        let closed = tokens.closed(&who);
        tokens.revoke("ci", 5);
        assert_eq!(closed.await, "token ci was revoked");
        // A copy rebuilt from the store (here, without the revocation) is taken over whole.
        let fresh = Tokens::default();
        fresh.issue(record("ci", "s1", None));
        tokens.assign(&fresh);
        assert!(tokens.lookup("s1", 10).is_ok());
    }
}
