//! The families the data-plane collector builds on each scrape: name, help, type, labels.

use prometheus::proto::MetricType;

/// The families the collector builds on each scrape: name, help, type, label names.
pub(super) const FAMILIES: &[(&str, &str, MetricType, &[&str])] = &[
    (
        "lb_service_packets_total",
        "Packets forwarded for a service.",
        MetricType::COUNTER,
        &["service"],
    ),
    (
        "lb_service_bytes_total",
        "Bytes forwarded for a service.",
        MetricType::COUNTER,
        &["service"],
    ),
    (
        "lb_service_new_flows_total",
        "New flows of a service.",
        MetricType::COUNTER,
        &["service"],
    ),
    (
        "lb_backend_packets_total",
        "Packets forwarded to a backend.",
        MetricType::COUNTER,
        &["service", "backend"],
    ),
    (
        "lb_backend_bytes_total",
        "Bytes forwarded to a backend.",
        MetricType::COUNTER,
        &["service", "backend"],
    ),
    (
        "lb_backend_new_flows_total",
        "New flows sent to a backend.",
        MetricType::COUNTER,
        &["service", "backend"],
    ),
    (
        "lb_dataplane_packets_total",
        "Packets by what the data plane did with them: forwarded, passed or dropped, and why.",
        MetricType::COUNTER,
        &["reason"],
    ),
    (
        "lb_backend_up",
        "1 when a backend's health checks say up.",
        MetricType::GAUGE,
        &["service", "backend"],
    ),
    (
        "lb_backend_health_score",
        "A backend's health score (0..1), external score included.",
        MetricType::GAUGE,
        &["service", "backend"],
    ),
    (
        "lb_backend_effective_weight",
        "A backend's weight in its service's table (0: no new flows).",
        MetricType::GAUGE,
        &["service", "backend"],
    ),
    (
        "lb_backend_breaker_state",
        "A backend's circuit breaker state (the series of the current state, at 1), for backends with a breaker.",
        MetricType::GAUGE,
        &["service", "backend", "state"],
    ),
    (
        "lb_health_checks_total",
        "Active health checks by outcome.",
        MetricType::COUNTER,
        &["service", "backend", "outcome"],
    ),
    (
        "lb_health_agent_replies_total",
        "Agent-check answers by outcome.",
        MetricType::COUNTER,
        &["service", "backend", "outcome"],
    ),
    (
        "lb_service_panic",
        "1 while a service is in panic mode.",
        MetricType::GAUGE,
        &["service"],
    ),
    (
        "lb_service_table_generation",
        "Maglev tables a service has had (swaps since it was created).",
        MetricType::GAUGE,
        &["service"],
    ),
    (
        "lb_reconcile_passes_total",
        "Reconciler passes.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_tables_built_total",
        "Maglev tables built by the reconciler.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_table_pool_slots",
        "Maglev table pool slots.",
        MetricType::GAUGE,
        &["state"],
    ),
    (
        "lb_xdp_attached",
        "1 for each interface the balancer is attached to, by XDP mode.",
        MetricType::GAUGE,
        &["interface", "mode"],
    ),
    (
        "lb_nat_entries",
        "NAT table entries (two per connection), as of the last sweep.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_nat_capacity_entries",
        "NAT table capacity.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_nat_snat_ports_in_use",
        "SNAT source ports in use, as of the last sweep.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_nat_expired_total",
        "NAT connections expired by the collector.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_conntrack_capacity_entries",
        "Connection table capacity.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_conntrack_entries",
        "Connection table entries, as of the last census (every 10 s or more).",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_build_info",
        "The daemon's version.",
        MetricType::GAUGE,
        &["version"],
    ),
    (
        "lb_backend_syn_retransmits_total",
        "Client SYN retransmits for flows just pinned to a backend (passive health's signal).",
        MetricType::COUNTER,
        &["service", "backend"],
    ),
    (
        "lb_health_passive_failures_total",
        "Failures passive health recorded for a backend.",
        MetricType::COUNTER,
        &["service", "backend"],
    ),
    (
        "lb_backend_active_flows",
        "Active flows the data plane counts for a backend (services on least-connections or power-of-two).",
        MetricType::GAUGE,
        &["service", "backend"],
    ),
    (
        "lb_active_flow_corrections_total",
        "Backend active-flow counts the connection-table census corrected (flows that left without FIN or RST).",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_conntrack_census_duration_seconds",
        "How long the last connection-table census (entry count, active-flow correction) took.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_service_strategy",
        "The strategy a service runs now, at 1 (an adaptive service has a series per strategy it can pick).",
        MetricType::GAUGE,
        &["service", "strategy"],
    ),
    (
        "lb_backend_load",
        "A backend's smoothed load (0..1, from its reports and agent), for services running resource-aware.",
        MetricType::GAUGE,
        &["service", "backend"],
    ),
    (
        "lb_backend_refused_total",
        "NAT services: connections a backend refused (a RST as its first answer to the SYN); passive health counts them.",
        MetricType::COUNTER,
        &["service", "backend"],
    ),
    (
        "lb_backend_load_factor",
        "The factor resource-aware weighting applies to a backend's weight now.",
        MetricType::GAUGE,
        &["service", "backend"],
    ),
    (
        "lb_nat_half_open",
        "NAT TCP connections whose handshake the client has not completed, as of the last sweep.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_bgp_session_up",
        "1 while this node's BGP session to the peer is established ([daemon.bgp]).",
        MetricType::GAUGE,
        &["peer"],
    ),
    (
        "lb_vip_announced",
        "1 while this node announces the service's VIP over BGP.",
        MetricType::GAUGE,
        &["service"],
    ),
    (
        "lb_node_draining",
        "1 while the node is drained (lb node drain): no VIP announced.",
        MetricType::GAUGE,
        &[],
    ),
];
/// `families` names each family by its index in FAMILIES.
const _: () = assert!(FAMILIES.len() == 39);
