//! The adaptive services' task: each `interval` it measures what `strategy::adaptive::decide`
//! needs (active-flow imbalance from the data plane's counts, load reports from the status)
//! and sends the writer each switch, as `hops::refresh` sends next hops.

use std::{sync::Arc, time::Instant};

use tokio::sync::{mpsc, watch};

use super::inbox::Command;
use crate::{
    dataplane::Readers,
    model::{BackendRef, Strategy},
    snapshot::Snapshot,
    strategy::adaptive::{Signals, decide, imbalance},
};

/// Looks at every adaptive service each `interval` (the shortest of theirs) and sends the
/// writer each switch `decide` makes.
pub async fn run(
    mut snapshot: watch::Receiver<Arc<Snapshot>>,
    readers: Arc<Readers>,
    commands: mpsc::Sender<Command>,
) {
    loop {
        let snap = snapshot.borrow_and_update().clone();
        let adaptive: Vec<_> = snap
            .services
            .iter()
            .filter(|s| s.strategy == Strategy::Adaptive)
            .collect();
        let every = adaptive
            .iter()
            .map(|s| s.adaptive.unwrap_or_default().resolve().interval)
            .min();
        let now = Instant::now();
        for s in adaptive {
            let a = s.adaptive.unwrap_or_default().resolve();
            let Some(state) = snap.adaptive.get(&s.name) else {
                continue;
            };
            let weights = snap.weights.get(&s.name);
            let members: Vec<(u64, u32)> = s
                .backends
                .iter()
                .map(|b| {
                    let slot = snap.assignments.slot(&s.name, &b.id).map(|x| x.slot);
                    let n = slot.map_or(0, |slot| readers.active.get(slot).max(0) as u64);
                    let w = weights
                        .and_then(|w| w.backends.get(&b.id))
                        .map_or(0, |e| e.weight);
                    (n, w)
                })
                .collect();
            let (flows, imbalance) = imbalance(&members);
            let reporting = s.backends.iter().any(|b| {
                snap.status
                    .get(&BackendRef::new(&s.name, &b.id))
                    .is_some_and(|st| {
                        st.load.report.is_some_and(|(_, exp)| exp > now)
                            || st.agent.as_ref().is_some_and(|ag| ag.percent().is_some())
                    })
            });
            let signals = Signals {
                reporting,
                flows,
                imbalance,
            };
            if let Some((to, reason)) = decide(state, &signals, &a, now) {
                let _ = commands
                    .send(Command::Adapt {
                        service: s.name.clone(),
                        to,
                        reason,
                    })
                    .await;
            }
        }
        match every {
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    r = snapshot.changed() => if r.is_err() { return },
                }
            }
            None => {
                if snapshot.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}
