//! What the cluster sync publishes: etcd reachable or not, the revision this node applied, the
//! entries it refused, and the nodes of the cluster as their keys say.

use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClusterStatus {
    pub enabled: bool,
    pub name: String,
    pub node: String,
    pub connected: bool,
    /// Why etcd is not reachable, or the last refusal, as one line.
    pub error: Option<String>,
    /// The etcd revision of the services this node applied last (0: none yet).
    pub applied_revision: i64,
    /// The node applied the cluster's state since it started (it announces only then).
    pub caught_up: bool,
    /// Entries under `services/` that were not valid and were left out.
    pub invalid_entries: u64,
    pub nodes: Vec<NodeEntry>,
}

/// One node as it registered (its key lives while its lease does).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct NodeEntry {
    pub node: String,
    /// The host and instance that hold the name (two daemons may not).
    pub owner: String,
    pub applied_revision: i64,
    /// Each service's table digest: equal digests, equal tables.
    pub digests: std::collections::BTreeMap<String, String>,
}
