//! Warnings about settings outside the balancer that keep a service from working as
//! configured, each with its fix. Given with every change's answer.

use std::{collections::HashMap, net::IpAddr};

use super::inbox::Change;
use crate::{
    config::DaemonConfig,
    dataplane,
    model::{Forwarding, Service},
    neigh::{NextHop, Resolver},
};

/// Encapsulated services whose backends' routes cannot carry a full-size client packet
/// plus the outer headers: such packets get "too big" answers, or are dropped. Says so,
/// with the fix.
pub async fn encap_mtu(
    resolver: &Resolver,
    interfaces: &[String],
    services: &[Service],
    hops: &HashMap<IpAddr, NextHop>,
) -> Vec<String> {
    let mut client = (0, "");
    for iface in interfaces {
        let Ok(index) = dataplane::ifindex(iface) else {
            continue;
        };
        if let Some(mtu) = resolver.interface_mtu(index).await
            && mtu > client.0
        {
            client = (mtu, iface.as_str());
        }
    }
    let (client_mtu, client_if) = client;
    let mut out = Vec::new();
    for s in services {
        let overhead = match (s.forwarding, s.vip.is_ipv4()) {
            (Forwarding::Ipip, true) => 20,
            (Forwarding::Ipip, false) => 40,
            (Forwarding::Gue, true) => 32,
            (Forwarding::Gue, false) => 52,
            _ => continue,
        };
        let need = client_mtu + overhead;
        let short: Vec<(&str, u32)> = s
            .backends
            .iter()
            .filter_map(|b| {
                let hop = hops.get(&b.address)?;
                (hop.mtu > 0 && hop.mtu < need).then_some((b.id.as_str(), hop.mtu))
            })
            .collect();
        if let Some(&(id, mtu)) = short.iter().min_by_key(|(_, m)| *m) {
            out.push(format!(
                "service {}: the routes to {} of its {} backends take less than the {need} bytes a full-size \
                 client packet ({client_if} MTU {client_mtu}) needs once encapsulated (smallest: {id}, {mtu}); \
                 such packets get ICMP \"too big\" answers, or are dropped (fix: raise the MTU towards the \
                 backends to {need})",
                s.name,
                short.len(),
                s.backends.len()
            ));
        }
    }
    out
}

/// bpf_fib_lookup answers only for interfaces that forward: without it IPIP traffic is passed
/// to the kernel (counted as pass_no_route). Says so, with the fix.
pub fn forwarding(interfaces: &[String], services: &[Service]) -> Vec<String> {
    let mut out = Vec::new();
    for (family, v4) in [("ipv4", true), ("ipv6", false)] {
        let encap = services
            .iter()
            .any(|s| !s.forwarding.needs_l2() && s.vip.is_ipv4() == v4);
        if !encap {
            continue;
        }
        for iface in interfaces {
            let path = format!("/proc/sys/net/{family}/conf/{iface}/forwarding");
            if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
                out.push(format!(
                    "IPIP/GUE services need forwarding on {iface} for the FIB lookup; until then their \
                     packets are passed to the kernel (fix: sysctl -w net.{family}.conf.{iface}.forwarding=1)"
                ));
            }
        }
    }
    out
}

/// SNAT needs its source address on this host (backends' replies are sent to it), and a port
/// range the kernel does not also hand out from that address.
pub fn nat(cfg: &DaemonConfig, services: &[Service]) -> Vec<String> {
    let mut out = Vec::new();
    let mut sources: Vec<IpAddr> = services
        .iter()
        .filter(|s| s.snat)
        .filter_map(|s| cfg.nat.source_for(s.vip))
        .collect();
    sources.sort();
    sources.dedup();
    for a in &sources {
        if std::net::UdpSocket::bind((*a, 0)).is_err() {
            out.push(format!(
                "daemon.nat source {a} is not an address of this host: backends' replies to it will not reach the balancer (fix: assign it on the backend-facing interface)"
            ));
        }
    }
    let local = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let range = local.as_deref().and_then(|t| {
        let mut it = t.split_whitespace().map(|x| x.parse::<u16>().ok());
        Some((it.next()??, it.next()??))
    });
    if let (false, Some((lo, hi))) = (sources.is_empty(), range)
        && cfg.nat.ports.overlaps(lo, hi)
    {
        out.push(format!(
            "daemon.nat.ports {}-{} overlaps the kernel's ip_local_port_range {lo}-{hi}: a local connection from the SNAT address could take a port in use (fix: move one of them)",
            cfg.nat.ports.first, cfg.nat.ports.last
        ));
    }
    out
}

/// The services a change can leave in a state `risky` warns about.
pub enum Touched {
    /// None: heartbeats, scores, load reports, strategies (the most frequent changes).
    Nothing,
    Service(String),
    All,
}

impl Touched {
    pub fn of(change: &Change) -> Self {
        match change {
            Change::Replace(_) | Change::Reload(_) => Self::All,
            Change::AddService(s) => Self::Service(s.name.clone()),
            Change::AddBackend { service, .. }
            | Change::RemoveBackend { service, .. }
            | Change::SetWeight { service, .. } => Self::Service(service.clone()),
            _ => Self::Nothing,
        }
    }
}

