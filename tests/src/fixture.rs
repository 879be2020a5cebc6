//! The data plane under BPF_PROG_TEST_RUN, as the golden tests, the fuzzer and the data-plane
//! bench drive it: each XDP program loaded through the verifier with typed handles to its maps,
//! and thin helpers that fill them as the daemon and `lb backend-host setup` would.
//!
//! Setup returns errors, so the bench can report them. `run`, `counter` and `count` panic
//! instead: the tests call them on every frame, and a failure there is the host's, never a
//! verdict to check.
//!
//! A map the three need is a field of `Balancer` (or `Decapsulator`) and its line in `load`.

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, DevMapHash, HashMap, Map, MapData, MapError, PerCpuArray, lpm_trie::LpmTrie},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    AddrKey, Backend, Counter, FlowKey, FlowState, NatEntry, ServiceKey, ServiceValue, VipFilter,
    backend::BACKEND_F_ACTIVE,
    dpconfig::DataPlaneConfig,
    geo::{GeoData, GeoKey},
    maps,
};
use lb_userspace::{config::DEFAULT_GUE_PORT, dataplane::Pool};

use crate::{
    packets::{BACKEND4, BACKEND6, ENCAP_SRC4, ENCAP_SRC6, LB_MAC, SNAT4, SNAT6, VIP4, VIP6, words},
    topology::{ipip_routes, load_object},
};

/// The balancer's `lb` program and its maps.
pub struct Balancer {
    ebpf: Ebpf,
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// (VIP, protocol, port 0) -> the service that takes the VIP's IPv4 fragments.
    pub fragment_services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub vip_filter: Array<MapData, VipFilter>,
    pub vip_addrs: HashMap<MapData, AddrKey, u32>,
    pub backends: Array<MapData, Backend>,
    /// Every service's table, mapped; held so the tables stay mapped while the program runs.
    pub pool: Pool,
    pub global: PerCpuArray<MapData, u64>,
    /// Each backend slot's traffic (packets, bytes, new flows, SYN retransmits).
    pub backend_stats: PerCpuArray<MapData, lb_common::TrafficStats>,
    pub conntrack: HashMap<MapData, FlowKey, FlowState>,
    /// Flows that have sent one packet.
    pub embryonic: HashMap<MapData, FlowKey, FlowState>,
    pub nat: HashMap<MapData, FlowKey, NatEntry>,
    pub tx_ports: DevMapHash<MapData>,
    pub dp_config: Array<MapData, DataPlaneConfig>,
    pub active: Array<MapData, i64>,
    /// The region trie in use while `DP_F_GEO_B` is unset.
    pub geo_a: LpmTrie<MapData, GeoData, u32>,
    pub geo_services: HashMap<MapData, GeoKey, ServiceValue>,
}

impl Balancer {
    /// The balancer object, its `lb` program through the verifier, every map empty.
    pub fn load() -> Result<Self> {
        let mut ebpf = load_object(lb_userspace::EBPF_OBJECT)?;
        program_mut(&mut ebpf, maps::PROG_LB)?
            .load()
            .context("verifier rejected lb")?;
        let pool = match take_map(&mut ebpf, maps::MAGLEV_POOL)? {
            Map::Array(data) => Pool::new(data)?,
            _ => bail!("MAGLEV_POOL is not an array"),
        };
        let e = &mut ebpf;
        Ok(Self {
            services: take(e, maps::SERVICES)?,
            fragment_services: take(e, maps::FRAGMENT_SERVICES)?,
            vip_filter: take(e, maps::VIP_FILTER)?,
            vip_addrs: take(e, maps::VIP_ADDRS)?,
            backends: take(e, maps::BACKENDS)?,
            pool,
            global: take(e, maps::GLOBAL_STATS)?,
            backend_stats: take(e, maps::BACKEND_STATS)?,
            conntrack: take(e, maps::CONNTRACK)?,
            embryonic: take(e, maps::EMBRYONIC)?,
            nat: take(e, maps::NAT_FLOWS)?,
            tx_ports: take(e, maps::TX_PORTS)?,
            dp_config: take(e, maps::DP_CONFIG)?,
            active: take(e, maps::ACTIVE)?,
            geo_a: take(e, maps::GEO_A)?,
            geo_services: take(e, maps::GEO_SERVICES)?,
            ebpf,
        })
    }

    pub fn program(&self) -> Result<&Xdp> {
        program(&self.ebpf, maps::PROG_LB)
    }

