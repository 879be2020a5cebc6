//! What the cluster sync publishes: etcd reachable or not, the revision this node applied, the
//! entries it refused, and the nodes of the cluster as their keys say; and the health the
//! nodes agree on.
//!
//! **Health across nodes.** Every node checks every backend and publishes its verdicts (its
//! votes: each backend's weight as its own checks and signals make it, 0 for no new flows)
//! under its lease. Tables are built from the cluster's view: a backend's weight is the upper
//! median of the live nodes' votes, so it takes no new flows only when more than half of the
//! nodes that vote on it say so, and a node that alone sees a backend down (its own path to it
//! broken) keeps the tables the others have. Every node reads the same votes from etcd, so
//! every node builds the same tables, and a flow the router moves between nodes keeps its
//! backend.

use std::collections::BTreeMap;

use serde::Serialize;

/// One node's verdicts: each service's backends' weights as the node's own checks, agents and
/// scores make them (0: no new flows).
pub type Votes = BTreeMap<String, BTreeMap<String, u32>>;

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
    /// From the watch's answer to the writer's: how long the last revision took to reach
    /// this node's tables (decode, plan, build, swap), in ms.
    pub last_apply_ms: Option<f64>,
    /// Entries under `services/` that were not valid and were left out.
    pub invalid_entries: u64,
    pub nodes: Vec<NodeEntry>,
    /// Backends (`service/id`) whose weight the cluster's view sets other than this node's own
    /// checks would: this node's vote, and the weight the cluster agreed on.
    pub overruled: BTreeMap<String, (u32, u32)>,
}

/// One node as it registered (its key lives while its lease does).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct NodeEntry {
    pub node: String,
    /// The host and instance that hold the name (two daemons may not).
    pub owner: String,
    pub applied_revision: i64,
    /// Each service's table digest: equal digests, equal tables.
    pub digests: BTreeMap<String, String>,
    /// Its health verdicts (absent from a node of a build before agreement: it does not vote).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub votes: Votes,
}

/// The live nodes' votes, by node: what every node reads from the same etcd revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    pub votes: BTreeMap<String, Votes>,
}

impl View {
    pub fn of(nodes: &[NodeEntry]) -> Self {
        Self {
            votes: nodes
                .iter()
                .filter(|n| !n.votes.is_empty())
                .map(|n| (n.node.clone(), n.votes.clone()))
                .collect(),
        }
    }

    /// The weight the cluster agrees on for one backend: the upper median of the votes of the
    /// nodes that vote on it (0 only when more than half of them vote 0); `None` when no node
    /// does (a backend just added: each node's own weight until the votes arrive).
    pub fn agreed(&self, service: &str, id: &str) -> Option<u32> {
        let mut v: Vec<u32> = self
            .votes
            .values()
            .filter_map(|n| n.get(service)?.get(id).copied())
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        Some(v[v.len() / 2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, votes: &[(&str, u32)]) -> NodeEntry {
        NodeEntry {
            node: name.into(),
            owner: "m/lb".into(),
            applied_revision: 1,
            digests: BTreeMap::new(),
            votes: BTreeMap::from([(
                "web".to_string(),
                votes.iter().map(|(id, w)| (id.to_string(), *w)).collect(),
            )]),
        }
    }

    #[test]
    fn a_backend_is_out_only_when_a_majority_of_voters_say_so() {
        let one_down = View::of(&[
            node("n1", &[("b1", 0), ("b2", 10)]),
            node("n2", &[("b1", 10), ("b2", 10)]),
            node("n3", &[("b1", 10), ("b2", 10)]),
        ]);
        assert_eq!(one_down.agreed("web", "b1"), Some(10));
        let two_down = View::of(&[
            node("n1", &[("b1", 0)]),
            node("n2", &[("b1", 0)]),
            node("n3", &[("b1", 10)]),
        ]);
        assert_eq!(two_down.agreed("web", "b1"), Some(0));
        // Two nodes: one alone cannot take a backend out.
        let split = View::of(&[node("n1", &[("b1", 0)]), node("n2", &[("b1", 10)])]);
        assert_eq!(split.agreed("web", "b1"), Some(10));
        // Ramps and scores: the median weight, the same whichever node computes it.
        let ramp = View::of(&[
            node("n1", &[("b1", 3)]),
            node("n2", &[("b1", 5)]),
            node("n3", &[("b1", 8)]),
        ]);
        assert_eq!(ramp.agreed("web", "b1"), Some(5));
        // Nobody voted on it yet, or on that service.
        assert_eq!(ramp.agreed("web", "b9"), None);
        assert_eq!(ramp.agreed("api", "b1"), None);
        // A node that publishes no votes (an older build) is no voter.
        let mut quiet = node("n4", &[]);
        quiet.votes.clear();
        let with_quiet = View::of(&[node("n1", &[("b1", 0)]), node("n2", &[("b1", 0)]), quiet]);
        assert_eq!(with_quiet.votes.len(), 2);
        assert_eq!(with_quiet.agreed("web", "b1"), Some(0));
    }
}
