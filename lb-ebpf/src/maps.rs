//! Every map of the data plane. Names and capacities come from `lb_common::maps`; the daemon
//! resizes CONNTRACK and MAGLEV_POOL before loading. All are pinned by name.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    AddrKey, Backend, FlowKey, FlowState, NatEntry, ServiceKey, ServiceValue, TrafficStats, VipFilter,
    dpconfig::{DataPlaneConfig, FloodWindow, NextHop},
    geo::{GeoData, GeoKey, MAX_GEO_PREFIXES, MAX_REGIONS},
    maps::{
        DEFAULT_CONNTRACK_SIZE, DEFAULT_EMBRYONIC_SIZE, DEFAULT_NAT_SIZE, DEFAULT_POOL_SLOTS, MAX_BACKENDS,
        MAX_SERVICES, MAX_TX_PORTS, POOL_LANES,
    },
    nat::SourceWindow,
    shed::ShedBucket,
    stats::COUNTER_SLOTS,
};

/// Client prefix -> region id; the daemon fills the one not in use, then flips `DP_F_GEO_B`.
#[map]
pub static GEO_A: LpmTrie<GeoData, u32> = LpmTrie::pinned(MAX_GEO_PREFIXES, 0);
#[map]
pub static GEO_B: LpmTrie<GeoData, u32> = LpmTrie::pinned(MAX_GEO_PREFIXES, 0);

/// (service id, region id) -> the service value that serves the region's clients.
#[map]
pub static GEO_SERVICES: HashMap<GeoKey, ServiceValue> =
    HashMap::pinned(MAX_SERVICES * MAX_REGIONS, BPF_F_NO_PREALLOC);

/// Not preallocated, so an update replaces the value under RCU: a packet that already looked
/// up a service keeps reading the old value intact.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map]
pub static DP_CONFIG: Array<DataPlaneConfig> = Array::pinned(1, 0);

/// Per-CPU room for one bpf_fib_lookup query (64 bytes): too big for the stack next to the rest.
#[map]
pub static FIB_SCRATCH: PerCpuArray<[u64; 8]> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room for a next hop that is not cached (unresolved neighbour).
#[map]
pub static HOP_SCRATCH: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(1, 0);

/// Not pinned: a cache, rebuilt from the FIB after any restart.
#[map]
pub static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map]
pub static VIP_ADDRS: HashMap<AddrKey, u32> = HashMap::pinned(MAX_SERVICES, 0);

#[map]
pub static VIP_FILTER: Array<VipFilter> = Array::pinned(1, 0);

/// Per (VIP, protocol): the service whose table takes that VIP's fragments (port 0 in the key).
#[map]
pub static FRAGMENT_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// mmap-able so the daemon writes a whole table with memcpy instead of one syscall per slot.
/// Four 16-bit slots to an element (`pool_slot` reads one).
#[map]
pub static MAGLEV_POOL: Array<[u16; 4]> = Array::pinned(DEFAULT_POOL_SLOTS / POOL_LANES, BPF_F_MMAPABLE);

/// Pool slot `i` (a backend slot, or a word of a strategy's region).
#[inline(always)]
pub fn pool_slot(i: u32) -> Option<u32> {
    MAGLEV_POOL
        .get(i / POOL_LANES)
        .map(|e| u32::from(e[(i % POOL_LANES) as usize]))
}

#[map]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// The live backend of a NAT request entry, if its slot still serves the connection.
#[inline(always)]
pub fn backend_of(e: &NatEntry) -> Option<&'static Backend> {
    BACKENDS.get(e.backend).filter(|b| b.serves(e.generation))
}

/// Active flows per backend slot, for the counting strategies: +1 when a new flow is pinned,
/// −1 at the client's FIN or RST, by atomic adds from every CPU. mmap-able so the daemon can
/// correct drift (flows evicted from the connection table) with atomic adds of its own.
#[map]
pub static ACTIVE: Array<i64> = Array::pinned(MAX_BACKENDS, BPF_F_MMAPABLE);