    /// Adds a service in the daemon's order: the VIP filter learns the address and VIP_ADDRS
    /// holds it before the service appears, so no packet finds the service but not its VIP.
    pub fn add_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        let mut filter = self.vip_filter.get(&0, 0)?;
        filter.add(&key);
        self.vip_filter.set(0, filter, 0)?;
        self.vip_addrs.insert(AddrKey::new(key.family, key.addr), 1, 0)?;
        self.services.insert(key, value, 0)?;
        Ok(())
    }

    /// Marks addresses (4 or 16 bytes) in the VIP filter as ones NAT entries may be keyed by:
    /// the NAT services' VIPs (requests) and their backends (replies).
    pub fn mark_nat(&mut self, addrs: &[&[u8]]) -> Result<()> {
        let mut filter = self.vip_filter.get(&0, 0)?;
        for a in addrs {
            filter.add_nat(&words(a));
        }
        self.vip_filter.set(0, filter, 0)?;
        Ok(())
    }

    /// Changes the data-plane settings in place.
    pub fn edit_config(&mut self, edit: impl FnOnce(&mut DataPlaneConfig)) -> Result<()> {
        let mut cfg = self.dp_config.get(&0, 0)?;
        edit(&mut cfg);
        self.dp_config.set(0, cfg, 0)?;
        Ok(())
    }

    /// What encapsulation needs: the lab's routed backends reachable (`ipip_routes`, in the
    /// calling thread's namespace), the encapsulation sources and GUE port set, and the
    /// router's interface a redirect target. Returns that interface's index.
    pub fn route_tunnels(&mut self) -> Result<u32> {
        let egress = ipip_routes()?;
        self.edit_config(|cfg| {
            cfg.encap_src4 = words(&ENCAP_SRC4)[0];
            cfg.encap_src6 = words(&ENCAP_SRC6);
            cfg.gue_port = DEFAULT_GUE_PORT;
        })?;
        self.add_tx_port(egress)?;
        Ok(egress)
    }

    /// Full NAT from the lab's SNAT4 and SNAT6, on `count` ports from `first`.
    pub fn snat_ports(&mut self, first: u16, count: u32) -> Result<()> {
        self.edit_config(|cfg| {
            cfg.nat_src4 = words(&SNAT4)[0];
            cfg.nat_src6 = words(&SNAT6);
            cfg.nat_port_first = first;
            cfg.nat_port_count = count;
        })
    }

    /// Lets the program redirect to `ifindex` (a backend behind it, or a tunnel's next hop).
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        self.tx_ports.insert(ifindex, ifindex, None, 0)?;
        Ok(())
    }

    /// One test run: the verdict and the frame as the program left it.
    pub fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        run_xdp(self.program().expect("lb program"), input).expect("test_run")
    }

    /// A global counter, summed over the CPUs.
    pub fn counter(&self, c: Counter) -> u64 {
        self.global.get(&(c as u32), 0).expect("counter").iter().sum()
    }

    /// A backend slot's traffic, summed over the CPUs.
    pub fn backend_traffic(&self, slot: u32) -> lb_common::TrafficStats {
        let per_cpu = self.backend_stats.get(&slot, 0).expect("backend stats");
        per_cpu
            .iter()
            .fold(lb_common::TrafficStats::default(), |mut t, c| {
                t.packets += c.packets;
                t.new_flows += c.new_flows;
                t.syn_retransmits += c.syn_retransmits;
                t
            })
    }

    /// Every global counter, in `Counter::ALL`'s order.
    pub fn counters(&self) -> Vec<u64> {
        Counter::ALL.iter().map(|&c| self.counter(c)).collect()
    }
}

/// The backend hosts' decapsulator as `lb backend-host setup` leaves it in the lab: it
/// trusts tunnels from the encapsulation sources (172.16.0.0/16, `ENCAP_SRC6`/96) to the
/// routed backends' addresses (`BACKEND4`, `BACKEND6`), with VIP4 and VIP6 local. GUE stays
/// off and any destination MAC is taken until the tests set them.
pub struct Decapsulator {
    ebpf: Ebpf,
    pub vips: HashMap<MapData, AddrKey, u32>,
    /// 0 decapsulated, 1 for an address that is no local VIP, 2 from a source not trusted or
    /// to another host.
    pub stats: PerCpuArray<MapData, u64>,
    pub mac: Array<MapData, [u8; 8]>,
    pub gue_port: Array<MapData, u32>,
    pub sources: LpmTrie<MapData, GeoData, u32>,
    pub local: HashMap<MapData, AddrKey, u32>,
}

