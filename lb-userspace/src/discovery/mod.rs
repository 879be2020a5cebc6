//! Registries as sources (`[service.discovery]`): producers that read a service's instances
//! from a file (`file`), DNS (`dns`) or etcd (`etcd`) and hand each whole read to the writer
//! (`Command::Discovered`), which checks, guards and applies it (`reconcile::discovered`).
//! Sources import only the model, the status types and the inbox: never the writer. A source
//! that fails says why and the writer keeps the last set.
//!
//! `run` keeps one task per service with a source, started, replaced or stopped as the
//! declared services change.

pub mod dns;
pub mod etcd;
pub mod file;

use std::{collections::BTreeMap, sync::Arc};

use tokio::{
    sync::{mpsc, watch},
    task::{AbortHandle, JoinSet},
};

use crate::{
    cluster::connection::Security,
    model::{
        Service,
        cluster_settings::ClusterSettings,
        discovery_settings::{DiscoverySettings, SourceKind},
    },
    reconcile::inbox::Command,
    status::discovery::{Entries, Report, SourceError},
};

/// How a source hands its reads to the writer.
#[derive(Clone)]
pub struct Reporter {
    pub service: String,
    pub settings: DiscoverySettings,
    writer: mpsc::Sender<Command>,
}

impl Reporter {
    /// Hands one read to the writer; false once the writer is gone (the source stops).
    pub async fn send(&self, outcome: Result<Entries, SourceError>) -> bool {
        let report = Report {
            service: self.service.clone(),
            settings: self.settings.clone(),
            outcome,
        };
        self.writer.send(Command::Discovered(report)).await.is_ok()
    }
}

/// What a source needs to know of its service besides its settings (a change restarts it).
#[derive(Clone, Debug, PartialEq)]
struct Wanted {
    settings: DiscoverySettings,
    /// A hostname's records are A for an IPv4 VIP, AAAA for an IPv6 one.
    v6: bool,
}

/// Keeps one source task per service with a source, until the services' channel closes.
/// The tasks live in a set owned here: when this task stops (or is aborted), they stop too,
/// and with them their senders to the writer. `cluster`: `[cluster]`, whose etcd an etcd
/// source reads unless it names its own.
pub async fn run(
    mut services: watch::Receiver<Arc<Vec<Service>>>,
    writer: mpsc::Sender<Command>,
    cluster: Option<ClusterSettings>,
) {
    let mut tasks = JoinSet::new();
    let mut running: BTreeMap<String, (Wanted, AbortHandle)> = BTreeMap::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let wanted: BTreeMap<String, Wanted> = services
            .borrow_and_update()
            .iter()
            .filter_map(|s| {
                let settings = s.discovery.as_deref()?.clone();
                Some((
                    s.name.clone(),
                    Wanted {
                        settings,
                        v6: s.vip.is_ipv6(),
                    },
                ))
            })
            .collect();
        running.retain(|name, (w, task)| {
            let keep = wanted.get(name) == Some(w);
            if !keep {
                task.abort();
            }
            keep
        });
        for (name, w) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            let reporter = Reporter {
                service: name.clone(),
                settings: w.settings.clone(),
                writer: writer.clone(),
            };
            let task = match w.settings.kind {
                SourceKind::File => tasks.spawn(file::run(reporter)),
                SourceKind::Dns => tasks.spawn(dns::run(reporter, w.v6)),
                SourceKind::Etcd => {
                    // A source's own etcd is plaintext without a user; [cluster]'s comes with
                    // its TLS and user.
                    let own = w.settings.etcd.clone().zip(w.settings.cluster.clone());
                    let target = match own {
                        Some((endpoints, name)) => Some((endpoints, Security::default(), name)),
                        None => cluster
                            .as_ref()
                            .map(|c| (c.etcd.clone(), Security::of(c), c.name.clone())),
                    };
                    match target {
                        Some((endpoints, security, name)) => {
                            tasks.spawn(etcd::run(reporter, endpoints, security, name))
                        }
                        // Refused by the config's validation (`validate_against`).
                        None => continue,
                    }
                }
            };
            running.insert(name, (w, task));
        }
        if services.changed().await.is_err() {
            break;
        }
    }
}
