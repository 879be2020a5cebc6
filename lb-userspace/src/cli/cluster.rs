//! `lb cluster`: the tier's shared state in etcd.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::Value;

use super::shared::read_file;
use crate::{api::Request, config::Config};

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// The nodes (each while its lease lives), the revision each applied, and each service's
    /// table digest per node: equal digests, equal tables.
    Status,
    /// Check a config file whole and make its services the cluster's state.
    Push { file: PathBuf },
}

pub fn request(cmd: &ClusterCmd) -> anyhow::Result<Request> {
    Ok(match cmd {
        ClusterCmd::Status => Request::Cluster,
        ClusterCmd::Push { file } => {
            let text = read_file(file)?;
            // Checked here first, so a bad file says where without a daemon.
            Config::parse_pushed(&text)?;
            Request::ClusterPush { text }
        }
    })
}

pub fn print(cmd: &ClusterCmd, data: &Value) {
    match cmd {
        ClusterCmd::Status => print_status(data),
        ClusterCmd::Push { .. } => super::shared::print_plain(data),
    }
}

fn print_status(data: &Value) {
    println!(
        "cluster {} node {}: etcd {}, applied revision {}{}",
        data["name"].as_str().unwrap_or_default(),
        data["node"].as_str().unwrap_or_default(),
        // Not "unreachable": etcd may answer and refuse this node (a wrong password or CA).
        if data["connected"] == true {
            "connected"
        } else {
            "not connected"
        },
        data["applied_revision"],
        data["error"]
            .as_str()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    for n in data["nodes"].as_array().into_iter().flatten() {
        let digests: Vec<String> = n["digests"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(s, d)| format!("{s}={}", d.as_str().unwrap_or_default()))
            .collect();
        println!(
            "  {:<16} revision {:<8} {}",
            n["node"].as_str().unwrap_or_default(),
            n["applied_revision"],
            digests.join(" ")
        );
    }
    // This node's checks against the cluster's view (docs/cluster.md, health across nodes).
    for (backend, pair) in data["overruled"].as_object().into_iter().flatten() {
        println!(
            "  overruled: {backend}: this node's checks say weight {}, the cluster's majority {}",
            pair[0], pair[1]
        );
    }
}
