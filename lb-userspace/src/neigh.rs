//! Backend next hops from the kernel: the egress interface (route lookup), its MAC, and the
//! backend's MAC from the neighbour table. Resolution is triggered the kernel's own way
//! (RTM_NEWNEIGH with NTF_USE), never by typing MACs in.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use futures::TryStreamExt;
use rtnetlink::{
    Handle,
    packet_route::{
        AddressFamily,
        link::LinkAttribute,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage},
    },
};
use thiserror::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub ifname: String,
    /// MAC of the egress interface.
    pub src_mac: [u8; 6],
    /// The backend's MAC.
    pub dst_mac: [u8; 6],
}

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("backend {addr}: no route")]
    NoRoute { addr: IpAddr },
    #[error(
        "backend {addr} is not on a directly connected network (route via {gateway} on {ifname}); L2 DSR needs an on-link backend"
    )]
    NotOnLink {
        addr: IpAddr,
        gateway: IpAddr,
        ifname: String,
    },
    #[error("interface {ifname} has no Ethernet address")]
    NoLinkAddress { ifname: String },
    #[error("backend {addr} does not answer ARP/ND on {ifname}")]
    Unresolved { addr: IpAddr, ifname: String },
    #[error("netlink: {0}")]
    Netlink(String),
}

fn nl(e: impl std::fmt::Display) -> ResolveError {
    ResolveError::Netlink(e.to_string().replace('\n', " "))
}

pub struct Resolver {
    handle: Handle,
}

struct Route {
    ifindex: u32,
    ifname: String,
    src_mac: [u8; 6],
}

impl Resolver {
    /// Opens a netlink connection; must run inside a tokio runtime.
    pub fn new() -> Result<Self, ResolveError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(nl)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Resolves `addr`, triggering ARP/ND when the neighbour table has no usable entry, and
    /// waiting up to `timeout` for it.
    pub async fn resolve(&self, addr: IpAddr, timeout: Duration) -> Result<NextHop, ResolveError> {
        let route = self.route(addr).await?;
        if let Some(mac) = self.neighbour(addr, route.ifindex).await? {
            return Ok(hop(route, mac));
        }
        self.trigger(addr, route.ifindex).await?;
        let deadline = Instant::now() + timeout;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Some(mac) = self.neighbour(addr, route.ifindex).await? {
                return Ok(hop(route, mac));
            }
            if Instant::now() >= deadline {
                return Err(ResolveError::Unresolved {
                    addr,
                    ifname: route.ifname,
                });
            }
        }
    }

    /// The current usable next hop, without triggering resolution.
    pub async fn lookup(&self, addr: IpAddr) -> Result<NextHop, ResolveError> {
        let route = self.route(addr).await?;
        match self.neighbour(addr, route.ifindex).await? {
            Some(mac) => Ok(hop(route, mac)),
            None => Err(ResolveError::Unresolved {
                addr,
                ifname: route.ifname,
            }),
        }
    }

    async fn route(&self, addr: IpAddr) -> Result<Route, ResolveError> {
        let mut msg = RouteMessage::default();
        let (family, len, dst) = match addr {
            IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
        };
        msg.header.address_family = family;
        msg.header.destination_prefix_length = len;
        msg.attributes.push(RouteAttribute::Destination(dst));
        let route = match self.handle.route().get(msg).execute().try_next().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(ResolveError::NoRoute { addr }),
            // ENETUNREACH / EHOSTUNREACH from the lookup itself.
            Err(_) => return Err(ResolveError::NoRoute { addr }),
        };
        let mut ifindex = None;
        let mut gateway = None;
        for a in &route.attributes {
            match a {
                RouteAttribute::Oif(i) => ifindex = Some(*i),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(IpAddr::V4(*g)),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gateway = Some(IpAddr::V6(*g)),
                _ => {}
            }
        }
        let ifindex = ifindex.ok_or(ResolveError::NoRoute { addr })?;
        let (ifname, src_mac) = self.link(ifindex).await?;
        if let Some(gateway) = gateway {
            return Err(ResolveError::NotOnLink {
                addr,
                gateway,
                ifname,
            });
        }
        Ok(Route {
            ifindex,
            ifname,
            src_mac,
        })
    }

    async fn link(&self, ifindex: u32) -> Result<(String, [u8; 6]), ResolveError> {
        let link = self
            .handle
            .link()
            .get()
            .match_index(ifindex)
            .execute()
            .try_next()
            .await
            .map_err(nl)?
            .ok_or_else(|| nl(format!("interface #{ifindex} vanished")))?;
        let mut name = format!("#{ifindex}");
        let mut mac = None;
        for a in &link.attributes {
            match a {
                LinkAttribute::IfName(n) => name = n.clone(),
                LinkAttribute::Address(bytes) if bytes.len() == 6 => mac = Some(mac6(bytes)),
                _ => {}
            }
        }
        match mac {
            Some(mac) => Ok((name, mac)),
            None => Err(ResolveError::NoLinkAddress { ifname: name }),
        }
    }

    /// A usable MAC for `addr` on `ifindex`: any state with a link-layer address except
    /// INCOMPLETE and FAILED.
    async fn neighbour(&self, addr: IpAddr, ifindex: u32) -> Result<Option<[u8; 6]>, ResolveError> {
        let family = if addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let mut stream = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        while let Some(n) = stream.try_next().await.map_err(nl)? {
            if n.header.ifindex != ifindex
                || matches!(
                    n.header.state,
                    NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
                )
            {
                continue;
            }
            let mut dst = None;
            let mut lladdr = None;
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        dst = Some(IpAddr::V4(*v4))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        dst = Some(IpAddr::V6(*v6))
                    }
                    NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => lladdr = Some(mac6(b)),
                    _ => {}
                }
            }
            if dst == Some(addr)
                && let Some(mac) = lladdr.filter(|m| *m != [0; 6])
            {
                return Ok(Some(mac));
            }
        }
        Ok(None)
    }

    /// RTM_NEWNEIGH with NTF_USE: the kernel creates the entry if needed and starts ARP/ND.
    async fn trigger(&self, addr: IpAddr, ifindex: u32) -> Result<(), ResolveError> {
        self.handle
            .neighbours()
            .add(ifindex, addr)
            .flags(NeighbourFlags::Use)
            .replace()
            .execute()
            .await
            .map_err(nl)
    }
}

fn hop(route: Route, dst_mac: [u8; 6]) -> NextHop {
    NextHop {
        ifindex: route.ifindex,
        ifname: route.ifname,
        src_mac: route.src_mac,
        dst_mac,
    }
}

fn mac6(b: &[u8]) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[..6]);
    m
}
