//! The check path (`through = "vip"`): a veth pair whose first end takes the check sockets'
//! packets (policy routing by socket mark) and whose second end runs the steering program,
//! which forwards each packet to the one backend its mark names, as client traffic is
//! forwarded. Made when the first such check runs; removed when the daemon stops.
//!
//! Why a veth: XDP sees only received frames, and a locally sent packet is received by the
//! peer of the veth it leaves by. The egress classifier on the first end copies the socket
//! mark (which the peer's XDP cannot see) into the source MAC.
//!
//! The steering program runs in the data plane's mode (`steer_mode`): its packets then leave
//! the balancer's interface the way the clients' do, and a check fails where they would.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, tc},
};
use lb_common::{maps, steer};
use log::info;
use rtnetlink::{
    Handle, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        route::RouteScope,
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};

/// The check device and its peer, named after the instance (at most 15 bytes each).
pub fn device_names(instance: &str) -> (String, String) {
    let short: String = instance
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(9)
        .collect();
    (format!("lbck-{short}"), format!("lbck-{short}p"))
}

/// The made check path; `close` removes it.
pub struct CheckPath {
    pub device: String,
    /// Holds the programs (and so their attachments) for as long as the path is open.
    _ebpf: Ebpf,
}

impl CheckPath {
    /// Makes the check path anew (any leftover of a crashed daemon is removed first), its
    /// program in the mode of the data plane's `attached` interfaces.
    pub async fn open(cfg: &super::Settings, attached: &[super::Attachment]) -> Result<Self, String> {
        let (device, peer) = device_names(&cfg.instance);
        let handle = connect()?;
        remove(&handle, &device).await;
        let mode = steer_mode(cfg.attach, attached);
        let made = make(&handle, cfg, &device, &peer, mode).await;
        if made.is_err() {
            remove(&handle, &device).await;
        }
        let ebpf = made?;
        let mode = if mode == XdpMode::Skb { "generic" } else { "native" };
        info!("check path {device} -> {peer} ready (checks through the VIP, {mode} mode)");
        Ok(Self { device, _ebpf: ebpf })
    }

    /// Removes the device pair (its routes and programs go with it) and the routing rules.
    pub async fn close(self) {
        match connect() {
            Ok(handle) => {
                if remove(&handle, &self.device).await {
                    info!("check path {} removed", self.device);
                }
            }
            Err(e) => log::warn!("{e}"),
        }
    }
}

/// Removes an instance's check path if one is there (`lb detach`, and before making one).
pub async fn remove_instance(instance: &str) -> bool {
    let Ok(handle) = connect() else { return false };
    remove(&handle, &device_names(instance).0).await
}

fn connect() -> Result<Handle, String> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| format!("check path: netlink: {e}"))?;
    tokio::spawn(connection);
    Ok(handle)
}

/// The mode the steering program runs in: the data plane's. A native program's redirect goes
/// through the target driver's own XDP transmit, which a driver run in generic mode may lack
/// and which a veth refuses unless its peer runs XDP: every check was lost there while the
/// clients' traffic, generic, passed. A generic program's redirect goes through the device's
/// ordinary transmit, as generic client traffic does. Generic when the daemon is set to it or
/// any interface took it (`auto` falling back); native otherwise.
pub fn steer_mode(setting: super::AttachMode, attached: &[super::Attachment]) -> XdpMode {
    if setting == super::AttachMode::Generic || attached.iter().any(|a| a.mode == "generic") {
        XdpMode::Skb
    } else {
        XdpMode::Driver
    }
}

async fn make(
    handle: &Handle,
    cfg: &super::Settings,
    device: &str,
    peer: &str,
    mode: XdpMode,
) -> Result<Ebpf, String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("check path {device}: {what}: {e}");
    handle
        .link()
        .add(LinkVeth::new(device, peer).build())
        .execute()
        .await
        .map_err(|e| fail("create veth pair", &e))?;
    // No duplicate address detection on the pair: until the link-local address passed it (a
    // second or more), IPv6 would not send by the device.
    for dev in [device, peer] {
        let path = format!("/proc/sys/net/ipv6/conf/{dev}/accept_dad");
        std::fs::write(&path, "0").map_err(|e| fail(&format!("write {path}"), &e))?;
    }
    // No neighbour resolution on the sending end: the frame's MACs are the programs' to write.
    handle
        .link()
        .set(
            LinkUnspec::new_with_name(device)
                .arp(false)
                .address(steer::DEVICE_MAC.to_vec())
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|e| fail("set up", &e))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_name(peer)
                .address(steer::DEVICE_MAC.to_vec())
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|e| fail("set up peer", &e))?;
    // Full checksums: a partial one would leave with the packet, which XDP forwards as it is.
    crate::link::tx_checksum_off(device).map_err(|e| fail("turn off tx checksum offload", &e))?;
    // bpf_fib_lookup (IPIP/GUE next hops) answers only for an interface that forwards.
    for family in ["ipv4", "ipv6"] {
        let path = format!("/proc/sys/net/{family}/conf/{peer}/forwarding");
        std::fs::write(&path, "1").map_err(|e| fail(&format!("write {path}"), &e))?;
    }
    let index = super::ifindex(device).map_err(|e| fail("index", &e))?;
    for v6 in [false, true] {
        let rule = rule(handle);
        let added = if v6 {
            rule.v6().execute().await
        } else {
            rule.v4().execute().await
        };
        added.map_err(|e| fail("add routing rule", &e))?;
        let route = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new()
                .output_interface(index)
                .table_id(steer::ROUTE_TABLE)
                .scope(RouteScope::Link)
                .build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .output_interface(index)
                .table_id(steer::ROUTE_TABLE)
                .scope(RouteScope::Link)
                .build()
        };
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|e| fail("add route", &e))?;
    }
    attach(cfg, device, peer, mode)
}

