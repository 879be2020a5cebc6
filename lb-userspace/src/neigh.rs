//! Next hops of backends for L2 direct server return, learned from the kernel.
//!
//! The data plane rewrites a packet's Ethernet addresses and transmits it on the interface that
//! reaches the backend, so for every backend address the daemon needs the egress interface (its
//! index, name and MAC) and the backend's MAC. All of it comes from the kernel over route
//! netlink, never from the user:
//!
//! 1. `RTM_GETROUTE` for the backend address (what `ip route get` does) gives the egress
//!    interface, and whether the route has a gateway. A backend behind a gateway cannot be
//!    reached at L2, so that is an error ([`ResolveError::NotOnLink`]).
//! 2. `RTM_GETLINK` on that interface gives its name and MAC (the source MAC of forwarded
//!    frames). It must be an Ethernet interface.
//! 3. `RTM_GETNEIGH` for (interface, backend) reads the neighbour table. Entries whose state
//!    carries a valid link-layer address (REACHABLE, STALE, DELAY, PROBE, PERMANENT, NOARP) are
//!    usable; NONE, INCOMPLETE and FAILED are not.
//! 4. If there is no usable entry, [`Resolver::resolve`] asks the kernel to resolve the address
//!    with `RTM_NEWNEIGH` carrying `NTF_USE` (the kernel then runs `neigh_event_send`, exactly as
//!    if a packet were waiting for the neighbour: ARP or ND starts, and the normal state machine
//!    and retransmit timers apply), and polls the table every 20 ms until the entry becomes usable,
//!    the kernel gives up (FAILED), or the caller's timeout passes.
//!
//! `NTF_USE` needs `CAP_NET_ADMIN` (the daemon has it anyway to load XDP programs). Should the
//! kernel refuse it, resolution is triggered instead by sending one empty UDP datagram from a
//! connected socket to the backend's discard port (9): the kernel queues it on the neighbour
//! entry and resolves the address to deliver it. Nothing is sent to any other address, and the
//! discard service ignores the datagram if the backend runs one.
//!
//! When [`Resolver::resolve`] finds a usable but STALE entry it returns the cached MAC at once and
//! also sends `NTF_USE` (without waiting), which makes the kernel re-confirm the MAC with unicast
//! probes: frames forwarded by XDP never pass through the kernel's neighbour code, so nothing
//! else would ever re-check an entry that only the data plane uses. [`Resolver::lookup`] never
//! does this; it only reads.
//!
//! Limits: IPv6 link-local backends are refused (an address without a scope names no
//! interface). The kernel sends neighbour solicitations for an entry with no queued packet from
//! the interface's link-local address, so on an interface that has just come up, ND can take the
//! second or two of duplicate address detection before it starts (both ends' link-local
//! addresses matter); test topologies should add their link-local addresses with `nodad`.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use futures::StreamExt;
use log::{debug, warn};
use rtnetlink::{
    Handle,
    packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        link::{LinkAttribute, LinkLayerType, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType, RouteVia},
    },
};
use tokio::time::Instant;

/// How often [`Resolver::resolve`] re-reads the neighbour table while the kernel resolves.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Longest wait for the kernel's answer to one netlink request. The kernel answers at once; this
/// only guards against a reply that cannot be decoded (netlink-proto drops those, and the
/// request would otherwise wait forever).
const NETLINK_TIMEOUT: Duration = Duration::from_secs(2);
/// Most requests on the socket at once. The connection task sends one request per turn, so
/// thousands queued together (the routes of 16,384 backends) waited their turn inside their own
/// [`NETLINK_TIMEOUT`], and the last ones timed out (30,000 routes: 3,190 failed); bounded, each
/// request's time starts when it is sent, and its answer has room in the receive buffer.
const MAX_IN_FLIGHT: usize = 16;
/// The discard service (RFC 863): the target of the fallback resolution trigger.
const DISCARD_PORT: u16 = 9;

/// Neighbour states whose entry holds a link-layer address the kernel itself would send to.
const USABLE_STATES: u16 = libc::NUD_REACHABLE
    | libc::NUD_STALE
    | libc::NUD_DELAY
    | libc::NUD_PROBE
    | libc::NUD_PERMANENT
    | libc::NUD_NOARP;
/// Entries set by an administrator; the kernel never resolves them, so they are never triggered.
const STATIC_STATES: u16 = libc::NUD_PERMANENT | libc::NUD_NOARP;

/// Where and how to send frames to one backend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NextHop {
    /// The egress interface (the route's output interface).
    pub ifindex: u32,
    pub ifname: String,
    /// The egress interface's MAC: the source of forwarded frames.
    pub src_mac: [u8; 6],
    /// The backend's MAC, from the kernel's neighbour table.
    pub dst_mac: [u8; 6],
    /// Largest packet the route takes (its MTU metric, else the interface's); 0 when not
    /// looked up (on-link backends).
    pub mtu: u32,
}

/// Why a backend has no usable next hop. Every message is one line naming the backend.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The kernel has no route to the backend.
    #[error("no route to backend {addr}")]
    NoRoute { addr: IpAddr },
    /// The route to the backend goes through a gateway.
    #[error(
        "backend {addr} is not on a directly connected network (route via {gateway} on {ifname}); \
         L2 DSR needs an on-link backend"
    )]
    NotOnLink {
        addr: IpAddr,
        gateway: IpAddr,
        ifname: String,
    },
    /// The address is routable but not a unicast host on a link (local, broadcast, multicast,
    /// blackholed, prohibited, IPv6 link-local without a scope).
    #[error("backend {addr} cannot be reached at L2: {reason}")]
    Unroutable { addr: IpAddr, reason: String },
    /// The egress interface has no Ethernet address (loopback, a tunnel, WireGuard, ...).
    #[error(
        "backend {addr} is reached through {ifname}, which has no Ethernet address; \
         L2 DSR needs an Ethernet interface"
    )]
    NoLinkAddress { addr: IpAddr, ifname: String },
    /// The neighbour table has no usable entry: for [`Resolver::resolve`], the backend did not
    /// answer ARP/ND in time (`waited` > 0); for [`Resolver::lookup`], nothing was tried.
    #[error("backend {addr} is unresolved on {ifname}: {}", unresolved_detail(.waited))]
    Unresolved {
        addr: IpAddr,
        ifname: String,
        waited: Duration,
    },
    /// Talking to the kernel failed.
    #[error("netlink: {0}")]
    Netlink(String),
}

fn unresolved_detail(waited: &Duration) -> String {
    if waited.is_zero() {
        "no usable neighbour entry".to_string()
    } else {
        format!("no ARP/ND answer within {} ms", waited.as_millis())
    }
}

