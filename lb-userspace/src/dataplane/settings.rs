//! What the data plane takes from the daemon's settings. The daemon builds it from `[daemon]`
//! (`daemon::data_plane_settings`), so nothing here reads the config file's types.

use std::net::{Ipv4Addr, Ipv6Addr};

/// How the program is attached to an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic with a warning.
    #[default]
    Auto,
    Native,
    Generic,
}

/// The instance, where it attaches, and the sizes of the maps the daemon sizes at load.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub instance: String,
    pub interfaces: Vec<String>,
    pub attach: AttachMode,
    pub conntrack_size: u32,
    pub embryonic_size: u32,
    pub nat_table_size: u32,
    /// The Maglev table pool's capacity, in slots.
    pub table_pool_slots: u32,
    pub forwarding: Forwarding,
}

/// The daemon-wide values every packet reads (`DP_CONFIG`), but for which region trie is in
/// use (the geo loader's).
#[derive(Clone, Debug, PartialEq)]
pub struct Forwarding {
    pub encap_source4: Ipv4Addr,
    pub encap_source6: Ipv6Addr,
    pub gue_port: u16,
    /// Echo requests to a VIP answered here (else passed to the kernel).
    pub echo_reply: bool,
    /// Packets that encapsulation would make too big answered with ICMP (else dropped).
    pub too_big_icmp: bool,
    pub nat_source4: Option<Ipv4Addr>,
    pub nat_source6: Option<Ipv6Addr>,
    pub nat_port_first: u16,
    pub nat_port_count: u32,
    pub nat_max_new_per_source: u32,
    pub flood_guard_per_cpu: u32,
}
