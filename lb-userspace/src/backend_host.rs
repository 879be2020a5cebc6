//! `lb backend-host`: prepares a backend for encapsulated (IPIP) forwarding in one go, checks
//! one that receives traffic but does not answer, and undoes the setup.
//!
//! A backend needs: the decapsulator on its interface (this kernel may have no ipip module), the
//! VIPs on loopback (so the inner packet is local and replies come from the VIP), no ARP/ND
//! answers for those VIPs on the wire (arp_ignore/arp_announce), and a reverse-path filter that
//! does not drop packets whose client is routed through another interface.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray},
    programs::{Xdp, XdpMode, links::FdLink},
};
use futures::TryStreamExt;
use lb_common::{AddrKey, FAMILY_V4, FAMILY_V6, addr_words, maps};
use log::{info, warn};
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressHeaderFlags, AddressMessage},
    link::LinkAttribute,
};
use serde::Serialize;

use crate::control::queries::mac_string;

/// Pins of one interface's decapsulator: `<dir>/link`, `<dir>/DECAP_VIPS`, `<dir>/DECAP_STATS`,
/// under `/sys/fs/bpf/lb-decap/<network namespace inode>/<interface>`: bpffs is shared by all
/// namespaces, interface names are not.
pub fn pin_dir(interface: &str) -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata("/proc/thread-self/ns/net")
        .context("read this thread's network namespace")?
        .ino();
    Ok(PathBuf::from("/sys/fs/bpf/lb-decap")
        .join(ns.to_string())
        .join(interface))
}

/// One finding of `check`: what was looked at, whether it is right, and the fix when not.
#[derive(Debug, Serialize)]
pub struct Finding {
    pub ok: bool,
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn addr_key(vip: IpAddr) -> AddrKey {
    match vip {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            AddrKey::new(FAMILY_V4, addr_words(b))
        }
        IpAddr::V6(v6) => AddrKey::new(FAMILY_V6, addr_words(v6.octets())),
    }
}

fn ifindex(interface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(interface).context("invalid interface name")?;
    // SAFETY: valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => bail!("unknown interface {interface}"),
        i => Ok(i),
    }
}

fn validate_vips(vips: &[IpAddr]) -> Result<()> {
    if vips.is_empty() {
        bail!("name at least one --vip");
    }
    for v in vips {
        if v.is_unspecified() || v.is_multicast() || v.is_loopback() {
            bail!("invalid VIP {v}");
        }
    }
    Ok(())
}

/// An address prefix, written `ADDR/LEN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::str::FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDRESS/LENGTH"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("{a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = l
            .parse()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| format!("prefix length {l:?} is not 0..={max}"))?;
        Ok(Self { addr, len })
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Prefix {
    fn key(&self) -> aya::maps::lpm_trie::Key<lb_common::geo::GeoData> {
        let (family, words) = match self.addr {
            IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.octets());
                (lb_common::FAMILY_V4, lb_common::addr_words(b))
            }
            IpAddr::V6(a) => (lb_common::FAMILY_V6, lb_common::addr_words(a.octets())),
        };
        let (len, data) = lb_common::geo::key(family, words, u32::from(self.len));
        aya::maps::lpm_trie::Key::new(len, data)
    }
}

/// Who may encapsulate to this host, and at which of its addresses.
pub struct Trust {
    pub sources: Vec<Prefix>,
    /// Empty: the interface's own addresses.
    pub addresses: Vec<IpAddr>,
}

impl Trust {
    /// As the command line gives them; no source means the balancer's default sources.
    pub fn new(sources: &[Prefix], addresses: &[IpAddr]) -> Self {
        let sources = if sources.is_empty() {
            vec![
                Prefix {
                    addr: IpAddr::V4(std::net::Ipv4Addr::new(172, 16, 0, 0)),
                    len: 16,
                },
                Prefix {
                    addr: IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x4c42, 0, 0, 0, 0, 0, 0)),
                    len: 96,
                },
            ]
        } else {
            sources.to_vec()
        };
        Self {
            sources,
            addresses: addresses.to_vec(),
        }
    }

    /// The addresses, the interface's when none were given.
    fn addresses(&self, runtime: &tokio::runtime::Runtime, interface: &str) -> Result<Vec<IpAddr>> {
        if !self.addresses.is_empty() {
            return Ok(self.addresses.clone());
        }
        let found = runtime.block_on(addresses_of(interface))?;
        if found.is_empty() {
            bail!("{interface} has no address to take tunnels at (fix: add one, or name it with --address)");
        }
        Ok(found)
    }
}

