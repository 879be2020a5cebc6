//! `[cluster]`: the nodes of one tier share one desired state in etcd, under `/lb/<name>/`.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// etcd's client URLs (`http://host:2379`).
    pub etcd: Vec<String>,
    /// The cluster's name: its keys live under `/lb/<name>/`.
    pub name: String,
    /// This node's name, unique in the cluster.
    pub node: String,
}

impl ClusterSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.etcd.is_empty() {
            return Err("cluster.etcd names no endpoint".into());
        }
        for e in &self.etcd {
            let rest = e.strip_prefix("http://").or_else(|| e.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                return Err(format!("cluster.etcd {e:?} is not an http:// or https:// URL"));
            }
        }
        super::validate_name("cluster.name", &self.name, 64).map_err(|e| e.to_string())?;
        super::validate_name("cluster.node", &self.node, 64).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Every key of the cluster starts with this.
    pub fn prefix(&self) -> String {
        format!("/lb/{}/", self.name)
    }
}
