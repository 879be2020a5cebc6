//! Data-plane settings the daemon writes once at start (`DP_CONFIG`, one entry).

#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct DataPlaneConfig {
    /// Outer IPv4 source of encapsulated packets, wire order: the first two bytes are the
    /// configured prefix, the last two vary per flow so receivers spread flows over queues.
    pub encap_src4: u32,
    /// `DP_F_*`.
    pub flags: u32,
    /// Outer IPv6 source: the first 12 bytes are the prefix, the last word varies per flow.
    pub encap_src6: [u32; 4],
    /// UDP destination port of GUE-encapsulated packets (host order).
    pub gue_port: u16,
    /// SNAT source ports: `[nat_port_first, nat_port_first + nat_port_count)`, host order.
    pub nat_port_first: u16,
    pub nat_port_count: u32,
    /// SNAT source addresses (the balancer's, on the backends' network), wire order.
    pub nat_src6: [u32; 4],
    pub nat_src4: u32,
    /// Flood guard: new flows one CPU remembers per `FLOOD_WINDOW_NS`; past that, new flows
    /// still go by the Maglev table but are not inserted. 0: no guard.
    pub flood_limit: u32,
    /// New NAT connections one source address may open per second (`NAT_SOURCE_WINDOW_NS`);
    /// past that they are dropped and counted. 0: no limit.
    pub nat_source_limit: u32,
    /// Bumped by the daemon after the kernel reports a route, neighbour, address or link
    /// change: each CPU's cached next hops (`NextHop::epoch`) are looked up again.
    pub hop_epoch: u32,
}
const _: () = assert!(core::mem::size_of::<DataPlaneConfig>() == 64);

/// The flood guard's window.
pub const FLOOD_WINDOW_NS: u64 = 100_000_000;
/// Per-CPU state of the flood guard (the `FLOOD` map).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct FloodWindow {
    pub start_ns: u64,
    pub count: u64,
}

/// The per-window limit for a rate of new flows per second per CPU (0 = no guard).
pub const fn flood_limit(per_cpu_per_s: u32) -> u32 {
    if per_cpu_per_s == 0 {
        return 0;
    }
    let per_window = per_cpu_per_s as u64 * FLOOD_WINDOW_NS / 1_000_000_000;
    if per_window == 0 { 1 } else { per_window as u32 }
}

/// Answer ICMP echo requests to VIP addresses from the data plane (else pass them on).
pub const DP_F_ECHO_REPLY: u32 = 1;
/// Answer packets that encapsulation would make too big with ICMP "fragmentation needed" /
/// "packet too big" (else drop and count them).
pub const DP_F_TOO_BIG_ICMP: u32 = 2;
/// Region lookups use `GEO_B` (else `GEO_A`): flipped by a geo data reload.
pub const DP_F_GEO_B: u32 = 4;

/// The per-flow part of an outer source: source port mixed with the source address, the way
/// Katran spreads flows, so no hash is needed on the packet path.
#[inline(always)]
pub const fn encap_variation(src_word0: u32, src_port: u16) -> u32 {
    let v = src_word0 ^ (src_word0 >> 16) ^ src_port as u32;
    v & 0xffff
}

/// A backend's next hop as one CPU last learnt it from the FIB (`NEXT_HOPS`, per backend slot).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    /// `DataPlaneConfig::hop_epoch` when learnt: a later epoch looks the hop up again.
    pub epoch: u32,
    /// Packets this hop may still be used for before the FIB is asked again (0: not usable),
    /// so a change the daemon does not report (the daemon stopped, a notification lost) is
    /// taken up anyway, without a clock read per packet.
    pub uses: u32,
    /// The backend's generation when learnt: a reused slot is looked up again.
    pub generation: u32,
    pub ifindex: u32,
    /// Largest outer packet the route takes.
    pub mtu: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// `HOP_F_*`.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 36);

/// The neighbour is resolved: `dmac` is the next hop's.
pub const HOP_F_RESOLVED: u32 = 1;