/// Writes the sources and addresses the decapsulator trusts, exactly these; returns what
/// changed.
fn set_trust(dir: &Path, sources: &[Prefix], addresses: &[IpAddr]) -> Result<Vec<String>> {
    let mut changed = Vec::new();
    let mut trie = open_pinned::<LpmTrie<MapData, lb_common::geo::GeoData, u32>>(dir, maps::DECAP_SOURCES)?;
    let have: Vec<_> = trie.keys().filter_map(|k| k.ok()).collect();
    for p in sources {
        let k = p.key();
        if !have
            .iter()
            .any(|h| h.prefix_len() == k.prefix_len() && h.data() == k.data())
        {
            trie.insert(&k, 1, 0)
                .with_context(|| format!("allow tunnels from {p}"))?;
            changed.push(format!("decapsulating tunnels from {p}"));
        }
    }
    for h in have {
        if !sources
            .iter()
            .map(Prefix::key)
            .any(|k| h.prefix_len() == k.prefix_len() && h.data() == k.data())
        {
            trie.remove(&h).context("remove a tunnel source")?;
            changed.push("stopped decapsulating tunnels from a source no longer listed".to_string());
        }
    }
    let mut local = open_pinned::<HashMap<MapData, AddrKey, u32>>(dir, maps::DECAP_LOCAL)?;
    for &a in addresses {
        if local.get(&addr_key(a), 0).is_err() {
            local
                .insert(addr_key(a), 1, 0)
                .with_context(|| format!("take tunnels at {a}"))?;
            changed.push(format!("decapsulating tunnels to {a}"));
        }
    }
    let stale: Vec<AddrKey> = local
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !addresses.iter().any(|&a| addr_key(a) == *k))
        .collect();
    for k in stale {
        local.remove(&k).context("remove a tunnel address")?;
        changed.push(format!(
            "stopped decapsulating tunnels to {}",
            lb_common::ip_addr(k.family, k.addr)
        ));
    }
    Ok(changed)
}

/// An interface's addresses (IPv6 link-local ones aside).
async fn addresses_of(interface: &str) -> Result<Vec<IpAddr>> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    let mut stream = handle
        .address()
        .get()
        .set_link_index_filter(ifindex(interface)?)
        .execute();
    let mut out = Vec::new();
    while let Some(msg) = stream
        .try_next()
        .await
        .with_context(|| format!("list {interface}'s addresses"))?
    {
        for a in &msg.attributes {
            if let AddressAttribute::Address(x) = a
                && !matches!(x, IpAddr::V6(v6) if v6.is_unicast_link_local())
                && !out.contains(x)
            {
                out.push(*x);
            }
        }
    }
    Ok(out)
}