/// Loads the two programs with the instance's pinned maps and attaches them.
fn attach(cfg: &super::Settings, device: &str, peer: &str, mode: XdpMode) -> Result<Ebpf, String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("check path {device}: {what}: {e}");
    let dir = super::pin_dir(&cfg.instance);
    if !Path::new(&dir).exists() {
        return Err(fail("no data plane", &dir.display()));
    }
    let mut ebpf = super::load::load_object(cfg, &dir).map_err(|e| fail("load", &e))?;
    let xdp: &mut Xdp = ebpf
        .program_mut(maps::PROG_STEER)
        .ok_or_else(|| fail("program", &maps::PROG_STEER))?
        .try_into()
        .map_err(|e| fail("program", &e))?;
    xdp.load().map_err(|e| fail("verifier rejected steer", &e))?;
    xdp.attach(peer, mode).map_err(|e| fail("attach steer", &e))?;
    tc::qdisc_add_clsact(device).map_err(|e| fail("add clsact qdisc", &e))?;
    let cls: &mut SchedClassifier = ebpf
        .program_mut(maps::PROG_STEER_MARK)
        .ok_or_else(|| fail("program", &maps::PROG_STEER_MARK))?
        .try_into()
        .map_err(|e| fail("program", &e))?;
    cls.load().map_err(|e| fail("verifier rejected steer_mark", &e))?;
    cls.attach(device, TcAttachType::Egress)
        .map_err(|e| fail("attach steer_mark", &e))?;
    Ok(ebpf)
}

/// Removes the device (its peer, routes and programs go with it) and both rules. Returns
/// whether a device was there.
async fn remove(handle: &Handle, device: &str) -> bool {
    let had = match super::ifindex(device) {
        Ok(index) => match handle.link().del(index).execute().await {
            Ok(()) => true,
            Err(e) => {
                log::warn!("check path {device}: remove: {e}");
                false
            }
        },
        Err(_) => false,
    };
    for v6 in [false, true] {
        let rule = rule(handle);
        let message: RuleMessage = if v6 {
            rule.v6().message_mut().clone()
        } else {
            rule.v4().message_mut().clone()
        };
        let _ = handle.rule().del(message).execute().await;
    }
    had
}

/// `ip rule add fwmark MARK_BASE/MARK_MASK table ROUTE_TABLE priority RULE_PRIORITY`, without
/// its family yet.
fn rule(handle: &Handle) -> rtnetlink::RuleAddRequest {
    let mut rule = handle
        .rule()
        .add()
        .table_id(steer::ROUTE_TABLE)
        .priority(steer::RULE_PRIORITY)
        .fw_mark(steer::MARK_BASE)
        .action(RuleAction::ToTable);
    rule.message_mut()
        .attributes
        .push(RuleAttribute::FwMask(steer::MARK_MASK));
    rule
}

/// The source a check through the VIP uses: the kernel's choice toward the backend itself, so
/// the backend's answer (from the VIP, straight back) reaches this host.
pub fn source_toward(backend: IpAddr) -> std::io::Result<IpAddr> {
    let any: IpAddr = match backend {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let probe = std::net::UdpSocket::bind((any, 0))?;
    // A UDP connect sends nothing: it only looks up the route.
    probe.connect((backend, 9))?;
    Ok(probe.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_fit_an_interface_name() {
        for instance in ["default", "a-very-long-instance-name-indeed", "x", "web.edge_1"] {
            let (d, p) = device_names(instance);
            assert!(d.len() <= 15 && p.len() <= 15, "{d} {p}");
            assert_ne!(d, p);
        }
        assert_eq!(device_names("web.edge_1").0, "lbck-webedge1");
    }

    #[test]
    fn the_steering_program_runs_in_the_data_planes_mode() {
        use super::super::{AttachMode, Attachment};
        let on = |mode: &'static str| Attachment {
            interface: "eth0".into(),
            mode,
            adopted: mode == "pinned",
        };
        assert_eq!(steer_mode(AttachMode::Generic, &[]), XdpMode::Skb);
        assert_eq!(steer_mode(AttachMode::Generic, &[on("pinned")]), XdpMode::Skb);
        assert_eq!(steer_mode(AttachMode::Auto, &[on("generic")]), XdpMode::Skb);
        assert_eq!(
            steer_mode(AttachMode::Auto, &[on("native"), on("generic")]),
            XdpMode::Skb
        );
        assert_eq!(steer_mode(AttachMode::Auto, &[on("native")]), XdpMode::Driver);
        assert_eq!(steer_mode(AttachMode::Native, &[on("pinned")]), XdpMode::Driver);
    }
}
