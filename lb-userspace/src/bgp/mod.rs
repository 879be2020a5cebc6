//! Announcing the VIPs over BGP, through BIRD 2 (`bird`): a reader of the writer's snapshot
//! like metrics, it decides which VIPs this node announces (`announce`) on every snapshot, on a
//! drain or undrain and every second, rewrites BIRD's config when that changes, and publishes
//! BIRD's and the sessions' state (`status::bgp`). A change reaches BIRD within one pass.

pub mod announce;
pub mod bird;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use log::{info, warn};
use tokio::sync::watch;

use crate::{
    model::bgp_settings::BgpSettings,
    snapshot::Snapshot,
    status::bgp::{BgpStatus, Session},
};
use announce::{Node, decide};
use bird::{Bird, Paths};

/// How often BIRD and the sessions are looked at, and the attachment checked.
const TICK: Duration = Duration::from_secs(1);

/// Where the drain flag lives: a file, so a node drained before a restart stays drained
/// (a rolling upgrade undrains it once the new binary runs).
pub fn drain_path(run_dir: &Path, instance: &str) -> PathBuf {
    run_dir.join(format!("{instance}.draining"))
}

/// The data plane is attached: every interface's link pin is there (`lb detach` removes them).
pub fn attached(instance: &str, interfaces: &[String]) -> bool {
    let pins = crate::dataplane::pin_dir(instance);
    !interfaces.is_empty() && interfaces.iter().all(|i| pins.join(format!("link_{i}")).exists())
}

/// What the announcer needs of the daemon's config.
pub struct Announcer {
    pub settings: BgpSettings,
    pub instance: String,
    pub interfaces: Vec<String>,
    pub run_dir: PathBuf,
}

impl Announcer {
    /// Runs until the snapshot's sender is gone.
    pub async fn run(
        self,
        mut snapshot: watch::Receiver<Arc<Snapshot>>,
        mut draining: watch::Receiver<bool>,
        cluster: Arc<Mutex<crate::status::cluster::ClusterStatus>>,
        out: Arc<Mutex<BgpStatus>>,
    ) {
        let bird = Bird::new(Paths::new(&self.run_dir, &self.instance), &self.settings);
        // What BIRD was last told; `None` until it took a config.
        let mut applied: Option<BTreeSet<IpAddr>> = None;
        let mut error: Option<String> = None;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = snapshot.changed() => if r.is_err() { break },
                r = draining.changed() => if r.is_err() { break },
                _ = tick.tick() => {}
            }
            let snap = snapshot.borrow_and_update().clone();
            let node = Node {
                attached: attached(&self.instance, &self.interfaces),
                draining: *draining.borrow_and_update(),
                caught_up: {
                    let c = cluster.lock().unwrap_or_else(|p| p.into_inner());
                    !c.enabled || c.caught_up
                },
                peer_v4: self.settings.peers.iter().any(|p| p.address.is_ipv4()),
                peer_v6: self.settings.peers.iter().any(|p| p.address.is_ipv6()),
            };
            let (vips, services) = decide(&snap.services, &snap.weights, &snap.status, node);
            // One `birdc` call a tick tells both whether BIRD answers and how its sessions are;
            // a BIRD that died (or was stopped) takes the config again, from a fresh start.
            let mut protocols = bird.protocols().await;
            let running = protocols.is_some();
            if applied.as_ref() != Some(&vips) || !running {
                let config = bird::render(&self.settings, &bird.paths.log, &vips);
                match bird.apply(&config, running).await {
                    Ok(()) => {
                        if applied.as_ref() != Some(&vips) {
                            info!("bgp: announcing {} VIPs: {vips:?}", vips.len());
                        }
                        applied = Some(vips.clone());
                        error = None;
                    }
                    Err(e) => {
                        if error.as_ref() != Some(&e) {
                            warn!("bgp: {e}");
                        }
                        applied = None;
                        error = Some(e);
                    }
                }
                // The sessions as the new config left them.
                protocols = bird.protocols().await;
            }
            let sessions = self
                .settings
                .peers
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let name = bird::protocol_name(i);
                    let found = protocols.iter().flatten().find(|s| s.name == name);
                    let (state, info) = found
                        .map_or(("down".to_string(), "BIRD does not answer".to_string()), |s| {
                            (s.state.clone(), s.info.clone())
                        });
                    let bgp_state = info.split_whitespace().next().unwrap_or_default().to_string();
                    Session {
                        peer: p.address,
                        up: state == "up" && bgp_state == "Established",
                        state,
                        bgp_state,
                        info,
                    }
                })
                .collect();
            let announced = applied.iter().flatten().copied().collect();
            *out.lock().unwrap_or_else(|p| p.into_inner()) = BgpStatus {
                enabled: true,
                bird_running: protocols.is_some(),
                error: error.clone(),
                draining: node.draining,
                sessions,
                announced,
                services: if applied.is_some() {
                    services
                } else {
                    // BIRD holds no config of ours: nothing is announced, whatever was wanted.
                    services
                        .into_iter()
                        .map(|(n, mut a)| {
                            a.reason = a.reason.or_else(|| Some("BIRD is not running our config".into()));
                            a.announced = false;
                            (n, a)
                        })
                        .collect()
                },
            };
        }
    }
}
