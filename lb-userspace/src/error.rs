//! Typed errors. Every message is one line that says what is wrong.

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    /// The config file is unusable.
    #[error("invalid config: {0}")]
    Config(String),
    /// A request or argument is invalid.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    /// The data plane (BPF maps, programs, links) failed.
    #[error("data plane: {0}")]
    DataPlane(String),
    #[error(transparent)]
    Resolve(#[from] crate::neigh::ResolveError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn config(msg: impl Into<String>) -> Self {
        Self::Config(msg.into())
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }
    pub fn dataplane(msg: impl std::fmt::Display) -> Self {
        Self::DataPlane(msg.to_string())
    }
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
