//! Which VIPs this node announces, and why not the others. A VIP is announced while the data
//! plane is attached, the node is not draining, and one of its services can take new flows
//! (some backend has weight, and not only by panic) or says `announce = "always"`. Pure: the
//! announcer calls it on every snapshot, drain change and tick.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{
    model::{BackendRef, Service, bgp_settings::Announce},
    status::{BackendStatus, HealthState, ServiceWeights, bgp::Announcement},
};

/// What the announcer knows of the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node {
    pub attached: bool,
    pub draining: bool,
    /// In cluster mode, the node has applied the cluster's state since it started (a node
    /// that lost etcd later keeps what it had, and keeps announcing).
    pub caught_up: bool,
    /// Some peer's session carries IPv4 routes (an IPv4 peer), and IPv6 routes (an IPv6 one).
    pub peer_v4: bool,
    pub peer_v6: bool,
}

/// Why a service cannot take new flows, if it cannot.
fn unserving(
    s: &Service,
    weights: Option<&ServiceWeights>,
    status: &BTreeMap<BackendRef, BackendStatus>,
) -> Option<&'static str> {
    let Some(w) = weights else {
        return Some("not in the tables yet");
    };
    if !w.backends.values().any(|e| e.weight > 0) {
        return Some("no backend takes new flows");
    }
    // Panic spreads flows over backends that are down: that is no reason to draw traffic here.
    if w.panic
        && !s.backends.iter().any(|b| {
            status
                .get(&BackendRef::new(&s.name, &b.id))
                .is_none_or(|st| st.health == HealthState::Up)
        })
    {
        return Some("no backend is up (panic)");
    }
    None
}

