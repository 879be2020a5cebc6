//! Katran as a bench contender: its prebuilt XDP object (`../shared/katran`, see the README
//! there) loaded with aya and configured as KatranLb would: one IPv4 and one IPv6 address, each
//! with a TCP and a UDP VIP on the ports our cases use, 100 reals per family behind a Maglev ring
//! of 65537, a per-CPU LRU of 65536 flows, and the next hop's MAC. The data-plane bench runs it
//! through the same restoring wrapper as ours, interleaved with our cases.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use aya::{
    Ebpf, Pod,
    maps::{Array, ArrayOfMaps, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::Xdp,
};
use lb_common::{PROTO_TCP, PROTO_UDP};
use lb_userspace::maglev::{MaglevBackend, build_table};

use crate::packets::{VIP4, VIP6};

/// The program's name in both objects.
const PROGRAM: &str = "balancer_ingress";
/// Katran's compile-time limits (balancer_consts.h at the commit in KATRAN_COMMIT).
const MAX_VIPS: u32 = 512;
const RING_SIZE: u32 = 65537;
/// Global counters live at `stats[MAX_VIPS + k]`.
const LRU_CNTRS: u32 = 0;
const LRU_MISS_CNTR: u32 = 1;
const NEW_CONN_RATE_CNTR: u32 = 2;
const FALLBACK_LRU_CNTR: u32 = 3;
const CH_DROP_STATS: u32 = 9;
const XDP_TX_CNTR: u32 = 17;
const XDP_DROP_CNTR: u32 = 18;
const XDP_PASS_CNTR: u32 = 19;
const F_IPV6: u8 = 1;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
/// Flows per CPU in each LRU: the harness's default, and our own connection table's size.
pub const LRU_PER_CPU: u32 = 65536;
pub const REALS: u32 = 100;
/// The next hop's MAC (ctl_array[0]): the dst MAC of every encapsulated packet.
pub const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];

/// `struct vip_definition`: address (IPv4 in bytes 0..4), port (network order), proto, pad.
#[repr(C)]
#[derive(Clone, Copy)]
struct VipDefinition {
    addr: [u8; 16],
    port_be: u16,
    proto: u8,
    pad: u8,
}

/// `struct vip_meta`: flags, vip_num (its ring segment and stats index).
#[repr(C)]
#[derive(Clone, Copy)]
struct VipMeta {
    flags: u32,
    vip_num: u32,
}

/// `struct real_definition`: address, flags (F_IPV6), pad.
#[repr(C)]
#[derive(Clone, Copy)]
struct RealDefinition {
    addr: [u8; 16],
    flags: u8,
    pad: [u8; 3],
}

/// `struct lb_stats`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct LbStats {
    pub v1: u64,
    pub v2: u64,
}

/// `struct flow_key`: src, dst (IPv4 in the first 4 bytes), sport, dport (network order), proto.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

// SAFETY: plain repr(C) data with explicit padding fields.
unsafe impl Pod for VipDefinition {}
unsafe impl Pod for VipMeta {}
unsafe impl Pod for RealDefinition {}
unsafe impl Pod for LbStats {}
unsafe impl Pod for FlowKey {}
const _: () = assert!(size_of::<VipDefinition>() == 20);
const _: () = assert!(size_of::<RealDefinition>() == 20);
const _: () = assert!(size_of::<FlowKey>() == 40);

/// Katran's counters that the bench checks, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub tx: u64,
    pub pass: u64,
    pub drop: u64,
    pub lru_miss: u64,
    pub syn_miss: u64,
    pub nonsyn_miss: u64,
    pub fallback: u64,
    pub ch_drop: u64,
}

impl Counters {
    pub fn since(&self, before: &Self) -> Self {
        Self {
            tx: self.tx - before.tx,
            pass: self.pass - before.pass,
            drop: self.drop - before.drop,
            lru_miss: self.lru_miss - before.lru_miss,
            syn_miss: self.syn_miss - before.syn_miss,
            nonsyn_miss: self.nonsyn_miss - before.nonsyn_miss,
            fallback: self.fallback - before.fallback,
            ch_drop: self.ch_drop - before.ch_drop,
        }
    }
}

/// Where the Katran objects are: `LB_KATRAN_DIR`, else `../shared/katran` beside the checkout.
pub fn find_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("LB_KATRAN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/katran"));
    dir.join("balancer.bpf.o").is_file().then_some(dir)
}

/// The address of real `i` (1-based) of a family, as Katran stores it.
pub fn real_addr(v6: bool, i: u32) -> [u8; 16] {
    let mut addr = [0u8; 16];
    if v6 {
        addr[..6].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0x01, 0x00]);
        addr[15] = i as u8;
    } else {
        addr[..4].copy_from_slice(&[10, 100, 0, i as u8]);
    }
    addr
}

/// One loaded and configured Katran object.
pub struct Katran {
    ebpf: Ebpf,
    stats: PerCpuArray<MapData, LbStats>,
    /// One LRU per CPU; the outer map holds its own reference, these let the bench look in.
    lrus: Vec<HashMap<MapData, FlowKey, [u8; 16]>>,
}

