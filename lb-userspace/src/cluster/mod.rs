//! One desired state for a tier of nodes, in etcd (`[cluster]`). Each service is a key
//! `/lb/<name>/services/<service>` holding its spec as JSON. Every node watches the prefix and
//! hands the whole set to its writer as one change, so every node builds the same tables
//! from the same revision; a node never applies a revision older than the one it has. Changes
//! made through any node's API are written back with revision checks (`store`), so two changes
//! made at once on two nodes cannot overwrite each other: the later one is refused. Each node
//! registers `/lb/<name>/nodes/<node>` under a lease, with the revision it applied and its
//! tables' digests, so `lb cluster status` shows whether the tier agrees.
//!
//! While etcd is unreachable the node forwards and checks with what it has, refuses changes
//! with one line, and converges again when etcd returns.

pub mod connection;
pub mod keys;
pub mod store;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use log::{info, warn};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    model::{Service, cluster_settings::ClusterSettings},
    reconcile::{Change, Command},
    snapshot::Snapshot,
    status::cluster::{ClusterStatus, NodeEntry, View},
};
use keys::Part;
use store::Store;

/// How long a node's key outlives its daemon.
const LEASE_TTL: i64 = 5;
/// How often the lease is kept alive.
const TICK: Duration = Duration::from_secs(1);

/// The cluster as the API and the sync loop share it.
pub struct Cluster {
    pub settings: ClusterSettings,
    pub store: Store,
    status: Arc<Mutex<ClusterStatus>>,
    applied: watch::Sender<i64>,
}

impl Cluster {
    pub fn new(settings: ClusterSettings, status: Arc<Mutex<ClusterStatus>>) -> Self {
        {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            s.enabled = true;
            s.name = settings.name.clone();
            s.node = settings.node.clone();
        }
        Self {
            store: Store::new(settings.clone()),
            settings,
            status,
            applied: watch::channel(0).0,
        }
    }

