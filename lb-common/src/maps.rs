//! Names and capacities of every BPF map, in one place for both sides.

/// Services: `ServiceKey` -> `ServiceValue`.
pub const SERVICES: &str = "SERVICES";
/// (VIP, protocol, port 0) -> the service that takes the VIP's fragments.
pub const FRAGMENT_SERVICES: &str = "FRAGMENT_SERVICES";
/// Every VIP address (`AddrKey` -> 1): the exact answer where the filter may err (echo replies).
pub const VIP_ADDRS: &str = "VIP_ADDRS";
/// One `VipFilter` at index 0: which addresses may be VIPs.
pub const VIP_FILTER: &str = "VIP_FILTER";
/// Maglev lookup tables of all services, back to back: 16-bit backend slots, `POOL_LANES` to
/// an array element (8 bytes, the kernel's element stride, so nothing is padding).
/// A service owns a region `[table_offset, table_offset + table_size)` of slots; updates write
/// a fresh region and then flip the service's offset, so no packet sees a half-written table.
pub const MAGLEV_POOL: &str = "MAGLEV_POOL";
/// Backends: slot -> `Backend`.
pub const BACKENDS: &str = "BACKENDS";
/// Active flows per backend slot (i64, atomic adds), for the counting strategies.
pub const ACTIVE: &str = "ACTIVE";
/// Client prefix -> region id (LPM tries, see `geo`): the data set in use and the other.
pub const GEO_A: &str = "GEO_A";
pub const GEO_B: &str = "GEO_B";
/// `GeoKey` (service id, region id) -> that region's `ServiceValue`.
pub const GEO_SERVICES: &str = "GEO_SERVICES";
/// Connection table: `FlowKey` -> `FlowState` (LRU), for flows past their first packet.
pub const CONNTRACK: &str = "CONNTRACK";
/// Flows that have sent one packet (a TCP SYN, a UDP flow's first datagram): `FlowKey` ->
/// `FlowState` (LRU). A flow moves to `CONNTRACK` at its client's next packet that is not a SYN,
/// so a flood of first packets churns this table only (see docs/design.md).
pub const EMBRYONIC: &str = "EMBRYONIC";
/// NAT entries, both directions of each connection: `FlowKey` -> `NatEntry` (see `nat`).
pub const NAT_FLOWS: &str = "NAT_FLOWS";
/// Egress interfaces for XDP_REDIRECT: ifindex -> ifindex (devmap hash).
pub const TX_PORTS: &str = "TX_PORTS";
/// Per-CPU traffic counters per service id.
pub const SERVICE_STATS: &str = "SERVICE_STATS";
/// Per-CPU traffic counters per backend slot.
pub const BACKEND_STATS: &str = "BACKEND_STATS";
/// Per-CPU global counters, indexed by `Counter`.
pub const GLOBAL_STATS: &str = "GLOBAL_STATS";

/// New-flow limits: `ShedBucket` by backend slot, then by `MAX_BACKENDS + service id`.
pub const SHED: &str = "SHED";

/// `DataPlaneConfig` at index 0.
pub const DP_CONFIG: &str = "DP_CONFIG";

/// Per-CPU next-hop cache of encapsulated forwarding, by backend slot (`NextHop`).
pub const NEXT_HOPS: &str = "NEXT_HOPS";

/// Every map that is pinned under `/sys/fs/bpf/<instance>/maps/`.
pub const PINNED: [&str; 19] = [
    GEO_A,
    GEO_B,
    GEO_SERVICES,
    SHED,
    ACTIVE,
    SERVICES,
    FRAGMENT_SERVICES,
    VIP_ADDRS,
    DP_CONFIG,
    VIP_FILTER,
    MAGLEV_POOL,
    BACKENDS,
    CONNTRACK,
    EMBRYONIC,
    NAT_FLOWS,
    TX_PORTS,
    SERVICE_STATS,
    BACKEND_STATS,
    GLOBAL_STATS,
];

/// The decapsulator (its own object, on backends): local VIPs and per-CPU counters.
pub const DECAP_VIPS: &str = "DECAP_VIPS";
pub const DECAP_STATS: &str = "DECAP_STATS";
pub const DECAP_GUE_PORT: &str = "DECAP_GUE_PORT";
pub const DECAP_MAC: &str = "DECAP_MAC";
pub const DECAP_SOURCES: &str = "DECAP_SOURCES";
pub const DECAP_LOCAL: &str = "DECAP_LOCAL";
/// Its program.
pub const PROG_DECAP: &str = "decap";

/// The XDP balancer program.
pub const PROG_LB: &str = "lb";
/// Checks through the data path (`steer`): the check device's egress classifier, and the XDP
/// program on its peer.
pub const PROG_STEER_MARK: &str = "steer_mark";
pub const PROG_STEER: &str = "steer";
/// A program that passes every frame: veth peers need one to receive XDP_TX/redirect frames.
pub const PROG_PASS: &str = "xdp_pass";

pub const MAX_SERVICES: u32 = 1024;
pub const MAX_BACKENDS: u32 = 16384;
pub const MAX_TX_PORTS: u32 = 64;
/// Compile-time defaults; the daemon resizes these from its config before loading.
pub const DEFAULT_CONNTRACK_SIZE: u32 = 65536;
pub const DEFAULT_EMBRYONIC_SIZE: u32 = 65536;
/// NAT entries (two per connection).
pub const DEFAULT_NAT_SIZE: u32 = 262144;
/// Room for 288 tables of the default size (36 MiB): 256 services, and spare regions that the
/// swaps share (each swap needs one; the tables a swap replaced keep serving second chance
/// while there is room, and give it back when another swap needs it).
pub const DEFAULT_POOL_SLOTS: u32 = 288 * pool_region(DEFAULT_TABLE_SIZE);
/// Pool slots per array element: four 16-bit slots in an 8-byte value.
pub const POOL_LANES: u32 = 4;
/// The pool slots a table of `size` takes: whole elements (every region starts at one).
pub const fn pool_region(size: u32) -> u32 {
    size.div_ceil(POOL_LANES) * POOL_LANES
}
const _: () = assert!(DEFAULT_POOL_SLOTS.is_multiple_of(POOL_LANES));
/// A backend slot fits the pool's 16-bit entries, with `u16::MAX` to spare.
const _: () = assert!(MAX_BACKENDS < u16::MAX as u32);
/// Default Maglev table size (prime).
pub const DEFAULT_TABLE_SIZE: u32 = 65537;