/// Sets everything up for exactly `vips` (ones an earlier setup listed and these do not are
/// dropped) and `trust`; idempotent. Returns what it changed.
pub fn setup(interface: &str, vips: &[IpAddr], gue_port: u16, trust: &Trust) -> Result<Vec<String>> {
    validate_vips(vips)?;
    ifindex(interface)?;
    let mut changed = Vec::new();
    let dir = pin_dir(interface)?;
    let link_pin = dir.join("link");
    if link_pin.exists() && attachment(&link_pin, ifindex(interface)?) == Attachment::Elsewhere {
        // An earlier interface of this name was removed (and maybe made again): its pinned
        // link attaches nothing. A new link, on the same pinned maps, replaces it.
        std::fs::remove_file(&link_pin).with_context(|| format!("remove {}", link_pin.display()))?;
        attach(interface, &dir, &link_pin)?;
        changed.push(format!(
            "re-attached the decapsulator to {interface} (the old attachment was to a removed interface)"
        ));
    }
    if !link_pin.exists() {
        attach(interface, &dir, &link_pin).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })?;
        changed.push(format!("attached the decapsulator to {interface}"));
    }
    let mut port = open_pinned::<Array<MapData, u32>>(&dir, maps::DECAP_GUE_PORT)?;
    if port.get(&0, 0).ok() != Some(gue_port as u32) {
        port.set(0, gue_port as u32, 0).context("set the GUE port")?;
        changed.push(if gue_port == 0 {
            "GUE off (IPIP only)".to_string()
        } else {
            format!("decapsulating GUE on UDP port {gue_port}")
        });
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mac = runtime.block_on(link_mac(interface))?;
    let mut mac_map = open_pinned::<Array<MapData, [u8; 8]>>(&dir, maps::DECAP_MAC)?;
    let mut want = [0u8; 8];
    want[..6].copy_from_slice(&mac);
    if mac_map.get(&0, 0).ok() != Some(want) {
        mac_map.set(0, want, 0).context("set the interface MAC")?;
        changed.push(format!("decapsulating frames to {}", mac_string(&mac)));
    }
    let mut map = open_pinned::<HashMap<MapData, AddrKey, u32>>(&dir, maps::DECAP_VIPS)?;
    for &vip in vips {
        let had = map.get(&addr_key(vip), 0).ok();
        let added = runtime.block_on(add_to_loopback(vip))?;
        if added {
            changed.push(format!("added {vip} to lo"));
        }
        let want = had.unwrap_or(VIP_LISTED) | if added { VIP_ADDED_TO_LO } else { 0 };
        if had != Some(want) {
            map.insert(addr_key(vip), want, 0)
                .with_context(|| format!("add {vip} to the decapsulator"))?;
        }
        if had.is_none() {
            changed.push(format!("decapsulating for {vip}"));
        }
    }
    // The list is the whole truth: VIPs an earlier setup listed and this one does not are
    // dropped, and taken off lo if that setup put them there.
    let stale: Vec<(AddrKey, u32)> = map
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(k, _)| !vips.iter().any(|&v| addr_key(v) == *k))
        .collect();
    for (key, flags) in stale {
        let vip = lb_common::ip_addr(key.family, key.addr);
        map.remove(&key)
            .with_context(|| format!("remove {vip} from the decapsulator"))?;
        changed.push(format!("stopped decapsulating for {vip}"));
        if flags & VIP_ADDED_TO_LO != 0 && runtime.block_on(remove_from_loopback(vip))? {
            changed.push(format!("removed {vip} from lo"));
        }
    }
    let addresses = trust.addresses(&runtime, interface)?;
    changed.extend(set_trust(&dir, &trust.sources, &addresses)?);
    for (path, want) in sysctls(interface) {
        let have = read_sysctl(&path)?;
        if !want.satisfied_by(have) {
            write_sysctl(&path, want.value())?;
            changed.push(format!("{} = {}", sysctl_name(&path), want.value()));
        }
    }
    Ok(changed)
}