    pub fn status(&self) -> ClusterStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, f: impl FnOnce(&mut ClusterStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Waits (bounded) until this node applied `revision`: an API change answers once its own
    /// node runs it.
    pub async fn wait_applied(&self, revision: i64, bound: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(bound, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Hands the cluster's services at `revision` to the writer; records the revision when
    /// the writer took them.
    async fn apply(&self, writer: &mpsc::Sender<Command>, services: Vec<Service>, revision: i64) {
        let received = std::time::Instant::now();
        let applied = *self.applied.borrow();
        if revision <= applied {
            if revision < applied {
                warn!("cluster: etcd's revision {revision} is older than the applied {applied}: not applied");
            }
            return;
        }
        let (reply, answer) = oneshot::channel();
        let change = Box::new(Change::Replace(services));
        if writer.send(Command::Change { change, reply }).await.is_err() {
            return;
        }
        match answer.await {
            Ok(Ok(warnings)) => {
                for w in warnings {
                    warn!("cluster: revision {revision}: {w}");
                }
                self.applied.send_replace(revision);
                let took = received.elapsed().as_secs_f64() * 1e3;
                self.set(|s| {
                    s.applied_revision = revision;
                    s.last_apply_ms = Some(took);
                });
            }
            Ok(Err(e)) => {
                warn!("cluster: revision {revision} refused, the running state stays: {e}");
                self.set(|s| s.error = Some(format!("revision {revision} refused: {e}")));
            }
            Err(_) => {}
        }
    }

    /// The sync loop: register, load, watch; again from the start after any error.
    pub async fn run(
        self: Arc<Self>,
        writer: mpsc::Sender<Command>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        owner: String,
    ) {
        let mut backoff = Duration::from_millis(250);
        loop {
            match self.session(&writer, snapshot.clone(), &owner).await {
                Ok(()) => return,
                Err(e) => {
                    let was = self.status().error;
                    if was.as_deref() != Some(e.as_str()) {
                        warn!("cluster: {e}");
                    }
                    self.set(|s| {
                        s.connected = false;
                        s.error = Some(e);
                    });
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            if writer.is_closed() {
                return;
            }
        }
    }

    /// One connection's life: `Ok` when the daemon stops.
    async fn session(
        &self,
        writer: &mpsc::Sender<Command>,
        mut snapshot: watch::Receiver<Arc<Snapshot>>,
        owner: &str,
    ) -> Result<(), String> {
        let lease = self.store.register(owner, LEASE_TTL).await?;
        let (mut tree, revision) = self.store.load().await?;
        self.set(|s| {
            s.connected = true;
            s.error = None;
            s.invalid_entries += tree.invalid();
        });
        info!(
            "cluster {}: node {} at revision {revision}",
            self.settings.name, self.settings.node
        );
        let mut view = None;
        self.send_view(writer, &tree, &mut view).await;
        if writer
            .send(Command::Externals(tree.scores.by_backend.clone()))
            .await
            .is_err()
        {
            return Ok(());
        }
        self.apply(writer, tree.services.services(), revision).await;
        if *self.applied.borrow() >= revision {
            self.set(|s| s.caught_up = true);
        }
        let mut watch = self.store.watch(revision + 1).await?;
        let (mut keeper, _answers) = self.store.keep_alive(lease).await?;
        let mut tick = tokio::time::interval(TICK);
        let mut published: Option<NodeEntry> = None;
        loop {
            // One borrow, let go at once: a second borrow while the writer waits to publish
            // would deadlock both (the watch's lock favours the writer).
            let snap = snapshot.borrow().clone();
            let overruled = overruled(&snap);
            let entries = tree.nodes.entries();
            self.set(|s| {
                s.nodes = entries;
                s.overruled = overruled;
            });
            let entry = NodeEntry {
                node: self.settings.node.clone(),
                owner: owner.to_string(),
                applied_revision: *self.applied.borrow(),
                digests: digests(&snap),
                votes: snap.votes.clone(),
            };
            if published.as_ref() != Some(&entry) {
                self.store.publish(&entry, lease).await?;
                published = Some(entry);
            }
            tokio::select! {
                event = watch.message() => {
                    let resp = watched(event)?;
                    for (rev, events) in keys::by_revision(resp.events()) {
                        let invalid = tree.invalid();
                        let parts: Vec<Part> = events.iter().map(|e| tree.apply(e)).collect();
                        if tree.invalid() > invalid {
                            self.set(|s| s.invalid_entries += tree.invalid() - invalid);
                        }
                        if parts.contains(&Part::Scores) {
                            let scores = tree.scores.by_backend.clone();
                            if writer.send(Command::Externals(scores)).await.is_err() {
                                return Ok(());
                            }
                        }
                        if parts.contains(&Part::Services) {
                            self.apply(writer, tree.services.services(), rev).await;
                        }
                        if parts.contains(&Part::Nodes) {
                            self.send_view(writer, &tree, &mut view).await;
                        }
                    }
                }
                r = snapshot.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                }
                _ = tick.tick() => {
                    keeper.keep_alive().await.map_err(|e| format!("lease keep-alive: {e}"))?;
                }
            }
            if writer.is_closed() {
                return Ok(());
            }
        }
    }

    /// Hands the writer the live nodes' votes when they changed.
    async fn send_view(&self, writer: &mpsc::Sender<Command>, tree: &keys::Tree, last: &mut Option<View>) {
        let now = View::of(&tree.nodes.entries());
        if last.as_ref() != Some(&now) && writer.send(Command::View(now.clone())).await.is_ok() {
            *last = Some(now);
        }
    }
}

/// A watch's next answer, or why the watch ended.
fn watched(
    event: std::result::Result<Option<etcd_client::WatchResponse>, etcd_client::Error>,
) -> Result<etcd_client::WatchResponse, String> {
    let Some(resp) = event.map_err(|e| format!("watch: {e}"))? else {
        return Err("etcd closed the watch".into());
    };
    if resp.canceled() {
        return Err(format!(
            "etcd cancelled the watch (compacted at {})",
            resp.compact_revision()
        ));
    }
    Ok(resp)
}

/// The backends whose weight the cluster's view sets other than this node's own vote.
fn overruled(snap: &Snapshot) -> BTreeMap<String, (u32, u32)> {
    let mut out = BTreeMap::new();
    for (service, own) in &snap.votes {
        let Some(agreed) = snap.weights.get(service) else {
            continue;
        };
        for (id, vote) in own {
            if let Some(e) = agreed.backends.get(id)
                && e.weight != *vote
            {
                out.insert(format!("{service}/{id}"), (*vote, e.weight));
            }
        }
    }
    out
}

/// Each service's table digest: its strategy, size, and members (id and effective weight) in
/// order, which decide its table whole; slots, which differ between nodes, are left out.
pub fn digests(snap: &Snapshot) -> BTreeMap<String, String> {
    use std::hash::Hasher;
    snap.assignments
        .services
        .iter()
        .map(|(name, slot)| {
            let mut h = fnv::FnvHasher::default();
            if let Some(input) = &slot.built {
                h.write(input.strategy.name().as_bytes());
                h.write_u32(input.size);
                for (id, weight, _slot) in &input.members {
                    h.write(id.as_bytes());
                    h.write_u8(0);
                    h.write_u32(*weight);
                }
                for cap in &input.caps {
                    h.write_u32(*cap);
                }
            }
            (name.clone(), format!("{:016x}", h.finish()))
        })
        .collect()
}
