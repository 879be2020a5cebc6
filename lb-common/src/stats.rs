//! Counters.

/// Per service or per backend traffic, per CPU.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Client SYNs for a flow this backend was just given (backends only): passive health.
    pub syn_retransmits: u64,
    /// NAT only: connections the backend refused (a RST as its first answer to the SYN):
    /// passive health.
    pub refused: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficStats>() == 40);

macro_rules! counters {
    ($($name:ident = $idx:expr, $label:expr;)*) => {
        /// Global counters: every verdict and every reason to pass or drop.
        #[repr(u32)]
        #[derive(Copy, Clone, Debug, PartialEq, Eq)]
        pub enum Counter { $($name = $idx,)* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];
            /// Stable name used by the CLI and metrics.
            pub const fn name(self) -> &'static str {
                match self { $(Counter::$name => $label,)* }
            }
        }
    };
}

counters! {
    // Verdicts for VIP traffic.
    Tx = 0, "tx";
    Redirect = 1, "redirect";
    // Passed to the kernel untouched.
    PassNotIp = 2, "pass_not_ip";
    PassNotVip = 3, "pass_not_vip";
    PassNotTcpUdp = 4, "pass_not_tcp_udp";
    PassIpv4Fragment = 5, "pass_ipv4_fragment";
    PassIpv6ExtHeader = 6, "pass_ipv6_ext_header";
    PassIpv6Fragment = 7, "pass_ipv6_fragment";
    PassStackedVlan = 8, "pass_stacked_vlan";
    // Dropped: malformed packets.
    DropTruncatedL2 = 9, "drop_truncated_l2";
    DropTruncatedL3 = 10, "drop_truncated_l3";
    DropBadIpHeader = 11, "drop_bad_ip_header";
    DropTruncatedL4 = 12, "drop_truncated_l4";
    DropBadL4Header = 13, "drop_bad_l4_header";
    // Dropped: VIP traffic that cannot be forwarded.
    DropNoBackend = 14, "drop_no_backend";
    DropBackendMissing = 15, "drop_backend_missing";
    DropRedirectFailed = 16, "drop_redirect_failed";
    // Connection table.
    ConntrackHit = 17, "conntrack_hit";
    ConntrackMiss = 18, "conntrack_miss";
    ConntrackStale = 19, "conntrack_stale";
    ConntrackInsertFailed = 20, "conntrack_insert_failed";
    // Encapsulation (IPIP): the next hop comes from the kernel's FIB.
    // No route to the backend (or forwarding is off on the ingress interface): passed as it came.
    PassNoRoute = 21, "pass_no_route";
    // Route found but the next hop's MAC is not known yet: passed encapsulated, so the kernel
    // forwards it and resolves the neighbour.
    PassEncapNoNeigh = 22, "pass_encap_no_neigh";
    // The encapsulated packet would exceed the egress MTU.
    DropEncapTooBig = 23, "drop_encap_too_big";
    // The kernel refused to grow the frame's headroom.
    DropEncapFailed = 24, "drop_encap_failed";
    // An ICMP error about a VIP flow, sent on to the flow's backend.
    IcmpErrorForwarded = 25, "icmp_error_forwarded";
    // An ICMP echo request to a VIP, answered by the balancer.
    EchoReplied = 26, "echo_replied";
    // An IP fragment sent to the backend its 3-tuple hashes to.
    FragmentForwarded = 27, "fragment_forwarded";
    // Encapsulation would exceed the MTU: the client was told the MTU to use.
    IcmpTooBigSent = 28, "icmp_too_big_sent";
    // NAT: a connection got its pair of entries (and, with SNAT, a port).
    NatCreated = 29, "nat_created";
    // NAT: a reply rewritten back to the client.
    NatReply = 30, "nat_reply";
    // NAT: a TCP packet other than SYN (or an ICMP error) for a connection with no entry.
    DropNatNoEntry = 31, "drop_nat_no_entry";
    // SNAT: every probed port was taken for that backend.
    DropNatNoPort = 32, "drop_nat_no_port";
    // NAT: the entry table is full (daemon.nat.table_size).
    DropNatTableFull = 33, "drop_nat_table_full";
    // NAT: the same tuple belongs to another connection (two VIPs sharing a backend, same client port).
    DropNatCollision = 34, "drop_nat_collision";
    // Shedding: a new flow over its backend's max_new_flows_per_s, sent to the next candidate.
    ShedSpilled = 35, "shed_spilled";
    // Shedding: a new flow over its service's or backend's limit, dropped (the client retries).
    DropShed = 36, "drop_shed";
    // Flood guard: a new flow forwarded by its Maglev table but not remembered, because this
    // CPU saw more new flows than daemon.flood_guard_per_cpu allows this 100 ms window.
    ConntrackFloodSkipped = 37, "conntrack_flood_skipped";
    // Least connections / two choices: every candidate was at its connection cap (maxconn).
    DropMaxconn = 38, "drop_maxconn";
    // Second chance: a TCP segment of a flow the connection table did not know, sent to the
    // previous Maglev table's (live) owner of its hash instead of the current one's.
    SecondChanceHit = 39, "second_chance_hit";
    // A check's packet steered to its backend (`through = "vip"`).
    CheckSteered = 40, "check_steered";
    // A check's packet whose slot or service was not there (a backend removed meanwhile).
    DropCheckNoTarget = 41, "drop_check_no_target";
    // NAT: a source address opened more new connections this second than
    // daemon.nat.max_new_per_source allows.
    DropNatSourceLimit = 42, "drop_nat_source_limit";
    // A flow's first packet (a SYN, a UDP flow's first datagram), remembered in the embryonic
    // table.
    EmbryonicInsert = 43, "embryonic_insert";
    // A flow's next packet found it in the embryonic table and moved it to the connection table.
    EmbryonicPromoted = 44, "embryonic_promoted";
    // A SYN that found its flow freshly pinned to the same backend: the client's retransmit,
    // counted here instead of as a miss (and not as a new flow).
    SynRetransmit = 45, "syn_retransmit";
}

/// Size of the global counter map.
pub const COUNTER_SLOTS: u32 = 48;
const _: () = assert!((Counter::SynRetransmit as u32) < COUNTER_SLOTS);