/// Resolves backends' next hops over its own route netlink connection.
pub struct Resolver {
    handle: Handle,
    /// Set once the kernel has refused `NTF_USE`, so the fallback is logged once, not per backend.
    ntf_use_refused: AtomicBool,
    /// Bounds the requests in flight ([`MAX_IN_FLIGHT`]), whoever asks.
    in_flight: tokio::sync::Semaphore,
    /// Routes already read, kept while the kernel reports no route, rule, address or link
    /// change (`RouteWatch`): a refresh of 10,000 backends read 10,000 routes a second.
    routes: std::sync::Mutex<RouteCache>,
    watch: std::sync::Arc<RouteWatch>,
}

/// The kernel's route, rule, next-hop, address and link notifications, counted: any one of
/// them may move a backend's route. `live` is false when they could not be had, or stopped.
/// Neighbour notifications are not in `changes` (they move no route, and come far more often),
/// but they are in `notes` and, like the rest, wake `any`: the next hops hold MACs.
#[derive(Default)]
struct RouteWatch {
    changes: std::sync::atomic::AtomicU64,
    /// Every notification, neighbours' too.
    notes: std::sync::atomic::AtomicU64,
    live: AtomicBool,
    any: tokio::sync::Notify,
}

/// Routes read at one count of `RouteWatch::changes`, at most `ROUTES_KEPT` ago (a bound in
/// case a notification is lost: a full socket drops them).
#[derive(Default)]
struct RouteCache {
    changes: u64,
    filled: Option<Instant>,
    routes: std::collections::HashMap<IpAddr, Route>,
}

const ROUTES_KEPT: Duration = Duration::from_secs(30);