/// Removes the decapsulator and its pins. VIPs stay on loopback and sysctls stay as they are:
/// they may predate the setup.
pub fn teardown(interface: &str) -> Result<bool> {
    let dir = pin_dir(interface)?;
    if !dir.exists() {
        return Ok(false);
    }
    // Removing the link pin drops the last reference: the program detaches.
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    // Parents go only when empty: other interfaces or namespaces may be set up.
    for parent in dir.ancestors().skip(1).take(2) {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(true)
}

/// Looks at every setting a backend needs and says which is wrong.
pub fn check(interface: &str, vips: &[IpAddr], gue_port: u16, trust: &Trust) -> Result<Vec<Finding>> {
    validate_vips(vips)?;
    ifindex(interface)?;
    let mut out = Vec::new();
    let dir = pin_dir(interface)?;
    let link_pin = dir.join("link");
    let attached = link_pin.exists();
    let here = attached && attachment(&link_pin, ifindex(interface)?) != Attachment::Elsewhere;
    out.push(Finding {
        ok: here,
        what: if attached && !here {
            format!("decapsulator attached to {interface} (its pinned attachment is to a removed interface)")
        } else {
            format!("decapsulator attached to {interface}")
        },
        fix: (!here).then(|| format!("lb backend-host setup --interface {interface} --vip ...")),
    });
    let map = if attached {
        open_pinned::<HashMap<MapData, AddrKey, u32>>(&dir, maps::DECAP_VIPS).ok()
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if attached {
        let mac = runtime.block_on(link_mac(interface))?;
        let have = open_pinned::<Array<MapData, [u8; 8]>>(&dir, maps::DECAP_MAC)
            .ok()
            .and_then(|m| m.get(&0, 0).ok())
            .unwrap_or_default();
        let ok = have[..6] == mac;
        out.push(Finding {
            ok,
            what: format!(
                "decapsulator takes frames to {} ({interface} has {})",
                mac_string(&have[..6].try_into().unwrap_or_default()),
                mac_string(&mac)
            ),
            fix: (!ok).then(|| format!("lb backend-host setup --interface {interface} --vip ...")),
        });
    }
    if attached {
        let have = open_pinned::<Array<MapData, u32>>(&dir, maps::DECAP_GUE_PORT)
            .ok()
            .and_then(|m| m.get(&0, 0).ok())
            .unwrap_or(0);
        let ok = have == gue_port as u32;
        out.push(Finding {
            ok,
            what: format!("decapsulator takes GUE on UDP port {have} (0: none)"),
            fix: (!ok).then(|| {
                format!("lb backend-host setup --interface {interface} --gue-port {gue_port} --vip ...")
            }),
        });
    }
    if attached {
        let trie =
            open_pinned::<LpmTrie<MapData, lb_common::geo::GeoData, u32>>(&dir, maps::DECAP_SOURCES).ok();
        for p in &trust.sources {
            let ok = trie.as_ref().is_some_and(|t| t.get(&p.key(), 0).is_ok());
            out.push(Finding {
                ok,
                what: format!("decapsulator takes tunnels from {p}"),
                fix: (!ok)
                    .then(|| format!("lb backend-host setup --interface {interface} --source {p} --vip ...")),
            });
        }
        let local = open_pinned::<HashMap<MapData, AddrKey, u32>>(&dir, maps::DECAP_LOCAL).ok();
        for a in trust.addresses(&runtime, interface)? {
            let ok = local.as_ref().is_some_and(|m| m.get(&addr_key(a), 0).is_ok());
            out.push(Finding {
                ok,
                what: format!("decapsulator takes tunnels to {a}"),
                fix: (!ok).then(|| format!("lb backend-host setup --interface {interface} --vip ...")),
            });
        }
    }
    for &vip in vips {
        let known = map.as_ref().is_some_and(|m| m.get(&addr_key(vip), 0).is_ok());
        out.push(Finding {
            ok: known,
            what: format!("decapsulator knows VIP {vip}"),
            fix: (!known).then(|| format!("lb backend-host setup --interface {interface} --vip {vip}")),
        });
    }
    let on_lo = runtime.block_on(loopback_addresses())?;
    for &vip in vips {
        let ok = on_lo.contains(&vip);
        let len = if vip.is_ipv4() { 32 } else { 128 };
        out.push(Finding {
            ok,
            what: format!("{vip} is on lo (else the kernel drops the decapsulated packet)"),
            fix: (!ok).then(|| format!("ip addr add {vip}/{len} dev lo")),
        });
    }
    for (path, want) in sysctls(interface) {
        let have = read_sysctl(&path)?;
        let ok = want.satisfied_by(have);
        out.push(Finding {
            ok,
            what: format!("{} = {have} ({})", sysctl_name(&path), want.why()),
            fix: (!ok).then(|| format!("sysctl -w {}={}", sysctl_name(&path), want.value())),
        });
    }
    if attached && let Ok(stats) = open_pinned::<PerCpuArray<MapData, u64>>(&dir, maps::DECAP_STATS) {
        let sum = |i: u32| -> u64 { stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        let (decapped, foreign, untrusted) = (sum(0), sum(1), sum(2));
        out.push(Finding {
            ok: foreign == 0,
            what: format!(
                "{decapped} packets decapsulated; {foreign} IPIP packets for an inner address that is no listed VIP"
            ),
            fix: (foreign > 0)
                .then(|| "add the VIPs the balancer sends here: lb backend-host setup ... --vip VIP".to_string()),
        });
        out.push(Finding {
            ok: untrusted == 0,
            what: format!("{untrusted} tunnel packets from a source not allowed, or to another address, passed as they came"),
            fix: (untrusted > 0).then(|| {
                "name the balancers' encap_source prefixes and this host's address: lb backend-host setup ... --source PREFIX --address ADDR".to_string()
            }),
        });
    }
    Ok(out)
}

#[derive(Debug, PartialEq, Eq)]
enum Attachment {
    /// The pinned link attaches the decapsulator to the interface of this name now.
    Here,
    /// To another interface: one that was removed (ifindex 0), or an older one of the name.
    Elsewhere,
    /// The kernel would not say: taken as attached, as before this check existed.
    Unknown,
}

/// Where the XDP link pinned at `pin` is attached, compared with `ifindex`. aya's link info
/// has no interface, so this asks the kernel directly (BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD).
fn attachment(pin: &Path, ifindex: u32) -> Attachment {
    use std::os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let Ok(path) = std::ffi::CString::new(pin.as_os_str().as_bytes()) else {
        return Attachment::Unknown;
    };
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: a valid bpf_attr prefix for BPF_OBJ_GET, and its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &get as *const ObjGet,
            size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Attachment::Unknown;
    }
    // SAFETY: the kernel just gave us this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then (8-aligned, at 16) the per-type union,
    // whose XDP member starts with the ifindex (0 once the interface is gone).
    let mut info = [0u8; 64];
    let by_fd = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: a valid bpf_attr prefix for BPF_OBJ_GET_INFO_BY_FD pointing at `info`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &by_fd as *const InfoByFd,
            size_of::<InfoByFd>(),
        )
    };
    let word = |at: usize| u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]]);
    if rc != 0 || word(0) != BPF_LINK_TYPE_XDP {
        return Attachment::Unknown;
    }
    if word(16) == ifindex {
        Attachment::Here
    } else {
        Attachment::Elsewhere
    }
}

