//! The data plane as userspace sees it: loading and adopting the pinned program, and typed
//! handles to every map: the writer's (`DataPlane`, owned by the reconciler) and the readers'
//! (`Readers`, their own handles to the pins, so a read never waits for the writer).

pub mod active;
mod batch;
pub mod census;
pub mod layout;
mod load;
mod mapping;
mod mirror;
mod pool;
mod settings;
pub mod steer;
mod writes;

use aya::maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray, PerCpuValues, lpm_trie::LpmTrie};
use lb_common::{
    AddrKey, Backend, FlowKey, FlowState, NatEntry, ServiceKey, ServiceValue, TrafficStats, VipFilter,
    addr_words,
    dpconfig::{DP_F_GEO_B, DataPlaneConfig},
    geo::{GeoData, GeoKey},
};
use serde::Serialize;

pub use load::{detach_instance, open, open_pinned, pin_dir};
pub use pool::{Pool, RegionAllocator, grace_period};
pub use settings::{AttachMode, Forwarding, Settings};
pub use writes::MapWrites;

use crate::error::{Error, Result};

/// How the program sits on one interface.
#[derive(Clone, Debug, Serialize)]
pub struct Attachment {
    pub interface: String,
    pub mode: &'static str,
    /// Found pinned from an earlier daemon run rather than attached now.
    pub adopted: bool,
}

pub struct DataPlane {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub fragment_services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub vip_filter: Array<MapData, VipFilter>,
    pub vip_addrs: HashMap<MapData, AddrKey, u32>,
    pub dp_config: Array<MapData, DataPlaneConfig>,
    pub backends: Array<MapData, Backend>,
    pub conntrack: HashMap<MapData, FlowKey, FlowState>,
    pub embryonic: HashMap<MapData, FlowKey, FlowState>,
    pub nat: HashMap<MapData, FlowKey, NatEntry>,
    pub tx_ports: DevMapHash<MapData>,
    pub service_stats: PerCpuArray<MapData, TrafficStats>,
    pub backend_stats: PerCpuArray<MapData, TrafficStats>,
    pub global_stats: PerCpuArray<MapData, u64>,
    pub shed: Array<MapData, lb_common::shed::ShedBucket>,
    pub active: Array<MapData, i64>,
    /// The region tries, A and B (`DP_F_GEO_B` says which is in use).
    pub geo: [LpmTrie<MapData, GeoData, u32>; 2],
    pub geo_services: HashMap<MapData, GeoKey, ServiceValue>,
    pub pool: Pool,
    pub attachments: Vec<Attachment>,
    /// True when the program and maps were adopted from pins.
    pub adopted: bool,
    /// The balancer program's kernel id.
    pub program_id: Option<u32>,
    /// What this start did with pins of another build: maps reused and migrated, the program
    /// replaced (`None`: a fresh load, or the same build's pins adopted).
    pub upgrade: Option<layout::Upgrade>,
    /// What the reconciler's writes left in the maps it alone writes.
    pub(crate) mirror: mirror::Mirror,
}

impl DataPlane {
    /// Writes the daemon-wide data-plane settings (encapsulation and NAT sources, echo policy)
    /// and lists the attached interfaces as redirect targets (NAT replies leave by the
    /// interface their client's packets came in on).
    pub fn set_config(&mut self, interfaces: &[String], cfg: &Forwarding) -> Result<()> {
        for iface in interfaces {
            let index = ifindex(iface)?;
            self.tx_ports
                .insert(index, index, None, 0)
                .map_err(|e| Error::dataplane(format!("add {iface} to TX_PORTS: {e}")))?;
        }
        let v4_word = |a: std::net::Ipv4Addr| {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            addr_words(b)[0]
        };
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        // Which region trie is in use is the geo loader's to say. The next-hop epoch moves on:
        // routes and neighbours may have changed while no daemon watched them.
        let current = self.dp_config.get(&0, 0).ok();
        let geo_b = current.map_or(0, |c| c.flags & DP_F_GEO_B);
        let hop_epoch = current.map_or(0, |c| c.hop_epoch.wrapping_add(1));
        let value = DataPlaneConfig {
            encap_src4: v4_word(cfg.encap_source4),
            flags: flag(cfg.echo_reply, lb_common::dpconfig::DP_F_ECHO_REPLY)
                | flag(cfg.too_big_icmp, lb_common::dpconfig::DP_F_TOO_BIG_ICMP)
                | geo_b,
            encap_src6: addr_words(cfg.encap_source6.octets()),
            gue_port: cfg.gue_port,
            nat_port_first: cfg.nat_port_first,
            nat_port_count: cfg.nat_port_count,
            nat_src6: cfg.nat_source6.map_or([0; 4], |a| addr_words(a.octets())),
            nat_src4: cfg.nat_source4.map_or(0, v4_word),
            flood_limit: lb_common::dpconfig::flood_limit(cfg.flood_guard_per_cpu),
            nat_source_limit: cfg.nat_max_new_per_source,
            hop_epoch,
        };
        self.dp_config.set(0, value, 0).map_err(Error::dataplane)
    }

