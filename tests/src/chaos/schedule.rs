//! The seeded fault schedule: a pure function of the seed, the run's length and the lab, so a
//! seed replays the same faults in the same order at the same offsets.

use std::{collections::BTreeMap, fmt, time::Duration};

/// The strategies a switch picks from (new flows only; pinned flows stay).
pub const STRATEGIES: &[&str] = &[
    "maglev",
    "round-robin",
    "weighted-round-robin",
    "least-connections",
    "power-of-two",
];

/// One fault, or the step that undoes one.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// A backend's servers stopped (their sockets close) / started again.
    StopServer(String),
    StartServer(String),
    /// A backend's link down (it answers nothing) / up again.
    LinkDown(String),
    LinkUp(String),
    /// A backend taken out of / put into one service (`lb backend remove` / `add`).
    Remove {
        service: String,
        backend: String,
    },
    Add {
        service: String,
        backend: String,
    },
    /// `lb backend weight` (0: no new flows).
    Weight {
        service: String,
        backend: String,
        weight: u32,
    },
    /// `lb service strategy`.
    Strategy {
        service: String,
        strategy: String,
    },
    /// The config file rewritten from the model, with this backend's weight changed, and
    /// `lb reload`.
    Reload {
        service: String,
        backend: String,
        weight: u32,
    },
    /// SIGKILL, then the same instance started again (it adopts its pins).
    KillDaemon,
    /// The daemon restarted from the other build (`lb` and `lb-flow-v2`, whose flow tables'
    /// values differ): the maps migrated and the program replaced under traffic (issue 27 §4).
    UpgradeProgram,
}

impl Fault {
    /// The kind, as the report counts faults.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::StopServer(_) => "server stopped",
            Fault::StartServer(_) => "server started",
            Fault::LinkDown(_) => "link down",
            Fault::LinkUp(_) => "link up",
            Fault::Remove { .. } => "backend removed",
            Fault::Add { .. } => "backend added",
            Fault::Weight { .. } => "weight changed",
            Fault::Strategy { .. } => "strategy switched",
            Fault::Reload { .. } => "config reloaded",
            Fault::KillDaemon => "daemon killed and restarted",
            Fault::UpgradeProgram => "program upgraded",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::StopServer(b) | Fault::StartServer(b) | Fault::LinkDown(b) | Fault::LinkUp(b) => {
                write!(f, "{}: {b}", self.kind())
            }
            Fault::Remove { service, backend } | Fault::Add { service, backend } => {
                write!(f, "{}: {service}/{backend}", self.kind())
            }
            Fault::Weight {
                service,
                backend,
                weight,
            } => write!(f, "{}: {service}/{backend} = {weight}", self.kind()),
            Fault::Strategy { service, strategy } => write!(f, "{}: {service} -> {strategy}", self.kind()),
            Fault::Reload {
                service,
                backend,
                weight,
            } => write!(f, "{}: the file sets {service}/{backend} = {weight}", self.kind()),
            Fault::KillDaemon | Fault::UpgradeProgram => write!(f, "{}", self.kind()),
        }
    }
}

/// A fault and when it is due, from the start of the run.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub at: Duration,
    pub fault: Fault,
}

/// The services and backends as the faults leave them: which backends each service has, at
/// which weight, and its strategy. The runner keeps one to write the config file from.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// Service -> (strategy, backend -> weight).
    pub services: BTreeMap<String, (String, BTreeMap<String, u32>)>,
}

impl Model {
    /// Every service with `members` at weight 100, Maglev.
    pub fn new(services: &[&str], members: &[&str]) -> Self {
        let set: BTreeMap<String, u32> = members.iter().map(|b| (b.to_string(), 100)).collect();
        Self {
            services: services
                .iter()
                .map(|s| (s.to_string(), ("maglev".to_string(), set.clone())))
                .collect(),
        }
    }

    /// What a fault does to the services (faults to servers and links change nothing here).
    pub fn apply(&mut self, fault: &Fault) {
        match fault {
            Fault::Remove { service, backend } => {
                self.members(service).remove(backend);
            }
            Fault::Add { service, backend } => {
                self.members(service).insert(backend.clone(), 100);
            }
            Fault::Weight {
                service,
                backend,
                weight,
            }
            | Fault::Reload {
                service,
                backend,
                weight,
            } => {
                if let Some(w) = self.members(service).get_mut(backend) {
                    *w = *weight;
                }
            }
            Fault::Strategy { service, strategy } => {
                if let Some((s, _)) = self.services.get_mut(service) {
                    *s = strategy.clone();
                }
            }
            _ => {}
        }
    }

