//! Backends' next hops: resolving new backends before a pass, and the refresher that looks
//! every backend up again and tells the writer what changed.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use futures::future::join_all;
use log::warn;
use tokio::sync::{mpsc, watch};

use super::{Command, Snapshot};
use crate::{
    error::Result,
    model::backend_addresses,
    neigh::{NextHop, ResolveError, Resolver},
};

const RESOLVE_TIMEOUT: Duration = Duration::from_millis(1000);

/// Resolves the wanted addresses that have no hop yet (ARP/ND for L2 backends, the route for
/// routed ones). Returns what resolved, and a warning per backend that did not.
pub async fn resolve_missing(
    resolver: &Resolver,
    wanted: &BTreeMap<IpAddr, bool>,
    known: &HashMap<IpAddr, NextHop>,
) -> Result<(HashMap<IpAddr, NextHop>, Vec<String>)> {
    let missing: Vec<(IpAddr, bool)> = wanted
        .iter()
        .filter(|(a, _)| !known.contains_key(a))
        .map(|(a, l2)| (*a, *l2))
        .collect();
    // Routed backends in one batch (their interfaces looked up once), L2 ones each alone.
    let routed: Vec<IpAddr> = missing.iter().filter(|(_, l2)| !l2).map(|(a, _)| *a).collect();
    let mut routed_hops = resolver.route_hops(&routed).await.into_iter();
    let l2 = join_all(
        missing
            .iter()
            .filter(|(_, l2)| *l2)
            .map(|&(a, _)| resolver.resolve(a, RESOLVE_TIMEOUT)),
    )
    .await;
    let mut l2 = l2.into_iter();
    let results: Vec<_> = missing
        .iter()
        .map(|(_, is_l2)| {
            let next = if *is_l2 { l2.next() } else { routed_hops.next() };
            next.expect("one result per address")
        })
        .collect();
    let mut found = HashMap::new();
    let mut warnings = Vec::new();
    for ((addr, _), result) in missing.iter().zip(results) {
        match result {
            Ok(hop) => {
                found.insert(*addr, hop);
            }
            Err(e @ ResolveError::Unresolved { .. }) => warnings.push(format!(
                "{e}; the backend stays out of the tables until it resolves"
            )),
            Err(e) => return Err(e.into()),
        }
    }
    Ok((found, warnings))
}

/// Re-reads every backend's next hop; a change (or a backend resolving late) goes to the
/// writer. Runs until the writer is gone.
pub async fn refresh(
    resolver: Arc<Resolver>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    writer: mpsc::Sender<Command>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = snapshot.borrow().clone();
        let wanted = backend_addresses(&snap.services);
        let resolver = &resolver;
        let routed: Vec<IpAddr> = wanted.iter().filter(|(_, l2)| !**l2).map(|(a, _)| *a).collect();
        let mut results: Vec<(IpAddr, _)> = routed
            .iter()
            .copied()
            .zip(resolver.route_hops(&routed).await)
            .collect();
        results.extend(
            join_all(wanted.iter().filter(|(_, l2)| **l2).map(|(&a, _)| async move {
                let r = match resolver.lookup(a).await {
                    Ok(hop) => Ok(hop),
                    Err(_) => resolver.resolve(a, Duration::from_millis(200)).await,
                };
                (a, r)
            }))
            .await,
        );
        let mut changes = Vec::new();
        for (addr, r) in results {
            let now = r.as_ref().ok();
            if now == snap.hops.get(&addr) {
                continue;
            }
            match r {
                Ok(hop) => changes.push((addr, Some(hop))),
                Err(e) => {
                    warn!("backend {addr} no longer resolves ({e}); taking it out of the tables");
                    changes.push((addr, None));
                }
            }
        }
        if !changes.is_empty() {
            log::info!("backend next hops changed; rewriting the maps");
            if writer.send(Command::Hops(changes)).await.is_err() {
                return;
            }
        }
    }
}