impl Katran {
    pub fn load(object: &Path) -> Result<Self> {
        let mut ebpf = Ebpf::load_file(object).with_context(|| format!("load {}", object.display()))?;
        let prog: &mut Xdp = ebpf.program_mut(PROGRAM).context(PROGRAM)?.try_into()?;
        prog.load()
            .with_context(|| format!("verifier rejected {}", object.display()))?;
        let mut map = |n: &str| ebpf.take_map(n).with_context(|| format!("Katran map {n}"));

        let mut ctl: Array<MapData, u64> = map("ctl_array")?.try_into()?;
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&NEXT_HOP_MAC);
        ctl.set(0, u64::from_ne_bytes(mac), 0)?;

        let mut reals: Array<MapData, RealDefinition> = map("reals")?.try_into()?;
        for (family, v6) in [(0u32, false), (1, true)] {
            for i in 1..=REALS {
                let flags = if v6 { F_IPV6 } else { 0 };
                let real = RealDefinition {
                    addr: real_addr(v6, i),
                    flags,
                    pad: [0; 3],
                };
                reals.set(family * REALS + i, real, 0)?;
            }
        }

        // The same Maglev table as ours (100 equal backends), as indices into `reals`.
        let ids: Vec<String> = (1..=REALS).map(|i| format!("b{i}")).collect();
        let members: Vec<MaglevBackend<'_>> =
            ids.iter().map(|id| MaglevBackend { id, weight: 100 }).collect();
        let table = build_table(&members, RING_SIZE);
        ensure!(
            table.len() == RING_SIZE as usize,
            "Maglev table has {} slots",
            table.len()
        );

        let mut vips: HashMap<MapData, VipDefinition, VipMeta> = map("vip_map")?.try_into()?;
        let mut rings: Array<MapData, u32> = map("ch_rings")?.try_into()?;
        let v4 = {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&VIP4);
            a
        };
        for (vip_num, (addr, port, proto, family)) in [
            (v4, 80u16, PROTO_TCP, 0u32),
            (v4, 53, PROTO_UDP, 0),
            (VIP6, 80, PROTO_TCP, 1),
            (VIP6, 53, PROTO_UDP, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let key = VipDefinition {
                addr,
                port_be: port.to_be(),
                proto,
                pad: 0,
            };
            let vip_num = vip_num as u32;
            vips.insert(key, VipMeta { flags: 0, vip_num }, 0)?;
            for (pos, &i) in table.iter().enumerate() {
                rings.set(vip_num * RING_SIZE + pos as u32, family * REALS + i + 1, 0)?;
            }
        }

        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| e)? as u32;
        let mut outer: ArrayOfMaps<MapData> = map("lru_mapping")?.try_into()?;
        let mut lrus = Vec::new();
        for cpu in 0..ncpus {
            let def = aya_obj::Map::new_from_params(BPF_MAP_TYPE_LRU_HASH, 40, 16, LRU_PER_CPU, 0);
            let inner = MapData::create(def, &format!("katran_lru{cpu}"), None)?;
            outer.set(cpu, &inner, 0)?;
            lrus.push(aya::maps::Map::LruHashMap(inner).try_into()?);
        }
        let stats = map("stats")?.try_into()?;
        Ok(Self { ebpf, stats, lrus })
    }

    pub fn program(&self) -> Result<&Xdp> {
        Ok(self.ebpf.program(PROGRAM).context(PROGRAM)?.try_into()?)
    }

    fn stat(&self, k: u32) -> Result<LbStats> {
        let values = self.stats.get(&(MAX_VIPS + k), 0)?;
        Ok(values.iter().fold(LbStats::default(), |a, v| LbStats {
            v1: a.v1 + v.v1,
            v2: a.v2 + v.v2,
        }))
    }

    pub fn counters(&self) -> Result<Counters> {
        let miss = self.stat(LRU_MISS_CNTR)?;
        let ch = self.stat(CH_DROP_STATS)?;
        Ok(Counters {
            tx: self.stat(XDP_TX_CNTR)?.v1,
            pass: self.stat(XDP_PASS_CNTR)?.v1,
            drop: self.stat(XDP_DROP_CNTR)?.v1,
            lru_miss: self.stat(LRU_CNTRS)?.v2,
            syn_miss: miss.v1,
            nonsyn_miss: miss.v2,
            fallback: self.stat(FALLBACK_LRU_CNTR)?.v1,
            ch_drop: ch.v1 + ch.v2,
        })
    }

    /// Sets the flood guard on every CPU. Tripped: its count far past MAX_CONN_RATE and its
    /// quantum starting now (bpf_ktime_get_ns is CLOCK_MONOTONIC), so it holds for a second.
    /// At rest: a quantum long over, so the next new flow starts a fresh one.
    pub fn set_flood_guard(&mut self, tripped: bool) -> Result<()> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec we pass.
        if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
            anyhow::bail!("clock_gettime: {}", std::io::Error::last_os_error());
        }
        let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let value = if tripped {
            LbStats { v1: 1 << 40, v2: now }
        } else {
            LbStats::default()
        };
        let values = PerCpuValues::try_from(vec![value; ncpus])?;
        self.stats.set(MAX_VIPS + NEW_CONN_RATE_CNTR, values, 0)?;
        Ok(())
    }

    /// Whether `cpu`'s LRU holds this flow.
    pub fn has_flow(&self, cpu: usize, key: &FlowKey) -> Result<bool> {
        let lru = self.lrus.get(cpu).context("no LRU for this CPU")?;
        match lru.get(key, 0) {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
