//! Schedules every backend's active checks, feeds the results to its tracker, and tells the
//! reconciler when a backend's state or published score changes. Checks run concurrently,
//! bounded by a semaphore; each backend has its own timer task, so a slow check never delays
//! another backend's schedule.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use log::{info, warn};
use serde::Serialize;
use tokio::{
    sync::{Semaphore, mpsc, oneshot, watch},
    task::JoinHandle,
};

use super::{
    probe,
    settings::{CheckSpec, Probe, resolve},
    tracker::{Outcome, State, Tracker},
};
use crate::{
    model::{BackendRef, Service},
    reconcile::{Command, HealthUpdate},
};

/// What `lb health` shows of one backend's active checks.
#[derive(Clone, Debug, Serialize)]
pub struct CheckView {
    pub kind: &'static str,
    pub target: std::net::SocketAddr,
    pub state: State,
    pub score: f64,
    /// Unix milliseconds of the last state change (or of the check's start).
    pub since_ms: u64,
    pub reason: String,
    pub last: Option<Outcome>,
    pub consecutive_ok: u32,
    pub consecutive_failed: u32,
    pub checks: u64,
    pub failed: u64,
}

/// The checks' state of every checked backend, for readers.
pub type Board = Arc<RwLock<BTreeMap<BackendRef, CheckView>>>;

struct Target {
    spec: CheckSpec,
    generation: u64,
    tracker: Tracker,
    task: JoinHandle<()>,
}

struct Result {
    backend: BackendRef,
    generation: u64,
    outcome: Outcome,
    /// Answered with whether the backend is now between states (next check at the fast
    /// interval), once the tracker has taken the result.
    ack: oneshot::Sender<bool>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every checked backend of `services` with its resolved check.
pub fn targets(services: &[Service]) -> BTreeMap<BackendRef, CheckSpec> {
    let mut out = BTreeMap::new();
    for s in services {
        for b in &s.backends {
            // Settings were validated with the services; an error here cannot happen.
            if let Ok(Some(spec)) = resolve(s, b) {
                out.insert(BackendRef::new(&s.name, &b.id), spec);
            }
        }
    }
    out
}

fn kind_name(p: &Probe) -> &'static str {
    match p {
        Probe::None => "none",
        Probe::Tcp => "tcp",
        Probe::Http { .. } => "http",
        Probe::Udp { .. } => "udp",
    }
}

/// Runs until the services channel closes.
pub async fn run(
    mut services: watch::Receiver<Arc<Vec<Service>>>,
    writer: mpsc::Sender<Command>,
    board: Board,
    max_concurrent: usize,
) {
    let permits = Arc::new(Semaphore::new(max_concurrent.max(1)));
    let (results_tx, mut results) = mpsc::channel::<Result>(4096);
    let mut live: BTreeMap<BackendRef, Target> = BTreeMap::new();
    let mut generation = 0u64;
    let mut sync = true;
    loop {
        if sync {
            sync = false;
            let wanted = targets(&services.borrow_and_update());
            live.retain(|k, t| {
                let keep = wanted.get(k) == Some(&t.spec);
                if !keep {
                    t.task.abort();
                }
                keep
            });
            let mut view = board.write().unwrap_or_else(|p| p.into_inner());
            view.retain(|k, _| live.contains_key(k));
            for (k, spec) in wanted {
                if live.contains_key(&k) {
                    continue;
                }
                generation += 1;
                let task = tokio::spawn(schedule(
                    k.clone(),
                    generation,
                    spec.clone(),
                    permits.clone(),
                    results_tx.clone(),
                ));
                view.insert(
                    k.clone(),
                    CheckView {
                        kind: kind_name(&spec.probe),
                        target: spec.target,
                        state: State::Up,
                        score: 1.0,
                        since_ms: now_ms(),
                        reason: "not checked yet (assumed up)".into(),
                        last: None,
                        consecutive_ok: 0,
                        consecutive_failed: 0,
                        checks: 0,
                        failed: 0,
                    },
                );
                live.insert(
                    k,
                    Target {
                        spec,
                        generation,
                        tracker: Tracker::default(),
                        task,
                    },
                );
            }
        }
        tokio::select! {
            changed = services.changed() => {
                if changed.is_err() {
                    break;
                }
                sync = true;
            }
            Some(r) = results.recv() => {
                let Some(t) = live.get_mut(&r.backend).filter(|t| t.generation == r.generation) else {
                    continue;
                };
                let change = t.tracker.record(&r.outcome, &t.spec);
                let _ = r.ack.send(t.tracker.unsettled());
                let (oks, fails) = t.tracker.consecutive();
                {
                    let mut view = board.write().unwrap_or_else(|p| p.into_inner());
                    if let Some(v) = view.get_mut(&r.backend) {
                        v.checks += 1;
                        v.failed += u64::from(!r.outcome.ok);
                        v.consecutive_ok = oks;
                        v.consecutive_failed = fails;
                        v.score = t.tracker.score();
                        v.state = t.tracker.state();
                        if let Some(reason) = change.as_ref().and_then(|c| c.transition.clone()) {
                            v.since_ms = now_ms();
                            v.reason = reason;
                        } else if v.last.is_none() {
                            v.reason = "checked".into();
                        }
                        v.last = Some(r.outcome.clone());
                    }
                }
                if let Some(change) = change {
                    if let Some(reason) = &change.transition {
                        match change.state {
                            State::Down => warn!("backend {} is down: {} check of {}: {reason}", r.backend, kind_name(&t.spec.probe), t.spec.target),
                            State::Up => info!("backend {} is up: {} check of {}: {reason}", r.backend, kind_name(&t.spec.probe), t.spec.target),
                        }
                    }
                    let update = HealthUpdate {
                        backend: r.backend,
                        state: change.state,
                        score: change.score,
                        down_flows: t.spec.down_flows,
                        slow_start: t.spec.slow_start,
                    };
                    if writer.send(Command::Health(update)).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    for t in live.values() {
        t.task.abort();
    }
}

/// One backend's timer: wait, take a permit, check, report; forever (aborted on removal).
async fn schedule(
    backend: BackendRef,
    generation: u64,
    spec: CheckSpec,
    permits: Arc<Semaphore>,
    results: mpsc::Sender<Result>,
) {
    // Spread the first checks of many backends over one interval.
    let mut delay = spec.interval.mul_f64(fastrand::f64());
    loop {
        tokio::time::sleep(delay).await;
        let started = tokio::time::Instant::now();
        let outcome = {
            let Ok(_permit) = permits.acquire().await else {
                return;
            };
            probe::check(&spec).await
        };
        let (ack, unsettled) = oneshot::channel();
        let sent = Result {
            backend: backend.clone(),
            generation,
            outcome,
            ack,
        };
        if results.send(sent).await.is_err() {
            return;
        }
        // A result the monitor dropped (a replaced check) ends this timer.
        let Ok(unsettled) = unsettled.await else {
            return;
        };
        // The interval runs from one check's start to the next's, as HAProxy's does.
        let wait = probe::next_delay(&spec, unsettled, fastrand::f64());
        delay = wait
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
    }
}