    fn members(&mut self, service: &str) -> &mut BTreeMap<String, u32> {
        &mut self.services.get_mut(service).expect("known service").1
    }
}

/// What the schedule is drawn over.
pub struct Lab<'a> {
    /// Services faults may change.
    pub services: &'a [&'a str],
    /// Backends in every service at the start.
    pub members: &'a [&'a str],
    /// A backend in no service at the start, added and removed again.
    pub spare: &'a str,
    /// A second build is there to upgrade to (`UpgradeProgram` is scheduled).
    pub upgrades: bool,
}

/// The faults of a run of `length`: one every 1.5–4.5 s from `quiet` on, none in the last
/// `quiet` (so every undo lands and the checks see the lab settle). An outage (a stopped
/// server, a downed link) lasts 1–4 s, one at a time; a service loses at most one more backend
/// (removed or at weight 0, 2–6 s) on top, so at least two of its four stay. Weights other than
/// 0, strategies and reloads stay until changed again.
pub fn schedule(seed: u64, length: Duration, quiet: Duration, lab: &Lab) -> Vec<Step> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut model = Model::new(lab.services, lab.members);
    let mut steps: Vec<Step> = Vec::new();
    // Undo steps not yet reached, and until when each target is busy.
    let mut pending: Vec<Step> = Vec::new();
    let mut outage_until = Duration::ZERO;
    let mut service_busy: BTreeMap<&str, Duration> = BTreeMap::new();
    let secs =
        |rng: &mut fastrand::Rng, lo: f64, hi: f64| Duration::from_secs_f64(lo + (hi - lo) * rng.f64());
    let mut t = quiet;
    let end = length.saturating_sub(quiet);
    loop {
        t += secs(&mut rng, 1.5, 4.5);
        // An outage or removal may last up to 6 s; none outlives the run's quiet end.
        if t + Duration::from_secs(6) >= end {
            break;
        }
        pending.sort_by_key(|s| s.at);
        let due = pending.iter().take_while(|s| s.at <= t).count();
        for undo in pending.drain(..due) {
            model.apply(&undo.fault);
            steps.push(undo);
        }
        let service = lab.services[rng.usize(..lab.services.len())];
        let members: Vec<String> = model.services[service].1.keys().cloned().collect();
        let fault = match rng.usize(..8) {
            0 | 1 if t > outage_until => {
                let b = lab.members[rng.usize(..lab.members.len())].to_string();
                let back = t + secs(&mut rng, 1.0, 4.0);
                outage_until = back;
                let (down, up) = if rng.bool() {
                    (Fault::StopServer(b.clone()), Fault::StartServer(b))
                } else {
                    (Fault::LinkDown(b.clone()), Fault::LinkUp(b))
                };
                pending.push(Step { at: back, fault: up });
                down
            }
            2 if service_busy.get(service).is_none_or(|&u| t > u) => {
                // A core member out and back, or the spare in and out.
                let pick = lab.members[rng.usize(..lab.members.len())];
                let back = t + secs(&mut rng, 2.0, 6.0);
                service_busy.insert(service, back);
                let (now, later) = if rng.bool() {
                    let b = lab.spare.to_string();
                    (
                        Fault::Add {
                            service: service.into(),
                            backend: b.clone(),
                        },
                        Fault::Remove {
                            service: service.into(),
                            backend: b,
                        },
                    )
                } else {
                    let b = pick.to_string();
                    (
                        Fault::Remove {
                            service: service.into(),
                            backend: b.clone(),
                        },
                        Fault::Add {
                            service: service.into(),
                            backend: b,
                        },
                    )
                };
                pending.push(Step {
                    at: back,
                    fault: later,
                });
                now
            }
            3 if service_busy.get(service).is_none_or(|&u| t > u) => {
                let b = members[rng.usize(..members.len())].clone();
                if rng.usize(..3) == 0 {
                    let back = t + secs(&mut rng, 2.0, 6.0);
                    service_busy.insert(service, back);
                    pending.push(Step {
                        at: back,
                        fault: Fault::Weight {
                            service: service.into(),
                            backend: b.clone(),
                            weight: 100,
                        },
                    });
                    Fault::Weight {
                        service: service.into(),
                        backend: b,
                        weight: 0,
                    }
                } else {
                    Fault::Weight {
                        service: service.into(),
                        backend: b,
                        weight: [50, 100, 150, 200][rng.usize(..4)],
                    }
                }
            }
            4 => {
                let now = &model.services[service].0;
                let others: Vec<&&str> = STRATEGIES.iter().filter(|s| **s != now.as_str()).collect();
                Fault::Strategy {
                    service: service.into(),
                    strategy: others[rng.usize(..others.len())].to_string(),
                }
            }
            5 => {
                // A non-zero weight: a zero is a fault with its own undo.
                let b = members[rng.usize(..members.len())].clone();
                Fault::Reload {
                    service: service.into(),
                    backend: b,
                    weight: [50, 100, 150, 200][rng.usize(..4)],
                }
            }
            6 => Fault::KillDaemon,
            7 if lab.upgrades => Fault::UpgradeProgram,
            _ => continue,
        };
        model.apply(&fault);
        steps.push(Step { at: t, fault });
    }
    steps.extend(pending);
    steps.sort_by_key(|s| s.at);
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB: Lab = Lab {
        services: &["web4", "web6", "dns4", "dns6"],
        members: &["b1", "b2", "b3", "b4"],
        spare: "b5",
        upgrades: true,
    };

    #[test]
    fn upgrades_are_scheduled_only_with_a_second_build() {
        let (len, q) = (Duration::from_secs(120), Duration::from_secs(5));
        let upgrades = |lab: &Lab| {
            schedule(27, len, q, lab)
                .iter()
                .filter(|s| s.fault == Fault::UpgradeProgram)
                .count()
        };
        assert!(upgrades(&LAB) >= 1);
        assert_eq!(
            upgrades(&Lab {
                upgrades: false,
                ..LAB
            }),
            0
        );
    }

    #[test]
    fn a_seed_replays_and_another_differs() {
        let len = Duration::from_secs(120);
        let q = Duration::from_secs(5);
        let a = schedule(7, len, q, &LAB);
        assert_eq!(a, schedule(7, len, q, &LAB));
        assert_ne!(a, schedule(8, len, q, &LAB));
    }

    #[test]
    fn every_fault_is_undone_in_time_and_a_service_keeps_two_backends() {
        for seed in 0..200 {
            let len = Duration::from_secs(120);
            let q = Duration::from_secs(5);
            let steps = schedule(seed, len, q, &LAB);
            assert!(steps.len() >= 20, "seed {seed}: {} steps", steps.len());
            let mut model = Model::new(LAB.services, LAB.members);
            let (mut stopped, mut down) = (Vec::<String>::new(), Vec::<String>::new());
            for s in &steps {
                assert!(s.at >= q && s.at <= len - q, "seed {seed}: {s:?}");
                model.apply(&s.fault);
                match &s.fault {
                    Fault::StopServer(b) => stopped.push(b.clone()),
                    Fault::StartServer(b) => stopped.retain(|x| x != b),
                    Fault::LinkDown(b) => down.push(b.clone()),
                    Fault::LinkUp(b) => down.retain(|x| x != b),
                    _ => {}
                }
                assert!(
                    stopped.len() + down.len() <= 1,
                    "seed {seed}: two outages at once"
                );
                for (name, (_, members)) in &model.services {
                    let live = members
                        .iter()
                        .filter(|(b, w)| **w > 0 && !stopped.contains(b) && !down.contains(b))
                        .count();
                    assert!(live >= 2, "seed {seed}: {name} down to {live} at {s:?}");
                }
            }
            assert!(
                stopped.is_empty() && down.is_empty(),
                "seed {seed}: an outage not undone"
            );
            for (_, members) in model.services.values() {
                assert!(!members.contains_key("b5"), "seed {seed}: the spare stayed");
                assert_eq!(members.len(), 4, "seed {seed}");
                assert!(members.values().all(|&w| w > 0), "seed {seed}: a weight 0 stayed");
            }
        }
    }
}
