//! The cluster's etcd, through the etcd-client crate: the services under the prefix, changes
//! written with revision checks, the node keys under leases, the watch.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, LeaseKeeper, PutOptions, Txn, TxnOp, WatchOptions, WatchStream,
};

use super::keys::{ScoreValue, Services, Tree, encode};
use crate::{
    config::DaemonConfig,
    error::{Error, Result},
    model::{Service, cluster_settings::ClusterSettings},
    reconcile::{
        Change,
        change::change_state,
        warnings::{Touched, risky},
    },
    status::cluster::NodeEntry,
};

use super::connection::{Connection, Security};

pub struct Store {
    settings: ClusterSettings,
    etcd: Connection,
}

/// A change to the cluster's state, checked and ready to write (`Store::prepare`).
pub struct Prepared {
    /// None when the change changes nothing.
    txn: Option<Txn>,
    /// The revision the services were read at.
    pub read_at: i64,
    /// Every service as the change leaves them.
    pub after: Vec<Service>,
    risky: Vec<String>,
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::invalid(format!(
        "etcd unavailable ({e}): cluster changes are refused until it returns"
    ))
}

impl Store {
    pub fn new(settings: ClusterSettings) -> Self {
        Self {
            etcd: Connection::new(settings.etcd.clone(), Security::of(&settings)),
            settings,
        }
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}/{name}", self.settings.prefix())
    }

    fn dir(&self, kind: &str) -> String {
        format!("{}{kind}/", self.settings.prefix())
    }

    async fn call<T, F: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>>(
        &self,
        f: impl FnOnce(Client) -> F,
    ) -> std::result::Result<T, String> {
        self.etcd.call(f).await
    }

    /// Every service under the prefix, and the revision they are at.
    pub async fn services(&self) -> std::result::Result<(Services, i64), String> {
        let dir = self.dir("services");
        let resp = self
            .call(|mut c| async move { c.get(dir, Some(GetOptions::new().with_prefix())).await })
            .await?;
        let mut s = Services::default();
        for kv in resp.kvs() {
            s.insert(&String::from_utf8_lossy(kv.key()), kv.value(), kv.mod_revision());
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((s, revision))
    }

    /// Every key of the cluster, read at one revision.
    pub async fn load(&self) -> std::result::Result<(Tree, i64), String> {
        let prefix = self.settings.prefix();
        let p = prefix.clone();
        let resp = self
            .call(|mut c| async move { c.get(p, Some(GetOptions::new().with_prefix())).await })
            .await?;
        let mut tree = Tree::new(prefix);
        for kv in resp.kvs() {
            tree.put(kv.key(), kv.value(), kv.mod_revision());
        }
        Ok((tree, resp.header().map_or(0, |h| h.revision())))
    }

    /// Watches every key of the cluster from revision `from` on (one stream: every node sees
    /// services and votes change in the same order).
    pub async fn watch(&self, from: i64) -> std::result::Result<WatchStream, String> {
        let dir = self.settings.prefix();
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        self.call(|mut c| async move { c.watch(dir, Some(options)).await })
            .await
    }

    /// Takes this node's name under a lease: refused when a daemon of another host or
    /// instance holds it (its lease alive); the same owner restarting takes its key back.
    pub async fn register(&self, owner: &str, ttl: i64) -> std::result::Result<i64, String> {
        let key = self.key("nodes", &self.settings.node);
        let k = key.clone();
        let held = self.call(|mut c| async move { c.get(k, None).await }).await?;
        if let Some(kv) = held.kvs().first() {
            let other: Option<NodeEntry> = serde_json::from_slice(kv.value()).ok();
            let holder = other.map(|o| o.owner).unwrap_or_else(|| "something else".into());
            if holder != owner {
                return Err(format!(
                    "node name {:?} is registered by {holder}: refused (each node needs its own cluster.node)",
                    self.settings.node
                ));
            }
        }
        let lease = self
            .call(|mut c| async move { c.lease_grant(ttl, None).await })
            .await?
            .id();
        let entry = NodeEntry {
            node: self.settings.node.clone(),
            owner: owner.to_string(),
            applied_revision: 0,
            digests: BTreeMap::new(),
            votes: BTreeMap::new(),
        };
        self.publish(&entry, lease).await?;
        Ok(lease)
    }

    /// The lease's keeper and the stream of its answers (both held while the session lives).
    pub async fn keep_alive(
        &self,
        lease: i64,
    ) -> std::result::Result<(LeaseKeeper, etcd_client::LeaseKeepAliveStream), String> {
        self.call(|mut c| async move { c.lease_keep_alive(lease).await })
            .await
    }

    pub async fn publish(&self, entry: &NodeEntry, lease: i64) -> std::result::Result<(), String> {
        let key = self.key("nodes", &entry.node);
        let value = serde_json::to_vec(entry).expect("an entry serializes");
        self.call(|mut c| async move { c.put(key, value, Some(PutOptions::new().with_lease(lease))).await })
            .await
            .map(|_| ())
    }

    /// An API change made to the cluster's state: `prepare`, then `commit`.
    pub async fn change(&self, cfg: &DaemonConfig, change: Change) -> Result<(i64, Vec<String>)> {
        let prepared = self.prepare(cfg, change).await?;
        self.commit(prepared).await
    }

    /// The services read, changed and validated whole, and the transaction that writes what
    /// changed back only if no service changed since they were read: not the ones it writes
    /// (a change made meanwhile on another node would be lost), nor any other (two changes
    /// each valid alone, say two services on one VIP and port, may not be valid together).
    pub async fn prepare(&self, cfg: &DaemonConfig, change: Change) -> Result<Prepared> {
        let (current, read_at) = self.services().await.map_err(unavailable)?;
        let before: BTreeMap<String, (Service, i64)> = current
            .by_key
            .into_values()
            .map(|(s, rev)| (s.name.clone(), (s, rev)))
            .collect();
        let mut after: Vec<Service> = before.values().map(|(s, _)| s.clone()).collect();
        let mut status = BTreeMap::new();
        let touched = Touched::of(&change);
        change_state(cfg, &mut after, &mut status, change, Instant::now())?;
        let was: Vec<Service> = before.values().map(|(s, _)| s.clone()).collect();
        let risky = risky(&was, &after, &touched);
        // Nothing under services/ written after the read (a key made or changed since)...
        let mut when = vec![self.unchanged_since(read_at)];
        let mut ops = Vec::new();
        let kept: BTreeSet<&str> = after.iter().map(|s| s.name.as_str()).collect();
        // ... and each key written still as read (a key deleted since has none).
        for s in &after {
            let key = self.key("services", &s.name);
            match before.get(&s.name) {
                Some((old, _)) if old == s => {}
                Some((_, rev)) => {
                    when.push(Compare::mod_revision(key.clone(), CompareOp::Equal, *rev));
                    ops.push(TxnOp::put(key, encode(s), None));
                }
                None => {
                    when.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                    ops.push(TxnOp::put(key, encode(s), None));
                }
            }
        }
        for (name, (_, rev)) in &before {
            if !kept.contains(name.as_str()) {
                let key = self.key("services", name);
                when.push(Compare::mod_revision(key.clone(), CompareOp::Equal, *rev));
                ops.push(TxnOp::delete(key, None));
            }
        }
        // Nothing changes: the state read is the one to wait for.
        let txn = (!ops.is_empty()).then(|| Txn::new().when(when).and_then(ops));
        Ok(Prepared {
            txn,
            read_at,
            after,
            risky,
        })
    }

    /// Writes a prepared change: the revision that holds it, and its `risky` warnings; refused
    /// whole, nothing written, if the services changed since `prepare` read them.
    pub async fn commit(&self, prepared: Prepared) -> Result<(i64, Vec<String>)> {
        let Prepared {
            txn, read_at, risky, ..
        } = prepared;
        let Some(txn) = txn else {
            return Ok((read_at, risky));
        };
        let resp = self
            .call(|mut c| async move { c.txn(txn).await })
            .await
            .map_err(unavailable)?;
        if !resp.succeeded() {
            return Err(Error::Exists(
                "the cluster's state changed on another node while this change was made: nothing written, try again"
                    .into(),
            ));
        }
        Ok((resp.header().map_or(0, |h| h.revision()), risky))
    }

    /// An external health score, for every node (`lb backend health` in cluster mode): checked
    /// against the cluster's services as one node would check it, then written to
    /// `scores/<service>/<id>`, under a lease of its ttl when it has one (etcd deletes it then).
    pub async fn set_score(&self, cfg: &DaemonConfig, change: Change) -> Result<i64> {
        let Change::SetExternal {
            service,
            id,
            score,
            ttl,
        } = change
        else {
            return Err(Error::invalid("not a score"));
        };
        let (current, _) = self.services().await.map_err(unavailable)?;
        let mut services = current.services();
        let check = Change::SetExternal {
            service: service.clone(),
            id: id.clone(),
            score,
            ttl,
        };
        change_state(cfg, &mut services, &mut BTreeMap::new(), check, Instant::now())?;
        let key = self.key("scores", &format!("{service}/{id}"));
        let value = serde_json::to_vec(&ScoreValue { score }).expect("a score serializes");
        let options = match ttl {
            Some(t) => {
                // etcd's leases count whole seconds.
                let secs = t.as_secs_f64().ceil() as i64;
                let lease = self
                    .call(|mut c| async move { c.lease_grant(secs, None).await })
                    .await
                    .map_err(unavailable)?
                    .id();
                Some(PutOptions::new().with_lease(lease))
            }
            None => None,
        };
        let resp = self
            .call(|mut c| async move { c.put(key, value, options).await })
            .await
            .map_err(unavailable)?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Makes `services` the cluster's state whole (`lb cluster push`), in one transaction. A
    /// push replaces whatever it meets, so a change made between its read and its write is
    /// no reason to refuse it: it reads again and retries, a few times.
    pub async fn push(&self, services: &[Service]) -> Result<i64> {
        const TRIES: usize = 3;
        for _ in 0..TRIES {
            match self.commit(self.prepare_push(services).await?).await {
                Err(Error::Exists(_)) => continue,
                done => return done.map(|(revision, _)| revision),
            }
        }
        Err(Error::Exists(format!(
            "the cluster's state changed on other nodes during each of {TRIES} tries: nothing written, try again"
        )))
    }

    /// A push's transaction: it deletes the services read that `services` lacks, so it holds
    /// only if none was made or changed since the read (one made meanwhile would outlive it).
    pub async fn prepare_push(&self, services: &[Service]) -> Result<Prepared> {
        let (current, read_at) = self.services().await.map_err(unavailable)?;
        let wanted: BTreeSet<String> = services.iter().map(|s| self.key("services", &s.name)).collect();
        let mut ops: Vec<TxnOp> = current
            .by_key
            .keys()
            .filter(|k| !wanted.contains(*k))
            .map(|k| TxnOp::delete(k.clone(), None))
            .collect();
        ops.extend(
            services
                .iter()
                .map(|s| TxnOp::put(self.key("services", &s.name), encode(s), None)),
        );
        Ok(Prepared {
            txn: Some(Txn::new().when([self.unchanged_since(read_at)]).and_then(ops)),
            read_at,
            after: services.to_vec(),
            risky: Vec::new(),
        })
    }

    /// Holds while no key under services/ was made or changed after revision `read_at`.
    fn unchanged_since(&self, read_at: i64) -> Compare {
        Compare::mod_revision(self.dir("services"), CompareOp::Less, read_at + 1).with_prefix()
    }
}