/// The VIPs to announce, and each service's announcement.
pub fn decide(
    services: &[Service],
    weights: &BTreeMap<String, ServiceWeights>,
    status: &BTreeMap<BackendRef, BackendStatus>,
    node: Node,
) -> (BTreeSet<IpAddr>, BTreeMap<String, Announcement>) {
    let node_reason = if !node.attached {
        Some("the data plane is not attached")
    } else if !node.caught_up {
        Some("not caught up with the cluster's state yet")
    } else if node.draining {
        Some("the node is draining")
    } else {
        None
    };
    let mut vips = BTreeSet::new();
    let mut reasons: BTreeMap<&str, Option<&'static str>> = BTreeMap::new();
    for s in services {
        let carried = if s.vip.is_ipv6() {
            node.peer_v6
        } else {
            node.peer_v4
        };
        let no_peer = (!carried).then_some(if s.vip.is_ipv6() {
            "no IPv6 BGP peer to carry it"
        } else {
            "no IPv4 BGP peer to carry it"
        });
        let reason = node_reason.or(no_peer).or_else(|| match s.announce {
            Announce::Always => None,
            Announce::Healthy => unserving(s, weights.get(&s.name), status),
        });
        if reason.is_none() {
            vips.insert(s.vip);
        }
        reasons.insert(&s.name, reason);
    }
    // A VIP is announced for all its services once one of them wants it.
    let per_service = services
        .iter()
        .map(|s| {
            let announced = vips.contains(&s.vip);
            let reason = (!announced).then(|| reasons[s.name.as_str()].unwrap_or_default().to_string());
            (
                s.name.clone(),
                Announcement {
                    vip: s.vip,
                    announced,
                    reason,
                },
            )
        })
        .collect();
    (vips, per_service)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{
        model::{Backend, Protocol},
        status::effective_weights,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn services() -> Vec<Service> {
        let svc = |name: &str, vip: &str, port: u16| Service {
            backends: vec![
                Backend::new("b0", ip("10.0.1.1")),
                Backend::new("b1", ip("10.0.1.2")),
            ],
            ..Service::new(name, ip(vip), port, Protocol::Tcp)
        };
        vec![
            svc("web", "10.100.0.1", 80),
            svc("tls", "10.100.0.1", 443),
            svc("dns", "10.100.0.2", 53),
        ]
    }

    fn down() -> BackendStatus {
        BackendStatus {
            health: HealthState::Down,
            score: 0.0,
            ..Default::default()
        }
    }

    fn run(
        services: &[Service],
        status: &BTreeMap<BackendRef, BackendStatus>,
        node: Node,
    ) -> (BTreeSet<IpAddr>, BTreeMap<String, Announcement>) {
        let weights = services
            .iter()
            .map(|s| {
                let w = effective_weights(s, s.strategy, status, |_| true, Instant::now());
                (s.name.clone(), w)
            })
            .collect();
        decide(services, &weights, status, node)
    }

    const UP: Node = Node {
        attached: true,
        draining: false,
        caught_up: true,
        peer_v4: true,
        peer_v6: true,
    };

    #[test]
    fn a_vip_no_peer_can_carry_is_not_announced_and_says_why() {
        let mut s = services();
        s[2].vip = ip("2001:db8::53");
        let (vips, per) = run(&s, &BTreeMap::new(), Node { peer_v6: false, ..UP });
        assert_eq!(vips, BTreeSet::from([ip("10.100.0.1")]));
        assert_eq!(per["dns"].reason.as_deref(), Some("no IPv6 BGP peer to carry it"));
        let (vips, per) = run(&s, &BTreeMap::new(), Node { peer_v4: false, ..UP });
        assert_eq!(vips, BTreeSet::from([ip("2001:db8::53")]));
        assert_eq!(per["web"].reason.as_deref(), Some("no IPv4 BGP peer to carry it"));
    }

    #[test]
    fn a_vip_is_announced_while_one_of_its_services_can_take_new_flows() {
        let s = services();
        let (vips, _) = run(&s, &BTreeMap::new(), UP);
        assert_eq!(vips, BTreeSet::from([ip("10.100.0.1"), ip("10.100.0.2")]));
        // Every backend of dns down: its VIP goes; web's stays though tls shares it.
        let mut st = BTreeMap::new();
        for b in ["b0", "b1"] {
            st.insert(BackendRef::new("dns", b), down());
            st.insert(BackendRef::new("tls", b), down());
        }
        let (vips, per) = run(&s, &st, UP);
        assert_eq!(vips, BTreeSet::from([ip("10.100.0.1")]));
        assert!(!per["dns"].announced);
        assert_eq!(per["dns"].reason.as_deref(), Some("no backend is up (panic)"));
        assert!(per["tls"].announced, "its VIP is announced for web");
        // One backend of dns back up: announced again.
        st.remove(&BackendRef::new("dns", "b1"));
        let (vips, _) = run(&s, &st, UP);
        assert!(vips.contains(&ip("10.100.0.2")));
    }

    #[test]
    fn drained_backends_withdraw_and_always_keeps_the_vip() {
        let mut s = services();
        for b in &mut s[2].backends {
            b.weight = 0;
        }
        let (vips, per) = run(&s, &BTreeMap::new(), UP);
        assert!(!vips.contains(&ip("10.100.0.2")));
        assert_eq!(per["dns"].reason.as_deref(), Some("no backend takes new flows"));
        s[2].announce = Announce::Always;
        let (vips, _) = run(&s, &BTreeMap::new(), UP);
        assert!(vips.contains(&ip("10.100.0.2")));
    }

    #[test]
    fn nothing_is_announced_while_draining_detached_or_behind_the_cluster() {
        let mut s = services();
        s[0].announce = Announce::Always;
        for node in [
            Node { draining: true, ..UP },
            Node {
                attached: false,
                ..UP
            },
            // A node that has not applied the cluster's state since it started.
            Node {
                caught_up: false,
                ..UP
            },
        ] {
            let (vips, per) = run(&s, &BTreeMap::new(), node);
            assert!(vips.is_empty(), "{node:?}");
            assert!(per.values().all(|a| !a.announced && a.reason.is_some()));
        }
    }
}
