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

use super::inbox::Command;
use crate::{
    error::Result,
    model::backend_addresses,
    neigh::{NextHop, ResolveError, Resolver},
    snapshot::Snapshot,
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
    let results = hops_of(resolver, &missing, |a| resolver.resolve(a, RESOLVE_TIMEOUT)).await;
    let mut found = HashMap::new();
    let mut warnings = Vec::new();
    for (addr, result) in results {
        match result {
            Ok(hop) => {
                found.insert(addr, hop);
            }
            Err(e @ ResolveError::Unresolved { .. }) => warnings.push(format!(
                "{e}; the backend stays out of the tables until it resolves"
            )),
            Err(e) => return Err(e.into()),
        }
    }
    Ok((found, warnings))
}

/// Each address's next hop, in the order given: routed ones (`false`) in one batch, each
/// egress interface looked up once (`Resolver::route_hops`), on-link ones (`true`) each by
/// `on_link`, concurrently.
async fn hops_of<F, Fut>(
    resolver: &Resolver,
    addrs: &[(IpAddr, bool)],
    on_link: F,
) -> Vec<(IpAddr, std::result::Result<NextHop, ResolveError>)>
where
    F: Fn(IpAddr) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<NextHop, ResolveError>>,
{
    let routed: Vec<IpAddr> = addrs.iter().filter(|(_, l2)| !l2).map(|(a, _)| *a).collect();
    let mut routed = resolver.route_hops(&routed).await.into_iter();
    let l2 = join_all(addrs.iter().filter(|(_, l2)| *l2).map(|&(a, _)| on_link(a))).await;
    let mut l2 = l2.into_iter();
    addrs
        .iter()
        .map(|&(a, is_l2)| {
            let r = if is_l2 { l2.next() } else { routed.next() };
            (a, r.expect("one result per address"))
        })
        .collect()
}

/// Each address's next hop again, in the order given: routed ones as `hops_of` does, on-link ones from the
/// neighbour table read whole (`Resolver::lookup_all`), and those it has no usable entry for
/// resolved (ARP/ND, briefly).
async fn refreshed(
    resolver: &Resolver,
    addrs: &[(IpAddr, bool)],
) -> Vec<(IpAddr, std::result::Result<NextHop, ResolveError>)> {
    let on_link: Vec<IpAddr> = addrs.iter().filter(|(_, l2)| *l2).map(|(a, _)| *a).collect();
    let mut found: HashMap<IpAddr, std::result::Result<NextHop, ResolveError>> = on_link
        .iter()
        .copied()
        .zip(resolver.lookup_all(&on_link).await)
        .collect();
    let again: Vec<IpAddr> = found
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(a, _)| *a)
        .collect();
    let resolved = join_all(
        again
            .iter()
            .map(|&a| resolver.resolve(a, Duration::from_millis(200))),
    )
    .await;
    found.extend(again.into_iter().zip(resolved));
    let routed: Vec<IpAddr> = addrs.iter().filter(|(_, l2)| !l2).map(|(a, _)| *a).collect();
    found.extend(routed.iter().copied().zip(resolver.route_hops(&routed).await));
    addrs
        .iter()
        .map(|&(a, _)| {
            let r = found
                .remove(&a)
                .unwrap_or_else(|| Err(ResolveError::Netlink(format!("backend {a}: not looked up"))));
            (a, r)
        })
        .collect()
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
        let wanted: Vec<(IpAddr, bool)> = wanted.into_iter().collect();
        let results = refreshed(resolver, &wanted).await;
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

/// The next hops after `updates` (`None`: no longer resolves), kept only for addresses still
/// wanted, and dropped where an address's needs changed with its services' modes (so it is
/// resolved again). Pure.
pub fn merge(
    current: &HashMap<IpAddr, NextHop>,
    updates: HashMap<IpAddr, Option<NextHop>>,
    had: &BTreeMap<IpAddr, bool>,
    wanted: &BTreeMap<IpAddr, bool>,
) -> HashMap<IpAddr, NextHop> {
    let mut next = current.clone();
    for (addr, hop) in updates {
        match hop {
            Some(h) => {
                next.insert(addr, h);
            }
            None => {
                next.remove(&addr);
            }
        }
    }
    next.retain(|a, _| wanted.contains_key(a) && had.get(a).is_none_or(|l2| wanted.get(a) == Some(l2)));
    next
}