fn attach(interface: &str, dir: &Path, link_pin: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(crate::DECAP_OBJECT)
        .context("load the decapsulator")?;
    let prog: &mut Xdp = ebpf
        .program_mut(maps::PROG_DECAP)
        .context("decap program missing")?
        .try_into()?;
    prog.load().context("the verifier rejected the decapsulator")?;
    let mut last = String::new();
    for (mode, name) in [(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")] {
        match prog.attach(interface, mode) {
            Ok(id) => {
                let link = FdLink::try_from(prog.take_link(id)?).context("XDP link cannot be pinned")?;
                link.pin(link_pin)
                    .with_context(|| format!("pin {}", link_pin.display()))?;
                if last.is_empty() {
                    info!("{interface}: decapsulator attached in {name} mode");
                } else {
                    warn!("{interface}: decapsulator attached in {name} mode; native failed: {last}");
                }
                return Ok(());
            }
            Err(e) => last = e.to_string(),
        }
    }
    bail!("cannot attach the decapsulator to {interface}: {last}")
}

/// One of the decapsulator's maps, pinned under `dir`.
fn open_pinned<T>(dir: &Path, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
    Ok(Map::from_map_data(data)?.try_into()?)
}

/// The interface's Ethernet address, from the kernel (this thread's network namespace).
async fn link_mac(interface: &str) -> Result<[u8; 6]> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    let mut links = handle.link().get().match_index(ifindex(interface)?).execute();
    while let Some(msg) = links.try_next().await.context("read the interface")? {
        for attr in msg.attributes {
            if let LinkAttribute::Address(a) = attr
                && a.len() == 6
            {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&a);
                return Ok(mac);
            }
        }
    }
    bail!("{interface} has no Ethernet address")
}

/// DECAP_VIPS values: the VIP is listed; setup put it on lo (so a later setup without it takes
/// it off again; an address that was there before stays).
const VIP_LISTED: u32 = 1;
const VIP_ADDED_TO_LO: u32 = 2;