/// What one change did that is legal but likely a mistake, each with what follows and the
/// way back: a service left with every backend at weight 0, a service's last backend removed,
/// a port-0 service that takes the other ports of a VIP another service uses. Said only when
/// this change made it so (`before` is the services the change was applied to; `touched`, the
/// ones it can have changed).
pub fn risky(before: &[Service], after: &[Service], touched: &Touched) -> Vec<String> {
    let mut out = Vec::new();
    let only = match touched {
        Touched::Nothing => return out,
        Touched::Service(name) => Some(name.as_str()),
        Touched::All => None,
    };
    let was_of: HashMap<&str, &Service> = before.iter().map(|s| (s.name.as_str(), s)).collect();
    for s in after.iter().filter(|s| only.is_none_or(|n| n == s.name)) {
        let was = was_of.get(s.name.as_str()).copied();
        let all_zero = |x: &Service| !x.backends.is_empty() && x.backends.iter().all(|b| b.weight == 0);
        if all_zero(s) && !was.is_some_and(all_zero) {
            out.push(format!(
                "service {}: every backend has weight 0: its new flows are dropped (drop_no_backend), \
                 established ones stay (fix: give a backend a weight above 0)",
                s.name
            ));
        }
        if s.backends.is_empty() && was.is_some_and(|b| !b.backends.is_empty()) {
            out.push(format!(
                "service {}: its last backend was removed: its new flows are dropped (drop_no_backend) \
                 until one is added (lb service remove {} takes the service away)",
                s.name, s.name
            ));
        }
        let widened =
            s.port == 0 && !was.is_some_and(|b| b.port == 0 && b.vip == s.vip && b.protocol == s.protocol);
        if widened {
            let others: Vec<String> = after
                .iter()
                .filter(|o| o.name != s.name && o.vip == s.vip && o.protocol == s.protocol)
                .map(|o| format!("{} (port {})", o.name, o.port))
                .collect();
            if !others.is_empty() {
                out.push(format!(
                    "service {}: port 0 takes every other {} port of {}, which {} also uses: flows to \
                     any other port of that VIP now go to {}'s backends",
                    s.name,
                    s.protocol,
                    s.vip,
                    others.join(", "),
                    s.name
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Protocol};

    fn svc(name: &str, vip: &str, port: u16, weights: &[u32]) -> Service {
        Service {
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| Backend {
                    weight: w,
                    ..Backend::new(format!("b{i}"), format!("10.0.1.{}", i + 1).parse().unwrap())
                })
                .collect(),
            ..Service::new(name, vip.parse().unwrap(), port, Protocol::Tcp)
        }
    }

    #[test]
    fn a_change_that_leaves_no_weight_is_said_once() {
        let before = [svc("web", "10.0.0.1", 80, &[100, 0])];
        let after = [svc("web", "10.0.0.1", 80, &[0, 0])];
        let w = risky(&before, &after, &Touched::All);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("service web: every backend has weight 0"),
            "{w:?}"
        );
        // Already so before: not said again on the next change.
        assert!(risky(&after, &after, &Touched::All).is_empty());
        // A new service added with every backend at 0: said.
        assert_eq!(risky(&[], &after, &Touched::All).len(), 1);
    }

    #[test]
    fn removing_the_last_backend_is_said() {
        let before = [svc("web", "10.0.0.1", 80, &[100])];
        let after = [svc("web", "10.0.0.1", 80, &[])];
        let w = risky(&before, &after, &Touched::All);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("its last backend was removed"), "{w:?}");
        // A service added with no backend yet, or removed whole: nothing to say.
        assert!(risky(&[], &after, &Touched::All).is_empty());
        assert!(risky(&before, &[], &Touched::All).is_empty());
    }

    #[test]
    fn a_port_0_service_on_a_used_vip_is_said() {
        let web = svc("web", "10.0.0.1", 80, &[100]);
        let all = svc("all", "10.0.0.1", 0, &[100]);
        let w = risky(
            std::slice::from_ref(&web),
            &[web.clone(), all.clone()],
            &Touched::All,
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(
            w[0],
            "service all: port 0 takes every other tcp port of 10.0.0.1, which web (port 80) also uses: \
             flows to any other port of that VIP now go to all's backends"
        );
        // Another VIP, another protocol, or the same service kept: nothing.
        let elsewhere = svc("all", "10.0.0.2", 0, &[100]);
        assert!(
            risky(
                std::slice::from_ref(&web),
                &[web.clone(), elsewhere],
                &Touched::All
            )
            .is_empty()
        );
        let mut udp = all.clone();
        udp.protocol = Protocol::Udp;
        assert!(risky(std::slice::from_ref(&web), &[web.clone(), udp], &Touched::All).is_empty());
        let both = [web, all];
        assert!(risky(&both, &both, &Touched::All).is_empty());
    }

    #[test]
    fn only_the_services_a_change_touches_are_looked_at() {
        let before = [
            svc("web", "10.0.0.1", 80, &[100]),
            svc("api", "10.0.0.2", 80, &[100]),
        ];
        let after = [svc("web", "10.0.0.1", 80, &[0]), svc("api", "10.0.0.2", 80, &[0])];
        let weight = |service: &str| Change::SetWeight {
            service: service.into(),
            id: "b0".into(),
            weight: 0,
        };
        let w = risky(&before, &after, &Touched::of(&weight("api")));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("service api:"), "{w:?}");
        let beat = Change::Heartbeat {
            service: "web".into(),
            id: "b0".into(),
        };
        assert!(risky(&before, &after, &Touched::of(&beat)).is_empty());
        assert_eq!(
            risky(&before, &after, &Touched::of(&Change::Replace(vec![]))).len(),
            2
        );
    }
}
