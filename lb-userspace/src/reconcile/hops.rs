//! Backends' next hops: resolving new backends before a pass, and the refresher that looks
//! every backend up again and tells the writer what changed.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
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
    let results = hops_of(resolver, &missing, |l2| {
        join_all(l2.into_iter().map(|a| resolver.resolve(a, RESOLVE_TIMEOUT)))
    })
    .await;
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
/// egress interface looked up once (`Resolver::route_hops`), on-link ones (`true`) by
/// `on_link`, given them all at once.
async fn hops_of<F, Fut>(
    resolver: &Resolver,
    addrs: &[(IpAddr, bool)],
    on_link: F,
) -> Vec<(IpAddr, std::result::Result<NextHop, ResolveError>)>
where
    F: FnOnce(Vec<IpAddr>) -> Fut,
    Fut: std::future::Future<Output = Vec<std::result::Result<NextHop, ResolveError>>>,
{
    let routed: Vec<IpAddr> = addrs.iter().filter(|(_, l2)| !l2).map(|(a, _)| *a).collect();
    let mut routed = resolver.route_hops(&routed).await.into_iter();
    let l2 = on_link(addrs.iter().filter(|(_, l2)| *l2).map(|(a, _)| *a).collect()).await;
    let mut l2 = l2.into_iter();
    addrs
        .iter()
        .map(|&(a, is_l2)| {
            let r = if is_l2 { l2.next() } else { routed.next() };
            (a, r.expect("one result per address"))
        })
        .collect()
}

/// On-link addresses looked up again: from the neighbour table read whole
/// (`Resolver::lookup_all`), and those it has no usable entry for resolved (ARP/ND, briefly).
async fn relooked(
    resolver: &Resolver,
    addrs: Vec<IpAddr>,
) -> Vec<std::result::Result<NextHop, ResolveError>> {
    let mut found = resolver.lookup_all(&addrs).await;
    let again: Vec<usize> = (0..found.len()).filter(|&i| found[i].is_err()).collect();
    let resolved = join_all(
        again
            .iter()
            .map(|&i| resolver.resolve(addrs[i], Duration::from_millis(200))),
    )
    .await;
    for (i, r) in again.into_iter().zip(resolved) {
        found[i] = r;
    }
    found
}

/// At most how often the data plane's cached next hops are sent back to the FIB: each epoch
/// makes every CPU look up every backend it forwards to again (two FIB lookups each), and
/// neighbour notifications come in bursts.
const EPOCH_EVERY: Duration = Duration::from_millis(100);

/// Has the writer move the data plane's next-hop epoch (`Command::HopEpoch`) after the
/// kernel reports a route, neighbour, address or link change, at most every `EPOCH_EVERY`
/// (changes meanwhile are one epoch); without the kernel's notifications, every `EPOCH_EVERY`.
/// Runs until the writer is gone.
pub async fn epochs(resolver: Arc<Resolver>, writer: mpsc::Sender<Command>) {
    loop {
        if resolver.watching() {
            resolver.changed().await;
        }
        if writer.send(Command::HopEpoch).await.is_err() {
            return;
        }
        tokio::time::sleep(EPOCH_EVERY).await;
    }
}

/// The longest a refresh skips reading the kernel's tables while it reports no change: a
/// notification can be lost (a full socket drops them).
const READ_AT_LEAST: Duration = Duration::from_secs(30);

/// A refresh's read of the kernel's tables: the count of its notifications before it, the
/// addresses read, and when.
struct Read {
    notes: u64,
    wanted: Vec<(IpAddr, bool)>,
    at: Instant,
}

/// Whether a refresh reads the kernel's tables again. It may skip when the kernel has sent
/// no notification since the last read (`notes`: `None` when they are not being had), the
/// same addresses are wanted, every one of them resolved (a backend that has not must be
/// asked again), and the last read is under `READ_AT_LEAST` old. Pure.
fn must_read(
    last: Option<&Read>,
    notes: Option<u64>,
    wanted: &[(IpAddr, bool)],
    resolved: impl Fn(&IpAddr) -> bool,
    now: Instant,
) -> bool {
    let Some((last, notes)) = last.zip(notes) else {
        return true;
    };
    last.notes != notes
        || last.wanted != wanted
        || now.duration_since(last.at) >= READ_AT_LEAST
        || !wanted.iter().all(|(a, _)| resolved(a))
}

/// Re-reads every backend's next hop; a change (or a backend resolving late) goes to the
/// writer. A tick with nothing the kernel reported and nothing new to resolve reads nothing
/// (`must_read`). Runs until the writer is gone.
pub async fn refresh(
    resolver: Arc<Resolver>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    writer: mpsc::Sender<Command>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Read> = None;
    loop {
        tick.tick().await;
        let snap = snapshot.borrow().clone();
        let wanted = backend_addresses(&snap.services);
        let resolver = &resolver;
        let wanted: Vec<(IpAddr, bool)> = wanted.into_iter().collect();
        // Counted before the read: a change during it is read at the next tick.
        let (notes, now) = (resolver.notifications(), Instant::now());
        if !must_read(last.as_ref(), notes, &wanted, |a| snap.hops.contains_key(a), now) {
            continue;
        }
        let results = hops_of(resolver, &wanted, |l2| relooked(resolver, l2)).await;
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
        last = notes.map(|notes| Read {
            notes,
            wanted,
            at: now,
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refresh_reads_only_after_a_notification_a_new_address_an_unresolved_one_or_30_s() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let wanted = vec![(a, true), (b, false)];
        let t0 = Instant::now();
        let last = Read {
            notes: 7,
            wanted: wanted.clone(),
            at: t0,
        };
        let all = |_: &IpAddr| true;
        let soon = t0 + Duration::from_secs(1);
        // Nothing reported, the same addresses, all resolved: skipped.
        assert!(!must_read(Some(&last), Some(7), &wanted, all, soon));
        // The first read, and every read without notifications.
        assert!(must_read(None, Some(7), &wanted, all, soon));
        assert!(must_read(Some(&last), None, &wanted, all, soon));
        // A notification since.
        assert!(must_read(Some(&last), Some(8), &wanted, all, soon));
        // Another address wanted, or one's needs changed (on link now).
        assert!(must_read(Some(&last), Some(7), &wanted[..1], all, soon));
        assert!(must_read(
            Some(&last),
            Some(7),
            &[(a, true), (b, true)],
            all,
            soon
        ));
        // A backend not resolved yet is asked again at each tick.
        assert!(must_read(Some(&last), Some(7), &wanted, |x| *x != b, soon));
        // A lost notification is caught within READ_AT_LEAST.
        assert!(must_read(Some(&last), Some(7), &wanted, all, t0 + READ_AT_LEAST));
    }
}