impl Resolver {
    /// Opens a route netlink socket and spawns its connection task on the current tokio runtime
    /// (so this must be called inside one). The socket belongs to the calling thread's network
    /// namespace. The task ends when the resolver is dropped.
    pub fn new() -> Result<Self, ResolveError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ResolveError::Netlink("the next-hop resolver must be created inside a tokio runtime".to_string())
        })?;
        let (connection, handle, _unsolicited) = rtnetlink::new_connection()
            .map_err(|e| ResolveError::Netlink(format!("cannot open a route netlink socket: {e}")))?;
        runtime.spawn(connection);
        let watch = std::sync::Arc::new(RouteWatch::default());
        watch_routes(&runtime, watch.clone());
        Ok(Self {
            handle,
            ntf_use_refused: AtomicBool::new(false),
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
            routes: Default::default(),
            watch,
        })
    }

    /// Whether the kernel's route, neighbour, address and link notifications are being had
    /// (`changed` waits for them).
    pub fn watching(&self) -> bool {
        self.watch.live.load(Ordering::Acquire)
    }

    /// How many route, rule, next-hop, neighbour, address and link notifications the kernel
    /// has sent; `None` while they are not being had (`watching`).
    pub fn notifications(&self) -> Option<u64> {
        self.watching().then(|| self.watch.notes.load(Ordering::Acquire))
    }

    /// Returns after the kernel's next route, rule, next-hop, neighbour, address or link
    /// notification (at once if one came since the last call), or when the notifications stop.
    pub async fn changed(&self) {
        self.watch.any.notified().await;
    }

    /// `route`, from the routes read since the kernel last reported a change that could move
    /// one (or read now, and kept).
    async fn kept_route(&self, addr: IpAddr) -> Result<Route, ResolveError> {
        if !self.watch.live.load(Ordering::Acquire) {
            return self.route(addr).await;
        }
        let changes = self.watch.changes.load(Ordering::Acquire);
        {
            let mut c = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            if c.changes != changes || c.filled.is_none_or(|t| t.elapsed() > ROUTES_KEPT) {
                *c = RouteCache {
                    changes,
                    filled: Some(Instant::now()),
                    routes: Default::default(),
                };
            }
            if let Some(r) = c.routes.get(&addr) {
                return Ok(r.clone());
            }
        }
        let route = self.route(addr).await?;
        let mut c = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        // Kept only if nothing changed while it was read.
        if c.changes == changes && self.watch.changes.load(Ordering::Acquire) == changes {
            c.routes.insert(addr, route.clone());
        }
        Ok(route)
    }

    /// The next hop of `addr`, asking the kernel to resolve its MAC (ARP or ND) if the neighbour
    /// table has no usable entry, and waiting up to `timeout` (counted from the call) for it.
    /// Route, interface and gateway problems fail at once; a backend that does not answer in time
    /// gives [`ResolveError::Unresolved`].
    pub async fn resolve(&self, addr: IpAddr, timeout: Duration) -> Result<NextHop, ResolveError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let egress = self.egress(addr).await?;
        let mut entry = self.neighbour(addr, &egress).await?;
        if let Some(mac) = entry.as_ref().and_then(Neighbour::usable_mac) {
            if entry.as_ref().is_some_and(|n| n.state & libc::NUD_STALE != 0) {
                // Have the kernel re-confirm the cached MAC (STALE -> DELAY -> PROBE); the
                // periodic lookup notices if it fails.
                if let Err(e) = self.request_resolution(addr, &egress).await {
                    debug!(
                        "cannot have the kernel re-confirm backend {addr} on {}: {e}",
                        egress.name
                    );
                }
            }
            return Ok(egress.next_hop(mac));
        }
        if entry.as_ref().is_some_and(|n| n.state & STATIC_STATES != 0) {
            // A static entry without a usable address: triggering would not change it (and
            // NTF_USE would strip NUD_PERMANENT from it).
            return Err(egress.unresolved(addr, Duration::ZERO));
        }
        self.trigger(addr, &egress).await?;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(egress.unresolved(addr, now - start));
            }
            tokio::time::sleep_until(deadline.min(now + POLL_INTERVAL)).await;
            entry = self.neighbour(addr, &egress).await?;
            if let Some(n) = &entry {
                if let Some(mac) = n.usable_mac() {
                    debug!(
                        "backend {addr} resolved to {} on {}",
                        MacDisplay(&mac),
                        egress.name
                    );
                    return Ok(egress.next_hop(mac));
                }
                if n.state & libc::NUD_FAILED != 0 {
                    // The kernel has run out of probes; waiting longer cannot help.
                    return Err(egress.unresolved(addr, start.elapsed()));
                }
            }
        }
    }

    /// The next hop of `addr` if the neighbour table already holds a usable MAC for it. Never
    /// triggers resolution and never waits: meant for periodic refreshes.
    pub async fn lookup(&self, addr: IpAddr) -> Result<NextHop, ResolveError> {
        let egress = self.egress(addr).await?;
        match self
            .neighbour(addr, &egress)
            .await?
            .as_ref()
            .and_then(Neighbour::usable_mac)
        {
            Some(mac) => Ok(egress.next_hop(mac)),
            None => Err(egress.unresolved(addr, Duration::ZERO)),
        }
    }

    /// The egress interface towards each address, for encapsulated forwarding: the route may
    /// go through a gateway and the data plane finds the next hop's MAC itself
    /// (bpf_fib_lookup), so only the interface matters (the daemon lists it in TX_PORTS);
    /// `dst_mac` is zero. The routes concurrently, then each egress interface once (thousands
    /// of routed backends share a few interfaces; a link query per backend was half of the
    /// netlink work of every refresh). In the order of `addrs`.
    pub async fn route_hops(&self, addrs: &[IpAddr]) -> Vec<Result<NextHop, ResolveError>> {
        self.routes_and_links(addrs)
            .await
            .into_iter()
            .map(|r| {
                let (route, link) = r?;
                Ok(NextHop {
                    ifindex: route.ifindex,
                    ifname: link.name,
                    src_mac: link.mac.unwrap_or_default(),
                    dst_mac: [0; 6],
                    mtu: route.mtu.or(link.mtu).unwrap_or(0),
                })
            })
            .collect()
    }

    /// Each address's route and its interface: the routes concurrently, then each interface
    /// once (thousands of backends share a few). In the order of `addrs`.
    async fn routes_and_links(&self, addrs: &[IpAddr]) -> Vec<Result<(Route, Link), ResolveError>> {
        let routes = futures::future::join_all(addrs.iter().map(|&a| async move {
            check_unicast(a)?;
            self.kept_route(a).await
        }))
        .await;
        // (Link errors are netlink failures, kept as their message for each backend.)
        let mut links: std::collections::HashMap<u32, Result<Link, String>> =
            std::collections::HashMap::new();
        for (addr, route) in addrs.iter().zip(&routes) {
            if let Ok(r) = route
                && !links.contains_key(&r.ifindex)
            {
                let link = self.link(*addr, r.ifindex).await.map_err(|e| match e {
                    ResolveError::Netlink(m) => m,
                    other => other.to_string(),
                });
                links.insert(r.ifindex, link);
            }
        }
        routes
            .into_iter()
            .map(|route| {
                let route = route?;
                match links.get(&route.ifindex) {
                    Some(Ok(link)) => Ok((route, link.clone())),
                    Some(Err(e)) => Err(ResolveError::Netlink(e.clone())),
                    None => Err(ResolveError::Netlink(format!(
                        "interface #{} not looked up",
                        route.ifindex
                    ))),
                }
            })
            .collect()
    }

    /// An interface's MTU, from the kernel (in this thread's network namespace).
    pub async fn interface_mtu(&self, ifindex: u32) -> Option<u32> {
        let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        self.link(unspecified, ifindex).await.ok().and_then(|l| l.mtu)
    }

    /// Route and interface checks: the on-link egress interface towards `addr`.
    async fn egress(&self, addr: IpAddr) -> Result<Egress, ResolveError> {
        check_unicast(addr)?;
        let route = self.route(addr).await?;
        let link = self.link(addr, route.ifindex).await?;
        egress_of(addr, &route, link)
    }

    /// `lookup` for many addresses at once, for the periodic refresh: the routes concurrently,
    /// each egress interface once, and the neighbour table in one dump per family instead of
    /// one query per backend (with 10,000 backends, three round trips each made 30,000 a
    /// second at the default refresh). In the order of `addrs`.
    pub async fn lookup_all(&self, addrs: &[IpAddr]) -> Vec<Result<NextHop, ResolveError>> {
        let pairs = self.routes_and_links(addrs).await;
        let mut table = std::collections::HashMap::new();
        let mut dump_error = None;
        for v6 in [false, true] {
            if addrs.iter().any(|a| a.is_ipv6() == v6) {
                match self.neighbour_table(v6).await {
                    Ok(t) => table.extend(t),
                    Err(e) => dump_error = Some(e),
                }
            }
        }
        addrs
            .iter()
            .zip(pairs)
            .map(|(&addr, pair)| {
                let (route, link) = pair?;
                let egress = egress_of(addr, &route, link)?;
                if let Some(e) = &dump_error {
                    return Err(ResolveError::Netlink(e.clone()));
                }
                match table.get(&(egress.ifindex, addr)).and_then(Neighbour::usable_mac) {
                    Some(mac) => Ok(egress.next_hop(mac)),
                    None => Err(egress.unresolved(addr, Duration::ZERO)),
                }
            })
            .collect()
    }

    /// `ip neigh show`: every entry of one family, by interface and address (one dump).
    async fn neighbour_table(
        &self,
        v6: bool,
    ) -> Result<std::collections::HashMap<(u32, IpAddr), Neighbour>, String> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let replies = self
            .exchange(RouteNetlinkMessage::GetNeighbour(msg), NLM_F_REQUEST | NLM_F_DUMP)
            .await
            .map_err(|f| format!("neighbour table dump: {f}"))?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => {
                    let addr = n.attributes.iter().find_map(|a| match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                        _ => None,
                    })?;
                    Some(((n.header.ifindex, addr), Neighbour::of(&n)))
                }
                _ => None,
            })
            .collect())
    }
}

/// The on-link egress towards `addr` from its route and the route's interface.
fn egress_of(addr: IpAddr, route: &Route, link: Link) -> Result<Egress, ResolveError> {
    if let Some(gateway) = route.gateway {
        return Err(ResolveError::NotOnLink {
            addr,
            gateway,
            ifname: link.name,
        });
    }
    let Some(mac) = link.mac else {
        return Err(ResolveError::NoLinkAddress {
            addr,
            ifname: link.name,
        });
    };
    Ok(Egress {
        ifindex: route.ifindex,
        name: link.name,
        mac,
    })
}