    /// Moves the next-hop epoch: every CPU asks the FIB again for each backend's next hop
    /// before it next encapsulates for it.
    pub fn next_hop_epoch(&mut self) -> Result<()> {
        let mut cfg = self.dp_config.get(&0, 0).map_err(Error::dataplane)?;
        cfg.hop_epoch = cfg.hop_epoch.wrapping_add(1);
        self.dp_config.set(0, cfg, 0).map_err(Error::dataplane)
    }

    /// Loads a geo data set atomically: fills the trie not in use (emptied first), flips
    /// `DP_F_GEO_B` so every packet after reads it, then empties the other. Returns the
    /// prefixes loaded.
    pub fn load_geo(&mut self, prefixes: &[crate::model::geo_settings::GeoPrefix]) -> Result<usize> {
        use aya::maps::lpm_trie::Key;
        let mut cfg = self.dp_config.get(&0, 0).map_err(Error::dataplane)?;
        let in_use = usize::from(cfg.flags & DP_F_GEO_B != 0);
        let next = 1 - in_use;
        clear_trie(&mut self.geo[next])?;
        for p in prefixes {
            let (family, bytes) = match p.addr {
                std::net::IpAddr::V4(a) => {
                    let mut b = [0u8; 16];
                    b[..4].copy_from_slice(&a.octets());
                    (lb_common::FAMILY_V4, b)
                }
                std::net::IpAddr::V6(a) => (lb_common::FAMILY_V6, a.octets()),
            };
            let (len, data) = lb_common::geo::key(family, addr_words(bytes), u32::from(p.len));
            self.geo[next]
                .insert(&Key::new(len, data), p.region, 0)
                .map_err(|e| Error::dataplane(format!("geo prefix {}/{}: {e}", p.addr, p.len)))?;
        }
        cfg.flags = (cfg.flags & !DP_F_GEO_B) | if next == 1 { DP_F_GEO_B } else { 0 };
        self.dp_config.set(0, cfg, 0).map_err(Error::dataplane)?;
        clear_trie(&mut self.geo[in_use])?;
        Ok(prefixes.len())
    }
}

fn clear_trie(t: &mut LpmTrie<MapData, GeoData, u32>) -> Result<()> {
    let keys: Vec<_> = t.keys().filter_map(|k| k.ok()).collect();
    for k in keys {
        t.remove(&k).map_err(Error::dataplane)?;
    }
    Ok(())
}

/// Read-only handles of a running instance's maps, opened from its pins.
pub struct Readers {
    pub conntrack: HashMap<MapData, FlowKey, FlowState>,
    /// Flows that have sent one packet (see `lb_common::maps::EMBRYONIC`).
    pub embryonic: HashMap<MapData, FlowKey, FlowState>,
    pub nat: HashMap<MapData, FlowKey, NatEntry>,
    pub backends: Array<MapData, Backend>,
    pub service_stats: PerCpuArray<MapData, TrafficStats>,
    pub backend_stats: PerCpuArray<MapData, TrafficStats>,
    pub global_stats: PerCpuArray<MapData, u64>,
    pub active: active::ActiveCounts,
    pub pool: Pool,
    pub dp_config: Array<MapData, DataPlaneConfig>,
    pub geo: [LpmTrie<MapData, GeoData, u32>; 2],
    pub geo_services: HashMap<MapData, GeoKey, ServiceValue>,
}