/// Adds `delta` to a backend slot's active-flow count, atomically (every CPU adds to it).
#[inline(always)]
pub fn active_add(slot: u32, delta: i64) {
    if let Some(p) = ACTIVE.get_ptr_mut(slot) {
        // SAFETY: a pointer into an array slot of an i64; the add is one atomic instruction.
        unsafe {
            core::intrinsics::atomic_xadd::<i64, i64, { core::intrinsics::AtomicOrdering::Relaxed }>(p, delta)
        };
    }
}

/// Takes a flow pinned to `slot` at `generation` off the slot's active-flow count, unless the
/// slot has since gone to another backend: its count was zeroed then (`reset_backend_slot`),
/// and the old flow's −1 would take one off the new backend's (below 0 in chaos runs).
#[inline(always)]
pub fn active_release(slot: u32, generation: u32) {
    if BACKENDS.get(slot).is_some_and(|b| b.generation == generation) {
        active_add(slot, -1);
    }
}

/// Round robin's cursor, per service and per CPU. Not pinned: a restart only restarts the walk.
#[map]
pub static CURSORS: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// One table shared by all CPUs, so a flow stays put even when its packets arrive on another
/// CPU; but each CPU keeps its own LRU list (BPF_F_NO_COMMON_LRU), so inserting a new flow takes
/// no global lock. Each CPU can hold up to size / CPUs entries before it evicts its oldest.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, FlowState> =
    LruHashMap::pinned(DEFAULT_CONNTRACK_SIZE, BPF_F_NO_COMMON_LRU);

/// Flows that have sent only their first packet (a SYN, a UDP flow's first datagram). Apart
/// from CONNTRACK so that a flood of first packets, each a fresh tuple, evicts only its own
/// kind: a flow moves to CONNTRACK at its client's next packet that is not a SYN (`select`).
/// Per-CPU LRU lists, as CONNTRACK; the daemon's census removes entries older than
/// `lb_common::flow::EMBRYONIC_TTL` and takes them off the active counts.
#[map]
pub static EMBRYONIC: LruHashMap<FlowKey, FlowState> =
    LruHashMap::pinned(DEFAULT_EMBRYONIC_SIZE, BPF_F_NO_COMMON_LRU);

/// The flood guard's window, per CPU (see `select::flooded`). Not pinned: a restart only
/// starts a new window.
#[map]
pub static FLOOD: PerCpuArray<FloodWindow> = PerCpuArray::with_max_entries(1, 0);

/// NAT entries, both directions (`lb_common::nat`). A plain hash map, not LRU: evicting a live
/// connection would break it, so a full table refuses new connections (counted) and the daemon
/// expires entries. Not preallocated, so a value a packet holds is never recycled under it.
#[map]
pub static NAT_FLOWS: HashMap<FlowKey, NatEntry> = HashMap::pinned(DEFAULT_NAT_SIZE, BPF_F_NO_PREALLOC);

/// New NAT connections per source address in the current window (see `nat::source_allowed`).
/// LRU, so spoofed sources only push out idle ones. Not pinned: a restart starts new windows.
#[map]
pub static NAT_SOURCES: LruHashMap<AddrKey, SourceWindow> = LruHashMap::with_max_entries(65536, 0);

/// Room for a new NAT connection's two entries and the reply key. A map value, not the stack:
/// the verifier rejects the misaligned stack stores the compiler may merge these fields into.
#[repr(C)]
pub struct NatScratch {
    pub fwd: NatEntry,
    pub rev: NatEntry,
    pub rev_key: FlowKey,
    /// The per-source limit's key and a new source's window.
    pub src_key: AddrKey,
    pub src_window: SourceWindow,
}

/// Per-CPU room to build a new NAT connection's entries.
#[map]
pub static NAT_SCRATCH: PerCpuArray<NatScratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::pinned(MAX_TX_PORTS, 0);

#[map]
pub static SERVICE_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_SERVICES, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// Kinds of rare event (`events::Event`), the size of `EVENT_NEXT`.
pub const EVENTS: u32 = 2;

/// When each CPU may next log each kind of rare event (see `events`).
#[map]
pub static EVENT_NEXT: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENTS, 0);

/// New-flow limits (see `lb_common::shed`).
#[map]
pub static SHED: Array<ShedBucket> = Array::pinned(MAX_BACKENDS + MAX_SERVICES, 0);

#[map]
pub static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);