impl Resolver {
    /// `ip route get ADDR`: the kernel's own forwarding decision, policy rules included.
    async fn route(&self, addr: IpAddr) -> Result<Route, ResolveError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(addr);
        msg.header.destination_prefix_length = if addr.is_ipv4() { 32 } else { 128 };
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(addr)));
        let replies = self
            .exchange(RouteNetlinkMessage::GetRoute(msg), NLM_F_REQUEST)
            .await
            .map_err(|f| {
                let unroutable = |reason: &str| ResolveError::Unroutable {
                    addr,
                    reason: reason.to_string(),
                };
                match f {
                    Failure::Errno(libc::ENETUNREACH | libc::EHOSTUNREACH) => ResolveError::NoRoute { addr },
                    // The errors the kernel gives for `prohibit` and `blackhole` routes.
                    Failure::Errno(libc::EACCES) => unroutable("a prohibit route covers it"),
                    Failure::Errno(libc::EINVAL) => {
                        unroutable("the kernel refuses to route to it (a blackhole route?)")
                    }
                    f => ResolveError::Netlink(format!("route lookup for backend {addr}: {f}")),
                }
            })?;
        let Some(route) = replies.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => Some(r),
            _ => None,
        }) else {
            return Err(ResolveError::Netlink(format!(
                "route lookup for backend {addr}: the kernel sent no route"
            )));
        };
        let reason = match route.header.kind {
            RouteType::Unicast => None,
            RouteType::Local => Some("it is an address of this host".to_string()),
            RouteType::Broadcast => Some("it is a broadcast address".to_string()),
            RouteType::Multicast => Some("it is a multicast address".to_string()),
            RouteType::Anycast => Some("it is an anycast address of this host".to_string()),
            RouteType::BlackHole | RouteType::Unreachable | RouteType::Prohibit | RouteType::Throw => {
                return Err(ResolveError::NoRoute { addr });
            }
            other => Some(format!("its route has type {other:?}, not unicast")),
        };
        if let Some(reason) = reason {
            return Err(ResolveError::Unroutable { addr, reason });
        }
        let mut ifindex = None;
        let mut gateway = None;
        let mut mtu = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Oif(index) => ifindex = Some(*index),
                RouteAttribute::Metrics(metrics) => {
                    mtu = metrics.iter().find_map(|m| match m {
                        RouteMetric::Mtu(v) if *v > 0 => Some(*v),
                        _ => None,
                    })
                }
                RouteAttribute::Gateway(RouteAddress::Inet(a)) | RouteAttribute::Via(RouteVia::Inet(a)) => {
                    gateway = Some(IpAddr::V4(*a))
                }
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) | RouteAttribute::Via(RouteVia::Inet6(a)) => {
                    gateway = Some(IpAddr::V6(*a))
                }
                _ => {}
            }
        }
        let Some(ifindex) = ifindex else {
            return Err(ResolveError::Netlink(format!(
                "route lookup for backend {addr}: the route names no output interface"
            )));
        };
        // A route "via" the backend itself still delivers straight to it.
        Ok(Route {
            ifindex,
            gateway: gateway.filter(|g| *g != addr),
            mtu,
        })
    }

    /// `ip link show` of the egress interface: its name and, if it is Ethernet, its MAC.
    async fn link(&self, addr: IpAddr, ifindex: u32) -> Result<Link, ResolveError> {
        let mut msg = LinkMessage::default();
        msg.header.index = ifindex;
        let replies = self
            .exchange(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST)
            .await
            .map_err(|f| {
                ResolveError::Netlink(format!("interface #{ifindex} (the route to backend {addr}): {f}"))
            })?;
        let Some(link) = replies.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(l),
            _ => None,
        }) else {
            return Err(ResolveError::Netlink(format!(
                "interface #{ifindex} (the route to backend {addr}): the kernel sent no link"
            )));
        };
        let mut name = None;
        let mut mac = None;
        let mut mtu = None;
        for attr in link.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n),
                LinkAttribute::Mtu(v) => mtu = Some(v),
                LinkAttribute::Address(a) if link.header.link_layer_type == LinkLayerType::Ether => {
                    mac = ethernet_unicast(&a)
                }
                _ => {}
            }
        }
        Ok(Link {
            name: name.unwrap_or_else(|| format!("#{ifindex}")),
            mac,
            mtu,
        })
    }

    /// `ip neigh get ADDR dev IF`: the kernel's entry, or `None` if it has none.
    async fn neighbour(&self, addr: IpAddr, egress: &Egress) -> Result<Option<Neighbour>, ResolveError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(addr);
        msg.header.ifindex = egress.ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(addr)));
        let replies = match self
            .exchange(RouteNetlinkMessage::GetNeighbour(msg), NLM_F_REQUEST)
            .await
        {
            Ok(replies) => replies,
            Err(Failure::Errno(libc::ENOENT)) => return Ok(None),
            Err(f) => {
                return Err(ResolveError::Netlink(format!(
                    "neighbour lookup for backend {addr} on {}: {f}",
                    egress.name
                )));
            }
        };
        Ok(replies.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) => Some(Neighbour::of(&n)),
            _ => None,
        }))
    }

    /// Starts ARP/ND for `addr`: `NTF_USE`, or the datagram fallback if the kernel refuses it.
    async fn trigger(&self, addr: IpAddr, egress: &Egress) -> Result<(), ResolveError> {
        let refused = match self.request_resolution(addr, egress).await {
            Ok(()) => return Ok(()),
            Err(f) => f,
        };
        if !self.ntf_use_refused.swap(true, Ordering::Relaxed) {
            warn!(
                "the kernel refused NTF_USE for backend {addr} on {} ({refused}); triggering neighbour \
                 resolution with an empty UDP datagram to the backend's discard port instead",
                egress.name
            );
        }
        send_discard_datagram(addr).map_err(|e| {
            ResolveError::Netlink(format!(
                "cannot start neighbour resolution of backend {addr} on {}: NTF_USE failed ({refused}), \
                 and so did a datagram to port {DISCARD_PORT} ({e})",
                egress.name
            ))
        })
    }

    /// `RTM_NEWNEIGH` with `NTF_USE`: the kernel creates the entry if needed and runs
    /// `neigh_event_send` on it, as for a packet waiting on the neighbour. With `NTF_USE` the
    /// kernel ignores the message's state, and it carries no link-layer address, so an existing
    /// entry keeps its address; only `NUD_PERMANENT` would be cleared, which is why static
    /// entries are never sent this.
    async fn request_resolution(&self, addr: IpAddr, egress: &Egress) -> Result<(), Failure> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(addr);
        msg.header.ifindex = egress.ifindex;
        msg.header.flags = NeighbourFlags::Use;
        msg.header.state = NeighbourState::None;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(addr)));
        self.exchange(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
        )
        .await
        .map(drop)
    }

    /// Sends one request and collects its replies. An ACK ends the stream with no reply.
    async fn exchange(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, Failure> {
        let mut request = NetlinkMessage::from(msg);
        request.header.flags = flags;
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| Failure::Broken("the resolver is closing".to_string()))?;
        let mut handle = self.handle.clone();
        let responses = handle
            .request(request)
            .map_err(|e| Failure::Broken(format!("the netlink connection is gone ({e})")))?;
        let collect = async {
            let mut responses = std::pin::pin!(responses);
            let mut replies = Vec::new();
            while let Some(response) = responses.next().await {
                match response.payload {
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(Failure::Errno(e.raw_code().abs()));
                    }
                    NetlinkPayload::Overrun(_) => {
                        return Err(Failure::Broken("the netlink receive buffer overran".to_string()));
                    }
                    _ => {}
                }
            }
            Ok(replies)
        };
        tokio::time::timeout(NETLINK_TIMEOUT, collect)
            .await
            .unwrap_or_else(|_| {
                Err(Failure::Broken(format!(
                    "no usable answer from the kernel within {} s",
                    NETLINK_TIMEOUT.as_secs()
                )))
            })
    }
}