impl Decapsulator {
    pub fn load() -> Result<Self> {
        let mut ebpf = load_object(lb_userspace::DECAP_OBJECT)?;
        program_mut(&mut ebpf, maps::PROG_DECAP)?
            .load()
            .context("verifier rejected decap")?;
        let e = &mut ebpf;
        let mut decap = Self {
            vips: take(e, maps::DECAP_VIPS)?,
            stats: take(e, maps::DECAP_STATS)?,
            mac: take(e, maps::DECAP_MAC)?,
            gue_port: take(e, maps::DECAP_GUE_PORT)?,
            sources: take(e, maps::DECAP_SOURCES)?,
            local: take(e, maps::DECAP_LOCAL)?,
            ebpf,
        };
        for (family, prefix, len) in [(4, &ENCAP_SRC4[..], 16), (6, &ENCAP_SRC6[..], 96)] {
            let (len, data) = lb_common::geo::key(family, words(prefix), len);
            decap
                .sources
                .insert(&aya::maps::lpm_trie::Key::new(len, data), 1, 0)?;
        }
        for (family, addr) in [(4, &BACKEND4[..]), (6, &BACKEND6[..])] {
            decap.local.insert(AddrKey::new(family, words(addr)), 1, 0)?;
        }
        for (family, vip) in [(4, &VIP4[..]), (6, &VIP6[..])] {
            decap.vips.insert(AddrKey::new(family, words(vip)), 1, 0)?;
        }
        Ok(decap)
    }

    /// One test run: the verdict and the frame as the program left it.
    pub fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let prog = program(&self.ebpf, maps::PROG_DECAP).expect("decap program");
        run_xdp(prog, input).expect("test_run")
    }

    /// Counter `i` of `stats`, summed over the CPUs.
    pub fn count(&self, i: u32) -> u64 {
        self.stats.get(&i, 0).expect("stat").iter().sum()
    }
}

/// An active L2 DSR backend: frames leave by `ifindex` (1, lo, is test_run's ingress, so that
/// is XDP_TX) from the balancer's MAC to `dst_mac`.
pub fn dsr_backend(dst_mac: [u8; 6], ifindex: u32) -> Backend {
    Backend {
        addr: [0; 16],
        family: 4,
        flags: BACKEND_F_ACTIVE,
        port: 0,
        generation: 1,
        ifindex,
        dst_mac,
        src_mac: LB_MAC,
    }
}

/// An active backend at `addr` (4 or 16 bytes) reached through a tunnel: no interface or MACs,
/// the next hop comes from the FIB.
pub fn routed_backend(addr: &[u8]) -> Backend {
    Backend {
        addr: padded(addr),
        family: family_of(addr),
        flags: BACKEND_F_ACTIVE,
        generation: 1,
        ..Default::default()
    }
}

/// An active NAT backend at `addr` (4 or 16 bytes) and `port`, reached through lo (test_run's
/// ingress, so forwarding is XDP_TX) from the balancer's MAC to `dst_mac`.
pub fn nat_backend(addr: &[u8], port: u16, generation: u32, dst_mac: [u8; 6]) -> Backend {
    Backend {
        addr: padded(addr),
        family: family_of(addr),
        flags: BACKEND_F_ACTIVE,
        port: port.to_be(),
        generation,
        ifindex: 1,
        dst_mac,
        src_mac: LB_MAC,
    }
}

/// One BPF_PROG_TEST_RUN of `prog` on `input`: the verdict and the frame as the program left
/// it (room for the largest encapsulation).
pub fn run_xdp(prog: &Xdp, input: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; input.len() + 256];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

fn padded(addr: &[u8]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..addr.len()].copy_from_slice(addr);
    a
}

fn family_of(addr: &[u8]) -> u8 {
    if addr.len() == 4 { 4 } else { 6 }
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name).with_context(|| format!("no map {name}"))
}

/// A map taken out of `ebpf`, typed as the field it fills.
fn take<T: TryFrom<Map, Error = MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    take_map(ebpf, name)?
        .try_into()
        .with_context(|| format!("map {name}"))
}

fn program<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Xdp> {
    Ok(ebpf
        .program(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?)
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?)
}