impl Readers {
    /// A geo service's value for a client, as the data plane finds it: the client's region
    /// in the trie in use, then that region's value; `None` when the client has no region (or
    /// the region no value), and the service's own value applies.
    pub fn geo_value(&self, service: u32, client: std::net::IpAddr) -> Option<(u32, ServiceValue)> {
        use aya::maps::lpm_trie::Key;
        let in_use = self
            .dp_config
            .get(&0, 0)
            .ok()
            .map_or(0, |c| usize::from(c.flags & DP_F_GEO_B != 0));
        let (family, bytes) = match client {
            std::net::IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.octets());
                (lb_common::FAMILY_V4, b)
            }
            std::net::IpAddr::V6(a) => (lb_common::FAMILY_V6, a.octets()),
        };
        let (len, data) = lb_common::geo::key(family, addr_words(bytes), lb_common::geo::max_prefix(family));
        let region = self.geo[in_use].get(&Key::new(len, data), 0).ok()?;
        let value = self.geo_services.get(&GeoKey { service, region }, 0).ok()?;
        Some((region, value))
    }

    pub fn open(instance: &str) -> Result<Self> {
        use lb_common::maps;
        use load::{open_pinned, pool_of, typed};
        let dir = pin_dir(instance);
        let map = |name: &str| open_pinned(&dir.join(name));
        let pool = pool_of(map(maps::MAGLEV_POOL)?)?;
        Ok(Self {
            conntrack: map(maps::CONNTRACK)?.try_into().map_err(typed)?,
            embryonic: map(maps::EMBRYONIC)?.try_into().map_err(typed)?,
            nat: map(maps::NAT_FLOWS)?.try_into().map_err(typed)?,
            backends: map(maps::BACKENDS)?.try_into().map_err(typed)?,
            service_stats: map(maps::SERVICE_STATS)?.try_into().map_err(typed)?,
            backend_stats: map(maps::BACKEND_STATS)?.try_into().map_err(typed)?,
            global_stats: map(maps::GLOBAL_STATS)?.try_into().map_err(typed)?,
            active: match map(maps::ACTIVE)? {
                aya::maps::Map::Array(data) => active::ActiveCounts::new(data)?,
                _ => return Err(Error::dataplane("ACTIVE is not an array")),
            },
            pool,
            dp_config: map(maps::DP_CONFIG)?.try_into().map_err(typed)?,
            geo: [
                map(maps::GEO_A)?.try_into().map_err(typed)?,
                map(maps::GEO_B)?.try_into().map_err(typed)?,
            ],
            geo_services: map(maps::GEO_SERVICES)?.try_into().map_err(typed)?,
        })
    }

    /// Sum of a backend slot's per-CPU counters.
    pub fn backend_traffic(&self, slot: u32) -> Result<TrafficStats> {
        sum_traffic(self.backend_stats.get(&slot, 0).map_err(Error::dataplane)?)
    }

    pub fn service_traffic(&self, id: u32) -> Result<TrafficStats> {
        sum_traffic(self.service_stats.get(&id, 0).map_err(Error::dataplane)?)
    }

    /// Every backend slot's traffic below `slots`, in one syscall.
    pub fn backends_traffic(&self, slots: u32) -> Result<Vec<TrafficStats>> {
        all_traffic(&self.backend_stats, slots)
    }

    /// Every service id's traffic below `ids`, in one syscall.
    pub fn services_traffic(&self, ids: u32) -> Result<Vec<TrafficStats>> {
        all_traffic(&self.service_stats, ids)
    }

    /// Every global counter, indexed by `Counter as usize`, in one syscall.
    pub fn counters(&self) -> Result<Vec<u64>> {
        use aya::maps::IterableMap;
        batch::per_cpu_sums(
            self.global_stats.map(),
            lb_common::stats::COUNTER_SLOTS,
            |a, b| *a += b,
        )
        .map_err(|e| Error::dataplane(format!("read counters: {e}")))
    }

    pub fn counter(&self, counter: lb_common::Counter) -> Result<u64> {
        let values = self
            .global_stats
            .get(&(counter as u32), 0)
            .map_err(Error::dataplane)?;
        Ok(values.iter().sum())
    }
}

/// A monotonic clock's time in nanoseconds: CLOCK_MONOTONIC_COARSE is the data plane's own
/// (`bpf_ktime_get_coarse_ns`), CLOCK_MONOTONIC the precise one on the same base.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn ifindex(iface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(iface)
        .map_err(|_| Error::invalid(format!("invalid interface name {iface:?}")))?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(Error::invalid(format!("unknown interface {iface}"))),
        i => Ok(i),
    }
}

fn all_traffic(map: &PerCpuArray<MapData, TrafficStats>, count: u32) -> Result<Vec<TrafficStats>> {
    use aya::maps::IterableMap;
    batch::per_cpu_sums(map.map(), count, add_traffic)
        .map_err(|e| Error::dataplane(format!("read traffic: {e}")))
}

fn add_traffic(acc: &mut TrafficStats, v: &TrafficStats) {
    acc.packets += v.packets;
    acc.bytes += v.bytes;
    acc.new_flows += v.new_flows;
    acc.syn_retransmits += v.syn_retransmits;
    acc.refused += v.refused;
}

fn sum_traffic(values: PerCpuValues<TrafficStats>) -> Result<TrafficStats> {
    let mut sum = TrafficStats::default();
    for v in values.iter() {
        add_traffic(&mut sum, v);
    }
    Ok(sum)
}

fn zeroed_per_cpu() -> Result<PerCpuValues<TrafficStats>> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::io("count CPUs", e))?;
    PerCpuValues::try_from(vec![TrafficStats::default(); cpus]).map_err(|e| Error::io("per-CPU values", e))
}
