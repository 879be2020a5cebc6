//! Schedules every backend's active checks and agent checks, feeds the results to its tracker
//! (or the agent's state), and tells the reconciler when what it publishes changes. Checks run concurrently,
//! bounded by a semaphore; each backend has its own timer task, so a slow check never delays
//! another backend's schedule.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use log::{info, warn};
use tokio::{
    sync::{Semaphore, mpsc, oneshot, watch},
    task::JoinHandle,
};

use super::{
    agent,
    breaker::Breaker,
    probe::{self, AgentAnswer},
    tracker::Tracker,
};
use crate::{
    model::{
        BackendRef, Service,
        health_settings::{AgentSpec, CheckSpec, Probe, resolve},
    },
    reconcile::inbox::{Command, HealthUpdate},
    status::{
        AgentState, BreakerState, HealthState,
        checks::{AgentView, Board, CheckView, Outcome},
    },
};

/// A backend's check or its agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Check,
    Agent,
}

#[derive(Clone, Debug, PartialEq)]
enum Job {
    Check(Box<CheckSpec>),
    Agent(AgentSpec),
}

enum Observed {
    Check(Outcome),
    Agent(AgentAnswer),
}

struct Target {
    job: Job,
    generation: u64,
    tracker: Tracker,
    breaker: Breaker,
    agent: AgentState,
    /// The backend's (new flows, SYN retransmits) at the last passive looks, oldest first.
    passive: std::collections::VecDeque<super::passive::Reading>,
    task: JoinHandle<()>,
}

/// A target's timer goes with it (also when the monitor itself is stopped).
impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where passive signals come from: the backends' per-CPU counters, by slot.
pub struct PassiveSource {
    pub readers: Arc<crate::dataplane::Readers>,
    pub snapshot: watch::Receiver<Arc<crate::snapshot::Snapshot>>,
}