/// lo's addresses, each with its netlink message, and the handle of the connection that read
/// them (to change them on).
async fn loopback() -> Result<(rtnetlink::Handle, Vec<(IpAddr, AddressMessage)>)> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    let mut stream = handle
        .address()
        .get()
        .set_link_index_filter(ifindex("lo")?)
        .execute();
    let mut out = Vec::new();
    while let Some(msg) = stream.try_next().await.context("list lo's addresses")? {
        let addr = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(x) => Some(*x),
            _ => None,
        });
        if let Some(addr) = addr {
            out.push((addr, msg));
        }
    }
    Ok((handle, out))
}

async fn loopback_addresses() -> Result<Vec<IpAddr>> {
    Ok(loopback().await?.1.into_iter().map(|(a, _)| a).collect())
}

/// Removes `vip` from lo; false if it was not there.
async fn remove_from_loopback(vip: IpAddr) -> Result<bool> {
    let (handle, addrs) = loopback().await?;
    let Some((_, msg)) = addrs.into_iter().find(|(a, _)| *a == vip) else {
        return Ok(false);
    };
    handle
        .address()
        .del(msg)
        .execute()
        .await
        .with_context(|| format!("remove {vip} from lo"))?;
    Ok(true)
}

/// Adds `vip` to lo; false if it was there already.
async fn add_to_loopback(vip: IpAddr) -> Result<bool> {
    let (handle, addrs) = loopback().await?;
    if addrs.iter().any(|(a, _)| *a == vip) {
        return Ok(false);
    }
    let len = if vip.is_ipv4() { 32 } else { 128 };
    let mut add = handle.address().add(ifindex("lo")?, vip, len);
    // No duplicate address detection: the VIP is meant to be on many hosts, and a tentative
    // address cannot be bound until DAD's work has run.
    add.message_mut().header.flags |= AddressHeaderFlags::Nodad;
    add.execute()
        .await
        .with_context(|| format!("add {vip}/{len} to lo"))?;
    Ok(true)
}

/// What a sysctl must be. The kernel uses the larger of `all` and the interface's value for
/// these three, so both are set.
#[derive(Clone, Copy)]
enum Want {
    /// arp_ignore: answer ARP only for addresses on the receiving interface (not the VIPs on lo).
    AtLeast1,
    /// arp_announce: never use a VIP as the source of our own ARP requests.
    AtLeast2,
    /// rp_filter: strict (1) drops decapsulated packets whose client is routed through another
    /// interface; loose (2) or off (0) do not.
    NotStrict,
}

impl Want {
    fn satisfied_by(self, have: u32) -> bool {
        match self {
            Want::AtLeast1 => have >= 1,
            Want::AtLeast2 => have >= 2,
            Want::NotStrict => have != 1,
        }
    }
    fn value(self) -> u32 {
        match self {
            Want::AtLeast1 => 1,
            Want::AtLeast2 | Want::NotStrict => 2,
        }
    }
    fn why(self) -> &'static str {
        match self {
            Want::AtLeast1 => "must be >= 1: do not answer ARP for the VIPs",
            Want::AtLeast2 => "must be >= 2: never announce a VIP",
            Want::NotStrict => "must not be 1: strict reverse-path filtering can drop client packets",
        }
    }
}

fn sysctls(interface: &str) -> Vec<(PathBuf, Want)> {
    let mut out = Vec::new();
    for dev in ["all", interface] {
        let base = PathBuf::from("/proc/sys/net/ipv4/conf").join(dev);
        out.push((base.join("arp_ignore"), Want::AtLeast1));
        out.push((base.join("arp_announce"), Want::AtLeast2));
        out.push((base.join("rp_filter"), Want::NotStrict));
    }
    out
}

fn sysctl_name(path: &Path) -> String {
    path.strip_prefix("/proc/sys")
        .unwrap_or(path)
        .to_string_lossy()
        .replace('/', ".")
}

fn read_sysctl(path: &Path) -> Result<u32> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{} holds {text:?}", path.display()))
}

fn write_sysctl(path: &Path, value: u32) -> Result<()> {
    std::fs::write(path, format!("{value}\n")).with_context(|| format!("write {}", path.display()))
}