/// The fallback trigger: one empty UDP datagram to `addr`'s discard port, from a connected socket
/// that the kernel routes like any other. The datagram waits in the neighbour entry's queue,
/// which starts ARP/ND; it is sent to the backend once resolved, and dropped if resolution fails.
fn send_discard_datagram(addr: IpAddr) -> std::io::Result<()> {
    let local = match addr {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(local)?;
    socket.set_nonblocking(true)?;
    socket.connect(SocketAddr::new(addr, DISCARD_PORT))?;
    match socket.send(&[]) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

/// Why a netlink request failed.
enum Failure {
    /// The kernel answered with this (positive) errno.
    Errno(i32),
    /// No answer, or one that cannot be used.
    Broken(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Errno(e) => write!(f, "{}", std::io::Error::from_raw_os_error(*e)),
            Self::Broken(s) => f.write_str(s),
        }
    }
}

/// Counts the kernel's notifications into `watch` on a multicast netlink socket of their own
/// (the calling thread's network namespace). Without them (refused, or the socket gone), every
/// refresh reads each route again, as before, and says so once.
fn watch_routes(runtime: &tokio::runtime::Handle, watch: std::sync::Arc<RouteWatch>) {
    use rtnetlink::MulticastGroup as G;
    let groups = [
        G::Link,
        G::Ipv4Ifaddr,
        G::Ipv6Ifaddr,
        G::Ipv4Route,
        G::Ipv6Route,
        G::Ipv4Rule,
        G::Ipv6Rule,
        G::Nexthop,
        G::Neigh,
    ];
    let (connection, handle, mut notes) = match rtnetlink::new_multicast_connection(&groups) {
        Ok(c) => c,
        Err(e) => {
            warn!("route notifications unavailable ({e}): each refresh reads every backend's route");
            return;
        }
    };
    runtime.spawn(connection);
    watch.live.store(true, Ordering::Release);
    runtime.spawn(async move {
        // The connection ends when its last handle goes.
        let _handle = handle;
        while let Some((note, _)) = notes.next().await {
            use rtnetlink::packet_core::NetlinkPayload::InnerMessage;
            use rtnetlink::packet_route::RouteNetlinkMessage as M;
            let neighbour = matches!(
                note.payload,
                InnerMessage(M::NewNeighbour(_) | M::DelNeighbour(_) | M::GetNeighbour(_))
            );
            if !neighbour {
                watch.changes.fetch_add(1, Ordering::AcqRel);
            }
            watch.notes.fetch_add(1, Ordering::AcqRel);
            watch.any.notify_one();
        }
        watch.live.store(false, Ordering::Release);
        watch.any.notify_one();
        warn!("route notifications stopped: each refresh reads every backend's route");
    });
}

#[derive(Clone)]
struct Route {
    ifindex: u32,
    gateway: Option<IpAddr>,
    /// The route's MTU metric, if it has one.
    mtu: Option<u32>,
}

#[derive(Clone)]
struct Link {
    name: String,
    mac: Option<[u8; 6]>,
    mtu: Option<u32>,
}

/// An on-link egress interface with an Ethernet address.
fn check_unicast(addr: IpAddr) -> Result<(), ResolveError> {
    let bad_address = if addr.is_unspecified() {
        Some("it is the unspecified address")
    } else if addr.is_multicast() || matches!(addr, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("it is not a unicast address")
    } else if matches!(addr, IpAddr::V6(v6) if v6.is_unicast_link_local()) {
        Some("an IPv6 link-local address names no interface; use a global or unique local address")
    } else {
        None
    };
    match bad_address {
        Some(reason) => Err(ResolveError::Unroutable {
            addr,
            reason: reason.to_string(),
        }),
        None => Ok(()),
    }
}

struct Egress {
    ifindex: u32,
    name: String,
    mac: [u8; 6],
}

impl Egress {
    fn next_hop(&self, dst_mac: [u8; 6]) -> NextHop {
        NextHop {
            ifindex: self.ifindex,
            ifname: self.name.clone(),
            src_mac: self.mac,
            dst_mac,
            mtu: 0,
        }
    }

    fn unresolved(&self, addr: IpAddr, waited: Duration) -> ResolveError {
        ResolveError::Unresolved {
            addr,
            ifname: self.name.clone(),
            waited,
        }
    }
}

/// A neighbour table entry: its `NUD_*` state and its MAC if that is a unicast Ethernet address.
struct Neighbour {
    state: u16,
    mac: Option<[u8; 6]>,
}

impl Neighbour {
    fn of(n: &NeighbourMessage) -> Self {
        Self {
            state: u16::from(n.header.state),
            mac: n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) => ethernet_unicast(l),
                _ => None,
            }),
        }
    }

    fn usable_mac(&self) -> Option<[u8; 6]> {
        if self.state & USABLE_STATES != 0 {
            self.mac
        } else {
            None
        }
    }
}

fn family(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// `bytes` as a MAC a frame can be sent to: six bytes, not all zero, not a group address.
fn ethernet_unicast(bytes: &[u8]) -> Option<[u8; 6]> {
    let mac: [u8; 6] = bytes.try_into().ok()?;
    (mac != [0; 6] && mac[0] & 1 == 0).then_some(mac)
}

struct MacDisplay<'a>(&'a [u8; 6]);