struct CheckResult {
    key: (BackendRef, Role),
    generation: u64,
    observed: Observed,
    /// Answered with whether the backend is now between states (next check at the fast
    /// interval), once the tracker has taken the result.
    ack: oneshot::Sender<bool>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every check and agent of `services`.
fn targets(services: &[Service]) -> BTreeMap<(BackendRef, Role), Job> {
    let mut out = BTreeMap::new();
    for s in services {
        for b in &s.backends {
            // Settings were validated with the services; an error here cannot happen.
            let Ok(checks) = resolve(s, b) else { continue };
            let key = BackendRef::new(&s.name, &b.id);
            if let Some(spec) = checks.check {
                out.insert((key.clone(), Role::Check), Job::Check(Box::new(spec)));
            }
            if let Some(spec) = checks.agent {
                out.insert((key, Role::Agent), Job::Agent(spec));
            }
        }
    }
    out
}

fn kind_name(p: &Probe) -> &'static str {
    match p {
        Probe::None => "none",
        Probe::Tcp => "tcp",
        Probe::Http { tls: Some(_), .. } => "https",
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
    durations: Option<prometheus::HistogramVec>,
    passive: Option<PassiveSource>,
    steering: Option<Arc<super::through::Steering>>,
) {
    let permits = Arc::new(Semaphore::new(max_concurrent.max(1)));
    let mut passive_tick = tokio::time::interval(super::passive::INTERVAL);
    passive_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (results_tx, mut results) = mpsc::channel::<CheckResult>(4096);
    let mut live: BTreeMap<(BackendRef, Role), Target> = BTreeMap::new();
    let mut generation = 0u64;
    let mut sync = true;
    loop {
        if sync {
            sync = false;
            let wanted = targets(&services.borrow_and_update());
            live.retain(|k, t| {
                let keep = wanted.get(k) == Some(&t.job);
                if !keep {
                    t.task.abort();
                }
                keep
            });
            let mut views = board.write().unwrap_or_else(|p| p.into_inner());
            views
                .checks
                .retain(|k, _| live.contains_key(&(k.clone(), Role::Check)));
            views
                .agents
                .retain(|k, _| live.contains_key(&(k.clone(), Role::Agent)));
            for (k, job) in wanted {
                if live.contains_key(&k) {
                    continue;
                }
                generation += 1;
                match &job {
                    Job::Check(spec) => {
                        views.checks.insert(
                            k.0.clone(),
                            CheckView {
                                kind: kind_name(&spec.probe),
                                target: spec.target,
                                state: HealthState::Up,
                                score: 1.0,
                                since_ms: now_ms(),
                                transitions: 0,
                                reason: "not checked yet (assumed up)".into(),
                                last: None,
                                consecutive_ok: 0,
                                consecutive_failed: 0,
                                checks: 0,
                                failed: 0,
                                breaker: spec.breaker.map(|_| BreakerState::Closed),
                                passive_failures: 0,
                            },
                        );
                    }
                    Job::Agent(spec) => {
                        views.agents.insert(
                            k.0.clone(),
                            AgentView {
                                target: spec.target,
                                state: AgentState::default(),
                                last: None,
                                asked: 0,
                                unreachable: 0,
                                malformed: 0,
                            },
                        );
                    }
                }
                let task = tokio::spawn(schedule(
                    k.clone(),
                    generation,
                    job.clone(),
                    permits.clone(),
                    results_tx.clone(),
                    steering.clone(),
                ));
                live.insert(
                    k,
                    Target {
                        job,
                        generation,
                        tracker: Tracker::default(),
                        breaker: Breaker::default(),
                        agent: AgentState::default(),
                        passive: Default::default(),
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
            _ = passive_tick.tick(), if passive.is_some() => {
                let Some(source) = &passive else { continue };
                let snap = source.snapshot.borrow().clone();
                let mut commands = Vec::new();
                for ((backend, role), t) in live.iter_mut() {
                    let (Role::Check, Job::Check(spec)) = (role, &t.job) else { continue };
                    let Some(p) = spec.passive else { continue };
                    let Some(slot) = snap.assignments.slot_of(backend) else { continue };
                    let Ok(traffic) = source.readers.backend_traffic(slot.slot) else { continue };
                    let now = (traffic.new_flows, traffic.syn_retransmits, traffic.refused);
                    let before = if t.passive.len() >= super::passive::WINDOW { t.passive.pop_front() } else { t.passive.front().copied() };
                    t.passive.push_back(now);
                    let Some(outcome) = before.and_then(|b| super::passive::evaluate(b, now, &p)) else { continue };
                    if let Some(v) = board.write().unwrap_or_else(|p| p.into_inner()).checks.get_mut(backend) {
                        v.passive_failures += 1;
                    }
                    let spec = spec.clone();
                    let (command, _) = take_outcome(t, &spec, backend, &outcome, &board);
                    commands.extend(command);
                }
                for command in commands {
                    if writer.send(command).await.is_err() {
                        return;
                    }
                }
            }
            Some(r) = results.recv() => {
                let Some(t) = live.get_mut(&r.key).filter(|t| t.generation == r.generation) else {
                    continue;
                };
                let backend = r.key.0.clone();
                let command = match (r.observed, &t.job) {
                    (Observed::Check(outcome), Job::Check(spec)) => {
                        if let Some(h) = &durations {
                            h.with_label_values(&[backend.service.as_str(), kind_name(&spec.probe)])
                                .observe(outcome.latency.as_secs_f64());
                        }
                        let spec = spec.clone();
                        let (command, unsettled) = take_outcome(t, &spec, &backend, &outcome, &board);
                        let _ = r.ack.send(unsettled);
                        command
                    }
                    (Observed::Agent(answer), Job::Agent(spec)) => {
                        let _ = r.ack.send(false);
                        let mut views = board.write().unwrap_or_else(|p| p.into_inner());
                        let mut view = views.agents.get_mut(&backend);
                        let (next, last) = match answer {
                            AgentAnswer::Line(line) => match agent::apply(&t.agent, &line) {
                                // The backend's text, shown by `lb health`: cleaned of escapes.
                                Ok(next) => (Some(next), agent::clean(&line)),
                                Err(e) => {
                                    warn!("backend {backend}: agent at {}: {e}; nothing changed", spec.target);
                                    if let Some(v) = view.as_deref_mut() { v.malformed += 1; }
                                    (None, format!("{:?}: {e}", agent::clean(&line)))
                                }
                            },
                            AgentAnswer::Malformed(e) => {
                                warn!("backend {backend}: agent at {}: {e}; nothing changed", spec.target);
                                if let Some(v) = view.as_deref_mut() { v.malformed += 1; }
                                (None, e)
                            }
                            AgentAnswer::Unreachable(e) => {
                                if let Some(v) = view.as_deref_mut() { v.unreachable += 1; }
                                (None, format!("unreachable: {e}"))
                            }
                        };
                        let changed = next.filter(|n| *n != t.agent);
                        if let Some(v) = view {
                            v.asked += 1;
                            v.last = Some(last);
                            if let Some(n) = &changed {
                                v.state = n.clone();
                            }
                        }
                        changed.map(|n| {
                            info!("backend {backend}: agent at {} now says down={:?} drain={} maint={} weight={:?} maxconn={:?}", spec.target, n.down, n.drain, n.maint, n.weight, n.maxconn);
                            t.agent = n.clone();
                            Command::Agent { backend: backend.clone(), state: n }
                        })
                    }
                    _ => None,
                };
                if let Some(command) = command
                    && writer.send(command).await.is_err()
                {
                    break;
                }
            }
        }
    }
    for t in live.values() {
        t.task.abort();
    }
}

/// One result (an active check's, or a passive failure) through the tracker and the breaker:
/// what the reconciler must hear, and whether the backend is between states.
fn take_outcome(
    t: &mut Target,
    spec: &CheckSpec,
    backend: &BackendRef,
    outcome: &Outcome,
    board: &Board,
) -> (Option<Command>, bool) {
    let mut change = t.tracker.record(outcome, spec);
    let mut tripped = false;
    if let Some(b) = &spec.breaker {
        let now = std::time::Instant::now();
        if let Some(state) = t.breaker.tick(b, now) {
            info!("backend {backend}: circuit breaker {state:?} after its cooldown");
            tripped = true;
        }
        if let Some(state) = t.breaker.record(outcome.ok, b, now) {
            warn!(
                "backend {backend}: circuit breaker {state:?} after: {}",
                outcome.detail
            );
            tripped = true;
        }
    }
    if tripped {
        change.get_or_insert(super::tracker::Published {
            state: t.tracker.state(),
            score: t.tracker.score(),
            transition: None,
        });
    }
    let unsettled = t.tracker.unsettled() || t.breaker.state() != BreakerState::Closed;
    record_check(
        board,
        backend,
        &t.tracker,
        outcome,
        change.as_ref().and_then(|c| c.transition.clone()),
    );
    if let Some(v) = board
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .checks
        .get_mut(backend)
    {
        v.breaker = spec.breaker.map(|_| t.breaker.state());
    }
    let command = change.map(|change| {
        if let Some(reason) = &change.transition {
            match change.state {
                HealthState::Down => warn!(
                    "backend {backend} is down: {} check of {}: {reason}",
                    kind_name(&spec.probe),
                    spec.target
                ),
                HealthState::Up => info!(
                    "backend {backend} is up: {} check of {}: {reason}",
                    kind_name(&spec.probe),
                    spec.target
                ),
            }
        }
        Command::Health(HealthUpdate {
            backend: backend.clone(),
            state: change.state,
            score: change.score,
            slow_start: spec.slow_start,
            breaker: t.breaker.state(),
            half_open_share: spec.breaker.map_or(1.0, |b| b.half_open_share),
        })
    });
    (command, unsettled)
}

fn record_check(
    board: &Board,
    backend: &BackendRef,
    tracker: &Tracker,
    outcome: &Outcome,
    transition: Option<String>,
) {
    let mut views = board.write().unwrap_or_else(|p| p.into_inner());
    let Some(v) = views.checks.get_mut(backend) else {
        return;
    };
    let (oks, fails) = tracker.consecutive();
    v.checks += 1;
    v.failed += u64::from(!outcome.ok);
    v.consecutive_ok = oks;
    v.consecutive_failed = fails;
    v.score = tracker.score();
    v.state = tracker.state();
    if let Some(reason) = transition {
        v.since_ms = now_ms();
        v.transitions += 1;
        v.reason = reason;
    } else if v.last.is_none() {
        v.reason = "checked".into();
    }
    v.last = Some(outcome.clone());
}

/// One check's timer: wait, take a permit, check, report; forever (aborted on removal).
/// How a check leaves: directly (`None`), or through the VIP by the check path.
async fn via(
    spec: &CheckSpec,
    backend: &BackendRef,
    steering: Option<&super::through::Steering>,
) -> Result<Option<probe::Via>, String> {
    match (spec.steered_to, steering) {
        (None, _) => Ok(None),
        (Some(address), Some(steering)) => steering.via(backend, address).await.map(Some),
        (Some(_), None) => Err("checks through the VIP need the daemon's data plane".into()),
    }
}

async fn schedule(
    key: (BackendRef, Role),
    generation: u64,
    job: Job,
    permits: Arc<Semaphore>,
    results: mpsc::Sender<CheckResult>,
    steering: Option<Arc<super::through::Steering>>,
) {
    let interval = match &job {
        Job::Check(spec) => spec.interval,
        Job::Agent(spec) => spec.interval,
    };
    // Spread the first checks of many backends over one interval.
    let mut delay = interval.mul_f64(fastrand::f64());
    loop {
        tokio::time::sleep(delay).await;
        let started = tokio::time::Instant::now();
        let observed = {
            let Ok(_permit) = permits.acquire().await else {
                return;
            };
            match &job {
                Job::Check(spec) => Observed::Check(match via(spec, &key.0, steering.as_deref()).await {
                    Ok(via) => probe::check(spec, via).await,
                    Err(detail) => Outcome {
                        ok: false,
                        latency: Duration::ZERO,
                        detail,
                    },
                }),
                Job::Agent(spec) => Observed::Agent(probe::agent(spec).await),
            }
        };
        let (ack, unsettled) = oneshot::channel();
        let sent = CheckResult {
            key: key.clone(),
            generation,
            observed,
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
        let wait = match &job {
            Job::Check(spec) => probe::next_delay(spec, unsettled, fastrand::f64()),
            Job::Agent(spec) => spec
                .interval
                .mul_f64((1.0 + spec.jitter * (2.0 * fastrand::f64() - 1.0)).max(0.05)),
        };
        delay = wait
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
    }
}
