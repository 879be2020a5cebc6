//! What the kernel says about this host's interfaces: their addresses (`getifaddrs`), a veth's
//! peer and whether it runs XDP (netlink), and the driver's XDP transmit errors (ethtool
//! statistics); and the one ethtool setting the daemon makes (tx checksum offload off).

use std::{io, net::IpAddr};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached};

/// Every address of this host's interfaces, in the calling thread's network namespace.
pub fn addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs made; its address, when set, is a sockaddr of
        // the family it names.
        unsafe {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let a = &*(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let a = &*(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(a.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

/// What the kernel says of an interface's XDP, read once at start.
pub struct XdpState {
    /// The mode its program is attached in ("native", "generic", "offload"); `None` when it
    /// runs none. A restarted daemon adopts pinned attachments without attaching, so this is
    /// how it knows what runs.
    pub mode: Option<&'static str>,
    /// For a veth in native mode whose peer runs no XDP program, the warning that says the
    /// kernel drops every frame the program sends back out of it (XDP_TX, redirects), since
    /// a veth hands such frames only to a peer that runs XDP itself, with the fix.
    pub lossy_peer: Option<String>,
}

/// `iface`'s [`XdpState`], over one netlink connection.
pub async fn xdp_state(iface: &str) -> Result<XdpState, String> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
    let task = tokio::spawn(connection);
    let state = xdp_state_of(&handle, iface).await;
    task.abort();
    state
}

async fn xdp_state_of(handle: &rtnetlink::Handle, iface: &str) -> Result<XdpState, String> {
    let link = one_link(handle.link().get().match_name(iface)).await?;
    let mode = attached_modes(&link).next();
    let lossy_peer = match peer_of(handle, &link).await? {
        Some(peer) if !peer.native_xdp => {
            let place = if peer.other_namespace {
                " in another network namespace"
            } else {
                ""
            };
            Some(format!(
                "{iface}: a veth in native XDP mode whose peer {}{place} runs no XDP program: the \
                 kernel drops every frame the balancer sends back out of {iface} (DSR, NAT replies; \
                 counted in lb_interface_xdp_tx_errors_total) (fix: attach an XDP program to {} (a \
                 pass program will do), or set xdp_mode = \"generic\")",
                peer.name, peer.name
            ))
        }
        _ => None,
    };
    Ok(XdpState { mode, lossy_peer })
}

/// A veth's peer, as netlink describes it.
struct Peer {
    name: String,
    other_namespace: bool,
    native_xdp: bool,
}

/// The peer of `link` when `link` is a veth running XDP in native mode.
async fn peer_of(handle: &rtnetlink::Handle, link: &LinkMessage) -> Result<Option<Peer>, String> {
    let is_veth = link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(info)
            if info.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
    });
    if !is_veth || !native_xdp(link) {
        return Ok(None);
    }
    let mut peer_index = None;
    let mut netns = None;
    for a in &link.attributes {
        match a {
            LinkAttribute::Link(i) => peer_index = Some(*i),
            LinkAttribute::LinkNetNsId(id) => netns = Some(*id),
            _ => {}
        }
    }
    let Some(index) = peer_index.filter(|&i| i != 0) else {
        return Ok(None);
    };
    let mut request = handle.link().get().match_index(index);
    if let Some(id) = netns {
        // IFLA_TARGET_NETNSID: the peer's index is one of the namespace it lives in.
        request
            .message_mut()
            .attributes
            .push(LinkAttribute::IfNetnsId(id));
    }
    let peer = one_link(request).await?;
    let name = peer
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("ifindex {index}"));
    Ok(Some(Peer {
        name,
        other_namespace: netns.is_some(),
        native_xdp: native_xdp(&peer),
    }))
}

async fn one_link(request: rtnetlink::LinkGetRequest) -> Result<LinkMessage, String> {
    request
        .execute()
        .try_next()
        .await
        .map_err(|e| format!("netlink: {e}"))?
        .ok_or_else(|| "netlink: no such link".to_string())
}

/// The modes a link's XDP programs are attached in, as netlink lists them (programs in several
/// modes at once: each mode's program id says which runs).
fn attached_modes(link: &LinkMessage) -> impl Iterator<Item = &'static str> + '_ {
    link.attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::Xdp(xdp) => Some(xdp),
            _ => None,
        })
        .flatten()
        .filter_map(|x| match x {
            LinkXdp::Attached(XdpAttached::Driver) | LinkXdp::DrvProgId(_) => Some("native"),
            LinkXdp::Attached(XdpAttached::SocketBuffer) | LinkXdp::SkbProgId(_) => Some("generic"),
            LinkXdp::Attached(XdpAttached::Hardware) | LinkXdp::HwProgId(_) => Some("offload"),
            _ => None,
        })
}