impl fmt::Display for MacDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File, os::fd::AsRawFd, process::Command, sync::atomic::AtomicU32, time::Instant as StdInstant,
    };

    use super::*;

    #[test]
    fn usable_entries_need_a_unicast_mac_and_a_valid_state() {
        let mac = Some([0x02, 0, 0, 0, 0, 1]);
        for state in [
            libc::NUD_REACHABLE,
            libc::NUD_STALE,
            libc::NUD_DELAY,
            libc::NUD_PROBE,
            libc::NUD_PERMANENT,
        ] {
            assert_eq!(Neighbour { state, mac }.usable_mac(), mac, "state {state:#x}");
        }
        for state in [libc::NUD_NONE, libc::NUD_INCOMPLETE, libc::NUD_FAILED] {
            assert_eq!(Neighbour { state, mac }.usable_mac(), None, "state {state:#x}");
        }
        assert_eq!(
            Neighbour {
                state: libc::NUD_REACHABLE,
                mac: None
            }
            .usable_mac(),
            None
        );
        assert_eq!(ethernet_unicast(&[0x02, 0, 0, 0, 0, 1]), mac);
        assert_eq!(ethernet_unicast(&[0; 6]), None);
        assert_eq!(ethernet_unicast(&[0xff; 6]), None);
        assert_eq!(ethernet_unicast(&[0x01, 0, 0x5e, 0, 0, 1]), None);
        assert_eq!(ethernet_unicast(&[0x02, 0, 0, 0, 1]), None);
    }

    #[test]
    fn messages_are_one_line_and_name_backend_and_interface() {
        let addr: IpAddr = "10.1.0.5".parse().unwrap();
        let not_on_link = ResolveError::NotOnLink {
            addr,
            gateway: "10.1.0.1".parse().unwrap(),
            ifname: "eth0".to_string(),
        };
        assert_eq!(
            not_on_link.to_string(),
            "backend 10.1.0.5 is not on a directly connected network (route via 10.1.0.1 on eth0); \
             L2 DSR needs an on-link backend"
        );
        let waited = ResolveError::Unresolved {
            addr,
            ifname: "eth0".to_string(),
            waited: Duration::from_millis(300),
        };
        assert_eq!(
            waited.to_string(),
            "backend 10.1.0.5 is unresolved on eth0: no ARP/ND answer within 300 ms"
        );
        let looked = ResolveError::Unresolved {
            addr,
            ifname: "eth0".to_string(),
            waited: Duration::ZERO,
        };
        assert_eq!(
            looked.to_string(),
            "backend 10.1.0.5 is unresolved on eth0: no usable neighbour entry"
        );
        let no_mac = ResolveError::NoLinkAddress {
            addr,
            ifname: "wg0".to_string(),
        };
        assert!(no_mac.to_string().contains("10.1.0.5") && no_mac.to_string().contains("wg0"));
        for e in [
            not_on_link,
            waited,
            looked,
            no_mac,
            ResolveError::NoRoute { addr },
        ] {
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    /// The daemon awaits these inside spawned tasks; this only has to compile.
    #[allow(dead_code)]
    fn resolver_and_its_futures_are_send(r: &Resolver, a: IpAddr) {
        fn send<T: Send>(_: T) {}
        fn sync<T: Sync>(_: &T) {}
        sync(r);
        send(r.resolve(a, Duration::ZERO));
        send(r.lookup(a));
    }

    // ---- Real kernel tests: two network namespaces joined by a veth pair (need root). ----

    const A4: &str = "10.200.0.1";
    const B4: &str = "10.200.0.2";
    const B4_SPARE: &str = "10.200.0.3";
    const NOBODY4: &str = "10.200.0.77";
    const STATIC4: &str = "10.200.0.50";
    const GATEWAY4: &str = "10.200.0.254";
    const ROUTED4: &str = "10.200.1.5";
    const UNROUTED4: &str = "10.201.0.1";
    const BLACKHOLE4: &str = "10.202.0.1";
    const PROHIBIT4: &str = "10.203.0.1";
    const B6: &str = "fd00:200::2";
    const B6_SPARE: &str = "fd00:200::3";
    const NOBODY6: &str = "fd00:200::77";
    const GATEWAY6: &str = "fd00:200::fe";
    const ROUTED6: &str = "fd00:201::5";
    const UNROUTED6: &str = "fd00:202::1";

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("spawn ip {args:?}: {e}"));
        assert!(
            out.status.success(),
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Namespace A (the load balancer, interface `va`) and B (the backends, interface `vb`),
    /// deleted on drop, so also when a test fails or panics.
    struct Topology {
        a: String,
        b: String,
    }

    impl Drop for Topology {
        fn drop(&mut self) {
            for ns in [&self.a, &self.b] {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
        }
    }

    /// What the resolver must find from inside A.
    struct Expected {
        ifindex: u32,
        a_mac: [u8; 6],
        b_mac: [u8; 6],
    }

    impl Topology {
        /// `None` (the test is skipped) unless running as root with iproute2.
        fn new(tag: &str) -> Option<Self> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 || Command::new("ip").arg("-V").output().is_err() {
                eprintln!("skipping: needs root and iproute2 to create network namespaces");
                return None;
            }
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let stem = format!("lbneigh-{}-{n}-{tag}", std::process::id());
            let topo = Self {
                a: format!("{stem}-a"),
                b: format!("{stem}-b"),
            };
            ip(&["netns", "add", &topo.a]);
            ip(&["netns", "add", &topo.b]);
            let (a, b) = (topo.a.as_str(), topo.b.as_str());
            ip(&[
                "-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b,
            ]);
            for (ns, dev, v4, v6) in [(a, "va", A4, "fd00:200::1"), (b, "vb", B4, B6)] {
                ip(&["-n", ns, "link", "set", "lo", "up"]);
                // ND solicitations come from the link-local address, which would stay tentative
                // (unusable) for a second or two of duplicate address detection: add it by hand.
                ip(&["-n", ns, "link", "set", dev, "addrgenmode", "none"]);
                let link_local = if dev == "va" { "fe80::a/64" } else { "fe80::b/64" };
                ip(&["-n", ns, "addr", "add", link_local, "dev", dev, "nodad"]);
                ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
                ip(&["-n", ns, "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
                ip(&["-n", ns, "link", "set", dev, "up"]);
            }
            ip(&["-n", b, "addr", "add", &format!("{B4_SPARE}/24"), "dev", "vb"]);
            ip(&[
                "-n",
                b,
                "addr",
                "add",
                &format!("{B6_SPARE}/64"),
                "dev",
                "vb",
                "nodad",
            ]);
            ip(&["-n", a, "route", "add", "10.200.1.0/24", "via", GATEWAY4]);
            ip(&["-n", a, "route", "add", "fd00:201::/64", "via", GATEWAY6]);
            ip(&["-n", a, "route", "add", "blackhole", "10.202.0.0/24"]);
            ip(&["-n", a, "route", "add", "prohibit", "10.203.0.0/24"]);
            Some(topo)
        }

        fn expected(&self) -> Expected {
            let (ifindex, a_mac) = link_of(&self.a, "va");
            let (_, b_mac) = link_of(&self.b, "vb");
            Expected {
                ifindex,
                a_mac,
                b_mac,
            }
        }

        fn neigh_state(&self, addr: &str) -> String {
            ip(&["-n", &self.a, "neigh", "show", addr, "dev", "va"])
        }

        /// Runs `scenario` on a thread that has entered namespace A, in a current-thread runtime
        /// (so the netlink socket, the timers and any datagram all live in A).
        fn run_in_a<F: Future<Output = ()>>(&self, scenario: impl FnOnce() -> F + Send + 'static) {
            let file = File::open(format!("/run/netns/{}", self.a)).expect("open the namespace file");
            let thread = std::thread::spawn(move || {
                // SAFETY: setns affects only this thread; the fd is open.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime
                    .block_on(async { tokio::time::timeout(Duration::from_secs(8), scenario()).await })
                    .expect("the scenario took more than 8 s");
            });
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }

    /// The ifindex and MAC of `dev` in `ns`, as iproute2 reports them.
    fn link_of(ns: &str, dev: &str) -> (u32, [u8; 6]) {
        let out = ip(&["-n", ns, "-o", "link", "show", "dev", dev]);
        let ifindex = out.split(':').next().unwrap().trim().parse().unwrap();
        let mut words = out.split_whitespace().skip_while(|w| *w != "link/ether");
        let mac = words.nth(1).unwrap_or_else(|| panic!("no link/ether in {out:?}"));
        let bytes: Vec<u8> = mac
            .split(':')
            .map(|x| u8::from_str_radix(x, 16).unwrap())
            .collect();
        (ifindex, bytes.try_into().unwrap())
    }

    #[test]
    fn resolves_on_link_backends_and_explains_the_rest() {
        let Some(topo) = Topology::new("resolve") else {
            return;
        };
        let want = topo.expected();
        let hop = NextHop {
            ifindex: want.ifindex,
            ifname: "va".to_string(),
            src_mac: want.a_mac,
            dst_mac: want.b_mac,
            mtu: 0,
        };
        let ns = topo.a.clone();
        let b_mac = MacDisplay(&want.b_mac).to_string();

        topo.run_in_a(move || async move {
            let r = Resolver::new().expect("resolver");
            let t = Duration::from_secs(3);

            // lookup neither triggers nor waits.
            match r.lookup(addr(B4)).await {
                Err(ResolveError::Unresolved { ifname, waited, .. }) => {
                    assert_eq!(ifname, "va");
                    assert_eq!(waited, Duration::ZERO);
                }
                other => panic!("lookup before resolution: {other:?}"),
            }

            for a in [B4, B6] {
                let start = StdInstant::now();
                let got = r
                    .resolve(addr(a), t)
                    .await
                    .unwrap_or_else(|e| panic!("resolve {a}: {e}"));
                assert_eq!(got, hop, "resolve {a}");
                eprintln!("resolved {a} in {:?}", start.elapsed());
                assert_eq!(
                    r.lookup(addr(a)).await.unwrap(),
                    hop,
                    "lookup {a} after resolution"
                );
            }
            assert!(
                !r.ntf_use_refused.load(Ordering::Relaxed),
                "the kernel refused NTF_USE"
            );

            // A STALE entry is returned at once, and the kernel is asked to re-confirm it.
            ip(&[
                "-n", &ns, "neigh", "replace", B4, "lladdr", &b_mac, "dev", "va", "nud", "stale",
            ]);
            assert_eq!(r.resolve(addr(B4), Duration::ZERO).await.unwrap(), hop);
            let state = ip(&["-n", &ns, "neigh", "show", B4, "dev", "va"]);
            assert!(
                !state.contains("STALE"),
                "the stale entry was not nudged: {state}"
            );

            // A permanent entry is usable as it is, and stays permanent.
            ip(&[
                "-n",
                &ns,
                "neigh",
                "add",
                STATIC4,
                "lladdr",
                "02:00:00:00:00:50",
                "dev",
                "va",
                "nud",
                "permanent",
            ]);
            let got = r.resolve(addr(STATIC4), t).await.unwrap();
            assert_eq!(got.dst_mac, [2, 0, 0, 0, 0, 0x50]);
            let state = ip(&["-n", &ns, "neigh", "show", STATIC4, "dev", "va"]);
            assert!(state.contains("PERMANENT"), "{state}");

            for (a, gw) in [(ROUTED4, GATEWAY4), (ROUTED6, GATEWAY6)] {
                match r.resolve(addr(a), t).await {
                    Err(e @ ResolveError::NotOnLink { .. }) => {
                        let ResolveError::NotOnLink {
                            gateway, ref ifname, ..
                        } = e
                        else {
                            unreachable!()
                        };
                        assert_eq!((gateway, ifname.as_str()), (addr(gw), "va"));
                        eprintln!("{e}");
                    }
                    other => panic!("{a}: want NotOnLink, got {other:?}"),
                }
                assert!(matches!(
                    r.lookup(addr(a)).await,
                    Err(ResolveError::NotOnLink { .. })
                ));
            }

            for a in [UNROUTED4, UNROUTED6] {
                match r.resolve(addr(a), t).await {
                    Err(e @ ResolveError::NoRoute { .. }) => eprintln!("{e}"),
                    other => panic!("{a}: want NoRoute, got {other:?}"),
                }
            }

            for a in [
                A4,
                "10.200.0.255",
                BLACKHOLE4,
                PROHIBIT4,
                "fe80::1",
                "224.0.0.5",
                "ff02::1",
                "0.0.0.0",
                "::1",
            ] {
                match r.resolve(addr(a), t).await {
                    Err(e @ ResolveError::Unroutable { .. }) => eprintln!("{e}"),
                    other => panic!("{a}: want Unroutable, got {other:?}"),
                }
            }

            for a in [NOBODY4, NOBODY6] {
                let start = StdInstant::now();
                let result = r.resolve(addr(a), Duration::from_millis(300)).await;
                let took = start.elapsed();
                match result {
                    Err(e @ ResolveError::Unresolved { .. }) => eprintln!("{e} (after {took:?})"),
                    other => panic!("{a}: want Unresolved, got {other:?}"),
                }
                assert!(
                    took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
                    "{a}: took {took:?}"
                );
            }
        });
        // Resolution went through the kernel's state machine: the unanswered entries are being
        // resolved (or have failed), not absent.
        let state = topo.neigh_state(NOBODY4);
        assert!(
            state.contains("INCOMPLETE") || state.contains("FAILED"),
            "{state}"
        );
    }

    /// Drops CAP_NET_ADMIN from the calling thread's effective set (capabilities are per thread),
    /// so that the kernel refuses RTM_NEWNEIGH from sockets this thread opens afterwards.
    fn drop_net_admin_on_this_thread() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_NET_ADMIN: u32 = 12;
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget/capset with a version-3 header and two data structs, for this thread.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
                0,
                "capget"
            );
            data[0].effective &= !(1 << CAP_NET_ADMIN);
            assert_eq!(
                libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
                0,
                "capset"
            );
        }
    }

    #[test]
    fn falls_back_to_a_datagram_when_ntf_use_is_refused() {
        let Some(topo) = Topology::new("refused") else {
            return;
        };
        let want = topo.expected();
        topo.run_in_a(move || async move {
            drop_net_admin_on_this_thread();
            let r = Resolver::new().expect("resolver");
            for a in [B4, B6] {
                let hop = r
                    .resolve(addr(a), Duration::from_secs(3))
                    .await
                    .unwrap_or_else(|e| panic!("resolve {a}: {e}"));
                assert_eq!(
                    (hop.ifindex, hop.src_mac, hop.dst_mac),
                    (want.ifindex, want.a_mac, want.b_mac),
                    "{a}"
                );
            }
            assert!(
                r.ntf_use_refused.load(Ordering::Relaxed),
                "NTF_USE worked without CAP_NET_ADMIN"
            );
        });
    }

    #[test]
    fn discard_datagram_fallback_triggers_resolution() {
        let Some(topo) = Topology::new("fallback") else {
            return;
        };
        let want = topo.expected();
        topo.run_in_a(move || async move {
            let r = Resolver::new().expect("resolver");
            for a in [B4_SPARE, B6_SPARE] {
                assert!(
                    matches!(r.lookup(addr(a)).await, Err(ResolveError::Unresolved { .. })),
                    "{a}"
                );
                send_discard_datagram(addr(a)).unwrap_or_else(|e| panic!("datagram to {a}: {e}"));
                let deadline = StdInstant::now() + Duration::from_secs(3);
                let hop = loop {
                    match r.lookup(addr(a)).await {
                        Ok(hop) => break hop,
                        Err(e) if StdInstant::now() > deadline => panic!("{a}: {e}"),
                        Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
                    }
                };
                assert_eq!(
                    (hop.ifindex, hop.src_mac, hop.dst_mac),
                    (want.ifindex, want.a_mac, want.b_mac),
                    "{a}"
                );
            }
        });
    }

    async fn route_mtu(r: &Resolver, addr: IpAddr) -> Option<u32> {
        r.route_hops(&[addr]).await[0].as_ref().map(|h| h.mtu).ok()
    }

    /// A route read once is kept (the refresh then makes no route query per backend) until
    /// the kernel reports a change: a replaced route is read again at once, not after
    /// `ROUTES_KEPT`.
    #[test]
    fn a_neighbour_change_wakes_the_watch_and_keeps_the_routes() {
        let Some(topo) = Topology::new("nwake") else {
            return;
        };
        let a = topo.a.clone();
        topo.run_in_a(move || async move {
            let r = Resolver::new().expect("resolver");
            assert!(r.watching(), "no notifications");
            ip(&[
                "-n",
                &a,
                "neigh",
                "replace",
                GATEWAY4,
                "lladdr",
                "02:00:00:00:00:77",
                "dev",
                "va",
                "nud",
                "permanent",
            ]);
            tokio::time::timeout(Duration::from_secs(3), r.changed())
                .await
                .expect("a neighbour change wakes the watch");
            assert_eq!(
                r.watch.changes.load(Ordering::Acquire),
                0,
                "a neighbour change is not a route change: the kept routes stay"
            );
        });
    }

    #[test]
    fn a_kept_route_is_read_again_when_the_kernel_reports_a_change() {
        let Some(topo) = Topology::new("kept") else {
            return;
        };
        ip(&[
            "-n",
            &topo.a,
            "route",
            "add",
            "10.211.0.0/16",
            "via",
            GATEWAY4,
            "mtu",
            "lock",
            "1400",
        ]);
        let a = topo.a.clone();
        topo.run_in_a(move || async move {
            let r = Resolver::new().expect("resolver");
            let addr = IpAddr::V4(Ipv4Addr::new(10, 211, 0, 5));
            assert_eq!(route_mtu(&r, addr).await, Some(1400));
            assert!(r.watch.live.load(Ordering::Acquire), "no route notifications");
            assert_eq!(route_mtu(&r, addr).await, Some(1400));
            let kept = r.routes.lock().unwrap().routes.len();
            assert_eq!(kept, 1, "the route is kept");
            ip(&[
                "-n",
                &a,
                "route",
                "replace",
                "10.211.0.0/16",
                "via",
                GATEWAY4,
                "mtu",
                "lock",
                "1300",
            ]);
            let start = StdInstant::now();
            while route_mtu(&r, addr).await != Some(1300) {
                assert!(
                    start.elapsed() < Duration::from_secs(3),
                    "the replaced route was not read again"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    /// The bench's scale case asks the routes of 16,384 backends at once; with every request
    /// sent at once, the last ones timed out waiting for their turn.
    #[test]
    fn routes_of_thirty_thousand_backends_all_answer() {
        let Some(topo) = Topology::new("many") else {
            return;
        };
        ip(&["-n", &topo.a, "route", "add", "10.210.0.0/16", "via", GATEWAY4]);
        let want = topo.expected();
        topo.run_in_a(move || async move {
            let r = Resolver::new().expect("resolver");
            let addrs: Vec<IpAddr> = (0..30_000u32)
                .map(|i| IpAddr::V4(Ipv4Addr::from(0x0ad2_0000 + 1 + i % 65_000)))
                .collect();
            let start = StdInstant::now();
            let hops = r.route_hops(&addrs).await;
            eprintln!("{} routes in {:?}", addrs.len(), start.elapsed());
            let failed: Vec<String> = hops
                .iter()
                .zip(&addrs)
                .filter_map(|(h, a)| h.as_ref().err().map(|e| format!("{a}: {e}")))
                .collect();
            assert!(
                failed.is_empty(),
                "{} of {} routes failed, the first: {}",
                failed.len(),
                addrs.len(),
                failed[0]
            );
            assert!(hops.iter().all(|h| h.as_ref().unwrap().ifindex == want.ifindex));
        });
    }
}
