//! Warnings about settings outside the balancer that keep a service from working as
//! configured, each with its fix. Given with every change's answer.

use std::{collections::HashMap, net::IpAddr};

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