/// Whether a link runs an XDP program in native (driver) mode.
fn native_xdp(link: &LinkMessage) -> bool {
    attached_modes(link).any(|m| m == "native")
}

/// The ethtool statistics' names that count frames an XDP program sent out of the interface
/// and the driver dropped: veth's `rx_queue_N_xdp_tx_errors` (XDP_TX) and
/// `tx_queue_N_xdp_xmit_errors` (frames redirected to it), virtio_net's
/// `tx_queue_N_xdp_tx_drops`.
const TX_ERROR_SUFFIXES: [&str; 3] = ["_xdp_tx_errors", "_xdp_xmit_errors", "_xdp_tx_drops"];

/// The sum of an interface's XDP transmit error counters; `None` when its driver has none.
pub fn xdp_tx_errors(device: &str) -> io::Result<Option<u64>> {
    Ok(tx_errors_of(&ethtool_stats(device)?))
}

fn tx_errors_of(stats: &[(String, u64)]) -> Option<u64> {
    let mut found = None;
    for (name, value) in stats {
        if TX_ERROR_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            *found.get_or_insert(0) += value;
        }
    }
    found
}

const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETH_SS_STATS: u32 = 1;
const ETH_GSTRING_LEN: usize = 32;

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// An interface's ethtool statistics, by name (`ethtool -S`).
pub fn ethtool_stats(device: &str) -> io::Result<Vec<(String, u64)>> {
    // SAFETY: plain integers and byte arrays: all zeroes is a valid value.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    ethtool(device, (&mut info as *mut DrvInfo).cast())?;
    let n = info.n_stats as usize;
    if n == 0 {
        return Ok(Vec::new());
    }
    // The kernel writes as many as the driver has at the time of each call, whatever the
    // buffer's size: room for twice the count, should its queues grow in between.
    let room = 2 * n + 16;
    // `struct ethtool_gstrings`: cmd, string_set, len, then the names.
    let mut names = vec![0u32; 3 + room * ETH_GSTRING_LEN / 4];
    names[0] = ETHTOOL_GSTRINGS;
    names[1] = ETH_SS_STATS;
    names[2] = n as u32;
    ethtool(device, names.as_mut_ptr().cast())?;
    // `struct ethtool_stats`: cmd, n_stats, then the values.
    let mut values = vec![0u64; 1 + room];
    values[0] = u64::from(ETHTOOL_GSTATS) | (n as u64) << 32;
    ethtool(device, values.as_mut_ptr().cast())?;
    let (strings, counted) = (names[2] as usize, (values[0] >> 32) as usize);
    if strings.max(counted) > room {
        return Err(io::Error::other("the driver's statistics grew past the buffer"));
    }
    let bytes: Vec<u8> = names[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
    Ok(bytes
        .chunks(ETH_GSTRING_LEN)
        .take(strings.min(counted))
        .zip(&values[1..])
        .map(|(name, &v)| {
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            (String::from_utf8_lossy(&name[..end]).into_owned(), v)
        })
        .collect())
}

/// `ethtool -K DEVICE tx off`.
pub fn tx_checksum_off(device: &str) -> io::Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    ethtool(device, (&mut value as *mut EthtoolValue).cast())
}

/// One SIOCETHTOOL request on `device`; `data` is the command's struct, starting with its cmd.
fn ethtool(device: &str, data: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: a zeroed ifreq is valid; the name fits (checked) and is NUL-terminated.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = device.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::other("interface name too long"));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = data.cast();
    // SAFETY: a datagram socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCETHTOOL with a valid ifreq whose data points at the caller's live command.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx_errors_sum_the_xdp_transmit_error_counters_only() {
        let stats: Vec<(String, u64)> = [
            ("peer_ifindex", 7),
            ("rx_queue_0_xdp_tx", 100),
            ("rx_queue_0_xdp_tx_errors", 12),
            ("rx_queue_1_xdp_tx_errors", 3),
            ("tx_queue_0_xdp_xmit", 9),
            ("tx_queue_0_xdp_xmit_errors", 2),
            ("rx_queue_0_drops", 40),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        assert_eq!(tx_errors_of(&stats), Some(17));
        assert_eq!(tx_errors_of(&stats[..2]), None, "no such counter: no figure");
    }

    #[test]
    fn loopback_has_addresses_and_no_xdp_transmit_errors() {
        let own = addresses().expect("getifaddrs");
        assert!(own.contains(&IpAddr::from([127, 0, 0, 1])), "{own:?}");
        // lo has no ethtool statistics at all.
        assert!(matches!(xdp_tx_errors("lo"), Ok(None) | Err(_)));
    }
}
