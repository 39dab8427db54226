//! The credentials file: the bearer tokens of the operator, the tenants and the pool agents.
//!
//! A broker started with no configuration makes development credentials, prints them and writes
//! them to `credentials.toml` in its data folder; the `suanli` client commands read that file
//! when no token is given, so a newcomer can use a broker started in the same folder at once.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Name of the credentials file in the data folder.
pub const FILE_NAME: &str = "credentials.toml";

/// Every token a broker accepts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// The operator's token.
    pub operator: String,
    /// Tenants' tokens.
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantToken>,
    /// Pool agents' tokens.
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentToken>,
}

/// A tenant's token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantToken {
    /// Tenant name.
    pub name: String,
    /// Bearer token.
    pub token: String,
}

/// A pool agent's token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentToken {
    /// Pool id.
    pub pool: String,
    /// Bearer token.
    pub token: String,
}

/// Errors reading or writing a credentials file.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file could not be read or written.
    #[error("credentials file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("credentials file {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl Credentials {
    /// Reads a credentials file.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Io {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| CredentialsError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Writes the file, readable by its owner only where the platform allows.
    pub fn save(&self, path: &Path) -> Result<(), CredentialsError> {
        let io = |source| CredentialsError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = format!(
            "# suanli development credentials: bearer tokens for the `authorization` metadata.\n\
             # The `suanli` client commands read this file when no --token is given.\n{}",
            toml::to_string(self).expect("credentials serialise")
        );
        std::fs::write(path, text).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        Ok(())
    }

    /// The token of a tenant.
    pub fn tenant(&self, name: &str) -> Option<&str> {
        self.tenants
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.token.as_str())
    }

    /// The token of a pool's agent.
    pub fn agent(&self, pool: &str) -> Option<&str> {
        self.agents
            .iter()
            .find(|a| a.pool == pool)
            .map(|a| a.token.as_str())
    }
}
