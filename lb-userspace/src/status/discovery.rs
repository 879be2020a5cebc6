//! What discovery sources publish (`discovery`: a file, DNS, etcd) and what the writer keeps
//! about each: the whole set of instances a source read, or why it could not read one; the
//! entries it skipped and why; a suspect shrink it holds. Value types only: the sources import
//! these, never the writer.

use std::{collections::BTreeMap, time::Instant};

use serde::{Deserialize, Serialize};

use super::BackendStatus;
use crate::model::{Backend, BackendRef, Service, discovery_settings::DiscoverySettings};

/// One instance as a source read it, before it is checked (`reconcile::discovered`): the
/// address is text and the port may be 0, so a bad entry is skipped with its reason while
/// the rest of the set applies.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub id: String,
    pub address: String,
    /// Absent: the service's port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Absent: the default weight (100).
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// An entry that is no instance at all (a field of the wrong type, an unknown key): where it
/// is in the source, and why.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Malformed {
    pub at: String,
    pub why: String,
}

/// A source's read: every entry, each an instance or malformed.
pub type Entries = Vec<Result<Entry, Malformed>>;

/// Why a source could not read a set (the last known set stays). A label of
/// `lb_discovery_errors_total`, with the skip reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorReason {
    /// The file cannot be read (missing, not permitted, too large).
    Unreadable,
    /// The file is not a JSON or TOML list of instances.
    Parse,
    /// The resolver answered with an error (SERVFAIL, REFUSED, no connection).
    Resolve,
    /// The resolver did not answer in time.
    Timeout,
    /// etcd cannot be reached or refused the read.
    Unavailable,
}

impl ErrorReason {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Unreadable => "unreadable",
            Self::Parse => "parse",
            Self::Resolve => "resolve",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceError {
    pub reason: ErrorReason,
    /// One line.
    pub message: String,
}

impl SourceError {
    pub fn new(reason: ErrorReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// One read of a source, for the writer. `settings` are those the source ran with: a read
/// made under settings the service no longer has is stale and dropped.
#[derive(Clone, Debug)]
pub struct Report {
    pub service: String,
    pub settings: DiscoverySettings,
    pub outcome: Result<Entries, SourceError>,
}

/// Why an entry was skipped (the rest of its set applies). A label of
/// `lb_discovery_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SkipReason {
    /// Not an instance at all (a field of the wrong type, an unknown key).
    Malformed,
    /// The address is no IP address.
    BadAddress,
    /// Port 0.
    BadPort,
    /// An id listed before in the same set (the first is kept).
    DuplicateId,
    /// Refused as a backend of the service (its id, weight, address family, region, an address
    /// and port another entry has...).
    Invalid,
}

impl SkipReason {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadAddress => "bad-address",
            Self::BadPort => "bad-port",
            Self::DuplicateId => "duplicate-id",
            Self::Invalid => "invalid",
        }
    }
}

/// An entry left out of a set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Its id, or where it is when it has none.
    pub entry: String,
    pub reason: SkipReason,
    pub why: String,
}

/// A set held because it has fewer than half the live backends: it applies if it persists.
#[derive(Clone, Debug, PartialEq)]
pub struct Held {
    pub set: Vec<Backend>,
    /// How many backends were live when it was first held.
    pub live: usize,
    pub since: Instant,
    pub until: Instant,
}

/// What the writer keeps about one service's source.
#[derive(Clone, Debug)]
pub struct SourceState {
    pub settings: DiscoverySettings,
    /// A hash of the last read, to tell a new set from the same one read again.
    pub last: Option<u64>,
    /// Sets that differed from the one before.
    pub updates: u64,
    pub updated_at: Option<Instant>,
    /// Why the last read failed (cleared by the next good one).
    pub error: Option<SourceError>,
    pub skipped: Vec<Skipped>,
    pub held: Option<Held>,
}

/// What tells one read from another (`SourceState::last`).
pub fn digest(entries: &Entries) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    entries.hash(&mut h);
    h.finish()
}

impl SourceState {
    pub fn new(settings: DiscoverySettings) -> Self {
        Self {
            settings,
            last: None,
            updates: 0,
            updated_at: None,
            error: None,
            skipped: Vec::new(),
            held: None,
        }
    }
}

/// The backends of `service` that take part in its source's set: all but those draining after
/// they left it.
pub fn live(service: &Service, status: &BTreeMap<BackendRef, BackendStatus>) -> usize {
    service
        .backends
        .iter()
        .filter(|b| {
            status
                .get(&BackendRef::new(&service.name, &b.id))
                .is_none_or(|st| st.departing.is_none())
        })
        .count()
}
